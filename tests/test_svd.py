import inspect

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import f32
from jlr import svd


def run(fn, *args, **static):
  """``fn(*args, **static)`` as one compiled program (op by op it compiles a program per
  op), its outputs as numpy arrays for the checks."""
  names = [n for n in inspect.signature(fn).parameters if n not in static][:len(args)]
  call = lambda *a: fn(**dict(zip(names, a)), **static)  # noqa: E731
  return jax.tree.map(np.asarray, jax.jit(call)(*args))


def product(u, s, vt):
  """``u diag(s) vt`` in float64 numpy (batched)."""
  u, s, vt = (np.asarray(x, np.float64) for x in (u, s, vt))
  return (u * s[..., None, :]) @ vt


def decaying(m, n, seed=0, decay=0.8):
  rng = np.random.default_rng(seed)
  p, _ = np.linalg.qr(rng.normal(size=(m, m)))
  q, _ = np.linalg.qr(rng.normal(size=(n, n)))
  k = min(m, n)
  s = decay ** np.arange(k)
  return (p[:, :k] * s) @ q[:, :k].T


def optimal_error(a, r):
  s = np.linalg.svd(a, compute_uv=False)
  return np.sqrt((s[r:] ** 2).sum())


@pytest.mark.parametrize("m,n,r", [(40, 30, 5), (30, 40, 30), (17, 17, 1)])
def test_exact_is_eckart_young_optimal(m, n, r):
  a = np.random.default_rng(1).normal(size=(m, n))
  u, s, vt = run(svd.exact, f32(a), rank=r)
  chex.assert_shape([u, s, vt], [(m, r), (r,), (r, n)])
  err = np.linalg.norm(a - product(u, s, vt))
  np.testing.assert_allclose(err, optimal_error(a, r), rtol=1e-4, atol=1e-4)


def test_randomized_within_5_percent_of_optimal():
  a = decaying(300, 200)
  for r in (5, 20, 50):
    u, s, vt = run(svd.randomized, f32(a), jax.random.key(0), rank=r)
    err = np.linalg.norm(a - product(u, s, vt))
    assert err <= 1.05 * optimal_error(a, r) + 1e-6


def test_randomized_needs_key():
  with pytest.raises(ValueError, match="key"):
    svd.truncated(jnp.ones((4, 4)), 2, method="randomized")


def test_batched_and_bf16_computes_in_float32():
  a = jnp.asarray(np.random.default_rng(0).normal(size=(3, 12, 8)), jnp.bfloat16)
  u, s, vt = jax.jit(svd.exact, static_argnums=1)(a, 4)
  chex.assert_shape([u, s, vt], [(3, 12, 4), (3, 4), (3, 4, 8)])
  chex.assert_type([u, s, vt], jnp.float32)
  ref = np.linalg.svd(np.asarray(a, np.float32), compute_uv=False)[:, :4]
  np.testing.assert_allclose(s, ref, rtol=1e-4)


