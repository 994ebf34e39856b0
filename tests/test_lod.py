import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlr
import jlr.flax
from conftest import f32, init, normal
from jlr import lod


def rnd(shape, seed=0):
  return normal(shape, seed=seed)


def two_layers():
  return {"a": {"kernel": rnd((12, 8), 0), "bias": rnd((8,), 1)}, "b": {"kernel": rnd((8, 4), 2)}}


def test_init_is_exact_full_rank_and_balanced():
  p = two_layers()
  f = lod.init(p)
  a = f["a"]["kernel"]
  assert a.rank == 8 and f["b"]["kernel"].rank == 4
  np.testing.assert_allclose(a.dense(), p["a"]["kernel"], atol=1e-5)
  s = np.linalg.svd(np.asarray(p["a"]["kernel"]), compute_uv=False)
  np.testing.assert_allclose(np.linalg.norm(a.u, axis=0), np.sqrt(s), rtol=1e-4)  # u = P sqrt(S)
  np.testing.assert_allclose(np.linalg.norm(a.v, axis=1), np.sqrt(s), rtol=1e-4)  # v = sqrt(S) Q^T


def test_layer_sampler_distribution_chi_square():
  f = lod.init(two_layers())  # ranks 8 and 4
  keys = jax.random.split(jax.random.key(0), 6000)
  draws = jax.jit(jax.vmap(lambda k: lod.sample_ranks(f, k)))(keys)
  a, b = np.asarray(draws["a/kernel"]), np.asarray(draws["b/kernel"])
  assert not ((a < 8) & (b < 4)).any()  # one layer at a time
  # P(layer i, rank b) = r_i / sum r * 1 / r_i = 1/12 for each of the 12 (layer, b) cells;
  # the two "full rank" cells (a at 8, b at 4) look alike, so they are pooled.
  counts = np.array([((a == k) & (b == 4)).sum() for k in range(1, 8)] +
                    [((b == k) & (a == 8)).sum() for k in range(1, 4)] +
                    [((a == 8) & (b == 4)).sum()])
  expected = len(keys) * np.array([1 / 12] * 10 + [2 / 12])
  chi2 = ((counts - expected) ** 2 / expected).sum()
  assert chi2 < 23.2  # chi-square, 10 dof, p = 0.01


def test_independent_and_fixed_samplers():
  f = lod.init(two_layers())
  keys = jax.random.split(jax.random.key(1), 4000)
  draws = jax.vmap(lambda k: lod.sample_ranks(f, k, sampler="independent"))(keys)
  for path, r in (("a/kernel", 8), ("b/kernel", 4)):
    counts = np.bincount(np.asarray(draws[path]) - 1, minlength=r)
    assert counts.shape == (r,)
    np.testing.assert_allclose(counts / len(keys), 1 / r, atol=0.03)
  fixed = lod.sample_ranks(f, keys[0], sampler="fixed", fraction=0.3)
  assert int(fixed["a/kernel"]) == 3 and int(fixed["b/kernel"]) == 2
  with pytest.raises(ValueError):
    lod.sample_ranks(f, keys[0], sampler="nope")


