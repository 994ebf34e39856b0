"""Any linen model, unchanged: layouts read from the model, forwards run factorized at the
primitive level (jlr.factorized), checked against the dense forward of the merged kernels,
and a jitted optax step on the factorized params lowers the loss."""

import warnings

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlr
import jlr.flax
from conftest import dense_apply, init, normal
from jlr import ranks

KEY = jax.random.key(0)


def rel_err(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-12))


def n_lowrank(tree):
  return sum(jlr.is_lowrank(x) for x in jax.tree.leaves(tree, is_leaf=jlr.is_lowrank))


def check_model(model, x, rank=2, expect=1, tol=1e-5, **kw):
  """Read layouts, factorize, compare with the merged dense forward, train 5 steps."""
  variables = init(model, x)
  f = jlr.flax.factorize(model, variables, x, rank=rank, **kw)
  assert n_lowrank(f) >= expect, jlr.flax.layouts(model, variables, x)
  with warnings.catch_warnings():
    warnings.simplefilter("error", jlr.DensifiedWarning)  # every factor ran factorized
    got = jax.jit(lambda v, x: jlr.flax.apply(model, v, x))(f, x)
  want = dense_apply(model, f, x)
  chex.assert_equal_shape([got, want])
  chex.assert_trees_all_equal_dtypes(got, want)
  assert rel_err(got, want) < tol
  target = np.zeros(want.shape, np.float32)
  tx = optax.adam(1e-2)
  params = f

  def loss(p):
    y = jlr.flax.apply(model, p, x)
    return jnp.mean(jnp.square(y.astype(jnp.float32) - target))

  @jax.jit
  def step(p, s):
    val, g = jax.value_and_grad(loss)(p)
    upd, s = tx.update(g, s, p)
    return optax.apply_updates(p, upd), s, val

  state = jax.jit(tx.init)(params)  # one program, not one zeros_like per leaf shape
  losses = []
  for _ in range(5):
    params, state, val = step(params, state)
    losses.append(float(val))
  assert losses[-1] < losses[0], losses
  assert jax.tree.structure(params, is_leaf=jlr.is_lowrank) == \
      jax.tree.structure(f, is_leaf=jlr.is_lowrank)
  return f


# ----------------------------------------------------------------------------- scan stacks


class Block(nn.Module):
  @nn.compact
  def __call__(self, h, _):
    return h + nn.tanh(nn.Dense(16, name="fc")(h)), None


class Stack(nn.Module):
  remat: bool = False

  @nn.compact
  def __call__(self, x):
    cls = nn.remat(Block) if self.remat else Block
    h, _ = nn.scan(cls, variable_axes={"params": 0}, split_rngs={"params": True},
                   length=3)()(nn.Dense(16)(x), None)
    return nn.Dense(4)(h)


@pytest.mark.parametrize("remat", [False, True])
def test_scan_stack_is_factorized_per_layer(remat):
  model, x = Stack(remat), normal((5, 8))
  variables = init(model, x)
  lay = jlr.flax.layouts(model, variables, x)
  name = "ScanCheckpointBlock_0" if remat else "ScanBlock_0"
  stacked = lay[f"params/{name}/fc/kernel"]
  assert stacked == jlr.Layout("dense", (16, 16))  # one (16, 16) matrix per layer
  f = check_model(model, x, rank=3, expect=2)
  k = f["params"][name]["fc"]["kernel"]
  chex.assert_shape([k.u, k.v], [(3, 16, 3), (3, 3, 16)])
  # each layer is its own best rank-3 approximation (not one joint factorization)
  w = variables["params"][name]["fc"]["kernel"]
  for i in range(3):
    s = np.linalg.svd(np.asarray(w[i]), compute_uv=False)
    err = np.linalg.norm(np.asarray(k.u[i] @ k.v[i]) - np.asarray(w[i]))
    np.testing.assert_allclose(err, np.sqrt((s[3:] ** 2).sum()), rtol=1e-4)


def test_shape_guess_warns_for_stacked_kernels_and_the_model_path_does_not():
  model, x = Stack(), normal((5, 8))
  variables = init(model, x)
  with pytest.warns(jlr.GuessedLayoutWarning, match="ScanBlock_0/fc/kernel"):
    jlr.factorize(variables, 2)
  with warnings.catch_warnings():
    warnings.simplefilter("error", jlr.GuessedLayoutWarning)
    jlr.flax.factorize(model, variables, x, rank=2)
    jlr.factorize(variables, 2, layout=jlr.flax.layouts(model, variables, x))


