"""Selection: which leaves of a params tree jlr transforms touch, and how each is read as a
matrix (on the model of ``flax.nnx.filterlib``).

Every transform (:func:`jlr.plan`, :func:`jlr.factorize`, :func:`jlr.summary`, ``jlr.trp``,
``jlr.lod``, :func:`jlr.stats.fisher`, ``jlr.flax.nnx``) walks a tree with :func:`leaves`
and decides with the same few pieces, all public here so user code can build on them:

* :data:`KERNEL_NAMES` and :func:`is_array`: what a kernel leaf is called and what counts
  as an array leaf;
* a **selector** is a predicate ``(path, leaf) -> bool``. :func:`selector` turns every
  form a ``select=`` argument takes into one: ``None`` (:func:`default_select`), a path
  pattern or a list of them (:func:`path_matches`), or a callable (used as it is).
  Patterns match whole path components (see :mod:`jlr.paths`; :func:`matches` and
  :func:`first_match` are re-exported here);
* :func:`candidates` is the selector a transform uses given ``select=`` *and*
  ``layout=`` (a :class:`jlr.ModelLayouts` narrows the default to what the model showed
  it can run factorized);
* :func:`spec_for` / :func:`layout_for` answer "how is this leaf matricized" from a
  ``layout=`` argument, naming the leaf path in every error.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Union

import jax
import jax.numpy as jnp
import numpy as np

from jlr.layouts import Layout, Spec, infer
from jlr.lowrank import is_lowrank
from jlr.paths import KERNEL_NAMES, first_match, leaf_name, matches, path_str
from jlr.usage import ModelLayouts

__all__ = [
    "KERNEL_NAMES", "LayoutArg", "SelectArg", "Selector", "candidates", "default_select",
    "first_match", "is_array", "layout_for", "leaves", "matches", "path_matches", "selector",
    "spec_for",
]

Selector = Callable[[str, Any], bool]
"""A predicate ``(path, leaf) -> bool`` over the ``/``-joined leaf paths of a tree."""

SelectArg = Union[None, str, Iterable[str], Selector]
"""What a ``select=`` argument may be: see :func:`selector`."""

LayoutArg = Union[None, str, Spec, Layout, ModelLayouts, Mapping[str, Any],
                  Callable[[str, Any], Any]]
"""What a ``layout=`` argument may be: see :func:`spec_for`."""


def leaves(tree: Any) -> tuple[list[tuple[str, Any]], jax.tree_util.PyTreeDef]:
  """``([(path, leaf), ...], treedef)`` of ``tree`` in flatten order, each path the key
  path joined with ``/`` (:func:`jlr.paths.path_str`) and each :class:`jlr.LowRank` one
  whole leaf; ``jax.tree_util.tree_unflatten(treedef, new_leaves)`` rebuilds the tree."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_lowrank)
  return [(path_str(p), x) for p, x in flat], treedef


def is_array(x: Any) -> bool:
  """Whether ``x`` is an array leaf (a ``jax.Array``, tracer included, a numpy array or
  scalar, or anything with ``__jax_array__``); a :class:`jlr.LowRank` is not one."""
  return isinstance(x, (jax.Array, np.ndarray, np.generic)) or hasattr(x, "__jax_array__")


def default_select(path: str, leaf: Any) -> bool:
  """The default selection: a float array of >= 2 axes named one of :data:`KERNEL_NAMES`
  (``.../kernel``, ``.../embedding``); biases, norms and 1-D leaves never. (The
  transforms further drop, by default, leaves where factorizing would not save
  parameters.)"""
  return (leaf_name(path) in KERNEL_NAMES and is_array(leaf) and jnp.ndim(leaf) >= 2
          and jnp.issubdtype(jnp.result_type(leaf), jnp.floating))


def path_matches(*patterns: str) -> Selector:
  r"""The selector of leaves whose path matches any of ``patterns`` (whole components,
  see :mod:`jlr.paths`): ``path_matches("Dense_0", r"layers_\d+/mlp")``."""
  if len(patterns) == 1:
    (pattern,) = patterns
    return lambda path, leaf: matches(pattern, path)
  return lambda path, leaf: any(matches(p, path) for p in patterns)


def selector(select: SelectArg) -> Selector:
  """Normalize a ``select=`` argument to a :data:`Selector`.

  ``None`` -> :func:`default_select`; a path pattern or an iterable of them ->
  :func:`path_matches`; a callable ``(path, leaf) -> bool`` -> itself. Anything else is
  a ``TypeError``.
  """
  if select is None:
    return default_select
  if isinstance(select, str):
    return path_matches(select)
  if callable(select):
    return select
  if isinstance(select, Iterable):
    return path_matches(*select)
  raise TypeError(f"select must be a callable (path, leaf) -> bool or path patterns, got {select!r}")


def candidates(select: SelectArg, layout: LayoutArg) -> Selector:
  """The leaves a transform considers: ``select`` if given (see :func:`selector`); else
  the kernels of a :class:`jlr.usage.ModelLayouts` ``layout`` (what the model showed it
  can factorize); else :func:`default_select`."""
  if select is None and isinstance(layout, ModelLayouts):
    return lambda path, leaf: is_array(leaf) and layout.select(path)
  return selector(select)


def spec_for(layout: LayoutArg, path: str, leaf: Any) -> Spec | Layout:
  """What a ``layout=`` argument says for the leaf at ``path``: a :class:`jlr.Layout`
  (exact) or a :class:`jlr.layouts.Spec` (completed from the shape by :func:`layout_for`).

  ``layout`` may be ``None`` (infer: ``Spec()``), a kind name such as
  ``"conv_spatial"``, a ``Spec`` or ``Layout``, a mapping ``{path pattern: kind | Spec |
  Layout}`` (first matching pattern; no match infers), a callable ``(path, leaf) -> kind
  | Spec | Layout | None``, or a :class:`jlr.ModelLayouts`, which must hold the leaf.
  Errors name ``path``.
  """
  if isinstance(layout, ModelLayouts):
    found = layout.lookup(path)
    if found is None:
      why = layout.skipped.get(path) or layout.skipped.get(f"params/{path}") or \
          "not a kernel the traced model uses"
      raise ValueError(f"{path}: no layout read from the model ({why}); it cannot run "
                       "factorized, leave it out of select")
    return found
  if isinstance(layout, Mapping):
    layout = first_match(layout, path)
  elif callable(layout) and not isinstance(layout, (Spec, Layout)):
    layout = layout(path, leaf)
  if layout is None:
    return Spec()
  if isinstance(layout, str):
    return Spec(kind=layout)
  if isinstance(layout, (Spec, Layout)):
    return layout
  raise TypeError(f"{path}: layout must be a kind, a jlr.layouts.Spec or Layout, got {layout!r}")


def layout_for(layout: LayoutArg, path: str, leaf: Any) -> tuple[Layout, int]:
  """``(Layout, batch_ndim)`` of the leaf at ``path`` under a ``layout=`` argument (see
  :func:`spec_for`): a ``Layout`` is checked against the leaf's trailing axes (the
  leading ones are stacked layers), a ``Spec`` is completed by
  :func:`jlr.layouts.infer`. A ``ValueError`` names ``path``."""
  spec = spec_for(layout, path, leaf)
  shape = tuple(jnp.shape(leaf))
  try:
    if isinstance(spec, Layout):
      b = len(shape) - len(spec.shape)
      if b < 0 or shape[b:] != spec.shape:
        raise ValueError(f"layout shape {spec.shape} does not match leaf shape {shape}")
      return spec, b
    return infer(leaf_name(path), shape, spec)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from None
