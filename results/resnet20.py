"""ResNet-20 on Fashion-MNIST: every compression method at equal parameter and training budgets.

One *cell* is one training run (``run_cell(name, seed, size)``), written by
``results/suite.py`` as one JSON. Every model trains with the same optimizer (SGD,
Nesterov momentum 0.9, cosine decay from ``lr``), the same batches in the same order
(a pure function of the seed) and the same number of optimizer steps ``T`` -- a
fine-tune is counted inside ``T``. Compressed are the 18 3x3 block convs
(``resnet.BLOCK_CONVS``); stem, 1x1 shortcuts and classifier stay dense, as in TRP.
A budget ``b`` keeps a fraction ``b`` of every block conv's kernel parameters
(``ranks.ratio(b, min_rank=1)``, channel-wise ``(3*3*cin, cout)`` matrix, the same
per-layer ranks for every method). Every model, dense or compressed, is scored after an
exact BatchNorm recalibration on ``calib`` training images (``lod_common.bn_recalibrator``),
on the full test split and on a validation split held out of the training images (used
only for choosing settings, never the test split).

Cells (``b`` in the size's budgets):

* ``dense`` -- T steps. Also scores, without training, plain SVD (``svd@b``) and
  activation-whitened SVD (SVD-LLM, ``whiten@b``) of the trained net.
* ``dense_pre`` -- a dense net trained for ``T - F`` steps (its own cosine schedule),
  the start of the fine-tuned baselines.
* ``svd_ft@b`` / ``whiten_ft@b`` -- ``dense_pre`` truncated by SVD / whitened SVD, then
  F steps of fine-tuning of the factors (cosine from ``ft_lr``).
* ``scratch@b`` -- low-rank factors at the target rank trained from the (SVD-truncated)
  random init for T steps: the PufferFish-style baseline of Maestro.
* ``lod@b`` -- Maestro's low-rank ordered decomposition (Horvath et al., ICML 2024):
  full-rank factors of the init, ordered-dropout rank sampling (``lod.sample``) and the
  hierarchical group lasso; ranks shrink progressively (at 30/45/60/75% of T, linearly
  from full to the target ranks, ``lod.extract``, momentum sliced alike) and the last
  25% trains the target model without sampling.
* ``lod_nested`` -- one LoD run at full rank for T steps; ``lod_nested_ft@b`` cuts it to
  each budget's ranks (nested extraction, scored inside ``lod_nested``) and fine-tunes
  F more steps (reported separately: T + F steps).
* ``trp_channel`` / ``trp_spatial`` / ``trp_nu_channel`` / ``trp_nu_spatial`` -- Trained
  Rank Pruning (Xu et al. 2019): every ``period`` steps the block convs land on their
  energy-``energy`` truncation, channel- or spatial-wise; ``_nu`` adds the nuclear-norm
  sub-gradient ``nuclear * U_k V_k^T``. Decoupled at the same energy rule; the plain SVD of
  ``dense`` at the decoupled per-layer ranks is scored alongside (TRP's Table 1).
* ``trp_nu@b`` -- TRP with nuclear norm whose projection keeps the budget's ranks
  (``ranks.ratio(b)``): TRP on the accuracy-vs-size curve.

Ablations are cells with settings after ``~`` (``lod@0.25~lam=0,sampler=independent``):
any :class:`Size` field (``lam``, ``lr``, ``steps``, ``period``, ``nuclear`` ...) and, for
LoD, ``sampler=`` (``lod.SAMPLERS``, or ``none``: no ordered dropout, lasso kept) and ``warm=1`` (start from the full-rank
SVD of ``dense_pre`` and spend only the remaining F steps). :func:`ablations` lists the
search the README reports; it is scored on the validation split.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))  # data, resnet, lod_common

import jlr  # noqa: E402
import jlr.flax  # noqa: E402
from jlr import lod, ranks  # noqa: E402
from jlr.flax import calibrate  # noqa: E402
from jlr.train import TrainState, progress, train_step  # noqa: E402
import data as data_lib  # noqa: E402
import lod_common as common  # noqa: E402
from resnet import BLOCK_CONVS, ResNet  # noqa: E402

TASK = "resnet20"


@dataclasses.dataclass(frozen=True)
class Size:
  steps: int          # T: optimizer steps of every run (fine-tuning included)
  ft: int             # F: fine-tuning steps inside T
  batch: int
  train: int          # training images (after the validation split is held out)
  val: int            # validation images, held out of the training split
  test: int           # test images (10,000 = the full split)
  calib: int          # images for BatchNorm recalibration and whitening statistics
  budgets: tuple
  seeds: tuple
  lr: float = 0.1
  ft_lr: float = 0.01
  period: int = 20    # TRP projection period m
  energy: float = 0.9  # TRP energy threshold T
  nuclear: float = 3e-4
  lam: float = 3e-4   # LoD group-lasso strength


SIZES = {
    # CI-slow: every code path, one budget, one seed (minutes)
    "quick": Size(steps=40, ft=10, batch=64, train=6000, val=500, test=1000, calib=256,
                  budgets=(0.25,), seeds=(0,)),
    # 2 CPU cores, ~85 min of two single-threaded workers: 480 steps of 64 = 0.53 epoch
    # of Fashion-MNIST per run, 3 budgets, 3 seeds
    "cpu": Size(steps=480, ft=96, batch=64, train=58000, val=2000, test=10000, calib=512,
                budgets=(0.5, 0.25, 0.1), seeds=(0, 1, 2)),
    # a GPU: 30 epochs of 58,000 images per run
    "full": Size(steps=13590, ft=2718, batch=128, train=58000, val=2000, test=10000,
                 calib=1024, budgets=(0.5, 0.25, 0.1), seeds=(0, 1, 2)),
}

TRP_ENERGY = {"trp_channel": ("conv_channel", False), "trp_spatial": ("conv_spatial", False),
              "trp_nu_channel": ("conv_channel", True), "trp_nu_spatial": ("conv_spatial", True)}


def cells(size: Size) -> list[tuple[str, tuple[str, ...]]]:
  """``[(cell, dependencies)]`` in the order they are worth running (most decisive first)."""
  b = size.budgets
  out = [("dense", ()), ("dense_pre", ())]
  out += [(f"svd_ft@{x:g}", ("dense_pre",)) for x in b]
  out += [(f"whiten_ft@{x:g}", ("dense_pre",)) for x in b]
  out += [(f"scratch@{x:g}", ()) for x in b]
  out += [(f"lod@{x:g}", ()) for x in b]
  out += [("lod_nested", ())] + [(f"lod_nested_ft@{x:g}", ("lod_nested",)) for x in b]
  out += [(name, ("dense",)) for name in ("trp_nu_spatial", "trp_nu_channel")]
  out += [(f"trp_nu@{x:g}", ()) for x in b]
  return out


def trp_plain(size: Size) -> list[tuple[str, tuple[str, ...]]]:
  """TRP without the nuclear norm (the rest of TRP's Table 1), run after the ablations."""
  return [(name, ("dense",)) for name in ("trp_spatial", "trp_channel")]


def ablations(size: Size) -> list[tuple[str, tuple[str, ...]]]:
  """The small search on seed 0 at the middle budget (validation accuracy decides)."""
  b = f"{size.budgets[len(size.budgets) // 2]:g}"
  longer = lambda m: f"{m}@{b}~steps={2 * size.steps},ft={2 * size.ft}"  # noqa: E731
  # most telling first (a short session may stop the search part-way)
  return [(f"lod@{b}~warm=1", ("dense_pre",)), (f"lod@{b}~sampler=none", ()),
          (longer("lod"), ()), (longer("scratch"), ()), (f"lod@{b}~lam=0", ()),
          (f"trp_nu@{b}~nuclear=0", ()), (f"lod@{b}~lam=0.003", ()), (f"lod@{b}~lr=0.05", ()),
          (f"trp_nu@{b}~period=5", ())]


def parse(name: str, size: Size) -> tuple[str, float | None, Size, dict]:
  """``"lod@0.25~lam=0,sampler=none"`` -> ``("lod", 0.25, size with lam=0, {"sampler": "none"})``."""
  base, _, opts = name.partition("~")
  method, _, b = base.partition("@")
  fields = {f.name: f.type for f in dataclasses.fields(Size)}
  over, extra = {}, {}
  for item in filter(None, opts.split(",")):
    k, _, v = item.partition("=")
    if k in fields and k not in ("budgets", "seeds"):
      over[k] = type(getattr(size, k))(float(v) if "." in v or "e" in v else int(v))
    elif k in ("sampler", "warm"):
      extra[k] = v
    else:
      raise ValueError(f"{name}: unknown setting {k!r}")
  return method, (float(b) if b else None), dataclasses.replace(size, **over), extra


def is_block(path: str, leaf=None) -> bool:
  return path.endswith("kernel") and re.search(BLOCK_CONVS, path) is not None


# ----------------------------------------------------------------------------- the setting


class Setting:
  """Data, model, init, layouts and scoring shared by every cell of one seed."""

  def __init__(self, size: Size, seed: int, dataset: str = "auto", bars: bool = True):
    self.size, self.seed, self.bars = size, seed, bars
    self.dataset, (xtr, ytr, xte, yte) = data_lib.load_resolved(dataset)
    if self.dataset != "fashion_mnist":
      print(f"note: Fashion-MNIST is not installed (make data); using {self.dataset}")
    split = np.random.default_rng(1234).permutation(len(xtr))  # one fixed split for all seeds
    val, tr = split[: size.val], split[size.val: size.val + size.train]
    self.x_train, self.y_train = xtr[tr], ytr[tr]
    self.x_val, self.y_val = xtr[val], ytr[val]
    self.x_test, self.y_test = xte[: size.test], yte[: size.test]
    self.model = ResNet(depth=20, width=16)
    x0 = self.x_train[:1]
    init = self.model.init(jax.random.key(seed), x0)
    self.params0, self.stats0 = init["params"], init["batch_stats"]
    self.layouts = {k: jlr.flax.layouts(self.model, init, x0, train=False, conv=k)
                    for k in ("channel", "spatial")}
    self.calib = [self.x_train[i: i + 256] for i in range(0, size.calib, 256)]
    self._recal = common.bn_recalibrator(self.model, train=True)
    self._eval = jax.jit(self._eval_batch)
    self.flops_dense = self.flops(self.params0, self.stats0)
    self.kernel_params_dense = self.kernel_params(self.params0)

  # ---- data: batch i of a run is a pure function of (seed, i)
  def batches(self, steps: int, offset: int = 0):
    per_epoch = len(self.x_train) // self.size.batch
    for i in range(offset, offset + steps):
      epoch, j = divmod(i, per_epoch)
      order = np.random.default_rng([self.seed, epoch]).permutation(len(self.x_train))
      idx = order[j * self.size.batch: (j + 1) * self.size.batch]
      yield self.x_train[idx], self.y_train[idx]

  # ---- training
  def task_loss(self, params, extra, batch, key):
    del key
    x, y = batch
    logits, upd = jlr.flax.apply(self.model, {"params": params, **extra}, x, train=True,
                                 mutable=["batch_stats"])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return ce, (upd, {})

  def lod_loss(self, lam, sampler="layer"):
    def loss(params, extra, batch, key):
      sub = params if sampler == "none" else lod.sample(params, key, sampler=sampler)
      ce, (upd, _) = self.task_loss(sub, extra, batch, None)
      gl = lod.group_lasso(params)
      return ce + lam * gl, (upd, {"ce": ce})
    return loss

  def sgd(self, lr: float, steps: int):
    return optax.sgd(optax.cosine_decay_schedule(lr, max(steps, 1)), momentum=0.9, nesterov=True)

  def train(self, params, stats, tx, segments, desc: str, offset: int = 0):
    """Run ``segments = [(steps, loss_fn, before)]`` on one optimizer state; ``before(
    state) -> state`` reshapes it first (a LoD shrink) or is ``None``. Returns the final
    state and a per-segment log."""
    state = TrainState.create(params, tx, key=jax.random.fold_in(jax.random.key(self.seed), 7),
                              extra={"batch_stats": stats})
    log, done = [], offset
    for steps, loss_fn, before in segments:
      if before is not None:
        state = before(state)
      step = jax.jit(train_step(loss_fn, tx))
      t0, losses = time.perf_counter(), []
      bar = progress(self.batches(steps, done), total=steps, desc=desc, leave=False,
                     disable=not self.bars)
      for batch in bar:
        state, m = step(state, batch)
        losses.append(m["loss"])
      done += steps
      log.append({"steps": done, "loss": float(np.mean(jax.device_get(losses[-20:]))),
                  "seconds": round(time.perf_counter() - t0, 1)})
      print(f"{desc}: step {done} loss {log[-1]['loss']:.4f} ({log[-1]['seconds']}s)", flush=True)
    return state, log

  # ---- scoring
  def _eval_batch(self, params, stats, x, y):
    logits = jlr.flax.apply(self.model, {"params": params, "batch_stats": stats}, x, train=False)
    return jnp.sum(jnp.argmax(logits, -1) == y)

  def accuracy(self, params, stats, x, y) -> float:
    hits = sum(int(self._eval(params, stats, x[i: i + 500], y[i: i + 500]))
               for i in range(0, len(x), 500))
    return hits / len(x)

  def flops(self, params, stats) -> int:
    fwd = lambda p, s, x: jlr.flax.apply(self.model, {"params": p, "batch_stats": s}, x)  # noqa: E731
    ca = jax.jit(fwd).lower(params, stats, self.x_test[:1]).cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    return int(ca["flops"])

  @staticmethod
  def kernel_params(params) -> int:
    return int(sum(r.params for r in jlr.summary(params).rows if is_block(r.path)))

  def score(self, params, stats) -> dict:
    """Test/val accuracy after exact BN recalibration, cost relative to the dense net."""
    params = jax.device_get(params)
    stats = self._recal(params, stats, self.calib)
    kp = self.kernel_params(params)
    fl = self.flops(params, stats)
    out = {"test_acc": self.accuracy(params, stats, self.x_test, self.y_test),
           "val_acc": self.accuracy(params, stats, self.x_val, self.y_val),
           "kernel_params": kp, "kernel_fraction": kp / self.kernel_params_dense,
           "params": int(jlr.summary(params).total_params), "flops": fl,
           "flop_speedup": self.flops_dense / fl, "ranks": common.ranks_of(params)}
    print(f"  test {out['test_acc']:.4f} val {out['val_acc']:.4f} kernels "
          f"{out['kernel_fraction']:.3f} flop speed-up {out['flop_speedup']:.2f}x", flush=True)
    return out

  # ---- compression
  def budget_rule(self, b: float):
    return ranks.ratio(b, min_rank=1)

  def svd(self, params, b: float, layout: str = "channel", stats=None):
    return jlr.factorize(params, self.budget_rule(b), select=is_block,
                         layout=self.layouts[layout], stats=stats)

  def whiten_stats(self, params, stats) -> dict:
    """Gram of every block conv's im2col input on the calibration images (train-mode BN
    would see batch statistics; inference mode is what the compressed net will run)."""
    grams = calibrate.activations(self.model, {"params": params, "batch_stats": stats},
                                  self.calib, select=lambda p: is_block(p), train=False)
    return {k.removeprefix("params/"): v for k, v in grams.items()}

  def budget_ranks(self, b: float) -> dict:
    return common.ranks_of(self.svd(self.params0, b))


# ----------------------------------------------------------------------------- cache


def _cache_path(cache: str, seed: int, name: str) -> str:
  return os.path.join(cache, f"s{seed}", f"{name}.pkl")


def save(cache, seed, name, params, stats):
  path = _cache_path(cache, seed, name)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".tmp", "wb") as f:
    pickle.dump(jax.device_get((params, stats)), f)
  os.replace(path + ".tmp", path)


