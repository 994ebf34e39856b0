"""Transforms and steps on 1x8, 2x4 and 8x1 meshes of simulated CPU devices (see conftest)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jlr
from jlr import lod, ranks, sharding

MESHES = ["data=1,model=8", "data=2,model=4", "data=8,model=1"]


def params():
  rng = np.random.default_rng(0)
  return {"enc": {"kernel": jnp.asarray(rng.normal(size=(64, 32)), jnp.float32),
                  "bias": jnp.asarray(rng.normal(size=(32,)), jnp.float32)},
          "dec": {"kernel": jnp.asarray(rng.normal(size=(32, 48)), jnp.float32)}}


def test_enough_devices():
  assert len(jax.devices()) >= 8


def test_make_mesh():
  mesh = sharding.make_mesh("data=2,model=4")
  assert dict(mesh.shape) == {"data": 2, "model": 4}
  with pytest.raises(ValueError, match="needs 64 devices"):
    sharding.make_mesh("data=8,model=8")


@pytest.mark.parametrize("mesh_spec", MESHES)
@pytest.mark.parametrize("style", ["fsdp", "tp", "fsdp_tp"])
def test_factorize_merge_truncate_same_numbers_and_declared_shardings(mesh_spec, style):
  mesh = sharding.make_mesh(mesh_spec)
  p = params()
  sp = sharding.place(p, mesh, style)
  f_ref, f = jlr.factorize(p, 8), jlr.factorize(sp, 8)
  chex.assert_trees_all_close(jax.tree.map(np.asarray, f), jax.tree.map(np.asarray, f_ref),
                              rtol=1e-4, atol=1e-5)
  enc = f["enc"]["kernel"]
  u_spec, v_spec = sharding.lowrank_specs(mesh, enc, style)
  assert enc.u.sharding.is_equivalent_to(NamedSharding(mesh, u_spec), 2)
  assert enc.v.sharding.is_equivalent_to(NamedSharding(mesh, v_spec), 2)
  if style == "fsdp_tp" and mesh_spec == "data=2,model=4":
    assert u_spec == P("data", None) and v_spec == P(None, "model")
  t = jlr.truncate(f, 4)
  chex.assert_trees_all_close(jax.tree.map(np.asarray, t),
                              jax.tree.map(np.asarray, jlr.truncate(f_ref, 4)), rtol=1e-4, atol=1e-5)
  assert t["enc"]["kernel"].u.sharding.is_equivalent_to(NamedSharding(mesh, u_spec), 2)
  m = jlr.merge(t)
  np.testing.assert_allclose(m["enc"]["kernel"], jlr.merge(jlr.truncate(f_ref, 4))["enc"]["kernel"],
                             rtol=1e-4, atol=1e-5)
  assert m["enc"]["kernel"].sharding.is_equivalent_to(sp["enc"]["kernel"].sharding, 2)


@pytest.mark.parametrize("mesh_spec", MESHES)
def test_lod_step_sharded_matches_unsharded(mesh_spec):
  mesh = sharding.make_mesh(mesh_spec)
  p = lod.init(params())
  x = jnp.asarray(np.random.default_rng(1).normal(size=(16, 64)), jnp.float32)
  tx = optax.adam(1e-2)

  def loss(p, key):
    sub = lod.sample(p, key)
    h = x @ sub["enc"]["kernel"].u @ sub["enc"]["kernel"].v + p["enc"]["bias"]
    y = h @ sub["dec"]["kernel"].u @ sub["dec"]["kernel"].v
    return jnp.mean(y ** 2) + 1e-3 * lod.group_lasso(p)

  @jax.jit
  def step(p, s, x_, key):
    g = jax.grad(loss)(p, key)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  def run(p, x_):
    s = tx.init(p)
    for i in range(3):
      p, s = step(p, s, x_, jax.random.key(i))
    return p

  ref = run(p, x)
  sp = sharding.place(p, mesh, "fsdp_tp")
  got = run(sp, jax.device_put(x, sharding.batch_sharding(mesh)))
  chex.assert_trees_all_close(jax.tree.map(np.asarray, got), jax.tree.map(np.asarray, ref),
                              rtol=1e-4, atol=1e-5)
  assert len(got["enc"]["kernel"].u.sharding.device_set) == 8  # not gathered to one device


def test_indivisible_dimension_is_replicated():
  mesh = sharding.make_mesh("data=8,model=1")
  spec = sharding.kernel_spec(mesh, (12, 16), "fsdp")
  assert spec == P(None, None)


_SHARDED_GROUP = """
import jax, jax.numpy as jnp, numpy as np, jlr
rng = np.random.default_rng(0)
tree = {f"l{i}": {"kernel": jnp.asarray(rng.normal(size=(256, 256)), jnp.float32)} for i in range(4)}
placed = jlr.sharding.place(tree, jlr.sharding.make_mesh("data=4,model=2"), "fsdp_tp")
rule, key = jlr.ranks.ratio(0.25), jax.random.key(0)
got = jlr.factorize(placed, rule, method="randomized", key=key)
want = jlr.factorize(tree, rule, method="randomized", key=key)
for k in tree:
  np.testing.assert_allclose(got[k]["kernel"].matrix(), want[k]["kernel"].matrix(), atol=1e-4)
print("done")
"""


def test_sharded_same_shape_kernels_factorize_without_deadlock():
  """Four same-shape kernels placed over 8 simulated devices: stacked, each device's
  partition ran a batched LAPACK LU and jaxlib 0.10's CPU kernels deadlocked (every pool
  thread waiting); factorize gives such kernels a call each (``_spans_cpu_devices``),
  equal to the unsharded result. In a subprocess, so a hang fails the test."""
  import os
  import subprocess
  import sys

  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  out = subprocess.run([sys.executable, "-c", _SHARDED_GROUP], capture_output=True, text=True,
                       timeout=120, env=env)
  assert out.returncode == 0 and "done" in out.stdout, out.stderr[-2000:]