def test_sample_zeroes_exactly_the_tail():
  """The masked sub-network equals the extracted prefix model in value and in gradients
  (one factor is masked: the dropped components' gradients vanish on both factors)."""
  f = lod.init(two_layers())
  sub = lod.with_ranks(f, {"a/kernel": 3})
  a, fa = sub["a"]["kernel"], f["a"]["kernel"]
  prefix = lod.extract(f, ranks={"a/kernel": 3})["a"]["kernel"]
  np.testing.assert_allclose(a.dense(), prefix.dense(), atol=1e-6)
  tail_u, tail_v = np.asarray(a.u[:, 3:]), np.asarray(a.v[3:])
  assert not tail_u.any() or not tail_v.any()  # at least one factor's tail is zero
  assert sub["b"]["kernel"] is f["b"]["kernel"]
  x = rnd((7, fa.u.shape[0]), 5)
  loss = lambda p: jnp.sum(jnp.tanh(x @ lod.with_ranks(p, {"a/kernel": 3})["a"]["kernel"].dense()))  # noqa: E731
  g = jax.grad(loss)(f)["a"]["kernel"]
  np.testing.assert_array_equal(g.u[:, 3:], 0)
  np.testing.assert_array_equal(g.v[3:], 0)
  both = lambda p: jnp.sum(jnp.tanh(x @ (p.u[:, :3] @ p.v[:3])))  # noqa: E731
  gb = jax.grad(both)(fa)
  np.testing.assert_allclose(g.u, gb.u, atol=1e-5)
  np.testing.assert_allclose(g.v, gb.v, atol=1e-5)


def test_group_lasso_closed_form_and_nan_safe_at_zero():
  u, v = rnd((5, 3), 1), rnd((3, 4), 2)
  f = {"k": jlr.LowRank(u, v, jlr.Layout("dense", (5, 4)))}
  un, vn = np.asarray(u), np.asarray(v)
  want = sum(np.linalg.norm(vn[j:]) + np.linalg.norm(un[:, j:]) for j in range(3))
  np.testing.assert_allclose(jax.jit(lod.group_lasso)(f), want, rtol=1e-5)
  zero = normal((5, 3), scale=0), normal((3, 4), scale=0)
  z = {"k": jlr.LowRank(*zero, jlr.Layout("dense", (5, 4)))}
  g = jax.jit(jax.grad(lod.group_lasso))(z)
  assert np.isfinite(np.asarray(g["k"].u)).all() and np.isfinite(np.asarray(g["k"].v)).all()


@pytest.mark.parametrize("shape", [(1,), (31,), (32,), (70,), (3, 100)])
def test_group_lasso_and_importance_match_numpy_tail_norms_at_block_edges(shape):
  # the suffix sums are blocked (32 wide): ranks below, at and across block edges,
  # and stacked (batched) factors, against numpy's norms of every tail
  *batch, r = shape
  u, v = rnd((*batch, 6, r), 3), rnd((*batch, r, 5), 4)
  f = jlr.LowRank(u, v, jlr.Layout("dense", (6, 5)))
  un, vn = np.asarray(u, np.float64), np.asarray(v, np.float64)
  tu = np.stack([np.linalg.norm(un[..., :, j:], axis=(-2, -1)) for j in range(r)], -1)
  tv = np.stack([np.linalg.norm(vn[..., j:, :], axis=(-2, -1)) for j in range(r)], -1)
  imp, lasso = jax.jit(lambda f: (lod.importance(f), lod.group_lasso({"k": f})))(f)
  chex.assert_shape(imp, shape)
  np.testing.assert_allclose(imp, tu * tv, rtol=1e-5)
  np.testing.assert_allclose(lasso, (tu + tv).sum(), rtol=1e-5)


def _train(loss, params, steps, lr, key=jax.random.key(0)):
  tx = optax.adam(lr)

  @jax.jit
  def run(params, key):
    def body(carry, k):
      p, s = carry
      g = jax.grad(loss)(p, k)
      u, s = tx.update(g, s, p)
      return (optax.apply_updates(p, u), s), None
    (p, _), _ = jax.lax.scan(body, (params, tx.init(params)), jax.random.split(key, steps))
    return p

  return run(params, key)


