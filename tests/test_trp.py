import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jlr
from jlr import ranks, trp
from conftest import f32


def params(seed=0):
  rng = np.random.default_rng(seed)
  return {"Dense_0": {"kernel": f32(rng.normal(size=(24, 16))),
                      "bias": f32(rng.normal(size=(16,)))},
          "Conv_0": {"kernel": f32(rng.normal(size=(3, 3, 4, 8)))}}


def grads(p, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), p)


def np_low_rank_point(mat, energy):
  u, s, vt = np.linalg.svd(np.asarray(mat, np.float64), full_matrices=False)
  frac = np.cumsum(s ** 2) / (s ** 2).sum()
  k = int((frac < energy - 1e-9).sum()) + 1
  return (u[:, :k] * s[:k]) @ vt[:k], k


@pytest.mark.parametrize("layout", ["conv_channel", "conv_spatial"])
def test_project_lands_exactly_on_the_truncated_svd_every_m_steps(layout):
  every, energy = 3, 0.7
  tx = optax.chain(optax.sgd(0.05), trp.project(every, ranks.energy(energy), layout={"Conv_0": layout}))
  p = params()
  state = tx.init(p)
  step = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(*tx.update(g, s, p)))
  for t in range(1, 7):
    prev = p
    p, state = step(p, state, grads(p, t))
    plain = jax.tree.map(lambda a, g: a - 0.05 * g, prev, grads(prev, t))
    if t % every:
      chex.assert_trees_all_close(p, plain, rtol=1e-5, atol=1e-6)
      continue
    for name in ("Dense_0", "Conv_0"):
      w = plain[name]["kernel"]
      lay, _ = jlr.layouts.infer("kernel", w.shape, jlr.layouts.Spec(
          kind=layout if name == "Conv_0" else None))
      want, k = np_low_rank_point(lay.to_matrix(w), energy)
      got = np.asarray(lay.to_matrix(p[name]["kernel"]))
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
      assert np.linalg.matrix_rank(got, tol=1e-4) == k < min(got.shape)
    np.testing.assert_allclose(p["Dense_0"]["bias"], plain["Dense_0"]["bias"], rtol=1e-6)


def test_momentum_survives_projections():
  every = 2
  inner = optax.sgd(0.1, momentum=0.9)
  tx = optax.chain(inner, trp.project(every, ranks.energy(0.5)))
  p = params()
  s_trp, s_ref = tx.init(p), inner.init(p)
  for t in range(4):
    g = grads(p, t)
    u, s_trp = tx.update(g, s_trp, p)
    _, s_ref = inner.update(g, s_ref, p)
    p = optax.apply_updates(p, u)
  chex.assert_trees_all_close(s_trp[0], s_ref, rtol=1e-6)  # same trace, never reset
  assert int(s_trp[1].count) == 4


def test_nuclear_norm_adds_the_subgradient():
  p = params()
  g = grads(p, 1)
  lam = 3e-4
  for rank, every in [(None, 1), (ranks.energy(0.6), 1)]:
    tx = trp.nuclear_norm(lam, rank=rank, every=every)
    out, _ = tx.update(g, tx.init(p), p)
    w = np.asarray(p["Dense_0"]["kernel"], np.float64)
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    k = len(s) if rank is None else np_low_rank_point(w, 0.6)[1]
    want = np.asarray(g["Dense_0"]["kernel"]) + lam * u[:, :k] @ vt[:k]
    np.testing.assert_allclose(out["Dense_0"]["kernel"], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out["Dense_0"]["bias"], g["Dense_0"]["bias"])


def test_nuclear_norm_on_schedule_only():
  p, g = params(), grads(params(), 2)
  tx = trp.nuclear_norm(1e-2, every=3)
  s = tx.init(p)
  for t in range(1, 4):
    out, s = tx.update(g, s, p)
    changed = not np.allclose(out["Dense_0"]["kernel"], g["Dense_0"]["kernel"])
    assert changed == (t == 3)


