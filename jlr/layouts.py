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
from typing import Any, Callable

import jax.numpy as jnp

def _split(shape: tuple[int, ...], n_in: int, perm) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """Rows are the first ``n_in`` axes of ``perm`` (identity when ``None``), columns the rest."""
  order = perm or tuple(range(len(shape)))
  return tuple(order[:n_in]), tuple(order[n_in:])


def _reshape_u(layout: "Layout", u):
  """``(m, r)`` -> ``(*row axes, r)``: the thin first layer's kernel."""
  if layout.perm is not None:
    raise ValueError("a permuted dense_general layout has no thin-layer kernels; run it "
                     "through jlr.factorized")
  return u.reshape(layout.shape[: layout.n_in] + (u.shape[-1],))


def _reshape_v(layout: "Layout", v):
  """``(r, n)`` -> ``(r, *column axes)``: the second layer's kernel."""
  if layout.perm is not None:
    raise ValueError("a permuted dense_general layout has no thin-layer kernels; run it "
                     "through jlr.factorized")
  return v.reshape((v.shape[-2],) + layout.shape[layout.n_in:])


def _spatial_u(layout: "Layout", u):
  """``(kh * cin, r)`` -> the ``(kh, 1, cin, r)`` kernel of a kh x 1 conv."""
  kh, _, cin, _ = layout.shape
  return u.reshape((kh, 1, cin, u.shape[-1]))


def _spatial_v(layout: "Layout", v):
  """``(r, kw * cout)`` -> the ``(1, kw, r, cout)`` kernel of a 1 x kw conv."""
  _, kw, _, cout = layout.shape
  return jnp.swapaxes(v.reshape((v.shape[-2], kw, cout)), 0, 1)[None]


@dataclasses.dataclass(frozen=True)
class Kind:
  """Everything a layout kind adds to its row and column axes -- one entry of :data:`KINDS`.

  A kind names the *operation* the kernel serves (a matmul, a lookup, a convolution) and
  how its axes become the matrix's rows and columns. Two kinds can share axes (a 1-D
  ``conv_channel`` and a 3-axis ``dense_general`` split after two axes) and still differ in
  what runs: a conv kernel's factors are a conv then a 1x1 conv, a dense one's two matmuls.

  Attributes:
    name: the key in :data:`KINDS`.
    ndim: the kernel's number of axes, or ``None`` for any (>= 2).
    n_in: the row count this kind fixes (a function of ``ndim``), or ``None`` when the
      layout chooses it (``dense_general``).
    axes: ``(shape, n_in, perm) -> (row axes, column axes)``, each in matrix order.
    u_kernel / v_kernel: ``(layout, factor) -> kernel`` of the first / second thin layer.
    lookup: the kernel is read by row (an embedding): its dense FLOPs are 0 and its
      factored FLOPs ``2 r n`` per lookup, not ``2 r (m + n)``.
    permutable: the layout may carry a ``perm``.
    kernel: what the kernel is, for errors (``"a 2-D conv kernel (kh, kw, cin, cout)"``).
  """

  name: str
  ndim: int | None = None
  n_in: Callable[[int], int] | None = None
  axes: Callable[..., tuple[tuple[int, ...], tuple[int, ...]]] = _split
  u_kernel: Callable[..., Any] = _reshape_u
  v_kernel: Callable[..., Any] = _reshape_v
  lookup: bool = False
  permutable: bool = False
  kernel: str = "a kernel"


KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("dense", ndim=2, n_in=lambda nd: 1, kernel="a 2-D kernel (in, out)"),
    Kind("dense_general", permutable=True),
    Kind("embed", ndim=2, n_in=lambda nd: 1, lookup=True, kernel="a 2-D table (vocab, dim)"),
    Kind("conv_channel", n_in=lambda nd: nd - 1),
    Kind("conv_spatial", ndim=4, n_in=lambda nd: 1, axes=lambda shape, n_in, perm: ((0, 2), (1, 3)),
         u_kernel=_spatial_u, v_kernel=_spatial_v, kernel="a 2-D conv kernel (kh, kw, cin, cout)"),
)}


def register_kind(kind: Kind) -> Kind:
  """Add a layout kind (one table entry). The interpreter (``jlr.factorized``) runs any
  kind from its axes alone; the thin-layer modules and ``jlr.ops`` know the built-in ones."""
  if kind.name in KINDS:
    raise ValueError(f"layout kind {kind.name!r} is already registered")
  KINDS[kind.name] = kind
  return kind