def test_linear_svd_recovery_theorem():
  # y = x A with isotropic x (basis vectors): LoD recovers A's SVD in order.
  rng = np.random.default_rng(0)
  m, n, true_rank = 8, 6, 4
  p_, _ = np.linalg.qr(rng.normal(size=(m, m)))
  q_, _ = np.linalg.qr(rng.normal(size=(n, n)))
  sig = np.array([4.0, 3.0, 2.0, 1.0])
  a = (p_[:, :true_rank] * sig) @ q_[:, :true_rank].T
  init = {"w": jlr.LowRank(rnd((m, n), 3) * 0.3, rnd((n, n), 4) * 0.3, jlr.Layout("dense", (m, n)))}
  x = jnp.eye(m)
  y = f32(a)

  def loss(p, key):
    sub = lod.sample(p, key, sampler="layer")
    w = sub["w"]
    return jnp.sum((x @ w.u @ w.v - y) ** 2)

  f = _train(loss, init, 6000, 3e-3)["w"]
  norms = np.linalg.norm(f.u, axis=0) * np.linalg.norm(f.v, axis=1)
  np.testing.assert_allclose(norms[:true_rank], sig, rtol=0.05)
  assert (norms[true_rank:] < 0.05).all()  # surplus components vanish
  for k in range(true_rank):
    cos_u = abs(np.dot(f.u[:, k], p_[:, k])) / np.linalg.norm(f.u[:, k])
    cos_v = abs(np.dot(f.v[k], q_[:, k])) / np.linalg.norm(f.v[k])
    assert cos_u > 0.98 and cos_v > 0.98
  for k in range(1, n + 1):  # every prefix is the best rank-k approximation
    best = (p_[:, :min(k, 4)] * sig[:k]) @ q_[:, :min(k, 4)].T
    np.testing.assert_allclose(np.asarray(f.u[:, :k] @ f.v[:k]), best, atol=0.1)


def test_linear_autoencoder_keeps_exactly_the_data_rank():
  rng = np.random.default_rng(1)
  d = 10
  x = f32(rng.normal(size=(256, 3)) @ rng.normal(size=(3, d)))
  init = lod.init({"w": {"kernel": rnd((d, d), 5) * 0.3}})

  def loss(p, key):
    sub = lod.sample(p, key)
    w = sub["w"]["kernel"]
    return jnp.mean(jnp.sum((x @ w.u @ w.v - x) ** 2, -1)) + 0.02 * lod.group_lasso(p)

  f = _train(loss, init, 4000, 3e-3)["w"]["kernel"]
  imp = np.asarray(lod.importance(f))
  assert (imp[:3] > 0.3).all() and (imp[3:] < 0.05).all(), imp
  assert lod.shrink({"w": f}, 0.05)["w"].rank == 3


def test_shrink_keeps_a_prefix_within_its_eps_bound():
  f = lod.init({"k": {"kernel": rnd((20, 12), 7) * f32(0.7 ** np.arange(12))}})
  eps = 0.5
  s = lod.shrink(f, eps)
  full, small = f["k"]["kernel"], s["k"]["kernel"]
  k = small.rank
  assert 1 <= k < full.rank
  np.testing.assert_array_equal(small.u, full.u[:, :k])  # a prefix, not a re-fit
  assert np.linalg.norm(np.asarray(full.dense() - small.dense())) <= eps
  # loss of the full model grows by at most ||X||_2 * eps (triangle inequality)
  x = rnd((64, 20), 8)
  y = rnd((64, 12), 9)
  loss = lambda w: float(jnp.linalg.norm(x @ w - y))  # noqa: E731
  assert loss(small.dense()) <= loss(full.dense()) + np.linalg.norm(np.asarray(x), 2) * eps + 1e-5
  assert lod.shrink(f, eps, multiple=8)["k"]["kernel"].rank == 8


def test_optimizer_state_is_sliced_not_reset():
  f = lod.init(two_layers())
  tx = optax.adam(1e-2)
  state = jax.jit(tx.init)(f)
  g = jax.tree.map(lambda a: jnp.asarray(np.ones(a.shape, a.dtype), a.dtype), f)
  _, state = jax.jit(tx.update)(g, state, f)
  small = lod.extract(f, ranks={"a/kernel": 3})
  sliced = lod.slice_opt_state(tx, state, small)
  mu = sliced[0].mu["a"]["kernel"]
  chex.assert_shape([mu.u, mu.v], [(12, 3), (3, 8)])
  np.testing.assert_array_equal(mu.u, state[0].mu["a"]["kernel"].u[:, :3])
  assert int(sliced[0].count) == 1
  u, _ = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, small), sliced, small)  # usable as is
  chex.assert_trees_all_equal_shapes(u, small)


