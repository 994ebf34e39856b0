"""A compression recipe for language models: calibrate -> allocate -> factorize -> update
-> heal, for any JAX LM given as ``logits_fn(params, ids) -> logits`` (a linen
``model.apply``, an NNX split, a Hugging Face Flax ``model(ids, params=p).logits``).

    fn = lambda p, ids: model.apply(p, ids)[0]
    cal = jlr.llm.calibrate(fn, params, calib_windows, select=is_projection)
    small = jlr.llm.factorize(params, cal, keep=0.6)         # SVD-LLM, uniform ranks
    f = jlr.llm.factors(params, cal, "svd_llm")   # or: one weighted SVD per kernel, then
    small = jlr.llm.compress(f, jlr.llm.allocate(f.spectra, keep=0.6))  # any ranks
    small = jlr.llm.update(fn, small, calib_windows, steps=100)       # SVD-LLM's update
    small, log = jlr.llm.heal(fn, small, train_windows, val_windows)  # early-stopped
    jlr.llm.perplexity(jlr.llm.nll(fn, small, test_windows))          # with a bootstrap CI

Every step is a pure function of its inputs (nothing is mutated); a factorized ``params``
runs through :func:`jlr.factorized`, computing ``x @ u @ v``. Windows are ``(n, T + 1)``
int token arrays: the model reads ``[:, :-1]`` and is scored on ``[:, 1:]``.

Methods (each a truncated SVD of a differently weighted kernel, :func:`stats_for`):

* ``"svd"`` -- plain SVD of ``W``.
* ``"fwsvd"`` -- rows weighted by the Fisher information ``sum_j E[(dL/dW_ij)^2]``
  (Hsu et al., ICLR 2022).
* ``"asvd"`` -- rows scaled by ``S = diag(mean |x_i|)^alpha``, ``W' = S^-1 (S W)_r`` (ASVD,
  Yuan et al. 2023, arXiv 2312.05821), alpha searched on calibration data
  (:func:`search_alpha`), ranks by ASVD's sensitivity-based truncation rank search
  (:func:`sensitivity_ranks`).
* ``"svd_llm"`` -- truncation-aware whitening ``W' = R^-1 (R W)_r`` with ``R = (X^T
  X)^{1/2}`` (SVD-LLM, Wang et al., ICLR 2025, arXiv 2403.07378): truncating the
  whitened singular value ``s_j`` costs exactly ``s_j^2`` of ``||X W - X W'||_F^2``.

A tied embedding selected as a target is calibrated on its LM-head use, ``logits = h
E^T`` (its columns meet ``h``: :class:`jlr.stats.Gram` with ``side="cols"``), so each
method weighs the head's error: SVD-LLM minimizes ``||H (E - E')^T||_F``.

Allocation (:func:`allocate`): ``"uniform"`` (every kernel keeps the same fraction of its
parameters) or ``"loss"`` -- SVD-LLM V2's idea (Wang et al., NAACL 2025, arXiv
2503.12340) that each matrix's ratio should follow its theoretical truncation loss: the
per-kind budget (``ranks.budget(group=kind)``: every kind of matrix -- all query
projections, all down projections -- keeps its share) spent greedily on the components
of largest relative loss ``s_j^2 / sum_i s_i^2`` per parameter, which minimizes the
summed relative truncation loss of each kind exactly (spectra are non-increasing). No
noisy probes, and never below rank ``min_rank``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import pickle
import warnings
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jlr import ranks, stats as stats_lib
from jlr.factorized import factorized
from jlr.lowrank import LowRank, is_lowrank
from jlr.paths import flatten, path_str, replace
from jlr.select import selector
from jlr.transforms import factorize as _factorize

METHODS = ("svd", "fwsvd", "asvd", "svd_llm")
ALLOCATIONS = ("uniform", "loss")


def _bar(it, desc: str, show: bool, total: int | None = None):
  if not show:
    return it
  from tqdm.auto import tqdm
  return tqdm(it, desc=desc, total=total, leave=False, dynamic_ncols=True)


def kind(path: str) -> str:
  """The kind of a kernel: its module's name without layer indices (``blocks_3/attn/q/
  kernel`` -> ``attn/q``), so every layer's query projection is one kind."""
  parts = [p for p in path.split("/")[:-1] if not any(c.isdigit() for c in p)]
  return "/".join(parts[-2:]) or path


def token_nll(logits_fn: Callable, params, windows) -> jax.Array:
  """Mean next-token negative log-likelihood (nats) of ``windows`` (``(B, T + 1)``)."""
  return _per_window(logits_fn, params, windows).mean()


