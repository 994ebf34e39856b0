"""Sharding rules for params trees with :class:`jlr.LowRank` leaves, on JAX's own engine
(``jax.sharding.Mesh`` / ``NamedSharding``; multi-host through ``jax.distributed``).

A dense kernel is sharded by a pair of mesh axes ``(in_axis, out_axis)`` on its first
and last kernel axes. Its factors follow it: ``u (..., m, r)`` is sharded like the input
dimension, ``v (..., r, n)`` like the output dimension, and the rank axis is replicated,
so ``x @ u`` and ``(x @ u) @ v`` need no gather of a factor along ``r``. Presets:

* ``"fsdp"`` -- ``("data", None)``: parameters sharded over the data-parallel axis.
* ``"tp"`` -- ``(None, "model")``: tensor parallel over the output features.
* ``"fsdp_tp"`` -- ``("data", "model")``.

A mesh axis that does not divide a dimension is dropped for that dimension (the
dimension is replicated) rather than failing. Biases, norms and other leaves are
replicated. Batches shard their leading axis on ``"data"``.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jlr.lowrank import LowRank, is_lowrank
from jlr.paths import leaf_name, path_str
from jlr.select import KERNEL_NAMES

PRESETS = {"fsdp": ("data", None), "tp": (None, "model"), "fsdp_tp": ("data", "model")}


def _fits(mesh: Mesh, axis, size: int):
  if axis is None or axis not in mesh.shape:
    return None
  return axis if size % mesh.shape[axis] == 0 else None


def _kernel_axes(style) -> tuple:
  if isinstance(style, str):
    if style not in PRESETS:
      raise ValueError(f"style must be one of {sorted(PRESETS)} or an (in_axis, out_axis) pair")
    return PRESETS[style]
  in_axis, out_axis = style
  return in_axis, out_axis


def kernel_spec(mesh: Mesh, shape: Sequence[int], style="fsdp", batch_ndim: int = 0) -> P:
  """PartitionSpec of a dense kernel: first kernel axis on ``in_axis``, last on ``out_axis``."""
  in_axis, out_axis = _kernel_axes(style)
  spec = [None] * len(shape)
  spec[batch_ndim] = _fits(mesh, in_axis, shape[batch_ndim])
  if len(shape) - 1 > batch_ndim:
    spec[-1] = _fits(mesh, out_axis, shape[-1]) if out_axis != spec[batch_ndim] else None
  return P(*spec)


def lowrank_specs(mesh: Mesh, f: LowRank, style="fsdp") -> tuple[P, P]:
  """``(u_spec, v_spec)``: ``u`` rows like the input axis, ``v`` columns like the output."""
  in_axis, out_axis = _kernel_axes(style)
  b = len(f.batch_shape)
  m, n = f.layout.matrix_shape
  row = _fits(mesh, in_axis, m)
  col = _fits(mesh, out_axis, n) if out_axis != row else None
  return P(*([None] * b), row, None), P(*([None] * b), None, col)


def specs(params, mesh: Mesh, style="fsdp"):
  """A tree of ``NamedSharding`` for ``params`` (``LowRank`` leaves get a ``LowRank`` of
  shardings, so the result can be passed to ``jax.device_put`` or ``jax.jit``)."""
  def one(kp, x):
    if is_lowrank(x):
      su, sv = lowrank_specs(mesh, x, style)
      return LowRank(NamedSharding(mesh, su), NamedSharding(mesh, sv), x.layout)
    shape = np.shape(x)
    if leaf_name(path_str(kp)) in KERNEL_NAMES and len(shape) >= 2:
      return NamedSharding(mesh, kernel_spec(mesh, shape, style))
    return NamedSharding(mesh, P())
  return jax.tree_util.tree_map_with_path(one, params, is_leaf=is_lowrank)


def place(params, mesh: Mesh, style="fsdp"):
  """``jax.device_put(params, specs(params, mesh, style))``."""
  return jax.device_put(params, specs(params, mesh, style))


def batch_sharding(mesh: Mesh, axis: str = "data") -> NamedSharding:
  """Shard a batch's leading axis over ``axis``; everything else replicated."""
  return NamedSharding(mesh, P(axis))


def make_mesh(spec: str | dict[str, int]) -> Mesh:
  """``"data=4,model=2"`` (or ``{"data": 4, "model": 2}``) -> a ``Mesh`` over the first
  ``prod`` devices (``jax.devices()``, i.e. all hosts after ``jax.distributed``)."""
  if isinstance(spec, str):
    try:
      spec = {k.strip(): int(v) for k, v in (part.split("=") for part in spec.split(","))}
    except ValueError:
      raise ValueError(f"cannot parse mesh {spec!r}; expected e.g. 'data=4,model=2'") from None
  need = int(np.prod(list(spec.values())))
  devices = jax.devices()
  if need > len(devices):
    raise ValueError(f"mesh {spec} needs {need} devices, {len(devices)} available")
  return Mesh(np.array(devices[:need]).reshape(tuple(spec.values())), tuple(spec))


def follow(new, old):
  """Place the outputs of a transform like its inputs, where those carry a
  ``NamedSharding``: factors of a factorized kernel follow its (in, out) axes, re-ranked
  factors keep their own, a merged kernel takes (u rows, v columns). Other leaves are
  returned as they are (transforms leave them untouched)."""
  def one(n, o):
    if not is_lowrank(n):
      if is_lowrank(o) and isinstance(getattr(o.u, "sharding", None), NamedSharding) \
          and not isinstance(n, jax.core.Tracer) and np.ndim(n) >= 2:
        su, sv = o.u.sharding, o.v.sharding
        row = (tuple(su.spec) + (None,) * o.u.ndim)[o.u.ndim - 2]
        col = (tuple(sv.spec) + (None,) * o.v.ndim)[o.v.ndim - 1]
        spec = kernel_spec(su.mesh, np.shape(n), (row, col), len(o.batch_shape))
        return jax.device_put(n, NamedSharding(su.mesh, spec))
      return n
    if is_lowrank(o):
      su, sv = getattr(o.u, "sharding", None), getattr(o.v, "sharding", None)
      if isinstance(su, NamedSharding) and isinstance(sv, NamedSharding) and \
          not isinstance(n.u, jax.core.Tracer):
        ru = _fit_spec(su, n.u.shape)
        rv = _fit_spec(sv, n.v.shape)
        return LowRank(jax.device_put(n.u, ru), jax.device_put(n.v, rv), n.layout)
      return n
    s = getattr(o, "sharding", None)
    if not isinstance(s, NamedSharding) or isinstance(o, jax.core.Tracer) or \
        isinstance(n.u, jax.core.Tracer):
      return n
    spec = tuple(s.spec) + (None,) * (np.ndim(o) - len(s.spec))
    b = len(n.batch_shape)
    in_axis, out_axis = spec[b], spec[-1]
    su, sv = lowrank_specs(s.mesh, n, (in_axis, out_axis))
    return LowRank(jax.device_put(n.u, NamedSharding(s.mesh, su)),
                   jax.device_put(n.v, NamedSharding(s.mesh, sv)), n.layout)
  return jax.tree_util.tree_map(one, new, old, is_leaf=is_lowrank)


def _fit_spec(s: NamedSharding, shape) -> NamedSharding:
  spec = list(tuple(s.spec) + (None,) * (len(shape) - len(s.spec)))
  spec = [a if a is None or _fits(s.mesh, a, d) else None for a, d in zip(spec, shape)]
  return NamedSharding(s.mesh, P(*spec))
