"""Activation-whitened and Fisher-weighted factorization against closed forms."""

import warnings

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlr
import jlr.flax
from jlr import ranks, stats
from jlr.flax import calibrate
from conftest import f32, init


def rnd(shape, seed=0):
  return np.random.default_rng(seed).normal(size=shape)


def best_weighted(w, gram, r):
  """Closed form: W' = G^{-1/2} (G^{1/2} W)_r minimizes ||X (W - W')||."""
  lam, e = np.linalg.eigh(gram)
  half = (e * np.sqrt(lam)) @ e.T
  p, s, vt = np.linalg.svd(half @ w)
  return np.linalg.solve(half, (p[:, :r] * s[:r]) @ vt[:r])


def test_whitened_factorization_minimizes_output_error():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(500, 20)) * np.linspace(0.1, 3.0, 20)  # anisotropic inputs
  w = rnd((20, 12), 1)
  g = stats.Gram(x.T @ x, 500)
  f = jlr.factorize({"k": f32(w)}, 4, select="k", stats={"k": g},
                    damping=1e-8)["k"]
  out_err = lambda w2: np.linalg.norm(x @ (w - w2))  # noqa: E731
  got = out_err(np.asarray(f.dense(), np.float64))
  np.testing.assert_allclose(got, out_err(best_weighted(w, x.T @ x, 4)), rtol=1e-3)
  plain = jlr.factorize({"k": f32(w)}, 4, select="k")["k"]
  assert got < 0.95 * out_err(np.asarray(plain.dense(), np.float64))
  # balanced factors: u = P sqrt(S), v = sqrt(S) Q^T with P, Q orthonormal (the SVD of W'
  # itself), so u^T u = v v^T = diag(S) -- not R^{-1} P sqrt(S), whose scale is R^{-1}'s
  u, v = np.asarray(f.u, np.float64), np.asarray(f.v, np.float64)
  sv = np.linalg.svd(np.asarray(f.dense(), np.float64), compute_uv=False)[:4]
  np.testing.assert_allclose(u.T @ u, np.diag(sv), atol=1e-3 * sv[0])
  np.testing.assert_allclose(v @ v.T, np.diag(sv), atol=1e-3 * sv[0])


def test_nested_whitened_factors_are_optimal_at_every_prefix():
  """``nested=True``: one full-rank factorization whose every prefix is the whitened
  optimum at that rank (the default SVD form is, at full rank, the plain SVD of W)."""
  rng = np.random.default_rng(3)
  x = rng.normal(size=(400, 16)) * np.linspace(0.1, 3.0, 16)
  w = rnd((16, 10), 4)
  g = stats.Gram(x.T @ x, 400)
  tree = {"k": f32(w)}
  full = jlr.factorize(tree, ranks.full(), select="k", stats={"k": g}, damping=1e-8, nested=True)["k"]
  default = jlr.factorize(tree, ranks.full(), select="k", stats={"k": g}, damping=1e-8)["k"]
  u, v = np.asarray(full.u, np.float64), np.asarray(full.v, np.float64)
  du, dv = np.asarray(default.u, np.float64), np.asarray(default.v, np.float64)
  out_err = lambda w2: np.linalg.norm(x @ (w - w2))  # noqa: E731
  for k in (2, 5, 8):
    best = out_err(best_weighted(w, x.T @ x, k))
    np.testing.assert_allclose(out_err(u[:, :k] @ v[:k]), best, rtol=1e-3)
    assert out_err(du[:, :k] @ dv[:k]) > 1.05 * best  # plain-SVD prefixes are not optimal
  np.testing.assert_allclose(u @ v, w, atol=1e-4)  # full rank: exact either way
  plain = jlr.factorize(tree, 4, select="k", nested=True)["k"]  # no stats: no effect
  np.testing.assert_array_equal(plain.u, jlr.factorize(tree, 4, select="k")["k"].u)