def _token_windows(windows, what: str) -> np.ndarray:
  """``windows`` as an ``(n, T + 1)`` integer array of token ids, or a ``ValueError``
  naming ``what``: a negative id (``-100`` / ``-1`` padding, as Hugging Face labels use)
  would index the embedding and the log-probabilities from the end -- a wrong number,
  not an error -- and jlr.llm has no ignore index."""
  w = np.asarray(windows)
  if w.ndim != 2 or w.shape[1] < 2 or not np.issubdtype(w.dtype, np.integer):
    raise ValueError(f"{what}: windows must be an (n, T + 1) integer array of token ids "
                     f"with T >= 1, got shape {w.shape} and dtype {w.dtype}")
  if w.size and w.min() < 0:
    row = int(np.argwhere(w < 0)[0][0])
    raise ValueError(f"{what}: window {row} holds a negative token id ({int(w.min())}; "
                     "padding or an ignore index?): every position is scored, so drop or "
                     "refill such windows")
  return w


def _value_and_grad_of(loss: Callable, pick: Callable[[str, Any], bool], *, rest=None):
  """``(params, *args) -> (loss(params, *args), grads)`` with the gradient taken only
  w.r.t. the leaves ``pick(path, leaf)`` keeps (a :class:`jlr.LowRank` is one leaf); the
  others enter ``loss`` as constants, so no tangent of theirs is traced and no gradient of
  theirs computed -- a frozen embedding's alone is a (vocab x d) product per step, and
  frozen layers in front of the trained ones are not back-propagated through. ``grads``
  is shaped like ``params`` with ``rest`` at the other leaves (``"zeros"``: zeros of the
  leaf's shape, what an optimizer over the whole tree expects)."""
  def vg(params, *args):
    flat, tdef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_lowrank)
    leaves = [x for _, x in flat]
    idx = [i for i, (kp, x) in enumerate(flat) if pick(path_str(kp), x)]

    def of(sub):
      full = list(leaves)
      for i, x in zip(idx, sub):
        full[i] = x
      return loss(jax.tree_util.tree_unflatten(tdef, full), *args)

    val, sub = jax.value_and_grad(of)([leaves[i] for i in idx])
    out = [jnp.zeros_like(x) if rest == "zeros" else rest for x in leaves]
    for i, g in zip(idx, sub):
      out[i] = g
    return val, jax.tree_util.tree_unflatten(tdef, out)
  return vg


# ----------------------------------------------------------------------------- calibrate


@dataclasses.dataclass(frozen=True)
class Calibration:
  """What the recipe knows of the data: ``grams`` (``{path: Gram}`` of each kernel's
  inputs), ``magnitudes`` (``{path: Magnitudes}``, ASVD) and ``fisher`` (``{path:
  RowWeights}``, FWSVD), each ``None`` when not collected; ``layout`` the kernels'
  layouts as the model uses them."""

  grams: Mapping | None
  magnitudes: Mapping | None
  fisher: Mapping | None
  layout: Any


def calibrate(logits_fn: Callable, params, windows: Sequence, *, select=None,
              batch: int = 4, magnitudes: bool = True, fisher: int = 0,
              cache: str | None = None, progress: bool = True) -> Calibration:
  """Input statistics of the selected kernels on ``windows`` (``(n, T + 1)`` tokens), in
  ``batch``-window passes: Grams (SVD-LLM), per-channel mean ``|x|`` (ASVD, with
  ``magnitudes``) and, with ``fisher=k``, the empirical Fisher of the LM loss on the
  first ``k`` windows one at a time (FWSVD).

  ``cache``: a file the result is saved to and, on a later call with the same windows,
  parameters, settings and program (a fingerprint of all of them: ``logits_fn`` enters as
  its traced jaxpr and constants, so an edited model function is not served stale
  statistics), loaded from instead of recomputed; a stale file is recomputed and
  overwritten."""
  windows = _token_windows(windows, "llm.calibrate")
  key = (_fingerprint(params, windows, select, batch, magnitudes, fisher)
         + _program_digest(logits_fn, params, windows[:batch, :-1])) if cache else None
  if cache and os.path.exists(cache):
    try:
      with open(cache, "rb") as f:
        saved_key, saved = pickle.load(f)
    except Exception:  # noqa: BLE001 - written by other code or cut short: recompute
      saved_key = None
    if saved_key == key:
      return saved
  cal = _calibrate(logits_fn, params, windows, select, batch, magnitudes, fisher, progress)
  if cache:
    os.makedirs(os.path.dirname(os.path.abspath(cache)), exist_ok=True)
    with open(cache + ".tmp", "wb") as f:
      pickle.dump((key, cal), f)
    os.replace(cache + ".tmp", cache)
  return cal


