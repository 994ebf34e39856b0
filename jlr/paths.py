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