def test_rank_deficient_activations_do_not_break():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(50, 3)) @ rng.normal(size=(3, 16))  # X^T X has rank 3
  w = f32(rnd((16, 8), 2))
  f = jlr.factorize({"k": w}, 3, select="k", stats={"k": stats.Gram(x.T @ x, 50)})["k"]
  assert np.isfinite(np.asarray(f.u)).all() and np.isfinite(np.asarray(f.v)).all()
  # on the data, rank 3 is (nearly) lossless: the data only spans 3 directions
  rel = np.linalg.norm(x @ (np.asarray(w) - np.asarray(f.dense()))) / np.linalg.norm(x @ np.asarray(w))
  assert rel < 1e-2
  zero = stats.Gram(np.zeros((16, 16)), 1)
  f0 = jlr.factorize({"k": w}, 3, select="k", stats={"k": zero})["k"]
  assert np.isfinite(np.asarray(f0.dense())).all()


def test_fisher_weighted_is_row_weighted_optimal():
  w = rnd((10, 8), 3)
  weights = np.linspace(0.01, 5.0, 10)
  f = jlr.factorize({"k": f32(w)}, 3, select="k",
                    stats={"k": stats.RowWeights(weights, 1)}, damping=1e-8)["k"]
  d = np.sqrt(weights)[:, None]
  p, s, vt = np.linalg.svd(d * w)
  best = ((p[:, :3] * s[:3]) @ vt[:3]) / d
  np.testing.assert_allclose(np.asarray(f.dense()), best, atol=1e-3)


def test_fisher_from_gradients():
  params = {"d": {"kernel": f32(rnd((6, 4), 4))}}
  xs = [f32(rnd((5, 6), s)) for s in range(3)]
  grad_fn = jax.jit(jax.grad(lambda p, x: jnp.sum((x @ p["d"]["kernel"]) ** 2)))
  got = stats.fisher(grad_fn, params, xs)["d/kernel"]
  want = sum((np.asarray(grad_fn(params, x)["d"]["kernel"], np.float64) ** 2).sum(1) for x in xs)
  np.testing.assert_allclose(got.weights, want, rtol=1e-5)
  assert got.count == 3


class Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=16)(x)
    h = nn.relu(nn.Dense(32)(h))
    return nn.Dense(16)(h)


def test_linen_activation_statistics_and_budget():
  model = Block()
  rng = np.random.default_rng(5)
  mix = rng.normal(size=(16, 16)) * np.linspace(0.05, 2, 16)
  batches = [f32(rng.normal(size=(4, 6, 16)) @ mix) for _ in range(3)]
  variables = init(model, batches[0], seed=0)
  st = calibrate.activations(model, variables, batches)
  assert set(st) == {"params/Dense_0/kernel", "params/Dense_1/kernel",
                     *(f"params/MultiHeadDotProductAttention_0/{n}/kernel"
                       for n in ("query", "key", "value", "out"))}
  xs = np.concatenate([np.asarray(b).reshape(-1, 16) for b in batches])
  np.testing.assert_allclose(st["params/Dense_0/kernel"].count, 72)
  np.testing.assert_allclose(st["params/MultiHeadDotProductAttention_0/query/kernel"].matrix,
                             xs.T @ xs, rtol=1e-4)
  held_out = f32(rng.normal(size=(8, 6, 16)) @ mix)
  ref = jax.jit(model.apply)(variables, held_out)

  fwd = jax.jit(lambda f: jlr.flax.apply(model, f, held_out))

  def err(factorized):
    return float(np.linalg.norm(fwd(factorized) - ref))

  for rule in (ranks.ratio(0.4), ranks.budget(0.4)):
    aware = jlr.factorize(variables, rule, stats=st)
    plain = jlr.factorize(variables, rule)
    assert err(aware) < err(plain)
  assert jlr.summary(jlr.factorize(variables, ranks.budget(0.4), stats=st)).total_params <= \
      jlr.summary(variables).total_params


def test_mismatched_statistics_name_the_path():
  w = f32(rnd((8, 4), 0))
  with pytest.raises(ValueError, match="k: calibration statistics of shape"):
    jlr.factorize({"k": w}, 2, select="k", stats={"k": stats.Gram(np.eye(4), 1)})