def _fingerprint(params, windows, select, batch, magnitudes, fisher) -> str:
  """A digest of everything :func:`calibrate`'s result depends on: the windows, every
  parameter's path and bytes, which kernels are selected and the settings."""
  import hashlib
  h = hashlib.sha256(np.ascontiguousarray(windows).tobytes())
  flat = flatten(params)
  chosen = None if select is None else selector(select)
  for p, x in sorted(flat.items()):
    x = np.asarray(x)
    h.update(f"{p}{x.shape}{x.dtype}{chosen is None or chosen(p, x)}".encode())
    h.update(np.ascontiguousarray(x).tobytes())
  h.update(repr((batch, magnitudes, fisher)).encode())
  return h.hexdigest()


def _program_digest(logits_fn, params, ids) -> str:
  """A digest of what ``logits_fn`` computes: its jaxpr traced on ``ids`` (printed without
  object addresses) and the bytes of the constants it closes over."""
  import hashlib
  import re
  closed = jax.make_jaxpr(logits_fn)(params, jnp.asarray(ids))
  h = hashlib.sha256(re.sub(r"0x[0-9a-fA-F]+", "", str(closed.jaxpr)).encode())
  for c in closed.consts:
    h.update(np.ascontiguousarray(np.asarray(c)).tobytes())
  return h.hexdigest()


def _calibrate(logits_fn, params, windows, select, batch, magnitudes, fisher, progress):
  chunks = [jnp.asarray(windows[i: i + batch, :-1]) for i in range(0, len(windows), batch)]
  flat = flatten(params)
  chosen = None if select is None else selector(select)
  sel = None if select is None else (lambda p: p in flat and chosen(p, flat[p]))
  layout = stats_lib.read_layouts(logits_fn, params, (chunks[0],))  # one trace for all passes
  grams = stats_lib.activations(logits_fn, params, _bar(chunks, "grams", progress),
                                select=sel, layout=layout)
  mags = stats_lib.activations(logits_fn, params, _bar(chunks, "|x|", progress), select=sel,
                               layout=layout, mode="abs") if magnitudes else None
  fish = None
  if fisher:
    vg = _value_and_grad_of(  # the gradients of the selected float leaves only
        lambda p, w: token_nll(logits_fn, p, w),
        lambda p, x: (sel is None or sel(p)) and jnp.issubdtype(x.dtype, jnp.inexact))
    grad = jax.jit(lambda p, w: vg(p, w)[1])
    fish = stats_lib.fisher(grad, params, _bar([jnp.asarray(windows[i: i + 1])
                                                for i in range(min(fisher, len(windows)))],
                                               "fisher", progress),
                            select=select, layout=layout)
  return Calibration(grams, mags, fish, layout)


def stats_for(cal: Calibration, method: str, *, alpha: float = 0.5) -> Mapping | None:
  """The ``stats=`` of :func:`jlr.factorize` that makes ``method``'s weighted SVD."""
  if method == "svd":
    return None
  if method == "svd_llm":
    return _need(cal.grams, "grams", method)
  if method == "fwsvd":
    return _need(cal.fisher, "fisher", method)
  if method == "asvd":  # R = diag(sqrt(w)) = diag(mean|x|^alpha)
    mags = _need(cal.magnitudes, "magnitudes", method)
    return {p: stats_lib.RowWeights(np.maximum(m.mean, 1e-12) ** (2 * alpha), m.count, m.side)
            for p, m in mags.items()}
  raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def _need(x, what, method):
  if x is None:
    raise ValueError(f"method {method!r} needs calibrate(..., {what}=...) statistics")
  return x


DAMPING = {"svd": 0.0, "fwsvd": 1e-2, "asvd": 1e-6, "svd_llm": 1e-2}
"""Relative damping of each method's statistics (:func:`jlr.svd.whitener`): SVD-LLM's
Grams are often singular; ASVD's scales are used as measured."""


# ----------------------------------------------------------------------------- allocate


@dataclasses.dataclass(frozen=True)
class Factors:
  """One method's full-rank weighted factorization of the calibrated kernels, computed
  once: ``tree`` holds each kernel as the nested components ``u = R^-1 P S^1/2``, ``v =
  S^1/2 Q^T`` of ``R W = P S Q^T`` (every prefix is that method's optimal truncation,
  :func:`jlr.svd.weighted`); ``spectra = {path: (layout, s)}`` the weighted singular
  values, whose squared tail is the truncation loss. :func:`compress` cuts it to any
  ranks without another SVD of a kernel."""

  tree: Any
  method: str
  alpha: float
  spectra: dict


