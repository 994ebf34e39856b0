"""Shared pieces of the benchmark scripts: interleaved timing, machine info, tables,
JSON and PNG output.

Timing protocol (the machine is shared and noisy): every compared variant runs once per
repeat, in an order rotated from repeat to repeat, after ``warmup`` untimed rounds; a
figure is the median over repeats of the per-repeat *ratio* between two variants, so a
load spike that hits one repeat hits both sides of its ratio.
"""

from __future__ import annotations

import os

# On a shared, oversubscribed machine OpenBLAS's spinning worker threads make LAPACK (numpy's
# and jaxlib's CPU SVD/QR alike) 3-10x slower and erratic; one thread each is fair to both
# sides and reproducible. Effective only when this module is imported before numpy/jax.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import json
import math
import pathlib
import platform
import statistics
import sys
import time
from typing import Callable, Mapping, Sequence

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def _cpu_times() -> list[int] | None:
  """The aggregate ``cpu`` line of ``/proc/stat`` (Linux), or None."""
  try:
    with open("/proc/stat") as f:
      return [int(v) for v in f.readline().split()[1:]]
  except (OSError, ValueError):
    return None


_CPU_AT_IMPORT = _cpu_times()


def steal_fraction() -> float | None:
  """Share of CPU time the hypervisor took from this VM since the benchmark started
  (``/proc/stat`` steal column): on a shared host it is why repeated runs disagree."""
  now = _cpu_times()
  if now is None or _CPU_AT_IMPORT is None or len(now) < 8:
    return None
  d = [a - b for a, b in zip(now, _CPU_AT_IMPORT)]
  return round(d[7] / max(sum(d[:8]), 1), 3)


def machine(argv: Sequence[str] | None, script: str) -> dict:
  """Versions, device and CPU counts, load average and the command that reproduces a run."""
  import jax
  import jaxlib
  import numpy as np

  args = list(sys.argv[1:] if argv is None else argv)
  return {
      "jax": jax.__version__, "jaxlib": jaxlib.__version__, "numpy": np.__version__,
      "python": platform.python_version(), "platform": platform.platform(),
      "backend": jax.default_backend(), "device_count": jax.device_count(),
      "cpu_count": os.cpu_count(), "load_avg_1min": round(os.getloadavg()[0], 2),
      "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"),
      "cpu_steal": steal_fraction(),
      "command": " ".join(["python", f"benchmarks/{script}.py", *args]),
  }


def block(x):
  import jax
  return jax.block_until_ready(x)


def calibrate(fn: Callable[[], object], target_s: float = 0.05, max_calls: int = 200) -> int:
  """How many back-to-back calls make one timed sample of about ``target_s`` seconds."""
  t = time.perf_counter()
  block(fn())
  dt = max(time.perf_counter() - t, 1e-6)
  return int(max(1, min(max_calls, math.ceil(target_s / dt))))


def interleaved(fns: Mapping[str, Callable[[], object]], *, repeats: int, warmup: int = 1,
                calls: Mapping[str, int] | None = None) -> dict[str, list[float]]:
  """Seconds per call of each variant, one sample per repeat, variants interleaved.

  ``calls[name]`` back-to-back calls make one sample (for sub-millisecond functions).
  """
  names = list(fns)
  calls = dict(calls or {})
  for _ in range(warmup):
    for name in names:
      block(fns[name]())
  out: dict[str, list[float]] = {name: [] for name in names}
  for rep in range(repeats):
    k = rep % len(names)
    for name in names[k:] + names[:k]:
      n = calls.get(name, 1)
      t = time.perf_counter()
      for _ in range(n):
        r = fns[name]()
      block(r)
      out[name].append((time.perf_counter() - t) / n)
  return out


def median(xs: Sequence[float]) -> float:
  return float(statistics.median(xs))


def ratio(num: Sequence[float], den: Sequence[float]) -> float:
  """Median over repeats of the per-repeat ratio ``num / den``."""
  return median([a / b for a, b in zip(num, den)])


def fmt(x, digits: int = 3) -> str:
  """A table cell: floats to ``digits`` significant digits, the rest as text."""
  if isinstance(x, bool) or x is None:
    return "" if x is None else ("yes" if x else "no")
  if isinstance(x, float):
    if not math.isfinite(x):
      return str(x)
    if abs(x) >= 10 ** (digits - 1):
      return f"{x:,.0f}"
    return f"{x:#.{digits}g}" if x else "0"
  if isinstance(x, int):
    return f"{x:,}" if abs(x) >= 10000 else str(x)
  return str(x)


def markdown(columns: Sequence[str], rows: Sequence[Sequence]) -> str:
  head = "| " + " | ".join(columns) + " |"
  sep = "|" + "|".join("---" for _ in columns) + "|"
  body = ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
  return "\n".join([head, sep, *body])


def table(columns: Sequence[str], rows: Sequence[Sequence]) -> dict:
  """The ``{"columns", "rows"}`` form every result JSON carries (rendered by readme.py)."""
  return {"columns": list(columns), "rows": [list(r) for r in rows]}


def write(name: str, result: dict, out_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """Write ``<out_dir>/<name>.json`` (default benchmarks/results) and print its tables."""
  d = pathlib.Path(out_dir) if out_dir else RESULTS
  d.mkdir(parents=True, exist_ok=True)
  path = d / f"{name}.json"
  path.write_text(json.dumps(result, indent=1, sort_keys=False, default=_jsonable) + "\n")
  for key, tab in _tables(result):
    print(f"\n{key}:\n" + markdown(tab["columns"], tab["rows"]))
  print(f"\nwrote {path}")
  return path


def _tables(result: dict):
  for key, val in result.items():
    if isinstance(val, dict) and "columns" in val and "rows" in val:
      yield key, val


def _jsonable(x):
  import numpy as np
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  return str(x)


def figure(nrows: int = 1, ncols: int = 1, size=(5.0, 3.6)):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False)
  return fig, axes


def save(fig, name: str, out_dir: str | os.PathLike | None = None) -> str:
  import matplotlib.pyplot as plt
  d = pathlib.Path(out_dir) if out_dir else RESULTS
  d.mkdir(parents=True, exist_ok=True)
  fig.tight_layout()
  fig.savefig(d / f"{name}.png", dpi=110)
  plt.close(fig)
  return f"{name}.png"
