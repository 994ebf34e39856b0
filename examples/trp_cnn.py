"""Trained Rank Pruning of a ResNet-20 on Fashion-MNIST (MNIST when it is absent).

Xu et al., "Trained Rank Pruning for Efficient Deep Neural Networks", arXiv 1812.02402.
A CIFAR-style ResNet-20 (``examples/resnet.py``, BatchNorm, 28x28 inputs) is trained
with SGD + momentum and a cosine learning rate, five ways on the same init and data
order:

* ``dense`` -- the baseline;
* ``trp_channel`` / ``trp_spatial`` -- every ``--period`` (m) steps the 3x3 block convs
  (``resnet.BLOCK_CONVS``; stem, 1x1 shortcuts and classifier stay dense, as in the
  reference) land on their truncated SVD with the energy rule ``--energy`` (T), so the
  next gradient is taken at the low-rank point (``jlr.trp.project``); momentum is kept.
  Channel-wise layout ``conv_channel`` (kh kw cin, cout): a kh x kw conv to r channels
  then a 1x1 conv; spatial-wise ``conv_spatial`` (kh cin, kw cout): a kh x 1 conv then
  a 1 x kw conv;
* ``trp_nu_spatial`` / ``trp_nu_channel`` -- the same plus the nuclear-norm
  sub-gradient ``--nuclear * U_k V_k^T`` on projection steps (the released code).

After training each model is *decoupled*: ``jlr.trp.decouple(params,
ranks.value(--threshold), select=BLOCK_CONVS, layout=...)`` splits every selected
kernel into two thin convs (singular values above an absolute threshold), and the
factorized model runs unchanged through ``jlr.flax.apply``. The table gives, per run,
the test accuracy of the trained dense weights and of the decoupled model, params, conv
FLOPs per image (analytic: every conv's multiply-adds x 2 at its actual input/output
resolution, the kh x 1 conv of the spatial scheme at its intermediate resolution;
XLA's cost analysis of the whole batch-1 forward is given alongside), the theoretical
speed-up (conv FLOP ratio), the MEASURED speed-up of the decoupled model's jitted
forward against the dense one (median of interleaved repeats after warm-up, one
process), and the accuracy of the *dense baseline* truncated by SVD to the same
per-layer ranks (what TRP buys over compressing after training). Results go to
``examples/results/trp_cnn.{json,png}``.

    python examples/trp_cnn.py --quick          # ~7 min on 2 shared CPU cores (4 runs)
    python examples/trp_cnn.py                  # 10 epochs on all 60,000 images (long on CPU)
    python examples/trp_cnn.py --ckpt-dir /tmp/trp --resume   # resumable (bit-identical)
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python examples/trp_cnn.py --quick --mesh data=4,model=2
"""

from __future__ import annotations

