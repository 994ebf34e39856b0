"""Pure transforms on parameter pytrees: ``plan``, ``factorize``, ``merge``, ``truncate``.

They work on any pytree -- linen variables, ``nnx.state(model)``, plain dicts -- and never
mutate their input: every call returns a new tree.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Any, Mapping, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from jlr import ops
from jlr import ranks as ranks_lib
from jlr import select as select_lib
from jlr import svd as svd_lib
from jlr.layouts import Layout
from jlr.lowrank import LowRank, from_svd, is_lowrank
from jlr.paths import first_match, matches
from jlr.select import LayoutArg, SelectArg, candidates, is_array, layout_for
from jlr.sharding import follow
from jlr.stats import Gram, MissingStatisticsWarning, RowWeights
from jlr.usage import ModelLayouts

PyTree = Any
"""Any pytree of parameters: linen variables, ``nnx.state(model)``, plain dicts."""

Stats = Mapping[str, Union[Gram, RowWeights]]
"""Calibration statistics by leaf path (see :mod:`jlr.stats`)."""


@dataclasses.dataclass(frozen=True)
class Entry:
  """One leaf of a :class:`Plan`: where it is, how it is matricized, which rank, and the
  data-aware recipe (``stats``: its :class:`jlr.stats.Gram` / ``RowWeights`` or None;
  ``damping``) that chose the rank, so ``factorize(params, plan)`` applies exactly it."""

  path: str
  layout: Layout
  batch_shape: tuple[int, ...]
  rank: int
  rule: str
  stats: Any = dataclasses.field(default=None, compare=False, repr=False)
  damping: float = 1e-2


class Plan(dict):
  """``{path: Entry}``, the resolved ranks of a factorization, before it is applied.

  Pass it to :func:`factorize` to apply it, or to :func:`jlr.summary` to see its cost.
  """


# ----------------------------------------------------------------------------- helpers


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def warn_guessed(paths: Sequence[str]) -> None:
  """Warn that the layouts of kernels with more than two axes were guessed from shapes."""
  if paths:
    warnings.warn(
        f"guessing the layout of {len(paths)} kernel(s) with more than two axes from their "
        f"shapes ({', '.join(paths[:4])}{', ...' if len(paths) > 4 else ''}); a guess cannot "
        "know how the model contracts them (stacked nn.scan layers, einsums). Read them from "
        "the model: layout=jlr.flax.layouts(model, variables, *example_args) (or "
        "jlr.usage.read(fn, params, *args)), or pass layout= explicitly.",
        GuessedLayoutWarning, stacklevel=3)


class GuessedLayoutWarning(UserWarning):
  """A kernel with more than two axes was matricized by a shape guess."""


def _rule_for(rank, path: str, leaf):
  """The rule for one leaf, or None when a per-path ``rank`` leaves it out."""
  if isinstance(rank, Mapping):
    r = first_match(rank, path)
  elif callable(rank) and not isinstance(rank, ranks_lib.Rule):
    r = rank(path, leaf)
  else:
    r = rank
  return None if r is None else ranks_lib.as_rule(r)


def _check_dtype(path: str, leaf) -> None:
  if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
    raise ValueError(f"{path}: cannot factorize a leaf of dtype {jnp.result_type(leaf)}; need floats")


@jax.jit
def _finite_flags(xs):
  return jnp.stack([jnp.isfinite(x).all() for x in xs])


def _on_host(x) -> bool:
  """Whether ``x`` is a numpy array or a JAX array held whole in host memory (the CPU
  backend), so numpy reads it in place."""
  if isinstance(x, np.ndarray):
    return True
  try:
    return x.is_fully_addressable and all(d.platform == "cpu" for d in x.devices())
  except AttributeError:
    return False


def _check_finite(leaves: list[tuple[str, Any]]) -> None:
  """Raise naming the first ``(path, kernel)`` whose (concrete) kernel holds NaN or Inf.
  Kernels in host memory are read in place by numpy (no program to compile); the others
  get one compiled reduction over every kernel, read back in one host transfer: a sync per
  leaf stalled the dispatch of the factorization itself, and one eager reduction per
  kernel costs more dispatch than one program."""
  concrete = [(p, x) for p, x in leaves if _is_concrete(x)]
  if not concrete:
    return
  if all(_on_host(x) for _, x in concrete):
    ok = [bool(np.isfinite(np.asarray(x)).all()) for _, x in concrete]
  else:
    ok = np.asarray(_finite_flags(tuple(x for _, x in concrete)))
  for (p, _), good in zip(concrete, ok):
    if not good:
      raise ValueError(f"{p}: kernel contains NaN or Inf; refusing to factorize it")


def _check_rank(path: str, layout: Layout, rank: int) -> None:
  m, n = layout.matrix_shape
  if not 1 <= rank <= layout.max_rank:
    raise ValueError(
        f"{path}: rank {rank} is out of range [1, {layout.max_rank}] for its "
        f"{m}x{n} matrix ({layout.kind} kernel of shape {layout.shape})")


def _resolve(items, what: str, lenient: bool = False) -> list[int | None]:
  """``items = [(path, layout, rule, spectrum_thunk)]`` -> ranks; budgets pooled by rule.

  Out-of-range ranks raise, except that with ``lenient`` a rank above a leaf's full rank
  (which could never save parameters) gives ``None``: leave that leaf dense.
  """
  spectra = {}
  for i, (path, layout, rule, spectrum) in enumerate(items):
    if rule.needs_spectrum:
      s = spectrum()
      if not _is_concrete(s):
        raise ValueError(
            f"{path}: rule {rule.describe()!r} reads singular values, which are not "
            f"concrete under jit; {what} with ranks.fixed or ranks.ratio inside jit")
      spectra[i] = np.asarray(s)
  out = [0] * len(items)
  pools: dict[ranks_lib.Rule, list[int]] = {}
  for i, (path, layout, rule, _) in enumerate(items):
    if rule.is_global:
      pools.setdefault(rule, []).append(i)
    else:
      out[i] = rule.resolve(layout, spectra.get(i))
  for rule, idx in pools.items():
    for i, r in zip(idx, rule.allocate([(items[i][0], items[i][1], spectra[i]) for i in idx])):
      out[i] = r
  for i, ((path, layout, _, _), r) in enumerate(zip(items, out)):
    if lenient and r > layout.max_rank:
      out[i] = None
      continue
    _check_rank(path, layout, r)
  return out


def _whitening(stats, path: str, layout: Layout, batch: tuple[int, ...], damping: float):
  """``(R, R^{-1}, transposed)`` for a leaf with calibration statistics, else ``(None,
  None, False)``. ``transposed``: the statistics are of the kernel's columns
  (``side="cols"``), so ``R`` whitens the rows of the matrix's transpose."""
  st = None if stats is None else stats.get(path)
  if st is None:
    return None, None, False
  side = getattr(st, "side", "rows")
  if side not in ("rows", "cols"):
    raise ValueError(f"{path}: statistics side must be 'rows' or 'cols', got {side!r}")
  m = layout.matrix_shape[0 if side == "rows" else 1]
  if isinstance(st, Gram):
    arr, want = np.asarray(st.matrix), batch + (m, m)
    r = svd_lib.whitener(gram=arr, damping=damping) if arr.shape == want else None
  elif isinstance(st, RowWeights):
    arr, want = np.asarray(st.weights), batch + (m,)
    r = svd_lib.whitener(row_weights=arr, damping=damping) if arr.shape == want else None
  else:
    raise TypeError(f"{path}: stats must be jlr.stats.Gram or RowWeights, got {type(st).__name__}")
  if r is None:
    raise ValueError(
        f"{path}: calibration statistics of shape {arr.shape} do not fit this kernel's "
        f"{layout.kind} matrix with {m} {'rows' if side == 'rows' else 'columns'} (expected "
        f"{want}); the {side} of the matrix must be where the layer's inputs meet it")
  if not bool(np.isfinite(arr).all()):
    raise ValueError(f"{path}: calibration statistics contain NaN or Inf")
  return (*r, side == "cols")


