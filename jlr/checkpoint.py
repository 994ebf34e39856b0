"""A factorized params tree is the artifact: save it with orbax, load it back with its
``LowRank`` layouts, without a template and without re-declaring shapes.

``save(directory, params)`` writes an orbax checkpoint of the arrays (each ``LowRank``
stored as ``{"u", "v"}``) and ``jlr_layouts.json`` with every factorized path's layout.
``load(directory)`` restores the arrays (as a nested dict) and rebuilds the ``LowRank``
leaves. Plain orbax checkpoints of params trees (no JSON) load too.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np

from jlr.layouts import Layout
from jlr.lowrank import LowRank, is_lowrank
from jlr.paths import path_str

LAYOUTS_FILE = "jlr_layouts.json"
ARRAYS_DIR = "arrays"


def _orbax():
  """``orbax.checkpoint``, or an ImportError that says how to install it."""
  try:
    import orbax.checkpoint as ocp
  except ImportError as e:
    raise ImportError(f"jlr.checkpoint and the jlr command line need orbax-checkpoint "
                      f"({e}): pip install 'jlr[cli]' (or pip install orbax-checkpoint)") from e
  return ocp


def _lower(params):
  """LowRank -> {"u", "v"}; returns (tree, {path: layout dict})."""
  layouts = {}

  def one(kp, x):
    if is_lowrank(x):
      layouts[path_str(kp)] = {"kind": x.layout.kind, "shape": list(x.layout.shape),
                               "n_in": x.layout.n_in}
      return {"u": x.u, "v": x.v}
    return x
  return jax.tree_util.tree_map_with_path(one, params, is_leaf=is_lowrank), layouts


def save(directory: str, params, *, force: bool = False) -> None:
  """Save ``params`` (any pytree of arrays and ``LowRank``) to ``directory``."""
  ocp = _orbax()

  directory = os.path.abspath(directory)
  if os.path.exists(directory):
    if not force:
      raise FileExistsError(f"{directory} exists; pass force=True to overwrite it")
    shutil.rmtree(directory)
  os.makedirs(directory)
  tree, layouts = _lower(params)
  tree = jax.tree.map(np.asarray, tree)
  with ocp.StandardCheckpointer() as ck:
    ck.save(os.path.join(directory, ARRAYS_DIR), tree)
  with open(os.path.join(directory, LAYOUTS_FILE), "w") as fh:
    json.dump(layouts, fh, indent=1, sort_keys=True)


def _raise(directory, why):
  raise ValueError(f"cannot load a checkpoint from {directory}: {why}")


def load(directory: str):
  """Load a tree saved by :func:`save` (or a plain orbax checkpoint of a params tree)."""
  ocp = _orbax()

  directory = os.path.abspath(directory)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no checkpoint at {directory}")
  arrays = os.path.join(directory, ARRAYS_DIR)
  path = arrays if os.path.isdir(arrays) else directory
  try:
    with ocp.StandardCheckpointer() as ck:
      tree = ck.restore(path)
  except Exception as e:  # orbax raises many types on bad input; name the file instead
    _raise(directory, f"{type(e).__name__}: {e}")
  layouts = {}
  lpath = os.path.join(directory, LAYOUTS_FILE)
  if os.path.exists(lpath):
    try:
      with open(lpath) as fh:
        layouts = json.load(fh)
    except json.JSONDecodeError as e:
      _raise(directory, f"{LAYOUTS_FILE} is corrupt ({e})")
  return _raise_lowrank(tree, layouts, directory)


def _raise_lowrank(tree, layouts: dict, directory: str):
  def walk(node, prefix):
    if isinstance(node, dict):
      if prefix in layouts:
        d = layouts[prefix]
        if set(node) != {"u", "v"}:
          _raise(directory, f"{prefix}: expected factors u, v, found {sorted(node)}")
        f = LowRank(jax.device_put(node["u"]), jax.device_put(node["v"]),
                    Layout(d["kind"], tuple(d["shape"]), d["n_in"]))
        f.check(prefix)
        return f
      return {k: walk(v, f"{prefix}/{k}" if prefix else str(k)) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
      return type(node)(walk(v, f"{prefix}/{i}" if prefix else str(i)) for i, v in enumerate(node))
    return node
  out = walk(tree, "")
  missing = [p for p in layouts if not _has(out, p)]
  if missing:
    _raise(directory, f"factorized paths missing from the arrays: {missing[:5]}")
  return out


def _has(tree, path: str) -> bool:
  node = tree
  for k in path.split("/"):
    if isinstance(node, dict) and k in node:
      node = node[k]
    elif isinstance(node, (list, tuple)) and k.isdigit() and int(k) < len(node):
      node = node[int(k)]
    else:
      return False
  return is_lowrank(node)