import argparse
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
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # `data`, `resnet`, `lod_common`, `train`
if __name__ == "__main__" and any(a.startswith("--mesh") for a in sys.argv) \
    and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  # simulated CPU devices for --mesh (must be set before JAX starts)
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jlr  # noqa: E402
import jlr.flax  # noqa: E402
from jlr import ranks  # noqa: E402
from jlr.lowrank import is_lowrank  # noqa: E402
import data as data_lib  # noqa: E402
import lod_common as common  # noqa: E402
from resnet import BLOCK_CONVS, ResNet  # noqa: E402
from train import TrainState, evaluate  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# run name -> (layout of the TRP projection or None for dense, nuclear norm on?)
RUNS = {
    "dense": (None, False),
    "trp_channel": ("conv_channel", False),
    "trp_spatial": ("conv_spatial", False),
    "trp_nu_spatial": ("conv_spatial", True),
    "trp_nu_channel": ("conv_channel", True),
}
QUICK_RUNS = ("dense", "trp_channel", "trp_spatial", "trp_nu_spatial")
# Xu et al., Table 1 (CIFAR-10 ResNet-20): accuracy and conv-FLOP speed-up
PAPER = {"dense": (91.74, 1.0), "trp_nu_channel": (90.50, 2.17), "trp_nu_spatial": (90.62, 2.84)}


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--quick", action="store_true",
                 help="a few-minute budget: 4,096 train / 2,000 test images, 3 epochs, 4 runs")
  p.add_argument("--epochs", type=int, default=None, help="default 10 (--quick: 3)")
  p.add_argument("--period", type=int, default=20, help="TRP projection period m (steps)")
  p.add_argument("--energy", type=float, default=0.9, help="TRP energy threshold T")
  p.add_argument("--nuclear", type=float, default=3e-4, help="nuclear-norm strength lambda")
  p.add_argument("--threshold", type=float, default=0.05,
                 help="decoupling: keep singular values above this (ranks.value)")
  p.add_argument("--lr", type=float, default=0.1, help="peak SGD learning rate (cosine decay)")
  p.add_argument("--momentum", type=float, default=0.9)
  p.add_argument("--batch-size", type=int, default=None, help="default 128 (--quick: 64)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--depth", type=int, default=20, help="ResNet depth 6n+2 (20: ResNet-20)")
  p.add_argument("--width", type=int, default=16, help="channels of the first stage")
  p.add_argument("--train-limit", type=int, default=None, help="first N training images")
  p.add_argument("--test-limit", type=int, default=None, help="first N test images")
  p.add_argument("--runs", type=str, default=None,
                 help=f"comma list of {','.join(RUNS)} (default all; --quick: {','.join(QUICK_RUNS)})")
  p.add_argument("--dataset", choices=("auto", "fashion_mnist", "mnist"), default="auto",
                 help="auto: Fashion-MNIST if its Debian package is installed, else MNIST")
  p.add_argument("--timing-batch", type=int, default=256, help="batch of the forward timing")
  p.add_argument("--timing-repeats", type=int, default=7, help="timed repeats per model")
  p.add_argument("--no-timing", action="store_true", help="skip the measured speed-up")
  p.add_argument("--mesh", type=str, default=None,
                 help="e.g. data=4,model=2: FSDP params, batches sharded over 'data'")
  p.add_argument("--ckpt-dir", type=str, default=None, help="a checkpoint per epoch in DIR/<run>")
  p.add_argument("--resume", action="store_true", help="continue from --ckpt-dir's latest epochs")
  p.add_argument("--stop-after", type=int, default=None,
                 help="stop every run after this epoch (simulates an interruption; resume later)")
  p.add_argument("--out-dir", type=str, default=RESULTS, help="where trp_cnn.{json,png} go ('' = none)")
  p.add_argument("--no-progress", action="store_true", help="no progress bars")
  args = p.parse_args(argv)
  if args.epochs is None:
    args.epochs = 3 if args.quick else 10
  if args.batch_size is None:
    args.batch_size = 64 if args.quick else 128
  if args.quick:
    args.train_limit = args.train_limit or 4096
    args.test_limit = args.test_limit or 2000
  names = args.runs.split(",") if args.runs else list(QUICK_RUNS if args.quick else RUNS)
  unknown = [n for n in names if n not in RUNS]
  if unknown:
    p.error(f"unknown runs {unknown}; choose from {list(RUNS)}")
  if "dense" not in names:
    names.insert(0, "dense")  # the baseline every row is compared with
  args.runs = names
  if args.resume and not args.ckpt_dir:
    p.error("--resume needs --ckpt-dir")
  return args


# ----------------------------------------------------------------------------- costs


