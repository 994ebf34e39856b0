"""Leaf paths as strings and the pattern language used by ``select``, ``rank`` and
``layout`` arguments.

A path is the leaf's key path joined with ``/``: ``params/Dense_0/kernel``. Attribute
keys that only unwrap a container (the ``value`` of an ``nnx.Variable``) are dropped, so
NNX state and linen variables give the same paths.

A pattern is a regular expression matched against whole path components:
``"Dense_0"`` matches ``params/Dense_0/kernel`` but not ``params/Dense_01/kernel``;
``"layers_\\d+/kernel"`` and ``"attention/(query|key)"`` work as expected.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Iterable

import jax

_UNWRAP = {"value", "raw_value", "_value"}

KERNEL_NAMES = ("kernel", "embedding")
"""Leaf names of the kernels jlr factorizes by default (public as
:data:`jlr.select.KERNEL_NAMES`; defined here, below :mod:`jlr.usage`, so that every
module can read it without an import cycle)."""


def _key_str(k) -> str | None:
  if isinstance(k, jax.tree_util.DictKey):
    return str(k.key)
  if isinstance(k, jax.tree_util.SequenceKey):
    return str(k.idx)
  if isinstance(k, jax.tree_util.GetAttrKey):
    return None if k.name in _UNWRAP else k.name
  if isinstance(k, jax.tree_util.FlattenedIndexKey):
    return str(k.key)
  return str(k)


def path_str(key_path: Iterable[Any]) -> str:
  """``(DictKey('params'), DictKey('Dense_0'), ...)`` -> ``"params/Dense_0/..."``."""
  parts = (_key_str(k) for k in key_path)
  return "/".join(p for p in parts if p is not None)


def leaf_name(path: str) -> str:
  """The last component of ``path``: ``"params/Dense_0/kernel"`` -> ``"kernel"``."""
  return path.rsplit("/", 1)[-1]


@functools.lru_cache(maxsize=1024)
def _compile(pattern: str) -> re.Pattern:
  return re.compile(r"(?:^|/)(?:" + pattern + r")(?:/|$)")


def matches(pattern: str, path: str) -> bool:
  """Whether ``pattern`` matches whole components of ``path`` (see module doc)."""
  return _compile(pattern).search(path) is not None


def first_match(mapping, path: str):
  """The value of the first key of ``mapping`` matching ``path``, else ``None``."""
  for pattern, value in mapping.items():
    if matches(pattern, path):
      return value
  return None


def flatten(tree) -> dict[str, Any]:
  """``{path: leaf}`` of a pytree, a :class:`jlr.LowRank` counting as one leaf."""
  from jlr.lowrank import is_lowrank

  return {path_str(kp): x for kp, x in
          jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_lowrank)[0]}


def replace(tree, new) -> Any:
  """A copy of ``tree`` with the leaves at the paths of ``new`` (``{path: leaf}``) swapped
  in; ``tree`` itself is not touched. A path that is not a leaf of ``tree`` is an error."""
  from jlr.lowrank import is_lowrank

  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_lowrank)
  paths = [path_str(kp) for kp, _ in leaves]
  unknown = sorted(set(new) - set(paths))
  if unknown:
    raise KeyError(f"replace: {unknown[:3]} {'are' if len(unknown) > 1 else 'is'} not a leaf "
                   f"path of the tree (e.g. {paths[:2]})")
  return jax.tree_util.tree_unflatten(treedef, [new.get(p, x) for p, (_, x) in zip(paths, leaves)])
