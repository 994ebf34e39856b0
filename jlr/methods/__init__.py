"""Trainable compression methods, all in one shape.

Every method is a :class:`Method`: four pure parts that slot into any training loop and
any optax optimizer, so a loop takes TRP or LoD (or a later method) by changing the
line that builds it::

    m = jlr.trp.method(every=20, energy=0.9, nuclear=3e-4)   # or jlr.lod.method(...)
    params = m.init(params)                    # what is trained (LoD: full-rank factors)
    tx = m.tx(optax.sgd(0.1, momentum=0.9))   # the method's update around your optimizer
    fwd = m.apply(model.apply)                 # the forward it trains (LoD: sampled ranks)
    ...
    loss, g = jax.value_and_grad(lambda p: loss_fn(fwd(p, x, key=k), y))(params)
    updates, opt_state = tx.update(g, opt_state, params)
    params = optax.apply_updates(params, updates)
    params, opt_state = m.between(t, params, opt_state, tx)   # host step (LoD shrinks)
    ...
    small = m.finalize(params)                 # the compact model: LowRank kernels

``init``, ``tx`` and ``apply`` are jittable (``tx.update`` and ``fwd`` go inside your
jitted step); ``between`` runs on the host between steps, since it may change shapes
(LoD's progressive shrinking slices the factors and the optimizer state alike); it
returns its inputs unchanged off its schedule. ``finalize`` yields the deployable tree.

* :mod:`jlr.methods.trp` -- Trained Rank Pruning (Xu et al. 2019, arXiv 1812.02402).
* :mod:`jlr.methods.lod` -- Maestro's low-rank ordered decomposition (Horvath et al.,
  ICML 2024, arXiv 2308.14929).
* :mod:`jlr.methods.spectral` -- low-rank training from scratch with spectral
  initialization and Frobenius decay (Khodak et al., ICLR 2021, arXiv 2105.01029).

A new method is a module here with the same building blocks and a ``method(...)``
constructor returning a :class:`Method`.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import optax

from jlr.lowrank import LowRank, is_lowrank

__all__ = ["Method", "plain_forward", "no_host_step", "lowrank_gradient"]


class Method(NamedTuple):
  """The parts of a trainable compression method (see the module doc).

  Attributes:
    init: ``params -> params`` to train.
    tx: ``optimizer -> GradientTransformation``: the method's update around any optax
      optimizer (its state in a NamedTuple; ``update`` needs ``params``).
    apply: ``fn -> fn'`` with ``fn'(params, *args, key=None, **kwargs)``: the forward the
      method trains (``key`` drives its sampling; ``None`` evaluates the whole model).
    between: ``(step, params, opt_state, tx) -> (params, opt_state)``, a host step after
      optimizer step ``step`` (0-based).
    finalize: ``params -> params``: the compact model.
  """

  init: Callable[[Any], Any]
  tx: Callable[[optax.GradientTransformation], optax.GradientTransformation]
  apply: Callable[[Callable], Callable]
  between: Callable[[int, Any, Any, optax.GradientTransformation], tuple[Any, Any]]
  finalize: Callable[[Any], Any]


def plain_forward(fn: Callable) -> Callable:
  """The forward of a method that trains the model as it is: ``fn``, with ``key`` accepted
  and ignored."""

  def forward(params, *args, key=None, **kwargs):
    del key
    return fn(params, *args, **kwargs)

  return forward


def no_host_step(step: int, params, opt_state, tx):
  """The host step of a method that needs none."""
  del step, tx
  return params, opt_state


def lowrank_gradient(grad: Callable[[LowRank], LowRank], name: str) -> optax.GradientTransformation:
  """Add ``grad(p)`` (a ``LowRank`` of the factors' gradients) to the update of every
  ``LowRank`` leaf ``p``; other leaves pass through. The shape of a regularizer on the
  factors added on every step (LoD's group lasso, Frobenius decay): place it before the
  optimizer, like ``optax.add_decayed_weights``. ``update`` needs ``params``; jittable."""

  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None):
    if params is None:
      raise ValueError(f"{name} needs params: tx.update(grads, state, params)")

    def one(u, p):
      if not is_lowrank(p):
        return u
      g = grad(p)
      return LowRank(u.u + g.u.astype(u.u.dtype), u.v + g.v.astype(u.v.dtype), u.layout)

    return jax.tree_util.tree_map(one, updates, params, is_leaf=is_lowrank), state

  return optax.GradientTransformation(init, update)
