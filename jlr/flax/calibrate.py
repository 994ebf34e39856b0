"""Collect the input statistics of linen Dense / DenseGeneral layers for data-aware
factorization (``jlr.factorize(..., stats=...)``).

``activations(model, variables, batches)`` runs the model on each batch with an
interceptor that sows ``X^T X`` of every Dense/DenseGeneral input (contracted axes
flattened in kernel order, so rows match the kernel's matrix), sums over batches on the
host in float64 and returns ``{"params/<module path>/kernel": jlr.stats.Gram}``.
"""

from __future__ import annotations

from typing import Any, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jlr.stats import Gram

COLLECTION = "jlr_calibration"


def _interceptor(next_fun, args, kwargs, context):
  module = context.module
  if context.method_name == "__call__" and isinstance(module, (nn.Dense, nn.DenseGeneral)) and args:
    x = args[0]
    if isinstance(module, nn.Dense):
      axis = (x.ndim - 1,)
    else:
      ax = (module.axis,) if isinstance(module.axis, int) else tuple(module.axis)
      axis = tuple(sorted(a % x.ndim for a in ax))
    rows = jnp.moveaxis(x, axis, tuple(range(x.ndim - len(axis), x.ndim)))
    rows = rows.reshape(-1, int(np.prod([x.shape[a] for a in axis]))).astype(jnp.float32)
    add = lambda a, b: a + b  # noqa: E731
    module.sow(COLLECTION, "gram", rows.T @ rows, reduce_fn=add, init_fn=lambda: 0)
    module.sow(COLLECTION, "count", jnp.asarray(rows.shape[0]), reduce_fn=add, init_fn=lambda: 0)
  return next_fun(*args, **kwargs)


def activations(model: nn.Module, variables, batches: Iterable[Any], **apply_kwargs
                ) -> dict[str, Gram]:
  """``{kernel path: Gram}`` over ``batches``; each batch is passed as ``model.apply(
  variables, *batch)`` if it is a tuple, else ``model.apply(variables, batch)``."""

  @jax.jit
  def grams(variables, batch):
    args = batch if isinstance(batch, tuple) else (batch,)
    with nn.intercept_methods(_interceptor):
      _, sown = model.apply(variables, *args, mutable=[COLLECTION], **apply_kwargs)
    return sown[COLLECTION]

  out: dict[str, Gram] = {}
  for batch in batches:
    sown = jax.device_get(grams(variables, batch))
    flat = jax.tree_util.tree_flatten_with_path(sown)[0]
    by_module: dict[str, dict] = {}
    for kp, val in flat:
      keys = [str(getattr(k, "key", k)) for k in kp]
      by_module.setdefault("/".join(keys[:-1]), {})[keys[-1]] = val
    for module_path, d in by_module.items():
      g = Gram(np.asarray(d["gram"], np.float64), int(d["count"]))
      path = f"params/{module_path}/kernel"
      out[path] = out[path] + g if path in out else g
  return out
