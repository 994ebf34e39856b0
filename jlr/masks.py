"""Masks and labels for optax: train the factors only, or everything but them.

``optax.masked`` and ``optax.multi_transform`` take a tree that is the params tree or a
prefix of it. Here a whole :class:`jlr.LowRank` (both factors) gets one value::

    tx = optax.multi_transform({"factors": optax.adam(1e-3), "rest": optax.set_to_zero()},
                               jlr.masks.labels(params))       # freeze all but the factors
    tx = optax.masked(optax.add_decayed_weights(1e-4), jlr.masks.factors(params))
"""

from __future__ import annotations

import jax

from jlr.lowrank import is_lowrank


def factors(params):
  """``True`` at every ``LowRank`` leaf (both factors), ``False`` elsewhere."""
  return jax.tree_util.tree_map(is_lowrank, params, is_leaf=is_lowrank)


def labels(params, factor_label: str = "factors", rest_label: str = "rest"):
  """``factor_label`` at every ``LowRank`` leaf, ``rest_label`` elsewhere (for
  ``optax.multi_transform``)."""
  return jax.tree_util.tree_map(lambda x: factor_label if is_lowrank(x) else rest_label, params,
                                is_leaf=is_lowrank)
