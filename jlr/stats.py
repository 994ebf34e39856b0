"""Calibration statistics for data-aware factorization, keyed by leaf path.

``factorize(params, rank, stats={path: Gram(...) | RowWeights(...)})`` minimizes the
data-aware error ``||R (W - W')||_F`` for each listed kernel instead of ``||W - W'||_F``
(see :func:`jlr.svd.whitener`); rank rules then read the whitened spectrum, so
``energy`` and ``budget`` speak of output energy on the calibration data.

* :class:`Gram` -- ``X^T X`` of a layer's inputs (rows of the matricized kernel),
  collected for any JAX function of a params tree by :func:`activations` (and for linen
  models by :func:`jlr.flax.calibrate.activations`, the same pass).
* :class:`RowWeights` -- FWSVD's per-row Fisher weights, from :func:`fisher`.

Statistics are accumulated on the host in float64.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from jlr import usage
from jlr.factorized import COLUMNS, DensifiedWarning, Recorder, factorized, recording
from jlr.layouts import Layout
from jlr.lowrank import LowRank, is_lowrank
from jlr.paths import path_str
from jlr.select import candidates, layout_for


class MissingStatisticsWarning(UserWarning):
  """A kernel that should have calibration statistics has none (named with the reason)."""


@dataclasses.dataclass(frozen=True)
class Gram:
  """``matrix = sum_i x_i x_i^T`` over ``count`` input rows ``x_i`` (length ``m``).

  ``side="cols"``: the inputs met the kernel's columns (``y = x W^T``, a tied LM head
  reading the embedding), so ``x_i`` has the length ``n`` of a column and the data-aware
  factorization whitens ``W^T`` (:func:`jlr.factorize`)."""

  matrix: np.ndarray
  count: int
  side: str = "rows"

  def __add__(self, other: "Gram") -> "Gram":
    _same_side(self, other)
    return Gram(self.matrix + other.matrix, self.count + other.count, self.side)


def _same_side(a, b) -> None:
  if a.side != b.side:
    raise ValueError(f"cannot add statistics of a kernel's {a.side} to those of its {b.side}")


@dataclasses.dataclass(frozen=True)
class Magnitudes:
  """``sums = sum_i |x_i|`` (elementwise, length ``m``) over ``count`` input rows: ASVD's
  per-channel activation magnitude ``mean |x| = sums / count`` (Yuan et al. 2023)."""

  sums: np.ndarray
  count: int
  side: str = "rows"  # as Gram's

  @property
  def mean(self) -> np.ndarray:
    return self.sums / max(self.count, 1)

  def __add__(self, other: "Magnitudes") -> "Magnitudes":
    _same_side(self, other)
    return Magnitudes(self.sums + other.sums, self.count + other.count, self.side)


@dataclasses.dataclass(frozen=True)
class RowWeights:
  """FWSVD row importance ``w_i = sum_j E[(dL/dW_ij)^2]`` (length ``m``); ``side="cols"``:
  weights of the columns instead (as :class:`Gram`'s)."""

  weights: np.ndarray
  count: int
  side: str = "rows"

  def __add__(self, other: "RowWeights") -> "RowWeights":
    _same_side(self, other)
    return RowWeights(self.weights + other.weights, self.count + other.count, self.side)


def fisher(grad_fn: Callable[[Any, Any], Any], params, batches: Iterable, *, layout=None,
           select=None) -> dict[str, RowWeights]:
  """Empirical Fisher row weights of the selected kernels (FWSVD, Hsu et al. 2022).

  ``grad_fn(params, batch)`` returns gradients shaped like ``params`` (jit it; use small
  batches -- the per-batch gradient is the unit of the estimate). For each kernel the
  squared gradient is matricized with its layout and summed over columns.
  """

  chosen = candidates(select, layout)
  acc: dict[str, RowWeights] = {}
  for batch in batches:
    grads = jax.device_get(grad_fn(params, batch))
    for kp, g in jax.tree_util.tree_flatten_with_path(grads, is_leaf=is_lowrank)[0]:
      path = path_str(kp)
      if is_lowrank(g) or not chosen(path, g):
        continue
      lay, _ = layout_for(layout, path, g)
      sq = np.asarray(lay.to_matrix(np.asarray(g, np.float64) ** 2))
      w = sq.sum(-1)  # (stacked..., m)
      acc[path] = acc[path] + RowWeights(w, 1) if path in acc else RowWeights(w, 1)
  return acc


# ----------------------------------------------------------------------------- calibration


class Statistics(dict):
  """``{path: Gram}`` from :func:`activations`, with ``missing = {path: reason}`` for
  every kernel the pass was asked for but could not record (an embedding that is only
  looked up, a kernel used inside control flow without a factorized rule). A kernel met
  only on its column side (a tied LM head's embedding) has a ``Gram(side="cols")``."""

  def __init__(self, grams=(), missing=None):
    super().__init__(grams)
    self.missing = dict(missing or {})


def recording_standin(leaf, layout: Layout) -> LowRank:
  """A dense kernel as exact factors with an identity on the smaller side (``I @ W`` or
  ``W @ I``): the interpreter then meets every contraction / conv of the kernel as a
  factored one and can record its input, while computing the same product."""
  mat = layout.to_matrix(jnp.asarray(leaf))
  m, n = layout.matrix_shape
  batch = mat.shape[:-2]
  if m <= n:
    return LowRank(jnp.broadcast_to(jnp.eye(m, dtype=mat.dtype), batch + (m, m)), mat, layout)
  return LowRank(mat, jnp.broadcast_to(jnp.eye(n, dtype=mat.dtype), batch + (n, n)), layout)


def _row_weights(mask):
  """``weights(path, lead)`` for a :class:`jlr.factorized.Recorder`: ``mask`` (per-row
  weights for the leading axes of every layer input) broadcast to ``lead``."""
  if mask is None:
    return None
  w = jnp.asarray(mask, jnp.float32)

  def weights(path, lead):
    if tuple(w.shape) == tuple(lead[:w.ndim]):
      return w.reshape(w.shape + (1,) * (len(lead) - w.ndim))
    if w.size == math.prod(lead):  # the model flattened (batch, seq) into one axis
      return w.reshape(lead)
    raise ValueError(f"{path}: mask of shape {w.shape} does not match the leading axes "
                     f"{tuple(lead)} of the layer input")

  return weights


def _args(batch):
  return batch if isinstance(batch, tuple) else (batch,)


def read_layouts(fn, params, args) -> "usage.ModelLayouts":
  """Layouts of every kernel of ``params`` as ``fn(params, *args)`` uses them (what a
  calibration pass records against), ``LowRank`` leaves read as the dense kernels they
  stand for."""
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if is_lowrank(x) else x,
                        params, is_leaf=is_lowrank)
  return usage.read(fn, shapes, *args)