def factors(params, cal: Calibration | None, method: str = "svd_llm", *, alpha: float = 0.5,
            select=None) -> Factors:
  """:class:`Factors` of the calibrated kernels (or the ``select``\\ ed ones; ``cal=None``
  with ``"svd"``: kernels without statistics, such as a looked-up embedding)."""
  if cal is None:
    if method != "svd" or select is None:
      raise ValueError("factors(cal=None) is plain SVD of select= kernels: method='svd'")
    cal = Calibration(None, None, None, None)
  st = stats_for(cal, method, alpha=alpha)
  paths = set(cal.grams or cal.magnitudes or ())
  chosen = select if select is not None else (lambda p, x=None: p in paths)
  tree = _factorize(params, ranks.full(), select=chosen, layout=cal.layout, stats=st,
                   damping=DAMPING[method], nested=True)
  def spectrum(p, f):  # the orthonormal side's squared norms: the weighted s_j
    cols = st is not None and getattr(st.get(p), "side", "rows") == "cols"  # v = S^1/2 Q^T,
    side = f.u if cols else f.v  # or, whitened over the columns, u = Q S^1/2
    return np.asarray(jnp.sum(jnp.square(side.astype(jnp.float32)), -2 if cols else -1),
                      np.float64)
  spec = {p: (f.layout, spectrum(p, f)) for p, f in flatten(tree).items() if is_lowrank(f)}
  return Factors(tree, method, alpha, spec)


