"""Calibration statistics for data-aware factorization, keyed by leaf path.

``factorize(params, rank, stats={path: Gram(...) | RowWeights(...)})`` minimizes the
data-aware error ``||R (W - W')||_F`` for each listed kernel instead of ``||W - W'||_F``
(see :func:`jlr.svd.whitener`); rank rules then read the whitened spectrum, so
``energy`` and ``budget`` speak of output energy on the calibration data.

* :class:`Gram` -- ``X^T X`` of a layer's inputs (rows of the matricized kernel),
  collected for linen models by :func:`jlr.flax.calibrate.activations`.
* :class:`RowWeights` -- FWSVD's per-row Fisher weights, from :func:`fisher`.

Statistics are accumulated on the host in float64.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable

import jax
import numpy as np

from jlr.lowrank import is_lowrank
from jlr.paths import path_str


@dataclasses.dataclass(frozen=True)
class Gram:
  """``matrix = sum_i x_i x_i^T`` over ``count`` input rows ``x_i`` (length ``m``)."""

  matrix: np.ndarray
  count: int

  def __add__(self, other: "Gram") -> "Gram":
    return Gram(self.matrix + other.matrix, self.count + other.count)


@dataclasses.dataclass(frozen=True)
class RowWeights:
  """FWSVD row importance ``w_i = sum_j E[(dL/dW_ij)^2]`` (length ``m``)."""

  weights: np.ndarray
  count: int

  def __add__(self, other: "RowWeights") -> "RowWeights":
    return RowWeights(self.weights + other.weights, self.count + other.count)


def fisher(grad_fn: Callable[[Any, Any], Any], params, batches: Iterable, *, layout=None,
           select=None) -> dict[str, RowWeights]:
  """Empirical Fisher row weights of the selected kernels (FWSVD, Hsu et al. 2022).

  ``grad_fn(params, batch)`` returns gradients shaped like ``params`` (jit it; use small
  batches -- the per-batch gradient is the unit of the estimate). For each kernel the
  squared gradient is matricized with its layout and summed over columns.
  """
  from jlr.transforms import _layout_for, candidates  # no import cycle

  chosen = candidates(select, layout)
  acc: dict[str, RowWeights] = {}
  for batch in batches:
    grads = jax.device_get(grad_fn(params, batch))
    for kp, g in jax.tree_util.tree_flatten_with_path(grads, is_leaf=is_lowrank)[0]:
      path = path_str(kp)
      if is_lowrank(g) or not chosen(path, g):
        continue
      lay, _ = _layout_for(layout, path, g)
      sq = np.asarray(lay.to_matrix(np.asarray(g, np.float64) ** 2))
      w = sq.sum(-1)  # (stacked..., m)
      acc[path] = acc[path] + RowWeights(w, 1) if path in acc else RowWeights(w, 1)
  return acc
