"""Numerical edge cases: zero, rank-deficient and very ill-conditioned kernels, bf16 end
to end. Nothing may produce NaN/Inf; optimality holds to float32 accuracy."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlr
from jlr import lod, ranks, trp
from conftest import f32, init, normal


def _finite(tree):
  for x in jax.tree.leaves(tree):
    assert np.isfinite(np.asarray(x, np.float32)).all()


def _ill_conditioned(m, n, cond, seed=0):
  rng = np.random.default_rng(seed)
  p, _ = np.linalg.qr(rng.normal(size=(m, m)))
  q, _ = np.linalg.qr(rng.normal(size=(n, n)))
  k = min(m, n)
  s = np.logspace(0, -np.log10(cond), k)
  return (p[:, :k] * s) @ q[:, :k].T, s


@pytest.mark.parametrize("kind", ["zeros", "rank1", "rank_deficient"])
def test_degenerate_kernels_stay_finite_everywhere(kind):
  rng = np.random.default_rng(0)
  if kind == "zeros":
    w = np.zeros((24, 16))
  elif kind == "rank1":
    w = np.outer(rng.normal(size=24), rng.normal(size=16))
  else:
    w = rng.normal(size=(24, 3)) @ rng.normal(size=(3, 16))
  params = {"d": {"kernel": f32(w)}}
  for rule in (ranks.fixed(4), ranks.energy(0.99), ranks.value(1e-3), ranks.budget(0.5)):
    f = jlr.factorize(params, rule, select="kernel")
    _finite(f)
    np.testing.assert_allclose(np.asarray(jlr.merge(f)["d"]["kernel"]), w, atol=1e-4)
  full = lod.init(params)
  _finite(jlr.truncate(full, 2))
  _finite(lod.shrink(full, 1e-3))
  g = jax.grad(lod.group_lasso)(full)
  _finite(g)
  _finite(lod.importance(full["d"]["kernel"]))
  tx = trp.trp(optax.sgd(0.1), every=1, energy=0.9, nuclear=1e-3)
  upd, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  _finite(upd)


@pytest.mark.parametrize("cond", [1e4, 1e8, 1e12])
def test_ill_conditioned_kernels_are_truncated_optimally(cond):
  w, s = _ill_conditioned(64, 48, cond)
  for r in (4, 16, 40):
    f = jlr.factorize({"kernel": f32(w)}, r, select="kernel")["kernel"]
    err = np.linalg.norm(w - np.asarray(f.u, np.float64) @ np.asarray(f.v, np.float64))
    opt = np.sqrt((s[r:] ** 2).sum())
    # float32 SVD: error within the optimum plus float32 round-off of ||W||
    assert err <= opt * 1.01 + 1e-5 * np.linalg.norm(w)
    t = jlr.truncate({"kernel": f}, r // 2)["kernel"]
    err_t = np.linalg.norm(w - np.asarray(t.u, np.float64) @ np.asarray(t.v, np.float64))
    assert err_t <= np.sqrt((s[r // 2:] ** 2).sum()) * 1.01 + 1e-5 * np.linalg.norm(w)


@pytest.mark.slow  # heavy (default run <= ~3 min): make test-slow
def test_bf16_end_to_end_factorize_truncate_lod_trp():
  import flax.linen as nn
  import jlr.flax

  model = nn.Sequential([nn.Dense(64), nn.relu, nn.Dense(32)])
  x = normal((8, 48), jnp.bfloat16)
  variables = jax.tree.map(lambda a: a.astype(jnp.bfloat16), init(model, x, seed=0))
  f = jlr.factorize(variables, ranks.ratio(0.5))
  chex.assert_trees_all_equal_dtypes(jlr.merge(f), variables)
  y = jlr.flax.apply(model, jlr.truncate(f, 8), x)
  chex.assert_type(y, jnp.bfloat16)
  _finite(y)
  full = lod.init(variables)
  sub = lod.sample(full, jax.random.key(2))
  y = jlr.flax.apply(model, sub, x)
  chex.assert_type(y, jnp.bfloat16)
  _finite(y)
  dense_ref = model.apply(variables, x).astype(jnp.float32)
  np.testing.assert_allclose(np.asarray(jlr.flax.apply(model, full, x), np.float32),
                             np.asarray(dense_ref), rtol=0.1, atol=0.1)
  tx = trp.trp(optax.sgd(0.1), every=1, energy=0.9, nuclear=3e-4)
  grads = jax.grad(lambda v: jnp.sum(model.apply(v, x).astype(jnp.float32) ** 2))(variables)
  upd, _ = jax.jit(tx.update)(grads, tx.init(variables), variables)
  chex.assert_trees_all_equal_dtypes(upd, variables)
  _finite(upd)
