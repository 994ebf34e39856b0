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
* ``scratch@b`` -- low-rank factors at the target rank trained from scratch for T steps:
  the PufferFish-style baseline of Maestro. ``scratch_init="svd"`` (the ``cpu`` size)
  starts from the SVD of the random dense init; ``"default"`` (``converged``) from two
  thin layers with their own init (``u ~ N(0, 1/m)``, ``v ~ N(0, 1/r)``), weight decay on
  the factors.
* ``spectral@b`` -- from scratch as Khodak et al. (ICLR 2021) train it: spectral
  initialization and Frobenius decay (``jlr.methods.spectral``), the strongest
  from-scratch baseline.
* ``lod@b`` -- Maestro's low-rank ordered decomposition (Horvath et al., ICML 2024):
  full-rank factors of the init, ordered-dropout rank sampling (``lod.sample``) and the
  hierarchical group lasso on every step. ``shrink="threshold"`` (``converged``):
  Maestro's progressive shrinking -- every ``interval`` steps from ``start`` each layer
  drops the trailing components whose importance is under ``eps`` (relative to its first),
  so each layer finds its own rank; at ``budget_at`` of T the global budget projection
  (``lod.to_budget``) cuts to the budget's parameter count where the layers hold more,
  and the rest of T trains that model without sampling. ``shrink="schedule"`` (``cpu``):
  ranks cut at 30/45/60/75% of T, linearly from full to the budget's uniform ranks.
* ``lod_nested`` -- one LoD run at full rank for T steps; ``lod_nested_ft@b`` cuts it to
  each budget's ranks (nested extraction, scored inside ``lod_nested``) and fine-tunes F
  more steps (reported separately: T + F steps).
* ``trp_<layout>`` / ``trp_nu_<layout>`` (the task's :attr:`Task.trp_layouts`) -- Trained
  Rank Pruning (Xu et al. 2019): every ``period`` steps the kernels land on their
  energy-``energy`` truncation; ``_nu`` adds the nuclear-norm sub-gradient
  ``nuclear * U_k V_k^T`` on every step (``nuclear_on="every_step"``, as the released
  code; the ``cpu`` size ran it on projection steps only). Decoupled at the same energy
  rule; the plain SVD of ``dense`` at the decoupled per-layer ranks is scored alongside
  (TRP's Table 1), and ``spectral_same`` trains Khodak's baseline from scratch at the
  same per-layer ranks.
* ``trp_nu@b`` -- TRP with nuclear norm whose projection keeps the budget's ranks: TRP
  on the accuracy-vs-size curve.

Settings chosen on validation (``converged``): ``trp_nu`` cells take the ``nuclear`` and
``period``, ``lod`` cells the ``lam`` and ``eps`` of the best validation score among
their search cells on seed 0 (:func:`search`), which they depend on.

Ablations are cells with settings after ``~`` (``lod@0.25~lam=0,sampler=none``): any
field of the task's size (``lam``, ``lr``, ``steps``, ``period``, ``nuclear`` ...) and,
for LoD, ``sampler=`` (``lod.SAMPLERS``, or ``none``: no ordered dropout, lasso kept) and
``warm=1`` (start from the full-rank SVD of ``dense_pre`` and spend only the remaining F
steps).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import sys
import time
import zlib
from typing import Any, Callable

import jax
import numpy as np
import optax

import jlr
from jlr import lod, ranks
from jlr.methods import spectral
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "examples"))  # lod_common.py, train.py
from lod_common import ranks_of  # noqa: E402
from train import TrainState, progress, train_step  # noqa: E402

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The method code a cell's numbers depend on: the training methods, the cells and the
# loop, and the task's own module, model and data. The rest of jlr (factorize, the
# interpreter) is held to its tests; each run also records its commit.
CODE = ("jlr/methods", "results/cells.py", "examples/train.py", "examples/lod_common.py")
TASK_CODE = {"resnet20": ("results/resnet20.py", "examples/resnet.py", "examples/data.py"),
             "charlm": ("results/charlm.py", "examples/lod_transformer.py")}


