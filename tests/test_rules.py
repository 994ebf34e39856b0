"""The one registry of primitive rules (jlr.rules): both halves for every built-in
primitive, an optimization barrier read and run alike, and a user's custom primitive
refused until it has a rule, then run factorized."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.extend import core as jcore
from jax.interpreters import mlir

import jlr
from conftest import f32


def test_every_builtin_rule_has_both_halves():
  reg = jlr.rules.registered()
  assert len(reg) >= 15
  for prim, rule in reg.items():
    assert rule.layout is not None and rule.run is not None, prim.name


def _params(seed=0):
  return {"kernel": f32(np.random.default_rng(seed).normal(size=(12, 10)))}


def _check_read_and_run(fn, x):
  p = _params()
  lay = jlr.usage.read(fn, p, x)
  assert "kernel" in lay, lay.skipped
  small = jlr.factorize(p, 3, layout=lay)
  got = jlr.factorized(fn, strict=True)(small, x)
  np.testing.assert_allclose(got, fn(jlr.merge(small), x), rtol=1e-5, atol=1e-5)


def test_optimization_barrier_is_read_and_run_alike():
  _check_read_and_run(lambda p, x: x @ lax.optimization_barrier(p["kernel"]), jnp.ones((2, 12)))


_mark_p = jcore.Primitive("jlr_test_mark")  # an identity a user's library might emit
_mark_p.def_impl(lambda w: w)
_mark_p.def_abstract_eval(lambda w: jax.core.ShapedArray(w.shape, w.dtype))
mlir.register_lowering(_mark_p, lambda ctx, w: [w])


def test_a_custom_primitive_is_refused_until_registered_then_runs_factorized():
  fn = lambda p, x: x @ _mark_p.bind(p["kernel"])  # noqa: E731
  x, p = jnp.ones((2, 12)), _params()
  lay = jlr.usage.read(fn, p, x)
  assert "used by `jlr_test_mark`" in lay.skipped["kernel"]
  small = jlr.factorize(p, 3, select="kernel")
  with pytest.raises(jlr.DensifiedError, match="kernel: no factorized rule for `jlr_test_mark`"):
    jlr.factorized(fn, strict=True)(small, x)
  jlr.rules.register(_mark_p, **jlr.rules.passthrough())
  try:
    _check_read_and_run(fn, x)
    with pytest.raises(ValueError, match="already registered"):
      jlr.rules.register(_mark_p, **jlr.rules.passthrough())
  finally:
    jlr.rules.unregister(_mark_p)
  assert jlr.rules.get(_mark_p) is None
