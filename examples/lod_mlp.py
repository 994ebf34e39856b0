"""Maestro LoD on MNIST: train an MLP's low-rank factors, then cut it to any width.

An MLP 784-512-512-10 (``flax.linen``, ``nn.Dense``) is trained from scratch with the
low-rank ordered decomposition of Horvath et al. (Maestro, arXiv 2308.14929):

1. ``params = lod.init(random_init)``: every Dense kernel becomes full-rank balanced
   factors ``u = P sqrt(S)``, ``v = sqrt(S) Q^T`` (the model is unchanged at step 0).
2. Every step samples an ordered-dropout sub-network ``lod.sample_ranks(params, key)``
   (``--sampler``: by default one layer at a random rank ``b``, the others full) and
   minimizes ``cross-entropy(jlr.factorized(model.apply, ranks=...)(params, x))
   + lam * lod.group_lasso(params)`` with Adam, the gradient taken w.r.t. the full factors.
3. After the warm-up epoch, every epoch ends with ``lod.shrink(params, eps, multiple=8)``
   (components whose importance ``||u[:, j:]|| ||v[j:, :]|| < eps`` go) and the Adam
   moments are sliced alike (``lod.slice_opt_state``).

A dense MLP with the same initialization is trained for the same steps (same optimizer
and data order) as the baseline. The table then compares, for nested widths
w = 0.1 ... 1.0, the LoD sub-model ``lod.deploy(lod.extract(params, width=w))`` with the
SVD truncation of the dense model at the *same per-layer ranks* (``jlr.factorize`` with
a ``{path: rank}`` dict; same parameter count): params, kernel FLOPs per example, test
accuracy. Results go to ``examples/results/lod_mlp.{json,png}``.

    python examples/lod_mlp.py --quick          # 6 epochs, ~40 s on 2 CPU cores
    python examples/lod_mlp.py                  # 15 epochs on all 60,000 images, ~70 s
    python examples/lod_mlp.py --ckpt-dir /tmp/lod --resume   # resumable (bit-identical)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
warnings.filterwarnings("ignore", category=DeprecationWarning)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # `data` when run from elsewhere

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jlr  # noqa: E402
import jlr.flax  # noqa: E402
from jlr import lod  # noqa: E402
import lod_common as common  # noqa: E402
from data import batches, mnist  # noqa: E402
from train import TrainState, evaluate  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


class MLP(nn.Module):
  """Flatten -> [Dense(h) -> relu] per hidden width -> Dense(classes)."""

  hidden: tuple[int, ...] = (512, 512)
  classes: int = 10

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    for h in self.hidden:
      x = nn.relu(nn.Dense(h)(x))
    return nn.Dense(self.classes)(x)


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--epochs", type=int, default=None, help="default 15 (--quick: 6)")
  p.add_argument("--lam", type=float, default=1e-4, help="group-lasso strength lambda")
  p.add_argument("--eps", type=float, default=0.1, help="shrink threshold on importance")
  p.add_argument("--warmup", type=int, default=1, help="epochs before the first shrink")
  p.add_argument("--batch-size", type=int, default=128)
  p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--sampler", choices=lod.SAMPLERS, default="layer",
                 help="ordered-dropout sampler (lod.sample_ranks)")
  p.add_argument("--fraction", type=float, default=0.5, help="rank fraction of --sampler fixed")
  p.add_argument("--hidden", type=str, default="512,512", help="hidden widths")
  p.add_argument("--train-limit", type=int, default=None,
                 help="use the first N training images (default all)")
  p.add_argument("--test-limit", type=int, default=None, help="use the first N test images")
  p.add_argument("--quick", action="store_true", help="6 epochs instead of 15 (~40 s on 2 cores)")
  p.add_argument("--ckpt-dir", type=str, default=None,
                 help="save a checkpoint every epoch (LoD run in DIR/lod, dense in DIR/dense)")
  p.add_argument("--resume", action="store_true", help="continue from --ckpt-dir's latest epoch")
  p.add_argument("--mesh", type=str, default=None,
                 help="e.g. data=4,model=2: FSDP-placed params (jlr.sharding.place), batches "
                      "split over 'data', re-placed after every shrink")
  p.add_argument("--out-dir", type=str, default=RESULTS, help="where lod_mlp.{json,png} go")
  p.add_argument("--no-progress", action="store_true", help="no progress bars (epoch lines are still printed)")
  args = p.parse_args(argv)
  if args.epochs is None:
    args.epochs = 6 if args.quick else 15
  if args.resume and not args.ckpt_dir:
    p.error("--resume needs --ckpt-dir")
  args.hidden = tuple(int(h) for h in args.hidden.split(",") if h)
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  t_start = time.perf_counter()
  mesh = common.parse_mesh(args.mesh)
  x_train, y_train, x_test, y_test = mnist()
  x_train, y_train = x_train[: args.train_limit], y_train[: args.train_limit]
  x_test, y_test = x_test[: args.test_limit], y_test[: args.test_limit]
  steps_per_epoch = len(x_train) // args.batch_size
  print(f"MNIST: {len(x_train):,} train / {len(x_test):,} test images; MLP 784-"
        f"{'-'.join(map(str, args.hidden))}-10; {args.epochs} epochs x {steps_per_epoch} "
        f"steps; lam={args.lam:g} eps={args.eps:g} sampler={args.sampler}")

  model = MLP(hidden=args.hidden)
  dense_init = model.init(jax.random.key(args.seed), x_train[:1])["params"]
  tx = optax.adam(args.lr)
  key = jax.random.fold_in(jax.random.key(args.seed), 1)

  def epoch_batches(epoch):  # a pure function of (seed, epoch): resumable
    return batches(x_train, y_train, args.batch_size, np.random.default_rng([args.seed, epoch]))

  def task_loss(params, x, y, ranks=None):  # ranks: the ordered-dropout sub-network
    logits = jlr.factorized(model.apply, ranks=ranks)({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def lod_loss(params, extra, batch, key):
    ranks = lod.sample_ranks(params, key, sampler=args.sampler, fraction=args.fraction)
    ce = task_loss(params, *batch, ranks=ranks)
    gl = lod.group_lasso(params)
    return ce + args.lam * gl, (extra, {"ce": ce, "group_lasso": gl})

  def dense_loss(params, extra, batch, key):
    return task_loss(params, *batch), (extra, {})

  @jax.jit
  def eval_batch(params, x, y):
    logits = jlr.flax.apply(model, {"params": params}, x)
    return {"acc": jnp.mean(jnp.argmax(logits, -1) == y), "count": x.shape[0]}

  def accuracy(params) -> dict:
    step = 1000
    test = ((x_test[i: i + step], y_test[i: i + step]) for i in range(0, len(x_test), step))
    return {"acc": evaluate(lambda b: eval_batch(params, *b), test)["acc"]}

  on_epoch = lambda epoch, state, log: {"test_acc": round(accuracy(state.params)["acc"], 4)}  # noqa: E731
  shared = dict(batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                train_limit=args.train_limit, hidden=list(args.hidden))

  # ---- LoD training
  layout = jlr.flax.layouts(model, {"params": dense_init}, x_train[:1])  # read, not guessed
  template = common.lod_template(dense_init, tx, key, layout=layout)
  ckpt = None
  if args.ckpt_dir:
    meta = dict(shared, lam=args.lam, eps=args.eps, warmup=args.warmup, sampler=args.sampler,
                fraction=args.fraction)
    ckpt = common.RankedCheckpoints(os.path.join(args.ckpt_dir, "lod"), template, meta)
  t0 = time.perf_counter()
  state, lod_hist = common.fit(
      template({}), lod_loss, tx, epoch_batches=epoch_batches, steps_per_epoch=steps_per_epoch,
      epochs=args.epochs, eps=args.eps, warmup=args.warmup, ckpt=ckpt, resume=args.resume,
      on_epoch=on_epoch, mesh=mesh, desc="LoD", bars=not args.no_progress)
  lod_seconds = time.perf_counter() - t0
  lod_params = state.params

  # ---- dense baseline: same init, optimizer, data order and number of steps
  dense_template = lambda ranks: TrainState.create(dense_init, tx, key=key)  # noqa: E731
  ckpt = None
  if args.ckpt_dir:
    ckpt = common.RankedCheckpoints(os.path.join(args.ckpt_dir, "dense"), dense_template, shared)
  t0 = time.perf_counter()
  dstate, dense_hist = common.fit(
      dense_template({}), dense_loss, tx, epoch_batches=epoch_batches,
      steps_per_epoch=steps_per_epoch, epochs=args.epochs, ckpt=ckpt, resume=args.resume,
      on_epoch=on_epoch, mesh=mesh, desc="dense", bars=not args.no_progress)
  dense_seconds = time.perf_counter() - t0
  dense_params = dstate.params

  # ---- nested widths vs SVD at the same ranks
  rows = common.compare_widths(lod_params, dense_params, accuracy)
  dense = dict(common.cost(dense_params), **accuracy(dense_params),
               fingerprint=common.fingerprint(dense_params))
  trained = dict(common.cost(lod_params), **accuracy(lod_params), ranks=common.ranks_of(lod_params),
                 fingerprint=common.fingerprint(lod_params))

  head = ["model", "LoD ranks", "LoD params", "LoD FLOPs", "LoD acc", "SVD params", "SVD acc"]
  fmt = lambda c: [f"{c['params']:,}", common.si(c["flops"]), f"{c['acc']:.2%}"]  # noqa: E731
  body = [["dense baseline", "-", *fmt(dense), f"{dense['params']:,}", f"{dense['acc']:.2%}"],
          ["LoD trained (factors)", "/".join(map(str, trained["ranks"].values())), *fmt(trained),
           "", ""]]
  for r in rows:
    body.append([f"width {r['width']:.1f}", "/".join(map(str, r["ranks"].values())), *fmt(r["lod"]),
                 f"{r['svd']['params']:,}", f"{r['svd']['acc']:.2%}"])
  print(f"\nLoD trained {lod_seconds:.1f}s, dense {dense_seconds:.1f}s. Test accuracy on "
        f"{len(x_test):,} images; params: all leaves after lod.deploy; FLOPs: kernel FLOPs "
        "per example (2 x multiply-adds).\nSVD: the dense baseline truncated (jlr.factorize) "
        "to the same per-layer ranks, hence the same params.\n")
  table = common.print_table(head, body)

  if mesh is not None:
    trained["sharding"] = common.shardings_of(lod_params)
  result = {"config": vars(args), "dense": dense, "lod_trained": trained, "rows": rows,
            "history": {"lod": lod_hist, "dense": dense_hist},
            "seconds": {"lod": lod_seconds, "dense": dense_seconds,
                        "total": time.perf_counter() - t_start},
            "table": table}
  common.save_results(args.out_dir, "lod_mlp", result, "acc", ylabel="test accuracy",
                      title=f"MNIST MLP: LoD (lam={args.lam:g}, eps={args.eps:g}) vs SVD of "
                            f"dense, {args.epochs} epochs")
  print(f"total {time.perf_counter() - t_start:.1f}s")
  return result


if __name__ == "__main__":
  main()
