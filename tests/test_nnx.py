import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jlr
from jlr import ranks
from jlr.flax import nnx as jnnx
from jlr.paths import path_str


class Net(nnx.Module):
  def __init__(self, rngs):
    self.emb = nnx.Embed(50, 32, rngs=rngs)
    self.layers = nnx.List([nnx.Linear(32, 64, rngs=rngs), nnx.Linear(64, 48, rngs=rngs)])
    self.gen = nnx.LinearGeneral(48, (4, 8), rngs=rngs)
    self.conv = nnx.Conv(8, 16, (3, 3), strides=2, rngs=rngs)
    self.dw = nnx.Conv(16, 16, (3, 3), feature_group_count=16, rngs=rngs)
    self.norm = nnx.LayerNorm(16, rngs=rngs)

  def __call__(self, ids):
    h = self.emb(ids)
    for layer in self.layers:
      h = nnx.relu(layer(h))
    img = self.norm(self.dw(self.conv(self.gen(h))))
    return img, self.emb.attend(h[..., :32])


def dense_twin(model, compressed):
  """The original model with every factorized kernel replaced by merge(factors)."""
  ref = nnx.clone(model)
  merged = jlr.merge(jnnx.params(compressed))
  flat = {path_str(k): v for k, v in jax.tree_util.tree_flatten_with_path(merged)[0]}
  for path, module in jnnx._layers(ref).items():
    getattr(module, path.rsplit("/", 1)[-1]).set_value(flat[path])
  return ref


run = nnx.jit(lambda m, x: m(x))  # whole forwards, not op by op


def state_arrays(model):
  return jax.tree.map(np.asarray, nnx.state(model))


@pytest.mark.parametrize("layout", [None, {"conv": "conv_spatial"}])
def test_compress_matches_dense_forward_of_merged_kernels(layout):
  model = Net(nnx.Rngs(0))
  ids = jax.random.randint(jax.random.key(1), (2, 8), 0, 50)
  before = state_arrays(model)
  small = jnnx.compress(model, ranks.ratio(0.5), layout=layout)
  chex.assert_trees_all_equal(state_arrays(model), before)  # input untouched
  assert isinstance(model.layers[0], nnx.Linear)
  assert isinstance(small.layers[0], jnnx.LowRankLinear)
  assert isinstance(small.gen, jnnx.LowRankLinear)
  assert isinstance(small.conv, jnnx.LowRankConv) and isinstance(small.emb, jnnx.LowRankEmbed)
  assert isinstance(small.dw, nnx.Conv)  # grouped conv skipped by the default selection
  for got, want in zip(run(small, ids), run(dense_twin(model, small), ids)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(jnp.abs(want).max()))
  rep = jlr.summary(jnnx.params(small))
  assert rep.total_params < rep.dense_total_params
  assert {r.path for r in rep.rows if r.rank is not None} == {
      "emb/embedding", "layers/0/kernel", "layers/1/kernel", "gen/kernel", "conv/kernel"}


def test_plan_shows_cost_before_surgery():
  model = Net(nnx.Rngs(0))
  the_plan = jnnx.plan(model, ranks.ratio(0.25))
  small = jnnx.compress(model, the_plan)
  planned = jlr.summary(nnx.state(model, nnx.Param), the_plan)
  assert planned.total_params == jlr.summary(jnnx.params(small)).total_params


def test_explicit_grouped_conv_is_refused():
  with pytest.raises(ValueError, match="dw/kernel: grouped/depthwise"):
    jnnx.compress(Net(nnx.Rngs(0)), 2, select="dw")


def test_compressed_model_trains_and_truncates():
  model = Net(nnx.Rngs(0))
  ids = jax.random.randint(jax.random.key(1), (2, 8), 0, 50)
  small = jnnx.compress(model, 8, select=["layers/\\d+"])
  graphdef, params, rest = nnx.split(small, nnx.Param, ...)

  def loss(p):
    return nnx.merge(graphdef, p, rest)(ids)[1].sum()

  grads = jax.jit(jax.grad(loss))(params)
  g = grads["layers"][0]["u"].get_value()
  chex.assert_shape(g, (32, 8))
  assert float(jnp.abs(g).sum()) > 0
  t = jlr.truncate(jnnx.params(small), 3)
  jnnx.update(small, t)
  assert small.layers[0].factors.rank == 3
  np.testing.assert_allclose(jnnx.params(small)["layers"][0]["kernel"].dense(),
                             t["layers"][0]["kernel"].dense())
  chex.assert_shape(small(ids)[1], (2, 8, 50))