def code_hash(task: str) -> str:
  """A digest of the method code ``task``'s numbers depend on (:data:`CODE` and its
  :data:`TASK_CODE`; not the report, README or tests, nor the other task): two runs with
  the same digest ran the same methods. In-flight checkpoints sit under it, so a run never
  resumes from a checkpoint of other code; ``results/report.py`` refuses to put different
  digests in one table."""
  h = hashlib.sha256()
  for entry in CODE + TASK_CODE[task]:
    full = os.path.join(_ROOT, entry)
    files = [full] if os.path.isfile(full) else sorted(
        os.path.join(d, f) for d, _, fs in os.walk(full) for f in fs if f.endswith(".py"))
    for f in files:
      h.update(os.path.relpath(f, _ROOT).encode())
      with open(f, "rb") as fh:
        h.update(fh.read())
  return h.hexdigest()[:12]


SCHEDULE = (0.3, 0.45, 0.6, 0.75)  # LoD, shrink="schedule": fractions of T where ranks shrink


def curve(size) -> list[tuple[str, tuple[str, ...]]]:
  """The accuracy-vs-size cells ``[(cell, dependencies)]``, most decisive first. A
  dependency ``"cell|s0"`` is that cell on seed 0 (a search), else on the same seed."""
  b = size.budgets
  out = [("dense", ()), ("dense_pre", ())]
  out += [(f"svd_ft@{x:g}", ("dense_pre",)) for x in b]
  out += [(f"whiten_ft@{x:g}", ("dense_pre",)) for x in b]
  out += [(f"scratch@{x:g}", ()) for x in b]
  if size.converged:
    out += [(f"spectral@{x:g}", ()) for x in b]
  lod_search = tuple(f"{c}|s0" for c in search(size).get("lod", ()))
  out += [(f"lod@{x:g}", lod_search) for x in b]
  out += [("lod_nested", lod_search)] + [(f"lod_nested_ft@{x:g}", ("lod_nested",)) for x in b]
  return out


def search(size) -> dict[str, list[str]]:
  """``{method: [cell]}``: the validation search (seed 0, the first budget) whose best
  setting the method's cells take (``converged`` only)."""
  if not size.converged:
    return {}
  b = f"{size.budgets[0]:g}"
  return {"trp_nu": [f"trp_nu@{b}~nuclear={x:g},period={p}" for x in size.nuclear_grid
                     for p in size.period_grid],
          "lod": [f"lod@{b}~lam={x:g},eps={e:g}" for x in size.lam_grid for e in size.eps_grid]}


def trp_cells(size, energy_cells: tuple[str, ...]) -> list[tuple[str, tuple[str, ...]]]:
  """TRP + nuclear norm at each budget, at its energy point(s), and (``converged``)
  Khodak's from-scratch baseline at the energy point's per-layer ranks."""
  deps = tuple(f"{c}|s0" for c in search(size).get("trp_nu", ()))
  out = [(f"trp_nu@{x:g}", deps) for x in size.budgets]
  out += [(name, ("dense",) + deps) for name in energy_cells]
  if size.converged:
    out += [(f"spectral_same~{name}", (name,)) for name in energy_cells[:1]]
  return out


def middle(size) -> str:
  return f"{size.budgets[len(size.budgets) // 2]:g}"


def longer(method: str, size) -> str:
  """``method`` at the middle budget trained twice as long (fine-tune doubled too)."""
  return f"{method}@{middle(size)}~steps={2 * size.steps},ft={2 * size.ft}"


def _value(current, v: str):
  if isinstance(current, bool):
    return bool(int(v))
  if isinstance(current, str):
    return v
  return type(current)(float(v) if "." in v or "e" in v else int(v))