class Tower(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.gelu(nn.Dense(24, name="up")(x), approximate=False)
    return nn.Dense(8, name="down")(h)


def test_masked_statistics_drop_padding_rows():
  model = Tower()
  rng = np.random.default_rng(3)
  x = f32(rng.normal(size=(2, 5, 8)))
  mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
  variables = init(model, x, seed=0)
  st = calibrate.activations(model, variables, [x], mask=lambda b: mask,
                             select=lambda p: "down" in p)
  assert set(st) == {"params/down/kernel"}
  h = np.asarray(nn.gelu(x @ variables["params"]["up"]["kernel"] + variables["params"]["up"]["bias"],
                         approximate=False))
  kept = h[mask.astype(bool)]  # (7, 24): real rows only
  np.testing.assert_allclose(st["params/down/kernel"].matrix, kept.T @ kept, rtol=1e-4, atol=1e-5)
  assert st["params/down/kernel"].count == 7


def test_cross_statistics_of_a_factorized_model():
  model = Tower()
  rng = np.random.default_rng(4)
  x = f32(rng.normal(size=(3, 4, 8)))
  variables = init(model, x, seed=1)
  small = jlr.factorize(variables, 2, select="params/up/kernel")
  st = calibrate.cross(model, small, variables, [x], select=lambda p: "down" in p)
  g, c = st["params/down/kernel"]
  p = variables["params"]
  act = lambda k: np.asarray(nn.gelu(np.asarray(x).reshape(-1, 8) @ k + p["up"]["bias"],  # noqa: E731
                                     approximate=False))
  xs, xr = act(np.asarray(small["params"]["up"]["kernel"].dense())), act(np.asarray(p["up"]["kernel"]))
  np.testing.assert_allclose(g.matrix, xs.T @ xs, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(c.matrix, xs.T @ xr, rtol=1e-4, atol=1e-5)
  assert g.count == 12


def test_whitened_beats_plain_per_layer_on_calibration_data():
  """By construction: for every kernel, the whitened factors have a lower output error
  ``||X (W - W')||`` on the calibration inputs than plain SVD at the same rank, and full
  rank reproduces the model."""
  model = Block()
  rng = np.random.default_rng(6)
  mix = rng.normal(size=(16, 16)) * np.linspace(0.05, 2, 16)
  batches = [f32(rng.normal(size=(4, 6, 16)) @ mix) for _ in range(2)]
  variables = init(model, batches[0], seed=2)
  st = calibrate.activations(model, variables, batches)
  aware = jlr.factorize(variables, ranks.ratio(0.4, min_rank=1), stats=st, damping=1e-6)
  plain = jlr.factorize(variables, ranks.ratio(0.4, min_rank=1))
  flat = lambda t: {jlr.paths.path_str(k): v for k, v in  # noqa: E731
                    jax.tree_util.tree_flatten_with_path(t, is_leaf=jlr.is_lowrank)[0]}
  w0, wa, wp = flat(variables), flat(aware), flat(plain)
  for path, g in st.items():
    w = np.asarray(w0[path], np.float64).reshape(g.matrix.shape[0], -1)
    err = lambda f: np.trace((d := w - np.asarray(f.dense(), np.float64).reshape(w.shape)).T  # noqa: E731
                             @ g.matrix @ d)
    assert err(wa[path]) <= err(wp[path]) * (1 + 1e-4), path
  full = jlr.factorize(variables, ranks.full(), stats=st)
  np.testing.assert_allclose(jax.jit(lambda f, x: jlr.flax.apply(model, f, x))(full, batches[0]),
                             jax.jit(model.apply)(variables, batches[0]), atol=1e-4)


class OneConv(nn.Module):
  conv: dict
  features: int = 5

  @nn.compact
  def __call__(self, x):
    return nn.Conv(self.features, use_bias=False, name="c", **self.conv)(x)


@pytest.mark.parametrize("conv", [
    dict(kernel_size=(3, 3), strides=2, padding="SAME"),
    dict(kernel_size=(3, 2), strides=1, padding="VALID", kernel_dilation=(2, 1)),
    dict(kernel_size=(3,), strides=1, padding=((2, 0),)),
])
def test_conv_statistics_are_im2col_grams(conv):
  """A Conv's Gram is ``P^T P`` of its im2col patches P, rows in the kernel's (*window,
  cin) order: ``P @ W.reshape(-1, cout)`` must reproduce the conv (independent check),
  and whitened factorization then minimizes the conv's output error (closed form)."""
  n = len(conv["kernel_size"])
  x = f32(rnd((4,) + (9,) * n + (3,), 2) * np.linspace(0.2, 2.0, 3))
  model = OneConv(conv)
  v = init(model, x, seed=0)
  g = calibrate.activations(model, v, [x])["params/c/kernel"]
  w = np.asarray(v["params"]["c"]["kernel"], np.float64)
  patches = im2col(np.asarray(x, np.float64), conv)
  np.testing.assert_allclose(patches @ w.reshape(-1, 5),
                             np.asarray(jax.jit(model.apply)(v, x), np.float64).reshape(-1, 5),
                             atol=1e-4)
  np.testing.assert_allclose(g.matrix, patches.T @ patches, rtol=1e-4, atol=1e-3)
  assert g.count == patches.shape[0]
  f = jlr.factorize(v, 2, select="params/c/kernel", layout="conv_channel",
                    stats={"params/c/kernel": g}, damping=1e-8)["params"]["c"]["kernel"]
  best = best_weighted(w.reshape(-1, 5), patches.T @ patches, 2)
  err = lambda w2: np.linalg.norm(patches @ (w.reshape(-1, 5) - w2))  # noqa: E731
  np.testing.assert_allclose(err(np.asarray(f.dense(), np.float64).reshape(-1, 5)), err(best),
                             rtol=1e-3)


def im2col(x, conv):
  """numpy im2col: ``(N * out positions, prod(window) * cin)`` rows in (*window, cin)
  order, for zero padding ("SAME" / "VALID" / explicit pairs), strides, kernel dilation."""
  ks = tuple(conv["kernel_size"])
  n = len(ks)
  stride = conv.get("strides", 1)
  stride = (stride,) * n if isinstance(stride, int) else tuple(stride)
  dil = conv.get("kernel_dilation", 1)
  dil = (dil,) * n if isinstance(dil, int) else tuple(dil)
  pad = conv.get("padding", "SAME")
  span = [(k - 1) * d + 1 for k, d in zip(ks, dil)]
  if pad == "VALID":
    pad = [(0, 0)] * n
  elif pad == "SAME":
    outs = [-(-x.shape[1 + i] // stride[i]) for i in range(n)]
    tot = [max((o - 1) * s + sp - x.shape[1 + i], 0) for i, (o, s, sp) in enumerate(zip(outs, stride, span))]
    pad = [(t // 2, t - t // 2) for t in tot]
  xp = np.pad(x, [(0, 0)] + list(pad) + [(0, 0)])
  outs = [(xp.shape[1 + i] - span[i]) // stride[i] + 1 for i in range(n)]
  rows = []
  for b in range(x.shape[0]):
    for pos in np.ndindex(*outs):
      start = [p * s for p, s in zip(pos, stride)]
      win = xp[(b,) + tuple(slice(st, st + sp, d) for st, sp, d in zip(start, span, dil))]
      rows.append(win.reshape(-1))  # (*window, cin) order
  return np.stack(rows)


def test_grouped_convs_get_no_statistics_and_circular_ones_see_their_padded_input():
  x = f32(rnd((2, 6, 6, 4), 3))
  grouped = OneConv(dict(kernel_size=(3, 3), feature_group_count=2), features=4)
  v = init(grouped, x, seed=0)
  assert "params/c/kernel" not in calibrate.activations(grouped, v, [x])  # not factorizable
  assert "grouped" in jlr.flax.layouts(grouped, v, x).skipped["params/c/kernel"]
  circular = OneConv(dict(kernel_size=(3, 3), padding="CIRCULAR"), features=4)
  v = init(circular, x, seed=0)
  g = calibrate.activations(circular, v, [x])["params/c/kernel"]
  wrapped = np.pad(np.asarray(x, np.float64), [(0, 0), (1, 1), (1, 1), (0, 0)], mode="wrap")
  patches = im2col(wrapped, dict(kernel_size=(3, 3), padding="VALID"))
  np.testing.assert_allclose(g.matrix, patches.T @ patches, rtol=1e-4, atol=1e-3)


class KeywordAndSubclass(nn.Module):
  """Layers called by keyword, a Dense subclass with its own __call__, and a scan stack."""

  @nn.compact
  def __call__(self, x):
    class Scaled(nn.Dense):
      def __call__(self, inputs):
        return super().__call__(inputs * 3.0)

    class Layer(nn.Module):
      @nn.compact
      def __call__(self, h, _):
        return h + jnp.tanh(nn.Dense(8, name="d")(h)), None

    h = nn.Dense(8, name="kw")(inputs=x)
    h = Scaled(8, name="scaled")(h)
    h, _ = nn.scan(Layer, variable_axes={"params": 0}, split_rngs={"params": True},
                   length=3)(name="stack")(h, None)
    return h


def test_statistics_are_the_real_inputs_whatever_the_model_code_does():
  """Keyword calls (the old method interceptor missed them), a subclass that rescales its
  input (the kernel sees 3h, not h) and a scan stack (one Gram per layer), each checked
  against the inputs computed by hand."""
  model = KeywordAndSubclass()
  x = f32(rnd((2, 5, 6), 7))
  v = init(model, x, seed=0)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # nothing is missing
    st = calibrate.activations(model, v, [x])
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), v["params"])
  xs = np.asarray(x, np.float64).reshape(-1, 6)
  h = xs @ p["kw"]["kernel"] + p["kw"]["bias"]
  np.testing.assert_allclose(st["params/kw/kernel"].matrix, xs.T @ xs, rtol=1e-5)
  np.testing.assert_allclose(st["params/scaled/kernel"].matrix, 9 * h.T @ h, rtol=1e-4)
  h = (3 * h) @ p["scaled"]["kernel"] + p["scaled"]["bias"]
  want = []
  for i in range(3):
    want.append(h.T @ h)
    h = h + np.tanh(h @ p["stack"]["d"]["kernel"][i] + p["stack"]["d"]["bias"][i])
  g = st["params/stack/d/kernel"]
  chex.assert_shape(g.matrix, (3, 8, 8))
  np.testing.assert_allclose(g.matrix, np.stack(want), rtol=1e-4, atol=1e-5)
  assert g.count == 10


def test_a_tied_head_gets_column_statistics_and_a_transposed_whitened_svd():
  """A tied LM head (``h @ E^T``) meets the embedding's columns: its inputs become a
  ``Gram(side="cols")`` equal to numpy's ``H^T H``, and factorize then minimizes the head's
  output error ``||H (E - E')^T||_F``: ``E'^T = R^-1 (R E^T)_r``, ``R = (H^T H)^{1/2}``."""
  class TiedHead(nn.Module):
    @nn.compact
    def __call__(self, ids):
      emb = nn.Embed(40, 8, name="emb")
      return emb.attend(nn.Dense(8, name="mid")(emb(ids)))

  model, ids = TiedHead(), jnp.arange(36).reshape(3, 12) % 40
  v = init(model, ids, seed=0)
  # make the head's inputs strongly anisotropic, so whitening matters
  v["params"]["mid"]["kernel"] = v["params"]["mid"]["kernel"] * jnp.array([5.0, 3, 1, .5, .2, .1, .05, .01])
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # nothing is missing: the lookup needs no statistics
    st = calibrate.activations(model, v, [ids])
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), v["params"])
  e = p["emb"]["embedding"]
  h = e[np.asarray(ids).reshape(-1)] @ p["mid"]["kernel"] + p["mid"]["bias"]
  g = st["params/emb/embedding"]
  assert g.side == "cols" and g.count == 36
  np.testing.assert_allclose(g.matrix, h.T @ h, rtol=1e-5, atol=1e-6)
  small = jlr.factorize(v, 3, select="emb", stats=st, damping=0.0)
  got = np.asarray(small["params"]["emb"]["embedding"].dense(), np.float64)
  w, q = np.linalg.eigh(h.T @ h)
  r = q @ np.diag(np.sqrt(w)) @ q.T
  pu, s, qt = np.linalg.svd(r @ e.T)
  want = (np.linalg.inv(r) @ (pu[:, :3] * s[:3]) @ qt[:3]).T
  np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-4)
  plain = np.asarray(jlr.factorize(v, 3, select="emb")["params"]["emb"]["embedding"].dense())
  err = lambda x: np.linalg.norm(h @ (e - x).T)  # the head's logit error
  assert err(got) < 0.9 * err(plain)


def test_a_kernel_used_on_both_sides_is_named():
  """``x @ W`` then ``y @ W^T`` (a tied autoencoder): the row statistics stand and the
  column use is named -- never folded in silently."""
  class Tied(nn.Module):
    @nn.compact
    def __call__(self, x):
      w = self.param("w", nn.initializers.normal(1.0), (6, 4))
      return jnp.tanh(x @ w) @ w.T

  model, x = Tied(), jnp.ones((5, 6))
  v = init(model, x, seed=0)
  with pytest.warns(stats.MissingStatisticsWarning, match="params/w cover the inputs of their rows"):
    st = calibrate.activations(model, v, [x])
  assert st["params/w"].side == "rows"
  np.testing.assert_allclose(st["params/w"].matrix, 5 * np.ones((6, 6)), rtol=1e-6)


def test_a_plan_carries_its_statistics():
  """factorize(w, plan(w, r, stats=s)) == factorize(w, r, stats=s): the plan previews and
  applies the whitened factorization; passing stats again to a plan is refused."""
  rng = np.random.default_rng(8)
  mix = rng.normal(size=(64, 64)) * np.linspace(0.01, 3, 64)
  xs = rng.normal(size=(500, 64)) @ mix
  w = {"k": f32(rng.normal(size=(64, 48)))}
  s = {"k": stats.Gram(xs.T @ xs, 500)}
  p = jlr.plan(w, 8, select="k", stats=s)
  assert p["k"].stats is s["k"]
  got, want = jlr.factorize(w, p), jlr.factorize(w, 8, select="k", stats=s)
  np.testing.assert_allclose(got["k"].dense(), want["k"].dense(), rtol=1e-5, atol=1e-5)
  plain = jlr.factorize(w, 8, select="k")
  assert float(jnp.abs(plain["k"].dense() - want["k"].dense()).max()) > 0.1  # whitening matters
  with pytest.raises(ValueError, match="a plan carries the statistics"):
    jlr.factorize(w, p, stats=s)


def test_vmapped_layers_get_one_gram_each():
  """``nn.vmap``-ed Dense layers (a stacked kernel contracted per layer through
  dot_general batch axes): one Gram per layer, each that layer's own input."""
  model = nn.vmap(nn.Dense, variable_axes={"params": 0}, split_rngs={"params": True},
                  in_axes=0, out_axes=0)(6)
  x = f32(rnd((3, 4, 5), 11))  # 3 layers, each its own (4, 5) input
  v = init(model, x, seed=0)
  assert jlr.flax.layouts(model, v, x)["params/kernel"].shape == (5, 6)
  g = calibrate.activations(model, v, [x])["params/kernel"]
  xs = np.asarray(x, np.float64)
  np.testing.assert_allclose(g.matrix, np.einsum("lti,ltj->lij", xs, xs), rtol=1e-5, atol=1e-6)
  assert g.count == 4
