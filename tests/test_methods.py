"""TRP and LoD in one shape (jlr.methods.Method): the README loop runs both; LoD's host
step shrinks by threshold and slices the optimizer state; its final budget projection
against a global sort of importance per parameter; the group lasso update against
jax.grad."""

import pathlib
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlr
import jlr.flax
from jlr import lod
from conftest import dense_apply, f32


def test_readme_loop_trains_either_method():
  text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
  code = re.search(r"\*\*One loop, either method\.\*\*.*?```python\n(.*?)```", text, re.S).group(1)
  ns: dict = {}
  exec(compile(code, "README.md (One loop, either method)", "exec"), ns)
  model, x, variables = ns["model"], ns["x"], ns["variables"]
  dense = jlr.summary(variables).total_params
  for small in (ns["small_trp"], ns["small_lod"]):
    leaves = [f for f in jax.tree.leaves(small, is_leaf=jlr.is_lowrank) if jlr.is_lowrank(f)]
    assert leaves and jlr.summary(small).total_params < dense
    np.testing.assert_allclose(jax.jit(lambda s, x: jlr.flax.apply(model, s, x))(small, x),
                               dense_apply(model, small, x), rtol=1e-4, atol=1e-4)


def _factors(seed=0):
  rng = np.random.default_rng(seed)
  lay = jlr.Layout("dense", (12, 8))
  scale = 0.7 ** np.arange(8)
  return {"a": jlr.LowRank(f32(rng.normal(size=(12, 8)) * scale),
                           f32(rng.normal(size=(8, 8))), lay),
          "b": jlr.LowRank(f32(rng.normal(size=(12, 8)) * 0.3 ** np.arange(8)),
                           f32(rng.normal(size=(8, 8))), lay)}


def test_between_shrinks_by_threshold_on_schedule_and_slices_the_optimizer_state():
  m = lod.method(lam=0.0, eps=0.05, interval=5)
  params = _factors()
  tx = m.tx(optax.adam(1e-3))
  opt_state = tx.init(params)
  same = m.between(3, params, opt_state, tx)  # off schedule: unchanged
  assert same[0] is params and same[1] is opt_state
  new, new_state = m.between(4, params, opt_state, tx)
  want = lod.shrink(params, 0.05)
  assert [new[k].rank for k in "ab"] == [want[k].rank for k in "ab"]
  assert new["a"].rank != new["b"].rank  # one threshold, a rank per layer
  mu = new_state[0].mu
  chex.assert_shape([mu["a"].u, mu["b"].v], [new["a"].u.shape, new["b"].v.shape])


def test_final_budget_projection_drops_the_least_important_component_per_parameter():
  params = _factors(1)
  budget = 100
  out = lod.to_budget(params, budget)
  assert lod.kernel_params(out) <= budget
  # independent: sort every component by importance / (m + n) and drop from the bottom
  comps = sorted((float(lod.importance(f)[j]) / 20, k, j) for k, f in params.items()
                 for j in range(1, f.rank))
  total, keep = 2 * 8 * 20, {"a": 8, "b": 8}
  for _, k, j in comps:
    if total <= budget:
      break
    keep[k] -= 1
    total -= 20
  assert {k: out[k].rank for k in "ab"} == keep
  np.testing.assert_array_equal(out["a"].u, params["a"].u[:, :keep["a"]])


def test_group_lasso_gradient_is_the_regularizer_gradient():
  params = _factors(2)
  grads = jax.tree.map(jnp.zeros_like, params)
  tx = lod.group_lasso_gradient(0.3)
  got, _ = tx.update(grads, tx.init(params), params)
  want = jax.grad(lambda p: 0.3 * lod.group_lasso(p))(params)
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)
