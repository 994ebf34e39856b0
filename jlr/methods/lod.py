"""Maestro's low-rank ordered decomposition (LoD): train the factors themselves.

Horvath et al., "Maestro: Uncovering Low-Rank Structures via Trainable Decomposition",
ICML 2024, arXiv 2308.14929. Every selected layer is a :class:`jlr.LowRank` ``(u, v)``
initialized from the thin SVD with the singular values split evenly
(``u = P sqrt(S)``, ``v = sqrt(S) Q^T``, rank ``R = min(m, n)``), so the model is
unchanged at step 0. Training then

* samples ordered-dropout ranks: a forward at rank ``b`` uses only the first ``b``
  components (:func:`sample`; samplers "layer" -- one layer ``i`` with probability
  ``r_i / sum_k r_k`` and ``b ~ U{1..r_i}``, the others at full rank, the paper's
  default --, "independent" -- every layer draws its own ``b`` --, and "fixed" -- every
  layer at ``ceil(fraction r_i)``, PufferFish-style);
* adds ``lambda`` times the hierarchical group lasso (:func:`group_lasso`)
  ``sum_j ( ||v[j:, :]||_F + ||u[:, j:]||_F )``, which orders importance;
* progressively shrinks (:func:`shrink`): components with importance
  ``||v[j:, :]||_F ||u[:, j:]||_F < eps`` are dropped. Importance is non-increasing in
  ``j``, so the kept set is a prefix; dropping a tail changes ``W`` by at most
  ``eps`` in Frobenius norm (``||sum_{j>=k} u_j v_j^T||_F <= ||u[:, k:]||_F ||v[k:, :]||_F``).

Any prefix of a trained model is a usable model: :func:`extract` (width or per-layer
ranks), :func:`deploy` (layers whose factors are larger than the dense kernel go back to
dense) and :func:`search` (greedy removal toward a parameter or FLOP budget, scored on
held-out data).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jlr import ranks as ranks_lib
from jlr import select as select_lib
from jlr.factorized import factorized
from jlr.lowrank import LowRank, is_lowrank
from jlr.methods import Method, lowrank_gradient
from jlr.report import summary
from jlr.select import candidates
from jlr.transforms import factorize

SAMPLERS = ("layer", "independent", "fixed")


def init(params, *, select=None, layout=None):
  """Full-rank balanced factorization of the selected kernels (exact: the model is
  unchanged). ``select`` defaults to every float kernel/embedding with >= 2 axes."""
  return factorize(params, ranks_lib.full(), select=candidates(select, layout), layout=layout,
                   split="balanced")


def _lowranks(params) -> list[tuple[str, LowRank]]:
  return [(p, x) for p, x in select_lib.leaves(params)[0] if is_lowrank(x)]


# ----------------------------------------------------------------------------- sampling


def sample_ranks(params, key, *, sampler: str = "layer", fraction: float | None = None
                 ) -> dict[str, jax.Array]:
  """Draw one ordered-dropout rank ``b`` (int32 scalar) per ``LowRank`` leaf. Jittable."""
  leaves = _lowranks(params)
  if not leaves:
    return {}
  r = jnp.asarray([f.rank for _, f in leaves], jnp.int32)
  n = len(leaves)
  if sampler == "layer":
    k1, k2 = jax.random.split(key)
    i = jax.random.choice(k1, n, p=r / r.sum())
    b_i = jax.random.randint(k2, (), 1, r[i] + 1)
    b = jnp.where(jnp.arange(n) == i, b_i, r)
  elif sampler == "independent":
    b = jax.random.randint(key, (n,), 1, r + 1)
  elif sampler == "fixed":
    if fraction is None or not 0 < fraction <= 1:
      raise ValueError(f"the fixed sampler needs fraction in (0, 1], got {fraction}")
    b = jnp.asarray([max(1, math.ceil(fraction * f.rank)) for _, f in leaves], jnp.int32)
  else:
    raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
  return {p: b[j] for j, (p, _) in enumerate(leaves)}


def with_ranks(params, ranks: Mapping[str, Any]):
  """Drop the components ``j >= ranks[path]`` of each listed ``LowRank`` (static shapes,
  so it runs inside jit; gradients of the dropped components are zero).

  Only the smaller factor is masked: ``u diag(keep) v = u (diag(keep) v)``, and the
  gradient of ``u``'s column ``j`` is ``x^T g v_j^T keep_j`` -- zero for a dropped
  component either way -- so masking one factor gives the same forward and the same
  gradients as masking both, at half the elementwise work (LoD's per-step overhead).

  In a training step prefer ``jlr.factorized(fn, ranks=ranks)(params, ...)``: the same
  values and gradients, with the mask applied where it is cheapest (the ``r``-wide
  activation ``x u`` when it is smaller than both factors), not a memory pass over a
  factor per step."""
  leaves, treedef = select_lib.leaves(params)
  out = []
  for path, x in leaves:
    if is_lowrank(x) and path in ranks:
      keep = (jnp.arange(x.rank) < ranks[path]).astype(x.u.dtype)
      if x.u.shape[-2] <= x.v.shape[-1]:
        x = LowRank(x.u * keep, x.v, x.layout)
      else:
        x = LowRank(x.u, x.v * keep[:, None], x.layout)
    out.append(x)
  return jax.tree_util.tree_unflatten(treedef, out)


def sample(params, key, *, sampler: str = "layer", fraction: float | None = None):
  """``with_ranks(params, sample_ranks(params, key, ...))``: the sampled sub-network."""
  return with_ranks(params, sample_ranks(params, key, sampler=sampler, fraction=fraction))


# ----------------------------------------------------------------------------- group lasso


def _safe_sqrt(x):
  """sqrt with a zero (sub)gradient at 0 instead of inf/NaN."""
  pos = x > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, x, 1.0)), 0.0)


def _suffix_sums(c: jax.Array, block: int = 32) -> jax.Array:
  """``out[..., j] = sum_{k >= j} c[..., k]`` as two small triangular matmuls.

  ``c`` is cut into blocks of ``block``: suffix sums inside each block (one product with
  the ``block x block`` triangle of ones) plus the totals of the later blocks (one
  product with the strict ``(r / block)``-square triangle). On CPU this is faster than
  one ``r x r`` triangular product (which reads ``r^2`` ones) and than ``lax.cumsum``
  (an associative scan)."""
  r = c.shape[-1]
  x = jnp.pad(c, [(0, 0)] * (c.ndim - 1) + [(0, -r % block)])
  x = x.reshape(c.shape[:-1] + (-1, block))
  hi = jax.lax.Precision.HIGHEST
  within = jnp.matmul(x, jnp.tril(jnp.ones((block, block), c.dtype)), precision=hi)
  totals = jnp.sum(x, axis=-1)
  nb = totals.shape[-1]
  later = jnp.matmul(totals, jnp.tril(jnp.ones((nb, nb), c.dtype), -1), precision=hi)
  return (within + later[..., None]).reshape(c.shape[:-1] + (-1,))[..., :r]


def _tail_sq_norms(f: LowRank):
  """``(||u[:, j:]||_F^2, ||v[j:, :]||_F^2)`` for every ``j``, shape ``(..., r)``."""
  cu = jnp.sum(jnp.square(f.u.astype(jnp.float32)), axis=-2)
  cv = jnp.sum(jnp.square(f.v.astype(jnp.float32)), axis=-1)
  return _suffix_sums(cu), _suffix_sums(cv)


def group_lasso(params) -> jax.Array:
  """Hierarchical group lasso ``sum_layers sum_j ( ||v[j:, :]||_F + ||u[:, j:]||_F )``."""
  total = jnp.zeros([], jnp.float32)
  for _, f in _lowranks(params):
    tu, tv = _tail_sq_norms(f)
    total = total + jnp.sum(_safe_sqrt(tu)) + jnp.sum(_safe_sqrt(tv))
  return total


def importance(f: LowRank) -> jax.Array:
  """``||v[j:, :]||_F ||u[:, j:]||_F`` per component ``j`` (non-increasing), shape ``(..., r)``."""
  tu, tv = _tail_sq_norms(f)
  return jnp.sqrt(tu * tv)


# ----------------------------------------------------------------------------- shapes


def _slice(f: LowRank, k: int) -> LowRank:
  return LowRank(f.u[..., :k], f.v[..., :k, :], f.layout)


def shrink(params, eps: float, *, multiple: int = 1, min_rank: int = 1,
           relative: bool = False):
  """Drop the trailing components whose importance is below ``eps`` (host-side: shapes
  change, so a jitted loop re-traces after a shrink). Ranks are rounded up to
  ``multiple`` (fewer distinct shapes, fewer recompiles). Stacked leaves keep a
  component while any member needs it. Use :func:`slice_like` for optimizer state.

  With ``relative=True`` the threshold is ``eps * importance[0] = eps ||u||_F ||v||_F``
  per leaf (the bound becomes ``||dW||_F <= eps ||u||_F ||v||_F``). Use it for layers
  followed by a normalization (BatchNorm): their output does not depend on the kernel's
  scale, so the group lasso shrinks that scale and an absolute ``eps`` loses its meaning.
  """
  def one(x):
    if not is_lowrank(x):
      return x
    imp = np.asarray(importance(x)).reshape(-1, x.rank)
    thr = eps * imp[:, :1] if relative else eps
    k = max(int((imp >= thr).any(0).sum()), min_rank)
    k = min(-(-k // multiple) * multiple, x.rank)
    return _slice(x, k) if k < x.rank else x
  return jax.tree_util.tree_map(one, params, is_leaf=is_lowrank)


def slice_like(tree, params):
  """Slice every ``LowRank`` in ``tree`` (same structure as ``params``, e.g. gradients or
  one moment of an optimizer) to the ranks in ``params``."""
  return jax.tree_util.tree_map(
      lambda t, p: _slice(t, p.rank) if is_lowrank(p) else t, tree, params, is_leaf=is_lowrank)


def slice_opt_state(tx: optax.GradientTransformation, opt_state, params):
  """The optimizer state after :func:`shrink`: every params-shaped part (momenta...)
  sliced like ``params``; counters and the rest kept (``optax.tree_utils.tree_map_params``)."""
  return optax.tree_utils.tree_map_params(
      tx, lambda s, p: _slice(s, p.rank) if is_lowrank(p) else s, opt_state, params,
      is_leaf=is_lowrank, transform_non_params=lambda x: x)


def extract(params, width: float | None = None, ranks: Mapping[str, int] | Callable | None = None):
  """A nested sub-model: each ``LowRank`` keeps its first ``ceil(width * r)`` components,
  or ``ranks[path]`` (a mapping of paths, or a callable ``(path, leaf) -> int | None``)."""
  if (width is None) == (ranks is None):
    raise ValueError("extract needs exactly one of width= or ranks=")
  if width is not None and not 0 < width <= 1:
    raise ValueError(f"width must be in (0, 1], got {width}")
  leaves, treedef = select_lib.leaves(params)
  out = []
  for path, x in leaves:
    if is_lowrank(x):
      if width is not None:
        k = max(1, math.ceil(width * x.rank))
      else:
        k = ranks.get(path) if isinstance(ranks, Mapping) else ranks(path, x)
      if k is not None:
        if not 1 <= k <= x.rank:
          raise ValueError(f"{path}: rank {k} is out of range [1, {x.rank}]")
        x = _slice(x, int(k))
    out.append(x)
  return jax.tree_util.tree_unflatten(treedef, out)


def deploy(params):
  """Merge back to dense every ``LowRank`` whose factors hold at least as many parameters
  as its dense kernel (it would be slower and bigger factorized)."""
  def one(x):
    if is_lowrank(x) and x.size >= math.prod(x.shape):
      return x.dense().astype(x.dtype)
    return x
  return jax.tree_util.tree_map(one, params, is_leaf=is_lowrank)


def search(params, score: Callable[[Any], float], *, params_budget: int | None = None,
           flops_budget: int | None = None, step: float = 0.1, verbose: bool = False):
  """Greedy deploy-time rank search toward a budget.

  Repeatedly tries removing the last ``ceil(step * r)`` components of each ``LowRank``
  leaf, scores each candidate with ``score(params)`` (higher is better, e.g. accuracy on
  a held-out batch), and keeps the best, until :func:`deploy`'s cost meets the budget
  (total parameters or kernel FLOPs from :func:`jlr.summary`).

  Returns ``(params, history)`` with ``history = [(cost, score), ...]``.
  """
  if (params_budget is None) == (flops_budget is None):
    raise ValueError("search needs exactly one of params_budget= or flops_budget=")

  def cost(p):
    rep = summary(deploy(p))
    return rep.total_params if params_budget is not None else rep.flops

  budget = params_budget if params_budget is not None else flops_budget
  history = [(cost(params), float(score(params)))]
  while history[-1][0] > budget:
    best = None
    for path, f in _lowranks(params):
      if f.rank <= 1:
        continue
      k = f.rank - max(1, math.ceil(step * f.rank))
      cand = extract(params, ranks={path: k})
      s = float(score(cand))
      if best is None or s > best[0]:
        best = (s, cand, path, k)
    if best is None:
      break  # every leaf is at rank 1
    params = best[1]
    history.append((cost(params), best[0]))
    if verbose:
      print(f"  {best[2]} -> rank {best[3]}: cost {history[-1][0]:,} score {best[0]:.4f}")
  return params, history


# ----------------------------------------------------------------------------- the method


def group_lasso_gradient(strength: float) -> optax.GradientTransformation:
  """Add ``strength * grad(group_lasso)`` to the updates of every ``LowRank`` leaf (place
  it before the optimizer, like ``optax.add_decayed_weights``): Maestro's hierarchical
  group lasso on every step. Needs ``params`` in ``update``. Jittable."""
  grad = jax.grad(lambda f: group_lasso({"f": f}))

  def one(p):
    g = grad(p)
    return LowRank(strength * g.u, strength * g.v, p.layout)

  return lowrank_gradient(one, "lod.group_lasso_gradient")


def forward(fn: Callable, *, sampler: str = "layer", fraction: float | None = None) -> Callable:
  """``fn`` run factorized; with ``key`` each ``LowRank`` computes with its first ``b``
  components, ``b`` drawn by ordered dropout (:func:`sample_ranks`); ``key=None`` runs
  the whole model. ``fn(params, *args)`` takes the tree holding the factors first."""

  def run(params, *args, key=None, **kwargs):
    if key is None:
      return factorized(fn)(params, *args, **kwargs)
    ranks = sample_ranks(params, key, sampler=sampler, fraction=fraction)
    return factorized(fn, ranks=ranks)(params, *args, **kwargs)

  return run


def kernel_params(params) -> int:
  """Parameters held by the ``LowRank`` factors of ``params``."""
  return sum(f.size for _, f in _lowranks(params))


def to_budget(params, kernel_budget: int):
  """The final budget projection: drop trailing components, globally, least important
  per parameter first (importance ``||u[:, j:]|| ||v[j:]||`` over the component's
  ``m + n`` parameters; each layer's importance is non-increasing, so every layer keeps
  a prefix) until the factors hold at most ``kernel_budget`` parameters. Host-side."""
  leaves = _lowranks(params)
  total = kernel_params(params)
  if total <= kernel_budget:
    return params
  keep = {p: f.rank for p, f in leaves}
  imp = {p: np.asarray(importance(f)).reshape(-1, f.rank).max(0) for p, f in leaves}
  cost = {p: f.size // f.rank for p, f in leaves}  # parameters per component
  while total > kernel_budget:
    cands = [(imp[p][keep[p] - 1] / cost[p], p) for p in keep if keep[p] > 1]
    if not cands:
      raise ValueError(f"kernel_budget={kernel_budget:,} is below one component per layer")
    _, p = min(cands)
    keep[p] -= 1
    total -= cost[p]
  return extract(params, ranks=keep)


def method(*, lam: float = 1e-4, sampler: str = "layer", fraction: float | None = None,
           eps: float | None = None, interval: int | None = None, start: int = 0,
           relative: bool = False, multiple: int = 1, kernel_budget: int | None = None,
           select=None, layout=None) -> Method:
  """Maestro's LoD as a :class:`jlr.methods.Method`, as the paper trains it.

  * ``init``: exact full-rank balanced factors of the selected kernels (:func:`init`);
  * ``tx(optimizer)``: ``lam`` times the hierarchical group lasso's gradient added on
    every step (:func:`group_lasso_gradient`), then ``optimizer``;
  * ``apply(fn)``: ordered dropout -- with ``key`` a rank ``b`` per layer drawn by
    ``sampler`` (:func:`forward`);
  * ``between``: progressive shrinking by threshold -- every ``interval`` steps from
    ``start``, each layer drops its trailing components whose importance is under
    ``eps`` (``relative``: ``eps`` times the layer's first importance), so each layer
    finds its own rank; the optimizer state is sliced alike (:func:`slice_opt_state`);
  * ``finalize``: with ``kernel_budget`` the final budget projection
    (:func:`to_budget`), then :func:`deploy` (factors no smaller than the dense kernel go
    back to dense).
  """
  if (eps is None) != (interval is None):
    raise ValueError("progressive shrinking needs both eps= and interval=")

  def between(step, params, opt_state, tx):
    t = step + 1
    if eps is None or t < start or t % interval:
      return params, opt_state
    new = shrink(params, eps, multiple=multiple, relative=relative)
    if all(a.rank == b.rank for (_, a), (_, b) in zip(_lowranks(params), _lowranks(new))):
      return params, opt_state
    return new, slice_opt_state(tx, opt_state, new)

  def finalize(params):
    if kernel_budget is not None:
      params = to_budget(params, kernel_budget)
    return deploy(params)

  def tx(optimizer):
    return optax.chain(group_lasso_gradient(lam), optimizer) if lam else optimizer

  return Method(lambda params: init(params, select=select, layout=layout), tx,
                lambda fn: forward(fn, sampler=sampler, fraction=fraction), between, finalize)
