"""Factorized linen forwards against the dense forward of the merged kernels."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlr
import jlr.flax
from conftest import dense_apply, init, normal
from jlr import ranks

KEY = jax.random.key(0)


def assert_close(a, b, rtol=1e-5):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  scale = float(np.max(np.abs(b))) + 1e-12
  assert float(np.max(np.abs(a - b))) <= rtol * scale, float(np.max(np.abs(a - b))) / scale


def check_equivalent(model, x, rank=ranks.ratio(0.5), select=None, layout=None, method=None,
                     min_factorized=1):
  variables = init(model, x)
  f = jlr.factorize(variables, rank, select=select, layout=layout)
  n = sum(isinstance(leaf, jlr.LowRank)
          for leaf in jax.tree.leaves(f, is_leaf=jlr.is_lowrank))
  assert n >= min_factorized
  kw = {} if method is None else dict(method=method)
  got = jax.jit(lambda v, x: jlr.flax.apply(model, v, x, **kw))(f, x)
  want = dense_apply(model, f, x, **kw)
  chex.assert_equal_shape([got, want])
  assert_close(got, want)
  return f


class Mlp(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(64)(x))
    return nn.Dense(48, use_bias=False)(x)


def test_dense():
  check_equivalent(Mlp(), normal((5, 3, 32)), min_factorized=2)


@pytest.mark.parametrize("axis,features", [(-1, (4, 8)), ((-2, -1), 24), ((1, 2), (3, 5)), ((-1, -2), 12)])
def test_dense_general_any_split(axis, features):
  model = nn.DenseGeneral(features, axis=axis)
  x = normal((2, 6, 10, 3))
  variables = init(model, x)
  kshape = variables["params"]["kernel"].shape
  for n_in in range(1, len(kshape)):  # every row/column split computes the same map
    f = jlr.factorize(variables, 2, select="kernel",
                      layout=jlr.layouts.Spec(kind="dense_general", n_in=n_in))
    assert_close(jlr.flax.apply(model, f, x), dense_apply(model, f, x))


class Attn(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=32)(x)


def test_multi_head_attention():
  f = check_equivalent(Attn(), normal((2, 7, 32)), rank=6, min_factorized=4)
  q = f["params"]["MultiHeadDotProductAttention_0"]["query"]["kernel"]
  assert q.layout.matrix_shape == (32, 32)  # (features | heads, head_dim)


class ConvNet(nn.Module):
  strides: tuple = (1, 1)
  padding: object = "SAME"
  dilation: int = 1

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(16, (3, 3), strides=self.strides, padding=self.padding,
                        kernel_dilation=self.dilation)(x))
    return nn.Conv(12, (3, 2), padding=self.padding, use_bias=False)(x)


@pytest.mark.parametrize("layout", ["conv_channel", "conv_spatial"])
@pytest.mark.parametrize("strides,padding,dilation", [
    ((1, 1), "SAME", 1), ((2, 1), "SAME", 1), ((2, 3), "VALID", 1), ((1, 1), 1, 2),
    ((1, 2), [(0, 2), (1, 0)], 1), ((1, 1), "CIRCULAR", 1)])
def test_conv(layout, strides, padding, dilation):
  x = normal((2, 12, 11, 6))
  f = check_equivalent(ConvNet(strides, padding, dilation), x, rank=3, layout=layout,
                       min_factorized=2)
  assert f["params"]["Conv_0"]["kernel"].layout.kind == layout


def test_conv1d_and_unbatched_input():
  model = nn.Conv(8, (3,), padding="CAUSAL")
  check_equivalent(model, normal((2, 10, 5)), rank=2)
  x = normal((10, 5))  # no batch axis
  f = jlr.factorize(init(model, x), 2)
  assert_close(jlr.flax.apply(model, f, x), dense_apply(model, f, x))


class Lm(nn.Module):
  @nn.compact
  def __call__(self, ids):
    emb = nn.Embed(200, 32)
    h = nn.Dense(32)(emb(ids))
    return emb.attend(h)


def test_embed_call_and_attend():
  ids = jax.random.randint(KEY, (3, 9), 0, 200)
  f = check_equivalent(Lm(), ids, rank=8, min_factorized=2)
  assert f["params"]["Embed_0"]["embedding"].layout.kind == "embed"


def test_bf16_end_to_end():
  model = Mlp()
  x = normal((4, 32), jnp.bfloat16)
  variables = jax.tree.map(lambda a: a.astype(jnp.bfloat16), init(model, x))
  f = jlr.factorize(variables, 8)
  y = jlr.flax.apply(model, f, x)
  chex.assert_type(y, jnp.bfloat16)
  assert_close(y.astype(jnp.float32), dense_apply(model, f, x).astype(jnp.float32), rtol=3e-2)


def test_factorized_forward_flops_are_the_factorized_count():
  model = nn.Dense(512)
  x = jnp.ones((64, 1024))
  variables = init(model, x)
  f = jlr.factorize(variables, 32)
  dense = jax.jit(model.apply).lower(variables, x).compile().cost_analysis()["flops"]
  low = jax.jit(lambda v, x: jlr.flax.apply(model, v, x)).lower(f, x).compile().cost_analysis()["flops"]
  expected = (1024 * 32 + 32 * 512) / (1024 * 512)
  assert low / dense == pytest.approx(expected, rel=0.05)
  rep = jlr.summary(f)
  assert rep.flops / rep.dense_flops == pytest.approx(expected, rel=1e-6)


def test_grouped_conv_is_densified_with_its_path_not_silently_wrong():
  model = nn.Conv(8, (3, 3), feature_group_count=4)
  x = jnp.ones((1, 5, 5, 8))
  f = jlr.factorize(init(model, x), 1, select="kernel", layout="conv_channel")
  with pytest.warns(jlr.DensifiedWarning, match="kernel.*grouped/depthwise"):
    got = jlr.flax.apply(model, f, x)
  assert_close(got, dense_apply(model, f, x))
  assert "grouped/depthwise" in jlr.flax.layouts(model, init(model, x), x).skipped["params/kernel"]


def test_op_without_a_factorized_rule_is_named():
  class Scaled(nn.Module):  # uses its kernel elementwise before the matmul
    @nn.compact
    def __call__(self, x):
      k = self.param("kernel", nn.initializers.normal(), (6, 8))
      return x @ jnp.tanh(k)

  model, x = Scaled(), jnp.ones((2, 6))
  f = jlr.factorize(init(model, x), 2, select="kernel")
  with pytest.warns(jlr.DensifiedWarning, match="params/kernel: no factorized rule for `tanh`"):
    got = jlr.flax.apply(model, f, x)
  assert_close(got, dense_apply(model, f, x))
  assert "tanh" in jlr.flax.layouts(model, init(model, x), x).skipped["params/kernel"]
  # strict: the same place raises, naming the leaf and the primitive
  with pytest.raises(jlr.DensifiedError, match="params/kernel: no factorized rule for `tanh`"):
    jlr.flax.apply(model, f, x, strict=True)
  with pytest.raises(ValueError, match="params/kernel.*`tanh`"):
    jax.jit(jlr.factorized(model.apply, strict=True))(f, x)


def test_strict_grouped_conv_raises_and_clean_models_pass():
  model = nn.Conv(8, (3, 3), feature_group_count=4)
  x = jnp.ones((1, 5, 5, 8))
  f = jlr.factorize(init(model, x), 1, select="kernel", layout="conv_channel")
  with pytest.raises(jlr.DensifiedError, match="kernel.*grouped/depthwise"):
    jlr.flax.apply(model, f, x, strict=True)
  mlp, xm = Mlp(), jnp.ones((2, 32))
  small = jlr.factorize(init(mlp, xm), 4)
  assert_close(jlr.flax.apply(mlp, small, xm, strict=True), dense_apply(mlp, small, xm))


def test_dense_models_run_unchanged_under_apply():
  model = Mlp()
  x = jnp.ones((2, 32))
  v = init(model, x)
  np.testing.assert_array_equal(jlr.flax.apply(model, v, x), model.apply(v, x))


class Built(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = jlr.flax.LowRankConv(8, (3, 3), rank=4, layout="spatial")(x)
    x = x.reshape(x.shape[0], -1)
    return jlr.flax.LowRankDense(10, rank=3)(x)


def test_lowrank_layers_built_factorized():
  x = normal((2, 6, 6, 3))
  model = Built()
  v = jax.jit(model.init)(KEY, x)  # the layers' own initializers
  conv = v["params"]["LowRankConv_0"]["kernel"]
  dense = v["params"]["LowRankDense_0"]["kernel"]
  assert conv.layout.kind == "conv_spatial" and conv.rank == 4 and dense.rank == 3
  got = model.apply(v, x)
  chex.assert_shape(got, (2, 10))
  # the same computation through a dense model with merged kernels
  class Dense(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Conv(8, (3, 3))(x)
      return nn.Dense(10)(x.reshape(x.shape[0], -1))
  merged = jlr.merge(v)
  renamed = {"params": {"Conv_0": merged["params"]["LowRankConv_0"],
                        "Dense_0": merged["params"]["LowRankDense_0"]}}
  assert_close(got, Dense().apply(renamed, x))
  # and it trains: gradients flow to both factors
  g = jax.grad(lambda p: model.apply(p, x).sum())(v)
  assert float(jnp.abs(g["params"]["LowRankDense_0"]["kernel"].u).sum()) > 0
  assert jlr.summary(v).rows[0].rank == 4
