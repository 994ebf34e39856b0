import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlr
import jlr.flax
from jlr import layouts, usage
from jlr.layouts import Layout, Spec
from conftest import init


def _rand(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


@pytest.mark.parametrize("layout", [
    Layout("dense", (5, 7)),
    Layout("embed", (11, 4)),
    Layout("dense_general", (6, 2, 3), n_in=1),
    Layout("dense_general", (2, 3, 6), n_in=2),
    Layout("conv_channel", (3, 3, 4, 5), n_in=3),
    Layout("conv_channel", (3, 4, 5), n_in=2),
    Layout("conv_spatial", (3, 2, 4, 5)),
])
def test_to_from_matrix_roundtrip(layout):
  w = _rand((2,) + layout.shape)  # with one stacked-layer axis
  mat = layout.to_matrix(w)
  assert mat.shape == (2,) + layout.matrix_shape
  np.testing.assert_array_equal(layout.from_matrix(mat), w)
  host = np.asarray(w)  # numpy stays numpy (host-side searches compile nothing)
  assert isinstance(layout.to_matrix(host), np.ndarray)
  assert isinstance(layout.from_matrix(layout.to_matrix(host)), np.ndarray)
  np.testing.assert_array_equal(layout.from_matrix(layout.to_matrix(host)), host)


def test_conv_spatial_matrix_entries():
  # M[(h, c), (w, o)] = W[h, w, c, o]
  w = np.random.default_rng(0).normal(size=(3, 2, 4, 5)).astype(np.float32)
  mat = np.asarray(Layout("conv_spatial", w.shape).to_matrix(jnp.asarray(w)))
  for h, ww, c, o in [(0, 0, 0, 0), (2, 1, 3, 4), (1, 0, 2, 3)]:
    assert mat[h * 4 + c, ww * 5 + o] == w[h, ww, c, o]


def test_factor_kernels_compose_to_the_kernel():
  layout = Layout("conv_spatial", (3, 2, 4, 5))
  u, v = _rand((12, 6)), _rand((6, 10), 1)
  uk, vk = layout.u_kernel(u), layout.v_kernel(v)
  assert uk.shape == (3, 1, 4, 6) and vk.shape == (1, 2, 6, 5)
  w = jnp.einsum("hcr,wro->hwco", uk[:, 0], vk[0])
  np.testing.assert_allclose(w, layout.from_matrix(u @ v), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,shape,expected", [
    ("kernel", (8, 4), ("dense", 1)),
    ("embedding", (100, 8), ("embed", 1)),
    ("kernel", (3, 3, 16, 32), ("conv_channel", 3)),
    ("kernel", (64, 4, 16), ("dense_general", 1)),  # attention q/k/v
    ("kernel", (4, 16, 64), ("dense_general", 2)),  # attention out
    ("kernel", (3, 32, 64), ("dense_general", 2)),  # 1-D conv
])
def test_infer(name, shape, expected):
  layout, b = layouts.infer(name, shape)
  assert (layout.kind, layout.n_in) == expected and b == 0


def test_infer_with_spec():
  layout, b = layouts.infer("kernel", (6, 8, 4), Spec(batch_ndim=1))
  assert layout == Layout("dense", (8, 4)) and b == 1
  layout, _ = layouts.infer("kernel", (3, 3, 2, 4), Spec(kind="conv_spatial"))
  assert layout.matrix_shape == (6, 12)


@pytest.mark.parametrize("kind,shape", [("dense", (3,)), ("conv_spatial", (3, 4, 5)),
                                        ("dense", (2, 3, 4)), ("nope", (2, 2))])
def test_bad_layouts(kind, shape):
  with pytest.raises(ValueError):
    Layout(kind, shape)


def test_layout_is_static_and_hashable():
  a, b = Layout("dense", (3, 4)), Layout("dense", [3, 4])
  assert a == b and hash(a) == hash(b)
  jax.jit(lambda x, layout: layout.to_matrix(x), static_argnums=1)(jnp.ones((3, 4)), a)


class _Conv1D(nn.Module):
  @nn.compact
  def __call__(self, x):  # (N, L, C)
    x = nn.relu(nn.Conv(8, (3,))(x))
    return nn.Conv(4, (3,))(x)


class _Conv2D(nn.Module):
  @nn.compact
  def __call__(self, x):  # (N, H, W, C)
    return nn.Conv(4, (3, 3))(x)