def parse(name: str, size) -> tuple[str, float | None, Any, dict]:
  """``"lod@0.25~lam=0,sampler=none"`` -> ``("lod", 0.25, size with lam=0, {"sampler": "none"})``.
  ``spectral_same~trp_nu`` -> ``("spectral_same", None, size, {"ranks_of": "trp_nu"})``."""
  base, _, opts = name.partition("~")
  method, _, b = base.partition("@")
  if method == "spectral_same":
    return method, None, size, {"ranks_of": opts}
  fields = {f.name for f in dataclasses.fields(size)} - {"budgets", "seeds"}
  over, extra = {}, {}
  for item in filter(None, opts.split(",")):
    k, _, v = item.partition("=")
    if k in fields:
      over[k] = _value(getattr(size, k), v)
    elif k in ("sampler", "warm"):
      extra[k] = v
    else:
      raise ValueError(f"{name}: unknown setting {k!r}")
  return method, (float(b) if b else None), dataclasses.replace(size, **over), extra


@dataclasses.dataclass(frozen=True, kw_only=True)
class Recipe:
  """How every task's cells train, beside the task's own :class:`Size` fields (which
  subclass this). The defaults are what the early ``cpu`` tables ran; the ``converged``
  sizes set the rest.

  Attributes:
    converged: the converged suite's cells (spectral, TRP's energy point beside Khodak,
      settings chosen by :func:`search`).
    weight_decay: on every leaf (``"l2"``) or, in spectral cells, Frobenius decay on the
      factors (:func:`decay`); coupled for SGD, decoupled for Adam (the task says).
    curve: the dense cell scores its model at this many evenly spaced steps.
    scratch_init: ``"svd"`` (the SVD of the dense init) or ``"default"`` (two thin layers).
    nuclear_on: TRP's nuclear norm on ``"every_step"`` or on ``"projection"`` steps only.
    shrink: LoD's ``"threshold"`` shrinking (Maestro) or the fixed ``"schedule"``.
    eps, interval, start, budget_at: LoD's relative threshold, checked every ``interval``
      of T from ``start`` of T; the budget projection at ``budget_at`` of T.
    nuclear_grid, period_grid, lam_grid, eps_grid: the validation search (:func:`search`).
  """

  converged: bool = False
  weight_decay: float = 0.0
  curve: int = 0
  scratch_init: str = "svd"
  nuclear_on: str = "projection"
  shrink: str = "schedule"
  eps: float = 0.05
  interval: float = 0.05
  start: float = 0.1
  budget_at: float = 0.8
  nuclear_grid: tuple = ()
  period_grid: tuple = ()
  lam_grid: tuple = ()
  eps_grid: tuple = ()


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

  def optimizer(self, lr: float, steps: int, decay: str = "l2"):
    """The task's optimizer over ``steps``; ``decay="l2"`` decays every leaf (``LowRank``
    factors included), ``"frobenius"`` decays ``LowRank`` leaves by Frobenius decay of
    their product (``jlr.methods.spectral``) and the others as before."""
    raise NotImplementedError

  def val_metric(self, scored: dict) -> float:
    """The validation number settings are chosen on, higher is better."""
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
    """Ordered dropout (a rank per layer drawn each step) and ``lam`` times the group lasso
    in the loss (``lam=0``: no lasso)."""
    def loss(params, extra, batch, key):
      sub = params if sampler == "none" else lod.sample(params, key, sampler=sampler)
      task, (upd, _) = self.task_loss(sub, extra, batch, None)
      if not lam:
        return task, (upd, {"task": task})
      gl = lod.group_lasso(params)
      return task + lam * gl, (upd, {"task": task})
    return loss

  def train(self, params, extra, tx, steps: int, desc: str, *, loss=None, offset: int = 0,
            switch: dict | None = None, between=None, events: list | None = None, curve: int = 0,
            resume: str | None = None):
    """``steps`` optimizer steps on one optimizer state from batch ``offset``.

    ``loss``: the loss (default :meth:`task_loss`); ``switch``: ``{t: loss}``, the loss
    from step ``t`` on; ``between(t, state) -> state``: a host step after step ``t``
    (1-based; LoD's shrinking), which may append to ``events`` (kept in the log and the
    checkpoint); ``curve``: score the model at that many evenly spaced
    steps (the convergence curve); ``resume``: a file the loop checkpoints to every
    ``CHECKPOINT_S`` seconds and resumes from (batches are a pure function of the step,
    so a resumed run is the run). Returns the final state and its log."""
    state = TrainState.create(params, tx, key=jax.random.fold_in(jax.random.key(self.seed), 7),
                              extra=extra)
    events = [] if events is None else events
    log = {"loss": [], "curve": [], "events": events}
    start = 0
    if resume and os.path.exists(resume):
      with open(resume, "rb") as f:
        start, state, log = pickle.load(f)
      events[:] = log["events"]
      log["events"] = events
      print(f"{desc}: resumed at step {start} from {resume}", flush=True)
    switch = dict(switch or {})
    losses = {0: loss or self.task_loss, **switch}
    steps_of = {id(fn): jax.jit(train_step(fn, tx)) for fn in losses.values()}
    marks = set() if not curve else {round(steps * (k + 1) / curve) for k in range(curve)}
    current = losses[max(t for t in losses if t <= start)]
    t0, window, saved = time.perf_counter(), [], time.time()
    bar = progress(self.batches(steps - start, offset + start), total=steps, initial=start,
                   desc=desc, leave=False, disable=not self.bars)
    for t, batch in enumerate(bar, start=start + 1):
      if t - 1 in losses:
        current = losses[t - 1]
      state, m = steps_of[id(current)](state, batch)
      window.append(m["loss"])
      if between is not None:
        state = between(t, state)
      if t % max(steps // 20, 1) == 0 or t == steps:
        log["loss"].append((offset + t, float(np.mean(jax.device_get(window)))))
        window = []
      if t in marks:
        log["curve"].append({"step": offset + t, **self.score(state.params, state.extra)})
      if resume and time.time() - saved > CHECKPOINT_S and t < steps:
        _dump(resume, (t, state, log))
        saved = time.time()
    log["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"{desc}: step {offset + steps} loss {log['loss'][-1][1]:.4f} ({log['seconds']}s)",
          flush=True)
    return state, log

  def latency(self, shapes: list[dict | None], batch: int = 64, rounds: int = 15) -> list[float]:
    """Median seconds of the jitted inference forward on ``batch`` inputs for each model of
    ``shapes`` (``{path: rank}`` factorized kernels; ``None``: dense), timed in interleaved
    rounds so load on the machine falls on all alike. Speed depends on shapes, not values:
    the SVD of the init at those ranks stands in for the trained model."""
    x = np.repeat(np.asarray(self.example_input()), batch, axis=0)
    f = jax.jit(self.forward)
    models = [self.params0 if r is None else jlr.factorize(
        self.params0, {k: ranks.fixed(v) for k, v in r.items()}, select=self.select,
        layout=self.layout) for r in shapes]
    for r, p in zip(shapes, models):
      if r is not None and ranks_of(p) != r:  # never time another model than the one named
        raise ValueError(f"latency: factorized ranks {ranks_of(p)} differ from {r}")
      jax.block_until_ready(f(p, self.extra0, x))
    times = [[] for _ in models]
    for _ in range(rounds):
      for i, p in enumerate(models):
        t0 = time.perf_counter()
        jax.block_until_ready(f(p, self.extra0, x))
        times[i].append(time.perf_counter() - t0)
    return [float(np.median(t)) for t in times]

  def budget_rule(self, b: float):
    return ranks.ratio(b, min_rank=1)

  def svd(self, params, b: float, stats=None, layout=None):
    return jlr.factorize(params, self.budget_rule(b), select=self.select,
                         layout=self.layout if layout is None else layout, stats=stats)

  def budget_ranks(self, b: float) -> dict:
    return ranks_of(self.svd(self.params0, b))

  def thin_init(self, b: float):
    """Factors at the budget's ranks initialized as two thin layers, ``u ~ N(0, 1/m)`` and
    ``v ~ N(0, 1/r)`` (the product keeps the dense init's lecun-normal variance), from
    this seed's key: what a user building the low-rank layers directly starts from."""
    key = jax.random.fold_in(jax.random.key(self.seed), 11)

    def one(kp, x):
      if not jlr.is_lowrank(x):
        return x
      path = jlr.paths.path_str(kp)
      ku, kv = jax.random.split(jax.random.fold_in(key, zlib.crc32(path.encode())))
      (m, n), r = x.layout.matrix_shape, x.rank
      return jlr.LowRank(jax.random.normal(ku, x.u.shape, x.u.dtype) / np.sqrt(m),
                         jax.random.normal(kv, x.v.shape, x.v.dtype) / np.sqrt(r), x.layout)
    return jax.tree_util.tree_map_with_path(one, self.svd(self.params0, b), is_leaf=jlr.is_lowrank)


def decay(weight_decay: float, kind: str = "l2") -> optax.GradientTransformation:
  """Weight decay for :meth:`Task.optimizer`: ``"l2"`` on every leaf (``LowRank`` factors
  included), ``"frobenius"``: Frobenius decay of ``LowRank`` products (Khodak et al.),
  plain decay on the other leaves. Placed before the optimizer (coupled, as in SGD)."""
  if not weight_decay:
    return optax.identity()
  if kind == "l2":
    return optax.add_decayed_weights(weight_decay)
  if kind != "frobenius":
    raise ValueError(f"decay must be 'l2' or 'frobenius', got {kind!r}")
  dense = lambda params: jax.tree.map(lambda x: not jlr.is_lowrank(x), params,  # noqa: E731
                                      is_leaf=jlr.is_lowrank)
  return optax.chain(optax.add_decayed_weights(weight_decay, mask=dense),
                     spectral.frobenius_decay(weight_decay))


CHECKPOINT_S = 300.0  # a cell's loop checkpoints this often (``Task.train(resume=)``)


def _dump(path: str, obj) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".tmp", "wb") as f:
    pickle.dump(jax.device_get(obj), f)
  os.replace(path + ".tmp", path)