def conv_flops(model: nn.Module, variables, image_shape) -> dict[str, int]:
  """``{conv path: FLOPs per image}`` (2 x multiply-adds) of every ``nn.Conv`` call.

  Dense ``H' W' 2 kh kw cin cout``; ``conv_channel`` rank r ``H' W' 2 (kh kw cin r +
  r cout)``; ``conv_spatial`` ``H' W 2 kh cin r + H' W' 2 r kw cout`` (the kh x 1 conv
  keeps the input width W; see ``jlr.ops.conv``). Shapes come from an abstract
  forward (``jax.eval_shape``): nothing runs.
  """
  seen = {}

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    module = context.module
    if isinstance(module, nn.Conv) and context.method_name == "__call__":
      seen["/".join(module.scope.path)] = (args[0].shape, out.shape)
    return out

  def fwd(v):
    with nn.intercept_methods(record):  # the Conv modules see their real input and output shapes
      return jlr.flax.apply(model, v, jnp.zeros((1,) + tuple(image_shape)), train=False)

  jax.eval_shape(fwd, variables)
  out = {}
  for path, (xs, ys) in seen.items():
    k = variables["params"]
    for name in path.split("/") + ["kernel"]:  # the leaf itself: LowRank or dense
      k = k[name]
    (_, _, w_in, _), (_, h, w, cout) = xs, ys
    if is_lowrank(k):
      kh, kw, cin, _ = k.layout.shape
      r = k.rank
      if k.layout.kind == "conv_spatial":
        out[path] = 2 * (h * w_in * kh * cin * r + h * w * r * kw * cout)
      else:
        out[path] = 2 * h * w * (kh * kw * cin * r + r * cout)
    else:
      kh, kw, cin, _ = k.shape
      out[path] = 2 * h * w * kh * kw * cin * cout
  return out


def xla_flops(fn, x) -> float | None:
  """XLA's cost-analysis FLOPs of ``jit(fn)(x)`` (``None`` if the backend gives none)."""
  try:
    cost = jax.jit(fn).lower(x).compile().cost_analysis()
  except Exception:  # noqa: BLE001 - optional diagnostics
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float(cost.get("flops", 0.0)) if cost else None


def time_forwards(fns: dict, x, repeats: int) -> dict[str, float]:
  """Median seconds per call of each jitted ``fn(x)``, repeats interleaved across the
  functions (so load from other processes hits all alike), after a warm-up call."""
  for f in fns.values():
    jax.block_until_ready(f(x))
    jax.block_until_ready(f(x))
  times = {k: [] for k in fns}
  for _ in range(repeats):
    for k, f in fns.items():
      t = time.perf_counter()
      jax.block_until_ready(f(x))
      times[k].append(time.perf_counter() - t)
  return {k: float(np.median(v)) for k, v in times.items()}


def block_ranks(params, rule, layout) -> dict[str, int]:
  """``{path: rank}`` the rule keeps for each selected block conv (from its spectrum)."""
  rep = jlr.summary(params, rule, select=BLOCK_CONVS, layout=layout)
  return {r.path: int(r.rank) for r in rep.rows if r.rank is not None}


# ----------------------------------------------------------------------------- main


