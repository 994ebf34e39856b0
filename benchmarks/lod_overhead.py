"""What LoD costs per step, and what progressive shrinking saves over a run.

Maestro (Horvath et al., ICML 2024, arXiv 2308.14929) trains ``LowRank`` factors with
ordered dropout and a hierarchical group lasso. Two measurements, each side by side in
one process:

1. **Per-step overhead.** A jitted LoD step -- ``lod.sample_ranks`` (ordered-dropout
   ranks), task loss on the sampled sub-network (``jlr.factorized(model.apply,
   ranks=...)``: the prefix mask on the ``r``-wide activations or the factors, wherever
   it is cheaper), ``lam * lod.group_lasso(params)``, gradient,
   Adam update -- against the plain factorized step at the *same ranks* (no sampling, no
   lasso, same forward through the factors). Models: an MLP 784-1024-1024-10 and the
   ResNet-20 of ``examples/resnet.py`` (its 3x3 block convs factorized channel-wise),
   both at full rank (``lod.init``). After warm-up, the two steps alternate
   ``--repeats`` times (so load on the machine hits both alike), each sample ~0.2 s of
   back-to-back steps; we report the median
   time of each and the median of the per-pair ratios. Target: ratio <= 1.10.
2. **Shrinking over a run.** The MLP is trained the same number of steps twice on a
   synthetic low-rank teacher task (``y = argmax(x A B)``, ``A`` 784 x 16): once with
   ``lod.shrink(eps, relative=True)`` after every epoch past the first (optimizer
   state sliced, the step re-jitted on the new shapes: compile time included), once
   without. Wall-clock of the whole run, compilation included.

    python benchmarks/lod_overhead.py --quick   # < ~2 min on 2 CPU cores
    python benchmarks/lod_overhead.py           # more repeats, bigger batches

Writes ``benchmarks/results/lod_overhead.json`` and prints a table. ``main(argv) -> dict``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # plots (machine info; sets OPENBLAS_NUM_THREADS before numpy)
sys.path.insert(1, os.path.join(os.path.dirname(HERE), "examples"))  # resnet.py

import plots  # noqa: E402,I001

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jlr  # noqa: E402
from jlr import lod  # noqa: E402

RESULTS = os.path.join(HERE, "results")


class MLP(nn.Module):
  hidden: tuple[int, ...] = (1024, 1024)
  classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.reshape(x.shape[0], -1)
    for h in self.hidden:
      x = nn.relu(nn.Dense(h)(x))
    return nn.Dense(self.classes)(x)


def _block(tree):
  return jax.block_until_ready(tree)


def make_steps(model, params, extra, lam: float, tx):
  """``(lod_step, plain_step)``, both jitted ``(params, opt_state, extra, x, y, key)
  -> (params, opt_state, extra, loss)``."""
  has_bn = bool(extra)

  def task(p, extra, x, y, ranks=None):
    variables = {"params": p, **extra}
    apply = jlr.factorized(model.apply, ranks=ranks)
    if has_bn:
      logits, upd = apply(variables, x, train=True, mutable=["batch_stats"])
    else:
      logits, upd = apply(variables, x), extra
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), dict(upd)

  def lod_loss(p, extra, x, y, key):
    ce, upd = task(p, extra, x, y, ranks=lod.sample_ranks(p, key))
    return ce + lam * lod.group_lasso(p), upd

  def plain_loss(p, extra, x, y, key):
    return task(p, extra, x, y)

  def build(loss):
    @jax.jit
    def step(p, opt_state, extra, x, y, key):
      (val, extra), g = jax.value_and_grad(loss, has_aux=True)(p, extra, x, y, key)
      upd, opt_state = tx.update(g, opt_state, p)
      return optax.apply_updates(p, upd), opt_state, extra, val
    return step

  return build(lod_loss), build(plain_loss)


def step_overhead(name, model, dense_params, extra, x, y, *, select=None, lam=1e-4,
                  warmup=3, repeats=20) -> dict:
  params = lod.init(dense_params, select=select)
  tx = optax.adam(1e-3)
  opt = tx.init(params)
  lod_step, plain_step = make_steps(model, params, extra, lam, tx)
  key = jax.random.key(0)
  compile_s = {}
  for label, fn in (("lod", lod_step), ("plain", plain_step)):
    t0 = time.perf_counter()
    _block(fn(params, opt, extra, x, y, key))
    compile_s[label] = time.perf_counter() - t0
    for i in range(warmup - 1):
      _block(fn(params, opt, extra, x, y, jax.random.fold_in(key, i)))
  # one sample = `calls` back-to-back steps (~0.2 s): single ~15 ms steps on two shared
  # cores scatter by +-30%, which no ratio of two of them survives
  calls = plots.calibrate(lambda: plain_step(params, opt, extra, x, y, key), 0.2, 50)
  times = {"lod": [], "plain": []}
  for i in range(repeats):
    ks = [jax.random.fold_in(key, 1000 + i * calls + j) for j in range(calls)]
    order = (("lod", lod_step), ("plain", plain_step)) if i % 2 == 0 else \
        (("plain", plain_step), ("lod", lod_step))
    for label, fn in order:
      t0 = time.perf_counter()
      for k in ks:
        out = fn(params, opt, extra, x, y, k)
      _block(out)
      times[label].append((time.perf_counter() - t0) / calls)
  ratios = [a / b for a, b in zip(times["lod"], times["plain"])]
  med = {k: statistics.median(v) for k, v in times.items()}
  factors = [f for _, f in jlr.select.leaves(params)[0] if jlr.is_lowrank(f)]
  return {"model": name, "batch": int(x.shape[0]), "ranks": sum(f.rank for f in factors),
          "factorized_leaves": len(factors),
          "params": int(jlr.summary(params).total_params),
          "median_s": med, "ratio_of_medians": med["lod"] / med["plain"],
          "median_pair_ratio": statistics.median(ratios), "pair_ratios": ratios,
          "repeats": repeats, "calls_per_sample": calls,
          "compile_s": compile_s}


def teacher_data(n: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 784)).astype(np.float32)
  a = rng.normal(size=(784, 16)) / 28.0
  b = rng.normal(size=(16, 10))
  y = np.argmax(x @ a @ b, -1).astype(np.int32)
  return x, y


def shrink_run(*, shrink: bool, epochs: int, steps: int, batch: int, lam: float, eps: float,
               seed: int = 0) -> dict:
  """One LoD training run of the MLP; with ``shrink`` the ranks are cut after every
  epoch past the first. Wall-clock includes every compilation."""
  model = MLP()
  x, y = teacher_data(steps * batch, seed)
  dense = model.init(jax.random.key(seed), x[:1])["params"]
  params = lod.init(dense)
  tx = optax.adam(1e-3)
  opt = tx.init(params)
  lod_step, _ = make_steps(model, params, {}, lam, tx)
  key = jax.random.key(seed + 1)
  log = []
  t_start = time.perf_counter()
  for epoch in range(epochs):
    t0 = time.perf_counter()
    order = np.random.default_rng([seed, epoch]).permutation(len(x))
    for i in range(steps):
      idx = order[i * batch: (i + 1) * batch]
      key, sub = jax.random.split(key)
      params, opt, _, loss = lod_step(params, opt, {}, x[idx], y[idx], sub)
    loss = float(loss)  # syncs
    if shrink and epoch >= 1:
      params = lod.shrink(params, eps, multiple=8, relative=True)
      opt = lod.slice_opt_state(tx, opt, params)
    log.append({"epoch": epoch + 1, "seconds": time.perf_counter() - t0, "loss": loss,
                "ranks": [f.rank for _, f in jlr.select.leaves(params)[0] if jlr.is_lowrank(f)]})
  return {"shrink": shrink, "seconds": time.perf_counter() - t_start, "epochs": log,
          "final_params": int(jlr.summary(params).total_params)}


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true", help="fewer repeats, smaller batches")
  p.add_argument("--repeats", type=int, default=None)
  p.add_argument("--out-dir", type=str, default=RESULTS, help="'' for no JSON")
  p.add_argument("--skip-resnet", action="store_true")
  return p.parse_args(argv)


def main(argv=None) -> dict:
  args = parse_args(argv)
  quick = args.quick
  repeats = args.repeats or (10 if quick else 30)
  t_all = time.perf_counter()
  rng = np.random.default_rng(0)
  rows = []

  mlp = MLP()
  for batch in (128, 512):  # LoD's extra work is O(params), the step's is O(batch x params)
    xb = rng.normal(size=(batch, 784)).astype(np.float32)
    yb = rng.integers(0, 10, len(xb)).astype(np.int32)
    dense = mlp.init(jax.random.key(0), xb[:1])["params"]
    rows.append(step_overhead("MLP 784-1024-1024-10", mlp, dense, {}, xb, yb, repeats=repeats))
    print(f"  {rows[-1]['model']} batch {batch}: ratio {rows[-1]['median_pair_ratio']:.3f}",
          flush=True)

  if not args.skip_resnet:
    from resnet import BLOCK_CONVS, ResNet

    net = ResNet(depth=20)
    xi = rng.uniform(size=(16 if quick else 64, 28, 28, 1)).astype(np.float32)
    yi = rng.integers(0, 10, len(xi)).astype(np.int32)
    v = net.init(jax.random.key(0), xi[:1])
    sel = lambda path, leaf: re.search(BLOCK_CONVS, path) is not None  # noqa: E731
    rows.append(step_overhead("ResNet-20 (block convs, channel)", net, v["params"],
                              {"batch_stats": v["batch_stats"]}, xi, yi, select=sel,
                              repeats=max(repeats // 2, 5)))
    print(f"  {rows[-1]['model']}: ratio {rows[-1]['median_pair_ratio']:.3f}", flush=True)

  cfg = dict(epochs=4, steps=40, batch=128, lam=1e-4, eps=0.25) if quick else \
      dict(epochs=6, steps=100, batch=128, lam=1e-4, eps=0.25)
  runs = [shrink_run(shrink=s, **cfg) for s in (False, True)]
  saving = 1 - runs[1]["seconds"] / runs[0]["seconds"]

  head = ["model", "batch", "LoD step ms", "plain step ms", "ratio (median of pairs)", "target"]
  body = [[r["model"], r["batch"], f"{1e3 * r['median_s']['lod']:.1f}",
           f"{1e3 * r['median_s']['plain']:.1f}", f"{r['median_pair_ratio']:.3f}",
           "ok" if r["median_pair_ratio"] <= 1.10 else "over 1.10"] for r in rows]
  widths = [max(len(str(c)) for c in col) for col in zip(head, *body)]
  fmt = lambda cells: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)  # noqa: E731
                                for i, (c, w) in enumerate(zip(cells, widths)))
  lines = [fmt(head), "-" * len(fmt(head))] + [fmt(b) for b in body]
  lines += ["", f"shrinking over a run (MLP, {cfg['epochs']} epochs x {cfg['steps']} steps of "
            f"{cfg['batch']}, eps={cfg['eps']} relative, compile included):"]
  for r in runs:
    lines.append(f"  {'with shrink   ' if r['shrink'] else 'without shrink'}  "
                 f"{r['seconds']:6.1f}s  ranks per epoch: "
                 + " ".join("/".join(map(str, e["ranks"])) for e in r["epochs"])
                 + f"  final loss {r['epochs'][-1]['loss']:.3f}")
  lines.append(f"  wall-clock saving from shrinking: {saving:.1%}")
  load = os.getloadavg()
  lines.append(f"(load average during the run: {load[0]:.1f}; {os.cpu_count()} CPUs)")
  table = "\n".join(lines)
  print(table)
  overhead = {"columns": ["model", "batch", "LoD step ms", "plain step ms", "ratio"],
              "rows": [[r["model"], r["batch"], round(1e3 * r["median_s"]["lod"], 2),
                        round(1e3 * r["median_s"]["plain"], 2), round(r["median_pair_ratio"], 3)]
                       for r in rows]}
  shrinking = {"columns": ["run", "seconds", "final ranks", "final loss"],
               "rows": [["with shrink" if r["shrink"] else "without shrink", round(r["seconds"], 2),
                         "/".join(map(str, r["epochs"][-1]["ranks"])),
                         round(r["epochs"][-1]["loss"], 4)] for r in runs]}
  result = {"title": "LoD step overhead (sampling + group lasso) and shrinking's saving",
            "machine": plots.machine(argv, "lod_overhead"),
            "overhead": overhead, "shrinking": shrinking,
            "config": {"quick": quick, "repeats": repeats, "shrink_run": cfg},
            "step_overhead": rows, "shrink_runs": runs, "shrink_saving": saving,
            "loadavg": load, "cpus": os.cpu_count(), "devices": str(jax.devices()),
            "seconds": time.perf_counter() - t_all, "table": table}
  if args.out_dir:
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, "lod_overhead.json")
    with open(path, "w") as f:
      json.dump(result, f, indent=1)
    print(f"wrote {path}")
  return result


if __name__ == "__main__":
  main()
