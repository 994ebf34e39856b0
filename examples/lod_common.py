"""Shared pieces of the LoD examples (``lod_mlp.py``, ``lod_transformer.py``).

* :func:`ranks_of` -- ``{path: rank}`` of every ``LowRank`` leaf (from ``jlr.summary``).
* :class:`RankedCheckpoints` -- ``jlr.train.Checkpoints`` plus a small JSON of the
  per-leaf ranks at every saved epoch. LoD shrinks the factors, so a checkpoint's shapes
  depend on its epoch; resuming builds a template of the right shapes from those ranks
  (``lod.extract(lod.init(...), ranks=...)``) before restoring.
* :func:`fit` -- the epoch loop: jitted ``train_step``, a progress bar, an optional
  LoD shrink at the end of every epoch after the warm-up, checkpoint/resume.
* :func:`print_table`, :func:`compare_widths`, :func:`plot` -- the result table and PNG.

Nothing here is specific to a model or a dataset.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Callable, Iterable

import jax
import numpy as np
import optax

import jlr
from jlr import lod
from jlr.train import Checkpoints, TrainState, progress, train_step

WIDTHS = tuple(round(0.1 * i, 1) for i in range(1, 11))


def ranks_of(params) -> dict[str, int]:
  """``{path: rank}`` of every ``LowRank`` leaf of ``params``."""
  return {r.path: int(r.rank) for r in jlr.summary(params).rows if r.rank is not None}


def fingerprint(tree) -> str:
  """sha256 of every array leaf's bytes (factors included): equal iff bit-identical."""
  import hashlib

  h = hashlib.sha256()
  for leaf in jax.tree_util.tree_leaves(tree):
    a = np.asarray(leaf)
    h.update(str((a.shape, a.dtype)).encode())
    h.update(a.tobytes())
  return h.hexdigest()[:16]


def cost(params) -> dict[str, int]:
  rep = jlr.summary(params)
  return {"params": int(rep.total_params), "flops": int(rep.flops)}


# ----------------------------------------------------------------------------- checkpoints


class RankedCheckpoints:
  """Checkpoints of a :class:`TrainState` whose ``LowRank`` ranks change over training.

  ``template(ranks)`` must return a freshly created state with those ranks (a dense
  run ignores them). The ranks of every saved epoch are kept in ``ranks.json`` next to
  the orbax directories, together with ``meta`` (the run's configuration), which must
  match on resume: a checkpoint of another configuration is refused, not mixed in.
  """

  def __init__(self, directory: str, template: Callable[[dict], TrainState], meta: dict):
    self.ckpt = Checkpoints(directory)
    self.template = template
    self.meta = meta
    self.index = os.path.join(self.ckpt.directory, "ranks.json")

  def _read(self) -> dict:
    if not os.path.exists(self.index):
      return {"meta": self.meta, "ranks": {}}
    with open(self.index) as f:
      return json.load(f)

  def save(self, epoch: int, state: TrainState) -> None:
    data = self._read()
    data["meta"] = self.meta
    data["ranks"][str(epoch)] = ranks_of(state.params)
    tmp = self.index + ".tmp"
    with open(tmp, "w") as f:  # the ranks first: a checkpoint without them is unusable
      json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, self.index)
    self.ckpt.save(epoch, state)

  def restore(self) -> tuple[int, TrainState] | None:
    """``(epoch, state)`` of the latest checkpoint, or ``None``."""
    epoch = self.ckpt.latest_step()
    if epoch is None:
      return None
    data = self._read()
    if data.get("meta") != self.meta:
      raise ValueError(
          f"{self.ckpt.directory} holds a run with another configuration:\n"
          f"  saved:   {data.get('meta')}\n  current: {self.meta}\n"
          "use another --ckpt-dir (or delete it) to start afresh")
    ranks = data["ranks"].get(str(epoch))
    if ranks is None:
      raise ValueError(f"{self.index} has no ranks for epoch {epoch}")
    return epoch, self.ckpt.restore(self.template(ranks), epoch)


# ----------------------------------------------------------------------------- training


def lod_template(dense_params, tx, key, select=None) -> Callable[[dict], TrainState]:
  """``ranks -> TrainState`` of ``lod.init(dense_params)`` cut to ``ranks``."""
  full = lod.init(dense_params, select=select)

  def make(ranks):
    return TrainState.create(lod.extract(full, ranks=ranks), tx, key=key)

  return make


def shrink_state(state: TrainState, tx, eps: float, multiple: int = 8) -> TrainState:
  """LoD's progressive shrinking of the params and, alike, of the optimizer state."""
  params = lod.shrink(state.params, eps, multiple=multiple)
  return state.replace(params=params, opt_state=lod.slice_opt_state(tx, state.opt_state, params))


