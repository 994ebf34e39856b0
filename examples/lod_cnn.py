"""Maestro LoD on a ResNet-20: train the conv factors, cut to any width, recalibrate BN.

A CIFAR-style ResNet-20 (``examples/resnet.py``: 16/32/64 channels, BatchNorm) is
trained on Fashion-MNIST (the Debian package ``dataset-fashion-mnist``) or, where that is
absent, MNIST, with the low-rank ordered decomposition of Horvath et al. (Maestro,
ICML 2024, arXiv 2308.14929):

1. ``lod.init(params, select=BLOCK_CONVS, layout=...)``: the 18 3x3 block convs become
   full-rank balanced factors (``--layout channel``: a 3x3 conv to ``r`` channels then a
   1x1 conv, ``(9 cin, cout)`` matrix; ``--layout spatial``: a 3x1 conv then a 1x3 conv,
   ``(3 cin, 3 cout)``). The stem (3x3x1x16), the two 1x1 shortcuts and the 64x10
   classifier stay dense: together they hold ~3.4k of ~272k parameters, and none of them
   can be factorized at a rank that saves parameters *and* keeps them useful (the stem's
   9x16 matrix breaks even at rank 5, the classifier's 64x10 at rank 8).
2. Every step samples an ordered-dropout sub-network (``lod.sample_ranks``, ``--sampler``) and
   minimizes ``cross-entropy + lam * lod.group_lasso(params)`` with Adam; BatchNorm runs
   in training mode (batch statistics; the running EMA is updated from the sample).
3. After the warm-up, every epoch ends with ``lod.shrink(params, eps, relative=True,
   multiple=4)``: a component goes when its importance is below ``eps`` times the layer's
   leading importance. Relative, because a conv followed by BatchNorm is scale-invariant:
   the lasso shrinks its scale freely and an absolute threshold would lose its meaning.
   The Adam moments are sliced alike.
4. **BatchNorm recalibration**: the running statistics belong to the network they were
   gathered on. After every shrink, and before any extracted sub-model is evaluated,
   they are recomputed exactly over ``--calib`` training images
   (``lod_common.bn_recalibrator``: moments of every BatchNorm input in a train-mode
   forward, pooled over the calibration set -- no EMA).

A dense ResNet-20 with the same initialization is trained for the same number of steps
(same optimizer, same batches). For nested widths w = 0.1 ... 1.0 the table shows the
LoD sub-model ``lod.deploy(lod.extract(params, width=w))`` with the full model's BN
statistics ("trained BN") and with its own, recalibrated ones, next to the SVD
truncation of the dense model at the same per-layer ranks (same parameters; BN
recalibrated too).
params: all parameters after ``deploy`` (BN included); FLOPs: XLA's cost analysis of
the inference forward of one image. Sub-models are evaluated through the equivalent
rank mask (``lod.with_ranks``; SVD: the masked full-rank SVD), so one compiled forward
serves all widths; the smoke test checks that this equals the extracted model.
Results: ``examples/results/lod_cnn.{json,png}``.

    python examples/lod_cnn.py --quick    # 2,000 images, 3 epochs: a few minutes on 2 cores
    python examples/lod_cnn.py            # 12,000 images, 8 epochs
    python examples/lod_cnn.py --layout spatial --mesh data=4,model=2
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
warnings.filterwarnings("ignore", category=DeprecationWarning)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # `data`, `resnet` from elsewhere

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jlr  # noqa: E402
import jlr.flax  # noqa: E402
from jlr import lod  # noqa: E402
import data as data_lib  # noqa: E402
import lod_common as common  # noqa: E402
from resnet import BLOCK_CONVS, ResNet  # noqa: E402
from train import TrainState, evaluate  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
LAYOUTS = {"channel": "conv_channel", "spatial": "conv_spatial"}
SIZES = {"quick": dict(epochs=3, train_limit=2000, test_limit=1000, batch_size=64, calib=256),
         "full": dict(epochs=8, train_limit=12000, test_limit=5000, batch_size=128, calib=512)}


def select(path: str, leaf) -> bool:
  """The 3x3 convs of the residual blocks (``resnet.BLOCK_CONVS``)."""
  return path.endswith("/kernel") and re.search(BLOCK_CONVS, path) is not None


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--quick", action="store_true",
                 help=f"short run: {SIZES['quick']} (else {SIZES['full']})")
  p.add_argument("--epochs", type=int, default=None, help="default from the size preset")
  p.add_argument("--train-limit", type=int, default=None, help="first N training images")
  p.add_argument("--test-limit", type=int, default=None, help="first N test images")
  p.add_argument("--batch-size", type=int, default=None)
  p.add_argument("--dataset", choices=("auto", "fashion_mnist", "mnist"), default="auto",
                 help="auto: Fashion-MNIST if installed, else MNIST")
  p.add_argument("--depth", type=int, default=20, help="ResNet depth 6n+2")
  p.add_argument("--width", type=int, default=16, help="channels of the first stage")
  p.add_argument("--layout", choices=tuple(LAYOUTS), default="channel",
                 help="conv factorization: channel (kxk to r, 1x1) or spatial (kx1, 1xk)")
  p.add_argument("--lam", type=float, default=3e-4, help="group-lasso strength lambda")
  p.add_argument("--eps", type=float, default=0.1,
                 help="shrink threshold, relative to each layer's leading importance")
  p.add_argument("--warmup", type=int, default=1, help="epochs before the first shrink")
  p.add_argument("--multiple", type=int, default=4, help="round shrunk ranks up to this")
  p.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--sampler", choices=lod.SAMPLERS, default="layer",
                 help="ordered-dropout sampler (lod.sample_ranks)")
  p.add_argument("--fraction", type=float, default=0.5, help="rank fraction of --sampler fixed")
  p.add_argument("--calib", type=int, default=None,
                 help="training images for BatchNorm recalibration (default from the preset)")
  p.add_argument("--calib-batch", type=int, default=256, help="their batch size")
  p.add_argument("--mesh", type=str, default=None,
                 help="e.g. data=4,model=2: FSDP params, batches over 'data' (jlr.sharding)")
  p.add_argument("--ckpt-dir", type=str, default=None,
                 help="save a checkpoint every epoch (LoD run in DIR/lod, dense in DIR/dense)")
  p.add_argument("--resume", action="store_true", help="continue from --ckpt-dir's latest epoch")
  p.add_argument("--out-dir", type=str, default=RESULTS,
                 help="where lod_cnn.{json,png} go ('' for nowhere)")
  p.add_argument("--no-progress", action="store_true", help="no progress bars")
  args = p.parse_args(argv)
  for k, v in SIZES["quick" if args.quick else "full"].items():
    if getattr(args, k) is None:
      setattr(args, k, v)
  if args.resume and not args.ckpt_dir:
    p.error("--resume needs --ckpt-dir")
  return args


def svd_ranks(svd_full, ranks: dict) -> dict:
  """The ranks ``jlr.factorize(dense, ranks)`` really applies, given the full-rank SVD
  ``svd_full = lod.init(dense)``: a layer whose factors would not be smaller than its
  kernel stays dense (full rank), as in ``lod_common.compare_widths``."""
  full = {p: x for p, x in jlr.select.leaves(svd_full)[0] if jlr.is_lowrank(x)}
  out = {}
  for path, r in ranks.items():
    f = full[path]
    m, n = f.layout.matrix_shape
    out[path] = r if r * (m + n) < m * n else f.rank
  return out


def main(argv=None) -> dict:
  args = parse_args(argv)
  t_start = time.perf_counter()
  mesh = common.parse_mesh(args.mesh)
  name, (x_train, y_train, x_test, y_test) = data_lib.load_resolved(args.dataset)
  x_train, y_train = x_train[: args.train_limit], y_train[: args.train_limit]
  x_test, y_test = x_test[: args.test_limit], y_test[: args.test_limit]
  steps_per_epoch = len(x_train) // args.batch_size
  print(f"{name}: {len(x_train):,} train / {len(x_test):,} test images; ResNet-{args.depth} "
        f"(width {args.width}), {args.layout}-wise conv factors; {args.epochs} epochs x "
        f"{steps_per_epoch} steps of {args.batch_size}; lam={args.lam:g} eps={args.eps:g} "
        f"(relative) sampler={args.sampler}" + (f"; mesh {dict(mesh.shape)}" if mesh else ""))

  model = ResNet(depth=args.depth, width=args.width)
  variables = model.init(jax.random.key(args.seed), x_train[:1])
  dense_init, bs_init = variables["params"], variables["batch_stats"]
  # every conv's layout read from the model (never guessed from shapes)
  layout = jlr.flax.layouts(model, variables, x_train[:1], train=False, conv=args.layout)
  tx = optax.adam(args.lr)
  key = jax.random.fold_in(jax.random.key(args.seed), 1)
  recalibrate_fn = common.bn_recalibrator(model, train=True)
  calib = [x_train[i: i + args.calib_batch]
           for i in range(0, min(args.calib, len(x_train)), args.calib_batch)]

  def recalibrate(params, batch_stats):
    return recalibrate_fn(params, batch_stats, calib)

  def epoch_batches(epoch):  # a pure function of (seed, epoch): resumable
    return data_lib.batches(x_train, y_train, args.batch_size,
                            np.random.default_rng([args.seed, epoch]))

  def task_loss(params, batch_stats, x, y, ranks=None):  # ranks: ordered dropout
    logits, upd = jlr.factorized(model.apply, ranks=ranks)(
        {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return ce, upd["batch_stats"]

  def lod_loss(params, extra, batch, key):
    ranks = lod.sample_ranks(params, key, sampler=args.sampler, fraction=args.fraction)
    ce, bs = task_loss(params, extra["batch_stats"], *batch, ranks=ranks)
    gl = lod.group_lasso(params)
    return ce + args.lam * gl, ({"batch_stats": bs}, {"ce": ce, "group_lasso": gl})

  def dense_loss(params, extra, batch, key):
    ce, bs = task_loss(params, extra["batch_stats"], *batch)
    return ce, ({"batch_stats": bs}, {})

  def forward(params, batch_stats, x):
    return jlr.flax.apply(model, {"params": params, "batch_stats": batch_stats}, x)

  @jax.jit
  def eval_batch(params, batch_stats, x, y):
    return {"acc": jnp.mean(jnp.argmax(forward(params, batch_stats, x), -1) == y),
            "count": x.shape[0]}

  def accuracy(params, batch_stats) -> float:
    step = 500
    test = ((x_test[i: i + step], y_test[i: i + step]) for i in range(0, len(x_test), step))
    return evaluate(lambda b: eval_batch(params, batch_stats, *b), test)["acc"]

  def flops(params, batch_stats) -> int:
    """XLA's FLOP count of the inference forward of one image (lowered, not compiled)."""
    ca = jax.jit(forward).lower(params, batch_stats, x_test[:1]).cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    return int(ca["flops"])

  def cost(params, batch_stats) -> dict:
    return {"params": int(jlr.summary(params).total_params), "flops": flops(params, batch_stats)}

  on_epoch = lambda epoch, state, log: {  # noqa: E731
      "test_acc": round(accuracy(state.params, state.extra["batch_stats"]), 4)}
  recal_state = lambda s: s.replace(  # noqa: E731
      extra={"batch_stats": recalibrate(s.params, s.extra["batch_stats"])})
  shared = dict(dataset=name, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                train_limit=args.train_limit, depth=args.depth, width=args.width)
  bars = not args.no_progress

  # ---- LoD training (BN recalibrated after every shrink)
  template = common.lod_template(dense_init, tx, key, select, layout=layout,
                                 extra={"batch_stats": bs_init})
  ckpt = None
  if args.ckpt_dir:
    meta = dict(shared, lam=args.lam, eps=args.eps, warmup=args.warmup, sampler=args.sampler,
                fraction=args.fraction, layout=args.layout, multiple=args.multiple,
                calib=args.calib, calib_batch=args.calib_batch)
    ckpt = common.RankedCheckpoints(os.path.join(args.ckpt_dir, "lod"), template, meta)
  t0 = time.perf_counter()
  state, lod_hist = common.fit(
      template({}), lod_loss, tx, epoch_batches=epoch_batches, steps_per_epoch=steps_per_epoch,
      epochs=args.epochs, eps=args.eps, warmup=args.warmup, multiple=args.multiple,
      relative=True, after_shrink=recal_state, ckpt=ckpt, resume=args.resume,
      on_epoch=on_epoch, mesh=mesh, desc="LoD", bars=bars)
  lod_seconds = time.perf_counter() - t0
  lod_params, lod_bs = state.params, state.extra["batch_stats"]

  # ---- dense baseline: same init, optimizer, batches and number of steps
  dense_template = lambda ranks: TrainState.create(  # noqa: E731
      dense_init, tx, key=key, extra={"batch_stats": bs_init})
  ckpt = None
  if args.ckpt_dir:
    ckpt = common.RankedCheckpoints(os.path.join(args.ckpt_dir, "dense"), dense_template, shared)
  t0 = time.perf_counter()
  dstate, dense_hist = common.fit(
      dense_template({}), dense_loss, tx, epoch_batches=epoch_batches,
      steps_per_epoch=steps_per_epoch, epochs=args.epochs, ckpt=ckpt, resume=args.resume,
      on_epoch=on_epoch, mesh=mesh, desc="dense", bars=bars)
  dense_seconds = time.perf_counter() - t0
  dense_params, dense_bs = dstate.params, dstate.extra["batch_stats"]

  # ---- nested widths: LoD prefixes (running vs recalibrated BN) and SVD of dense
  t0 = time.perf_counter()
  svd_full = lod.init(dense_params, select=select, layout=layout)
  trained_bs = recalibrate(lod_params, lod_bs)
  dense = dict(cost(dense_params, dense_bs), acc_running_bn=accuracy(dense_params, dense_bs),
               acc=accuracy(dense_params, recalibrate(dense_params, dense_bs)),
               fingerprint=common.fingerprint(dense_params))
  trained = dict(cost(lod_params, lod_bs), acc_running_bn=accuracy(lod_params, lod_bs),
                 acc=accuracy(lod_params, trained_bs), ranks=common.ranks_of(lod_params),
                 fingerprint=common.fingerprint(lod_params))
  rows = []
  bar = common.progress(common.WIDTHS, desc="widths", leave=False, disable=not bars)
  for w in bar:
    sub = lod.extract(lod_params, width=w)
    ranks = common.ranks_of(sub)
    masked = lod.with_ranks(lod_params, ranks)  # == sub, at the trained shapes
    sub_bs = recalibrate(masked, lod_bs)
    s_ranks = svd_ranks(svd_full, ranks)
    s_masked = lod.with_ranks(svd_full, s_ranks)  # == factorize(dense, ranks)
    s_bs = recalibrate(s_masked, dense_bs)
    svd = jlr.factorize(dense_params, {p: jlr.ranks.fixed(r) for p, r in ranks.items()},
                        layout=layout)
    rows.append({
        "width": w, "ranks": ranks,
        "lod": dict(cost(lod.deploy(sub), sub_bs), acc_running_bn=accuracy(masked, lod_bs),
                    acc=accuracy(masked, sub_bs)),
        "svd": dict(cost(svd, s_bs), acc=accuracy(s_masked, s_bs))})
  compare_seconds = time.perf_counter() - t0

  full_init = lod.init(dense_init, select=select, layout=layout)
  full_ranks = {p: f.rank for p, f in jlr.select.leaves(full_init)[0] if jlr.is_lowrank(f)}
  frac = lambda ranks: f"{sum(ranks.values()) / sum(full_ranks.values()):.2f}"  # noqa: E731
  head = ["model", "rank frac", "params", "FLOPs", "acc (trained BN)", "acc (recal. BN)",
          "SVD params", "SVD acc (recal. BN)"]
  pct = lambda x: f"{x:.2%}"  # noqa: E731
  body = [["dense baseline", "-", f"{dense['params']:,}", common.si(dense["flops"]),
           pct(dense["acc_running_bn"]), pct(dense["acc"]), f"{dense['params']:,}",
           pct(dense["acc"])],
          ["LoD trained (factors)", frac(trained["ranks"]), f"{trained['params']:,}",
           common.si(trained["flops"]), pct(trained["acc_running_bn"]), pct(trained["acc"]),
           "", ""]]
  for r in rows:
    a, b = r["lod"], r["svd"]
    body.append([f"width {r['width']:.1f}", frac(r["ranks"]), f"{a['params']:,}",
                 common.si(a["flops"]), pct(a["acc_running_bn"]), pct(a["acc"]),
                 f"{b['params']:,}", pct(b["acc"])])
  print(f"\nLoD trained {lod_seconds:.1f}s, dense {dense_seconds:.1f}s ({args.epochs} epochs "
        f"each), comparison {compare_seconds:.1f}s. Test accuracy on {len(x_test):,} "
        f"{name} images.\nrank frac: sum of the 18 conv ranks / their full ranks. params: "
        "all parameters after lod.deploy; FLOPs: XLA cost analysis of one image's forward.\n"
        "trained BN: the full model's statistics at the end of training (a width-w "
        "sub-model evaluated with them); recal. BN: the evaluated model's own statistics, "
        f"recomputed exactly over {sum(len(c) for c in calib)} training images.\n"
        "SVD: the dense baseline truncated (jlr.factorize) to the same per-layer ranks, "
        "hence the same params.\n")
  table = common.print_table(head, body)

  if mesh is not None:
    trained["sharding"] = common.shardings_of(lod_params)
  result = {"config": vars(args), "dataset": name, "dense": dense, "lod_trained": trained,
            "rows": rows, "history": {"lod": lod_hist, "dense": dense_hist},
            "seconds": {"lod": lod_seconds, "dense": dense_seconds, "compare": compare_seconds,
                        "total": time.perf_counter() - t_start},
            "table": table}
  common.save_results(args.out_dir, "lod_cnn", result, "acc", ylabel="test accuracy",
                      title=f"{name} ResNet-{args.depth}: LoD ({args.layout}, "
                            f"lam={args.lam:g}, eps={args.eps:g}) vs SVD of dense",
                      curves=(("lod", "LoD nested widths, full model's BN (no recalibration)",
                               "^:"),),
                      extra_metric="acc_running_bn")
  print(f"total {time.perf_counter() - t_start:.1f}s")
  return result


if __name__ == "__main__":
  main()