def allocate(spec: Mapping[str, tuple[Any, np.ndarray]], keep: float, *, by: str = "loss",
             strength: float = 1.0, group: Callable[[str], Any] = kind,
             min_rank: int = 8) -> dict[str, int]:
  """Ranks keeping a fraction ``keep`` of the kernels' parameters: ``"uniform"`` (each
  kernel ``ratio(keep)``) or ``"loss"`` (the truncation-loss budget per kind, see the
  module docstring). Both count factors ``r (m + n)`` and cap ranks at break-even.

  ``strength`` in [0, 1] moves each rank that far from uniform towards the loss
  allocation (``floor(u + t (l - u))``: within the budget, as both ends are). The relative
  truncation loss is a model of the LM loss, not the LM loss: :func:`choose_strength`
  picks ``t`` on held-out calibration text, ``t = 0`` (uniform) among the candidates, so
  the choice never loses to uniform there."""
  if not 0.0 <= strength <= 1.0:
    raise ValueError(f"strength must be in [0, 1], got {strength}")
  rule = ranks.ratio(keep, min_rank=min_rank)
  uniform = {p: min(rule.resolve(lay, None), max(1, lay.size // sum(lay.matrix_shape)))
             for p, (lay, _) in spec.items()}
  if by == "uniform" or strength == 0.0:
    return uniform
  if by != "loss":
    raise ValueError(f"by must be one of {ALLOCATIONS}, got {by!r}")
  items = [(p, lay, s) for p, (lay, s) in spec.items()]
  rule = ranks.budget(keep, normalize=True, group=group, min_rank=min_rank)
  loss = dict(zip(spec, rule.allocate(items)))
  return {p: int(math.floor(uniform[p] + strength * (loss[p] - uniform[p]) + 1e-9))
          for p in spec}


def choose_strength(score: Callable[[dict[str, int]], float], spec, keep: float, *,
                    strengths: Sequence[float] = (0.0, 0.25, 0.5, 1.0), **kwargs
                    ) -> tuple[float, dict[float, float]]:
  """``(t, {t: score})``: the :func:`allocate` strength whose ranks score best
  (``score(ranks)``: e.g. the perplexity of the compressed model on held-out calibration
  text). ``0`` (uniform) is always a candidate."""
  strengths = sorted(set((0.0, *strengths)))
  scores = {t: float(score(allocate(spec, keep, strength=t, **kwargs))) for t in strengths}
  return min(scores, key=scores.get), scores


def _host_dense(x: LowRank, r: int | None = None):
  """The kernel of ``x`` (its first ``r`` components) as a dense array, multiplied on the
  host: searches try hundreds of factor shapes, and XLA would compile every one."""
  u, v = np.asarray(x.u, np.float32), np.asarray(x.v, np.float32)
  if r is not None:
    u, v = u[..., :r], v[..., :r, :]
  return jax.device_put(np.asarray(x.layout.from_matrix(u @ v)).astype(np.dtype(x.dtype)))


def sensitivity(score: Callable[[Any], float], params, f: Factors, *,
                levels: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
                known: Mapping[tuple[str, float], float] | None = None,
                on_kernel: Callable[[dict], None] | None = None,
                progress: bool = True) -> dict[tuple[str, float], float]:
  """ASVD's sensitivity table (Yuan et al. 2023, Sec. 3.3): ``{(path, level): score}``,
  the model scored (``score(params)``: a calibration perplexity) with only that kernel
  cut to the fraction ``level`` of its parameters (a prefix of its factors ``f``).
  Independent of the budget: one table serves every :func:`sensitivity_ranks` call.

  Resumable: entries in ``known`` (a partial table) are not scored again, and
  ``on_kernel(table)`` is called after each kernel (to save the table so far)."""
  table = dict(known or {})
  for path, x in _bar(_lowrank_items(f), "sensitivity", progress):
    todo = [lv for lv in levels if (path, lv) not in table]
    for lv in todo:
      w = _host_dense(x, ranks.ratio(lv, min_rank=1).plain(x.layout))
      table[path, lv] = float(score(replace(params, {path: w})))
    if todo and on_kernel is not None:
      on_kernel(table)
  return table


def _lowrank_items(f: Factors):
  return [(p, x) for p, x in flatten(f.tree).items() if is_lowrank(x)]


def sensitivity_ranks(table: Mapping[tuple[str, float], float], f: Factors,
                      keep: float) -> dict[str, int]:
  """ASVD's sensitivity-based truncation rank search (STRS) on a :func:`sensitivity`
  table: one threshold on the score, binary-searched, gives each kernel the smallest
  level whose score is under it (none: it stays dense), the lowest threshold whose total
  keeps a fraction ``keep`` of the kernels' parameters."""
  lows = dict(_lowrank_items(f))
  levels = sorted({lv for _, lv in table})
  sizes = {p: x.layout.size for p, x in lows.items()}
  target = keep * sum(sizes.values())

  def pick(threshold):
    out = {}
    for p in lows:
      ok = [lv for lv in levels if table[p, lv] <= threshold]
      out[p] = min(ok) if ok else 1.0
    return out

  def cost(choice):
    return sum(c * sizes[p] for p, c in choice.items())

  scores = sorted(set(table.values()))
  lo, hi = 0, len(scores) - 1
  while lo < hi:  # the lowest threshold (least damage) whose choice fits; the cost falls
    mid = (lo + hi) // 2  # as the threshold rises (each kernel accepts smaller levels)
    if cost(pick(scores[mid])) <= target:
      hi = mid
    else:
      lo = mid + 1
  choice = pick(scores[lo])
  if cost(choice) > target:
    choice = {p: min(levels) for p in lows}
  kept = cost(choice) / sum(sizes.values())
  if kept < keep - 0.02:  # one threshold for all: cutting one kernel cuts all that score less
    warnings.warn(
        f"sensitivity_ranks: kept {kept:.1%} of the kernels' parameters for a target of "
        f"{keep:.1%}: with levels {levels} no threshold lands nearer (one threshold for "
        "every kernel: the cut that makes the budget fit also cuts every kernel scoring "
        "below it); use finer levels", stacklevel=2)
  return {p: ranks.ratio(c, min_rank=1).plain(lows[p].layout) if c < 1.0
          else lows[p].layout.max_rank for p, c in choice.items()}


# ----------------------------------------------------------------------------- factorize


def compress(f: Factors, rank: Mapping[str, int]):
  """The model with each kernel of ``rank`` cut to that rank of ``f``'s factorization
  (its optimal truncation), re-split into balanced factors ``u = P' S'^1/2``, ``v = S'^1/2
  Q'^T`` of the truncated kernel itself (well conditioned for gradient steps, no ``m x
  n`` product formed). A kernel whose factors would hold at least its own parameters
  (``r (m + n) >= m n``: at or past break-even) comes back as its exact dense kernel (the
  full-rank product, not the rank-``r`` truncation: the same parameters, no error), and
  kernels not in ``rank`` dense as they were."""
  def one(path, x):
    if not is_lowrank(x):
      return x
    r = rank.get(path)
    if r is None:
      return _host_dense(x)
    if r > x.rank:
      raise ValueError(f"{path}: rank {r} is above the kernel's full rank {x.rank}")
    if x.layout.factor_size(r) >= x.layout.size:  # the break-even test jlr.plan applies
      return _host_dense(x)
    # the SVD of u v from QRs of both factors and the r x r core (jlr.svd.of_product), on
    # the host: searches try hundreds of rank patterns, and XLA would compile every shape
    u = np.asarray(x.u, np.float64)[..., :r]  # sliced and cast on the host: a jax slice or
    v = np.asarray(x.v, np.float64)[..., :r, :]  # cast compiles once per new rank
    qu, ru = np.linalg.qr(u)
    qv, rv = np.linalg.qr(np.swapaxes(v, -1, -2))
    p, s, wt = np.linalg.svd(ru @ np.swapaxes(rv, -1, -2))
    root = np.sqrt(s)
    dtype = np.dtype(x.dtype)  # device_put: jnp.asarray compiles a transfer per new shape
    return LowRank(jax.device_put(((qu @ p) * root[..., None, :]).astype(dtype)),
                   jax.device_put((root[..., :, None] * (wt @ np.swapaxes(qv, -1, -2))).astype(dtype)),
                   x.layout)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(f.tree, is_leaf=is_lowrank)
  return jax.tree_util.tree_unflatten(
      treedef, _host_map(lambda kx: one(path_str(kx[0]), kx[1]), leaves))


def _host_map(fn: Callable, items: Sequence) -> list:
  """``[fn(x) for x in items]`` on a pool of host threads, one per core: numpy's LAPACK
  and BLAS calls release the GIL, so kernels are cut side by side (each one's result is
  the serial call's, bit for bit)."""
  if len(items) < 2:
    return [fn(x) for x in items]
  from concurrent.futures import ThreadPoolExecutor
  with ThreadPoolExecutor(min(len(items), os.cpu_count() or 1)) as pool:
    return list(pool.map(fn, items))


def factorize(params, cal: Calibration, keep: float, *, method: str = "svd_llm",
              by: str = "uniform", strength: float = 1.0, alpha: float = 0.5, select=None,
              min_rank: int = 8):
  """The recipe's factorize step in one call: :func:`factors` (``method``'s weighted SVD
  of every calibrated kernel), :func:`allocate` (``keep`` of their parameters, ``by``
  ``"uniform"`` or ``"loss"`` at ``strength``) and :func:`compress` (balanced factors).
  ``compress(factors(...), ranks)`` is the same without another SVD per rank pattern, for
  searches (:func:`choose_strength`, :func:`sensitivity`). Uniform by default: the
  loss allocation only models the LM loss, so choose its strength on held-out text."""
  f = factors(params, cal, method, alpha=alpha, select=select)
  return compress(f, allocate(f.spectra, keep, by=by, strength=strength, min_rank=min_rank))


def merged(params):
  """:func:`jlr.merge` on the host (numpy): every ``LowRank`` as its dense kernel, without
  an XLA compile per new factor shape. Scoring a merged tree reuses one compiled forward
  for every rank pattern a search tries."""
  leaves, treedef = jax.tree_util.tree_flatten(params, is_leaf=is_lowrank)
  return jax.tree_util.tree_unflatten(
      treedef, _host_map(lambda x: _host_dense(x) if is_lowrank(x) else x, leaves))


def search_alpha(score: Callable[[Any], float], params, cal: Calibration,
                 rank: Mapping[str, int], alphas: Sequence[float] = (0.25, 0.5, 0.75, 1.0)
                 ) -> tuple[Factors, dict[float, float]]:
  """ASVD's alpha, chosen by ``score`` (a calibration perplexity) of the compressed model
  at ``rank``: ``(the best alpha's Factors, {alpha: score})``."""
  best, scores = None, {}
  for a in alphas:
    f = factors(params, cal, "asvd", alpha=a)
    scores[a] = float(score(compress(f, rank)))
    if best is None or scores[a] < scores[best.alpha]:
      best = f
  return best, scores


# ----------------------------------------------------------------------------- update / heal


def _only(phase):
  """Gradient filter: ``phase`` 0 keeps the ``u`` of every ``LowRank``, 1 its ``v`` (a traced
  scalar: one compiled step serves both); everything else is zeroed."""
  def one(g):
    if is_lowrank(g):
      return LowRank(g.u * (1 - phase), g.v * phase, g.layout)
    return jnp.zeros_like(g)
  return lambda grads: jax.tree_util.tree_map(one, grads, is_leaf=is_lowrank)


def _factor_grad(loss):
  """``value_and_grad`` of ``loss`` w.r.t. the ``LowRank`` leaves only, zeros elsewhere."""
  return _value_and_grad_of(loss, lambda p, x: is_lowrank(x), rest="zeros")


def _require_factors(params, what: str) -> None:
  """``update`` and ``heal`` train the ``LowRank`` leaves only: a tree without any would
  run every step and come back unchanged."""
  if not any(is_lowrank(x) for x in jax.tree_util.tree_leaves(params, is_leaf=is_lowrank)):
    raise ValueError(f"{what}: params has no jlr.LowRank leaf, so nothing to train (it "
                     "trains the factors only); compress it first (llm.factorize / "
                     "llm.compress)")


def _factors_only(params):
  """``optax.masked``'s mask: True at every ``LowRank`` leaf."""
  return jax.tree_util.tree_map(is_lowrank, params, is_leaf=is_lowrank)


def _windows_batches(windows, batch: int, steps: int, seed: int):
  rng = np.random.default_rng(seed)
  windows = np.asarray(windows)
  for _ in range(steps):
    yield jnp.asarray(windows[rng.choice(len(windows), min(batch, len(windows)), replace=False)])


def update(logits_fn: Callable, params, windows, *, steps: int = 100, lr: float = 1e-4,
           batch: int = 4, seed: int = 0, checkpoint: str | None = None,
           save_every: int = 10, progress: bool = True):
  """SVD-LLM's parameter update with sequential low-rank approximation: Adam on the LM
  loss over calibration ``windows``, first the ``u`` factors with ``v`` frozen for
  ``steps``, then ``v`` with ``u`` frozen for ``steps`` (everything else frozen; Adam
  moments are kept for the factors only).

  ``checkpoint``: a file the state is saved to every ``save_every`` steps and at the end,
  and resumed from by a later call with the same settings, windows and starting tree (a
  file of another call is refused, naming it)."""
  _require_factors(params, "llm.update")
  windows = _token_windows(windows, "llm.update")
  tx, step = _update_step(logits_fn, lr)
  key = _run_fingerprint("update", params, windows,
                         dict(steps=steps, lr=lr, batch=batch, seed=seed))
  state = _resume(checkpoint, key) or {"phase": 0, "step": 0, "params": params, "opt": None}
  for phase, part in enumerate(("u", "v")):
    if phase < state["phase"]:
      continue
    if state["opt"] is None:
      state["opt"] = tx.init(state["params"])  # a fresh Adam for each factor
    batches = list(_windows_batches(windows, batch, steps, seed + phase))
    for i in _bar(range(state["step"], steps), f"update {part}", progress,
                  total=steps - state["step"]):
      p, s, _ = step(state["params"], state["opt"], batches[i], jnp.float32(phase))
      state.update(params=p, opt=s, step=i + 1)
      if (i + 1) % save_every == 0 and i + 1 < steps:
        _save(checkpoint, key, state)
    state.update(phase=phase + 1, step=0, opt=None)
    _save(checkpoint, key, state)
  return state["params"]


@functools.lru_cache(maxsize=8)
def _update_step(logits_fn, lr: float):
  """``(tx, step)`` of :func:`update`, one compiled step per model function and lr."""
  tx = optax.masked(optax.adam(lr), _factors_only)  # the rest gets zero updates (_only)

  @jax.jit
  def step(p, s, w, phase):
    loss, g = _factor_grad(lambda p: token_nll(logits_fn, p, w))(p)
    u, s = tx.update(_only(phase)(g), s, p)
    return optax.apply_updates(p, u), s, loss
  return tx, step


def _run_fingerprint(what: str, params, windows, settings: dict) -> str:
  """What a training checkpoint belongs to: the call, its settings, the bytes of its
  windows and of its starting tree (paths, shapes, dtypes, which leaves are factors, and
  their values: a checkpoint of another model of the same shapes is not resumed)."""
  import hashlib
  h = hashlib.sha256(f"{what}{sorted(settings.items())!r}".encode())
  for w in windows if isinstance(windows, tuple) else (windows,):
    h.update(np.ascontiguousarray(np.asarray(w)).tobytes())
  for kp, x in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_lowrank)[0]:
    for part in (x.u, x.v) if is_lowrank(x) else (x,):
      a = np.asarray(part)
      h.update(f"{path_str(kp)}{a.shape}{a.dtype}{is_lowrank(x)}".encode())
      h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


def _resume(checkpoint: str | None, key: str) -> dict | None:
  """The state saved at ``checkpoint`` if it is this run's (same fingerprint), None if
  there is none; a checkpoint of another run is refused, never resumed from."""
  if not checkpoint or not os.path.exists(checkpoint):
    return None
  with open(checkpoint, "rb") as f:
    state = pickle.load(f)
  saved = state.pop("fingerprint", None)
  if saved is None:
    warnings.warn(f"{checkpoint}: a checkpoint without a fingerprint (written by an older "
                  "jlr); resuming from it unchecked", stacklevel=3)
  elif saved != key:
    raise ValueError(
        f"{checkpoint} holds the state of another run (other settings, windows or starting "
        "parameters); remove it or pass another checkpoint path")
  return state


def _save(checkpoint: str | None, key: str, state: dict) -> None:
  if not checkpoint:
    return
  os.makedirs(os.path.dirname(os.path.abspath(checkpoint)), exist_ok=True)
  with open(checkpoint + ".tmp", "wb") as f:
    pickle.dump({**state, "fingerprint": key}, f)  # leaf by leaf: no copy of the state
  os.replace(checkpoint + ".tmp", checkpoint)


def nll(logits_fn: Callable, params, windows, *, batch: int = 4,
        progress: bool = False) -> np.ndarray:
  """Per-window mean NLL (nats/token) of ``windows`` (``(n, T + 1)``), as a numpy array.
  Every call runs batches of one shape, ``min(batch, n)`` windows (the last one padded
  with repeats, their scores dropped): one compiled forward per window count, not two."""
  windows = _token_windows(windows, "llm.nll")
  per, b = _per_window_fn(logits_fn), min(batch, len(windows))
  out = []
  for i in _bar(range(0, len(windows), b), "eval", progress):
    w = windows[i: i + b]
    pad = np.concatenate([w, np.repeat(w[:1], b - len(w), 0)]) if len(w) < b else w
    out.append(np.asarray(per(params, jax.device_put(pad)))[: len(w)])
  return np.concatenate(out)


@functools.lru_cache(maxsize=32)
def _per_window_fn(logits_fn):
  """One jitted scorer per model function (it retraces per tree structure and shape)."""
  return jax.jit(lambda p, w: _per_window(logits_fn, p, w))


def _per_window(logits_fn, params, w):
  logits = factorized(logits_fn)(params, w[:, :-1])
  lp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
  return -jnp.take_along_axis(lp, w[:, 1:, None], -1)[..., 0].mean(-1)


def perplexity(per_window: np.ndarray, *, bootstrap: int = 1000, seed: int = 0,
               level: float = 0.95) -> dict[str, float]:
  """``exp`` of the mean per-window NLL, with a percentile bootstrap interval over
  windows (``bootstrap`` resamples; windows of equal length weigh equally)."""
  x = np.asarray(per_window, np.float64)
  rng = np.random.default_rng(seed)
  means = x[rng.integers(0, len(x), (bootstrap, len(x)))].mean(-1)
  lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
  return {"ppl": float(np.exp(x.mean())), "low": float(np.exp(lo)), "high": float(np.exp(hi)),
          "windows": int(len(x))}


@dataclasses.dataclass(frozen=True)
class HealLog:
  """What :func:`heal` did: validation NLL at each evaluation ``(step, nll)``, the step
  it kept (lowest validation NLL) and why it stopped."""

  val: list
  best_step: int
  stopped: str


def heal(logits_fn: Callable, params, train, val, *, steps: int = 300, lr: float = 5e-5,
         batch: int = 4, eval_every: int = 25, patience: int = 3, warmup: int = 10,
         weight_decay: float = 0.0, teacher=None, seed: int = 0,
         checkpoint: str | None = None, progress: bool = True):
  """Fine-tune the factors (only ``LowRank`` leaves) on next-token loss over ``train``
  windows -- or, with ``teacher`` (the dense params), on the cross-entropy to the
  teacher's next-token distribution (distillation: every position teaches the whole
  distribution, not one token of a narrow text) -- with AdamW with a linear warm-up and cosine decay to 0 over ``steps``; the
  validation NLL on ``val`` windows every ``eval_every`` steps; stops after ``patience``
  evaluations without improvement and returns the best ``(params, HealLog)`` (step 0,
  the unhealed model, included: healing never returns a worse validation score).
  ``checkpoint``: a file to resume from and save to at each evaluation (a file of a call
  with other settings, windows or starting tree is refused, naming it)."""
  _require_factors(params, "llm.heal")
  train, val = _token_windows(train, "llm.heal (train)"), _token_windows(val, "llm.heal (val)")
  sched = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, warmup), max(steps, warmup + 1))
  tx = optax.chain(optax.clip_by_global_norm(1.0),  # Adam moments for the factors only
                   optax.masked(optax.adamw(sched, weight_decay=weight_decay), _factors_only))

  def loss_fn(p, w, teacher):
    if teacher is None:
      return token_nll(logits_fn, p, w)
    t = jax.nn.softmax(jax.lax.stop_gradient(logits_fn(teacher, w[:, :-1])).astype(jnp.float32))
    lp = jax.nn.log_softmax(factorized(logits_fn)(p, w[:, :-1]).astype(jnp.float32), -1)
    return -(t * lp).sum(-1).mean()

  @jax.jit
  def step(p, s, w, teacher):
    loss, g = _factor_grad(loss_fn)(p, w, teacher)
    u, s = tx.update(g, s, p)  # zero gradients, so zero updates, off the factors
    return optax.apply_updates(p, u), s, loss

  score = lambda p: float(nll(logits_fn, p, val, batch=batch).mean())  # noqa: E731
  key = _run_fingerprint("heal", params, (train, val), dict(
      steps=steps, lr=lr, batch=batch, eval_every=eval_every, patience=patience,
      warmup=warmup, weight_decay=weight_decay, seed=seed, teacher=teacher is not None))
  state = _resume(checkpoint, key)
  if state is None:
    state = {"params": params, "opt": tx.init(params), "step": 0, "val": [(0, score(params))],
             "best": (0, params), "bad": 0}
  batches = list(_windows_batches(train, batch, steps, seed))
  stopped = "steps"
  bar = _bar(range(state["step"], steps), "heal", progress, total=steps - state["step"])
  for i in bar:
    if state["bad"] >= patience:
      break
    p, s, _ = step(state["params"], state["opt"], batches[i], teacher)
    state.update(params=p, opt=s, step=i + 1)
    if (i + 1) % eval_every == 0 or i + 1 == steps:
      v = score(p)
      state["val"].append((i + 1, v))
      if v < min(x for _, x in state["val"][:-1]):
        state.update(best=(i + 1, p), bad=0)
      else:
        state["bad"] += 1
      _save(checkpoint, key, state)
  if state["bad"] >= patience:
    stopped = f"no validation gain in {patience} evaluations"
  best_step, best = state["best"]
  return best, HealLog(list(state["val"]), best_step, stopped)