def fit(state: TrainState, loss_fn, tx: optax.GradientTransformation, *,
        epoch_batches: Callable[[int], Iterable], steps_per_epoch: int, epochs: int,
        eps: float | None = None, warmup: int = 1, multiple: int = 8,
        ckpt: RankedCheckpoints | None = None, resume: bool = False,
        on_epoch: Callable[[int, TrainState, dict], dict] | None = None,
        desc: str = "train", bars: bool = True) -> tuple[TrainState, list[dict]]:
  """Train ``epochs`` epochs; ``epoch_batches(epoch)`` must be a pure function of the
  epoch (and the seed), so that a resumed run is bit-identical to an uninterrupted one.

  With ``eps`` (LoD), ``lod.shrink`` runs at the end of every epoch after ``warmup``;
  the jitted step re-traces on the new shapes (only then). ``on_epoch(epoch, state,
  metrics)`` may add entries (e.g. validation accuracy) to the epoch's log line.
  Returns the final state and the per-epoch history (of this process's epochs).
  """
  step = jax.jit(train_step(loss_fn, tx))
  start = 0
  if ckpt is not None and resume:
    got = ckpt.restore()
    if got is not None:
      start, state = got
      if start > epochs:
        print(f"{desc}: the checkpoint is at epoch {start}, past --epochs {epochs}; using it")
      print(f"{desc}: resumed from epoch {start} of {ckpt.ckpt.directory} "
            f"(ranks {ranks_of(state.params) or 'dense'})")
  history = []
  for epoch in range(start, epochs):
    t0 = time.perf_counter()
    sums, n = {}, 0
    bar = progress(epoch_batches(epoch), total=steps_per_epoch, leave=False,
                   desc=f"{desc} epoch {epoch + 1}/{epochs}", disable=not bars)
    for i, batch in enumerate(bar):
      state, metrics = step(state, batch)
      for k, v in metrics.items():
        sums[k] = sums.get(k, 0.0) + v  # stays on device: no sync per step
      n += 1
      if i % 50 == 0 and hasattr(bar, "set_postfix"):
        bar.set_postfix(loss=f"{float(metrics['loss']):.4f}")
    log = {"epoch": epoch + 1, "seconds": 0.0}
    log.update({k: float(v) / max(n, 1) for k, v in sums.items()})
    if eps is not None and epoch + 1 > warmup:
      state = shrink_state(state, tx, eps, multiple)
    if eps is not None:
      log["ranks"] = ranks_of(state.params)
      log["params"] = jlr.summary(state.params).total_params
    log["seconds"] = round(time.perf_counter() - t0, 2)
    if on_epoch is not None:
      log.update(on_epoch(epoch + 1, state, log))
    if ckpt is not None:
      ckpt.save(epoch + 1, state)
    history.append(log)
    shown = {k: ("/".join(map(str, v.values())) if isinstance(v, dict) else
                 f"{v:.4g}" if isinstance(v, float) else v) for k, v in log.items()}
    print(f"{desc}: " + " ".join(f"{k}={v}" for k, v in shown.items()))
  return state, history


# ----------------------------------------------------------------------------- reporting


def compare_widths(lod_params, dense_params, score: Callable[[Any], dict],
                   widths=WIDTHS) -> list[dict]:
  """One row per width: the nested LoD sub-model ``deploy(extract(width))`` and the SVD
  truncation of the dense model at the same per-layer ranks (hence the same params).

  ``score(params) -> {metric: value}``.
  """
  rows = []
  for w in widths:
    sub = lod.extract(lod_params, width=w)
    ranks = ranks_of(sub)
    deployed = lod.deploy(sub)
    # the same ranks, path by path; like deploy, factorize leaves a kernel dense where
    # the factors would not be smaller than it (default selection, break-even rule)
    svd = jlr.factorize(dense_params, {path: jlr.ranks.fixed(r) for path, r in ranks.items()})
    row = {"width": w, "ranks": ranks, "lod": dict(cost(deployed), **score(deployed)),
           "svd": dict(cost(svd), **score(svd))}
    rows.append(row)
  return rows


def print_table(head: list[str], rows: list[list[str]]) -> str:
  widths = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]
  line = lambda cells: "  ".join(  # noqa: E731
      str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
  text = "\n".join([line(head), "-" * len(line(head))] + [line(r) for r in rows])
  print(text)
  return text


def si(x: float) -> str:
  for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
    if x >= scale:
      return f"{x / scale:.2f}{unit}"
  return f"{int(x)}"


def plot(path: str, rows: list[dict], metric: str, *, ylabel: str, title: str,
         references: dict[str, tuple[int, float]] = ()) -> None:
  """``metric`` vs params: the LoD nested curve and the SVD-of-dense curve, plus
  reference points ``{label: (params, value)}``."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib import ticker

  fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
  for key, label, style in (("lod", "LoD nested widths (deploy(extract(w)))", "o-"),
                            ("svd", "SVD of the dense model, same ranks", "s--")):
    xs = [r[key]["params"] for r in rows]
    ys = [r[key][metric] for r in rows]
    ax.plot(xs, ys, style, label=label, markersize=4)
  if rows:
    marked = {0, len(rows) - 1} | set(range(2, len(rows) - 2, 2))  # w = 0.1, 0.3, ..., 1.0
    for r in (rows[i] for i in sorted(marked)):
      ax.annotate(f"w={r['width']:g}", (r["lod"]["params"], r["lod"][metric]),
                  textcoords="offset points", xytext=(4, -10), fontsize=7, color="C0")
  for i, (label, (x, y)) in enumerate(dict(references).items()):
    ax.plot([x], [y], "*", markersize=11, color=f"C{i + 2}", label=label)
  ax.set_xscale("log")
  ax.xaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 3.0, 5.0)))
  ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda x, _: f"{x / 1e3:g}k"))
  ax.xaxis.set_minor_formatter(ticker.NullFormatter())
  ax.set_xlabel("parameters (all leaves, after deploy)")
  ax.set_ylabel(ylabel)
  ax.set_title(title, fontsize=10)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path)
  plt.close(fig)


def write_json(path: str, data: dict) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

  def clean(x):
    if isinstance(x, dict):
      return {str(k): clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
      return [clean(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
      return x.item()
    if isinstance(x, float) and not math.isfinite(x):
      return str(x)
    return x

  with open(path, "w") as f:
    json.dump(clean(data), f, indent=1)