def load(cache, seed, name):
  with open(_cache_path(cache, seed, name), "rb") as f:
    return pickle.load(f)


# ----------------------------------------------------------------------------- cells


def run_cell(name: str, seed: int, size: Size, cache: str, dataset: str = "auto",
             bars: bool = True) -> dict:
  """Train and score one cell; returns its metrics (``results/suite.py`` writes the JSON)."""
  method, b, size, opts = parse(name, size)
  s = Setting(size, seed, dataset, bars)
  T, F = size.steps, size.ft
  out = {"dataset": s.dataset, "method": method, "budget": b, "steps": T, "options": opts}
  plain = s.task_loss

  if method in ("dense", "dense_pre"):
    steps = T if method == "dense" else T - F
    st, out["log"] = s.train(s.params0, s.stats0, s.sgd(size.lr, steps), [(steps, plain, None)],
                             method)
    p, bs = st.params, st.extra["batch_stats"]
    save(cache, seed, method, p, bs)
    out["steps"] = steps
    out["score"] = s.score(p, bs)
    if method == "dense":  # compression of the trained net, no training
      grams = s.whiten_stats(p, bs)
      out["derived"] = {}
      for x in size.budgets:
        out["derived"][f"svd@{x:g}"] = s.score(s.svd(p, x), bs)
        out["derived"][f"whiten@{x:g}"] = s.score(s.svd(p, x, stats=grams), bs)
    return out

  if method in ("svd_ft", "whiten_ft"):
    p, bs = load(cache, seed, "dense_pre")
    grams = s.whiten_stats(p, bs) if method == "whiten_ft" else None
    f = s.svd(p, b, stats=grams)
    st, out["log"] = s.train(f, bs, s.sgd(size.ft_lr, F), [(F, plain, None)], name, offset=T - F)
    out["score"] = s.score(st.params, st.extra["batch_stats"])
    return out

  if method == "scratch":
    f = s.svd(s.params0, b)
    st, out["log"] = s.train(f, s.stats0, s.sgd(size.lr, T), [(T, plain, None)], name)
    out["score"] = s.score(st.params, st.extra["batch_stats"])
    return out

  if method in ("lod", "lod_nested"):
    start_params, stats0, n, offset = s.params0, s.stats0, T, 0
    if opts.get("warm"):  # the remaining F steps from the SVD of the dense net
      start_params, stats0 = load(cache, seed, "dense_pre")
      n, offset = F, T - F
    full = lod.init(start_params, select=is_block, layout=s.layouts["channel"])
    tx = s.sgd(size.lr if not opts.get("warm") else size.ft_lr, n)
    sampler = opts.get("sampler", "layer")
    loss = s.lod_loss(size.lam, sampler)
    if method == "lod_nested":
      segments = [(n, loss, None)]
    else:
      target = s.budget_ranks(b)
      start = common.ranks_of(full)
      points = [round(n * q) for q in (0.3, 0.45, 0.6, 0.75)]
      lengths = np.diff([0] + points + [n])

      def shrink_to(k):
        want = {p: int(np.ceil(start[p] - (start[p] - target[p]) * k / 4)) for p in start}

        def before(state):
          params = lod.extract(state.params, ranks=want)
          return state.replace(params=params,
                               opt_state=lod.slice_opt_state(tx, state.opt_state, params))
        return before
      segments = [(int(lengths[0]), loss, None)]
      segments += [(int(n), loss if k < 4 else plain, shrink_to(k))
                   for k, n in enumerate(lengths[1:], start=1)]
    st, out["log"] = s.train(full, stats0, tx, segments, name, offset=offset)
    p, bs = st.params, st.extra["batch_stats"]
    if method == "lod":
      out["score"] = s.score(p, bs)
      return out
    save(cache, seed, "lod_nested", p, bs)
    out["score"] = s.score(p, bs)  # the full-rank factors
    out["derived"] = {f"lod_nested@{x:g}": s.score(lod.extract(p, ranks=s.budget_ranks(x)), bs)
                      for x in size.budgets}
    return out

  if method == "lod_nested_ft":
    p, bs = load(cache, seed, "lod_nested")
    sub = lod.extract(p, ranks=s.budget_ranks(b))
    st, out["log"] = s.train(sub, bs, s.sgd(size.ft_lr, F), [(F, plain, None)], name, offset=T)
    out["steps"] = T + F
    out["score"] = s.score(st.params, st.extra["batch_stats"])
    return out

  if method in TRP_ENERGY or method == "trp_nu":
    layout_name, nuclear = TRP_ENERGY.get(method, ("conv_channel", True))
    lay = s.layouts[layout_name.split("_")[1]]
    rule = ranks.energy(size.energy) if b is None else s.budget_rule(b)
    tx = jlr.trp.trp(s.sgd(size.lr, T), every=size.period, rank=rule,
                     nuclear=size.nuclear if nuclear else 0.0, select=is_block, layout=lay)
    st, out["log"] = s.train(s.params0, s.stats0, tx, [(T, plain, None)], name)
    p, bs = jax.device_get((st.params, st.extra["batch_stats"]))
    out["trained_dense_weights"] = s.score(p, bs)
    dec = jlr.trp.decouple(p, rule, select=is_block, layout=lay)
    out["score"] = s.score(dec, bs)
    if b is None:  # TRP's Table 1: the dense net truncated to the same per-layer ranks
      dp, dbs = load(cache, seed, "dense")
      same = {k: ranks.fixed(r) for k, r in common.ranks_of(dec).items()}
      svd = jlr.factorize(dp, same, select=is_block, layout=lay)
      out["dense_svd_same_ranks"] = s.score(svd, dbs)
    return out

  raise ValueError(f"unknown cell {name!r}")
