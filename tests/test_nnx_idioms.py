"""NNX idioms a user writes, each checked against the same model run dense on the merged
factors: weight tying (a module referenced twice), LoRA around a shared base, custom
``dot_general`` / ``promote_dtype`` / ``preferred_element_type``, top-level layers, a kernel
variable shared by two modules (refused), and the stock ``nnx.Optimizer``."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jlr
from jlr.flax import nnx as jnnx

from conftest import f32, merged_reference, normal


def assert_close(got, want):
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))


class Tied(nnx.Module):
  """Weight tying the NNX way: the head is the embedding module, called through attend."""

  def __init__(self, rngs):
    self.emb = nnx.Embed(64, 32, rngs=rngs)
    self.mid = nnx.Linear(32, 32, rngs=rngs)
    self.head = self.emb

  def __call__(self, ids):
    return self.head.attend(nnx.gelu(self.mid(self.emb(ids))))


def test_tied_module_is_compressed_once_and_stays_shared():
  model, ids = Tied(nnx.Rngs(0)), jnp.arange(12).reshape(2, 6)
  small = jnnx.compress(model, 8)
  assert small.head is small.emb and isinstance(small.emb, jnnx.LowRankEmbed)
  assert isinstance(model.emb, nnx.Embed)  # the input is untouched
  # one table in the model, in factored form: no dense (64, 32) leaf anywhere
  shapes = [x.shape for x in jax.tree.leaves(nnx.state(small, nnx.Param))]
  assert (64, 32) not in shapes and shapes.count((64, 8)) == 1
  assert_close(nnx.jit(lambda m, x: m(x))(small, ids), merged_reference(model, small)(ids))
  # still one module after split/merge (nnx keeps shared references)
  again = nnx.merge(*nnx.split(small))
  assert again.head is again.emb


class SharedBase(nnx.Module):
  def __init__(self, rngs):
    self.base = nnx.Linear(16, 16, rngs=rngs)
    self.lora = nnx.LoRA(16, 2, 16, base_module=self.base, rngs=rngs)

  def __call__(self, x):
    return self.base(x) + self.lora(x)


def test_lora_around_a_shared_base_sees_the_factors():
  model = SharedBase(nnx.Rngs(0))
  model.lora.lora_b.set_value(jnp.ones_like(model.lora.lora_b.get_value()) * 0.1)
  x = normal((3, 16))
  small = jnnx.compress(model, 4)
  assert small.lora.base_module is small.base and isinstance(small.base, jnnx.Factorized)
  assert_close(small(x), merged_reference(model, small)(x))


def _scaled_dot_general(lhs, rhs, dimension_numbers, precision=None, **kw):
  return 2.0 * jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision, **kw)


def _promote_to_bf16(args, dtype=None):
  return tuple(None if a is None else jnp.asarray(a, jnp.bfloat16) for a in args)


@pytest.mark.parametrize("kwargs", [
    dict(dot_general=_scaled_dot_general),
    dict(promote_dtype=_promote_to_bf16),
    dict(preferred_element_type=jnp.float32, dtype=jnp.bfloat16),
], ids=["dot_general", "promote_dtype", "preferred_element_type"])
def test_custom_matmul_settings_are_kept(kwargs):
  layer = nnx.Linear(24, 20, rngs=nnx.Rngs(0), **kwargs)
  x = normal((4, 24))
  small = jnnx.compress(layer, 6)
  got, want = small(x), merged_reference(layer, small)(x)
  assert got.dtype == want.dtype
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             rtol=2e-2, atol=2e-2 * float(jnp.abs(want.astype(jnp.float32)).max()))
  if "dot_general" in kwargs:  # the custom factor 2 is there: plain x @ W would be half
    plain = x @ small.factors.dense() + small.inner.bias.get_value()
    assert float(jnp.abs(got - plain).max()) > 0.1 * float(jnp.abs(plain).max())


@pytest.mark.parametrize("make,x", [
    (lambda: nnx.Linear(32, 24, rngs=nnx.Rngs(0)), jnp.ones((2, 32))),
    (lambda: nnx.Conv(8, 16, (3, 3), rngs=nnx.Rngs(0)), jnp.ones((1, 6, 6, 8))),
    (lambda: nnx.Embed(40, 16, rngs=nnx.Rngs(0)), jnp.arange(6)),
], ids=["Linear", "Conv", "Embed"])
def test_a_top_level_layer_is_compressed(make, x):
  layer = make()
  small = jnnx.compress(layer, 4)
  assert isinstance(small, jnnx.Factorized) and small.factors.rank == 4
  assert_close(small(x), merged_reference(layer, small)(x))


class SharedVariable(nnx.Module):
  def __init__(self, rngs):
    self.a = nnx.Linear(16, 16, rngs=rngs)
    self.b = nnx.Linear(16, 16, use_bias=False, rngs=rngs)
    self.b.kernel = self.a.kernel  # one variable, two modules

  def __call__(self, x):
    return self.b(self.a(x))


def test_a_kernel_variable_held_by_two_modules_is_refused_naming_both():
  with pytest.raises(ValueError, match="a/kernel and b/kernel"):
    jnnx.compress(SharedVariable(nnx.Rngs(0)), 4)


@pytest.mark.parametrize("tx", [optax.adam(1e-2), optax.adamw(1e-2)], ids=["adam", "adamw"])
def test_stock_nnx_optimizer_trains_the_factors(tx):
  model, ids = Tied(nnx.Rngs(0)), jnp.arange(12).reshape(2, 6)
  small = jnnx.compress(model, 8)
  opt = nnx.Optimizer(small, tx, wrt=nnx.Param)

  @nnx.jit
  def step(m, opt, ids):
    loss, g = nnx.value_and_grad(
        lambda m: optax.softmax_cross_entropy_with_integer_labels(m(ids), ids).mean())(m)
    opt.update(m, g)
    return loss

  losses = [float(step(small, opt, ids)) for _ in range(3)]
  assert losses[2] < losses[0], losses
  chex.assert_shape([small.emb.u.get_value(), small.emb.v.get_value()], [(64, 8), (8, 32)])


def test_whitened_compress_from_statistics_of_the_nnx_model():
  """jlr.stats.activations on an NNX forward (split/merge) gives each kernel's input Gram;
  compress(stats=) then beats plain SVD on the output error at the same rank."""
  rng = np.random.default_rng(0)
  model = nnx.Sequential(nnx.Linear(16, 32, rngs=nnx.Rngs(0)), nnx.relu,
                         nnx.Linear(32, 8, rngs=nnx.Rngs(1)))
  mix = rng.normal(size=(16, 16)) * np.linspace(0.02, 2, 16)
  x = f32(rng.normal(size=(256, 16)) @ mix)
  graphdef, state = nnx.split(model, nnx.Param)
  st = jlr.stats.activations(lambda p, x: nnx.merge(graphdef, p)(x), state, [x])
  xs = np.asarray(x, np.float64)
  np.testing.assert_allclose(st["layers/0/kernel"].matrix, xs.T @ xs, rtol=1e-4)
  aware = jnnx.compress(model, 4, select="layers/0", stats=st)
  plain = jnnx.compress(model, 4, select="layers/0")
  ref = model(x)
  assert float(jnp.linalg.norm(aware(x) - ref)) < float(jnp.linalg.norm(plain(x) - ref))
