"""Activation-whitened and Fisher-weighted factorization against closed forms."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlr
import jlr.flax
from jlr import ranks, stats
from jlr.flax import calibrate


def rnd(shape, seed=0):
  return np.random.default_rng(seed).normal(size=shape)


def best_weighted(w, gram, r):
  """Closed form: W' = G^{-1/2} (G^{1/2} W)_r minimizes ||X (W - W')||."""
  lam, e = np.linalg.eigh(gram)
  half = (e * np.sqrt(lam)) @ e.T
  p, s, vt = np.linalg.svd(half @ w)
  return np.linalg.solve(half, (p[:, :r] * s[:r]) @ vt[:r])


def test_whitened_factorization_minimizes_output_error():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(500, 20)) * np.linspace(0.1, 3.0, 20)  # anisotropic inputs
  w = rnd((20, 12), 1)
  g = stats.Gram(x.T @ x, 500)
  f = jlr.factorize({"k": jnp.asarray(w, jnp.float32)}, 4, select="k", stats={"k": g},
                    damping=1e-8)["k"]
  out_err = lambda w2: np.linalg.norm(x @ (w - w2))  # noqa: E731
  got = out_err(np.asarray(f.dense(), np.float64))
  np.testing.assert_allclose(got, out_err(best_weighted(w, x.T @ x, 4)), rtol=1e-3)
  plain = jlr.factorize({"k": jnp.asarray(w, jnp.float32)}, 4, select="k")["k"]
  assert got < 0.95 * out_err(np.asarray(plain.dense(), np.float64))


def test_rank_deficient_activations_do_not_break():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(50, 3)) @ rng.normal(size=(3, 16))  # X^T X has rank 3
  w = jnp.asarray(rnd((16, 8), 2), jnp.float32)
  f = jlr.factorize({"k": w}, 3, select="k", stats={"k": stats.Gram(x.T @ x, 50)})["k"]
  assert np.isfinite(np.asarray(f.u)).all() and np.isfinite(np.asarray(f.v)).all()
  # on the data, rank 3 is (nearly) lossless: the data only spans 3 directions
  rel = np.linalg.norm(x @ (np.asarray(w) - np.asarray(f.dense()))) / np.linalg.norm(x @ np.asarray(w))
  assert rel < 1e-2
  zero = stats.Gram(np.zeros((16, 16)), 1)
  f0 = jlr.factorize({"k": w}, 3, select="k", stats={"k": zero})["k"]
  assert np.isfinite(np.asarray(f0.dense())).all()


def test_fisher_weighted_is_row_weighted_optimal():
  w = rnd((10, 8), 3)
  weights = np.linspace(0.01, 5.0, 10)
  f = jlr.factorize({"k": jnp.asarray(w, jnp.float32)}, 3, select="k",
                    stats={"k": stats.RowWeights(weights, 1)}, damping=1e-8)["k"]
  d = np.sqrt(weights)[:, None]
  p, s, vt = np.linalg.svd(d * w)
  best = ((p[:, :3] * s[:3]) @ vt[:3]) / d
  np.testing.assert_allclose(np.asarray(f.dense()), best, atol=1e-3)


def test_fisher_from_gradients():
  params = {"d": {"kernel": jnp.asarray(rnd((6, 4), 4), jnp.float32)}}
  xs = [jnp.asarray(rnd((5, 6), s), jnp.float32) for s in range(3)]
  grad_fn = jax.jit(jax.grad(lambda p, x: jnp.sum((x @ p["d"]["kernel"]) ** 2)))
  got = stats.fisher(grad_fn, params, xs)["d/kernel"]
  want = sum((np.asarray(grad_fn(params, x)["d"]["kernel"], np.float64) ** 2).sum(1) for x in xs)
  np.testing.assert_allclose(got.weights, want, rtol=1e-5)
  assert got.count == 3


class Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=16)(x)
    h = nn.relu(nn.Dense(32)(h))
    return nn.Dense(16)(h)


def test_linen_activation_statistics_and_budget():
  model = Block()
  rng = np.random.default_rng(5)
  mix = rng.normal(size=(16, 16)) * np.linspace(0.05, 2, 16)
  batches = [jnp.asarray(rng.normal(size=(4, 6, 16)) @ mix, jnp.float32) for _ in range(3)]
  variables = model.init(jax.random.key(0), batches[0])
  st = calibrate.activations(model, variables, batches)
  assert set(st) == {"params/Dense_0/kernel", "params/Dense_1/kernel",
                     *(f"params/MultiHeadDotProductAttention_0/{n}/kernel"
                       for n in ("query", "key", "value", "out"))}
  xs = np.concatenate([np.asarray(b).reshape(-1, 16) for b in batches])
  np.testing.assert_allclose(st["params/Dense_0/kernel"].count, 72)
  np.testing.assert_allclose(st["params/MultiHeadDotProductAttention_0/query/kernel"].matrix,
                             xs.T @ xs, rtol=1e-4)
  held_out = jnp.asarray(rng.normal(size=(8, 6, 16)) @ mix, jnp.float32)
  ref = model.apply(variables, held_out)

  def err(factorized):
    return float(jnp.linalg.norm(jlr.flax.apply(model, factorized, held_out) - ref))

  for rule in (ranks.ratio(0.4), ranks.budget(0.4)):
    aware = jlr.factorize(variables, rule, stats=st)
    plain = jlr.factorize(variables, rule)
    assert err(aware) < err(plain)
  assert jlr.summary(jlr.factorize(variables, ranks.budget(0.4), stats=st)).total_params <= \
      jlr.summary(variables).total_params


def test_mismatched_statistics_name_the_path():
  w = jnp.asarray(rnd((8, 4), 0), jnp.float32)
  with pytest.raises(ValueError, match="k: calibration statistics of shape"):
    jlr.factorize({"k": w}, 2, select="k", stats={"k": stats.Gram(np.eye(4), 1)})