def test_trp_training_reduces_rank_and_decouples():
  # regression onto a rank-3 map with a full-rank start: TRP finds the low-rank solution
  rng = np.random.default_rng(0)
  a = rng.normal(size=(20, 3)) @ rng.normal(size=(3, 12))
  x = f32(rng.normal(size=(256, 20)))
  y = x @ f32(a)
  p = {"lin": {"kernel": f32(rng.normal(size=(20, 12)) * 0.3)}}
  tx = trp.trp(optax.sgd(0.05, momentum=0.9), every=10, energy=0.95, nuclear=1e-3)
  state = tx.init(p)

  @jax.jit
  def step(p, state):
    loss, g = jax.value_and_grad(lambda p: jnp.mean((x @ p["lin"]["kernel"] - y) ** 2))(p)
    u, state = tx.update(g, state, p)
    return optax.apply_updates(p, u), state, loss

  for _ in range(300):
    p, state, loss = step(p, state)
  assert float(loss) < 1e-2
  f = trp.decouple(p, ranks.value(0.05))
  assert f["lin"]["kernel"].rank == 3
  np.testing.assert_allclose(f["lin"]["kernel"].dense(), p["lin"]["kernel"], atol=5e-2)


def test_works_on_nnx_state():
  model = nnx.Sequential(nnx.Linear(16, 12, rngs=nnx.Rngs(0)), nnx.Linear(12, 4, rngs=nnx.Rngs(1)))
  state = nnx.state(model, nnx.Param)
  tx = trp.trp(optax.sgd(0.1), every=1, energy=0.5)
  u, _ = tx.update(jax.tree.map(jnp.zeros_like, state), tx.init(state), state)
  new = optax.apply_updates(state, u)
  nnx.update(model, new)
  k = np.asarray(model.layers[0].kernel[...])
  assert np.linalg.matrix_rank(k, tol=1e-5) < 12


@pytest.mark.parametrize("shape", [pytest.param((1, 8), marks=pytest.mark.slow), (2, 4),
                                   pytest.param((8, 1), marks=pytest.mark.slow)])
def test_sharded_step_matches_unsharded(shape):
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(shape), ("data", "model"))
  p = {"k": {"kernel": f32(np.random.default_rng(0).normal(size=(32, 16)))}}
  tx = trp.trp(optax.sgd(0.1, momentum=0.9), every=2, energy=0.8, nuclear=1e-3)

  def run(p):
    s = tx.init(p)
    step = jax.jit(lambda p, s: (lambda u, s: (optax.apply_updates(p, u), s))(
        *tx.update(jax.tree.map(lambda a: 0.01 * a, p), s, p)))
    for _ in range(4):
      p, s = step(p, s)
    return p

  ref = run(p)
  sharding = NamedSharding(mesh, P("data", "model"))
  sp = jax.device_put(p, sharding)
  got = run(sp)
  chex.assert_trees_all_close(got, ref, rtol=1e-4, atol=1e-5)
  assert got["k"]["kernel"].sharding.is_equivalent_to(sharding, 2)


def test_randomized_projection_matches_exact_on_a_decaying_spectrum():
  rng = np.random.default_rng(3)
  p_, _ = np.linalg.qr(rng.normal(size=(64, 64)))
  q_, _ = np.linalg.qr(rng.normal(size=(48, 48)))
  w = f32((p_[:, :48] * 0.7 ** np.arange(48)) @ q_.T)
  params = {"k": {"kernel": w}}
  zeros = jax.tree.map(jnp.zeros_like, params)
  exact = trp.project(1, ranks.energy(0.95))
  rand = trp.project(1, ranks.energy(0.95), method="randomized", key=jax.random.key(0), max_rank=16)
  ue, _ = exact.update(zeros, exact.init(params), params)
  ur, _ = rand.update(zeros, rand.init(params), params)
  np.testing.assert_allclose(ur["k"]["kernel"], ue["k"]["kernel"], atol=1e-4)
  with pytest.raises(ValueError, match="max_rank"):
    trp.project(1, method="randomized", key=jax.random.key(0))