# ----------------------------------------------------------------------------- cache


class Cache:
  """Trained models later cells start from (``dense``, ``dense_pre``, ``lod_nested``),
  pickled under ``directory/s<seed>/``, and in-flight checkpoints of every cell. A missing
  model is recomputed by running its cell here (every run is deterministic), so a cell
  never depends on a file left by another machine."""

  def __init__(self, directory: str, seed: int, run: Callable[[str], dict], code: str):
    self.directory, self.seed, self._run, self.code = directory, seed, run, code

  def _path(self, name):
    return os.path.join(self.directory, f"s{self.seed}", f"{name}.pkl")

  def checkpoint(self, cell: str) -> str:
    return os.path.join(self.directory, f"s{self.seed}", "inflight", self.code, f"{cell}.pkl")

  def save(self, name, params, extra):
    _dump(self._path(name), (params, extra))

  def load(self, name):
    if not os.path.exists(self._path(name)):
      print(f"{self._path(name)} is missing: running cell {name} to rebuild it", flush=True)
      self._run(name)
    with open(self._path(name), "rb") as f:
      return pickle.load(f)


# ----------------------------------------------------------------------------- cells


def chosen(runs_dir: str, method: str, size, s: Task) -> tuple[dict, dict]:
  """The setting of ``method``'s search cells (seed 0) with the best validation score:
  ``({field: value}, {cell: val})``. Raises if a search cell has no result."""
  cells = search(size).get(method, [])
  if not cells:
    return {}, {}
  vals = {}
  for c in cells:
    path = os.path.join(runs_dir, f"{c}_s0.json")
    if not os.path.exists(path):
      raise FileNotFoundError(f"{method}: search cell {c} (seed 0) has no result at {path}")
    with open(path) as f:
      vals[c] = s.val_metric(json.load(f)["score"])
  best = max(vals, key=vals.get)
  _, _, sz, _ = parse(best, size)
  fields = {"trp_nu": ("nuclear", "period"), "lod": ("lam", "eps")}[method]
  return {k: getattr(sz, k) for k in fields}, vals