def _oriented(mat, transposed: bool):
  """The matrix whose rows the statistics weigh: ``mat`` or its transpose."""
  return jnp.swapaxes(mat, -1, -2) if transposed else mat


# ----------------------------------------------------------------------------- plan


def plan(params: PyTree, rank: ranks_lib.RankArg, *, select: SelectArg = None,
         layout: LayoutArg = None, stats: Stats | None = None,
         damping: float = 1e-2) -> Plan:
  """Resolve which leaves get factorized, with which layout and rank.

  Args:
    params: any pytree of arrays (``LowRank`` leaves are left alone).
    rank: an int, a :mod:`jlr.ranks` rule, a mapping ``{path pattern: rule}`` (leaves
      matching no pattern stay dense), or a callable ``(path, leaf) -> rule | None``.
    select: which leaves to consider: a callable ``(path, leaf) -> bool``, a path
      pattern or a list of them. Default: float ``kernel``/``embedding`` leaves with
      >= 2 axes, kept only where the resolved rank saves parameters
      (``r (m + n) < m n``). An explicit ``select`` is obeyed even past break-even,
      except by a global :class:`jlr.ranks.budget`, which charges such a leaf its dense
      size: it stays dense.
    layout: matricization: ``None`` (infer, see :func:`jlr.layouts.infer`), a kind
      such as ``"conv_spatial"``, a :class:`jlr.layouts.Spec`, a mapping
      ``{path pattern: kind | Spec}`` or a callable ``(path, leaf) -> kind | Spec``.
    stats: ``{path: jlr.stats.Gram | jlr.stats.RowWeights}`` for data-aware
      factorization; rank rules then read the whitened spectrum of ``R W``.
    damping: relative damping of the statistics (see :func:`jlr.svd.whitener`).

  Returns:
    A :class:`Plan` ``{path: Entry}`` in tree order.
  """
  chosen = candidates(select, layout)
  items, meta, seen, guessed, checked = [], [], [], [], []
  for path, leaf in select_lib.leaves(params)[0]:
    if is_lowrank(leaf) or not is_array(leaf) or not chosen(path, leaf):
      continue
    seen.append(path)
    rule = _rule_for(rank, path, leaf)
    if rule is None:
      continue
    lay, b = layout_for(layout, path, leaf)
    if layout is None and jnp.ndim(leaf) > 2:
      guessed.append(path)
    if lay.max_rank == 0 or 0 in jnp.shape(leaf):
      if select is None:
        continue  # nothing to factorize
      raise ValueError(f"{path}: cannot factorize an empty kernel of shape {jnp.shape(leaf)}")
    _check_dtype(path, leaf)
    checked.append((path, leaf))
    r_w, _, tr = _whitening(stats, path, lay, tuple(jnp.shape(leaf))[:b], damping)

    def spectrum(leaf=leaf, lay=lay, r_w=r_w, tr=tr):
      mat = _oriented(lay.to_matrix(leaf), tr)
      return svd_lib.svdvals(mat if r_w is None else svd_lib.whiten(r_w, mat.astype(jnp.float32)))

    items.append((path, lay, rule, spectrum))
    meta.append((lay, tuple(jnp.shape(leaf))[:b], rule))
  _check_finite(checked)
  warn_guessed(guessed)
  for name, arg in (("rank", rank), ("layout", layout)):
    if isinstance(arg, Mapping) and not isinstance(arg, ModelLayouts):
      for pattern in arg:
        if not any(matches(pattern, path) for path in seen):
          raise ValueError(
              f"{name} pattern {pattern!r} matches no selected leaf (patterns match whole "
              f"path components, e.g. 'Conv_0' or 'Conv_\\d+'); selected: {seen[:6]}")
  # One global rank for the default selection: leaves it cannot shrink stay dense.
  # A rank the user aimed at a leaf (select, a per-path mapping or callable) must fit.
  lenient = select is None and isinstance(rank, (int, ranks_lib.Rule))
  result = Plan()
  for (path, *_), (lay, batch, rule), r in zip(items, meta, _resolve(items, "factorize", lenient)):
    if r is None or ((select is None or rule.is_global) and lay.factor_size(r) >= lay.size):
      continue  # break-even: factorizing would not save parameters (a budget charged it dense)
    desc = rule.describe()
    if isinstance(rule, ranks_lib.ratio) and r > rule.plain(lay):
      desc += f" (raised to min rank {r})"
    st = None if stats is None else stats.get(path)
    result[path] = Entry(path, lay, batch, r, desc, st, damping)
  if stats is not None:
    _warn_missing_stats([p for p, e in result.items() if e.stats is None], stats)
  return result