def test_extract_and_deploy():
  f = lod.init(two_layers())
  chex.assert_trees_all_equal(lod.extract(f, width=1.0), f)
  half = lod.extract(f, width=0.5)
  assert half["a"]["kernel"].rank == 4 and half["b"]["kernel"].rank == 2
  with pytest.raises(ValueError, match="a/kernel: rank 9"):
    lod.extract(f, ranks={"a/kernel": 9})
  d = lod.deploy(lod.extract(f, ranks={"a/kernel": 2}))
  assert isinstance(d["a"]["kernel"], jlr.LowRank)  # 2 * 20 < 96
  assert not isinstance(d["b"]["kernel"], jlr.LowRank)  # full rank 4 * 12 >= 32
  np.testing.assert_allclose(d["b"]["kernel"], two_layers()["b"]["kernel"], atol=1e-5)


def test_search_reaches_the_budget_greedily():
  rng = np.random.default_rng(2)
  w = (rng.normal(size=(16, 16)) * 0.8 ** np.arange(16)).astype(np.float32)
  w2 = (rng.normal(size=(16, 16)) * 0.5 ** np.arange(16)).astype(np.float32)
  f = lod.init({"a": {"kernel": jnp.asarray(w)}, "b": {"kernel": jnp.asarray(w2)}})
  x = rnd((32, 16), 3)
  target = x @ jnp.asarray(w) @ jnp.asarray(w2)
  score = lambda p: -float(jnp.mean((x @ p["a"]["kernel"].dense() @ p["b"]["kernel"].dense() - target) ** 2))  # noqa: E731
  out, hist = lod.search(f, score, params_budget=200, step=0.2)
  assert hist[-1][0] <= 200 and hist[0][0] > 200
  assert [c for c, _ in hist] == sorted([c for c, _ in hist], reverse=True)
  # the fast-decaying layer b is cut harder than a
  assert out["b"]["kernel"].rank <= out["a"]["kernel"].rank


def test_relative_shrink_keeps_a_prefix_within_its_relative_bound():
  f = lod.init({"k": {"kernel": rnd((20, 12), 7) * f32(0.7 ** np.arange(12))}})
  full = f["k"]["kernel"]
  scale = float(np.linalg.norm(np.asarray(full.u)) * np.linalg.norm(np.asarray(full.v)))
  eps = 0.1
  small = lod.shrink(f, eps, relative=True)["k"]["kernel"]
  assert 1 <= small.rank < full.rank
  np.testing.assert_array_equal(small.v, full.v[: small.rank])
  assert np.linalg.norm(np.asarray(full.dense() - small.dense())) <= eps * scale
  # scale invariance: the relative rule keeps the same rank for any rescaled kernel
  scaled = {"k": {"kernel": jlr.LowRank(full.u * 1e-3, full.v * 1e-3, full.layout)}}
  assert lod.shrink(scaled, eps, relative=True)["k"]["kernel"].rank == small.rank
  assert lod.shrink(scaled, eps * scale)["k"]["kernel"].rank == 1  # absolute eps: all gone
  # equals the absolute rule at eps * importance[0]
  assert lod.shrink(f, eps * float(lod.importance(full)[0]))["k"]["kernel"].rank == small.rank


