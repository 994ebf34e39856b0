"""Fuzzing the public transforms: every input either succeeds with a verified result or
raises ValueError/TypeError naming the leaf path -- never a crash, hang or silent NaN."""

import re

import pytest

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jlr
from jlr import ranks

# casting 1e30 to f16/bf16 and NaN to int overflows on purpose: those are the cases
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::UserWarning")

CASES = {"tried": 0, "ok": 0, "refused": 0}
NAMES = ["kernel", "embedding", "bias", "scale", "w"]
DTYPES = ["float16", "bfloat16", "float32", "float64", "int32"]


@st.composite
def leaves(draw):
  kind = draw(st.sampled_from(["array", "array", "array", "int", "str", "none"]))
  if kind == "int":
    return draw(st.integers(-3, 3))
  if kind == "str":
    return "text"
  if kind == "none":
    return None
  ndim = draw(st.integers(0, 4))
  shape = tuple(draw(st.integers(0 if draw(st.booleans()) and ndim else 1, 6)) for _ in range(ndim))
  dtype = draw(st.sampled_from(DTYPES))
  special = draw(st.sampled_from(["normal", "normal", "zeros", "lowrank", "nan", "inf", "huge"]))
  rng = np.random.default_rng(draw(st.integers(0, 1000)))
  a = rng.normal(size=shape)
  if special == "zeros":
    a = np.zeros(shape)
  elif special == "lowrank" and ndim >= 2 and a.size:
    a = np.einsum("...i,...j->...ij", a[..., 0], a[..., 0, :]) if ndim == 2 else a * 0 + 1
  elif special in ("nan", "inf") and a.size:
    a.flat[draw(st.integers(0, a.size - 1))] = np.nan if special == "nan" else np.inf
  elif special == "huge":
    a = a * 1e30
  return (a, dtype)


@st.composite
def trees(draw):
  n = draw(st.integers(0, 4))
  return {f"layer{i}": {draw(st.sampled_from(NAMES)): draw(leaves())} for i in range(n)}


RULES = st.one_of(
    st.integers(-1, 8),
    st.sampled_from([ranks.ratio(0.3), ranks.energy(0.9), ranks.value(0.1), ranks.budget(0.5),
                     ranks.full(), ranks.round_up(ranks.fixed(2), 4)]),
    st.sampled_from([0.5, "4", None]),
)


def materialize(tree):
  def one(x):
    if isinstance(x, tuple):
      a, dtype = x
      return jnp.asarray(a, dtype)
    return x
  return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, tuple))


def paths_of(tree):
  return [jlr.paths.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def verify(tree, out):
  for (kp, x), (_, y) in zip(jax.tree_util.tree_flatten_with_path(tree)[0],
                             jax.tree_util.tree_flatten_with_path(out, is_leaf=jlr.is_lowrank)[0]):
    if not jlr.is_lowrank(y):
      assert y is x  # untouched leaves are the same objects
      continue
    assert y.shape == x.shape and y.dtype == x.dtype
    u, v = np.asarray(y.u, np.float64), np.asarray(y.v, np.float64)
    assert np.isfinite(u).all() and np.isfinite(v).all(), "silent NaN/Inf in factors"
    if x.dtype in (jnp.float32, jnp.float64):
      mat = np.asarray(y.layout.to_matrix(x), np.float64)
      s = np.linalg.svd(mat, compute_uv=False)
      opt = np.sqrt((s[y.rank:] ** 2).sum())
      err = np.linalg.norm(mat - u @ v)
      assert err <= opt * 1.001 + 1e-4 * np.linalg.norm(mat) + 1e-6
  merged = jlr.merge(out)
  for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(merged)):
    if hasattr(a, "shape"):
      assert a.shape == b.shape and a.dtype == b.dtype


def check(raw, rank, select, x64):
  CASES["tried"] += 1
  with jax.enable_x64(x64):
    tree = materialize(raw)
    try:
      out = jlr.factorize(tree, rank, select=select)
    except (ValueError, TypeError) as e:
      CASES["refused"] += 1
      msg = str(e)
      named = any(re.search(rf"(^|\s){re.escape(p)}\b", msg) for p in paths_of(tree))
      about_args = any(w in msg for w in ("rank", "select", "budget", "pattern"))
      assert named or about_args, msg
      return
    CASES["ok"] += 1
    verify(tree, out)
    report = jlr.summary(out)
    assert report.total_params <= report.dense_total_params or select is not None


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(trees(), RULES, st.sampled_from([None, "kernel", ["w", "embedding"]]), st.booleans())
def test_factorize_fuzz(raw, rank, select, x64):
  check(raw, rank, select, x64)


def check_rerank(raw, rank, x64):
  """truncate / lod.shrink / lod.extract / summary on a factorized tree: verified, or a
  clear error that names the leaf path or the argument."""
  CASES["tried"] += 1
  with jax.enable_x64(x64):
    tree = materialize(raw)
    try:
      fac = jlr.factorize(tree, ranks.full(), select="kernel")
    except (ValueError, TypeError):
      CASES["refused"] += 1
      return
    try:
      out = jlr.truncate(fac, rank)
    except (ValueError, TypeError) as e:
      CASES["refused"] += 1
      msg = str(e)
      named = any(re.search(rf"(^|\s){re.escape(p)}\b", msg) for p in paths_of(tree))
      assert named or any(w in msg for w in ("rank", "budget", "jit")), msg
      return
    CASES["ok"] += 1
    for f, g in zip(jax.tree.leaves(fac, is_leaf=jlr.is_lowrank),
                    jax.tree.leaves(out, is_leaf=jlr.is_lowrank)):
      if not jlr.is_lowrank(g):
        continue
      assert g.rank <= f.rank and g.layout == f.layout and g.dtype == f.dtype
      u, v = np.asarray(g.u, np.float64), np.asarray(g.v, np.float64)
      assert np.isfinite(u).all() and np.isfinite(v).all(), "silent NaN/Inf after truncate"
      if f.dtype in (jnp.float32, jnp.float64):
        mat = np.asarray(f.u, np.float64) @ np.asarray(f.v, np.float64)
        s = np.linalg.svd(mat, compute_uv=False)
        opt = np.sqrt((s[g.rank:] ** 2).sum())
        assert np.linalg.norm(mat - u @ v) <= opt * 1.001 + 1e-4 * np.linalg.norm(mat) + 1e-6
    shrunk = jlr.lod.shrink(out, 1e-3)
    for leaf in jax.tree.leaves(shrunk, is_leaf=jlr.is_lowrank):
      if jlr.is_lowrank(leaf):
        assert np.isfinite(np.asarray(leaf.u, np.float64)).all() and leaf.rank >= 1
    half = jlr.lod.extract(shrunk, width=0.5)
    assert jlr.summary(half).total_params <= jlr.summary(shrunk).total_params


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(trees(), RULES, st.booleans())
def test_truncate_shrink_extract_fuzz(raw, rank, x64):
  check_rerank(raw, rank, x64)


def test_report_case_count():
  print(f"\nfuzz: {CASES['tried']} cases, {CASES['ok']} succeeded (verified), "
        f"{CASES['refused']} refused with a ValueError/TypeError")
  assert CASES["tried"] >= 200 and CASES["ok"] > 10 and CASES["refused"] > 10
