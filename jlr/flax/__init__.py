"""Flax integration: linen (``apply``, ``LowRankDense``, ``LowRankConv``) and NNX
(``jlr.flax.nnx.compress``)."""

from jlr.flax.linen import LowRankConv, LowRankDense, apply, intercept

__all__ = ["LowRankConv", "LowRankDense", "apply", "intercept"]
