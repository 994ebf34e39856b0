"""A compression recipe for language models: calibrate -> allocate -> factorize -> update
-> heal, for any JAX LM given as ``logits_fn(params, ids) -> logits`` (a linen
``model.apply``, an NNX split, a Hugging Face Flax ``model(ids, params=p).logits``).

    fn = lambda p, ids: model.apply(p, ids)[0]
    cal = jlr.llm.calibrate(fn, params, calib_windows, select=is_projection)
    small = jlr.llm.compress(params, cal, remove=0.4, method="svd_llm")
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
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jlr import ranks, stats as stats_lib, svd as svd_lib
from jlr.factorized import factorized
from jlr.lowrank import LowRank, is_lowrank
from jlr.paths import flatten, replace
from jlr.select import layout_for, selector
from jlr.transforms import factorize

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
  logits = factorized(logits_fn)(params, windows[:, :-1])
  lp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
  return -jnp.take_along_axis(lp, windows[:, 1:, None], -1)[..., 0].mean()


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
              progress: bool = True) -> Calibration:
  """Input statistics of the selected kernels on ``windows`` (``(n, T + 1)`` tokens), in
  ``batch``-window passes: Grams (SVD-LLM), per-channel mean ``|x|`` (ASVD, with
  ``magnitudes``) and, with ``fisher=k``, the empirical Fisher of the LM loss on the
  first ``k`` windows one at a time (FWSVD)."""
  windows = np.asarray(windows)
  chunks = [jnp.asarray(windows[i: i + batch, :-1]) for i in range(0, len(windows), batch)]
  fn = lambda p, x: logits_fn(p, x)  # noqa: E731
  flat = flatten(params)
  chosen = None if select is None else selector(select)
  sel = None if select is None else (lambda p: p in flat and chosen(p, flat[p]))
  grams = stats_lib.activations(fn, params, _bar(chunks, "grams", progress), select=sel)
  layout = stats_lib._read_layouts(fn, params, (chunks[0],))
  mags = stats_lib.activations(fn, params, _bar(chunks, "|x|", progress), select=sel,
                               mode="abs") if magnitudes else None
  fish = None
  if fisher:
    grad = jax.jit(jax.grad(lambda p, w: token_nll(logits_fn, p, w)))
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
    return {p: stats_lib.RowWeights(np.maximum(m.mean, 1e-12) ** (2 * alpha), m.count)
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


def spectra(params, cal: Calibration, method: str, *, alpha: float = 0.5
            ) -> dict[str, tuple[Any, np.ndarray]]:
  """``{path: (layout, s)}``: the singular values of each calibrated kernel in its
  method's weighting (``R W``), whose squared tail is the truncation loss."""
  st = stats_for(cal, method, alpha=alpha)
  paths = cal.grams.keys() if cal.grams is not None else cal.magnitudes.keys()
  flat = flatten(params)
  out = {}
  for path in paths:
    w = flat[path]
    lay, _ = layout_for(cal.layout, path, w)
    mat = jnp.asarray(lay.to_matrix(jnp.asarray(w)), jnp.float32)
    if st is not None:
      s = st[path]
      r, _ = (svd_lib.whitener(gram=s.matrix, damping=DAMPING[method])
              if isinstance(s, stats_lib.Gram)
              else svd_lib.whitener(row_weights=s.weights, damping=DAMPING[method]))
      mat = r @ mat
    out[path] = (lay, np.asarray(svd_lib.svdvals(mat), np.float64))
  return out


