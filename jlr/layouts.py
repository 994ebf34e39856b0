"""How an N-D kernel maps to the (m, n) matrix that gets factorized.

A :class:`Layout` is static, hashable metadata stored on every :class:`jlr.LowRank`.
It records the original kernel shape (without leading "stacked layer" axes) and the
matricization rule:

===============  =======================  ==========================================
kind             kernel shape             matrix (m, n)
===============  =======================  ==========================================
``dense``        (in, out)                (in, out)
``dense_general``(a..., b...)             (prod a, prod b), split after ``n_in`` axes
``embed``        (vocab, dim)             (vocab, dim)
``conv_channel`` (*spatial, cin, cout)    (prod(spatial) * cin, cout): a full-size
                                          conv to r channels, then a 1x1 conv
``conv_spatial`` (kh, kw, cin, cout)      (kh * cin, kw * cout): a kh x 1 conv to r
                                          channels, then a 1 x kw conv (Jaderberg et
                                          al. 2014; TRP's "spatial-wise" scheme)
===============  =======================  ==========================================

The channel-wise and spatial-wise schemes are the two decompositions of
Xu et al., "Trained Rank Pruning", arXiv 1812.02402, Sec. 3.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax.numpy as jnp

KINDS = ("dense", "dense_general", "embed", "conv_channel", "conv_spatial")


@dataclasses.dataclass(frozen=True)
class Layout:
  """Static description of a kernel's matricization.

  Attributes:
    kind: one of ``KINDS``.
    shape: the original kernel shape, without leading stacked-layer axes.
    n_in: number of leading kernel axes that form the rows ``m`` (ignored for
      ``conv_spatial``, whose rows are ``(kh, cin)``).
    perm: ``dense_general`` only: the kernel axes in matrix order (rows first), when
      the contracted axes are not the leading ones -- e.g. a Gemma-style ``(heads,
      features, head_dim)`` query kernel contracted over ``features`` has
      ``perm=(1, 0, 2), n_in=1``. ``None`` is the identity.
  """

  kind: str
  shape: tuple[int, ...]
  n_in: int = 1
  perm: tuple[int, ...] | None = None

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"unknown layout kind {self.kind!r}; expected one of {KINDS}")
    object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
    if len(self.shape) < 2:
      raise ValueError(f"a layout needs a kernel with >= 2 axes, got shape {self.shape}")
    if self.kind == "conv_spatial":
      if len(self.shape) != 4:
        raise ValueError(
            f"conv_spatial needs a 2-D conv kernel (kh, kw, cin, cout), got shape {self.shape}")
    elif not 1 <= self.n_in < len(self.shape):
      raise ValueError(f"n_in={self.n_in} must split shape {self.shape} into two non-empty parts")
    if self.kind in ("dense", "embed") and len(self.shape) != 2:
      raise ValueError(f"{self.kind} layout needs a 2-D kernel, got shape {self.shape}")
    if self.kind == "conv_channel" and self.n_in != len(self.shape) - 1:
      raise ValueError("conv_channel rows are (*spatial, cin): n_in must be ndim - 1")
    if self.perm is not None:
      perm = tuple(int(p) for p in self.perm)
      if self.kind != "dense_general" or sorted(perm) != list(range(len(self.shape))):
        raise ValueError(f"perm={self.perm} must be a permutation of the axes of a "
                         f"dense_general kernel of shape {self.shape}")
      object.__setattr__(self, "perm", None if perm == tuple(range(len(perm))) else perm)

  @property
  def row_axes(self) -> tuple[int, ...]:
    """Kernel axes that form the rows ``m``, in matrix order."""
    if self.kind == "conv_spatial":
      return (0, 2)
    order = self.perm or tuple(range(len(self.shape)))
    return order[: self.n_in]

  @property
  def col_axes(self) -> tuple[int, ...]:
    """Kernel axes that form the columns ``n``, in matrix order."""
    if self.kind == "conv_spatial":
      return (1, 3)
    order = self.perm or tuple(range(len(self.shape)))
    return order[self.n_in:]

  @functools.cached_property  # read per leaf many times while planning: computed once
  def matrix_shape(self) -> tuple[int, int]:
    """The (m, n) shape of the matricized kernel."""
    return (math.prod(self.shape[i] for i in self.row_axes),
            math.prod(self.shape[i] for i in self.col_axes))

  @property
  def max_rank(self) -> int:
    return min(self.matrix_shape)

  @property
  def size(self) -> int:
    """Number of parameters of the dense kernel."""
    return math.prod(self.shape)

  def factor_size(self, rank: int) -> int:
    """Number of parameters of the factors at ``rank``: ``rank * (m + n)``."""
    m, n = self.matrix_shape
    return rank * (m + n)

  def to_matrix(self, w):
    """(..., *shape) kernel -> (..., m, n) matrix (batched over leading axes)."""
    lead = w.shape[: w.ndim - len(self.shape)]
    if tuple(w.shape[len(lead):]) != self.shape:
      raise ValueError(f"kernel shape {w.shape} does not end with layout shape {self.shape}")
    order = self.row_axes + self.col_axes  # conv_spatial: (kh, cin, kw, cout)
    if order != tuple(range(len(order))):
      b = len(lead)
      w = jnp.transpose(w, tuple(range(b)) + tuple(b + i for i in order))
    return w.reshape(lead + self.matrix_shape)

  def from_matrix(self, mat):
    """(..., m, n) matrix -> (..., *shape) kernel; inverse of :meth:`to_matrix`."""
    lead = mat.shape[:-2]
    order = self.row_axes + self.col_axes
    w = mat.reshape(lead + tuple(self.shape[i] for i in order))
    if order != tuple(range(len(order))):
      b = len(lead)
      inv = [order.index(i) for i in range(len(order))]
      w = jnp.transpose(w, tuple(range(b)) + tuple(b + i for i in inv))
    return w

  def u_kernel(self, u):
    """The ``(m, r)`` left factor as the kernel of the first (thin) layer:
    ``(*in_axes, r)``; ``(kh, 1, cin, r)`` for conv_spatial."""
    r = u.shape[-1]
    if self.kind == "conv_spatial":
      kh, _, cin, _ = self.shape
      return u.reshape((kh, 1, cin, r))
    if self.perm is not None:
      raise ValueError("a permuted dense_general layout has no thin-layer kernels; run it "
                       "through jlr.factorized")
    return u.reshape(self.shape[: self.n_in] + (r,))

  def v_kernel(self, v):
    """The ``(r, n)`` right factor as the kernel of the second layer:
    ``(r, *out_axes)``; ``(1, kw, r, cout)`` for conv_spatial."""
    r = v.shape[-2]
    if self.kind == "conv_spatial":
      _, kw, _, cout = self.shape
      return jnp.swapaxes(v.reshape((r, kw, cout)), 0, 1)[None]
    if self.perm is not None:
      raise ValueError("a permuted dense_general layout has no thin-layer kernels; run it "
                       "through jlr.factorized")
    return v.reshape((r,) + self.shape[self.n_in:])


@dataclasses.dataclass(frozen=True)
class Spec:
  """A partial layout, completed from a leaf's shape by :func:`infer`.

  Attributes:
    kind: force a layout kind (e.g. ``"conv_spatial"``); ``None`` infers it.
    n_in: force the row/column split for ``dense_general``.
    batch_ndim: number of leading stacked-layer axes (scan-over-layers models).
  """

  kind: str | None = None
  n_in: int | None = None
  batch_ndim: int = 0


def _most_square_split(shape: tuple[int, ...]) -> int:
  """The split point that maximizes min(m, n): the largest attainable rank."""
  best, best_n_in = -1, 1
  for n_in in range(1, len(shape)):
    r = min(math.prod(shape[:n_in]), math.prod(shape[n_in:]))
    if r > best:
      best, best_n_in = r, n_in
  return best_n_in


def infer(name: str, shape: tuple[int, ...], spec: Spec = Spec()) -> tuple[Layout, int]:
  """Infer ``(layout, batch_ndim)`` for a kernel leaf called ``name`` of ``shape``.

  Rules (override any of them with a :class:`Spec`):
    * ``embedding`` 2-D leaves are ``embed``; other 2-D leaves are ``dense``.
    * 4-D kernels are 2-D convolutions (HWIO): ``conv_channel``.
    * Other N-D kernels are ``dense_general`` split where ``min(m, n)`` is largest
      (this picks (features | heads, head_dim) for attention q/k/v, (heads, head_dim
      | features) for the output projection, and (k, cin | cout) for 1-D convs).
  """
  b = spec.batch_ndim
  kshape = tuple(shape[b:])
  if len(kshape) < 2:
    raise ValueError(
        f"cannot matricize a leaf of shape {tuple(shape)} with batch_ndim={b}: "
        "a kernel needs at least 2 axes")
  kind = spec.kind
  if kind is None:
    if len(kshape) == 2:
      kind = "embed" if name == "embedding" else "dense"
    elif len(kshape) == 4 and spec.n_in is None:
      kind = "conv_channel"
    else:
      kind = "dense_general"
  if kind == "conv_channel":
    n_in = len(kshape) - 1
  elif kind in ("dense", "embed", "conv_spatial"):
    n_in = 1
  else:
    n_in = spec.n_in if spec.n_in is not None else _most_square_split(kshape)
  return Layout(kind, kshape, n_in), b