def _decaying(m, n, seed, rate=0.85):
  rng = np.random.default_rng(seed)
  p_, _ = np.linalg.qr(rng.normal(size=(m, m)))
  q_, _ = np.linalg.qr(rng.normal(size=(n, n)))
  k = min(m, n)
  return (p_[:, :k] * rate ** np.arange(k)) @ q_[:, :k].T


@pytest.mark.parametrize("layout", [None, "conv_spatial"])
def test_warm_projection_tracks_the_exact_one_along_a_trajectory(layout):
  """Projections warm-started from the previous basis (one subspace iteration) stay within
  1.05x of the exact truncation's error while the weights drift, every projection."""
  shape = (96, 64) if layout is None else (3, 3, 16, 24)
  m, n = (96, 64) if layout is None else (48, 72)
  w0 = _decaying(m, n, 0)
  lay = jlr.Layout(layout or "dense", shape, 1)
  to_kernel = lambda a: jnp.asarray(lay.from_matrix(jnp.asarray(a, jnp.float32)))  # noqa: E731
  params = {"k": {"kernel": to_kernel(w0)}}
  rule = ranks.energy(0.9)
  exact = trp.project(1, rule, layout=layout)
  warm = trp.project(1, rule, layout=layout, method="warm", max_rank=24, n_iter=0)
  state = warm.init(params)
  chex.assert_shape(state.bases["k/kernel"], (n, 34))
  exact_update, warm_update = jax.jit(exact.update), jax.jit(warm.update)
  rng = np.random.default_rng(1)
  for t in range(4):  # each round: a small optimizer-like step, then project
    step = {"k": {"kernel": to_kernel(0.02 * rng.normal(size=(m, n)) * np.abs(w0).mean())}}
    ue, _ = exact_update(step, exact.init(params), params)
    uw, state = warm_update(step, state, params)
    target = np.asarray(lay.to_matrix(params["k"]["kernel"] + step["k"]["kernel"]), np.float64)
    err = lambda u: np.linalg.norm(  # noqa: E731
        target - np.asarray(lay.to_matrix(params["k"]["kernel"] + u["k"]["kernel"]), np.float64))
    assert err(uw) <= 1.05 * err(ue) + 1e-6, (t, err(uw), err(ue))
    params = optax.apply_updates(params, uw)
  assert int(state.count) == 4
  with pytest.raises(ValueError, match="max_rank"):
    trp.project(1, method="warm")


def test_warm_projection_compiles_once_and_skips_off_schedule_steps():
  params = {"k": {"kernel": f32(_decaying(32, 24, 2))}}
  tx = optax.chain(optax.sgd(0.01), trp.project(3, ranks.energy(0.9), method="warm", max_rank=8))
  state = tx.init(params)
  step = jax.jit(lambda p, s, g: tx.update(g, s, p))
  g = jax.tree.map(jnp.ones_like, params)
  b0 = state[-1].bases["k/kernel"]
  for t in range(1, 4):
    u, state = step(params, state, g)
    if t < 3:  # off schedule: updates and the basis pass through
      np.testing.assert_allclose(u["k"]["kernel"], -0.01 * np.ones((32, 24)), rtol=1e-6)
      np.testing.assert_array_equal(state[-1].bases["k/kernel"], b0)
  assert not np.allclose(state[-1].bases["k/kernel"], b0) and step._cache_size() == 1