def test_of_product_matches_svd_of_the_product_without_forming_it():
  rng = np.random.default_rng(2)
  u, v = rng.normal(size=(50, 6)), rng.normal(size=(6, 40))
  p, s, qt = run(svd.of_product, f32(u), f32(v))
  np.testing.assert_allclose(s, np.linalg.svd(u @ v, compute_uv=False)[:6], rtol=1e-4)
  np.testing.assert_allclose((p * s) @ qt, u @ v, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(p.T @ p, np.eye(6), atol=1e-5)


def test_jit_with_static_rank():
  f = jax.jit(svd.truncated, static_argnames=("rank", "method"))
  u, s, vt = f(jnp.ones((6, 5)), rank=2)
  chex.assert_shape(u, (6, 2))


def test_regression_reduces_to_weighted_and_solves_shifted_least_squares():
  rng = np.random.default_rng(7)
  x = rng.normal(size=(300, 10)) * np.linspace(0.2, 2.0, 10)
  w = rng.normal(size=(10, 6))
  g = x.T @ x
  u, s, vt = run(svd.regression, f32(w), f32(g), f32(g), rank=3, damping=1e-3)
  u2, s2, vt2 = run(svd.weighted, f32(w), *svd.whitener(gram=g, damping=1e-3), rank=3)
  np.testing.assert_allclose(product(u, s, vt), product(u2, s2, vt2), atol=1e-4)
  # shifted inputs X' = X + noise: full rank is least squares of X W on X' (numpy truth),
  # and a low rank is at least as good on the shifted objective as ignoring the shift
  xp = x + 0.3 * rng.normal(size=x.shape)
  u, s, vt = run(svd.regression, f32(w), f32(xp.T @ xp), f32(xp.T @ x), rank=10, damping=1e-9)
  np.testing.assert_allclose(product(u, s, vt), np.linalg.lstsq(xp, x @ w, rcond=None)[0],
                             atol=1e-3)
  err = lambda w2: np.linalg.norm(xp @ w2 - x @ w)  # noqa: E731
  u, s, vt = run(svd.regression, f32(w), f32(xp.T @ xp), f32(xp.T @ x), rank=3, damping=1e-9)
  u2, s2, vt2 = run(svd.weighted, f32(w), *svd.whitener(gram=xp.T @ xp, damping=1e-9), rank=3)
  assert err(product(u, s, vt)) < err(product(u2, s2, vt2))


def test_row_weights_whiten_as_a_diagonal_vector():
  """FWSVD's R = diag(sqrt(w)) is held as its diagonal column (an m x m matrix for a
  49k-row embedding is 9.7 GB); weighted() with it equals numpy's best rank-r of diag(s)
  W, per layer and with one weighting shared by a stack; whiten() tells it from a
  matrix by shape alone (an m x m Gram whitener beside an m-layer stack included)."""
  rng = np.random.default_rng(3)
  w = rng.normal(size=(2, 40, 12))  # stacked: one weighting per layer
  wts = rng.uniform(0.01, 5.0, size=(2, 40))
  r, r_inv = svd.whitener(row_weights=wts, damping=0.0)
  chex.assert_shape([r, r_inv], (2, 40, 1))
  u, s, vt = run(svd.weighted, f32(w), r, r_inv, rank=3)
  shared = run(svd.weighted, f32(w), r[0], r_inv[0], rank=3)
  for i in range(2):
    d = np.sqrt(wts[i])
    p, sv, qt = np.linalg.svd(d[:, None] * w[i])
    want = (p[:, :3] * sv[:3]) @ qt[:3] / d[:, None]
    np.testing.assert_allclose(product(u[i], s[i], vt[i]), want, rtol=1e-4, atol=1e-4)
    d0 = np.sqrt(wts[0])
    p, sv, qt = np.linalg.svd(d0[:, None] * w[i])
    want = (p[:, :3] * sv[:3]) @ qt[:3] / d0[:, None]
    np.testing.assert_allclose(product(shared[0][i], shared[1][i], shared[2][i]), want,
                               rtol=1e-4, atol=1e-4)
  g = rng.normal(size=(4, 4))  # a matrix whitener beside a 4-layer stack of 4-row kernels
  a = rng.normal(size=(4, 4, 3))
  np.testing.assert_allclose(svd.whiten(jnp.asarray(g), jnp.asarray(a)), g @ a, rtol=1e-5)


@pytest.mark.parametrize("cond", [1.0, 1e3, 1e5])
def test_lu_basis_spans_the_columns_and_rows_at_unit_scale(cond):
  """The pivoted LU's L against numpy's Householder QR: the same span (all principal
  angles ~0), entries bounded by 1, a unit entry per column; rows of a wide matrix alike."""
  rng = np.random.default_rng(0)
  p, _ = np.linalg.qr(rng.normal(size=(3, 400, 40)))
  r, _ = np.linalg.qr(rng.normal(size=(3, 40, 40)))
  y = (p * np.logspace(0, -np.log10(cond), 40)) @ r
  for x, rows in ((y, False), (np.swapaxes(y, -1, -2), True)):
    basis = run(svd._lu_basis, f32(x), rows=rows).astype(np.float64)
    chex.assert_shape(basis, x.shape)
    cols = np.swapaxes(basis, -1, -2) if rows else basis
    assert np.abs(cols).max() <= 1 + 1e-6
    np.testing.assert_allclose(np.abs(cols).max(-2), 1.0, atol=1e-6)
    q, _ = np.linalg.qr(cols)
    cosines = np.linalg.svd(np.swapaxes(np.linalg.qr(y)[0], -1, -2) @ q, compute_uv=False)
    np.testing.assert_allclose(cosines, 1.0, atol=1e-3)


def test_randomized_keeps_a_steep_spectrum_optimal():
  """``s_i = e^{-i/6}``: the two power iterations amplify ``s_1 / s_w`` by ``e^{40}``, far
  past float32; the LU normalization between products keeps the tail resolved."""
  rng = np.random.default_rng(3)
  u, _ = np.linalg.qr(rng.normal(size=(300, 200)))
  v, _ = np.linalg.qr(rng.normal(size=(200, 200)))
  s = np.exp(-np.arange(200) / 6.0)
  a = (u * s) @ v.T
  for r in (10, 30):
    uu, ss, vt = run(svd.randomized, f32(a), jax.random.key(0), rank=r)
    err = np.linalg.norm(a - product(uu, ss, vt))
    assert err <= 1.05 * np.sqrt(np.sum(s[r:] ** 2)), (r, err)


def test_randomized_of_a_rank_deficient_matrix_is_finite_and_exact():
  rng = np.random.default_rng(2)
  a = rng.normal(size=(120, 6)) @ rng.normal(size=(6, 90))  # rank 6 < sketch width 30
  u, s, vt = run(svd.randomized, f32(a), jax.random.key(0), rank=20)
  chex.assert_tree_all_finite((u, s, vt))
  np.testing.assert_allclose(product(u, s, vt), a, atol=1e-3 * np.abs(a).max())
  np.testing.assert_allclose(np.asarray(s)[:6], np.linalg.svd(a, compute_uv=False)[:6], rtol=1e-4)


@pytest.mark.parametrize("shape", [(3, 20, 90), (40, 50)])  # batched and wide; near-square
def test_wide_svd_equals_numpy_svd(shape):
  b = np.random.default_rng(4).normal(size=shape).astype(np.float32)
  b[..., 0, :] *= 100.0  # a spread spectrum: the small singular values must survive
  u, s, vt = run(svd.wide_svd, jnp.asarray(b, b.dtype))
  k = min(shape[-2:])
  chex.assert_shape((u, s, vt), (shape[:-1] + (k,), shape[:-2] + (k,), shape[:-2] + (k, shape[-1])))
  s_np = np.linalg.svd(b.astype(np.float64), compute_uv=False)
  np.testing.assert_allclose(s, s_np, rtol=1e-4, atol=1e-5 * s_np.max())
  np.testing.assert_allclose((np.asarray(u) * np.asarray(s)[..., None, :]) @ vt, b,
                             atol=1e-4 * np.abs(b).max())
  eye = np.broadcast_to(np.eye(k), shape[:-2] + (k, k))
  np.testing.assert_allclose(np.swapaxes(u, -1, -2) @ u, eye, atol=1e-5)
  np.testing.assert_allclose(vt @ np.swapaxes(vt, -1, -2), eye, atol=1e-5)


def _spectrum_matrix(s, n, seed=0):
  rng = np.random.default_rng(seed)
  p, _ = np.linalg.qr(rng.normal(size=(len(s), len(s))))
  q, _ = np.linalg.qr(rng.normal(size=(n, len(s))))
  return ((p * s) @ q.T).astype(np.float32)


def test_gram_svd_is_optimal_where_float32_resolves_it_and_falls_back_where_not():
  """The eigh route of the small SVD against float64 numpy where its test passes; a steep
  spectrum (s_w / s_1 = e^-30, beyond float32's Gram) or one such matrix in a batch sends
  the whole batch to the Householder SVD."""
  w, n, r = 58, 384, 48
  flat = _spectrum_matrix(np.linspace(1.0, 0.3, w), n)
  steep = _spectrum_matrix(np.exp(-np.arange(w) * 30 / w), n, seed=1)
  lam = lambda b: np.linalg.eigvalsh(b.astype(np.float64) @ b.T.astype(np.float64))[::-1]  # noqa: E731
  resolves = lambda b: bool(run(svd._gram_resolves, f32(lam(b)), rank=r, n=n))  # noqa: E731
  assert resolves(flat) and not resolves(steep)
  e, s, vt = run(svd._gram_svd, f32(flat), rank=r)
  chex.assert_shape((e, s, vt), ((w, w), (w,), (w, n)))
  s64 = np.linalg.svd(flat.astype(np.float64), compute_uv=False)
  np.testing.assert_allclose(s[:r], s64[:r], rtol=1e-4)
  np.testing.assert_allclose(np.asarray(vt[:r]) @ np.asarray(vt[:r]).T, np.eye(r), atol=1e-4)
  err = np.linalg.norm(flat - product(e[:, :r], s[:r], vt[:r]))
  assert err <= 1.0005 * np.sqrt((s64[r:] ** 2).sum())
  both = f32(np.stack([flat, steep]))
  for got, want in zip(run(svd._gram_svd, both, rank=r), run(svd.wide_svd, both)):
    np.testing.assert_array_equal(got, want)


# --------------------------------------------------------------------- small-side Gram routes


def test_route_takes_the_cheapest_of_sketch_gram_sketch_and_gram():
  """The cost model's choices at the shapes its timings came from (see ``svd._route``)."""
  assert svd._route(384, 384, 48, 58, 2) == "sketch"  # square: the Gram costs a full product
  assert svd._route(384, 1536, 76, 86, 2) == "gram_sketch"
  assert svd._route(3072, 768, 307, 317, 2) == "gram_sketch"
  assert svd._route(768, 3072, 61, 71, 2) == "sketch"  # low rank: the skinny sketch is cheap
  assert svd._route(256, 1024, 250, 256, 2) == "gram"  # near full rank: eigh the Gram
  assert svd._route(64, 256, 64, 64, 2) == "sketch"  # full rank: no tail to test


def _force_route(monkeypatch, route):
  monkeypatch.setattr(svd, "_route", lambda *args: route)


@pytest.mark.parametrize("route,shape", [  # wide and tall, batched; each route one of them
    ("gram", (2, 64, 256)), ("gram_sketch", (2, 256, 64)),  # by default, all under -m slow
    pytest.param("gram", (2, 256, 64), marks=pytest.mark.slow),
    pytest.param("gram_sketch", (2, 64, 256), marks=pytest.mark.slow)])
def test_gram_routes_are_optimal_where_float32_resolves_the_gram(monkeypatch, route, shape):
  """Both Gram routes against numpy's float64 SVD on a decaying spectrum: the full Gram is
  the Eckart-Young optimum, the Gram sketch (power 2 + 2 n_iter) within 0.1% of it; both
  return orthonormal factors and the leading singular values."""
  _force_route(monkeypatch, route)
  m, n = shape[-2:]
  r = int(0.25 * m * n / (m + n))
  a = np.stack([decaying(m, n, seed=i, decay=0.95) for i in range(shape[0])]).astype(np.float32)
  u, s, vt = run(svd.randomized, f32(a), jax.random.key(0), rank=r)
  chex.assert_shape((u, s, vt), (shape[:1] + (m, r), shape[:1] + (r,), shape[:1] + (r, n)))
  chex.assert_type((u, s, vt), jnp.float32)
  tol = 1e-4 if route == "gram" else 1e-3
  for i in range(shape[0]):
    err = np.linalg.norm(a[i] - product(u[i], s[i], vt[i]))
    assert err <= (1 + tol) * optimal_error(a[i].astype(np.float64), r)
    np.testing.assert_allclose(s[i], np.linalg.svd(a[i].astype(np.float64), compute_uv=False)[:r],
                               rtol=tol)
    np.testing.assert_allclose(u[i].T @ u[i], np.eye(r), atol=1e-5)
    np.testing.assert_allclose(vt[i] @ vt[i].T, np.eye(r), atol=1e-5)


def test_gram_sketch_is_a_sharper_power_than_the_sketch(monkeypatch):
  """On a flat Gaussian spectrum (the hardest case) the Gram sketch's ``(A A^T)^(1 + q)``
  start beats the sketch's ``(A A^T)^q A`` at the same ``n_iter`` -- and its key stream
  is the one ``randomized`` documents: batched equals the per-matrix loop."""
  a = np.random.default_rng(4).normal(size=(3, 96, 384)).astype(np.float32)
  r = 20
  keys = jax.random.split(jax.random.key(1), 3)

  def errors(route):
    _force_route(monkeypatch, route)
    one = jax.jit(lambda a, k: svd.randomized(a, r, k, n_iter=1))  # traced here: this route
    u, s, vt = jax.tree.map(np.asarray, one(jnp.asarray(a, a.dtype), keys))
    loop = [one(jnp.asarray(a[i], a.dtype), keys[i]) for i in range(3)]
    for i, one in enumerate(loop):
      np.testing.assert_allclose(product(*one), product(u[i], s[i], vt[i]), atol=1e-4)
    return [np.linalg.norm(a[i] - product(u[i], s[i], vt[i])) / optimal_error(a[i], r)
            for i in range(3)]

  sketch, gram = errors("sketch"), errors("gram_sketch")
  assert max(gram) <= 1.05 and max(sketch) <= 1.1
  assert all(g < s for g, s in zip(gram, sketch))


@pytest.mark.parametrize("route", ["gram", "gram_sketch"])
def test_gram_routes_fall_back_to_the_sketch_where_float32_cannot_resolve_it(monkeypatch, route):
  """Low rank plus 1e-5 noise: the Gram's tail is below float32 rounding, so the batch
  takes the sketch (same key: the same approximation as the sketch alone, up to the
  rounding of the noise directions), within 1.05x optimal."""
  rng = np.random.default_rng(6)
  a = np.stack([rng.normal(size=(64, 4)) @ rng.normal(size=(4, 256)) + 1e-5 * rng.normal(size=(64, 256))
                for _ in range(2)]).astype(np.float32)
  r = int(0.5 * 64 * 256 / 320)
  key = jax.random.key(3)
  lam = np.linalg.svd(a.astype(np.float64), compute_uv=False) ** 2
  assert not run(svd._gram_resolves, f32(lam), rank=r, n=256, slack=svd._FULL_GRAM_SLACK).any()
  _force_route(monkeypatch, route)
  got = run(svd.randomized, f32(a), key, rank=r)
  _force_route(monkeypatch, "sketch")
  sketch = run(svd.randomized, f32(a), key, rank=r)
  approx = lambda f: product(*f)  # noqa: E731
  np.testing.assert_allclose(approx(got), approx(sketch), atol=1e-5 * np.abs(a).max())
  np.testing.assert_allclose(got[1][:, :4], sketch[1][:, :4], rtol=1e-5)
  for i in range(2):
    err = np.linalg.norm(a[i] - product(got[0][i], got[1][i], got[2][i]))
    assert err <= 1.05 * optimal_error(a[i].astype(np.float64), r)
