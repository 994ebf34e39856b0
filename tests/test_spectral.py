"""Khodak et al. (ICLR 2021): spectral init and Frobenius decay, against closed forms."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlr
from jlr.methods import spectral
from conftest import f32


def _params():
  rng = np.random.default_rng(0)
  return {"a": {"kernel": f32(rng.normal(size=(12, 9)))},
          "s": {"kernel": f32(rng.normal(size=(3, 16, 12)))},  # stacked
          "b": {"bias": jnp.ones((9,))}}


def test_frobenius_decay_is_the_gradient_of_half_the_squared_norm_of_the_product():
  params = jlr.factorize(_params(), 4, layout={"s/kernel": jlr.layouts.Spec(batch_ndim=1)})
  zeros = jax.tree.map(jnp.zeros_like, params)
  tx = spectral.frobenius_decay(0.3)
  upd, _ = jax.jit(tx.update)(zeros, tx.init(params), params)

  def penalty(p):  # the independent truth: 0.15 * ||u v||_F^2 of every factored kernel
    return 0.15 * sum(jnp.sum((f.u @ f.v) ** 2) for f in (p["a"]["kernel"], p["s"]["kernel"]))
  want = jax.grad(penalty)(params)
  for k in ("a", "s"):
    chex.assert_trees_all_close(upd[k]["kernel"].u, want[k]["kernel"].u, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(upd[k]["kernel"].v, want[k]["kernel"].v, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_equal(upd["b"]["bias"], zeros["b"]["bias"])  # dense leaves untouched


def test_frobenius_decay_differs_from_weight_decay_on_the_factors():
  """Weight decay on the factors penalizes ||u||^2 + ||v||^2 (at a balanced point, the
  nuclear norm of u v); Frobenius decay's update is (u v) v^T and u^T (u v)."""
  params = jlr.factorize(_params(), 4)
  f = params["a"]["kernel"]
  zeros = jax.tree.map(jnp.zeros_like, params)
  fro, _ = spectral.frobenius_decay(1.0).update(zeros, None, params)
  l2, _ = optax.add_decayed_weights(1.0).update(zeros, None, params)
  w = np.asarray(f.u @ f.v, np.float64)
  np.testing.assert_allclose(fro["a"]["kernel"].u, w @ np.asarray(f.v).T, rtol=1e-5)
  np.testing.assert_allclose(fro["a"]["kernel"].v, np.asarray(f.u).T @ w, rtol=1e-5)
  assert not np.allclose(fro["a"]["kernel"].u, l2["a"]["kernel"].u)


def test_spectral_method_starts_at_the_truncated_svd_and_trains_the_factors():
  params = _params()
  m = spectral.method(3, weight_decay=1e-3, layout={"s/kernel": jlr.layouts.Spec(batch_ndim=1)})
  p = m.init(params)
  w = np.asarray(params["a"]["kernel"], np.float64)
  u, s, vt = np.linalg.svd(w, full_matrices=False)
  np.testing.assert_allclose(jlr.merge(p)["a"]["kernel"], (u[:, :3] * s[:3]) @ vt[:3], atol=1e-5)
  f = p["a"]["kernel"]
  np.testing.assert_allclose(np.linalg.norm(f.u, axis=0), np.linalg.norm(f.v, axis=1), rtol=1e-5)
  tx = m.tx(optax.sgd(1e-3))
  x = jnp.ones((5, 12))
  loss = lambda q: jnp.sum(jlr.factorized(lambda t, x: x @ t["a"]["kernel"])(q, x) ** 2)  # noqa: E731
  state = tx.init(p)
  before = loss(p)
  for _ in range(3):
    upd, state = tx.update(jax.grad(loss)(p), state, p)
    p = optax.apply_updates(p, upd)
  assert loss(p) < before
  chex.assert_shape(p["a"]["kernel"].u, (12, 3))