@dataclasses.dataclass(frozen=True)
class Layout:
  """Static description of a kernel's matricization.

  Attributes:
    kind: a key of :data:`KINDS`.
    shape: the original kernel shape, without leading stacked-layer axes.
    n_in: number of kernel axes that form the rows ``m`` (fixed by most kinds: 1 for
      ``dense``/``embed``/``conv_spatial``, ``ndim - 1`` for ``conv_channel``).
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
    spec = KINDS.get(self.kind)
    if spec is None:
      raise ValueError(f"unknown layout kind {self.kind!r}; expected one of {tuple(KINDS)}")
    object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
    nd = len(self.shape)
    if nd < 2:
      raise ValueError(f"a layout needs a kernel with >= 2 axes, got shape {self.shape}")
    if spec.ndim is not None and nd != spec.ndim:
      raise ValueError(f"{self.kind} needs {spec.kernel}, got shape {self.shape}")
    if spec.n_in is not None and self.n_in != spec.n_in(nd):
      if self.kind == "conv_spatial":  # its rows are (kh, cin) whatever n_in says
        object.__setattr__(self, "n_in", 1)
      else:
        raise ValueError(f"a {self.kind} layout of shape {self.shape} has n_in={spec.n_in(nd)}, "
                         f"got {self.n_in}")
    if not 1 <= self.n_in < nd:
      raise ValueError(f"n_in={self.n_in} must split shape {self.shape} into two non-empty parts")
    if self.perm is not None:
      perm = tuple(int(p) for p in self.perm)
      if not spec.permutable or sorted(perm) != list(range(nd)):
        raise ValueError(f"perm={self.perm} must be a permutation of the axes of a "
                         f"dense_general kernel of shape {self.shape}")
      object.__setattr__(self, "perm", None if perm == tuple(range(nd)) else perm)

  @property
  def spec(self) -> Kind:
    """This layout's entry of :data:`KINDS`."""
    return KINDS[self.kind]

  @functools.cached_property
  def _axes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
    return self.spec.axes(self.shape, self.n_in, self.perm)

  @property
  def row_axes(self) -> tuple[int, ...]:
    """Kernel axes that form the rows ``m``, in matrix order."""
    return self._axes[0]

  @property
  def col_axes(self) -> tuple[int, ...]:
    """Kernel axes that form the columns ``n``, in matrix order."""
    return self._axes[1]

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

  def flops(self, rank: int | None = None) -> int:
    """FLOPs of one application (one input row, or one lookup): ``2 m n`` dense, ``2 r (m +
    n)`` factored; a lookup kind reads a row (0 dense, ``2 r n`` factored)."""
    m, n = self.matrix_shape
    if rank is None:
      return 0 if self.spec.lookup else 2 * m * n
    return 2 * rank * (n if self.spec.lookup else m + n)

  def to_matrix(self, w):
    """(..., *shape) kernel -> (..., m, n) matrix (batched over leading axes)."""
    lead = w.shape[: w.ndim - len(self.shape)]
    if tuple(w.shape[len(lead):]) != self.shape:
      raise ValueError(f"kernel shape {w.shape} does not end with layout shape {self.shape}")
    order = self.row_axes + self.col_axes  # conv_spatial: (kh, cin, kw, cout)
    if order != tuple(range(len(order))):
      b = len(lead)
      w = w.transpose(tuple(range(b)) + tuple(b + i for i in order))
    return w.reshape(lead + self.matrix_shape)

  def from_matrix(self, mat):
    """(..., m, n) matrix -> (..., *shape) kernel; inverse of :meth:`to_matrix`."""
    lead = mat.shape[:-2]
    order = self.row_axes + self.col_axes
    w = mat.reshape(lead + tuple(self.shape[i] for i in order))
    if order != tuple(range(len(order))):
      b = len(lead)
      inv = [order.index(i) for i in range(len(order))]
      w = w.transpose(tuple(range(b)) + tuple(b + i for i in inv))  # numpy stays numpy
    return w

  def u_kernel(self, u):
    """The ``(m, r)`` left factor as the kernel of the first (thin) layer:
    ``(*in_axes, r)``; ``(kh, 1, cin, r)`` for conv_spatial."""
    return self.spec.u_kernel(self, u)

  def v_kernel(self, v):
    """The ``(r, n)`` right factor as the kernel of the second layer:
    ``(r, *out_axes)``; ``(1, kw, r, cout)`` for conv_spatial."""
    return self.spec.v_kernel(self, v)


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
  if kind not in KINDS:
    raise ValueError(f"unknown layout kind {kind!r}; expected one of {tuple(KINDS)}")
  fixed = KINDS[kind].n_in
  if fixed is not None:
    n_in = fixed(len(kshape))
  else:
    n_in = spec.n_in if spec.n_in is not None else _most_square_split(kshape)
  return Layout(kind, kshape, n_in), b

