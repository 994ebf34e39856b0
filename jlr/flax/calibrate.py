"""Input statistics of a linen model's kernels for data-aware factorization
(``jlr.factorize(..., stats=...)``): :func:`jlr.stats.activations` on ``model.apply``.

The pass runs the model under the interpreter (:func:`jlr.factorized`) and records, at
every ``dot_general`` or convolution that meets a kernel, the real operand it is
contracted with -- whatever the model code does around it: keyword calls
(``nn.Dense(8)(inputs=x)``), subclasses with their own ``__call__``, custom modules,
attention projections, ``nn.scan`` stacks (one Gram per layer). Rows are in the order of
the kernel's matrix rows (the contracted axes; im2col patches in ``(*window, cin)``
order for a conv, of the input the conv really sees, padding included), so whitening
applies to every layout alike. Kernels that cannot be recorded are listed in the
result's ``.missing`` and named by a :class:`jlr.stats.MissingStatisticsWarning`.

* ``mask=`` gives per-row weights (1 = a real token, 0 = padding) broadcast against the
  non-contracted axes of each input, so padded positions do not enter ``X^T X``.
* ``select=`` restricts the statistics to some kernel paths (cheaper, and the only way
  to collect them one layer at a time).
* ``variables`` may hold :class:`jlr.LowRank` kernels: the model then runs factorized
  and the statistics are those of the *compressed* model's inputs -- the sequential
  calibration of SVD-LLM / GPTQ.

:func:`cross` collects, in one pass, the statistics of a compressed model's inputs ``X'``
and of the reference model's inputs ``X`` at the same layer: ``X'^T X'`` and
``X'^T X``, which :func:`jlr.svd.regression` turns into the kernel that maps the
compressed model's inputs onto the reference layer's outputs.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jlr import stats as stats_lib
from jlr.stats import Gram


def _fn(model: nn.Module, apply_kwargs: dict) -> Callable:
  return lambda variables, *args: model.apply(variables, *args, **apply_kwargs)


def activations(model: nn.Module, variables, batches: Iterable[Any], *,
                mask: Callable[[Any], Any] | None = None,
                select: Callable[[str], bool] | None = None, **apply_kwargs
                ) -> stats_lib.Statistics:
  """``{kernel path: Gram}`` over ``batches``; each batch is passed as ``model.apply(
  variables, *batch)`` if it is a tuple, else ``model.apply(variables, batch)``.

  ``mask(batch)`` -> per-row weights for the leading axes of every layer input (for a
  transformer, the ``(batch, seq)`` attention mask: padding rows then count for
  nothing; ``Gram.count`` is the number of real rows). ``select(path)`` -> whether to
  collect ``path`` (default: every kernel a contraction or conv uses). See
  :func:`jlr.stats.activations`.
  """
  return stats_lib.activations(_fn(model, apply_kwargs), variables, batches, mask=mask,
                               select=select)


def cross(model: nn.Module, variables, reference, batches: Iterable[Any], *,
          mask: Callable[[Any], Any] | None = None,
          select: Callable[[str], bool] | None = None, **apply_kwargs
          ) -> dict[str, tuple[Gram, Gram]]:
  """``{kernel path: (X'^T X', X'^T X)}``: ``X'`` the inputs of the layer in the model
  with ``variables`` (typically partly factorized), ``X`` its inputs in the model with
  ``reference`` (the original), on the same batches, padding rows masked as in
  :func:`activations`. Keep ``select`` narrow: the inputs are held in memory per batch.
  The jitted pass is cached on ``(model, select, mask)``: reuse those objects across
  calls to avoid recompiling.
  """
  both = _cross_fn(model, select, mask, tuple(sorted(apply_kwargs.items())))
  out: dict[str, tuple[Gram, Gram]] = {}
  for batch in batches:
    for path, (g, c, n) in jax.device_get(both(variables, reference, batch)).items():
      n = int(round(float(np.max(n))))
      pair = (Gram(np.asarray(g, np.float64), n), Gram(np.asarray(c, np.float64), n))
      out[path] = (out[path][0] + pair[0], out[path][1] + pair[1]) if path in out else pair
  return out


@functools.lru_cache(maxsize=16)
def _cross_fn(model, select, mask, apply_items):
  """The jitted pass of :func:`cross`, cached so that repeated calls with the same
  ``select`` and ``mask`` objects (one layer at a time) compile once per shape."""
  fn = _fn(model, dict(apply_items))

  @jax.jit
  def both(variables, reference, batch):
    w = None if mask is None else mask(batch)
    mine, _ = stats_lib.record(fn, variables, batch, mode="rows", mask=w, select=select)
    ref, _ = stats_lib.record(fn, reference, batch, mode="rows", mask=w, select=select)
    out = {}
    for path, (xs, wt) in mine.items():
      if path not in ref:
        continue
      xr = ref[path][0]
      xw = xs * wt[..., None]
      out[path] = (jnp.swapaxes(xw, -1, -2) @ xs, jnp.swapaxes(xw, -1, -2) @ xr,
                   jnp.sum(wt, -1))
    return out

  return both
