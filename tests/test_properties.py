"""Property tests over shapes, ranks, dtypes and stacked-layer axes."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jlr
from jlr.layouts import Spec
from conftest import f32


@st.composite
def kernels(draw):
  kind = draw(st.sampled_from(["dense", "conv_channel", "conv_spatial", "dense_general"]))
  if kind == "dense":
    shape = (draw(st.integers(1, 24)), draw(st.integers(1, 24)))
  elif kind == "dense_general":
    shape = tuple(draw(st.integers(1, 6)) for _ in range(3))
  else:
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 6)),
             draw(st.integers(1, 6)))
  batch = draw(st.sampled_from([(), (2,), (2, 3)]))
  dtype = draw(st.sampled_from([jnp.float32, jnp.bfloat16]))
  seed = draw(st.integers(0, 2**16))
  w = np.random.default_rng(seed).normal(size=batch + shape)
  return kind, jnp.asarray(w, dtype), len(batch)


@pytest.mark.slow  # heavy (default run <= ~3 min): make test-slow
@given(kernels(), st.floats(0.0, 1.0))
def test_factorize_is_optimal_for_every_layout_and_stack(kernel, frac):
  kind, w, b = kernel
  layout, _ = jlr.layouts.infer("kernel", w.shape, Spec(kind=kind, batch_ndim=b))
  rank = max(1, int(round(frac * layout.max_rank)))
  f = jlr.factorize({"kernel": w}, rank, select="kernel", layout=Spec(kind=kind, batch_ndim=b))["kernel"]
  m, n = layout.matrix_shape
  chex.assert_shape([f.u, f.v], [w.shape[:b] + (m, rank), w.shape[:b] + (rank, n)])
  chex.assert_type([f.u, f.v], w.dtype)
  assert f.shape == w.shape
  mats = np.asarray(layout.to_matrix(w), np.float64).reshape(-1, m, n)
  approx = np.asarray(f.matrix(), np.float64).reshape(-1, m, n)
  for a, x in zip(mats, approx):
    s = np.linalg.svd(a, compute_uv=False)
    opt = np.sqrt((s[rank:] ** 2).sum())
    err = np.linalg.norm(a - x)
    if w.dtype == jnp.float32:
      assert err <= opt * (1 + 1e-3) + 1e-4 * np.linalg.norm(a)
    else:  # bf16 factors: 8 bits of mantissa on each factor
      assert err <= opt + 2e-2 * np.linalg.norm(a)
  merged = jlr.merge({"kernel": f})["kernel"]
  chex.assert_shape(merged, w.shape)
  chex.assert_type(merged, w.dtype)


@pytest.mark.slow  # heavy (default run <= ~3 min): make test-slow
@given(kernels())
def test_full_rank_roundtrip_and_truncate_never_grows_error(kernel):
  kind, w, b = kernel
  w = w.astype(jnp.float32)
  spec = Spec(kind=kind, batch_ndim=b)
  layout, _ = jlr.layouts.infer("kernel", w.shape, spec)
  full = jlr.factorize({"kernel": w}, layout.max_rank, select="kernel", layout=spec)
  np.testing.assert_allclose(jlr.merge(full)["kernel"], w, atol=1e-4 * (1 + float(jnp.abs(w).max())))
  r = max(1, layout.max_rank // 2)
  direct = jlr.factorize({"kernel": w}, r, select="kernel", layout=spec)["kernel"]
  via = jlr.truncate(full, r)["kernel"]
  np.testing.assert_allclose(np.linalg.norm(via.matrix() - layout.to_matrix(w)),
                             np.linalg.norm(direct.matrix() - layout.to_matrix(w)),
                             rtol=1e-3, atol=1e-4)


@settings(max_examples=10)  # every example compiles its own program
@given(st.integers(1, 8), st.integers(2, 16), st.integers(2, 16))
def test_jit_with_static_rank_equals_eager(rank, m, n):
  rank = min(rank, m, n)
  w = f32(np.random.default_rng(m * n).normal(size=(m, n)))
  fn = jax.jit(lambda p: jlr.factorize(p, rank, select="kernel"))
  got, want = fn({"kernel": w})["kernel"], jlr.factorize({"kernel": w}, rank, select="kernel")["kernel"]
  np.testing.assert_allclose(got.matrix(), want.matrix(), rtol=1e-4, atol=1e-4)
