"""Run unchanged Flax linen models with :class:`jlr.LowRank` kernels.

* ``layouts(model, variables, *example_args)`` reads every kernel's exact layout from
  how the model uses it (an abstract trace, see :mod:`jlr.usage`): stacked ``nn.scan`` /
  ``nn.vmap`` axes, ``DenseGeneral`` / ``Einsum`` contractions, conv dims, embeddings,
  and any custom module (Hugging Face's ``FlaxConv1D``) that feeds a kernel to a matmul.
* ``factorize(model, variables, *example_args, rank=...)`` is ``jlr.factorize`` with those
  layouts: only kernels the model showed it can run factorized are candidates.
* ``apply(model, variables, *args)`` is ``jlr.factorized(model.apply)(variables, *args)``:
  any module whose kernel is a ``LowRank`` computes with the factors at the primitive
  level (:mod:`jlr.factorized`); ``u @ v`` is never formed.

``intercept()`` is the older module-level path (``nn.intercept_methods`` for Dense,
DenseGeneral, Conv and Embed), kept for the calibration passes of
:mod:`jlr.flax.calibrate`, which hook those modules' inputs.

``LowRankDense`` and ``LowRankConv`` are linen layers for models built factorized from
the start; their ``kernel`` param is a ``LowRank`` too, so ``jlr.summary``, ``truncate``
and ``merge`` apply to them unchanged.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from jlr import ops, transforms, usage
from jlr.factorized import factorized
from jlr.layouts import Layout
from jlr.lowrank import LowRank
from jlr.usage import ModelLayouts

_KERNEL_NAMES = ("kernel", "embedding")


def _lowrank_param(module: nn.Module, name: str):
  if module.scope is None or not module.has_variable("params", name):
    return None
  value = module.get_variable("params", name)
  return value if isinstance(value, LowRank) else None


def _where(module: nn.Module) -> str:
  path = "/".join(module.scope.path) if module.scope is not None else ""
  return path or type(module).__name__


def _bias(module: nn.Module):
  return module.get_variable("params", "bias") if getattr(module, "use_bias", False) else None


def _dense_general(module, f: LowRank, inputs, axis, n_features):
  batch_dims = getattr(module, "batch_dims", ())
  if batch_dims:
    raise ValueError(f"{_where(module)}: DenseGeneral with batch_dims cannot use a LowRank kernel")
  bias = _bias(module)
  inputs, u, v, bias = promote_dtype(inputs, f.u, f.v, bias, dtype=module.dtype)
  f = LowRank(u, v, f.layout)
  axis = tuple(sorted(a % inputs.ndim for a in axis))  # Flax's kernel-axis order
  expected = tuple(inputs.shape[a] for a in axis)
  if f.layout.shape[: len(axis)] != expected or len(f.layout.shape) != len(axis) + n_features:
    raise ValueError(f"{_where(module)}: LowRank kernel of shape {f.layout.shape} does not fit "
                     f"inputs {inputs.shape} contracted over axes {axis}")
  y = ops.dense_general(inputs, f, axis, precision=module.precision)
  return y if bias is None else y + bias


def _conv(module: nn.Conv, f: LowRank, inputs):
  where = _where(module)
  if module.feature_group_count != 1:
    raise ValueError(f"{where}: grouped/depthwise convolutions (feature_group_count="
                     f"{module.feature_group_count}) are not supported with a LowRank kernel")
  if module.mask is not None:
    raise ValueError(f"{where}: masked convolutions are not supported with a LowRank kernel")
  ks = (module.kernel_size,) if isinstance(module.kernel_size, int) else tuple(module.kernel_size)
  bias = _bias(module)
  inputs, u, v, bias = promote_dtype(inputs, f.u, f.v, bias, dtype=module.dtype)
  try:
    y = ops.conv_like_flax(inputs, LowRank(u, v, f.layout), kernel_size=ks, strides=module.strides,
                           padding=module.padding, input_dilation=module.input_dilation,
                           kernel_dilation=module.kernel_dilation, precision=module.precision)
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from None
  return y if bias is None else y + bias


def _interceptor(next_fun, args, kwargs, context):
  module, method = context.module, context.method_name
  if isinstance(module, nn.Embed):
    f = _lowrank_param(module, "embedding")
    if f is None:
      return next_fun(*args, **kwargs)
    if method == "setup":
      return None  # the dense setup would shape-check `embedding` against (vocab, dim)
    if method == "__call__":
      (ids,) = args
      if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError("Input type must be an integer or unsigned integer.")
      u, v = promote_dtype(f.u, f.v, dtype=module.dtype, inexact=False)
      return ops.embed(ids, LowRank(u, v, f.layout))
    if method == "attend":
      (q,) = args
      q, u, v = promote_dtype(q, f.u, f.v, dtype=module.dtype)
      return ops.attend(q, LowRank(u, v, f.layout), precision=None)
    return next_fun(*args, **kwargs)
  if method != "__call__":
    return next_fun(*args, **kwargs)
  f = _lowrank_param(module, "kernel")
  if f is None:
    return next_fun(*args, **kwargs)
  (inputs,) = args
  if isinstance(module, nn.Dense):
    return _dense_general(module, f, inputs, (-1,), 1)
  if isinstance(module, nn.DenseGeneral):
    axis = (module.axis,) if isinstance(module.axis, int) else tuple(module.axis)
    nf = 1 if isinstance(module.features, int) else len(module.features)
    return _dense_general(module, f, inputs, axis, nf)
  if isinstance(module, nn.Conv) and getattr(module, "shared_weights", True):
    return _conv(module, f, inputs)
  if isinstance(module, (LowRankDense, LowRankConv)):
    return next_fun(*args, **kwargs)
  raise ValueError(f"{_where(module)}: {type(module).__name__} has a LowRank kernel but jlr "
                   "supports Dense, DenseGeneral, Conv and Embed only; merge this leaf back "
                   "(jlr.merge) or leave it out of factorize(select=...)")


def apply(model: nn.Module, variables, *args, strict: bool = False, **kwargs):
  """``model.apply(variables, *args, **kwargs)`` with ``LowRank`` kernels computed
  factorized, in any module (see :func:`jlr.factorized`). Accepts every keyword
  ``Module.apply`` does (``method``, ``mutable``, ``rngs``, ...). ``strict=True``
  raises :class:`jlr.DensifiedError` naming the leaf and primitive wherever a kernel
  would be densified (with a warning otherwise)."""
  return factorized(model.apply, strict=strict)(variables, *args, **kwargs)


def layouts(model: nn.Module, variables, *args, conv: str = "channel",
            **apply_kwargs) -> ModelLayouts:
  """Every kernel's :class:`jlr.Layout` as ``model.apply(variables, *args,
  **apply_kwargs)`` uses it; nothing is computed. ``args`` may be
  ``jax.ShapeDtypeStruct``s. Kernels the call never uses, or uses in a way jlr cannot
  factorize, are in ``.skipped`` with the reason. See :func:`jlr.usage.read`."""
  return usage.read(model.apply, variables, *args, conv=conv, **apply_kwargs)


def factorize(model: nn.Module, variables, *args, rank, conv: str = "channel",
              apply_kwargs: dict | None = None, **factorize_kwargs):
  """``jlr.factorize(variables, rank, layout=layouts(model, variables, *args))``.

  The one-call form: layouts are read from the model, never guessed, and only kernels
  it can run factorized are candidates. ``factorize_kwargs`` go to
  :func:`jlr.factorize` (``method``, ``key``, ``select``, ``stats``, ...)."""
  lay = layouts(model, variables, *args, conv=conv, **(apply_kwargs or {}))
  return transforms.factorize(variables, rank, layout=lay, **factorize_kwargs)


def intercept():
  """Context manager form: ``with jlr.flax.intercept(): model.apply(...)``."""
  return nn.intercept_methods(_interceptor)


# ----------------------------------------------------------------------------- factorized layers


def _as_lowrank_standin(kernel, layout: Layout) -> LowRank:
  """A dense kernel as ``LowRank(W, I)``: the conv code path takes factors only, and
  under :func:`jlr.factorized` ``W`` is itself computed factorized."""
  n = layout.matrix_shape[1]
  return LowRank(layout.to_matrix(kernel), jnp.eye(n, dtype=kernel.dtype), layout)


def _factor_init(rng, layout: Layout, rank: int, dtype) -> LowRank:
  """``u ~ N(0, 1/m)``, ``v ~ N(0, 1/r)``: ``x u v`` keeps lecun-normal output variance."""
  m, n = layout.matrix_shape
  ku, kv = jax.random.split(rng)
  u = jax.random.normal(ku, (m, rank), dtype) / math.sqrt(m)
  v = jax.random.normal(kv, (rank, n), dtype) / math.sqrt(rank)
  return LowRank(u, v, layout)


class LowRankDense(nn.Module):
  """A Dense layer built factorized: ``y = (x @ u) @ v + b`` with ``kernel = LowRank``."""

  features: int
  rank: int
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, inputs):
    layout = Layout("dense", (inputs.shape[-1], self.features))
    if not 1 <= self.rank <= layout.max_rank:
      raise ValueError(f"{_where(self)}: rank {self.rank} out of range [1, {layout.max_rank}]")
    f = self.param("kernel", lambda k: _factor_init(k, layout, self.rank, self.param_dtype))
    bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype) \
        if self.use_bias else None
    if not isinstance(f, LowRank):  # the dense stand-in that jlr.factorized traces with
      inputs, kernel, bias = promote_dtype(inputs, f, bias, dtype=self.dtype)
      y = jax.lax.dot_general(inputs, kernel, (((inputs.ndim - 1,), (0,)), ((), ())),
                              precision=self.precision)
      return y if bias is None else y + bias
    inputs, u, v, bias = promote_dtype(inputs, f.u, f.v, bias, dtype=self.dtype)
    y = ops.dense_general(inputs, LowRank(u, v, layout), (-1,), precision=self.precision)
    return y if bias is None else y + bias


class LowRankConv(nn.Module):
  """A Conv layer built factorized (``layout="channel"`` or ``"spatial"``)."""

  features: int
  kernel_size: Sequence[int]
  rank: int
  strides: Sequence[int] | int = 1
  padding: Any = "SAME"
  kernel_dilation: Sequence[int] | int = 1
  layout: str = "channel"
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, inputs):
    ks = tuple(self.kernel_size)
    shape = ks + (inputs.shape[-1], self.features)
    kind = {"channel": "conv_channel", "spatial": "conv_spatial"}[self.layout]
    layout = Layout(kind, shape, len(shape) - 1 if kind == "conv_channel" else 1)
    if not 1 <= self.rank <= layout.max_rank:
      raise ValueError(f"{_where(self)}: rank {self.rank} out of range [1, {layout.max_rank}]")
    f = self.param("kernel", lambda k: _factor_init(k, layout, self.rank, self.param_dtype))
    bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype) \
        if self.use_bias else None
    if not isinstance(f, LowRank):  # the dense stand-in that jlr.factorized traces with
      f = _as_lowrank_standin(f, layout)
    inputs, u, v, bias = promote_dtype(inputs, f.u, f.v, bias, dtype=self.dtype)
    y = ops.conv_like_flax(inputs, LowRank(u, v, layout), kernel_size=ks, strides=self.strides,
                           padding=self.padding, kernel_dilation=self.kernel_dilation,
                           precision=self.precision)
    return y if bias is None else y + bias

