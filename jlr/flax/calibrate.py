"""Collect the input statistics of linen Dense / DenseGeneral / Conv layers for
data-aware factorization (``jlr.factorize(..., stats=...)``).

``activations(model, variables, batches)`` runs the model on each batch with an
interceptor that sows ``X^T X`` of every Dense/DenseGeneral input (contracted axes
flattened in kernel order, so rows match the kernel's matrix), sums over batches on the
host in float64 and returns ``{"params/<module path>/kernel": jlr.stats.Gram}``.
For an ``nn.Conv`` (ungrouped, zero padding) the rows are its im2col patches in the
kernel's ``(*window, cin)`` order -- the rows of the ``conv_channel`` matrix -- so
``conv(x, W) = patches(x) @ W.reshape(-1, cout)`` and whitening applies as for a Dense.

* ``mask=`` gives per-row weights (1 = a real token, 0 = padding) broadcast against the
  non-contracted axes of each input, so padded positions do not enter ``X^T X``.
* ``select=`` restricts the statistics to some kernel paths (cheaper, and the only way
  to collect them one layer at a time).
* ``variables`` may hold :class:`jlr.LowRank` kernels: the model then runs factorized
  (:func:`jlr.flax.apply`) and the statistics are those of the *compressed* model's
  inputs -- the sequential calibration of SVD-LLM / GPTQ.

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

from jlr.stats import Gram

COLLECTION = "jlr_calibration"


def _module_path(module) -> str:
  return "/".join(module.scope.path) if module.scope is not None else ""


def _conv_patches(module: nn.Conv, x):
  """im2col of ``x`` for ``module``: ``(*batch, *out_spatial, prod(window) * cin)`` with
  the last axis in the kernel's ``(*window, cin)`` order."""
  from flax.linen.linear import canonicalize_padding

  window = tuple(module.kernel_size)
  n = len(window)
  as_tuple = lambda v: (1,) * n if v is None else (v,) * n if isinstance(v, int) else tuple(v)  # noqa: E731
  padding = canonicalize_padding(module.padding, n)
  if isinstance(padding, str) and padding not in ("SAME", "VALID"):
    raise ValueError(f"{_module_path(module)}: calibration statistics of a conv with "
                     f"{padding!r} padding are not supported (zero padding only)")
  if module.feature_group_count != 1:
    raise ValueError(f"{_module_path(module)}: a grouped conv (feature_group_count="
                     f"{module.feature_group_count}) has no single input matrix")
  batch = x.shape[: x.ndim - n - 1]
  flat = x.reshape((-1,) + x.shape[-n - 1:])
  spatial = "".join("HWDXYZ"[i] for i in range(n))
  p = jax.lax.conv_general_dilated_patches(
      flat, window, as_tuple(module.strides), padding, lhs_dilation=as_tuple(module.input_dilation),
      rhs_dilation=as_tuple(module.kernel_dilation),
      dimension_numbers=(f"N{spatial}C", f"OI{spatial}", f"N{spatial}C"))
  cin = x.shape[-1]
  out_spatial = p.shape[1:-1]
  p = p.reshape(p.shape[:-1] + (cin,) + window)  # lax orders features (cin, *window)
  p = jnp.moveaxis(p, -n - 1, -1)
  return p.reshape(batch + out_spatial + (-1,))


def _rows(module, x, mask):
  """``(rows, weights)``: the input as a ``(tokens, m)`` matrix in kernel-row order, and
  each row's weight (``mask`` broadcast over the non-contracted axes, or ones)."""
  if isinstance(module, nn.Conv):
    x = _conv_patches(module, x)
    axis = (x.ndim - 1,)
  elif isinstance(module, nn.Dense):
    axis = (x.ndim - 1,)
  else:
    ax = (module.axis,) if isinstance(module.axis, int) else tuple(module.axis)
    axis = tuple(sorted(a % x.ndim for a in ax))
  lead = tuple(a for a in range(x.ndim) if a not in axis)
  rows = jnp.moveaxis(x, axis, tuple(range(x.ndim - len(axis), x.ndim)))
  m = int(np.prod([x.shape[a] for a in axis]))
  rows = rows.reshape(-1, m).astype(jnp.float32)
  if mask is None:
    return rows, jnp.ones((rows.shape[0],), jnp.float32)
  lead_shape = tuple(x.shape[a] for a in lead)
  w = jnp.asarray(mask, jnp.float32)
  if w.ndim > len(lead_shape) or w.shape != lead_shape[: w.ndim]:
    raise ValueError(f"{_module_path(module)}: mask of shape {w.shape} does not match the "
                     f"leading axes {lead_shape} of the layer input {x.shape}")
  w = jnp.broadcast_to(w.reshape(w.shape + (1,) * (len(lead_shape) - w.ndim)), lead_shape)
  return rows, w.reshape(-1)


