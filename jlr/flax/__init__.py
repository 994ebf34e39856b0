"""Flax integration: linen (``apply``, ``LowRankDense``, ``LowRankConv``) and NNX
(``jlr.flax.nnx.compress``)."""

from jlr.flax import calibrate, nnx
from jlr.flax.linen import LowRankConv, LowRankDense, apply, intercept

__all__ = ["LowRankConv", "LowRankDense", "apply", "calibrate", "intercept", "nnx"]