def test_chained_step_compiles_once_across_projection_and_plain_steps():
  tx = trp.trp(optax.sgd(0.05, momentum=0.9), every=3, energy=0.8, nuclear=1e-3)
  traces = []

  @jax.jit
  def step(p, s, g):
    traces.append(1)  # Python side effect: runs once per trace, never per call
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  p = params()
  s = tx.init(p)
  ranks_seen = []
  for t in range(1, 8):  # steps 3 and 6 project, the others do not
    p, s = step(p, s, grads(p, t))
    ranks_seen.append(np.linalg.matrix_rank(np.asarray(p["Dense_0"]["kernel"]), tol=1e-4))
  assert len(traces) == 1 and step._cache_size() == 1
  assert int(s.count) == 7  # one TRPChainState (nuclear on every step)
  # the projection did happen inside that single compiled function, on schedule only
  assert ranks_seen[2] < 16 and ranks_seen[5] < 16 and ranks_seen[0] == ranks_seen[1] == 16


@pytest.mark.parametrize("layout", [None, "conv_spatial"])
def test_nuclear_subgradient_equals_autodiff_of_the_nuclear_norm(layout):
  # where the singular values are distinct and nonzero, ||W||_* is differentiable and
  # its gradient is U V^T: compare against jax.grad of sum(svd(W).s), not against numpy
  p = params(4)
  name = "Conv_0" if layout else "Dense_0"
  w = p[name]["kernel"]
  lay, _ = jlr.layouts.infer("kernel", w.shape, jlr.layouts.Spec(kind=layout))
  s = np.linalg.svd(np.asarray(lay.to_matrix(w), np.float64), compute_uv=False)
  assert np.min(np.diff(-s)) > 1e-2 and s[-1] > 1e-2  # distinct, nonzero
  want = jax.grad(lambda k: jnp.sum(jnp.linalg.svd(lay.to_matrix(k), compute_uv=False)))(w)
  tx = trp.nuclear_norm(1.0, select=f"{name}/kernel", layout=layout)
  zeros = jax.tree.map(jnp.zeros_like, p)
  out, _ = tx.update(zeros, tx.init(p), p)
  np.testing.assert_allclose(out[name]["kernel"], want, rtol=1e-4, atol=1e-5)


def test_trp_lowers_energy_rank_and_decouples_with_less_loss_than_plain_training():
  # a 2-layer MLP on labels of a rank-3 teacher; same init, data and steps with and
  # without TRP. TRP ends at lower energy rank, and cutting both runs to the ranks TRP's
  # decoupling picks costs the TRP run (almost) nothing and the plain run clearly more.
  rng = np.random.default_rng(0)
  x = f32(rng.normal(size=(512, 16)))
  teacher = rng.normal(size=(16, 3)) @ rng.normal(size=(3, 8))
  y = jnp.asarray(np.argmax(np.asarray(x) @ teacher, -1), jnp.int32)
  r = np.random.default_rng(1)
  p0 = {"l1": {"kernel": f32(r.normal(size=(16, 32)) / 4),
               "bias": jnp.zeros(32)},
        "l2": {"kernel": f32(r.normal(size=(32, 8)) / np.sqrt(32)),
               "bias": jnp.zeros(8)}}

  def logits(p):
    k1, k2 = (p[n]["kernel"] for n in ("l1", "l2"))
    k1, k2 = (k.dense() if isinstance(k, jlr.LowRank) else k for k in (k1, k2))
    return jax.nn.relu(x @ k1 + p["l1"]["bias"]) @ k2 + p["l2"]["bias"]

  def accuracy(p):
    return float(jnp.mean(jnp.argmax(logits(p), -1) == y))

  def run(tx):
    p, s = p0, tx.init(p0)

    @jax.jit
    def step(p, s):
      g = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(logits(p), y).mean())(p)
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s

    for _ in range(300):
      p, s = step(p, s)
    return p

  sgd = optax.sgd(0.1, momentum=0.9)
  p_trp = run(trp.trp(sgd, every=10, energy=0.9, nuclear=1e-3))
  p_plain = run(sgd)

  def energy_ranks(p):
    return {r.path: r.rank for r in jlr.summary(p, ranks.energy(0.9)).rows}

  e_trp, e_plain = energy_ranks(p_trp), energy_ranks(p_plain)
  assert all(e_trp[k] <= e_plain[k] for k in e_trp) and sum(e_trp.values()) < sum(e_plain.values())
  decoupled = trp.decouple(p_trp, ranks.value(0.05))
  kept = {r.path: r.rank for r in jlr.summary(decoupled).rows if r.rank is not None}
  assert set(kept) == {"l1/kernel", "l2/kernel"} and all(k < 8 for k in kept.values())
  cut_plain = jlr.factorize(p_plain, {k: ranks.fixed(v) for k, v in kept.items()})
  loss_trp = accuracy(p_trp) - accuracy(decoupled)
  loss_plain = accuracy(p_plain) - accuracy(cut_plain)
  assert accuracy(p_trp) > 0.95 and accuracy(p_plain) > 0.95  # both learned the task
  assert loss_trp <= 0.005 and loss_plain > loss_trp + 0.02


