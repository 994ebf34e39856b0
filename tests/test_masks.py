import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlr
from conftest import f32


def _params():
  rng = np.random.default_rng(0)
  dense = {"a": {"kernel": f32(rng.normal(size=(32, 16))),
                 "bias": jnp.ones(16)},
           "b": {"kernel": f32(rng.normal(size=(16, 4)))}}
  return jlr.factorize(dense, 4, select="a/kernel")


def test_multi_transform_trains_factors_only():
  params = _params()
  assert jlr.masks.labels(params) == {"a": {"kernel": "factors", "bias": "rest"},
                                      "b": {"kernel": "rest"}}
  tx = optax.multi_transform({"factors": optax.sgd(0.1), "rest": optax.set_to_zero()},
                             jlr.masks.labels(params))
  grads = jax.tree.map(jnp.ones_like, params)
  upd, _ = tx.update(grads, tx.init(params), params)
  new = optax.apply_updates(params, upd)
  f, g = params["a"]["kernel"], new["a"]["kernel"]
  np.testing.assert_allclose(g.u, f.u - 0.1)  # factors moved by -lr * grad
  np.testing.assert_allclose(g.v, f.v - 0.1)
  assert g.layout == f.layout
  np.testing.assert_array_equal(new["a"]["bias"], params["a"]["bias"])  # frozen
  np.testing.assert_array_equal(new["b"]["kernel"], params["b"]["kernel"])


def test_masked_weight_decay_on_factors():
  params = _params()
  tx = optax.masked(optax.add_decayed_weights(0.5), jlr.masks.factors(params))
  zeros = jax.tree.map(jnp.zeros_like, params)
  upd, _ = tx.update(zeros, tx.init(params), params)
  np.testing.assert_allclose(upd["a"]["kernel"].u, 0.5 * params["a"]["kernel"].u)
  np.testing.assert_array_equal(upd["a"]["bias"], 0.0)
  np.testing.assert_array_equal(upd["b"]["kernel"], 0.0)