def _chosen(select, module) -> bool:
  if not isinstance(module, (nn.Dense, nn.DenseGeneral, nn.Conv)):
    return False
  return select is None or select(f"params/{_module_path(module)}/kernel")


def _gram_interceptor(select, mask):
  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name == "__call__" and args and _chosen(select, module):
      rows, w = _rows(module, args[0], mask)
      add = lambda a, b: a + b  # noqa: E731
      module.sow(COLLECTION, "gram", (rows * w[:, None]).T @ rows, reduce_fn=add,
                 init_fn=lambda: 0)
      module.sow(COLLECTION, "count", jnp.sum(w), reduce_fn=add, init_fn=lambda: 0)
    return next_fun(*args, **kwargs)

  return interceptor


def _row_interceptor(select, mask):
  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name == "__call__" and args and _chosen(select, module):
      rows, w = _rows(module, args[0], mask)
      module.sow(COLLECTION, "rows", rows)
      module.sow(COLLECTION, "weights", w)
    return next_fun(*args, **kwargs)

  return interceptor


def _by_module(sown) -> dict[str, dict]:
  out: dict[str, dict] = {}
  for kp, val in jax.tree_util.tree_flatten_with_path(sown)[0]:
    keys = [str(k.key) for k in kp if hasattr(k, "key")]  # sow's tuple index dropped
    out.setdefault("/".join(keys[:-1]), {})[keys[-1]] = val
  return out


def _args(batch):
  return batch if isinstance(batch, tuple) else (batch,)


def _apply(model, variables, args, interceptor, apply_kwargs):
  from jlr.flax.linen import intercept  # LowRank kernels run factorized

  with nn.intercept_methods(interceptor), intercept():  # ours must see the input first
    _, sown = model.apply(variables, *args, mutable=[COLLECTION], **apply_kwargs)
  return sown[COLLECTION]


def activations(model: nn.Module, variables, batches: Iterable[Any], *,
                mask: Callable[[Any], Any] | None = None,
                select: Callable[[str], bool] | None = None, **apply_kwargs
                ) -> dict[str, Gram]:
  """``{kernel path: Gram}`` over ``batches``; each batch is passed as ``model.apply(
  variables, *batch)`` if it is a tuple, else ``model.apply(variables, batch)``.

  ``mask(batch)`` -> per-row weights for the leading axes of every layer input (for a
  transformer, the ``(batch, seq)`` attention mask: padding rows then count for
  nothing; ``Gram.count`` is the number of real rows). ``select(path)`` -> whether to
  collect ``path`` (default: every Dense/DenseGeneral/Conv kernel).
  """

  @jax.jit
  def grams(variables, batch):
    return _apply(model, variables, _args(batch),
                  _gram_interceptor(select, None if mask is None else mask(batch)), apply_kwargs)

  out: dict[str, Gram] = {}
  for batch in batches:
    for module_path, d in _by_module(jax.device_get(grams(variables, batch))).items():
      g = Gram(np.asarray(d["gram"], np.float64), int(round(float(d["count"]))))
      path = f"params/{module_path}/kernel"
      out[path] = out[path] + g if path in out else g
  return out


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
    for module_path, (g, c, n) in jax.device_get(both(variables, reference, batch)).items():
      n = int(round(float(n)))
      pair = (Gram(np.asarray(g, np.float64), n), Gram(np.asarray(c, np.float64), n))
      path = f"params/{module_path}/kernel"
      out[path] = (out[path][0] + pair[0], out[path][1] + pair[1]) if path in out else pair
  return out


@functools.lru_cache(maxsize=16)
def _cross_fn(model, select, mask, apply_items):
  """The jitted pass of :func:`cross`, cached so that repeated calls with the same
  ``select`` and ``mask`` objects (one layer at a time) compile once per shape."""
  apply_kwargs = dict(apply_items)

  @jax.jit
  def both(variables, reference, batch):
    args, w = _args(batch), None if mask is None else mask(batch)
    mine = _by_module(_apply(model, variables, args, _row_interceptor(select, w), apply_kwargs))
    ref = _by_module(_apply(model, reference, args, _row_interceptor(select, w), apply_kwargs))
    out = {}
    for module_path, d in mine.items():
      xs, wt, xr = d["rows"], d["weights"], ref[module_path]["rows"]
      out[module_path] = ((xs * wt[:, None]).T @ xs, (xs * wt[:, None]).T @ xr, jnp.sum(wt))
    return out

  return both