def test_trp_with_a_budget_rule_and_warm_projections():
  """``trp(rank=ratio)`` holds the budget's rank after every projection; the warm method
  lands on the same point as the exact one (within the 1.05 error bound)."""
  w = f32(_decaying(32, 24, 4, rate=0.95))
  params = {"k": {"kernel": w}}
  g = {"k": {"kernel": f32(np.random.default_rng(0).normal(size=(32, 24)) * 1e-2)}}
  for kw in ({}, dict(method="warm", max_rank=12, n_iter=1)):
    tx = trp.trp(optax.sgd(0.1), every=1, rank=ranks.ratio(0.25, min_rank=1), nuclear=1e-3, **kw)
    u, _ = tx.update(g, tx.init(params), params)
    new = np.asarray(optax.apply_updates(params, u)["k"]["kernel"])
    assert np.linalg.matrix_rank(new, tol=1e-5) == 3  # floor(0.25 * 32 * 24 / 56)


def test_warm_nuclear_subgradient_equals_the_exact_truncated_one():
  """nuclear_norm(method='warm') adds the same U_k V_k^T as the exact SVD on a matrix
  near the one its basis came from; trp(method='warm') then has no exact SVD in the step."""
  w0 = _decaying(40, 30, 5)
  params = {"k": {"kernel": f32(w0)}}
  rule = ranks.energy(0.8)
  exact = trp.nuclear_norm(0.5, every=1, rank=rule)
  warm = trp.nuclear_norm(0.5, every=1, rank=rule, method="warm", max_rank=12)
  state = warm.init(params)
  noise = f32(np.random.default_rng(2).normal(size=(40, 30)))
  moved = {"k": {"kernel": params["k"]["kernel"] + 1e-3 * noise}}
  zeros = jax.tree.map(jnp.zeros_like, moved)
  ge, _ = exact.update(zeros, exact.init(moved), moved)
  gw, state = warm.update(zeros, state, moved)
  np.testing.assert_allclose(gw["k"]["kernel"], ge["k"]["kernel"], atol=2e-3)
  tx = trp.trp(optax.sgd(0.1), every=2, energy=0.8, nuclear=1e-3, method="warm", max_rank=12)
  st = tx.init(params)
  assert isinstance(st, trp.WarmTRPChainState)
  step = jax.jit(lambda p, s, g: tx.update(g, s, p))
  for _ in range(2):
    u, st = step(params, st, zeros)
    params = optax.apply_updates(params, u)
  assert np.linalg.matrix_rank(np.asarray(params["k"]["kernel"]), tol=1e-4) < 30
  with pytest.raises(ValueError, match="rank="):
    trp.nuclear_norm(0.5, method="warm", max_rank=4)