def _warn_missing_stats(paths, stats) -> None:
  if not paths:
    return
  why = getattr(stats, "missing", {})
  warnings.warn(
      "no calibration statistics for selected kernel(s) "
      + ", ".join(f"{p} ({why[p]})" if p in why else p for p in paths)
      + ": they get a plain SVD. Leave them out (select=) or collect their statistics.",
      MissingStatisticsWarning, stacklevel=3)


# ----------------------------------------------------------------------------- factorize


def _compiled(**jit_kwargs):
  """``jax.jit(fn, **jit_kwargs)`` under :func:`jlr.ops.compiler_options` of the backend it
  runs on (one compiled function per backend). On CPU that turns XLA's YNNPACK library
  fusions off: MiniLM's kernel groups factorize a little faster without them, or level.
  Under an outer jit the caller's options apply."""
  def wrap(fn):
    nested, by_backend = jax.jit(fn, **jit_kwargs), {}

    @functools.wraps(fn)
    def call(*args, **kwargs):
      if not all(map(_is_concrete, jax.tree_util.tree_leaves((args, kwargs)))):
        return nested(*args, **kwargs)  # options are only for a top-level jit
      backend = jax.default_backend()
      if backend not in by_backend:
        by_backend[backend] = jax.jit(fn, compiler_options=ops.compiler_options(backend),
                                      **jit_kwargs)
      return by_backend[backend](*args, **kwargs)
    return call
  return wrap


