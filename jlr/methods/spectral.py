"""Low-rank training from scratch done well: spectral initialization + Frobenius decay.

Khodak, Tenenholtz, Mackey and Fusi, "Initialization and Regularization of Factorized
Neural Layers", ICLR 2021 (arXiv 2105.01029):

* **spectral initialization** -- draw the dense kernel ``W`` from its usual init and start
  the factors from its truncated SVD, ``u = U_r sqrt(S_r)``, ``v = sqrt(S_r) V_r^T``
  (:func:`jlr.factorize`: exact SVD, balanced factors), instead of initializing ``u`` and
  ``v`` as two independent layers;
* **Frobenius decay** -- penalize the product, ``(lambda / 2) ||u v||_F^2``, not the
  factors (``(lambda / 2)(||u||_F^2 + ||v||_F^2)``, what weight decay on the factors
  does): its gradient is ``lambda (u v) v^T`` for ``u`` and ``lambda u^T (u v)`` for ``v``
  (:func:`frobenius_decay`). Weight decay on the factors is, at a balanced point, a
  nuclear-norm penalty on ``u v`` and keeps pushing the spectrum down; Frobenius decay
  regularizes the function the layer computes, as weight decay does for a dense layer.

The paper's finding, that this pair makes factorized layers trained from scratch
competitive with (or better than) pruning and compressing trained models at the same
size, is why it is the baseline a trained-compression method must beat.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import optax

from jlr.lowrank import LowRank
from jlr.methods import Method, lowrank_gradient, no_host_step, plain_forward
from jlr.transforms import factorize

__all__ = ["frobenius_decay", "spectral_init", "method"]


def frobenius_decay(weight_decay: float) -> optax.GradientTransformation:
  """Add ``weight_decay * grad((1/2) ||u v||_F^2)`` to the updates of every ``LowRank``
  leaf: ``weight_decay * (u v) v^T`` to ``u`` and ``weight_decay * u^T (u v)`` to ``v``
  (stacked leaves per member). Other leaves pass through: decay them with
  ``optax.add_decayed_weights(..., mask=...)`` if wanted. Place it before the optimizer,
  like ``optax.add_decayed_weights``; ``update`` needs ``params``. Jittable."""

  def one(p):
    u, v = p.u.astype(jnp.float32), p.v.astype(jnp.float32)
    w = u @ v
    return LowRank(weight_decay * (w @ jnp.swapaxes(v, -1, -2)),
                   weight_decay * (jnp.swapaxes(u, -1, -2) @ w), p.layout)

  return lowrank_gradient(one, "frobenius_decay")


def spectral_init(params, rank: Any, *, select=None, layout=None):
  """The truncated SVD of the (freshly initialized) dense kernels, as balanced factors:
  :func:`jlr.factorize` with the exact SVD."""
  return factorize(params, rank, select=select, layout=layout)


def method(rank: Any, *, weight_decay: float = 5e-4, select=None, layout=None) -> Method:
  """Khodak et al.'s low-rank training as a :class:`jlr.methods.Method`: ``init`` the
  spectral initialization at ``rank`` (any rank rule), ``tx(optimizer)`` Frobenius decay
  then ``optimizer``; the forward is the model's own (run it with ``jlr.flax.apply`` or
  ``jlr.factorized``); nothing between steps; the trained factors are the model."""

  def tx(optimizer):
    return optax.chain(frobenius_decay(weight_decay), optimizer) if weight_decay else optimizer

  return Method(lambda params: spectral_init(params, rank, select=select, layout=layout), tx,
                plain_forward, no_host_step, lambda params: params)