@pytest.mark.parametrize("method", ["warm", "svd"])
def test_trp_with_nuclear_follows_the_exact_numpy_recursion(method):
  """trp(nuclear) -- one transform, the sub-gradient of the last projected point added on
  every step -- against the recursion in numpy with exact SVDs: ``g += lam U_k V_k^T``
  on every step, with ``U_k V_k^T`` from the initial weights (the rule's ``k``) until the
  first projection and from the projected point (all its ``k`` components) after each,
  ``W <- W - lr g``, and ``W <- D(W)`` after steps m - 1, 2m - 1, ..."""
  m_, n_, every, lr, lam, energy = 40, 30, 3, 0.1, 0.05, 0.8
  w0 = _decaying(m_, n_, 7)
  grads = np.random.default_rng(3).normal(size=(4 * every, m_, n_)) * 1e-2

  def energy_k(s):
    frac = np.cumsum(s ** 2) / np.sum(s ** 2)
    return int((frac < energy - 1e-9).sum()) + 1

  w = w0.astype(np.float64)
  u, s, vt = np.linalg.svd(w, full_matrices=False)
  k = energy_k(s)
  sub = u[:, :k] @ vt[:k]
  for t, g in enumerate(grads):
    w = w - lr * (g + lam * sub)
    if (t + 1) % every == 0:
      u, s, vt = np.linalg.svd(w, full_matrices=False)
      k = energy_k(s)
      w = (u[:, :k] * s[:k]) @ vt[:k]
      sub = u[:, :k] @ vt[:k]

  # two subspace rounds per projection, so what is compared is the recursion, not the
  # one-round warm start's approximation (1e-4 here; its own bound is tested above)
  kw = dict(method="warm", max_rank=12, n_iter=2) if method == "warm" else {}
  tx = trp.trp(optax.sgd(lr), every=every, energy=energy, nuclear=lam, **kw)
  params = {"k": {"kernel": f32(w0)}}
  state = tx.init(params)
  step = jax.jit(lambda p, s, g: tx.update(g, s, p))
  for g in grads:
    u, state = step(params, state, {"k": {"kernel": f32(g)}})
    params = optax.apply_updates(params, u)
  got = np.asarray(params["k"]["kernel"], np.float64)
  chex.assert_shape(params["k"]["kernel"], (m_, n_))
  assert np.linalg.norm(got - w) <= 1e-4 * np.linalg.norm(w)
  # the nuclear term acted: without it the same recursion lands elsewhere
  no_nuc = trp.trp(optax.sgd(lr), every=every, energy=energy, **kw)
  p2, s2 = {"k": {"kernel": f32(w0)}}, None
  s2 = no_nuc.init(p2)
  step2 = jax.jit(lambda p, s, g: no_nuc.update(g, s, p))  # one compile, not op by op
  for g in grads:
    u, s2 = step2(p2, s2, {"k": {"kernel": f32(g)}})
    p2 = optax.apply_updates(p2, u)
  assert np.linalg.norm(np.asarray(p2["k"]["kernel"]) - w) > 100 * np.linalg.norm(got - w)


@pytest.mark.parametrize("method", ["warm", "svd"])
def test_projection_step_equals_the_optax_projection(method):
  """The host-scheduled projection after steps 3 and 6 lands where ``project(3)`` inside
  the optimizer does: the same params after six SGD steps, of lower rank."""
  p0 = params(1)
  rule = ranks.energy(0.8)
  kw = dict(method=method, max_rank=6) if method == "warm" else dict(method=method)
  tx = optax.chain(optax.sgd(0.05), trp.project(3, rule, **kw))
  proj = trp.projection(rule, **kw)
  sgd = optax.sgd(0.05)
  pa, sa = p0, tx.init(p0)
  pb, sb, pstate = p0, sgd.init(p0), proj.init(p0)
  apply = jax.jit(proj.apply)
  for t in range(6):
    g = grads(p0, 10 + t)
    u, sa = jax.jit(tx.update)(g, sa, pa)
    pa = optax.apply_updates(pa, u)
    u, sb = sgd.update(g, sb, pb)
    pb = optax.apply_updates(pb, u)
    if (t + 1) % 3 == 0:
      pb, pstate = apply(pb, pstate)
  chex.assert_trees_all_close(pa, pb, atol=2e-5, rtol=2e-5)
  mats = [np.asarray(pb["Dense_0"]["kernel"]), np.asarray(pb["Conv_0"]["kernel"]).reshape(-1, 8)]
  assert all(np.linalg.matrix_rank(m, tol=1e-4) < min(m.shape) for m in mats)


