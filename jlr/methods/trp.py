"""Trained Rank Pruning as optax gradient transformations.

Xu et al., "Trained Rank Pruning for Efficient Deep Neural Networks", arXiv 1812.02402.
TRP trains dense weights and keeps them near low rank:

* every ``m`` steps each selected kernel is replaced by its truncated SVD ``D(W)`` with
  the rank picked by an energy rule (smallest ``k`` with
  ``sum_{i<=k} s_i^2 >= T sum_i s_i^2``; the reference trains with ``T = 0.9``), so the
  next gradient is taken at the low-rank point:
  ``W_{t+1} = D(W_t) - lr grad f(D(W_t))`` for ``t = z m``, plain steps otherwise;
* a nuclear-norm regularizer ``lambda sum ||W||_*`` (reference ``lambda = 3e-4``) enters
  through its sub-gradient ``lambda U V^T`` from the same SVD.

Both are optax ``GradientTransformation``s with the step count in their state and the
periodic work under ``lax.cond``, so the train step stays one jitted function with no
host sync, and the optimizer's state (momentum) is untouched by projections::

    tx = optax.chain(
        jlr.trp.nuclear_norm(3e-4, every=20, rank=jlr.ranks.energy(0.9)),  # on gradients
        optax.sgd(0.1, momentum=0.9),
        jlr.trp.project(every=20, rank=jlr.ranks.energy(0.9)),            # on updates
    )

or ``jlr.trp.trp(optax.sgd(0.1, momentum=0.9), every=20, energy=0.9, nuclear=3e-4)``.
After training, :func:`decouple` splits each kernel into two thin layers
(``jlr.factorize`` with the reference's absolute threshold ``ranks.value(0.05)``).

The nuclear norm in ``trp(...)`` regularizes on every step, as the released code trains:
the sub-gradient ``lambda U_k V_k^T`` of the last projected point ``D(W)``, refreshed at
each projection and kept in the optimizer state (no SVD between projections).
``nuclear_norm(every=1, rank=None)`` gives the every-step variant with the full thin
``U V^T`` of the current weights (one SVD per kernel per step).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jlr import ranks as ranks_lib
from jlr import svd as svd_lib
from jlr.layouts import Layout
from jlr.methods import Method, no_host_step, plain_forward
from jlr.paths import path_str
from jlr.select import candidates, layout_for
from jlr.transforms import factorize, warn_guessed


class TRPState(NamedTuple):
  count: jax.Array  # int32 number of updates seen


class WarmTRPState(NamedTuple):
  count: jax.Array  # int32 number of updates seen
  bases: dict       # path -> (*batch, n, w) right singular basis of the last projection


def _targets(params, select, layout) -> dict[str, tuple[Layout, int]]:
  """Selected kernel paths -> (layout, batch_ndim); trace-time only (shapes, paths)."""
  chosen = candidates(select, layout)
  out, guessed = {}, []
  for kp, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    path = path_str(kp)
    if chosen(path, leaf):
      out[path] = layout_for(layout, path, leaf)
      if layout is None and jnp.ndim(leaf) > 2:
        guessed.append(path)
  warn_guessed(guessed)
  return out


def _svd(w, layout: Layout):
  mat = layout.to_matrix(w).astype(jnp.float32)
  return jnp.linalg.svd(mat, full_matrices=False)


def low_rank_point(w, layout: Layout, rule, *, key=None, max_rank: int | None = None,
                   oversample: int = 10, n_iter: int = 2) -> jax.Array:
  """``D(W)``: the kernel with singular components outside ``rule`` zeroed. Jittable.

  With ``key`` the top ``max_rank`` components come from a randomized SVD
  (:func:`jlr.svd.randomized`) and energy fractions are taken of the exact
  ``||W||_F^2``, so the rule keeps at most ``max_rank`` components.
  """
  if key is None:
    u, s, vt = _svd(w, layout)
    keep = rule.mask(layout, s)
  else:
    mat = layout.to_matrix(w).astype(jnp.float32)
    k = min(max_rank, layout.max_rank)
    u, s, vt = svd_lib.randomized(mat, k, key, oversample=oversample, n_iter=n_iter)
    keep = rule.mask(layout, s, jnp.sum(jnp.square(mat), axis=(-2, -1)))
  s = jnp.where(keep, s, 0.0)
  return layout.from_matrix((u * s[..., None, :]) @ vt).astype(w.dtype)


def warm_svd(mat, basis, *, n_iter: int = 0):
  """Truncated SVD ``(u, s, vt)`` of ``mat`` (``(*batch, m, n)``) in the span found from
  ``basis`` (``(*batch, n, k)``, e.g. the right singular vectors of a nearby matrix):
  :func:`jlr.svd.subspace_svd` with the previous basis in place of the Gaussian sketch
  (Halko et al. 2011, Alg. 4.4). Cost ``O(m n k (2 + 2 n_iter))`` against the exact
  SVD's ``O(m n min(m, n))``. Jittable.
  """
  return svd_lib.subspace_svd(mat, basis, n_iter=n_iter)


def _warm_kept(w, layout: Layout, rule, basis, n_iter: int):
  """``(U, keep, s, S V^T, new basis)`` of ``W``'s matrix: the range of ``W basis``
  (:func:`jlr.svd.range_basis`), the SVD inside it in projector form
  (:func:`jlr.svd.projected_eigh`), the rule's mask (energy fractions of the exact
  ``||W||_F^2``) and the next start, ``V``."""
  mat = layout.to_matrix(w).astype(jnp.float32)
  q = svd_lib.range_basis(mat, basis, n_iter=n_iter)
  u, s, svt, v = svd_lib.projected_eigh(mat, q)
  keep = rule.mask(layout, s, jnp.sum(jnp.square(mat), axis=(-2, -1)))
  return u, keep, s, svt, v


def warm_low_rank_point(w, layout: Layout, rule, basis, *, n_iter: int = 0):
  """``(D(W), new basis)`` with the truncated SVD from the range of ``W basis`` --
  ``basis`` being the right singular vectors of the previous projection. Between two
  projections the weights move by a few optimizer steps, so the previous dominant
  subspace is already close to the new one. ``D(W) = U_k U_k^T Q^T W`` (an orthogonal
  projection in the range ``Q``: :func:`jlr.svd.projected_eigh`); the rule's energy
  fractions are taken of the exact ``||W||_F^2``, so it keeps at most ``k`` components.
  Jittable.
  """
  u, keep, _, svt, basis = _warm_kept(w, layout, rule, basis, n_iter)
  return layout.from_matrix(_kept_matrix(u, keep, svt)).astype(w.dtype), basis


def _kept_columns(u, keep):
  """``U_k``: the columns of ``u`` the rule keeps, the others zeroed (static shapes)."""
  return u * keep[..., None, :].astype(u.dtype)


def _kept_matrix(u, keep, svt):
  """``U_k S_k V_k^T = U_k U_k^T Q^T W``: the kept components of :func:`_warm_kept`."""
  return _kept_columns(u, keep) @ svt


def _subgradient_factor(u, keep, s):
  """``a`` with ``U_k V_k^T = a @ svt`` (``svt = S V^T``): the kept columns of ``U / s``."""
  return u * jnp.where(keep, 1.0 / jnp.maximum(s, jnp.finfo(s.dtype).tiny), 0.0)[..., None, :]


def warm_nuclear_subgradient(w, layout: Layout, rule, basis, *, n_iter: int = 0):
  """``(U_k V_k^T, new basis)``: :func:`nuclear_subgradient` with the truncated SVD from
  the range of ``W basis`` (only the components ``rule`` keeps, all inside it). Jittable."""
  u, keep, s, svt, basis = _warm_kept(w, layout, rule, basis, n_iter)
  sub = layout.from_matrix(_subgradient_factor(u, keep, s) @ svt).astype(w.dtype)
  return sub, basis


def warm_basis(w, layout: Layout, width: int) -> jax.Array:
  """The leading ``width`` right singular vectors of ``W`` (exact SVD): the start of
  :func:`warm_low_rank_point`."""
  _, _, vt = _svd(w, layout)
  return jnp.swapaxes(vt[..., :width, :], -1, -2)


def nuclear_subgradient(w, layout: Layout, rule=None) -> jax.Array:
  """``U V^T`` (``U_k V_k^T`` for the components ``rule`` keeps): a sub-gradient of
  ``||W||_*`` (of ``||D(W)||_*`` with a rule). Jittable."""
  u, s, vt = _svd(w, layout)
  if rule is not None:
    u = u * rule.mask(layout, s)[..., None, :].astype(u.dtype)
  return layout.from_matrix(u @ vt).astype(w.dtype)


def _on_schedule(count, every: int):
  return (count + 1) % every == 0  # steps every, 2 every, ... (1-indexed)


def _map_selected(fn, targets, *trees, with_path: bool = False):
  """``fn`` on the selected leaves, each call after the previous (:func:`jlr.svd.sequenced`:
  independent batched LAPACK calls side by side can deadlock XLA CPU)."""
  prev = None

  def leaf(kp, *xs):
    nonlocal prev
    path = path_str(kp)
    t = targets.get(path)
    if t is None:
      return xs[0]
    xs = (*xs[:-1], svd_lib.sequenced(xs[-1], prev))  # one input waiting is enough
    prev = fn(path, t[0], *xs) if with_path else fn(t[0], *xs)
    return prev
  return jax.tree_util.tree_map_with_path(leaf, *trees)


def project(every: int, rank: Any = ranks_lib.energy(0.9), *, select=None, layout=None,
            method: str = "svd", key=None, max_rank: int | None = None, oversample: int = 10,
            n_iter: int | None = None) -> optax.GradientTransformation:
  """Land the selected kernels on their low-rank point every ``every`` steps.

  Place it *last* in a chain: on a projection step it rewrites the final updates to
  ``D(W + updates) - W``, so the params become exactly ``D(W + updates)``; other steps
  pass updates through. ``rank`` is a per-matrix rule usable in jit
  (:func:`jlr.ranks.energy`, ``value``, ``fixed``, ``ratio``, ``round_up``); ``select``
  and ``layout`` as in :func:`jlr.factorize` (default: every float ``kernel`` /
  ``embedding`` with >= 2 axes; ``layout="conv_spatial"`` for TRP's spatial-wise
  scheme). ``method="randomized"`` (for big kernels) needs ``key`` and ``max_rank``, the
  largest rank the rule may keep; each projection folds the step count into ``key``.

  ``method="warm"`` needs ``max_rank``: each projection starts a subspace iteration from
  the previous projection's right singular basis (``max_rank + oversample`` columns,
  kept in the state; the first from an exact SVD at ``init``) with ``n_iter`` rounds
  (:func:`warm_low_rank_point`): near-exact projections at a fraction of an SVD's cost,
  because the weights move little in ``every`` steps. ``n_iter`` defaults to 2 power
  iterations for ``"randomized"`` and 0 for ``"warm"`` (one range step: the basis keeps
  iterating from one projection to the next).
  """
  if every < 1:
    raise ValueError(f"every must be >= 1, got {every}")
  if method not in svd_lib.METHODS + ("warm",):
    raise ValueError(f"method must be one of {svd_lib.METHODS + ('warm',)}, got {method!r}")
  if method == "randomized" and (key is None or max_rank is None):
    raise ValueError("method='randomized' needs key= and max_rank= (the sketch rank)")
  if method == "warm" and max_rank is None:
    raise ValueError("method='warm' needs max_rank= (the largest rank the rule may keep)")
  rule = ranks_lib.as_rule(rank)
  if method == "warm":
    return _warm_project(every, rule, select, layout, max_rank + oversample, n_iter or 0)
  n_iter = 2 if n_iter is None else n_iter

  def init(params):
    del params
    return TRPState(jnp.zeros([], jnp.int32))

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("trp.project needs params: call tx.update(grads, state, params)")
    targets = _targets(params, select, layout)

    def projected(updates):
      index = {path: i for i, path in enumerate(targets)}

      def one(path, layout_, u, p):
        kw = {}
        if method == "randomized":
          k = jax.random.fold_in(jax.random.fold_in(key, state.count), index[path])
          kw = dict(key=k, max_rank=max_rank, oversample=oversample, n_iter=n_iter)
        return (low_rank_point(p + u, layout_, rule, **kw) - p).astype(u.dtype)
      return _map_selected(one, targets, updates, params, with_path=True)

    updates = jax.lax.cond(_on_schedule(state.count, every), projected, lambda u: u, updates)
    return updates, TRPState(optax.safe_int32_increment(state.count))

  return optax.GradientTransformation(init, update)


def _kernels(params, targets) -> dict:
  """``path -> (layout, kernel)`` of the ``targets`` (:func:`_targets`) in ``params``."""
  flat = {path_str(kp): x for kp, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  return {p: (lay, flat[p]) for p, (lay, _) in targets.items()}


def _warm_bases(params, select, layout, width: int) -> dict:
  """``path -> `` the leading ``width`` right singular vectors of each selected kernel
  (exact SVDs, one after another: :func:`_map_selected`)."""
  bases, prev = {}, None
  for p, (lay, w) in _kernels(params, _targets(params, select, layout)).items():
    bases[p] = prev = warm_basis(svd_lib.sequenced(w, prev), lay, min(width, lay.max_rank))
  return bases


def _warm_transform(every, select, layout, width, leaf_fn) -> optax.GradientTransformation:
  """A periodic transform that keeps, per selected kernel, the right singular basis of its
  last SVD (``width`` columns; the first from an exact SVD at ``init``). On schedule,
  ``leaf_fn(layout, param, update, basis) -> (new update, new basis)``."""

  def init(params):
    return WarmTRPState(jnp.zeros([], jnp.int32), _warm_bases(params, select, layout, width))

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("jlr.trp transforms need params: call tx.update(grads, state, params)")
    targets = _targets(params, select, layout)

    def on_schedule(args):
      updates, bases = args
      flat_u = {path_str(kp): x for kp, x in jax.tree_util.tree_flatten_with_path(updates)[0]}
      new_updates, new_bases, prev = {}, {}, None
      for p, (lay, w) in _kernels(params, targets).items():  # one after another (_map_selected)
        prev = new_updates[p], new_bases[p] = leaf_fn(lay, w, flat_u[p],
                                                      svd_lib.sequenced(bases[p], prev))
      out = jax.tree_util.tree_map_with_path(
          lambda kp, u: new_updates.get(path_str(kp), u), updates)
      return out, new_bases

    updates, bases = jax.lax.cond(_on_schedule(state.count, every), on_schedule, lambda a: a,
                                  (updates, state.bases))
    return updates, WarmTRPState(optax.safe_int32_increment(state.count), bases)

  return optax.GradientTransformation(init, update)


def _warm_project(every, rule, select, layout, width, n_iter) -> optax.GradientTransformation:
  """:func:`project` with ``method="warm"``."""

  def leaf(lay, w, u, basis):
    point, basis = warm_low_rank_point(w + u, lay, rule, basis, n_iter=n_iter)
    return (point - w).astype(u.dtype), basis

  return _warm_transform(every, select, layout, width, leaf)


class Projection(NamedTuple):
  """TRP's projection as a step of its own (:func:`projection`): ``init(params) -> state``,
  ``apply(params, state) -> (params, state)``; both pure and jittable."""
  init: Any
  apply: Any


def projection(rank: Any = ranks_lib.energy(0.9), *, max_rank: int | None = None,
               select=None, layout=None, method: str = "warm", oversample: int = 10,
               n_iter: int = 0, shrink: float = 0.0) -> Projection:
  """``W <- D(W)`` for the selected kernels, as a jittable step that a training loop runs
  every ``m`` steps -- TRP (Xu et al. 2018) with the schedule on the host.

  The same projection as :func:`project` (``method="warm"``: warm-started from the last
  projection's right singular basis, ``max_rank + oversample`` columns kept in the state;
  ``"svd"``: exact, no state), without :func:`project`'s ``lax.cond`` in every optimizer
  step: on XLA CPU that cond costs the plain steps between projections a copy of every
  update and basis (+5% per step on the 1024-wide MLP, as much as the projections
  themselves). The loop knows the step number, so it needs no device read::

      proj = jlr.trp.projection(jlr.ranks.energy(0.9), max_rank=128)
      pstate, project = proj.init(state.params), jax.jit(proj.apply)
      for t in range(steps):
        state = train_step(state, batch)
        if (t + 1) % 20 == 0:
          params, pstate = project(state.params, pstate)
          state = state.replace(params=params)

  ``shrink = lr * lambda`` also takes a proximal nuclear-norm step on the projected point,
  ``D(W) = U_k S_k V_k^T -> U_k max(S_k - shrink, 0) V_k^T`` (singular value
  thresholding, the proximal operator of ``shrink ||W||_*``: Cai, Candes & Shen 2010) --
  TRP's nuclear-norm term ``lambda U_k V_k^T`` applied to the weights with the step size
  instead of through the optimizer, so no momentum accumulates it.
  """
  if method not in ("warm", "svd"):
    raise ValueError(f"projection method must be 'warm' or 'svd', got {method!r}")
  if method == "warm" and max_rank is None:
    raise ValueError("projection(method='warm') needs max_rank= (the largest rank the rule "
                     "may keep)")
  if shrink < 0:
    raise ValueError(f"shrink must be >= 0, got {shrink}")
  rule = ranks_lib.as_rule(rank)
  width = None if max_rank is None else max_rank + oversample

  def init(params):
    return {} if method == "svd" else _warm_bases(params, select, layout, width)

  def apply(params, bases):
    new, bases, prev = {}, dict(bases), None
    for p, (lay, w) in _kernels(params, _targets(params, select, layout)).items():
      w = svd_lib.sequenced(w, prev)  # one after another (_map_selected)
      if method == "svd":
        u, s, vt = _svd(w, lay)
        keep, svt = rule.mask(lay, s), s[..., :, None] * vt
      else:
        u, keep, s, svt, bases[p] = _warm_kept(w, lay, rule, bases[p], n_iter)
      tiny = jnp.finfo(s.dtype).tiny
      scale = jnp.where(keep, jnp.maximum(s - shrink, 0.0) / jnp.maximum(s, tiny), 0.0)
      new[p] = prev = lay.from_matrix((u * scale[..., None, :]) @ svt).astype(w.dtype)
    out = jax.tree_util.tree_map_with_path(lambda kp, x: new.get(path_str(kp), x), params)
    return out, bases

  return Projection(init, apply)


def nuclear_norm(strength: float, *, every: int = 1, rank: Any = None, select=None,
                 layout=None, method: str = "svd", max_rank: int | None = None,
                 oversample: int = 10, n_iter: int = 0) -> optax.GradientTransformation:
  """Add ``strength * U V^T``, a sub-gradient of ``strength * ||W||_*``, to the gradients
  of the selected kernels.

  Place it *before* the optimizer (like ``optax.add_decayed_weights``). With ``rank``
  (a jittable rule) the truncated ``U_k V_k^T`` is used; with ``every > 1`` it is added
  only on steps ``every, 2 every, ...`` -- TRP's released code uses both, aligned with
  :func:`project` (see the module doc). ``method="warm"`` (needs ``rank`` and
  ``max_rank``) takes ``U_k V_k^T`` from a subspace iteration started at the previous
  call's basis, as ``project(method="warm")`` does, instead of an exact SVD.
  """
  rule = None if rank is None else ranks_lib.as_rule(rank)
  if method not in ("svd", "warm"):
    raise ValueError(f"nuclear_norm method must be 'svd' or 'warm', got {method!r}")
  if method == "warm":
    if rule is None or max_rank is None:
      raise ValueError("nuclear_norm(method='warm') needs rank= (a rule: the truncated "
                       "U_k V_k^T) and max_rank= (the largest rank it may keep)")

    def leaf(lay, w, g, basis):
      sub, basis = warm_nuclear_subgradient(w, lay, rule, basis, n_iter=n_iter)
      return g + strength * sub.astype(g.dtype), basis

    return _warm_transform(every, select, layout, max_rank + oversample, leaf)

  def init(params):
    del params
    return TRPState(jnp.zeros([], jnp.int32))

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("trp.nuclear_norm needs params: call tx.update(grads, state, params)")
    targets = _targets(params, select, layout)

    def add(updates):
      def one(layout_, g, p):
        return g + strength * nuclear_subgradient(p, layout_, rule).astype(g.dtype)
      return _map_selected(one, targets, updates, params)

    if every == 1:
      updates = add(updates)
    else:
      updates = jax.lax.cond(_on_schedule(state.count, every), add, lambda u: u, updates)
    return updates, TRPState(optax.safe_int32_increment(state.count))

  return optax.GradientTransformation(init, update)


class TRPChainState(NamedTuple):
  count: jax.Array  # int32 number of updates seen
  inner: Any        # the wrapped optimizer's state
  bases: dict       # path -> (*batch, n, w) right singular basis of the last projection
  nuclear: dict     # path -> lambda U_k V_k^T of the last projected point, kernel-shaped


WarmTRPChainState = TRPChainState  # the name this state had when only method="warm" used it


def _chain(optimizer, every, rule, strength, select, layout, method, width, n_iter,
           on_projection_only) -> optax.GradientTransformation:
  """``trp(optimizer, nuclear=strength)`` as one transform (TRP's training loop).

  Every step adds ``strength * U_k V_k^T`` to the gradients, where ``U_k S_k V_k^T`` is
  the last projected point ``D(W)`` (the first from an exact SVD of the initial weights
  with the rule's ``k``): a sub-gradient of ``strength * ||D(W)||_*``, refreshed at every
  projection and kept in the state as a kernel-shaped array (one add per step, no SVD
  between projections). That is the released code's training: the regularizer on every
  iteration, the projection every ``every`` steps. The optimizer then updates, and on
  projection steps (``every, 2 every, ...``) the kernels land on ``D(W + updates)``
  (``method="svd"``: exact; ``"warm"``: a subspace iteration from the last basis,
  ``width`` columns). ``on_projection_only=True`` adds the sub-gradient only on the
  step after each projection (the older setting, kept for comparison).
  """

  def kept(w, lay, basis):
    """``(U_k S_k V_k^T, strength U_k V_k^T, next basis)`` of ``W`` (matrix form)."""
    if method == "warm":
      u, keep, s, svt, basis = _warm_kept(w, lay, rule, basis, n_iter)
    else:
      u, s, vt = _svd(w, lay)
      keep, svt = rule.mask(lay, s), s[..., :, None] * vt
    sub = strength * (_subgradient_factor(u, keep, s) @ svt)
    return _kept_matrix(u, keep, svt), sub, basis

  def init(params):
    targets = _targets(params, select, layout)
    flat = {path_str(kp): x for kp, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    bases, nuclear, prev = {}, {}, None
    for p, (lay, _) in targets.items():  # one after another (_map_selected)
      w = svd_lib.sequenced(flat[p], prev)
      u, s, vt = prev = _svd(w, lay)
      mat = lay.to_matrix(w).astype(jnp.float32)
      keep = rule.mask(lay, s, jnp.sum(jnp.square(mat), axis=(-2, -1)))
      if strength:
        nuclear[p] = lay.from_matrix(strength * (_kept_columns(u, keep) @ vt)).astype(w.dtype)
      if method == "warm":
        bases[p] = jnp.swapaxes(vt[..., :min(width, lay.max_rank), :], -1, -2)
    return TRPChainState(jnp.zeros([], jnp.int32), optimizer.init(params), bases, nuclear)

  def update(grads, state, params=None):
    if params is None:
      raise ValueError("jlr.trp.trp needs params: call tx.update(grads, state, params)")
    targets = _targets(params, select, layout)

    def add_subgradients(grads):
      return jax.tree_util.tree_map_with_path(
          lambda kp, g: g + state.nuclear[path_str(kp)].astype(g.dtype)
          if path_str(kp) in state.nuclear else g, grads)

    if strength and on_projection_only:
      grads = jax.lax.cond(state.count % every == 0, add_subgradients, lambda g: g, grads)
    elif strength:
      grads = add_subgradients(grads)
    updates, inner = optimizer.update(grads, state.inner, params)

    def project_all(args):
      updates, bases, nuclear = args
      flat_u = {path_str(kp): x for kp, x in jax.tree_util.tree_flatten_with_path(updates)[0]}
      flat_p = {path_str(kp): x for kp, x in jax.tree_util.tree_flatten_with_path(params)[0]}
      new_u, bases, nuclear, prev = {}, dict(bases), dict(nuclear), None
      for p, (lay, _) in targets.items():  # one after another (_map_selected)
        w = svd_lib.sequenced(flat_p[p] + flat_u[p], prev)
        point, sub, basis = kept(w, lay, bases.get(p))
        if method == "warm":
          bases[p] = basis
        prev = new_u[p] = (lay.from_matrix(point).astype(w.dtype) - flat_p[p]).astype(flat_u[p].dtype)
        if strength:
          nuclear[p] = lay.from_matrix(sub).astype(nuclear[p].dtype)
      out = jax.tree_util.tree_map_with_path(lambda kp, x: new_u.get(path_str(kp), x), updates)
      return out, bases, nuclear

    updates, bases, nuclear = jax.lax.cond(
        _on_schedule(state.count, every), project_all, lambda a: a,
        (updates, state.bases, state.nuclear))
    return updates, TRPChainState(optax.safe_int32_increment(state.count), inner, bases, nuclear)

  return optax.GradientTransformation(init, update)


def trp(optimizer: optax.GradientTransformation, *, every: int = 20, energy: float = 0.9,
        rank: Any = None, nuclear: float = 0.0, nuclear_on: str = "every_step", select=None,
        layout=None, **project_kwargs) -> optax.GradientTransformation:
  """TRP around ``optimizer``, as the released code trains.

  Every ``every`` steps the selected kernels are projected onto ``D(W)``, keeping
  ``ranks.energy(energy)`` (the paper's rule) or ``rank`` when given (any jittable rule:
  ``ranks.ratio(0.25)`` holds a parameter budget). ``nuclear = lambda > 0`` adds the
  nuclear-norm sub-gradient ``lambda U_k V_k^T`` of the last projected point to the
  gradients on **every** step (``nuclear_on="every_step"``, the paper's regularizer;
  ``"projection"`` adds it only on the step after each projection, an older, weaker
  setting kept for comparison). With ``nuclear`` (or ``method="warm"``) this is one
  transform, :class:`TRPChainState`, whose only SVDs are the projections'.
  ``project_kwargs`` (``method="svd"|"warm"|"randomized"``, ``max_rank``, ``n_iter``,
  ``key``, ``oversample``) as in :func:`project`; ``"randomized"`` with ``nuclear`` adds
  ``nuclear_norm`` (an exact SVD per kernel per step) before the optimizer.
  """
  if nuclear_on not in ("every_step", "projection"):
    raise ValueError(f"nuclear_on must be 'every_step' or 'projection', got {nuclear_on!r}")
  if nuclear < 0:
    raise ValueError(f"nuclear must be >= 0, got {nuclear}")
  rule = ranks_lib.energy(energy) if rank is None else ranks_lib.as_rule(rank)
  method = project_kwargs.get("method", "svd")
  if method in ("svd", "warm") and (nuclear or method == "warm"):
    if method == "warm" and project_kwargs.get("max_rank") is None:
      raise ValueError("method='warm' needs max_rank= (the largest rank the rule may keep)")
    unknown = set(project_kwargs) - {"method", "max_rank", "oversample", "n_iter"}
    if unknown:
      raise TypeError(f"trp: unexpected keyword(s) {sorted(unknown)} for method={method!r}")
    width = (project_kwargs.get("max_rank") or 0) + project_kwargs.get("oversample", 10)
    return _chain(optimizer, every, rule, nuclear, select, layout, method, width,
                  project_kwargs.get("n_iter") or 0, nuclear_on == "projection")
  parts = []
  if nuclear:
    parts.append(nuclear_norm(nuclear, every=1 if nuclear_on == "every_step" else every,
                              rank=rule, select=select, layout=layout))
  parts += [optimizer, project(every, rule, select=select, layout=layout, **project_kwargs)]
  return optax.chain(*parts)


def decouple(params, rank: Any = ranks_lib.value(0.05), *, select=None, layout=None, **kwargs):
  """TRP's final step: split every selected kernel into two thin layers.

  Exactly :func:`jlr.factorize` with TRP's reference rule (singular values above an
  absolute 0.05: trained weights are already low-rank) as the default.
  """
  return factorize(params, rank, select=select, layout=layout, **kwargs)


def method(*, every: int = 20, energy: float = 0.9, rank: Any = None, nuclear: float = 0.0,
           nuclear_on: str = "every_step", final_rank: Any = ranks_lib.value(0.05),
           select=None, layout=None, **project_kwargs) -> Method:
  """TRP as a :class:`jlr.methods.Method`, as the released code trains.

  * ``init``: the dense params as they are (TRP trains dense weights);
  * ``tx(optimizer)``: :func:`trp` -- the nuclear-norm sub-gradient on every step and the
    projection onto ``D(W)`` every ``every`` steps (``energy`` rule, or ``rank``);
  * ``apply(fn)``: ``fn`` itself (the model runs dense while training);
  * ``between``: nothing (the projection runs inside ``tx``);
  * ``finalize``: :func:`decouple` at ``final_rank`` (the reference's singular values
    above 0.05; ``ranks.budget(params=...)`` lands on a parameter budget).
  """

  def tx(optimizer):
    return trp(optimizer, every=every, energy=energy, rank=rank, nuclear=nuclear,
               nuclear_on=nuclear_on, select=select, layout=layout, **project_kwargs)

  return Method(lambda params: params, tx, plain_forward, no_host_step,
                lambda params: decouple(params, final_rank, select=select, layout=layout))