class VmapStack(nn.Module):
  @nn.compact
  def __call__(self, x):  # x: (layers, batch, features), one input per layer
    dense = nn.vmap(nn.Dense, variable_axes={"params": 0}, split_rngs={"params": True},
                    in_axes=0, out_axes=0, axis_size=3)
    return dense(12)(x)


def test_vmap_stack():
  x = normal((3, 4, 10))
  model = VmapStack()
  lay = jlr.flax.layouts(model, init(model, x), x)
  assert lay["params/VmapDense_0/kernel"] == jlr.Layout("dense", (10, 12))
  check_model(model, x, rank=3)


# ----------------------------------------------------------------------------- attention, einsum


class Attn(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=32)(x)


def test_multi_head_attention():
  x = normal((2, 7, 32))
  f = check_model(Attn(), x, rank=6, expect=4)
  a = f["params"]["MultiHeadDotProductAttention_0"]
  assert a["query"]["kernel"].layout.matrix_shape == (32, 32)  # features | heads, head_dim
  assert a["out"]["kernel"].layout.matrix_shape == (32, 32)  # heads, head_dim | features


class Gemma(nn.Module):
  """A Gemma-style query einsum: the contracted axis is in the middle of the kernel."""

  @nn.compact
  def __call__(self, x):
    q = nn.Einsum((4, 24, 6), "btd,ndh->btnh")(x)
    return nn.Einsum((4, 6, 24), "btnh,nhd->btd")(q)


def test_einsum_with_a_middle_contracted_axis():
  x = normal((2, 5, 24))
  model = Gemma()
  lay = jlr.flax.layouts(model, init(model, x), x)
  assert lay["params/Einsum_0/kernel"].row_axes == (1,)  # d
  assert lay["params/Einsum_1/kernel"].row_axes == (0, 1)  # n, h
  check_model(model, x, rank=4, expect=2)


# ----------------------------------------------------------------------------- convolutions


class Convs(nn.Module):
  nd: int
  transpose: bool = False

  @nn.compact
  def __call__(self, x):
    ks = (3,) * self.nd
    x = nn.relu(nn.Conv(8, ks, strides=2 if self.nd > 1 else 1, padding="SAME")(x))
    if self.transpose:
      x = nn.ConvTranspose(6, ks, strides=(2,) * self.nd)(x)
    return nn.Conv(5, ks, kernel_dilation=2, padding="VALID")(x)


@pytest.mark.parametrize("nd", [1, 2, pytest.param(3, marks=pytest.mark.slow)])
def test_convs_1d_2d_3d(nd):
  x = normal((2,) + (9,) * nd + (3,))
  check_model(Convs(nd), x, rank=2, expect=2)


def test_conv_transpose_is_factorized():
  x = normal((2, 6, 6, 3))
  model = Convs(2, transpose=True)
  f = check_model(model, x, rank=2, expect=3)
  assert f["params"]["ConvTranspose_0"]["kernel"].layout.kind == "conv_channel"


def test_conv_spatial_layout_read_from_the_model():
  x = normal((2, 9, 9, 3))
  f = check_model(Convs(2), x, rank=2, expect=2, conv="spatial")
  assert f["params"]["Conv_0"]["kernel"].layout.kind == "conv_spatial"


class Grouped(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(8, (3, 3))(x)
    x = nn.Conv(8, (3, 3), feature_group_count=8)(x)  # depthwise
    return nn.Conv(8, (3, 3), feature_group_count=2)(x)


def test_grouped_and_depthwise_convs_are_refused_by_path():
  x = normal((2, 8, 8, 4))
  model = Grouped()
  variables = init(model, x)
  lay = jlr.flax.layouts(model, variables, x)
  assert set(lay) == {"params/Conv_0/kernel"}
  for name in ("Conv_1", "Conv_2"):
    assert "grouped/depthwise" in lay.skipped[f"params/{name}/kernel"]
  f = jlr.flax.factorize(model, variables, x, rank=2)
  assert not jlr.is_lowrank(f["params"]["Conv_1"]["kernel"])
  np.testing.assert_array_equal(f["params"]["Conv_1"]["kernel"],
                                variables["params"]["Conv_1"]["kernel"])
  check_model(model, x, rank=2, expect=1)


def test_forcing_a_grouped_conv_densifies_with_a_warning_not_a_wrong_answer():
  x = normal((2, 8, 8, 4))
  model = Grouped()
  variables = init(model, x)
  f = jlr.factorize(variables, 2, select="Conv_1/kernel", layout="conv_channel")
  with pytest.warns(jlr.DensifiedWarning, match="Conv_1/kernel.*feature_group_count=8"):
    got = jlr.flax.apply(model, f, x)
  assert rel_err(got, dense_apply(model, f, x)) < 1e-5


# ----------------------------------------------------------------------------- other modules


class Conv1D(nn.Module):
  """Hugging Face GPT-2's FlaxConv1D: an (out, in) kernel used through dot_general."""

  features: int

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.normal(0.1), (self.features, x.shape[-1]))
    return jax.lax.dot_general(x, kernel.T, (((x.ndim - 1,), (0,)), ((), ())))


