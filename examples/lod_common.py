"""Shared pieces of the LoD examples (``lod_mlp.py``, ``lod_transformer.py``, ``lod_cnn.py``).

* :func:`ranks_of` -- ``{path: rank}`` of every ``LowRank`` leaf (from ``jlr.summary``).
* :class:`RankedCheckpoints` -- ``train.Checkpoints`` (examples/train.py) plus a small JSON of the
  per-leaf ranks at every saved epoch. LoD shrinks the factors, so a checkpoint's shapes
  depend on its epoch; resuming builds a template of the right shapes from those ranks
  (``lod.extract(lod.init(...), ranks=...)``) before restoring.
* :func:`fit` -- the epoch loop: jitted ``train_step``, a progress bar, an optional
  LoD shrink at the end of every epoch after the warm-up, checkpoint/resume.
* :func:`bn_recalibrator` -- BatchNorm statistics of a (sub-)model recomputed exactly
  over a calibration set (a prefix model needs its own; the running statistics belong to
  the network they were gathered on).
* :func:`parse_mesh`, :func:`place_state`, :func:`shard_batch` -- ``--mesh data=4,model=2``:
  params (and alike the optimizer moments) FSDP-placed with ``jlr.sharding``, batches
  split over ``data``; :func:`fit` re-places them after every shrink.
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
from train import Checkpoints, TrainState, progress, train_step  # examples/train.py

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


def lod_template(dense_params, tx, key, select=None, *, layout=None,
                 extra=None) -> Callable[[dict], TrainState]:
  """``ranks -> TrainState`` of ``lod.init(dense_params)`` cut to ``ranks`` (``extra``:
  the model's other collections, e.g. ``{"batch_stats": ...}``)."""
  full = lod.init(dense_params, select=select, layout=layout)

  def make(ranks):
    return TrainState.create(lod.extract(full, ranks=ranks), tx, key=key, extra=extra)

  return make


def shrink_state(state: TrainState, tx, eps: float, multiple: int = 8,
                 relative: bool = False) -> TrainState:
  """LoD's progressive shrinking of the params and, alike, of the optimizer state."""
  params = lod.shrink(state.params, eps, multiple=multiple, relative=relative)
  return state.replace(params=params, opt_state=lod.slice_opt_state(tx, state.opt_state, params))


def fit(state: TrainState, loss_fn, tx: optax.GradientTransformation, *,
        epoch_batches: Callable[[int], Iterable], steps_per_epoch: int, epochs: int,
        eps: float | None = None, warmup: int = 1, multiple: int = 8,
        ckpt: RankedCheckpoints | None = None, resume: bool = False,
        on_epoch: Callable[[int, TrainState, dict], dict] | None = None,
        after_shrink: Callable[[TrainState], TrainState] | None = None,
        relative: bool = False, mesh=None,
        desc: str = "train", bars: bool = True) -> tuple[TrainState, list[dict]]:
  """Train ``epochs`` epochs; ``epoch_batches(epoch)`` must be a pure function of the
  epoch (and the seed), so that a resumed run is bit-identical to an uninterrupted one.

  With ``eps`` (LoD), ``lod.shrink`` runs at the end of every epoch after ``warmup``;
  the jitted step re-traces on the new shapes (only then); ``relative`` makes ``eps``
  a fraction of each layer's leading importance (``lod.shrink(relative=True)``), and
  ``after_shrink(state) -> state`` runs after each shrink (e.g. BatchNorm
  recalibration). ``on_epoch(epoch, state, metrics)`` may add entries (e.g. validation
  accuracy) to the epoch's log line. With a ``mesh`` (:func:`parse_mesh`) the state is
  FSDP-placed at the start, on resume and after every shrink, and batches are split
  over its ``data`` axis. Returns the final state and the per-epoch history (of this
  process's epochs).
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
  if mesh is not None:
    state = place_state(state, tx, mesh)
  history = []
  for epoch in range(start, epochs):
    t0 = time.perf_counter()
    sums, n = {}, 0
    bar = progress(epoch_batches(epoch), total=steps_per_epoch, leave=False,
                   desc=f"{desc} epoch {epoch + 1}/{epochs}", disable=not bars)
    for i, batch in enumerate(bar):
      if mesh is not None:
        batch = shard_batch(batch, mesh)
      state, metrics = step(state, batch)
      for k, v in metrics.items():
        sums[k] = sums.get(k, 0.0) + v  # stays on device: no sync per step
      n += 1
      if i % 50 == 0 and hasattr(bar, "set_postfix"):
        bar.set_postfix(loss=f"{float(metrics['loss']):.4f}")
    log = {"epoch": epoch + 1, "seconds": 0.0}
    log.update({k: float(v) / max(n, 1) for k, v in sums.items()})
    if eps is not None and epoch + 1 > warmup:
      state = shrink_state(state, tx, eps, multiple, relative)
      if mesh is not None:
        state = place_state(state, tx, mesh)
      if after_shrink is not None:
        state = after_shrink(state)
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


# ----------------------------------------------------------------------------- sharding


def parse_mesh(spec: str | None):
  """``"data=4,model=2"`` -> a ``jax.sharding.Mesh`` (``jlr.sharding.make_mesh``); ``None``
  or ``""`` -> ``None`` (unsharded)."""
  if not spec:
    return None
  from jlr import sharding

  mesh = sharding.make_mesh(spec)
  if "data" not in mesh.shape:
    raise ValueError(f"--mesh {spec!r} needs a 'data' axis (batches are split over it)")
  return mesh


def place_state(state: TrainState, tx: optax.GradientTransformation, mesh,
                style: str = "fsdp") -> TrainState:
  """Params placed by ``jlr.sharding.place(params, mesh, style)`` (``LowRank`` factors:
  ``u`` rows and ``v`` columns on the mesh axes, rank replicated); the optimizer's
  params-shaped parts (Adam moments) placed alike; everything else replicated. Call it
  again after a shrink: the new (smaller) factors get their own placement."""
  from jax.sharding import NamedSharding, PartitionSpec

  from jlr import sharding
  from jlr.lowrank import is_lowrank

  shardings = sharding.specs(state.params, mesh, style)
  replicated = NamedSharding(mesh, PartitionSpec())
  put = lambda x: jax.device_put(x, replicated)  # noqa: E731
  opt_state = optax.tree_utils.tree_map_params(
      tx, lambda s, sh: jax.device_put(s, sh), state.opt_state, shardings,
      transform_non_params=put, is_leaf=is_lowrank)
  return state.replace(step=put(state.step), params=sharding.place(state.params, mesh, style),
                       opt_state=opt_state, extra=jax.tree.map(put, state.extra),
                       rng=put(state.rng))


def shardings_of(params) -> dict[str, str]:
  """``{path: PartitionSpec}`` of every ``LowRank`` factor pair (``"u | v"``), for logs."""
  spec = lambda x: str(getattr(getattr(x, "sharding", None), "spec", "-"))  # noqa: E731
  return {p: f"{spec(x.u)} | {spec(x.v)}" for p, x in jlr.select.leaves(params)[0]
          if jlr.is_lowrank(x)}


def shard_batch(batch, mesh):
  """Every array of ``batch`` split along its leading axis over the mesh's ``data`` axis."""
  from jlr import sharding

  return jax.device_put(batch, sharding.batch_sharding(mesh))


# ----------------------------------------------------------------------------- BatchNorm


def _feature_axes(ndim: int, axis) -> tuple[int, ...]:
  """A BatchNorm's ``axis`` (an int or a sequence, negative counting from the end) as
  sorted non-negative axes of an ``ndim``-D input."""
  axes = tuple(axis) if isinstance(axis, Iterable) else (axis,)
  return tuple(sorted({a + ndim if a < 0 else a for a in axes}))


def bn_recalibrator(model, *, apply: Callable | None = None, **kwargs):
  """``recalibrate(params, batch_stats, batches) -> batch_stats`` for a linen ``model``
  with ``nn.BatchNorm`` layers (``kwargs`` go to the forward, e.g. ``train=True``: the
  model must then normalize with batch statistics, as in training).

  Running statistics are an EMA gathered on the network that was trained -- under LoD,
  on randomly sampled sub-networks, and before a shrink on a bigger one. A prefix
  (sub-)model needs the statistics of its own activations (as in slimmable networks,
  Yu et al. 2019, and PyTorch's ``update_bn``). Each BatchNorm's input ``x`` is caught
  by a method interceptor in a train-mode forward and its per-feature moments are
  pooled *exactly* over all calibration examples (no EMA):

      mean = sum_b n_b m_b / N,   var = sum_b n_b (v_b + (m_b - mean)^2) / N

  with ``m_b``, ``v_b`` the batch's mean and (biased, as flax uses) variance over every
  axis but the feature axis. For the first BatchNorm this is the mean and variance of
  its inputs over the calibration set; deeper layers see inputs normalized with their
  calibration batch's statistics, as in training (use big calibration batches).
  One jitted forward serves every sub-model of the same shapes.
  """
  import flax.linen as nn
  from flax import traverse_util

  import jlr.flax

  apply = apply or jlr.flax.apply

  def catch(next_fun, args, kw, context):
    mod = context.module
    if isinstance(mod, nn.BatchNorm) and context.method_name == "__call__":
      x = jax.numpy.asarray(args[0], jax.numpy.float32)
      feat = _feature_axes(x.ndim, mod.axis)
      red = tuple(i for i in range(x.ndim) if i not in feat)
      mean = x.mean(red)
      mod.sow("bn_moments", "mean", mean)
      mod.sow("bn_moments", "var", jax.numpy.square(x - mean.reshape(
          [x.shape[i] if i in feat else 1 for i in range(x.ndim)])).mean(red))
    return next_fun(*args, **kw)

  @jax.jit
  def moments(params, batch_stats, x):
    with nn.intercept_methods(catch):
      _, cols = apply(model, {"params": params, "batch_stats": batch_stats}, x,
                      mutable=["batch_stats", "bn_moments"], **kwargs)
    return cols["bn_moments"]

  def recalibrate(params, batch_stats, batches: Iterable) -> Any:
    acc, total = {}, 0
    for x in batches:
      n = int(np.shape(x)[0])
      got = traverse_util.flatten_dict(jax.device_get(moments(params, batch_stats, x)))
      for k, vals in got.items():
        if len(vals) != 1:
          raise ValueError(f"{'/'.join(k[:-1])}: BatchNorm called {len(vals)} times per "
                           "forward; shared BatchNorms are not supported")
        acc.setdefault(k, []).append((n, np.asarray(vals[0], np.float64)))
      total += n
    if not total:
      raise ValueError("recalibration needs at least one batch")
    flat = traverse_util.flatten_dict(batch_stats)
    out = {}
    for k, old in flat.items():
      if k[-1] not in ("mean", "var") or k[:-1] + ("mean",) not in acc:
        raise ValueError(f"{'/'.join(k)}: no BatchNorm input was seen for this statistic")
      ms = acc[k[:-1] + ("mean",)]
      mean = sum(n * m for n, m in ms) / total
      if k[-1] == "mean":
        new = mean
      else:
        vs = acc[k]
        new = sum(n * (v + np.square(m - mean)) for (n, v), (_, m) in zip(vs, ms)) / total
      out[k] = jax.numpy.asarray(new, np.asarray(old).dtype)
    return traverse_util.unflatten_dict(out)

  return recalibrate


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
         references: dict[str, tuple[int, float]] = (),
         curves: tuple[tuple[str, str, str], ...] = (), extra_metric: str | None = None) -> None:
  """``metric`` vs params: the LoD nested curve and the SVD-of-dense curve, plus
  reference points ``{label: (params, value)}``. ``curves``: extra ``(key, label,
  style)`` lines plotting ``rows[i][key][extra_metric or metric]``."""
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
  for key, label, style in curves:
    ax.plot([r[key]["params"] for r in rows], [r[key][extra_metric or metric] for r in rows],
            style, label=label, markersize=4)
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


def save_results(out_dir: str, name: str, result: dict, metric: str, **plot_kwargs) -> None:
  """Write ``<name>.json`` and ``<name>.png`` under ``out_dir`` (nothing when it is empty):
  :func:`plot` of ``metric`` vs params over ``result["rows"]``, with the dense baseline
  and the trained LoD model as reference points."""
  if not out_dir:
    return
  json_path, png = (os.path.join(out_dir, f"{name}.{ext}") for ext in ("json", "png"))
  write_json(json_path, result)
  dense, trained = result["dense"], result["lod_trained"]
  plot(png, result["rows"], metric,
       references={"dense baseline": (dense["params"], dense[metric]),
                   "LoD trained (factors)": (trained["params"], trained[metric])},
       **plot_kwargs)
  print(f"\nwrote {json_path} and {png}")


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
