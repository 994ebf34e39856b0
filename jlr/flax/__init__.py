"""Flax integration: linen (``layouts``, ``factorize``, ``apply``, ``LowRankDense``,
``LowRankConv``), the measured per-layer ``autotune`` and NNX (``jlr.flax.nnx.compress``)."""

from jlr.flax import calibrate, nnx
from jlr.flax.linen import LowRankConv, LowRankDense, apply, factorize, layouts
from jlr.flax.tune import Tuned, autotune

__all__ = ["LowRankConv", "LowRankDense", "Tuned", "apply", "autotune", "calibrate", "factorize",
           "layouts", "nnx"]
