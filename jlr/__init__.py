"""jlr: low-rank compression of JAX / Flax models.

One data type (:class:`LowRank`), pure transforms on parameter pytrees
(:func:`factorize`, :func:`merge`, :func:`truncate`, :func:`plan`, :func:`summary`),
rank rules (:mod:`jlr.ranks`) and Flax integration (:mod:`jlr.flax`).
"""

from jlr import layouts, ranks, svd
from jlr.layouts import Layout
from jlr.lowrank import LowRank, is_lowrank
from jlr.report import Report, summary
from jlr.transforms import Entry, Plan, factorize, merge, plan, truncate

__version__ = "0.1.0"

__all__ = [
    "Entry", "Layout", "LowRank", "Plan", "Report", "factorize", "is_lowrank", "layouts",
    "merge", "plan", "ranks", "summary", "svd", "truncate",
]
