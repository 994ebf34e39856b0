"""NNX models a user brings: Sequential, MultiHeadAttention, layers in lists/dicts,
nnx.vmap-created stacks run by nnx.scan, Einsum, LoRALinear beside compressed layers;
nnx.split/merge/jit and Optimizer training of the compressed model."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jlr
from jlr.flax import nnx as jnnx

from conftest import merged_reference, normal


class Block(nnx.Module):
  def __init__(self, rngs):
    self.lin = nnx.Linear(16, 16, rngs=rngs)

  def __call__(self, x):
    return x + nnx.tanh(self.lin(x))


class Net(nnx.Module):
  def __init__(self, rngs):
    self.seq = nnx.Sequential(nnx.Linear(8, 16, rngs=rngs), nnx.relu)

    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return Block(rngs)

    self.blocks = make(rngs)
    self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=16, qkv_features=16,
                                       decode=False, rngs=rngs)
    self.ein = nnx.Einsum("btd,ndh->btnh", (2, 16, 8), (2, 8), rngs=rngs)
    self.lora = nnx.LoRALinear(16, 12, lora_rank=2, rngs=rngs)
    self.heads = nnx.Dict({"a": nnx.Linear(12, 10, rngs=rngs)})
    self.extra = nnx.List([nnx.Linear(10, 10, rngs=rngs)])
    self.adapter = nnx.LoRA(10, 2, 10, rngs=rngs)  # a standalone LoRA beside them

  def __call__(self, x):
    x = self.seq(x)

    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
    def run(block, x):
      return block(x)

    x = run(self.blocks, x)
    x = self.attn(x)
    y = self.ein(x).reshape(x.shape[:2] + (16,))
    h = self.heads["a"](self.lora(y))
    return self.extra[0](h) + self.adapter(h)


@pytest.fixture(scope="module")
def net():
  """One ``Net`` for the module (its eager init is ~40 compiles): tests compress it, the
  first checks that compressing leaves it as it was."""
  return Net(nnx.Rngs(0))


run = nnx.jit(lambda m, x: m(x))  # whole forwards, not op by op


def test_every_pattern_compresses_runs_and_matches_the_merged_model(net):
  model = net
  x = normal((2, 5, 8))
  before = jax.tree.map(np.asarray, nnx.state(model))
  p = jnnx.plan(model, 4)
  assert p["blocks/lin/kernel"].batch_shape == (3,)  # one factorization per stacked layer
  assert p["ein/kernel"].layout.row_axes == (1,)  # the einsum's contracted `d`
  small = jnnx.compress(model, 4)
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, nnx.state(model)), before)
  assert isinstance(small.blocks.lin, jnnx.LowRankLinear)
  assert isinstance(small.attn.query, jnnx.LowRankLinear)
  assert isinstance(small.ein, jnnx.Factorized) and isinstance(small.lora, jnnx.Factorized)
  assert isinstance(small.heads["a"], jnnx.LowRankLinear)
  assert isinstance(small.extra[0], jnnx.LowRankLinear)
  assert isinstance(small.adapter, nnx.LoRA)  # adapters are not kernels: left as they are
  k = small.blocks.lin.factors
  chex.assert_shape([k.u, k.v], [(3, 16, 4), (3, 4, 16)])
  got = run(small, x)
  want = run(merged_reference(model, small), x)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(jnp.abs(want).max()))
  # the LoRA adapter still runs beside the factors: changing it changes the output
  lora = small.lora.inner.lora
  lora.lora_b.set_value(lora.lora_b.get_value() + 0.1)
  assert float(jnp.abs(run(small, x) - got).max()) > 1e-4


def test_split_merge_and_optimizer_training(net):
  x = normal((2, 5, 8))
  small = jnnx.compress(net, 4)
  graphdef, state = nnx.split(small)
  again = nnx.merge(graphdef, state)
  np.testing.assert_allclose(run(again, x), run(small, x), rtol=1e-6)
  opt = nnx.Optimizer(small, optax.adam(1e-2), wrt=nnx.Param)  # the stock optimizer

  @nnx.jit
  def step(m, opt, x):
    loss, g = nnx.value_and_grad(lambda m: jnp.mean((m(x) - 1.0) ** 2))(m)
    opt.update(m, g)
    return loss

  losses = [float(step(small, opt, x)) for _ in range(6)]
  assert losses[-1] < losses[0], losses
  k = small.blocks.lin.factors
  assert jlr.is_lowrank(k) and k.u.shape == (3, 16, 4)
  rep = jlr.summary(jnnx.params(small))
  assert rep.total_params < rep.dense_total_params