class Lm(nn.Module):
  @nn.compact
  def __call__(self, ids):
    emb = nn.Embed(100, 24)
    h = nn.gelu(Conv1D(40)(emb(ids)))
    return emb.attend(Conv1D(24)(h))  # tied output embedding


def test_custom_module_and_tied_embedding():
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 100, (3, 9)), jnp.int32)
  model = Lm()
  lay = jlr.flax.layouts(model, init(model, ids), ids)
  assert lay["params/Embed_0/embedding"].kind == "embed"  # lookup and attend agree
  c = lay["params/Conv1D_0/kernel"]
  assert c.row_axes == (1,) and c.matrix_shape == (24, 40)  # rows are the layer's inputs
  check_model(model, ids, rank=4, expect=3)


class Unused(nn.Module):
  @nn.compact
  def __call__(self, x):
    self.param("spare", nn.initializers.normal(), (8, 8))
    w = self.param("kernel", nn.initializers.normal(), (8, 8))
    scale = self.param("mixed", nn.initializers.normal(), (8, 8))
    return (x @ w) @ scale + jnp.sum(scale)  # `mixed` also feeds a reduction


def test_unused_and_non_matmul_uses_are_reported_and_left_dense():
  x = jnp.ones((2, 8))
  model = Unused()
  variables = init(model, x)
  lay = jlr.flax.layouts(model, variables, x)
  assert set(lay) == {"params/kernel"}
  assert "reduce_sum" in lay.skipped["params/mixed"]
  assert "spare" not in lay.skipped  # not a kernel, never used: nothing to report
  f = jlr.flax.factorize(model, variables, x, rank=2)
  assert jlr.is_lowrank(f["params"]["kernel"]) and not jlr.is_lowrank(f["params"]["mixed"])


def test_bf16_params():
  model = Stack()
  x = normal((4, 8), jnp.bfloat16)
  variables = jax.tree.map(lambda a: a.astype(jnp.bfloat16), init(model, x))
  f = jlr.flax.factorize(model, variables, x, rank=4)
  k = f["params"]["ScanBlock_0"]["fc"]["kernel"]
  assert k.u.dtype == jnp.bfloat16
  got = jax.jit(lambda v, x: jlr.flax.apply(model, v, x))(f, x)
  want = dense_apply(model, f, x)
  assert got.dtype == want.dtype == jnp.bfloat16
  assert rel_err(got, want) < 3e-2


def test_plain_jax_function():
  """jlr.factorized works on any JAX function, not only Flax."""
  params = {"w1": normal((3, 10, 20)), "w2": normal((20, 5))}

  def f(p, x):  # x: (layers, batch, in), one input per layer
    h = jnp.tanh(jnp.einsum("lbi,lij->lbj", x, p["w1"])).sum(0)
    return h @ p["w2"]

  x = normal((3, 4, 10))
  lay = jlr.usage.read(f, params, x)
  assert lay["w1"] == jlr.Layout("dense", (10, 20))  # the layer axis is an einsum batch
  fp = jlr.factorize(params, 3, layout=lay)
  assert rel_err(jlr.factorized(f)(fp, x), f(jlr.merge(fp), x)) < 1e-5


def test_factorized_returns_passed_through_lowranks_and_never_mutates():
  params = {"w": normal((8, 8))}
  fp = jlr.factorize(params, 2, select="w")
  out = jlr.factorized(lambda p, x: (x @ p["w"], p))(fp, jnp.ones((1, 8)))
  assert out[1]["w"] is fp["w"]


def test_default_ratio_keeps_a_minimum_rank():
  lay = jlr.Layout("dense", (64, 10))
  assert ranks.ratio(0.25).resolve(lay, None) == 8  # not 2: the classifier survives
  assert ranks.ratio(0.25, min_rank=1).resolve(lay, None) == 2  # the plain rule
  assert ranks.ratio(0.25).resolve(jlr.Layout("dense", (512, 512)), None) == 64
  p = jlr.plan({"kernel": jnp.ones((64, 10))}, ranks.ratio(0.25))
  assert "min rank 8" in p["kernel"].rule
  # where the floor would not save parameters the leaf stays dense
  assert jlr.plan({"kernel": jnp.ones((12, 10))}, ranks.ratio(0.25)) == {}