def _targets(params, layout, select):
  """``(tree for the pass, recorded paths)``: dense kernels with a layout become
  recording stand-ins (:func:`recording_standin`); ``LowRank`` leaves are recorded as they are."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_lowrank)
  out, paths = [], []
  for kp, leaf in flat:
    path = path_str(kp)
    chosen = select is None or select(path)
    if is_lowrank(leaf) and chosen:
      paths.append(path)
    elif chosen and layout.lookup(path) is not None:
      paths.append(path)
      leaf = recording_standin(leaf, layout.lookup(path))
    out.append(leaf)
  return jax.tree_util.tree_unflatten(treedef, out), paths


def record(fn: Callable, params, batch, *, mode: str = "gram", mask=None, select=None,
           layout=None, columns: bool = False) -> tuple[dict, dict]:
  """One calibration pass: ``({path: record}, {path: why missing})`` for the kernels of
  ``params`` as ``fn(params, *batch)`` uses them (see :func:`activations`). ``mode``:
  ``"gram"`` -> ``(X^T W X, sum w)``; ``"abs"`` -> ``(sum w |X|, sum w)``; ``"rows"`` -> ``(X, w)`` (each ``(*stacked, tokens,
  m)`` / ``(*stacked, tokens)``). Jit it; ``params`` may hold ``LowRank`` leaves. With
  ``columns``, the inputs a kernel met on its column side are returned too, under
  ``path + jlr.factorized.COLUMNS``; without, such a kernel is ``missing`` unless it
  also met inputs on its rows."""
  args = _args(batch)
  if layout is None:
    layout = read_layouts(fn, params, args)
  tree, paths = _targets(params, layout, select)
  rec = Recorder(paths, mode, _row_weights(mask))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DensifiedWarning)  # densified uses land in rec.missing
    with recording(rec):
      factorized(fn)(tree, *args)
  missing = dict(rec.missing)
  for path in paths:
    if path not in rec.records and path not in missing:
      missing[path] = (TRANSPOSED_USE if path + COLUMNS in rec.records else
                       "no contraction or conv consumed it in this call (an embedding "
                       "that is only looked up has no input statistics)")
  if columns:
    return rec.records, missing
  return {p: r for p, r in rec.records.items() if not p.endswith(COLUMNS)}, missing


TRANSPOSED_USE = "contracted over its columns (x @ W^T, a tied LM head)"


def activations(fn: Callable, params, batches: Iterable, *, mask: Callable | None = None,
                select: Callable[[str], bool] | None = None, layout=None,
                mode: str = "gram") -> Statistics:
  """``{kernel path: Gram}`` of the real inputs of every kernel of ``params`` as
  ``fn(params, *batch)`` uses them (``fn(params, batch)`` for a non-tuple batch), summed
  over ``batches`` in float64 on the host.

  The pass runs ``fn`` under :func:`jlr.factorized` and records, at every
  ``dot_general`` or convolution that meets a kernel, the operand it is contracted with
  -- flattened in the kernel's row order (the rows of its layout's matrix; im2col
  patches for a conv) -- whatever the model code does around it (keyword calls, custom
  modules, ``nn.scan`` / ``nnx.scan`` stacks: one Gram per stacked layer, shape
  ``(*stacked, m, m)``). A kernel met only on its columns (``h @ E^T``, a tied LM head)
  gets the Gram of those inputs with ``side="cols"``; one met on both sides keeps its
  row Gram and a :class:`MissingStatisticsWarning` names the column use it leaves out.
  Layouts are read from ``fn`` (:func:`jlr.usage.read`) unless
  given as ``layout=`` (a :class:`jlr.ModelLayouts`). ``LowRank`` leaves run factorized
  and are recorded too: the statistics of a partly compressed model's inputs (SVD-LLM's
  sequential calibration).

  ``mask(batch)`` -> per-row weights broadcast against the leading (non-contracted) axes
  of every input, e.g. a ``(batch, seq)`` attention mask (padding rows count for
  nothing; ``Gram.count`` is the number of real rows). ``select(path) -> bool``
  restricts the kernels. A kernel with a layout that could not be recorded is in
  ``.missing`` with the reason, and a :class:`MissingStatisticsWarning` names it unless
  it is only looked up (embeddings). ``mode="abs"`` collects :class:`Magnitudes`
  (per input channel ``sum |x|``, ASVD's statistic) instead of Grams.
  """
  if mode not in ("gram", "abs"):
    raise ValueError(f"mode must be 'gram' or 'abs', got {mode!r}")
  kind = Gram if mode == "gram" else Magnitudes
  batches = iter(batches)
  first = next(batches, None)
  if first is None:
    raise ValueError("activations needs at least one batch")
  if layout is None:
    layout = read_layouts(fn, params, _args(first))
  info: dict = {}

  @jax.jit
  def grams(params, batch):
    records, info["missing"] = record(fn, params, batch, mask=None if mask is None else mask(batch),
                                      select=select, layout=layout, mode=mode, columns=True)
    return records

  out: dict[str, Gram] = {}
  for batch in (first, *batches):
    for key, (g, c) in jax.device_get(grams(params, batch)).items():
      gram = kind(np.asarray(g, np.float64), int(round(float(np.max(c)))),
                  "cols" if key.endswith(COLUMNS) else "rows")
      out[key] = out[key] + gram if key in out else gram
  both = []  # used on both sides: the row statistics stand, the column uses are named
  for key in [k for k in out if k.endswith(COLUMNS)]:
    path, cols = key[: -len(COLUMNS)], out.pop(key)
    if path in out:
      both.append(path)
    else:
      out[path] = cols
  if both:
    warnings.warn("statistics of " + ", ".join(both) + " cover the inputs of their rows "
                  f"only: they are also {TRANSPOSED_USE}, whose inputs are not in them",
                  MissingStatisticsWarning, stacklevel=2)
  missing = {p: why for p, why in info["missing"].items() if p not in out}
  loud = {p: why for p, why in missing.items() if "only looked up" not in why
          or layout.lookup(p) is None or not layout.lookup(p).spec.lookup}
  if loud:
    warnings.warn("no calibration statistics for " + "; ".join(
        f"{p} ({why})" for p, why in loud.items()), MissingStatisticsWarning, stacklevel=2)
  return Statistics(out, missing)
