"""The results suite: every cell of every task, one JSON per run, resumable.

    python results/suite.py                    # the CPU setting (results/resnet20.py, charlm.py)
    python results/suite.py --size quick       # every code path in minutes (CI-slow)
    python results/suite.py --size full        # long runs, for a GPU
    python results/suite.py --jobs 2           # cells in parallel, one core each
    python results/suite.py --cell dense --seed 1   # one cell, in this process

A cell's JSON (``results/runs/<size>/<task>/<cell>_s<seed>.json``) holds its metrics,
the command that reproduces it, the seed, the size, the package versions, the device and
the wall time. A cell whose JSON exists is skipped, so an interrupted suite continues
where it stopped; a cell runs only once the cells it starts from (``dense_pre`` for the
fine-tuned baselines, ...) have theirs. Cells run in subprocesses pinned to one CPU
thread each (XLA and BLAS): on this machine two single-threaded ResNet-20 steps in
parallel do twice the work of one two-threaded step. ``results/report.py`` turns the
JSONs into the README's tables and plots.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TASKS = ("resnet20", "charlm")
SIZES = ("quick", "cpu", "full", "converged-quick", "converged")
ONE_THREAD = {"XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
              "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
              "TF_CPP_MIN_LOG_LEVEL": "2"}


sys.path.insert(0, HERE)
import cells  # noqa: E402


def task_module(task: str):
  if task not in TASKS:
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
  sys.path.insert(0, HERE)
  return importlib.import_module(task)


def run_dir(out: str, size: str, task: str) -> str:
  return os.path.join(out, size, task)


def json_path(out: str, size: str, task: str, cell: str, seed: int) -> str:
  return os.path.join(run_dir(out, size, task), f"{cell}_s{seed}.json")


def versions() -> dict:
  import flax
  import jax
  import optax

  import jlr

  return {"python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__,
          "optax": optax.__version__, "jlr": jlr.__version__, "numpy": __import__("numpy").__version__}


def device() -> str:
  import jax

  d = jax.devices()[0]
  return f"{d.platform}:{getattr(d, 'device_kind', '')} ({os.cpu_count()} host cores, {platform.machine()})"


def commit() -> str | None:
  try:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout.strip()
  except Exception:  # noqa: BLE001 - not a git checkout
    return None


def carry(out: str, size: str, direction: str) -> list[str]:
  """The cache across machines. A cell's trained models (``dense``, ``dense_pre``,
  ``lod_nested``: later cells start from them) and its in-flight checkpoints (every
  ``cells.CHECKPOINT_S``, under its code digest) live in ``<out>/.cache/<size>/``, which
  git ignores; a session's machine does not outlive it, so a cell longer than what is
  left of a session, or one starting from a model trained last session, would start over.
  ``direction="park"`` mirrors the cache's pickles to ``<out>/carry/<size>/`` (committed
  at the end of a session; pickles the cache no longer holds, a finished cell's
  checkpoint, are removed); ``"restore"`` copies those the cache lacks back. Returns the
  files copied; a restored checkpoint resumes its cell where it was parked
  (``Task.train(resume=)``)."""
  import shutil

  cache, kept = os.path.join(out, ".cache", size), os.path.join(out, "carry", size)
  src, dst = (cache, kept) if direction == "park" else (kept, cache)
  have = {os.path.relpath(os.path.join(d, f), src) for d, _, fs in os.walk(src) for f in fs
          if f.endswith(".pkl")}

  def finished(rel):  # <task>/s<seed>/inflight/<code>/<cell>.pkl of a cell with its JSON
    parts = rel.split(os.sep)
    return (len(parts) == 5 and parts[2] == "inflight" and
            os.path.exists(json_path(out, size, parts[0], parts[4][:-4], int(parts[1][1:]))))

  if direction == "park":  # a finished cell's checkpoint (the cell leaves it) is not
    have = {r for r in have if not finished(r)}  # carried: its JSON is the result
  copied = []
  for rel in sorted(have):
    a, b = os.path.join(src, rel), os.path.join(dst, rel)
    if direction == "restore" and os.path.exists(b):
      continue  # this machine's copy is as new or newer
    if direction == "park" and os.path.exists(b) and os.path.getmtime(b) >= os.path.getmtime(a):
      continue
    os.makedirs(os.path.dirname(b), exist_ok=True)
    shutil.copy2(a, b + ".tmp")
    os.replace(b + ".tmp", b)
    copied.append(rel)
  if direction == "park":
    for d, _, fs in os.walk(dst):
      for f in fs:
        rel = os.path.relpath(os.path.join(d, f), dst)
        if rel not in have:
          os.remove(os.path.join(d, f))
  return copied


def dep_key(task: str, dep: str, seed: int) -> tuple[str, str, int]:
  """``"cell|s0"``: that cell on seed 0; ``"cell"``: on the same seed."""
  cell, _, on = dep.partition("|s")
  return task, cell, int(on) if on else seed


def _cpu_seconds() -> float:
  """User + system CPU time of this process, all its threads."""
  import resource

  ru = resource.getrusage(resource.RUSAGE_SELF)
  return ru.ru_utime + ru.ru_stime


def one(args) -> int:
  """Run one cell in this process and write its JSON."""
  mod = task_module(args.task)
  size = mod.SIZES[args.size]
  path = json_path(args.out, args.size, args.task, args.cell, args.seed)
  cache = os.path.join(args.out, ".cache", args.size, args.task)
  code = cells.code_hash(args.task)  # the code this run starts with
  t0 = time.time()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".running", "w") as f:  # a claim: other schedulers leave this cell alone
    f.write(str(os.getpid()))
  try:
    metrics = mod.run_cell(args.cell, args.seed, size, cache, dataset=args.dataset,
                           bars=not args.no_progress, runs=run_dir(args.out, args.size, args.task),
                           code=code)
  finally:
    os.remove(path + ".running")
  record = {"task": args.task, "cell": args.cell, "seed": args.seed, "size": args.size,
            "setting": vars(cells.parse(args.cell, size)[2]),  # after the cell's ~ settings
            "command": (f"python results/suite.py --size {args.size} --task {args.task} "
                        f"--cell {args.cell} --seed {args.seed}"),
            "versions": versions(), "device": device(), "commit": commit(), "code": code,
            "threads": os.environ.get("XLA_FLAGS", ""), "wall_s": round(time.time() - t0, 1),
            "cpu_s": round(_cpu_seconds(), 1),  # wall_s also counts time the run was paused
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"), **metrics}
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(record, f, indent=1, sort_keys=True)
  os.replace(path + ".tmp", path)
  print(f"wrote {os.path.relpath(path, ROOT)} ({record['wall_s']}s)")
  return 0


def schedule(args) -> int:
  """Every pending cell of the chosen tasks and seeds, ``--jobs`` at a time."""
  todo = []  # (task, cell, seed, deps)
  deps_of = {}  # (task, cell) -> deps
  for task in args.tasks:
    mod = task_module(task)
    size = mod.SIZES[args.size]
    seeds = size.seeds if args.seeds is None else args.seeds
    groups = []
    if args.group in ("main", "all"):
      groups += [(cell, deps, seeds) for cell, deps in mod.cells(size)]
    if args.group in ("ablation", "all"):  # one seed: a search on the validation split
      groups += [(cell, deps, seeds[:1]) for cell, deps in mod.ablations(size)]
    if args.group in ("main", "all"):
      groups += [(cell, deps, seeds) for cell, deps in mod.trp_plain(size)]
    deps_of.update({(task, cell): deps for cell, deps, _ in groups})
    for cell, deps, cell_seeds in groups:
      if args.only and not any(cell.startswith(o) for o in args.only):
        continue
      todo += [(task, cell, seed, deps) for seed in cell_seeds]
  if args.queue:  # an explicit order of "[task/]cell seed" lines (a partial run in a short session)
    todo = []
    with open(args.queue) as f:
      for line in filter(None, (ln.split("#")[0].strip() for ln in f)):
        name, seed = line.split()
        task, _, cell = name.rpartition("/")
        for t in [task] if task else [t for t in args.tasks if (t, cell) in deps_of]:
          todo.append((t, cell, int(seed), deps_of[(t, cell)]))
  here = {t: cells.code_hash(t) for t in args.tasks}
  codes = {}  # {path: (mtime, digest)}: each JSON read once

  def done(t, c, s) -> bool:
    path = json_path(args.out, args.size, t, c, s)
    if not os.path.exists(path):
      return False
    if args.rerun_stale:  # a result of other code is not done
      mtime = os.path.getmtime(path)
      if codes.get(path, (None,))[0] != mtime:
        with open(path) as f:
          codes[path] = (mtime, json.load(f).get("code"))
      return codes[path][1] == here[t]
    return True

  def elsewhere(t, c, s) -> bool:
    """Claimed by a live process (another scheduler's cell, or one run by hand)."""
    try:
      with open(json_path(args.out, args.size, t, c, s) + ".running") as f:
        os.kill(int(f.read().strip()), 0)
      return True
    except (OSError, ValueError):
      return False

  pending = [x for x in todo if not done(*x[:3])]
  print(f"{len(todo)} cells, {len(todo) - len(pending)} done, {len(pending)} to run, "
        f"{args.jobs} at a time")
  logs = os.path.join(args.out, ".logs", args.size)
  os.makedirs(logs, exist_ok=True)
  running, failed = {}, set()
  t_start = time.time()
  while pending or running:
    for key, (proc, log) in list(running.items()):
      if proc.poll() is not None:
        log.close()
        del running[key]
        status = "done" if proc.returncode == 0 and done(*key) else f"FAILED (rc {proc.returncode})"
        if status != "done":
          failed.add(key)
        print(f"[{time.time() - t_start:7.0f}s] {key[0]}/{key[1]} seed {key[2]}: {status}", flush=True)
    for x in [x for x in pending if done(*x[:3])]:  # finished by another scheduler
      pending.remove(x)
    ready = [x for x in pending if all(done(*dep_key(x[0], d, x[2])) for d in x[3])
             and not elsewhere(*x[:3])]
    blocked = [x for x in pending if any(dep_key(x[0], d, x[2]) in failed for d in x[3])]
    for x in blocked:
      pending.remove(x)
      failed.add(x[:3])
      print(f"skip {x[0]}/{x[1]} seed {x[2]}: a cell it starts from failed")
    busy = sum(elsewhere(*x[:3]) for x in pending)  # cells other processes are running
    while ready and len(running) + busy < args.jobs:
      task, cell, seed, _ = x = ready.pop(0)
      pending.remove(x)
      cmd = [sys.executable, os.path.abspath(__file__), "--size", args.size, "--task", task,
             "--cell", cell, "--seed", str(seed), "--out", args.out, "--dataset", args.dataset,
             "--no-progress"]
      log = open(os.path.join(logs, f"{task}_{cell}_s{seed}.log"), "w")
      env = dict(os.environ, **(ONE_THREAD if args.jobs > 1 else {}))
      running[x[:3]] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log)
      print(f"[{time.time() - t_start:7.0f}s] start {task}/{cell} seed {seed}", flush=True)
    if not ready and not running and pending and not any(
        elsewhere(*x[:3]) or any(elsewhere(*dep_key(x[0], d, x[2])) for d in x[3]) for x in pending):
      break  # waiting on nothing: dependencies will never appear
    time.sleep(1.0)
  print(f"suite: {len(todo) - len(failed)} of {len(todo)} cells have results "
        f"({time.time() - t_start:.0f}s); logs in {os.path.relpath(logs, ROOT)}")
  return 1 if failed else 0


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--size", default="cpu", choices=SIZES)
  p.add_argument("--task", default=None, help=f"one of {TASKS} (default: all)")
  p.add_argument("--cell", default=None, help="run this one cell here (needs --task, --seed)")
  p.add_argument("--seed", type=int, default=None)
  p.add_argument("--seeds", default=None, help="comma list overriding the size's seeds")
  p.add_argument("--only", default=None, help="comma list of cell-name prefixes to run")
  p.add_argument("--queue", default=None,
                 help="a file of '[task/]cell seed' lines: run these, in order")
  p.add_argument("--group", default="all", choices=("main", "ablation", "all"),
                 help="the comparison cells, the ablation search (seed 0), or both")
  p.add_argument("--jobs", type=int, default=1, help="cells run in parallel (one core each)")
  p.add_argument("--out", default=os.path.join(HERE, "runs"), help="where the JSONs go")
  p.add_argument("--dataset", default="auto", choices=("auto", "fashion_mnist", "mnist"))
  p.add_argument("--no-progress", action="store_true")
  p.add_argument("--rerun-stale", action="store_true",
                 help="rerun cells whose JSON was written by other code (see cells.code_hash)")
  p.add_argument("--park", action="store_true",
                 help="copy the cache (trained models, in-flight checkpoints) to "
                      "<out>/carry/<size>/ to commit, and exit; a later run restores it")
  args = p.parse_args(argv)
  if args.park:
    files = carry(args.out, args.size, "park")
    print(f"parked {len(files)} changed files in {os.path.join(args.out, 'carry', args.size)}")
    return 0
  restored = carry(args.out, args.size, "restore")
  if restored:
    print(f"restored {len(restored)} cached files from {os.path.join(args.out, 'carry', args.size)}")
  if args.cell is not None:
    if args.task is None or args.seed is None:
      p.error("--cell needs --task and --seed")
    return one(args)
  args.tasks = TASKS if args.task is None else (args.task,)
  args.seeds = None if args.seeds is None else [int(s) for s in args.seeds.split(",")]
  args.only = None if args.only is None else args.only.split(",")
  return schedule(args)


if __name__ == "__main__":
  sys.exit(main())
