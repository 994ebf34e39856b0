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



def _where(module: nn.Module) -> str:
  path = "/".join(module.scope.path) if module.scope is not None else ""
  return path or type(module).__name__


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