def run_cell(task_factory: Callable[[Any], Task], name: str, seed: int, size, cache_dir: str,
             runs_dir: str | None = None, code: str = "unversioned") -> dict:
  """Train and score one cell; returns its metrics (``results/suite.py`` writes the JSON).
  ``task_factory(size)`` builds the task at the cell's size (after its ``~`` settings);
  ``runs_dir`` holds the task's JSONs (the search results a cell chooses from); ``code``
  is the run's :func:`code_hash` (its in-flight checkpoints are kept under it)."""
  base_size = size
  method, b, size, opts = parse(name, size)
  cache = Cache(cache_dir, seed, lambda dep: run_cell(task_factory, dep, seed, base_size,
                                                      cache_dir, runs_dir, code), code)
  s = task_factory(size)
  searched = {"trp_nu": "trp_nu", "lod": "lod", "lod_nested": "lod"}.get(method)
  if "~" not in name and searched and size.converged:
    pick, vals = chosen(runs_dir, searched, size, s)
    if method == "lod_nested":
      pick = {"lam": pick["lam"]}
    # the searched fields are the method's, read below: the task built above stays as is
    size = s.size = dataclasses.replace(size, **pick)
    opts = {**opts, "chosen": pick, "search": vals}
  T, F = size.steps, size.ft
  out = {"method": method, "budget": b, "steps": T, "options": opts}
  ckpt = cache.checkpoint(name)

  def done(params, extra):
    if os.path.exists(ckpt):
      os.remove(ckpt)
    return s.score(params, extra)

  if method in ("dense", "dense_pre"):
    steps = T if method == "dense" else T - F
    st, out["log"] = s.train(s.params0, s.extra0, s.optimizer(size.lr, steps), steps, method,
                             curve=size.curve if method == "dense" else 0, resume=ckpt)
    p, ex = st.params, st.extra
    cache.save(method, p, ex)
    out["steps"] = steps
    out["score"] = done(p, ex)
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
    st, out["log"] = s.train(s.svd(p, b, stats=grams), ex, s.optimizer(size.ft_lr, F), F, name,
                             offset=T - F, resume=ckpt)
    out["score"] = done(st.params, st.extra)
    return out

  if method in ("scratch", "spectral", "spectral_same"):
    if method == "spectral_same":  # the per-layer ranks TRP found at its energy point
      with open(os.path.join(runs_dir, f"{opts['ranks_of']}_s{seed}.json")) as f:
        want = json.load(f)["score"]["ranks"]
      start = jlr.factorize(s.params0, {k: ranks.fixed(r) for k, r in want.items()},
                            select=s.select, layout=s.layout)
    elif method == "scratch" and size.scratch_init == "default":
      start = s.thin_init(b)
    else:  # the SVD of the dense init: spectral initialization
      start = s.svd(s.params0, b)
    decay = "l2" if method == "scratch" else "frobenius"
    st, out["log"] = s.train(start, s.extra0, s.optimizer(size.lr, T, decay=decay), T, name,
                             resume=ckpt)
    out["score"] = done(st.params, st.extra)
    return out

  if method in ("lod", "lod_nested"):
    start, extra0, n, offset, lr = s.params0, s.extra0, T, 0, size.lr
    if opts.get("warm"):  # the remaining F steps from the SVD of the dense model
      (start, extra0), n, offset, lr = cache.load("dense_pre"), F, T - F, size.ft_lr
    full = lod.init(start, select=s.select, layout=s.layout)
    tx = s.optimizer(lr, n)
    loss = s.lod_loss(size.lam, opts.get("sampler", "layer"))
    switch, between, events = {}, None, []
    if method == "lod" and size.shrink == "threshold":
      budget = lod.kernel_params(s.svd(s.params0, b))  # the uniform cells' factor count
      cut = round(size.budget_at * n)
      m = lod.method(lam=0.0, eps=size.eps, interval=max(round(size.interval * n), 1),
                     start=round(size.start * n), relative=True)
      def between(t, state):
        params, opt = state.params, state.opt_state
        if t < cut:
          params, opt = m.between(t - 1, params, opt, tx)
        elif t == cut:
          params = lod.to_budget(params, budget)
          opt = lod.slice_opt_state(tx, opt, params)
        if params is state.params:
          return state
        events.append({"step": offset + t, "kernel_params": lod.kernel_params(params),
                       "ranks": ranks_of(params)})
        return state.replace(params=params, opt_state=opt)
      switch = {cut: s.task_loss}  # the budget model trains without sampling from the cut
    elif method == "lod":  # shrink="schedule"
      target, first = s.budget_ranks(b), ranks_of(full)
      at = [round(n * q) for q in SCHEDULE]

      def between(t, state):
        if t not in at:
          return state
        k = at.index(t) + 1
        want = {p: int(np.ceil(first[p] - (first[p] - target[p]) * k / len(SCHEDULE)))
                for p in first}
        params = lod.extract(state.params, ranks=want)
        return state.replace(params=params, opt_state=lod.slice_opt_state(tx, state.opt_state,
                                                                          params))
      switch = {at[-1]: s.task_loss}
    st, out["log"] = s.train(full, extra0, tx, n, name, loss=loss, offset=offset, switch=switch,
                             between=between, events=events if between else None, resume=ckpt)
    p, ex = st.params, st.extra
    out["score"] = done(p, ex)  # lod_nested: the full-rank factors
    if method == "lod_nested":
      cache.save("lod_nested", p, ex)
      out["derived"] = {f"lod_nested@{x:g}": s.score(lod.extract(p, ranks=s.budget_ranks(x)), ex)
                        for x in size.budgets}
    return out

  if method == "lod_nested_ft":
    p, ex = cache.load("lod_nested")
    sub = lod.extract(p, ranks=s.budget_ranks(b))
    st, out["log"] = s.train(sub, ex, s.optimizer(size.ft_lr, F), F, name, offset=T, resume=ckpt)
    out["steps"] = T + F
    out["score"] = done(st.params, st.extra)
    return out

  if method in s.trp_layouts or method == "trp_nu":
    lay, nuclear = s.trp_layouts.get(method, (s.layout, True))
    rule = ranks.energy(size.energy) if b is None else s.budget_rule(b)
    tx = jlr.trp.trp(s.optimizer(size.lr, T), every=size.period, rank=rule,
                     nuclear=size.nuclear if nuclear else 0.0, nuclear_on=size.nuclear_on,
                     select=s.select, layout=lay)
    st, out["log"] = s.train(s.params0, s.extra0, tx, T, name, resume=ckpt)
    p, ex = jax.device_get((st.params, st.extra))
    out["trained_dense_weights"] = s.score(p, ex)
    dec = jlr.trp.decouple(p, rule, select=s.select, layout=lay)
    out["score"] = done(dec, ex)
    if b is None:  # TRP's Table 1: the dense model truncated to the same per-layer ranks
      dp, dex = cache.load("dense")
      same = {k: ranks.fixed(r) for k, r in ranks_of(dec).items()}
      out["dense_svd_same_ranks"] = s.score(jlr.factorize(dp, same, select=s.select, layout=lay),
                                            dex)
    return out

  raise ValueError(f"unknown cell {name!r}")
