import os

# Eight simulated CPU devices, so sharding tests can build 1x8, 2x4 and 8x1 meshes;
# unsharded tests run on device 0 as usual. Must be set before JAX initializes.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()

import hypothesis  # noqa: E402

hypothesis.settings.register_profile("default", max_examples=25, deadline=None, derandomize=True)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def pytest_configure(config):
  """The default run (``-m 'not slow'``) is mostly XLA compiles of small programs: it
  compiles them with LLVM at -O0 (``--xla_backend_optimization_level=0``: the same HLO
  passes, plain machine code), 4:36 -> 3:06 on 2 cores, every test passing; and with
  XLA CPU's older elemental IR emitter for fusions (``--xla_cpu_use_fusion_emitters=false``:
  the MLIR fusion emitters compile slower than the code they make saves here), which
  cuts the CPU time of the run by a quarter (351 s -> 256 s; test_any_model.py 29 -> 17). Runs
  that select the slow tests (examples, benchmarks: run time matters) keep full
  optimization and the default emitters. Runs before any test module imports JAX."""
  expr = config.getoption("markexpr", "") or ""
  if "not slow" in expr:
    for flag in ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false"):
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