def test_projection_shrink_thresholds_the_kept_singular_values():
  """``shrink`` is the nuclear norm's proximal step on the kept components: against numpy,
  ``U_k max(S_k - shrink, 0) V_k^T``."""
  rng = np.random.default_rng(4)
  w = rng.normal(size=(30, 20))
  proj = trp.projection(ranks.fixed(6), method="svd", shrink=0.8)
  out, _ = proj.apply({"Dense_0": {"kernel": f32(w)}}, proj.init(None))
  u, s, vt = np.linalg.svd(w, full_matrices=False)
  s = np.maximum(s[:6] - 0.8, 0.0)
  np.testing.assert_allclose(out["Dense_0"]["kernel"], (u[:, :6] * s) @ vt[:6], atol=2e-5)
  with pytest.raises(ValueError, match="max_rank"):
    trp.projection(ranks.energy(0.9))
  with pytest.raises(ValueError, match="'warm' or 'svd'"):
    trp.projection(method="randomized", max_rank=4)
  with pytest.raises(ValueError, match="shrink"):
    trp.projection(method="svd", shrink=-1.0)


def _energy_rank(w, energy=0.9):
  s = np.linalg.svd(np.asarray(w, np.float64), compute_uv=False)
  return int(np.searchsorted(np.cumsum(s ** 2) / np.sum(s ** 2), energy - 1e-12) + 1)


def test_the_nuclear_norm_on_every_step_lowers_the_energy_rank():
  """TRP's regularizer changes the spectrum it trains: on a regression onto a full-rank
  map with a slowly decaying spectrum, the kernel trained with ``nuclear`` (every step,
  from the projected factors) ends at a lower energy rank (e = 0.9, exact SVD) than the
  same run without it, and its discarded tail holds less energy."""
  rng = np.random.default_rng(1)
  q1, _ = np.linalg.qr(rng.normal(size=(24, 16)))
  q2, _ = np.linalg.qr(rng.normal(size=(16, 16)))
  a = (q1 * np.linspace(1.0, 0.3, 16)) @ q2.T
  x = f32(rng.normal(size=(512, 24)))
  y = x @ f32(a)
  w0 = f32(rng.normal(size=(24, 16)) * 0.1)

  def train(nuclear, on="every_step"):
    p = {"lin": {"kernel": w0}}
    tx = trp.trp(optax.sgd(0.05, momentum=0.9), every=10, energy=0.9, nuclear=nuclear,
                 nuclear_on=on)
    state = tx.init(p)

    @jax.jit
    def step(p, state):
      g = jax.grad(lambda p: jnp.mean(jnp.sum((x @ p["lin"]["kernel"] - y) ** 2, -1)))(p)
      u, state = tx.update(g, state, p)
      return optax.apply_updates(p, u), state

    for _ in range(200):
      p, state = step(p, state)
    return p["lin"]["kernel"]

  plain, regularized = _energy_rank(train(0.0)), _energy_rank(train(0.4))
  after_projections = _energy_rank(train(0.4, on="projection"))
  assert regularized <= plain - 2, (regularized, plain)
  # the same strength applied only on the step after each projection (1 step in 10, the
  # old setting) moves the spectrum less
  assert regularized < after_projections, (regularized, after_projections, plain)
