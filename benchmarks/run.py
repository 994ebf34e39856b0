"""Run every benchmark figure, then regenerate the README block from the JSON results.

    python benchmarks/run.py [--quick] [--only NAME ...]

Each figure runs in its own process (``python benchmarks/<name>.py [--quick]``), so JAX
flags (scaling's 8 simulated devices) and memory do not leak between figures. Scripts
written by other contributors (``trp_overhead``, ``lod_overhead``, ``accuracy``) run
when present and are skipped with a note when absent. A failing figure is reported
and the others still run; the exit code is non-zero if any failed.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
FIGURES = ("factorize_speed", "inference_speed", "trp_overhead", "lod_overhead", "accuracy",
           "memory", "scaling", "llm_decode")


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true", help="small settings (~20 min on 2 cores)")
  p.add_argument("--only", nargs="+", default=None, choices=FIGURES)
  p.add_argument("--no-readme", action="store_true")
  a = p.parse_args(argv)
  status, t0 = {}, time.perf_counter()
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
  for name in a.only or FIGURES:
    script = HERE / f"{name}.py"
    if not script.is_file():
      print(f"== {name}: skipped ({script.name} not present)", flush=True)
      status[name] = "absent"
      continue
    cmd = [sys.executable, str(script)] + (["--quick"] if a.quick else [])
    print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
    t = time.perf_counter()
    rc = subprocess.call(cmd, cwd=HERE.parent, env=env)
    status[name] = "ok" if rc == 0 else f"failed (exit {rc})"
    print(f"== {name}: {status[name]} in {time.perf_counter() - t:.0f} s", flush=True)
  print(f"\nall figures: {time.perf_counter() - t0:.0f} s")
  for name, s in status.items():
    print(f"  {name}: {s}")
  if not a.no_readme:
    import readme
    readme.main([])
  if any(s.startswith("failed") for s in status.values()):
    raise SystemExit(1)
  return status


if __name__ == "__main__":
  main(sys.argv[1:])