@_compiled(static_argnames=("layout", "rank", "method", "split", "oversample", "n_iter",
                            "nested", "transposed"))
def _factor(w, key, r_w, r_inv, *, layout, rank, method, split, oversample, n_iter,
            nested=False, transposed=False):
  mat = layout.to_matrix(w)
  if r_w is not None:
    u, s, vt = svd_lib.weighted(_oriented(mat, transposed), rank, r_w, r_inv, nested=nested)
    if transposed:  # W^T ~ u s vt  =>  W ~ vt^T s u^T (nested: every prefix still optimal)
      u, vt = _oriented(vt, True), _oriented(u, True)
  else:
    kw = dict(oversample=oversample, n_iter=n_iter) if method == "randomized" else {}
    u, s, vt = svd_lib.truncated(mat, rank, method=method, key=key, **kw)
  return from_svd(u, s, vt, layout, split=split, dtype=w.dtype)


def _spans_cpu_devices(x) -> bool:
  """Whether ``x`` may run on several CPU devices at once: placed over more than one, or
  traced (placement unknown) in a process with several. jaxlib 0.10's batched CPU LAPACK
  kernels block a pool thread per call until their pieces finish; with every simulated
  device of a sharded program in one (the 8-device mesh of ``benchmarks/scaling.py``:
  eight batched ``getrf`` waiting, every thread blocked) they deadlock, which chaining
  (:func:`jlr.svd.sequenced`) cannot order. Such kernels are factorized one per call,
  unbatched (the same result: batched == per-leaf)."""
  if jax.default_backend() != "cpu" or jax.device_count() == 1:
    return False
  if not _is_concrete(x):
    return True
  sharding = getattr(x, "sharding", None)
  return sharding is not None and len(sharding.device_set) > 1


_STACK_BYTES = 1 << 28  # stacked same-shape kernels per batched call: at most 256 MiB


@_compiled(static_argnames=("layout", "rank", "method", "split", "oversample", "n_iter"))
def _factor_stack(ws, key, idx, *, layout, rank, method, split, oversample, n_iter):
  """:func:`_factor` of every kernel in the tuple ``ws`` as one program: stacked, batched,
  and handed back as one ``(u, v)`` per kernel. Leaf ``ws[j]`` of a randomized call uses
  ``fold_in(key, idx[j])`` (the per-leaf key of the loop), so the result equals the
  per-leaf one. Stacking, key derivation and unstacking happen inside the program: no
  per-leaf dispatches (36 MiniLM kernels: ~110 eager ``fold_in`` and slicing ops)."""
  mats = layout.to_matrix(jnp.stack(ws))
  if method == "randomized":
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(idx)
    # batched, not vmapped: the small SVD's choice of route is one lax.cond per group
    u, s, vt = svd_lib.randomized(mats, rank, keys, oversample=oversample, n_iter=n_iter)
  else:
    u, s, vt = svd_lib.truncated(mats, rank, method=method)
  f = from_svd(u, s, vt, layout, split=split, dtype=ws[0].dtype)
  return [(f.u[j], f.v[j]) for j in range(len(ws))]