def allocate(spec: Mapping[str, tuple[Any, np.ndarray]], keep: float, *, by: str = "loss",
             group: Callable[[str], Any] = kind, min_rank: int = 8) -> dict[str, int]:
  """Ranks keeping a fraction ``keep`` of the kernels' parameters: ``"uniform"`` (each
  kernel ``ratio(keep)``) or ``"loss"`` (the truncation-loss budget per kind, see the
  module docstring). Both count factors ``r (m + n)`` and cap ranks at break-even."""
  if by == "uniform":
    rule = ranks.ratio(keep, min_rank=min_rank)
    return {p: min(rule.resolve(lay, None), lay.size // sum(lay.matrix_shape))
            for p, (lay, _) in spec.items()}
  if by != "loss":
    raise ValueError(f"by must be one of {ALLOCATIONS}, got {by!r}")
  items = [(p, lay, s) for p, (lay, s) in spec.items()]
  rule = ranks.budget(keep, normalize=True, group=group, min_rank=min_rank)
  return dict(zip(spec, rule.allocate(items)))


def sensitivity_ranks(score: Callable[[Any], float], params, full, keep: float, *,
                      levels: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
                      progress: bool = True) -> dict[str, int]:
  """ASVD's sensitivity-based truncation rank search (STRS, Yuan et al. 2023, Sec. 3.3):
  each kernel alone is cut to each fraction ``levels`` of its parameters (a prefix of
  its nested full-rank factors ``full``) and the model scored (``score(params)``: a
  calibration perplexity); then one threshold on that score, binary-searched, gives each
  kernel the smallest level whose score is under it, so the total keeps ``keep``."""
  flat = flatten(full)
  lows = {p: f for p, f in flat.items() if is_lowrank(f)}
  table = {}
  for path, f in _bar(list(lows.items()), "rank search", progress):
    m, n = f.layout.matrix_shape
    for lv in levels:
      r = max(1, math.floor(lv * m * n / (m + n)))
      w = f.layout.from_matrix(f.u[..., :r] @ f.v[..., :r, :]).astype(f.dtype)
      table[path, lv] = float(score(replace(params, {path: w})))
  sizes = {p: f.layout.size for p, f in lows.items()}
  target = keep * sum(sizes.values())

  def pick(threshold):
    out = {}
    for p, f in lows.items():
      ok = [lv for lv in levels if table[p, lv] <= threshold]
      out[p] = min(ok) if ok else 1.0
    return out

  def cost(choice):
    return sum(c * sizes[p] for p, c in choice.items())

  scores = sorted(set(table.values()))
  lo, hi = 0, len(scores) - 1
  while lo < hi:  # the largest threshold whose choice fits
    mid = (lo + hi + 1) // 2
    if cost(pick(scores[mid])) <= target:
      lo = mid
    else:
      hi = mid - 1
  choice = pick(scores[lo])
  if cost(choice) > target:
    choice = {p: min(levels) for p in lows}
  return {p: max(1, math.floor(c * lows[p].layout.size / sum(lows[p].layout.matrix_shape)))
          if c < 1.0 else min(lows[p].layout.matrix_shape) for p, c in choice.items()}


# ----------------------------------------------------------------------------- factorize


def compress(params, cal: Calibration, rank: Mapping[str, int], method: str = "svd_llm", *,
             alpha: float = 0.5):
  """``params`` with each kernel in ``rank`` factorized at that rank by ``method``'s
  weighted SVD (balanced factors ``u = P S^1/2``, ``v = S^1/2 Q^T`` of ``W'`` itself, well
  conditioned for gradient steps); a kernel whose rank is past break-even stays dense."""
  st = stats_for(cal, method, alpha=alpha)
  small = factorize(params, lambda p, x: rank.get(p), stats=st, layout=cal.layout,
                    damping=DAMPING[method])

  def dense_if_bigger(x):
    if is_lowrank(x) and x.size >= math.prod(x.shape):
      return x.dense().astype(x.dtype)
    return x
  return jax.tree_util.tree_map(dense_if_bigger, small, is_leaf=is_lowrank)


def search_alpha(score: Callable[[Any], float], params, cal: Calibration,
                 rank: Mapping[str, int], alphas: Sequence[float] = (0.25, 0.5, 0.75, 1.0)
                 ) -> tuple[float, dict[float, float]]:
  """ASVD's alpha, chosen by ``score`` (a calibration perplexity) of the compressed model
  at ``rank``: ``(best alpha, {alpha: score})``."""
  scores = {a: float(score(compress(params, cal, rank, "asvd", alpha=a))) for a in alphas}
  return min(scores, key=scores.get), scores


# ----------------------------------------------------------------------------- update / heal


def _only(part: str):
  """Gradient filter: keep ``u`` (``part="u"``) or ``v`` of every ``LowRank``; zero the rest."""
  def one(g):
    if is_lowrank(g):
      return LowRank(g.u if part == "u" else jnp.zeros_like(g.u),
                     g.v if part == "v" else jnp.zeros_like(g.v), g.layout)
    return jnp.zeros_like(g)
  return lambda grads: jax.tree_util.tree_map(one, grads, is_leaf=is_lowrank)


def _windows_batches(windows, batch: int, steps: int, seed: int):
  rng = np.random.default_rng(seed)
  windows = np.asarray(windows)
  for _ in range(steps):
    yield jnp.asarray(windows[rng.choice(len(windows), min(batch, len(windows)), replace=False)])


def update(logits_fn: Callable, params, windows, *, steps: int = 100, lr: float = 1e-4,
           batch: int = 4, seed: int = 0, progress: bool = True):
  """SVD-LLM's parameter update with sequential low-rank approximation: Adam on the LM
  loss over calibration ``windows``, first the ``u`` factors with ``v`` frozen for
  ``steps``, then ``v`` with ``u`` frozen for ``steps`` (everything else frozen)."""
  for part in ("u", "v"):
    keep = _only(part)
    tx = optax.adam(lr)

    @jax.jit
    def step(p, s, w, keep=keep, tx=tx):
      loss, g = jax.value_and_grad(lambda p: token_nll(logits_fn, p, w))(p)
      u, s = tx.update(keep(g), s, p)
      return optax.apply_updates(p, u), s, loss

    state = tx.init(params)
    for w in _bar(_windows_batches(windows, batch, steps, seed), f"update {part}", progress,
                  total=steps):
      params, state, _ = step(params, state, w)
  return params


def nll(logits_fn: Callable, params, windows, *, batch: int = 4,
        progress: bool = False) -> np.ndarray:
  """Per-window mean NLL (nats/token) of ``windows`` (``(n, T + 1)``), as a numpy array."""
  windows = np.asarray(windows)
  per = _per_window_fn(logits_fn)
  out = [np.asarray(per(params, jnp.asarray(windows[i: i + batch])))
         for i in _bar(range(0, len(windows), batch), "eval", progress)]
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
         weight_decay: float = 0.0, seed: int = 0, checkpoint: str | None = None,
         progress: bool = True):
  """Fine-tune the factors (only ``LowRank`` leaves) on next-token loss over ``train``
  windows: AdamW with a linear warm-up and cosine decay to 0 over ``steps``; the
  validation NLL on ``val`` windows every ``eval_every`` steps; stops after ``patience``
  evaluations without improvement and returns the best ``(params, HealLog)`` (step 0,
  the unhealed model, included: healing never returns a worse validation score).
  ``checkpoint``: a file to resume from and save to at each evaluation."""
  sched = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, warmup), max(steps, warmup + 1))
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=weight_decay))
  keep = lambda g: jax.tree_util.tree_map(  # noqa: E731
      lambda x: x if is_lowrank(x) else jnp.zeros_like(x), g, is_leaf=is_lowrank)

  @jax.jit
  def step(p, s, w):
    loss, g = jax.value_and_grad(lambda p: token_nll(logits_fn, p, w))(p)
    u, s = tx.update(keep(g), s, p)
    u = keep(u)
    return optax.apply_updates(p, u), s, loss

  score = lambda p: float(nll(logits_fn, p, val, batch=batch).mean())  # noqa: E731
  state = {"params": params, "opt": tx.init(params), "step": 0, "val": [(0, score(params))],
           "best": (0, params), "bad": 0}
  if checkpoint and os.path.exists(checkpoint):
    with open(checkpoint, "rb") as f:
      state = pickle.load(f)
  batches = list(_windows_batches(train, batch, steps, seed))
  stopped = "steps"
  bar = _bar(range(state["step"], steps), "heal", progress, total=steps - state["step"])
  for i in bar:
    if state["bad"] >= patience:
      stopped = f"no validation gain in {patience} evaluations"
      break
    p, s, _ = step(state["params"], state["opt"], batches[i])
    state.update(params=p, opt=s, step=i + 1)
    if (i + 1) % eval_every == 0 or i + 1 == steps:
      v = score(p)
      state["val"].append((i + 1, v))
      if v < min(x for _, x in state["val"][:-1]):
        state.update(best=(i + 1, p), bad=0)
      else:
        state["bad"] += 1
      if checkpoint:
        tmp = checkpoint + ".tmp"
        with open(tmp, "wb") as f:
          pickle.dump(jax.device_get(state), f)
        os.replace(tmp, checkpoint)
  if state["bad"] >= patience:
    stopped = f"no validation gain in {patience} evaluations"
  best_step, best = state["best"]
  return best, HealLog(list(state["val"]), best_step, stopped)
