"""What TRP costs per training step: a jitted step with ``jlr.trp`` vs the same optimizer
step without it, measured side by side in one process.

Xu et al., "Trained Rank Pruning for Efficient Deep Neural Networks", arXiv 1812.02402:
every ``m = 20`` steps the selected kernels are replaced by their truncated SVD (energy
rule T = 0.9) and, with the nuclear-norm regularizer, ``lambda U_k V_k^T`` is added to
the gradient. Between projections TRP adds only a ``lax.cond`` on the step count.

Models: the example ResNet-20 CNN (``examples/resnet.py``, 28x28x1 inputs, the 18 block
3x3 convs projected spatial-wise) and a 4-layer 1024-wide MLP (784-1024-1024-1024-10,
every kernel projected). Optimizer: SGD with momentum 0.9.

Variants, each a jitted ``train_step`` (``examples/train.py``) on a fixed random batch:

* ``plain`` -- SGD only;
* ``trp`` -- ``jlr.trp.trp(sgd, every=20, energy=0.9, nuclear=3e-4)`` (exact SVDs: the
  nuclear norm's and the projection's, on projection steps);
* ``trp_no_nuclear`` -- the projection only (exact SVD);
* ``trp_randomized`` -- the projection only with ``method="randomized"`` and ``max_rank``
  (the energy rule then keeps at most ``max_rank`` components);
* ``trp_warm`` -- the projection only with ``method="warm"``, ``n_iter=0``: one range
  step ``qr(W V_prev)`` from the previous projection's basis (``jlr.trp.warm_low_rank_point``; its
  error stays within 1.05x of the exact SVD's along a trajectory: ``tests/test_trp.py``);
* ``trp_warm_nuclear`` -- ``trp(..., nuclear=3e-4, method="warm")``: the full TRP as one
  transform; the nuclear norm's ``U_k V_k^T`` is the projected point's, from the
  projection's own SVD, added on the step after it (no second SVD, no exact SVD).
* ``trp_warm_step`` -- the ``plain`` step, and every 20th step the same warm projection
  as its own jitted step (``jlr.trp.projection``, scheduled by the loop's step counter):
  no ``lax.cond`` in the 19 plain steps;
* ``trp_warm_step_nuclear`` -- the same with ``shrink = lr * 3e-4``: the nuclear norm as
  its proximal step (singular value thresholding) on the projected point.

A *window* is 20 consecutive steps (exactly one projection step). Every repeat times
one window of each variant in turn (interleaved, so load from other processes hits all
alike; the order rotates from repeat to repeat), each step synchronized; after one warm-up window per variant, the table reports
medians over repeats of: the window time relative to ``plain`` (the amortized overhead,
target <= 1.10), and the SVD share -- (projection step time - median plain step time) /
TRP window time. "1st step" is the first step at the projected point (where the nuclear
variants add their sub-gradient), "other steps" the median of the 18 in between. The
randomized saving compares the projection steps of
``trp_randomized`` and ``trp_no_nuclear``.

    python benchmarks/trp_overhead.py --quick     # ~5-6 min on 2 CPU cores
    python benchmarks/trp_overhead.py             # larger batches, more repeats

Writes ``benchmarks/results/trp_overhead.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# JAX's CPU SVD calls LAPACK from scipy's OpenBLAS, whose own thread pool fights XLA's:
# a 1024x1024 SVD took 10.7 s with the default threads vs 0.31 s with one (2 cores,
# loaded machine). One BLAS thread, unless the caller chose otherwise.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
warnings.filterwarnings("ignore", category=DeprecationWarning)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))  # resnet.py, train.py
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # plots (machine info)

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jlr  # noqa: E402
import plots  # noqa: E402
from resnet import BLOCK_CONVS, ResNet  # noqa: E402
from train import TrainState, train_step  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
EVERY, ENERGY, NUCLEAR, LR = 20, 0.9, 3e-4, 0.01


class MLP(nn.Module):
  hidden: tuple[int, ...] = (1024, 1024, 1024)
  classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    x = x.reshape(x.shape[0], -1)
    for h in self.hidden:
      x = nn.relu(nn.Dense(h)(x))
    return nn.Dense(self.classes)(x)


def variants(select, layout, max_rank: int) -> dict[str, optax.GradientTransformation]:
  sgd = optax.sgd(LR, momentum=0.9)
  rule = jlr.ranks.energy(ENERGY)
  return {
      "plain": sgd,
      "trp": jlr.trp.trp(sgd, every=EVERY, energy=ENERGY, nuclear=NUCLEAR, select=select,
                         layout=layout),
      "trp_no_nuclear": optax.chain(sgd, jlr.trp.project(EVERY, rule, select=select, layout=layout)),
      "trp_randomized": optax.chain(sgd, jlr.trp.project(
          EVERY, rule, select=select, layout=layout, method="randomized",
          key=jax.random.key(7), max_rank=max_rank)),
      "trp_warm": optax.chain(sgd, jlr.trp.project(
          EVERY, rule, select=select, layout=layout, method="warm", max_rank=max_rank,
          n_iter=0)),
      "trp_warm_nuclear": jlr.trp.trp(sgd, every=EVERY, energy=ENERGY, nuclear=NUCLEAR,
                                      select=select, layout=layout, method="warm",
                                      max_rank=max_rank),
  }


class HostScheduled:
  """``step`` (a jitted plain train step), then ``jlr.trp.projection`` as its own jitted
  step after every ``EVERY``-th: the schedule from the loop's own counter, no device read."""

  def __init__(self, step, proj: jlr.trp.Projection, params):
    self.step, self.project, self.t = step, jax.jit(proj.apply), 0
    self.pstate = proj.init(params)

  def __call__(self, state, batch):
    state, metrics = self.step(state, batch)
    self.t += 1
    if self.t % EVERY == 0:
      params, self.pstate = self.project(state.params, self.pstate)
      state = state.replace(params=params)
    return state, metrics