def factorize(params: PyTree, rank: ranks_lib.RankArg | Plan | None = None, *,
              select: SelectArg = None, layout: LayoutArg = None, method: str = "svd",
              key: jax.Array | None = None, split: str = "balanced", oversample: int = 10,
              n_iter: int = 2, stats: Stats | None = None, damping: float = 1e-2,
              nested: bool = False) -> PyTree:
  """Replace selected kernels by their best rank-``r`` :class:`LowRank` factors.

  ``W ~ u v`` with ``u v`` the truncated SVD of the matricized kernel (Eckart-Young:
  optimal in Frobenius and spectral norm for ``method="svd"``; Halko-Martinsson-Tropp
  randomized range finder with ``oversample`` extra columns and ``n_iter`` power
  iterations for ``method="randomized"``, which needs ``key``). The SVD runs in
  float32; factors come back in each leaf's dtype.

  Args:
    params: any pytree. Not mutated.
    rank: see :func:`plan`; or a :class:`Plan` returned by it.
    select, layout: see :func:`plan` (ignored when ``rank`` is a Plan).
    method: ``"svd"`` (exact) or ``"randomized"``.
    key: PRNG key for ``method="randomized"``; each leaf uses ``fold_in(key, i)``.
    split: how singular values are folded into the factors (``"balanced"``:
      ``sqrt(s)`` on each side; ``"left"``; ``"right"``).
    stats, damping: data-aware factorization (see :func:`plan` and :mod:`jlr.stats`):
      listed kernels minimize ``||R (W - W')||_F`` -- activation-whitened (SVD-LLM) for
      a ``Gram``, Fisher-weighted (FWSVD) for ``RowWeights`` -- with an exact SVD; with
      ``side="cols"`` statistics, ``||R (W - W')^T||_F`` (a tied LM head's embedding).
    nested: with ``stats``, keep the data-aware components themselves (``u = R^-1 P
      S^1/2``, ``v = S^1/2 V^T`` with ``R W = P S V^T``) instead of the SVD of the
      result: ``u`` is not orthonormal, but every rank prefix of the factors is then the
      data-aware optimum at that rank, so one full-rank factorization serves every
      rank (``u[:, :k] @ v[:k]``). The default SVD form is better conditioned for
      training; at full rank it is the plain SVD of the kernel. No effect without stats.

  Returns:
    A new tree with a ``LowRank`` wherever a kernel was factorized.
  """
  if method not in svd_lib.METHODS:
    raise ValueError(f"method must be one of {svd_lib.METHODS}, got {method!r}")
  if method == "randomized" and key is None:
    raise ValueError("method='randomized' needs a PRNG key: pass key=jax.random.key(0)")
  if rank is None:
    raise TypeError("factorize needs a rank: an int, a jlr.ranks rule, a mapping or a Plan")
  if isinstance(rank, Plan) and stats is not None:
    raise ValueError("factorize(params, plan, stats=...): a plan carries the statistics it "
                     "was made with (jlr.plan(params, rank, stats=...)); pass them there")
  the_plan = rank if isinstance(rank, Plan) else plan(
      params, rank, select=select, layout=layout, stats=stats, damping=damping)
  if key is not None and not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.wrap_key_data(key)  # a raw uint32 key: the same stream, typed (one
    # set of compiled programs for either kind of key)
  leaves, treedef = select_lib.leaves(params)
  out = [leaf for _, leaf in leaves]
  opts = dict(method=method, split=split, oversample=oversample, n_iter=n_iter)
  prev = None  # under an outer jit, each call waits for the last one's (svd.sequenced)
  groups: dict[tuple, list[int]] = {}
  for i, (path, leaf) in enumerate(leaves):
    entry = the_plan.get(path)
    if entry is None or is_lowrank(leaf):
      continue
    r_w, r_inv, tr = _whitening({path: entry.stats}, path, entry.layout, entry.batch_shape,
                                entry.damping)
    if r_w is not None:  # data-aware: its own whitener, its own call
      out[i] = prev = _factor(svd_lib.sequenced(leaf, prev), None, r_w, r_inv,
                              layout=entry.layout, rank=entry.rank, nested=nested,
                              transposed=tr, **opts)
      continue
    group = (entry.layout, entry.rank, tuple(jnp.shape(leaf)), jnp.result_type(leaf))
    if _spans_cpu_devices(leaf):
      group += (i,)  # a call of its own, unbatched (see _spans_cpu_devices)
    groups.setdefault(group, []).append(i)
  for (lay, r, shape, dtype, *_), idx in groups.items():
    # same-shape kernels go through one compiled, batched call (few dispatches, one
    # compile per shape), in chunks that bound the stacked copy's memory
    per = max(1, _STACK_BYTES // max(1, math.prod(shape) * jnp.dtype(dtype).itemsize))
    for start in range(0, len(idx), per):
      chunk = idx[start: start + per]
      if len(chunk) == 1:
        i = chunk[0]
        k = None if key is None else jax.random.fold_in(key, i)
        out[i] = prev = _factor(svd_lib.sequenced(leaves[i][1], prev), k, None, None,
                                layout=lay, rank=r, **opts)
        continue
      ws = svd_lib.sequenced(tuple(leaves[i][1] for i in chunk), prev)
      uvs = prev = _factor_stack(ws, key, None if key is None else np.asarray(chunk, np.int32),
                                 layout=lay, rank=r, **opts)
      for (u, v), i in zip(uvs, chunk):
        out[i] = LowRank(u, v, lay)
  return follow(jax.tree_util.tree_unflatten(treedef, out), params)


# ----------------------------------------------------------------------------- merge / truncate


def merge(params: PyTree) -> PyTree:
  """Every :class:`LowRank` back to a dense kernel of its original shape and dtype."""
  merged = jax.tree_util.tree_map(
      lambda x: x.dense().astype(x.dtype) if is_lowrank(x) else x, params, is_leaf=is_lowrank)
  return follow(merged, params)


@functools.partial(jax.jit, static_argnames=("rank", "split"))
def _retruncate(f: LowRank, *, rank, split):
  p, s, qt = svd_lib.of_product(f.u, f.v)
  return from_svd(p[..., :rank], s[..., :rank], qt[..., :rank, :], f.layout, split=split,
                  dtype=f.dtype)


def truncate(params: PyTree, rank: ranks_lib.RankArg, *, split: str = "balanced") -> PyTree:
  """Re-rank every :class:`LowRank` leaf optimally.

  The factors are re-orthogonalized first (QR of ``u`` and ``v^T``, SVD of the small
  core; see :func:`jlr.svd.of_product`), so the result is the best rank-``r``
  approximation of ``u v`` -- not a slice of the old factors -- and no ``m x n``
  matrix is formed. ``rank`` takes the same forms as in :func:`plan`; a mapping or
  callable that gives ``None`` leaves a leaf as it is. Ranks cannot grow.
  """
  leaves, treedef = select_lib.leaves(params)
  items, where = [], []
  for i, (path, leaf) in enumerate(leaves):
    if not is_lowrank(leaf):
      continue
    leaf.check(path)
    rule = _rule_for(rank, path, leaf)
    if rule is None:
      continue
    items.append((path, leaf.layout, rule, lambda leaf=leaf: svd_lib.of_product(leaf.u, leaf.v)[1]))
    where.append(i)
  out = [x for _, x in leaves]
  prev = None  # under an outer jit, each re-truncation waits for the last (svd.sequenced)
  for (path, *_), i, r in zip(items, where, _resolve(items, "truncate")):
    f = out[i]
    if r > f.rank:
      raise ValueError(f"{path}: cannot truncate a rank-{f.rank} LowRank to rank {r}")
    out[i] = prev = _retruncate(svd_lib.sequenced(f, prev), rank=r, split=split)
  return follow(jax.tree_util.tree_unflatten(treedef, out), params)
