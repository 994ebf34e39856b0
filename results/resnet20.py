"""A CIFAR ResNet on Fashion-MNIST: every compression method at equal parameter and training budgets.

ResNet-20 in the ``cpu`` size (the early-training tables), ResNet-8 trained to
convergence with augmentation and weight decay in the ``converged`` size.

The cells are ``results/cells.py``'s; this module is the task they run on. Every model
trains with SGD (Nesterov momentum 0.9, cosine decay from ``lr``, or lr / 10 at 50% and
75% in ``converged``) on the same batches in the same order. Compressed are the 18 3x3 block convs (``resnet.BLOCK_CONVS``), as
channel-wise ``(3*3*cin, cout)`` matrices; stem, 1x1 shortcuts and classifier stay dense,
as in TRP, whose energy cells run channel- and spatial-wise (``trp_channel``,
``trp_spatial``, ``trp_nu_channel``, ``trp_nu_spatial``). Every model, dense or
compressed, is scored after an exact BatchNorm recalibration on ``calib`` training
images (``lod_common.bn_recalibrator``), on the full test split and on a validation
split held out of the training images (used only for choosing settings, never the test
split). :func:`ablations` lists the search the README reports.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))  # data, resnet, lod_common

import jlr  # noqa: E402
import jlr.flax  # noqa: E402
from jlr.flax import calibrate  # noqa: E402
import data as data_lib  # noqa: E402
import lod_common as common  # noqa: E402
from resnet import BLOCK_CONVS, ResNet  # noqa: E402

sys.path.insert(0, HERE)
import cells as cells_lib  # noqa: E402

TASK = "resnet20"


@dataclasses.dataclass(frozen=True)
class Size(cells_lib.Recipe):
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
  depth: int = 20      # 6n + 2
  augment: bool = False  # random 28x28 crops of the 2-pixel padded image, horizontal flips
  # "cosine" decay to 0, or "step": lr / 10 at 50% and 75% of the run (TRP's released
  # ResNet schedule, epochs 81 and 122 of 164), so the last fifth runs at lr / 100 and
  # the convergence check (it moves dense by < 0.3 points) measures training, not annealing
  lr_schedule: str = "cosine"


SIZES = {
    # CI-slow: every code path, one budget, one seed (minutes)
    "quick": Size(steps=40, ft=10, batch=64, train=6000, val=500, test=1000, calib=256,
                  budgets=(0.25,), seeds=(0,)),
    # every code path of the converged suite in minutes (CI-slow)
    "converged-quick": Size(steps=40, ft=10, batch=64, train=6000, val=500, test=1000,
                            calib=256, budgets=(0.25,), seeds=(0,), converged=True, depth=8,
                            augment=True, weight_decay=5e-4, curve=2, scratch_init="default",
                            nuclear_on="every_step", shrink="threshold", interval=0.1,
                            nuclear_grid=(1e-4, 1e-3), period_grid=(10,), lam_grid=(3e-4,),
                            eps_grid=(0.02, 0.1)),
    # 2 CPU cores, until dense converges: ResNet-8 (16/32/64 channels), 16 epochs of 128
    # augmented images, SGD + weight decay 5e-4, lr / 10 at 50% and 75%, budgets 25% and
    # 10%, 3 seeds (~31 min of one core per dense run). Measured: 20 cosine epochs reached
    # 92.73% but moved +0.57 points in the last fifth; 12 step-schedule epochs moved -0.10
    # but stopped at 91.80%
    "converged": Size(steps=16 * 453, ft=725, batch=128, train=58000, val=2000,
                      test=10000, calib=1024, budgets=(0.25, 0.1), seeds=(0, 1, 2),
                      converged=True, depth=8, augment=True, weight_decay=5e-4, curve=10,
                      lr_schedule="step",
                      scratch_init="default", nuclear_on="every_step", shrink="threshold",
                      nuclear_grid=(1e-4, 1e-3), period_grid=(10, 40), lam_grid=(1e-4, 1e-3),
                      eps_grid=(0.02, 0.1)),
    # 2 CPU cores, ~85 min of two single-threaded workers: 480 steps of 64 = 0.53 epoch
    # of Fashion-MNIST per run, 3 budgets, 3 seeds
    "cpu": Size(steps=480, ft=96, batch=64, train=58000, val=2000, test=10000, calib=512,
                budgets=(0.5, 0.25, 0.1), seeds=(0, 1, 2)),
    # a GPU: 30 epochs of 58,000 images per run
    "full": Size(steps=13590, ft=2718, batch=128, train=58000, val=2000, test=10000,
                 calib=1024, budgets=(0.5, 0.25, 0.1), seeds=(0, 1, 2)),
}

def cells(size: Size) -> list[tuple[str, tuple[str, ...]]]:
  """``[(cell, dependencies)]`` in the order they are worth running (most decisive first)."""
  if size.converged:  # TRP's energy point channel-wise (the budgets' layout)
    return cells_lib.curve(size) + cells_lib.trp_cells(size, ("trp_nu",))
  return cells_lib.curve(size) + [(name, ("dense",)) for name in ("trp_nu_spatial", "trp_nu_channel")] \
      + [(f"trp_nu@{x:g}", ()) for x in size.budgets]


def trp_plain(size: Size) -> list[tuple[str, tuple[str, ...]]]:
  """TRP without the nuclear norm (the rest of TRP's Table 1), run after the ablations."""
  if size.converged:  # its ablation is the search's nuclear=0 cell
    return []
  return [(name, ("dense",)) for name in ("trp_spatial", "trp_channel")]


def ablations(size: Size) -> list[tuple[str, tuple[str, ...]]]:
  """The small search on seed 0 at the middle budget (validation accuracy decides). The
  quick size keeps two (CI-slow has 15 minutes for both tasks)."""
  if size.converged:  # the validation search the main cells choose from, TRP without Nu
    b = f"{size.budgets[0]:g}"
    return [(c, ()) for cs in cells_lib.search(size).values() for c in cs] + [
        (f"trp_nu@{b}~nuclear=0,period={size.period_grid[0]}", ())]
  b, longer = cells_lib.middle(size), lambda m: cells_lib.longer(m, size)  # noqa: E731
  if size == SIZES["quick"]:  # the code paths only (an override with a dependency, a
    return [(f"lod@{b}~warm=1", ("dense_pre",)), (longer("scratch"), ())]  # longer run)
  # most telling first (a short session may stop the search part-way)
  return [(f"lod@{b}~warm=1", ("dense_pre",)), (f"lod@{b}~sampler=none", ()),
          (longer("lod"), ()), (longer("scratch"), ()), (f"lod@{b}~lam=0", ()),
          (f"trp_nu@{b}~nuclear=0", ()), (f"lod@{b}~lam=0.003", ()), (f"lod@{b}~lr=0.05", ()),
          (f"trp_nu@{b}~period=5", ())]


def augment(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Random 28x28 crops of the 2-pixel zero-padded images and horizontal flips (half)."""
  n, h, w = x.shape[:3]
  padded = np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)))
  dy, dx = rng.integers(0, 5, n), rng.integers(0, 5, n)
  rows = dy[:, None] + np.arange(h)  # (n, h)
  cols = dx[:, None] + np.arange(w)
  out = padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
  flip = rng.random(n) < 0.5
  out[flip] = out[flip, :, ::-1]
  return out


def is_block(path: str, leaf=None) -> bool:
  return path.endswith("kernel") and re.search(BLOCK_CONVS, path) is not None


# ----------------------------------------------------------------------------- the task


class Setting(cells_lib.Task):
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
    self.model = ResNet(depth=size.depth, width=16)
    x0 = self.x_train[:1]
    init = self.model.init(jax.random.key(seed), x0)
    self.params0, self.extra0 = init["params"], {"batch_stats": init["batch_stats"]}
    channel, spatial = (jlr.flax.layouts(self.model, init, x0, train=False, conv=k)
                        for k in ("channel", "spatial"))
    self.layout = channel
    self.trp_layouts = {"trp_channel": (channel, False), "trp_spatial": (spatial, False),
                        "trp_nu_channel": (channel, True), "trp_nu_spatial": (spatial, True)}
    self.calib = [self.x_train[i: i + 256] for i in range(0, size.calib, 256)]
    self._recal = common.bn_recalibrator(self.model, train=True)
    self._eval = jax.jit(self._eval_batch)
    self.dense_cost = self.cost(self.params0, self.extra0)

  def select(self, path: str, leaf=None) -> bool:
    return is_block(path, leaf)

  # ---- data: batch i of a run is a pure function of (seed, i)
  def batches(self, steps: int, offset: int = 0):
    per_epoch = len(self.x_train) // self.size.batch
    for i in range(offset, offset + steps):
      epoch, j = divmod(i, per_epoch)
      order = np.random.default_rng([self.seed, epoch]).permutation(len(self.x_train))
      idx = order[j * self.size.batch: (j + 1) * self.size.batch]
      x = self.x_train[idx]
      if self.size.augment:
        x = augment(x, np.random.default_rng([self.seed, epoch, j, 1]))
      yield x, self.y_train[idx]

  # ---- training
  def task_loss(self, params, extra, batch, key):
    del key
    x, y = batch
    logits, upd = jlr.flax.apply(self.model, {"params": params, **extra}, x, train=True,
                                 mutable=["batch_stats"])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return ce, (upd, {})

  def optimizer(self, lr: float, steps: int, decay: str = "l2"):
    steps = max(steps, 1)
    if self.size.lr_schedule == "step":
      sched = optax.piecewise_constant_schedule(lr, {steps // 2: 0.1, (3 * steps) // 4: 0.1})
    else:
      sched = optax.cosine_decay_schedule(lr, steps)
    sgd = optax.sgd(sched, momentum=0.9, nesterov=True)
    return optax.chain(cells_lib.decay(self.size.weight_decay, decay), sgd)

  def val_metric(self, scored: dict) -> float:
    return scored["val_acc"]

  # ---- scoring
  def _eval_batch(self, params, extra, x, y):
    logits = jlr.flax.apply(self.model, {"params": params, **extra}, x, train=False)
    return jnp.sum(jnp.argmax(logits, -1) == y)

  def accuracy(self, params, extra, x, y) -> float:
    hits = sum(int(self._eval(params, extra, x[i: i + 500], y[i: i + 500]))
               for i in range(0, len(x), 500))
    return hits / len(x)

  def forward(self, params, extra, x):
    return jlr.flax.apply(self.model, {"params": params, **extra}, x)

  def example_input(self):
    return self.x_test[:1]

  def score(self, params, extra) -> dict:
    """Test/val accuracy after exact BN recalibration, cost relative to the dense net."""
    params = jax.device_get(params)
    extra = {"batch_stats": self._recal(params, extra["batch_stats"], self.calib)}
    out = {"test_acc": self.accuracy(params, extra, self.x_test, self.y_test),
           "val_acc": self.accuracy(params, extra, self.x_val, self.y_val),
           **self.relative_cost(params, extra)}
    print(f"  test {out['test_acc']:.4f} val {out['val_acc']:.4f} kernels "
          f"{out['kernel_fraction']:.3f} flop speed-up {out['flop_speedup']:.2f}x", flush=True)
    return out

  def whiten_stats(self, params, extra) -> dict:
    """Gram of every block conv's im2col input on the calibration images (train-mode BN
    would see batch statistics; inference mode is what the compressed net will run)."""
    grams = calibrate.activations(self.model, {"params": params, **extra}, self.calib,
                                  select=lambda p: is_block(p), train=False)
    return {k.removeprefix("params/"): v for k, v in grams.items()}


# ----------------------------------------------------------------------------- cells


def run_cell(name: str, seed: int, size: Size, cache: str, dataset: str = "auto",
             bars: bool = True, runs: str | None = None, code: str = "unversioned") -> dict:
  """Train and score one cell (``cells.run_cell``); ``results/suite.py`` writes the JSON."""
  made = []

  def task(sz):
    made.append(Setting(sz, seed, dataset, bars))
    return made[-1]
  out = cells_lib.run_cell(task, name, seed, size, cache, runs, code)
  return {"dataset": made[0].dataset, **out}
