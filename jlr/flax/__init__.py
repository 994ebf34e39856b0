"""Flax integration: linen (``layouts``, ``factorize``, ``apply``, ``LowRankDense``,
``LowRankConv``) and NNX (``jlr.flax.nnx.compress``)."""

from jlr.flax import calibrate, nnx
from jlr.flax.linen import LowRankConv, LowRankDense, apply, factorize, intercept, layouts

__all__ = ["LowRankConv", "LowRankDense", "apply", "calibrate", "factorize", "intercept",
           "layouts", "nnx"]