def test_conv_spatial_on_a_1d_conv_is_refused_by_path():
  """``conv="spatial"`` has no (kh, kw) split on a 1-D conv: an error naming the leaf and
  its shape, never a silent conv_channel factorization."""
  model, x = _Conv1D(), jnp.ones((2, 10, 3))
  v = init(model, x, seed=0)
  msg = r"params/Conv_0/kernel: .*2-D conv kernel \(kh, kw, cin, cout\), got shape \(3, 3, 8\)"
  with pytest.raises(ValueError, match=msg):
    usage.read(model.apply, v, x, conv="spatial")
  with pytest.raises(ValueError, match=msg):
    jlr.flax.layouts(model, v, x, conv="spatial")
  with pytest.raises(ValueError, match=msg):
    jlr.flax.factorize(model, v, x, rank=2, conv="spatial")
  # the default reads the 1-D convs as conv_channel: (k*cin, cout)
  lay = jlr.flax.layouts(model, v, x)
  assert lay["params/Conv_0/kernel"] == Layout("conv_channel", (3, 3, 8), 2)
  assert lay["params/Conv_1/kernel"] == Layout("conv_channel", (3, 8, 4), 2)
  # an explicit conv_spatial layout on a 3-D leaf is refused by path too
  for layout in ("conv_spatial", {"params/Conv_1/kernel": "conv_spatial"}):
    with pytest.raises(ValueError, match=r"params/Conv_\d/kernel: conv_spatial needs a 2-D"):
      jlr.factorize(v, 2, layout=layout)


def test_conv_spatial_on_a_2d_conv_is_read():
  model, x = _Conv2D(), jnp.ones((2, 6, 6, 3))
  v = init(model, x, seed=0)
  lay = jlr.flax.layouts(model, v, x, conv="spatial")
  assert lay["params/Conv_0/kernel"] == Layout("conv_spatial", (3, 3, 3, 4))
  f = jlr.flax.factorize(model, v, x, rank=2, conv="spatial")
  k = f["params"]["Conv_0"]["kernel"]
  assert k.layout.kind == "conv_spatial" and k.rank == 2
  # independent truth: the best rank-2 approximation of M[(h, c), (w, o)] = W[h, w, c, o]
  w = np.asarray(v["params"]["Conv_0"]["kernel"], np.float64)
  mat = w.transpose(0, 2, 1, 3).reshape(9, 12)
  u_, s_, vt = np.linalg.svd(mat, full_matrices=False)
  best = ((u_[:, :2] * s_[:2]) @ vt[:2]).reshape(3, 3, 3, 4).transpose(0, 2, 1, 3)
  np.testing.assert_allclose(k.dense(), best, rtol=1e-4, atol=1e-5)


def test_a_new_layout_kind_is_one_table_entry():
  """A PyTorch-style ``(out, in)`` weight: rows are axis 1, columns axis 0. Registering
  the kind is all it takes for factorize / merge / summary to treat it right."""
  from jlr.layouts import KINDS, Kind, register_kind
  kind = register_kind(Kind("dense_out_in", ndim=2, n_in=lambda nd: 1,
                            axes=lambda shape, n_in, perm: ((1,), (0,))))
  try:
    with pytest.raises(ValueError, match="already registered"):
      register_kind(kind)
    w = np.random.default_rng(0).normal(size=(6, 10)).astype(np.float32)  # (out, in)
    lay = Layout("dense_out_in", w.shape)
    assert lay.matrix_shape == (10, 6) and lay.row_axes == (1,)
    f = jlr.factorize({"w": w}, 3, select=lambda p, x: True, layout=lay)["w"]
    assert f.u.shape == (10, 3) and f.v.shape == (3, 6)
    uu, s, vt = np.linalg.svd(w.T.astype(np.float64))
    want = ((uu[:, :3] * s[:3]) @ vt[:3]).T  # the rank-3 truncation, back in (out, in)
    np.testing.assert_allclose(jlr.merge({"w": f})["w"], want, atol=1e-5)
    row = jlr.summary({"w": f}).rows[0]
    assert (row.kind, row.params, row.flops) == ("dense_out_in", 3 * 16, 2 * 3 * 16)
  finally:
    KINDS.pop("dense_out_in")
  with pytest.raises(ValueError, match="unknown layout kind 'dense_out_in'"):
    Layout("dense_out_in", (6, 10))
