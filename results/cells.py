"""The compression methods every task compares, one training run (*cell*) each.

A task (``resnet20.py``, ``charlm.py``) supplies a :class:`Task`: its data, model, init,
optimizer, loss and scoring. This module turns a cell name into a run of that task at
equal parameter and training budgets: every model trains for the same number of
optimizer steps ``T`` on the same batches (a pure function of the seed and the step);
a fine-tune is counted inside ``T``; a budget ``b`` keeps a fraction ``b`` of every
compressed kernel's parameters (``ranks.ratio(b, min_rank=1)`` in the task's layout, the
same per-layer ranks for every method).

Cells (``b`` in the size's budgets):

* ``dense`` -- T steps. Also scores, without training, plain SVD (``svd@b``) and
  activation-whitened SVD (SVD-LLM, ``whiten@b``) of the trained model.
* ``dense_pre`` -- a dense model trained for ``T - F`` steps (its own schedule), the
  start of the fine-tuned baselines.
* ``svd_ft@b`` / ``whiten_ft@b`` -- ``dense_pre`` truncated by SVD / whitened SVD, then
  F steps of fine-tuning of the factors (from ``ft_lr``).
* ``scratch@b`` -- low-rank factors at the target rank trained from the (SVD-truncated)
  random init for T steps: the PufferFish-style baseline of Maestro.
* ``lod@b`` -- Maestro's low-rank ordered decomposition (Horvath et al., ICML 2024):
  full-rank factors of the init, ordered-dropout rank sampling (``lod.sample``) and the
  hierarchical group lasso; ranks shrink progressively (at 30/45/60/75% of T, linearly
  from full to the target ranks, ``lod.extract``, optimizer state sliced alike) and the
  last 25% trains the target model without sampling.
* ``lod_nested`` -- one LoD run at full rank for T steps; ``lod_nested_ft@b`` cuts it to
  each budget's ranks (nested extraction, scored inside ``lod_nested``) and fine-tunes F
  more steps (reported separately: T + F steps).
* ``trp_<layout>`` / ``trp_nu_<layout>`` (the task's :attr:`Task.trp_layouts`) -- Trained
  Rank Pruning (Xu et al. 2019): every ``period`` steps the kernels land on their
  energy-``energy`` truncation; ``_nu`` adds the nuclear-norm sub-gradient
  ``nuclear * U_k V_k^T``. Decoupled at the same energy rule; the plain SVD of ``dense``
  at the decoupled per-layer ranks is scored alongside (TRP's Table 1).
* ``trp_nu@b`` -- TRP with nuclear norm whose projection keeps the budget's ranks: TRP
  on the accuracy-vs-size curve.

Ablations are cells with settings after ``~`` (``lod@0.25~lam=0,sampler=none``): any
field of the task's size (``lam``, ``lr``, ``steps``, ``period``, ``nuclear`` ...) and,
for LoD, ``sampler=`` (``lod.SAMPLERS``, or ``none``: no ordered dropout, lasso kept) and
``warm=1`` (start from the full-rank SVD of ``dense_pre`` and spend only the remaining F
steps).
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import sys
import time
from typing import Any, Callable

import jax
import numpy as np

import jlr
from jlr import lod, ranks
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "examples"))  # lod_common.py, train.py
from lod_common import ranks_of  # noqa: E402
from train import TrainState, progress, train_step  # noqa: E402

SCHEDULE = (0.3, 0.45, 0.6, 0.75)  # LoD: fractions of T where the ranks shrink


def curve(size) -> list[tuple[str, tuple[str, ...]]]:
  """The accuracy-vs-size cells ``[(cell, dependencies)]``, most decisive first."""
  b = size.budgets
  out = [("dense", ()), ("dense_pre", ())]
  out += [(f"svd_ft@{x:g}", ("dense_pre",)) for x in b]
  out += [(f"whiten_ft@{x:g}", ("dense_pre",)) for x in b]
  out += [(f"scratch@{x:g}", ()) for x in b]
  out += [(f"lod@{x:g}", ()) for x in b]
  out += [("lod_nested", ())] + [(f"lod_nested_ft@{x:g}", ("lod_nested",)) for x in b]
  return out


def middle(size) -> str:
  return f"{size.budgets[len(size.budgets) // 2]:g}"


def longer(method: str, size) -> str:
  """``method`` at the middle budget trained twice as long (fine-tune doubled too)."""
  return f"{method}@{middle(size)}~steps={2 * size.steps},ft={2 * size.ft}"


def parse(name: str, size) -> tuple[str, float | None, Any, dict]:
  """``"lod@0.25~lam=0,sampler=none"`` -> ``("lod", 0.25, size with lam=0, {"sampler": "none"})``."""
  base, _, opts = name.partition("~")
  method, _, b = base.partition("@")
  fields = {f.name for f in dataclasses.fields(size)} - {"budgets", "seeds"}
  over, extra = {}, {}
  for item in filter(None, opts.split(",")):
    k, _, v = item.partition("=")
    if k in fields:
      over[k] = type(getattr(size, k))(float(v) if "." in v or "e" in v else int(v))
    elif k in ("sampler", "warm"):
      extra[k] = v
    else:
      raise ValueError(f"{name}: unknown setting {k!r}")
  return method, (float(b) if b else None), dataclasses.replace(size, **over), extra


# ----------------------------------------------------------------------------- the task


class Task:
  """What a task supplies: subclasses set the attributes and define every method below
  that raises ``NotImplementedError``; the rest (training, budgets, cost) is shared.

  ``params0`` / ``extra0``: the init (``extra``: the other variable collections, e.g.
  ``{"batch_stats": ...}``, or ``{}``); ``layout``: the ``{path: layout}`` tree the budgets
  are cut in; ``trp_layouts``: ``{cell: (layout tree, nuclear?)}`` of TRP's energy cells;
  ``select(path, leaf)``: which kernels are compressed.
  """

  size: Any
  seed: int
  bars: bool
  params0: Any
  extra0: dict
  layout: Any
  trp_layouts: dict = {}

  def select(self, path: str, leaf=None) -> bool:
    raise NotImplementedError

  def batches(self, steps: int, offset: int = 0):
    """Batches ``offset ... offset + steps - 1`` of the run: a pure function of (seed, step)."""
    raise NotImplementedError

  def task_loss(self, params, extra, batch, key):
    """``(loss, (new extra, metrics))`` -- the ``train_step`` loss signature."""
    raise NotImplementedError

  def optimizer(self, lr: float, steps: int):
    raise NotImplementedError

  def score(self, params, extra) -> dict:
    """Test and validation metrics and the cost relative to the dense model."""
    raise NotImplementedError

  def whiten_stats(self, params, extra) -> dict:
    """``{path: Gram}`` of every compressed kernel's input on the calibration batches."""
    raise NotImplementedError

  def forward(self, params, extra, x):
    """The inference forward on one :meth:`example_input` (for the FLOP count)."""
    raise NotImplementedError

  def example_input(self):
    raise NotImplementedError

  # ---- shared by every task
  def cost(self, params, extra) -> dict:
    """Compressed-kernel and total parameters, and the forward's FLOPs as XLA counts them."""
    ca = jax.jit(self.forward).lower(params, extra, self.example_input()).cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    rep = jlr.summary(params)
    return {"kernel_params": int(sum(r.params for r in rep.rows if self.select(r.path))),
            "params": int(rep.total_params), "flops": int(ca["flops"])}

  def relative_cost(self, params, extra) -> dict:
    """:meth:`cost` plus the fractions of the dense model's (``self.dense_cost``) and ranks."""
    c = self.cost(params, extra)
    return {**c, "kernel_fraction": c["kernel_params"] / self.dense_cost["kernel_params"],
            "flop_speedup": self.dense_cost["flops"] / c["flops"], "ranks": ranks_of(params)}

  def lod_loss(self, lam: float, sampler: str = "layer"):
    def loss(params, extra, batch, key):
      sub = params if sampler == "none" else lod.sample(params, key, sampler=sampler)
      task, (upd, _) = self.task_loss(sub, extra, batch, None)
      gl = lod.group_lasso(params)
      return task + lam * gl, (upd, {"task": task})
    return loss

  def train(self, params, extra, tx, segments, desc: str, offset: int = 0):
    """Run ``segments = [(steps, loss_fn, before)]`` on one optimizer state; ``before(
    state) -> state`` reshapes it first (a LoD shrink) or is ``None``. Returns the final
    state and a per-segment log."""
    state = TrainState.create(params, tx, key=jax.random.fold_in(jax.random.key(self.seed), 7),
                              extra=extra)
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

  def budget_rule(self, b: float):
    return ranks.ratio(b, min_rank=1)

  def svd(self, params, b: float, stats=None, layout=None):
    return jlr.factorize(params, self.budget_rule(b), select=self.select,
                         layout=self.layout if layout is None else layout, stats=stats)

  def budget_ranks(self, b: float) -> dict:
    return ranks_of(self.svd(self.params0, b))