def make_case(name: str, batch: int, seed: int = 0):
  """``(model, variables, batch, select, layout, max_rank, has_bn)`` of one model."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.uniform(size=(batch, 28, 28, 1)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, size=batch), jnp.int32)
  if name == "resnet20":
    model = ResNet(depth=20)
    return model, model.init(jax.random.key(seed), x[:1]), (x, y), BLOCK_CONVS, "conv_spatial", 32
  model = MLP()
  return model, model.init(jax.random.key(seed), x[:1]), (x, y), None, None, 128


def build_steps(model, variables, select, layout, max_rank):
  params = variables["params"]
  extra = {k: v for k, v in variables.items() if k != "params"}

  def loss_fn(p, extra, batch, key):
    del key
    x, y = batch
    if extra:
      logits, new = model.apply({"params": p, **extra}, x, train=True, mutable=list(extra))
    else:
      logits, new = model.apply({"params": p}, x, train=True), extra
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), (new, {})

  out = {}
  for vname, tx in variants(select, layout, max_rank).items():
    state = TrainState.create(params, tx, key=jax.random.key(0), extra=extra)
    out[vname] = [jax.jit(train_step(loss_fn, tx)), state]
  plain_step, plain_state = out["plain"]  # the same compiled step between projections
  for vname, shrink in (("trp_warm_step", 0.0), ("trp_warm_step_nuclear", LR * NUCLEAR)):
    proj = jlr.trp.projection(jlr.ranks.energy(ENERGY), max_rank=max_rank, select=select,
                              layout=layout, shrink=shrink)
    out[vname] = [HostScheduled(plain_step, proj, params), plain_state]
  return out


def time_window(step, state, batch):
  """One window of ``EVERY`` steps, each synchronized: (state, per-step seconds)."""
  times = []
  for _ in range(EVERY):
    t = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready((state, m))
    times.append(time.perf_counter() - t)
  return state, times


def bench(case: str, batch_size: int, repeats: int) -> dict:
  model, variables, batch, select, layout, max_rank = make_case(case, batch_size)
  steps = build_steps(model, variables, select, layout, max_rank)
  t0 = time.perf_counter()
  for v in steps.values():  # warm-up: compile + one full window (one projection)
    v[1], _ = time_window(v[0], v[1], batch)
  warm = time.perf_counter() - t0
  windows = {k: [] for k in steps}
  names = list(steps)
  for rep in range(repeats):  # rotate the order: no variant always follows the exact SVDs
    for k in names[rep % len(names):] + names[:rep % len(names)]:
      v = steps[k]
      v[1], times = time_window(v[0], v[1], batch)
      windows[k].append(times)
  # the projection lands on the window's last step: counts run 0..19 per window
  assert all(int(v[1].step) % EVERY == 0 for v in steps.values())
  med = lambda xs: float(np.median(xs))  # noqa: E731
  plain_step = med([t for w in windows["plain"] for t in w])
  res = {"batch_size": batch_size, "repeats": repeats, "layout": layout or "dense",
         "max_rank": max_rank, "warmup_seconds": warm, "plain_step_ms": plain_step * 1e3}
  plain_win = [sum(w) for w in windows["plain"]]
  for k in steps:
    if k == "plain":
      continue
    wins = [sum(w) for w in windows[k]]
    proj = [w[-1] for w in windows[k]]
    res[k] = {
        "window_s": med(wins),
        "ratio": med([a / b for a, b in zip(wins, plain_win)]),
        "projection_step_ms": med(proj) * 1e3,
        # the first step at the projected point: where the nuclear variants add U_k V_k^T
        "first_step_ms": med([w[0] for w in windows[k]]) * 1e3,
        "other_step_ms": med([t for w in windows[k] for t in w[1:-1]]) * 1e3,
        "svd_share": med([(p - plain_step) / w for p, w in zip(proj, wins)]),
    }
  res["plain_window_s"] = med(plain_win)
  res["randomized_saving"] = (
      1 - (res["trp_randomized"]["projection_step_ms"] - res["plain_step_ms"])
      / max(res["trp_no_nuclear"]["projection_step_ms"] - res["plain_step_ms"], 1e-9))
  return res


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true", help="small batches, 3 repeats (25 for the MLP; ~5-6 min)")
  p.add_argument("--repeats", type=int, default=None, help="default 7 (--quick: 3)")
  p.add_argument("--mlp-repeats", type=int, default=None,
                 help="default 35 (--quick: 25): its windows are short and its ratios, near the goal, noisy")
  p.add_argument("--cnn-batch", type=int, default=None, help="default 128 (--quick: 32)")
  p.add_argument("--mlp-batch", type=int, default=256)
  p.add_argument("--models", default="resnet20,mlp")
  p.add_argument("--out", default=os.path.join(RESULTS, "trp_overhead.json"), help="'' = none")
  args = p.parse_args(argv)
  args.repeats = args.repeats or (3 if args.quick else 7)
  args.mlp_repeats = args.mlp_repeats or (25 if args.quick else 35)
  args.cnn_batch = args.cnn_batch or (32 if args.quick else 128)
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  t_start = time.perf_counter()
  results = {}
  for case in args.models.split(","):
    batch = args.cnn_batch if case == "resnet20" else args.mlp_batch
    repeats = args.repeats if case == "resnet20" else args.mlp_repeats
    print(f"{case}: batch {batch}, {repeats} repeats of {EVERY}-step windows ...", flush=True)
    results[case] = bench(case, batch, repeats)

  head = ["model", "variant", "window (20 steps)", "vs plain", "proj. step", "1st step",
          "other steps", "SVD share", "goal <= 1.10"]
  body = []
  for case, r in results.items():
    body.append([case, f"plain (batch {r['batch_size']})", f"{r['plain_window_s']:.3f}s", "1.00x",
                 "-", "-", f"{r['plain_step_ms']:.1f}ms", "-", "-"])
    for k in ("trp", "trp_no_nuclear", "trp_randomized", "trp_warm", "trp_warm_nuclear",
              "trp_warm_step", "trp_warm_step_nuclear"):
      v = r[k]
      label = k + (f" (max_rank {r['max_rank']})" if k.startswith(("trp_randomized", "trp_warm")) else "")
      body.append(["", label, f"{v['window_s']:.3f}s", f"{v['ratio']:.3f}x",
                   f"{v['projection_step_ms']:.1f}ms", f"{v['first_step_ms']:.1f}ms",
                   f"{v['other_step_ms']:.1f}ms",
                   f"{v['svd_share']:.1%}", "met" if v["ratio"] <= 1.10 else "missed"])
  widths = [max(len(str(row[i])) for row in [head] + body) for i in range(len(head))]
  line = lambda cells: "  ".join(  # noqa: E731
      str(c).ljust(w) if i < 2 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
  table = "\n".join([line(head), "-" * len(line(head))] + [line(b) for b in body])
  print("\nTRP step overhead: median over repeats, windows interleaved; every=20, T=0.9, "
        "lambda=3e-4 (trp only).\nSVD share = (projection step - plain step) / TRP window.\n")
  print(table)
  for case, r in results.items():
    print(f"{case}: randomized projection (max_rank {r['max_rank']}) saves "
          f"{r['randomized_saving']:.0%} of the exact projection's extra time")
  out = {"config": vars(args), "openblas_num_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
         "every": EVERY, "energy": ENERGY, "nuclear": NUCLEAR,
         "devices": [str(d) for d in jax.devices()][:1], "cpu_count": os.cpu_count(),
         "results": results, "table": table, "seconds": time.perf_counter() - t_start,
         "machine": plots.machine(argv, "trp_overhead")}
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(out, f, indent=1)
    print(f"wrote {args.out}")
  print(f"total {out['seconds']:.1f}s")
  return out


if __name__ == "__main__":
  main()