def main(argv=None) -> dict:
  args = parse_args(argv)
  t_start = time.perf_counter()
  dataset, (x_train, y_train, x_test, y_test) = data_lib.load_resolved(args.dataset)
  x_train, y_train = x_train[: args.train_limit], y_train[: args.train_limit]
  x_test, y_test = x_test[: args.test_limit], y_test[: args.test_limit]
  steps_per_epoch = len(x_train) // args.batch_size
  total_steps = steps_per_epoch * args.epochs
  model = ResNet(depth=args.depth, width=args.width)
  print(f"{dataset}: {len(x_train):,} train / {len(x_test):,} test images; ResNet-{args.depth} "
        f"(width {args.width}); {args.epochs} epochs x {steps_per_epoch} steps of {args.batch_size}; "
        f"m={args.period} T={args.energy:g} lambda={args.nuclear:g} threshold={args.threshold:g}")

  mesh = None
  if args.mesh:
    from jlr import sharding

    mesh = sharding.make_mesh(args.mesh)
    if args.batch_size % mesh.shape.get("data", 1):
      raise SystemExit(f"--batch-size {args.batch_size} is not divisible by the mesh's data axis")
    batch_sharding = sharding.batch_sharding(mesh)
    print(f"mesh {dict(mesh.shape)}: params FSDP-placed, batches sharded over 'data'")

  x0 = jnp.zeros((1,) + x_train.shape[1:])
  init = model.init(jax.random.key(args.seed), x0)
  dense_init, stats_init = init["params"], init["batch_stats"]
  # every kernel's layout read from the model (never guessed), channel- or spatial-wise
  read = {kind: jlr.flax.layouts(model, init, x0, train=False, conv=kind.split("_")[1])
          for kind in ("conv_channel", "conv_spatial")}
  if mesh is not None:
    dense_init = sharding.place(dense_init, mesh, "fsdp")
    stats_init = jax.device_put(stats_init, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  key = jax.random.fold_in(jax.random.key(args.seed), 1)
  schedule = optax.cosine_decay_schedule(args.lr, max(total_steps, 1))

  def make_tx(layout, nuclear):
    sgd = optax.sgd(schedule, momentum=args.momentum)
    if layout is None:
      return sgd
    return jlr.trp.trp(sgd, every=args.period, energy=args.energy,
                       nuclear=args.nuclear if nuclear else 0.0, select=BLOCK_CONVS,
                       layout=read[layout])

  def epoch_batches(epoch):  # a pure function of (seed, epoch): resumable
    it = data_lib.batches(x_train, y_train, args.batch_size, np.random.default_rng([args.seed, epoch]))
    if mesh is None:
      return it
    return (jax.device_put(b, batch_sharding) for b in it)

  def loss_fn(params, extra, batch, key):
    del key
    x, y = batch
    logits, new_extra = model.apply({"params": params, **extra}, x, train=True,
                                    mutable=["batch_stats"])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return ce, (new_extra, {"acc": jnp.mean(jnp.argmax(logits, -1) == y)})

  @jax.jit
  def eval_batch(variables, x, y):
    logits = jlr.flax.apply(model, variables, x, train=False)
    return {"acc": jnp.mean(jnp.argmax(logits, -1) == y), "count": x.shape[0]}

  def accuracy(variables) -> float:
    step = 500
    test = ((x_test[i: i + step], y_test[i: i + step]) for i in range(0, len(x_test), step))
    return evaluate(lambda b: eval_batch(variables, *b), test)["acc"]

  on_epoch = lambda epoch, state, log: {  # noqa: E731
      "test_acc": round(accuracy({"params": state.params, **state.extra}), 4)}
  shared = dict(dataset=dataset, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
                seed=args.seed, epochs=args.epochs, train_limit=args.train_limit,
                depth=args.depth, width=args.width)

  # ---- training: every run from the same init, in the same data order
  trained, history, seconds = {}, {}, {}
  for name in args.runs:
    layout, nuclear = RUNS[name]
    tx = make_tx(layout, nuclear)
    template = lambda ranks, tx=tx: TrainState.create(  # noqa: E731
        dense_init, tx, key=key, extra={"batch_stats": stats_init})
    ckpt = None
    if args.ckpt_dir:
      meta = dict(shared, layout=layout, period=args.period, energy=args.energy,
                  nuclear=args.nuclear if nuclear else 0.0)
      ckpt = common.RankedCheckpoints(os.path.join(args.ckpt_dir, name), template, meta)
    t0 = time.perf_counter()
    stop = args.epochs if args.stop_after is None else min(args.stop_after, args.epochs)
    state, history[name] = common.fit(  # the schedule still spans all --epochs
        template({}), loss_fn, tx, epoch_batches=epoch_batches, steps_per_epoch=steps_per_epoch,
        epochs=stop, ckpt=ckpt, resume=args.resume, on_epoch=on_epoch, desc=name,
        bars=not args.no_progress)
    seconds[name] = time.perf_counter() - t0
    trained[name] = state

  if args.stop_after is not None and args.stop_after < args.epochs:
    print(f"stopped after epoch {args.stop_after} of {args.epochs} (--stop-after); "
          "continue with --resume")
    return {"config": vars(args), "history": history, "stopped_after": args.stop_after,
            "fingerprints": {n: common.fingerprint(s) for n, s in trained.items()}}

  # ---- decouple, score, cost
  image = x_train.shape[1:]
  dense_state = trained["dense"]
  dense_vars = {"params": dense_state.params, **dense_state.extra}
  flops_dense = conv_flops(model, dense_vars, image)
  dense_total_flops = sum(flops_dense.values())
  rows, artifacts = {}, {}
  for name in args.runs:
    layout, nuclear = RUNS[name]
    state = trained[name]
    variables = {"params": state.params, **state.extra}
    lay = layout or "conv_spatial"  # the dense baseline is decoupled spatial-wise, like the best TRP run
    decoupled = jlr.trp.decouple(jax.device_get(state.params), ranks.value(args.threshold),
                                 select=BLOCK_CONVS, layout=read[lay])
    dvars = {"params": decoupled, **jax.device_get(state.extra)}
    rep = jlr.summary(decoupled)
    flops = conv_flops(model, dvars, image)
    dec_ranks = {r.path: int(r.rank) for r in rep.rows if r.rank is not None}
    row = {
        "layout": layout, "nuclear": args.nuclear if nuclear else 0.0,
        "decouple_layout": lay,
        "acc_dense_weights": accuracy(variables),
        "acc_decoupled": accuracy(dvars),
        "params_dense": int(jlr.summary(state.params).total_params),
        "params_decoupled": int(rep.total_params),
        "conv_flops": int(sum(flops.values())),
        "conv_flops_dense": int(dense_total_flops),
        "flop_speedup": dense_total_flops / max(sum(flops.values()), 1),
        "energy_ranks": block_ranks(jax.device_get(state.params), ranks.energy(args.energy),
                                    read[lay]),
        "decoupled_ranks": dec_ranks,
        "full_ranks": {r.path: int(r.max_rank) for r in rep.rows if r.rank is not None},
        "past_break_even": [r.path for r in rep.rows if r.larger_than_dense],
        "steps_since_projection": (None if layout is None else total_steps % args.period),
        "fingerprint": common.fingerprint(state),
        "seconds": seconds[name],
    }
    if name != "dense":  # the dense baseline truncated to the same per-layer ranks
      svd = jlr.factorize(jax.device_get(dense_state.params),
                          {p: ranks.fixed(r) for p, r in dec_ranks.items()}, select=BLOCK_CONVS,
                          layout=read[lay])
      row["acc_dense_svd_same_ranks"] = accuracy({"params": svd, **jax.device_get(dense_state.extra)})
    rows[name] = row
    artifacts[name] = {"variables": jax.device_get(variables), "decoupled": dvars}

  # ---- XLA FLOPs and measured forward speed-up (decoupled vs dense), side by side
  x1 = jnp.zeros((1,) + image)
  fwd = lambda v: (lambda x: jlr.flax.apply(model, v, x, train=False))  # noqa: E731
  base_vars = jax.device_get(dense_vars)
  for name in args.runs:
    rows[name]["xla_flops_per_image"] = xla_flops(fwd(artifacts[name]["decoupled"]), x1)
  rows["dense"]["xla_flops_per_image_dense_weights"] = xla_flops(fwd(base_vars), x1)
  if not args.no_timing:
    xb = jnp.asarray(np.resize(x_test, (args.timing_batch,) + image))
    fns = {"<dense weights>": jax.jit(fwd(base_vars))}
    fns.update({n: jax.jit(fwd(artifacts[n]["decoupled"])) for n in args.runs})
    times = time_forwards(fns, xb, args.timing_repeats)
    base = times["<dense weights>"]
    for name in args.runs:
      rows[name]["forward_ms"] = times[name] * 1e3
      rows[name]["forward_ms_dense"] = base * 1e3
      rows[name]["measured_speedup"] = base / times[name]

  # ---- table
  head = ["run", "acc (dense W)", "acc (decoupled)", "SVD of dense, same ranks", "params",
          "conv FLOPs/img", "XLA FLOPs/img", "FLOP speed-up", "measured speed-up",
          "block ranks T-energy -> decoupled"]
  body = []
  for name, r in rows.items():
    e, d, f = (sum(r[k].values()) for k in ("energy_ranks", "decoupled_ranks", "full_ranks"))
    body.append([
        name if name != "dense" else "dense (decoupled spatial)",
        f"{r['acc_dense_weights']:.2%}", f"{r['acc_decoupled']:.2%}",
        f"{r['acc_dense_svd_same_ranks']:.2%}" if "acc_dense_svd_same_ranks" in r else "-",
        f"{r['params_dense']:,} -> {r['params_decoupled']:,}",
        common.si(r["conv_flops"]),
        common.si(r["xla_flops_per_image"]) if r["xla_flops_per_image"] else "n/a",
        f"{r['flop_speedup']:.2f}x",
        f"{r['measured_speedup']:.2f}x" if "measured_speedup" in r else "-",
        f"{e}/{f} -> {d}/{f}"])
  print(f"\nTest accuracy on {len(x_test):,} {dataset} images. Decoupled: jlr.trp.decouple with "
        f"ranks.value({args.threshold:g}) on the {len(rows['dense']['full_ranks'])} block 3x3 convs, "
        "run through jlr.flax.apply.\nconv FLOPs/img: analytic (2 x MACs of every conv at its "
        f"resolution; dense ResNet: {common.si(dense_total_flops)}); XLA FLOPs/img: cost analysis of "
        "the whole batch-1 forward.\nFLOP speed-up = dense conv FLOPs / decoupled conv FLOPs; measured "
        f"= dense / decoupled jitted forward time (batch {args.timing_batch}, median of "
        f"{args.timing_repeats} interleaved repeats).\nblock ranks: sum over block convs of the "
        f"T={args.energy:g} energy rank of the trained weights -> of the decoupled rank, / full rank.\n")
  table = common.print_table(head, body)
  if "measured_speedup" in rows["dense"]:
    print(f"dense forward: {rows['dense']['forward_ms_dense']:.1f} ms per batch of {args.timing_batch}")

  cfg = dict(vars(args))
  result = {"config": cfg, "dataset": dataset, "rows": rows, "history": history,
            "paper_cifar10_resnet20": {k: {"acc": a, "flop_speedup": s} for k, (a, s) in PAPER.items()},
            "seconds": {"total": time.perf_counter() - t_start, **seconds}, "table": table}
  if args.out_dir:
    common.write_json(os.path.join(args.out_dir, "trp_cnn.json"), result)
    png = os.path.join(args.out_dir, "trp_cnn.png")
    plot(png, rows, title=f"{dataset} ResNet-{args.depth}: TRP (m={args.period}, T={args.energy:g}), "
                          f"{args.epochs} epochs on {len(x_train):,} images")
    print(f"\nwrote {os.path.join(args.out_dir, 'trp_cnn.json')} and {png}")
  print(f"total {time.perf_counter() - t_start:.1f}s")
  result["artifacts"] = artifacts  # in-memory only (arrays): for tests and notebooks
  return result


def plot(path: str, rows: dict, *, title: str) -> None:
  """Test accuracy vs conv FLOPs per image: each decoupled run, the dense SVD at the same
  ranks, and the dense baseline."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
  dense = rows["dense"]
  ax.plot([dense["conv_flops_dense"]], [dense["acc_dense_weights"]], "k*", markersize=12,
          label="dense baseline")
  for i, (name, r) in enumerate(rows.items()):
    if name == "dense":
      continue
    c = f"C{i}"
    ax.plot([r["conv_flops"]], [r["acc_decoupled"]], "o", color=c, label=f"{name} (decoupled)")
    if "acc_dense_svd_same_ranks" in r:
      ax.plot([r["conv_flops"]], [r["acc_dense_svd_same_ranks"]], "x", color=c, markersize=8,
              label=f"dense SVD at {name}'s ranks")
  ax.set_xlabel("conv FLOPs per image (analytic)")
  ax.set_ylabel("test accuracy")
  ax.set_title(title, fontsize=9)
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path)
  plt.close(fig)


if __name__ == "__main__":
  main()