# ----------------------------------------------------------------------------- cache


class Cache:
  """Trained models later cells start from (``dense``, ``dense_pre``, ``lod_nested``),
  pickled under ``directory/s<seed>/``. A missing entry is recomputed by running its cell
  here (every run is deterministic), so a cell never depends on a file left by another
  machine."""

  def __init__(self, directory: str, seed: int, run: Callable[[str], dict]):
    self.directory, self.seed, self._run = directory, seed, run

  def _path(self, name):
    return os.path.join(self.directory, f"s{self.seed}", f"{name}.pkl")

  def save(self, name, params, extra):
    path = self._path(name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "wb") as f:
      pickle.dump(jax.device_get((params, extra)), f)
    os.replace(path + ".tmp", path)

  def load(self, name):
    if not os.path.exists(self._path(name)):
      print(f"{self._path(name)} is missing: running cell {name} to rebuild it", flush=True)
      self._run(name)
    with open(self._path(name), "rb") as f:
      return pickle.load(f)


# ----------------------------------------------------------------------------- cells


def run_cell(task_factory: Callable[[Any], Task], name: str, seed: int, size, cache_dir: str
             ) -> dict:
  """Train and score one cell; returns its metrics (``results/suite.py`` writes the JSON).
  ``task_factory(size)`` builds the task at the cell's size (after its ``~`` settings)."""
  base_size = size
  method, b, size, opts = parse(name, size)
  s = task_factory(size)
  cache = Cache(cache_dir, seed, lambda dep: run_cell(task_factory, dep, seed, base_size,
                                                      cache_dir))
  T, F = size.steps, size.ft
  out = {"method": method, "budget": b, "steps": T, "options": opts}
  plain = s.task_loss

  def result(state):
    return state.params, state.extra

  if method in ("dense", "dense_pre"):
    steps = T if method == "dense" else T - F
    st, out["log"] = s.train(s.params0, s.extra0, s.optimizer(size.lr, steps),
                             [(steps, plain, None)], method)
    p, ex = result(st)
    cache.save(method, p, ex)
    out["steps"] = steps
    out["score"] = s.score(p, ex)
    if method == "dense":  # compression of the trained model, no training
      grams = s.whiten_stats(p, ex)
      out["derived"] = {}
      for x in size.budgets:
        out["derived"][f"svd@{x:g}"] = s.score(s.svd(p, x), ex)
        out["derived"][f"whiten@{x:g}"] = s.score(s.svd(p, x, stats=grams), ex)
    return out

  if method in ("svd_ft", "whiten_ft"):
    p, ex = cache.load("dense_pre")
    grams = s.whiten_stats(p, ex) if method == "whiten_ft" else None
    st, out["log"] = s.train(s.svd(p, b, stats=grams), ex, s.optimizer(size.ft_lr, F),
                             [(F, plain, None)], name, offset=T - F)
    out["score"] = s.score(*result(st))
    return out

  if method == "scratch":
    st, out["log"] = s.train(s.svd(s.params0, b), s.extra0, s.optimizer(size.lr, T),
                             [(T, plain, None)], name)
    out["score"] = s.score(*result(st))
    return out

  if method in ("lod", "lod_nested"):
    start, extra0, n, offset, lr = s.params0, s.extra0, T, 0, size.lr
    if opts.get("warm"):  # the remaining F steps from the SVD of the dense model
      (start, extra0), n, offset, lr = cache.load("dense_pre"), F, T - F, size.ft_lr
    full = lod.init(start, select=s.select, layout=s.layout)
    tx = s.optimizer(lr, n)
    loss = s.lod_loss(size.lam, opts.get("sampler", "layer"))
    if method == "lod_nested":
      segments = [(n, loss, None)]
    else:
      target, first = s.budget_ranks(b), ranks_of(full)
      lengths = np.diff([0] + [round(n * q) for q in SCHEDULE] + [n])

      def shrink_to(k):
        want = {p: int(np.ceil(first[p] - (first[p] - target[p]) * k / len(SCHEDULE)))
                for p in first}

        def before(state):
          params = lod.extract(state.params, ranks=want)
          return state.replace(params=params,
                               opt_state=lod.slice_opt_state(tx, state.opt_state, params))
        return before
      segments = [(int(lengths[0]), loss, None)]
      segments += [(int(m), loss if k < len(SCHEDULE) else plain, shrink_to(k))
                   for k, m in enumerate(lengths[1:], start=1)]
    st, out["log"] = s.train(full, extra0, tx, segments, name, offset=offset)
    p, ex = result(st)
    out["score"] = s.score(p, ex)  # lod_nested: the full-rank factors
    if method == "lod_nested":
      cache.save("lod_nested", p, ex)
      out["derived"] = {f"lod_nested@{x:g}": s.score(lod.extract(p, ranks=s.budget_ranks(x)), ex)
                        for x in size.budgets}
    return out

  if method == "lod_nested_ft":
    p, ex = cache.load("lod_nested")
    sub = lod.extract(p, ranks=s.budget_ranks(b))
    st, out["log"] = s.train(sub, ex, s.optimizer(size.ft_lr, F), [(F, plain, None)], name,
                             offset=T)
    out["steps"] = T + F
    out["score"] = s.score(*result(st))
    return out

  if method in s.trp_layouts or method == "trp_nu":
    lay, nuclear = s.trp_layouts.get(method, (s.layout, True))
    rule = ranks.energy(size.energy) if b is None else s.budget_rule(b)
    tx = jlr.trp.trp(s.optimizer(size.lr, T), every=size.period, rank=rule,
                     nuclear=size.nuclear if nuclear else 0.0, select=s.select, layout=lay)
    st, out["log"] = s.train(s.params0, s.extra0, tx, [(T, plain, None)], name)
    p, ex = jax.device_get(result(st))
    out["trained_dense_weights"] = s.score(p, ex)
    dec = jlr.trp.decouple(p, rule, select=s.select, layout=lay)
    out["score"] = s.score(dec, ex)
    if b is None:  # TRP's Table 1: the dense model truncated to the same per-layer ranks
      dp, dex = cache.load("dense")
      same = {k: ranks.fixed(r) for k, r in ranks_of(dec).items()}
      out["dense_svd_same_ranks"] = s.score(jlr.factorize(dp, same, select=s.select, layout=lay),
                                            dex)
    return out

  raise ValueError(f"unknown cell {name!r}")
