"""The one data type of jlr: a kernel stored as two thin factors."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jlr.layouts import Layout

SPLITS = ("balanced", "left", "right")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, repr=False)
class LowRank:
  """A kernel ``W`` stored as ``layout.from_matrix(u @ v)``.

  A ``LowRank`` stands in a params tree exactly where the dense kernel stood. Its
  pytree leaves are the factors; the layout is static metadata.

  Attributes:
    u: ``(..., m, r)`` left factor.
    v: ``(..., r, n)`` right factor. Leading ``...`` axes batch stacked layers.
    layout: static :class:`jlr.layouts.Layout` (original shape and matricization).

  From a truncated SVD ``W ~ P diag(s) Q^T`` the default ("balanced") split is
  ``u = P sqrt(s)``, ``v = sqrt(s) Q^T`` (Maestro's initialization, arXiv 2308.14929);
  ``"left"`` folds ``s`` into ``u`` and ``"right"`` into ``v``.
  """

  u: jax.Array
  v: jax.Array
  layout: Layout = dataclasses.field(metadata=dict(static=True))

  def __repr__(self) -> str:
    def arr(x):
      shape = getattr(x, "shape", None)
      if shape is None:
        return repr(x)
      return f"{getattr(x, 'dtype', '?')}{list(shape)}"
    lay = self.layout
    return (f"LowRank(u={arr(self.u)}, v={arr(self.v)}, layout={lay.kind} "
            f"{'x'.join(map(str, lay.shape))})")

  @property
  def rank(self) -> int:
    return self.u.shape[-1]

  @property
  def batch_shape(self) -> tuple[int, ...]:
    return tuple(self.u.shape[:-2])

  @property
  def shape(self) -> tuple[int, ...]:
    """Shape of the dense kernel this stands for (with stacked-layer axes)."""
    return self.batch_shape + self.layout.shape

  @property
  def dtype(self):
    return self.u.dtype

  @property
  def size(self) -> int:
    """Number of parameters held by the factors."""
    return math.prod(self.u.shape) + math.prod(self.v.shape)

  def matrix(self) -> jax.Array:
    """The ``(..., m, n)`` product ``u @ v`` (for inspection, never in forwards)."""
    return jnp.matmul(self.u, self.v)

  def dense(self) -> jax.Array:
    """The dense kernel in its original shape."""
    return self.layout.from_matrix(self.matrix())

  def check(self, path: str = "<LowRank>") -> None:
    """Raise ``ValueError`` naming ``path`` if the factors do not fit the layout."""
    m, n = self.layout.matrix_shape
    u, v = self.u, self.v
    if u.ndim < 2 or v.ndim != u.ndim:
      raise ValueError(f"{path}: factors u{u.shape}, v{v.shape} must both be (..., m, r), (..., r, n)")
    if u.shape[-2] != m or v.shape[-1] != n or u.shape[-1] != v.shape[-2] or u.shape[:-2] != v.shape[:-2]:
      raise ValueError(
          f"{path}: factors u{u.shape}, v{v.shape} do not match layout {self.layout.kind} "
          f"of matrix shape ({m}, {n})")


def from_svd(u, s, vt, layout: Layout, *, split: str = "balanced", dtype=None) -> LowRank:
  """Build a :class:`LowRank` from a (truncated) SVD ``u diag(s) vt``."""
  if split == "balanced":
    r = jnp.sqrt(s)
    a, b = u * r[..., None, :], r[..., :, None] * vt
  elif split == "left":
    a, b = u * s[..., None, :], vt
  elif split == "right":
    a, b = u, s[..., :, None] * vt
  else:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  if dtype is not None:
    a, b = a.astype(dtype), b.astype(dtype)
  return LowRank(a, b, layout)


def is_lowrank(x) -> bool:
  return isinstance(x, LowRank)
