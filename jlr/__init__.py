"""jlr: low-rank compression of JAX / Flax models.

One data type (:class:`LowRank`), pure transforms on parameter pytrees
(:func:`factorize`, :func:`merge`, :func:`truncate`, :func:`plan`, :func:`summary`),
rank rules (:mod:`jlr.ranks`), selection (:mod:`jlr.select`) and Flax integration
(:mod:`jlr.flax`).
"""

import importlib

import sys

from jlr import layouts, masks, methods, ranks, rules, select, sharding, stats, svd, usage
from jlr import primitives  # registers the built-in primitive rules (jlr.rules)
from jlr.methods import lod, spectral, trp  # noqa: F401 - jlr.methods.spectral
from jlr.factorized import DensifiedError, DensifiedWarning, factorized
from jlr.layouts import Layout
from jlr.lowrank import LowRank, is_lowrank
from jlr.ops import compiler_options
from jlr.report import Report, summary
from jlr.transforms import Entry, GuessedLayoutWarning, Plan, factorize, merge, plan, truncate
from jlr.usage import ModelLayouts

__version__ = "0.1.0"

# the training methods live in jlr/methods/; `import jlr.trp` / `jlr.lod` name them too
sys.modules.setdefault("jlr.trp", trp)
sys.modules.setdefault("jlr.lod", lod)

_LAZY = ("flax", "checkpoint", "cli", "models", "llm")


def __getattr__(name):  # jlr.flax etc. on first use: the core does not import Flax glue
  if name in _LAZY:
    return importlib.import_module(f"jlr.{name}")
  raise AttributeError(f"module 'jlr' has no attribute {name!r}")

__all__ = [
    "DensifiedError", "DensifiedWarning", "Entry", "GuessedLayoutWarning", "Layout", "LowRank", "ModelLayouts",
    "Plan", "Report", "compiler_options", "factorize", "factorized", "is_lowrank", "layouts", "lod", "masks", "methods",
    "merge", "plan", "ranks", "rules", "select", "sharding", "stats", "summary", "svd", "trp", "truncate", "usage",
]