def test_extract_at_full_width_is_the_trained_model():
  rng = np.random.default_rng(3)
  x = f32(rng.normal(size=(64, 12)))
  y = x @ f32(rng.normal(size=(12, 8)) * 0.5 ** np.arange(8))
  p = lod.init(two_layers())

  def loss(p, key):
    sub = lod.sample(p, key)
    h = x @ sub["a"]["kernel"].u @ sub["a"]["kernel"].v + sub["a"]["bias"]
    return jnp.mean((h - y) ** 2) + 1e-3 * lod.group_lasso(p)

  trained = lod.shrink(_train(loss, p, 300, 1e-2), 0.05)
  out = lod.extract(trained, width=1.0)
  chex.assert_trees_all_equal(out, trained)  # bit-identical factors, same ranks
  fwd = lambda q: np.asarray(x @ q["a"]["kernel"].u @ q["a"]["kernel"].v)  # noqa: E731
  np.testing.assert_array_equal(fwd(out), fwd(trained))
  # and the same function as its dense kernel
  np.testing.assert_allclose(fwd(out), np.asarray(x @ trained["a"]["kernel"].dense()), atol=1e-4)


# ----------------------------------------------------------------------------- fast path


class _Mixed(nn.Module):
  """Conv (channel and spatial layouts), DenseGeneral and Dense, one scan stack."""

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Conv(6, (3, 3), name="c1")(x))
    h = nn.relu(nn.Conv(8, (3, 3), name="c2")(h))
    h = nn.DenseGeneral((2, 5), name="dg")(h.reshape(h.shape[0], -1))
    h = h.reshape(h.shape[0], -1)

    class Block(nn.Module):
      @nn.compact
      def __call__(self, h, _):
        return h + nn.tanh(nn.Dense(10, name="fc")(h)), None

    h, _ = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                   length=2)()(h, None)
    return nn.Dense(3, name="out")(h)


def _mixed(x_shape=(4, 6, 6, 3)):
  model, x = _Mixed(), rnd(x_shape, 9)
  v = init(model, x)
  lay = dict(jlr.flax.layouts(model, v, x).items())
  lay["params/c2/kernel"] = jlr.Layout("conv_spatial", lay["params/c2/kernel"].shape)
  return model, x, lod.init(v, layout=lay)


# (4, 6, 6, 3): the conv masks go on the factors (smaller than the activations);
# (1, 2, 2, 3): on the r-channel activations; Dense / DenseGeneral: on x @ u
@pytest.mark.parametrize("x_shape", [(4, 6, 6, 3), (1, 2, 2, 3)])
def test_factorized_ranks_equals_masked_factors_values_and_grads(x_shape):
  """``jlr.factorized(fn, ranks=b)`` (mask where cheapest: the r-wide activation or a
  factor) computes what ``fn`` on ``lod.with_ranks(p, b)`` (mask on a factor) does, in
  values and gradients, and both equal the dense model at the extracted prefix factors
  (independent truth)."""
  model, x, v = _mixed(x_shape)
  f = v["params"]
  kinds = {p: x.layout.kind for p, x in lod._lowranks(f)}
  assert kinds["c2/kernel"] == "conv_spatial" and len(kinds) == 5, kinds
  ranks = {"c1/kernel": 2, "c2/kernel": 3, "dg/kernel": 4, "fc/kernel": 5, "out/kernel": 1}

  def fast(p, b):
    return jlr.factorized(model.apply, ranks=b)({"params": p}, x)

  def slow(p, b):  # with_ranks takes full paths
    return jlr.factorized(model.apply)({"params": lod.with_ranks(p, _full_paths(p, b))}, x)

  y_fast, y_slow = jax.jit(fast)(f, ranks), jax.jit(slow)(f, ranks)
  chex.assert_trees_all_close(y_fast, y_slow, atol=1e-5, rtol=1e-5)
  prefix = jlr.merge(lod.extract(f, ranks=_full_paths(f, ranks)))
  np.testing.assert_allclose(y_fast, jax.jit(model.apply)({"params": prefix}, x), atol=1e-4,
                             rtol=1e-4)

  loss = lambda fn: lambda p: jnp.sum(jnp.tanh(fn(p, ranks)))  # noqa: E731
  g_fast = jax.jit(jax.grad(loss(fast)))(f)
  g_slow = jax.jit(jax.grad(loss(slow)))(f)
  chex.assert_trees_all_equal_structs(g_fast, g_slow)
  chex.assert_trees_all_close(g_fast, g_slow, atol=1e-5, rtol=1e-5)
  grads = dict(lod._lowranks(g_fast))
  for p, b in _full_paths(f, ranks).items():
    k = grads[p]
    np.testing.assert_array_equal(np.asarray(k.u)[..., b:], 0)  # dropped: no gradient
    np.testing.assert_array_equal(np.asarray(k.v)[..., b:, :], 0)


