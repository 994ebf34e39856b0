import os

# Eight simulated CPU devices, so sharding tests can build 1x8, 2x4 and 8x1 meshes;
# unsharded tests run on device 0 as usual. Must be set before JAX initializes.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()

import hypothesis  # noqa: E402

hypothesis.settings.register_profile("default", max_examples=25, deadline=None, derandomize=True)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def pytest_configure(config):
  """The default run (``-m 'not slow'``) is mostly XLA compiles of small programs, so it
  compiles them cheaply; the HLO passes and the results are the same, every test passes:

  - ``--xla_backend_optimization_level=0``: LLVM at -O0, plain machine code (4:36 -> 3:06
    on 2 cores);
  - ``--xla_cpu_use_fusion_emitters=false``: XLA CPU's older elemental IR emitter for
    fusions; the MLIR fusion emitters compile slower than their code saves here (CPU
    time of the run 351 s -> 256 s);
  - ``--xla_cpu_parallel_codegen_split_count=1``: each program's code generated in one
    piece; splitting it for parallel codegen costs more than it saves with one worker per
    core (186-196 s -> 165-168 s of CPU, 97-116 s -> 88-90 s of wall).

  Runs that select the slow tests (examples, benchmarks: run time matters) keep XLA's
  defaults. Runs before any test module imports JAX."""
  expr = config.getoption("markexpr", "") or ""
  if "not slow" in expr:
    for flag in ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false",
                 "--xla_cpu_parallel_codegen_split_count=1"):
      if flag.split("=")[0] not in os.environ["XLA_FLAGS"]:  # one set by the caller wins
        os.environ["XLA_FLAGS"] += " " + flag
    single_threaded_blas()


def single_threaded_blas():
  """numpy's OpenBLAS at one thread: one xdist worker per core already, and its idle
  threads spin (test_svd.py, run alone: 31 s of CPU -> 11 s, 69 s -> 17 s of wall).
  Workers inherit the environment; a run without xdist has numpy loaded by now (a
  plugin imports it), so its pool is resized in place where threadpoolctl is there."""
  for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(var, "1")
  try:
    import threadpoolctl
  except ImportError:  # pragma: no cover - only a slower run without it
    return
  threadpoolctl.threadpool_limits(int(os.environ["OPENBLAS_NUM_THREADS"]), user_api="blas")


def require(*modules: str):
  """Skip the calling test module unless every one of ``modules`` is installed -- found
  with ``importlib.util.find_spec``, not imported: ``pytest.importorskip`` at module level
  imports the module on every xdist worker at collection (matplotlib, zarr and orbax cost
  about 2 s of CPU a worker), though only the module's tests use it."""
  import importlib.util

  def found(name):
    try:
      return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a dotted name whose parent package is missing
      return False

  missing = [m for m in modules if not found(m)]
  if missing:
    import pytest
    pytest.skip(f"{', '.join(missing)} not installed", allow_module_level=True)


def merged_reference(model, small):
  """The NNX ``model`` (uncompressed) run dense on ``small``'s factors: a clone with each
  kernel that ``small`` (``jlr.flax.nnx.compress(model, ...)``) compressed set to
  ``jlr.merge`` of its factors. ``from conftest import merged_reference`` (tests/ is on
  ``sys.path``: rootdir conftest, no package). Imports inside, so that loading this
  conftest stays free of JAX."""
  import jax
  from flax import nnx

  import jlr
  from jlr.flax import nnx as jnnx
  from jlr.paths import path_str

  ref = nnx.clone(model)
  merged = {path_str(k): v for k, v in
            jax.tree_util.tree_flatten_with_path(jlr.merge(jnnx.params(small)))[0]}
  for kp, var in jax.tree_util.tree_flatten_with_path(
      nnx.state(ref, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable))[0]:
    var.set_value(merged[path_str(kp)])
  return ref


# Cheap test inputs. Outside a trace every distinct op and shape compiles an XLA program
# (~30 ms each on 2 cores, most of the default run's time): a ``jax.random`` draw or a
# linen ``init`` compiles one per shape, and ``jnp.asarray(numpy_array)`` without a dtype
# compiles a ``stage`` program. Numpy draws placed with their own dtype compile nothing.
# ``from conftest import dense_apply, f32, init, normal``.


def normal(shape, dtype="float32", seed=None, scale=1.0):
  """A ``jax.Array`` of N(0, scale^2) draws from numpy (seeded by the shape by default)."""
  import jax.numpy as jnp
  import numpy as np

  rng = np.random.default_rng(abs(hash(tuple(shape))) % 2**32 if seed is None else seed)
  a = (rng.normal(size=shape) * scale).astype(jnp.dtype(dtype))
  return jnp.asarray(a, a.dtype)


def init(model, *args, seed=0):
  """Variables of the linen ``model`` at the shapes ``model.init(key, *args)`` gives, drawn
  from numpy: kernels and embeddings ~ N(0, 1/fan_in) (fan_in = the product of all but the
  last axis; an embedding's feature size), LayerNorm/BatchNorm ``scale`` ~ 1 + N(0, 0.01),
  ``var`` = 1, ``mean`` = 0, other vectors ~ N(0, 0.01). For tests whose truth does not
  depend on the initializer (a factorized forward against the dense one, a loss that falls)."""
  import math

  import jax
  import jax.numpy as jnp
  import numpy as np

  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(model.init, jax.random.key(seed), *args)

  def draw(path, s):
    name = str(getattr(path[-1], "key", path[-1]))
    if name == "var":
      a = np.ones(s.shape)
    elif name == "mean":
      a = np.zeros(s.shape)
    elif len(s.shape) < 2:
      a = rng.normal(size=s.shape) * 0.1 + (name == "scale")
    else:
      fan_in = s.shape[-1] if name == "embedding" else math.prod(s.shape[:-1])
      a = rng.normal(size=s.shape) / math.sqrt(fan_in)
    a = a.astype(s.dtype)
    return jnp.asarray(a, a.dtype)
  return jax.tree_util.tree_map_with_path(draw, shapes)


def dense_apply(model, factors, *args, **kwargs):
  """The independent truth for a factorized linen model: its own ``apply`` on
  ``jlr.merge(factors)``, as one compiled program (op by op, one program per op)."""
  import jax

  import jlr

  return jax.jit(lambda f, *a: model.apply(jlr.merge(f), *a, **kwargs))(factors, *args)


def f32(a):
  """``jnp.asarray(a, jnp.float32)`` cast on the host (a device cast compiles a program)."""
  import jax.numpy as jnp
  import numpy as np

  a = np.asarray(a, np.float32)
  return jnp.asarray(a, a.dtype)
