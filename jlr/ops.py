"""Forward computations with :class:`jlr.LowRank` kernels that never form ``u @ v``.

* dense / dense_general: ``y = (x . u) . v`` -- two contractions, ``2 r (m + n)`` FLOPs
  per input row instead of ``2 m n``.
* conv_channel: a ``kh x kw`` conv from ``cin`` to ``r`` channels, then a 1x1 conv
  (a matmul over channels) from ``r`` to ``cout``.
* conv_spatial: a ``kh x 1`` conv (vertical stride, padding, dilation) from ``cin`` to
  ``r``, then a ``1 x kw`` conv (horizontal ones) from ``r`` to ``cout``
  (Jaderberg et al. 2014; TRP's spatial-wise decomposition, arXiv 1812.02402).
* embed: ``u[ids] @ v`` for lookups, ``(q @ v^T) @ u^T`` for ``attend``.

These are the functions the Flax layers call; they are usable on their own.
:func:`compiler_options` is what to pass to ``jax.jit`` so that XLA runs them at the speed
their FLOPs say.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from jlr.lowrank import LowRank


def _factor_kernels(f: LowRank):
  return f.layout.u_kernel(f.u), f.layout.v_kernel(f.v)


def dense_general(x, f: LowRank, axis: Sequence[int] = (-1,), *, precision=None):
  """``x`` contracted with the kernel over ``axis`` (in kernel-axis order).

  Same result and output layout as ``lax.dot_general(x, W, ((axis, range(len(axis))), ((), ())))``
  for ``W = f.dense()``, for any row/column split of the layout.
  """
  if f.batch_shape:
    raise ValueError(f"dense_general needs an unstacked LowRank, got batch shape {f.batch_shape}")
  axis = tuple(a % x.ndim for a in axis)
  n_axis, n_in = len(axis), f.layout.n_in
  uk, vk = _factor_kernels(f)
  if n_in >= n_axis:
    # u holds all contracted axes (and maybe leading output axes): x.u then (.).v over r.
    t = lax.dot_general(x, uk, ((axis, tuple(range(n_axis))), ((), ())), precision=precision)
    return lax.dot_general(t, vk, (((t.ndim - 1,), (0,)), ((), ())), precision=precision)
  # u holds the first n_in contracted axes; the rest are contracted with v, beside r.
  t = lax.dot_general(x, uk, ((axis[:n_in], tuple(range(n_in))), ((), ())), precision=precision)
  free = [a for a in range(x.ndim) if a not in axis[:n_in]]  # x axes kept in t, in order
  rest = tuple(free.index(a) for a in axis[n_in:])
  return lax.dot_general(t, vk, ((rest + (t.ndim - 1,), tuple(range(1, n_axis - n_in + 1)) + (0,)),
                                 ((), ())), precision=precision)


def _dimension_numbers(ndim: int):
  lhs = (0, ndim - 1) + tuple(range(1, ndim - 1))
  rhs = (ndim - 1, ndim - 2) + tuple(range(0, ndim - 2))
  return lax.ConvDimensionNumbers(lhs, rhs, lhs)


def conv(x, f: LowRank, *, strides: Sequence[int], padding, input_dilation: Sequence[int],
         kernel_dilation: Sequence[int], precision=None):
  """Channels-last convolution ``(N, *spatial, cin) -> (N, *spatial', cout)``.

  ``padding`` is ``"SAME"``, ``"VALID"`` or explicit ``[(lo, hi), ...]`` pairs.
  """
  kind = f.layout.kind
  nsp = x.ndim - 2
  dn = _dimension_numbers(x.ndim)
  uk, vk = _factor_kernels(f)
  if kind in ("conv_channel", "dense_general"):
    if f.layout.n_in != nsp + 1:
      raise ValueError(f"a conv needs rows (*spatial, cin): layout n_in={f.layout.n_in}, "
                       f"expected {nsp + 1}")
    z = lax.conv_general_dilated(x, uk, tuple(strides), padding, lhs_dilation=tuple(input_dilation),
                                 rhs_dilation=tuple(kernel_dilation), dimension_numbers=dn,
                                 precision=precision)
    return lax.dot_general(z, vk, (((z.ndim - 1,), (0,)), ((), ())), precision=precision)
  if kind != "conv_spatial":
    raise ValueError(f"cannot run a conv with a {kind} LowRank kernel")
  if nsp != 2:
    raise ValueError("conv_spatial is defined for 2-D convolutions only")
  if tuple(input_dilation) != (1, 1):
    raise ValueError("conv_spatial does not support input (lhs) dilation")
  kh, kw = f.layout.shape[:2]
  (sh, sw), (dh, dw) = strides, kernel_dilation
  if isinstance(padding, str):
    window = ((kh - 1) * dh + 1, (kw - 1) * dw + 1)
    padding = lax.padtype_to_pads(x.shape[1:3], window, (sh, sw), padding)
  (ph, pw) = [tuple(p) for p in padding]
  z = lax.conv_general_dilated(x, uk, (sh, 1), (ph, (0, 0)), rhs_dilation=(dh, 1),
                               dimension_numbers=dn, precision=precision)
  return lax.conv_general_dilated(z, vk, (1, sw), ((0, 0), pw), rhs_dilation=(1, dw),
                                  dimension_numbers=dn, precision=precision)


def embed(ids, f: LowRank):
  """Embedding lookup ``W[ids] = u[ids] @ v``: gather r-dim rows, then one matmul."""
  return jnp.take(f.u, ids, axis=0) @ f.v


def attend(q, f: LowRank, *, precision=None):
  """``q @ W^T = (q @ v^T) @ u^T`` (weight-tied output logits)."""
  t = lax.dot_general(q, f.v, (((q.ndim - 1,), (1,)), ((), ())), precision=precision)
  return lax.dot_general(t, f.u, (((t.ndim - 1,), (1,)), ((), ())), precision=precision)


def conv_like_flax(x, f: LowRank, *, kernel_size: Sequence[int], strides=1, padding="SAME",
                   input_dilation=1, kernel_dilation=1, precision=None):
  """:func:`conv` with Flax ``Conv`` conventions (linen and NNX alike): any number of
  leading batch axes (or none), int-or-tuple strides/dilations, and ``padding`` as a
  string (``SAME``, ``VALID``, ``CIRCULAR``, ``REFLECT``, ``CAUSAL``), an int, or pairs.
  """
  ks = tuple(kernel_size)
  bc = lambda v: (1,) * len(ks) if v is None else ((v,) * len(ks) if isinstance(v, int) else tuple(v))  # noqa: E731
  strides, input_dilation, kernel_dilation = bc(strides), bc(input_dilation), bc(kernel_dilation)
  nb = x.ndim - (len(ks) + 1)
  batch_shape = x.shape[:nb]
  if nb != 1:
    x = x.reshape((-1,) + x.shape[nb:])
  if isinstance(padding, int):
    padding = [(padding, padding)] * len(ks)
  elif not isinstance(padding, str):
    padding = [(p, p) if isinstance(p, int) else tuple(p) for p in padding]
  if padding in ("CIRCULAR", "REFLECT"):
    dil = [(k - 1) * d + 1 for k, d in zip(ks, kernel_dilation)]
    pads = [(0, 0)] + [((k - 1) // 2, k // 2) for k in dil] + [(0, 0)]
    x = jnp.pad(x, pads, mode={"CIRCULAR": "wrap", "REFLECT": "reflect"}[padding])
    padding = "VALID"
  elif padding == "CAUSAL":
    if len(ks) != 1:
      raise ValueError("causal padding is only defined for 1-D convolutions")
    x = jnp.pad(x, [(0, 0), (kernel_dilation[0] * (ks[0] - 1), 0), (0, 0)])
    padding = "VALID"
  if f.layout.shape[:-2] != ks or f.layout.shape[-2] != x.shape[-1]:
    raise ValueError(f"LowRank kernel of shape {f.layout.shape} does not fit kernel size {ks} "
                     f"and {x.shape[-1]} input channels")
  y = conv(x, f, strides=strides, padding=padding, input_dilation=input_dilation,
           kernel_dilation=kernel_dilation, precision=precision)
  return y.reshape(batch_shape + y.shape[1:]) if nb != 1 else y


_YNN_FUSION = "xla_cpu_experimental_ynn_fusion_type"


def compiler_options(backend: str | None = None) -> dict[str, str]:
  """XLA compiler options under which factorized forwards run at their FLOPs:
  ``jax.jit(f, compiler_options=jlr.compiler_options())``.

  On the CPU backend, XLA (jaxlib 0.10) hands whole chains of convolutions, dots and
  elementwise ops to YNNPACK library fusions, and a factorized conv chain (a 3x3 conv to
  ``r`` channels, then a 1x1 conv) runs far below its FLOPs inside them: on the
  ``benchmarks/inference_speed.py`` conv net at ratio 0.5 the factorized forward is
  *slower* than dense under XLA's default options and faster than dense with these
  fusions off (its ``default, xla options`` rows; dense forwards under both are in the
  same figure, README.md, Benchmarks). So on CPU this returns
  ``{"xla_cpu_experimental_ynn_fusion_type": ""}`` (no library fusions; XLA's own
  emitters and Eigen), and ``{}`` on other backends or on an XLA that does not know the
  option (checked once per backend by compiling a one-op program).

  Measured on inference forwards; training steps were not compared under it.
  """
  return dict(_compiler_options(backend or jax.default_backend()))


@functools.lru_cache(maxsize=None)
def _compiler_options(backend: str) -> tuple[tuple[str, str], ...]:
  if backend != "cpu":
    return ()
  opts = {_YNN_FUSION: ""}
  x = jax.device_put(jnp.zeros((2, 2), jnp.float32), jax.devices("cpu")[0])
  try:
    jax.jit(lambda a: a @ a, compiler_options=opts)(x).block_until_ready()
  except Exception:  # an XLA without the option: its defaults
    return ()
  return tuple(opts.items())