def _full_paths(f, ranks):
  out = {}
  for p, _ in lod._lowranks(f):
    hit = [b for k, b in ranks.items() if p == k or p.endswith("/" + k)]
    if hit:
      out[p] = hit[0]
  return out


def test_factorized_ranks_traced_under_jit_and_sampled():
  model, x, v = _mixed()
  f = v["params"]

  @jax.jit
  def both(p, key):
    b = lod.sample_ranks(p, key, sampler="independent")
    return (jlr.factorized(model.apply, ranks=b)({"params": p}, x),
            jlr.factorized(model.apply)({"params": lod.with_ranks(p, b)}, x))

  for i in range(3):
    y_fast, y_slow = both(f, jax.random.key(i))
    chex.assert_shape(y_fast, (4, 3))
    np.testing.assert_allclose(y_fast, y_slow, atol=1e-5, rtol=1e-5)


def test_factorized_ranks_bad_keys_name_the_leaves():
  model, x, v = _mixed()
  with pytest.raises(ValueError, match="nope/kernel.*no LowRank"):
    jlr.factorized(model.apply, ranks={"nope/kernel": 1})(v, x)
  with pytest.raises(ValueError, match="'kernel'.*5 LowRank"):
    jlr.factorized(model.apply, ranks={"kernel": 1})(v, x)
  with pytest.raises(ValueError, match="params/c1/kernel has rank 6"):
    jlr.factorized(model.apply, ranks={"c1/kernel": 7})(v, x)
  dense = jlr.merge(v)  # ranks on a model with no LowRank leaf: not silently ignored
  with pytest.raises(ValueError, match="no LowRank leaves.*none"):
    jlr.factorized(model.apply, ranks={"c1/kernel": 1})(dense, x)


def test_threshold_shrinking_finds_a_rank_per_layer():
  """Maestro's progressive shrinking: one eps, each layer its own rank. Two layers trained
  together on data of rank 2 and rank 5 (linear autoencoders, ordered dropout + group
  lasso); ``shrink`` at an interval drops the components under eps, and the layers end
  at their data ranks -- different ranks from one threshold, not a uniform schedule."""
  rng = np.random.default_rng(2)
  d = 10
  xa = f32(rng.normal(size=(256, 2)) @ rng.normal(size=(2, d)))
  xb = f32(rng.normal(size=(256, 5)) @ rng.normal(size=(5, d)))
  p = lod.init({"a": {"kernel": rnd((d, d), 6) * 0.3}, "b": {"kernel": rnd((d, d), 7) * 0.3}})

  def loss(p, key):
    sub = lod.sample(p, key, sampler="independent")
    err = 0.0
    for name, x in (("a", xa), ("b", xb)):
      w = sub[name]["kernel"]
      err = err + jnp.mean(jnp.sum((x @ w.u @ w.v - x) ** 2, -1))
    return err + 0.02 * lod.group_lasso(p)

  for _ in range(4):  # train, shrink by threshold, repeat (optimizer state restarts here)
    p = lod.shrink(_train(loss, p, 1000, 3e-3), 0.05)
  assert (p["a"]["kernel"].rank, p["b"]["kernel"].rank) == (2, 5)
