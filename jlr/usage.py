"""Layouts read from how a function uses its parameters, not guessed from their shapes.

``read(fn, params, *args, **kwargs)`` traces ``fn(params, *args, **kwargs)`` to a jaxpr
(abstractly: nothing is computed) and follows every floating-point leaf of ``params``
with two or more axes through layout ops (transposes, casts, size-1 reshapes, ``jit``,
``remat``, and ``scan``, whose sliced axis marks a stacked-layer axis) to the primitives
that consume it:

* ``dot_general``: rows = the contracted kernel axes, columns = the free ones, stacked =
  scan-sliced axes and ``dot_general`` batch axes (``nn.vmap``/``nnx.vmap`` layers);
* ``conv_general_dilated`` (the kernel operand): rows = spatial + input-channel axes,
  columns = the output channels (``conv_channel``; ``conv="spatial"`` picks TRP's
  spatial-wise split for 2-D convs); grouped/depthwise convolutions are refused;
* ``gather`` (an embedding lookup): rows = the looked-up axes.

A leaf whose uses agree on one (stacked | rows | columns) split gets that exact
:class:`jlr.Layout`; any other leaf is reported in ``skipped`` with the reason (never
used, used by an op with no factorized rule, used in two incompatible ways, a grouped
conv, stacked axes that are not leading) and left dense by every transform given these
layouts.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from jlr import rules
from jlr.layouts import Layout
from jlr.paths import KERNEL_NAMES, leaf_name, path_str

_FACTORIZABLE = {"dot_general", "conv_general_dilated", "gather"}


@dataclasses.dataclass(frozen=True)
class Tracked:
  """A value that is a kernel, re-axed: ``axes[k]`` are the kernel axes merged into
  logical axis ``k``; ``stacked`` the kernel axes sliced away by ``scan``."""

  leaf: int
  axes: tuple[tuple[int, ...], ...]  # logical axis -> the kernel axes merged into it
  stacked: frozenset = frozenset()


@dataclasses.dataclass(frozen=True)
class Use:
  """One consumer of a kernel: ``kind`` in ``dot``, ``conv``, ``gather``, ``other``."""

  kind: str
  rows: frozenset = frozenset()
  cols: frozenset = frozenset()
  stacked: frozenset = frozenset()
  primitive: str = ""
  note: str = ""


class ModelLayouts(Mapping):
  """``{params path: Layout}`` read from a model, with ``skipped = {path: reason}``.

  Pass it as ``layout=`` to :func:`jlr.factorize`, :func:`jlr.plan`, ``jlr.trp`` and
  :func:`jlr.summary`: only its paths are then candidates (unless ``select`` says
  otherwise), so nothing it skipped is factorized, and no shape is guessed. Paths are
  matched exactly or up to a leading ``params/`` component, so the layouts read from
  ``model.apply(variables, ...)`` also apply to ``variables["params"]``.
  """

  def __init__(self, layouts: dict[str, Layout], skipped: dict[str, str],
               uses: dict[str, list[Use]] | None = None,
               shapes: dict[str, tuple[int, ...]] | None = None):
    self._layouts = dict(layouts)
    self.skipped = dict(skipped)
    self.uses = dict(uses or {})
    self.shapes = dict(shapes or {})

  def __getitem__(self, path):
    found = self.lookup(path)
    if found is None:
      why = self.skipped.get(path) or self.skipped.get(f"params/{path}")
      raise KeyError(f"{path}: {why}" if why else path)
    return found

  def __contains__(self, path):
    return self.lookup(path) is not None

  def __iter__(self):
    return iter(self._layouts)

  def __len__(self):
    return len(self._layouts)

  def lookup(self, path: str):
    for p in (path, "params/" + path, path[len("params/"):] if path.startswith("params/") else None):
      if p is not None and p in self._layouts:
        return self._layouts[p]
    return None

  def __call__(self, path: str, leaf=None):
    return self.lookup(path)

  def select(self, path: str, leaf=None) -> bool:
    return self.lookup(path) is not None

  def __repr__(self):
    lines = [f"ModelLayouts({len(self)} kernels, {len(self.skipped)} skipped)"]
    for p, lay in self._layouts.items():
      perm = f" perm={lay.perm}" if lay.perm else ""
      stack = self.shapes.get(p, lay.shape)[: -len(lay.shape)]
      stacked = f", stacked {'x'.join(map(str, stack))}" if stack else ""
      lines.append(f"  {p}: {lay.kind} {'x'.join(map(str, lay.shape))} -> "
                   f"{lay.matrix_shape[0]}x{lay.matrix_shape[1]}{perm}{stacked}")
    for p, why in self.skipped.items():
      lines.append(f"  {p}: dense ({why})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the walk


def _walk(jaxpr, ins, uses: dict[int, list[Use]]):
  env: dict = {}

  def read(v):
    return None if isinstance(v, jcore.Literal) else env.get(v)

  for v, x in zip(jaxpr.invars, ins):
    if x is not None:
      env[v] = x
  for eqn in jaxpr.eqns:
    tin = [read(v) for v in eqn.invars]
    if not any(t is not None for t in tin):
      continue
    outs = _step(eqn, tin, uses)
    for v, t in zip(eqn.outvars, outs):
      if t is not None and not isinstance(v, jcore.DropVar):
        env[v] = t
  return [read(v) for v in jaxpr.outvars]


def record_use(uses: dict, t: Tracked, use: Use) -> None:
  """Note that the kernel ``t`` comes from is consumed as ``use``."""
  uses.setdefault(t.leaf, []).append(use)


def other_use(eqn, tin, uses, note=""):
  """Every tracked input is used by ``eqn`` in a way with no factorized rule."""
  for t in tin:
    if t is not None:
      record_use(uses, t, Use("other", primitive=eqn.primitive.name, note=note))
  return [None] * len(eqn.outvars)


def _flat(axes_groups) -> frozenset:
  return frozenset(a for g in axes_groups for a in g)


def _step(eqn, tin, uses):
  rule = rules.get(eqn.primitive)
  if rule is None or rule.layout is None:
    return other_use(eqn, tin, uses)
  return rule.layout(eqn, tin, uses, lambda jaxpr, ins: _walk(jaxpr, ins, uses))


# ----------------------------------------------------------------------------- layout rules
# (the layout halves of the built-in rules, registered in jlr.primitives)


def layout_scale(eqn, tin, uses, walk):
  """``T * s``, ``s * T``, ``T / s`` for a scalar ``s``: the kernel passes through."""
  if len(tin) == 2:
    k = 0 if tin[0] is not None else 1
    other = eqn.invars[1 - k]
    if tin[1 - k] is None and not other.aval.shape and (eqn.primitive.name == "mul" or k == 0):
      return [tin[k]]
  return other_use(eqn, tin, uses)


def layout_unary(eqn, tin, uses, walk):
  """A unary op that keeps every axis where it is (a cast, a copy, ``neg``, ``rev``)."""
  return [tin[0]] if len(tin) == 1 else other_use(eqn, tin, uses)


def layout_transpose(eqn, tin, uses, walk):
  t = tin[0]
  return [dataclasses.replace(t, axes=tuple(t.axes[i] for i in eqn.params["permutation"]))]


def layout_reshape(eqn, tin, uses, walk):
  """``reshape`` / ``squeeze`` / ``broadcast_in_dim`` that only add or drop size-1 axes
  or merge whole axes."""
  return [_reshape(eqn, tin[0], uses)]


def layout_dot_general(eqn, tin, uses, walk):
  """rows = the contracted kernel axes, columns = the free ones, stacked = batch axes."""
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  for t, c, b in ((tin[0], lc, lb), (tin[1], rc, rb)):
    if t is not None:
      contracted = _flat(t.axes[i] for i in c)
      batch = _flat(t.axes[i] for i in b)
      free = _flat(t.axes) - contracted - batch
      record_use(uses, t, Use("dot", contracted, free, t.stacked | batch, "dot_general"))
  return [None]


def layout_conv(eqn, tin, uses, walk):
  """rows = spatial + input-channel axes of the kernel operand, columns = output channels."""
  name, p = eqn.primitive.name, eqn.params
  lhs, rhs = tin
  if lhs is not None or rhs is None:
    return other_use(eqn, tin, uses, "as the conv input")
  dn = p["dimension_numbers"]
  fgc, bgc = p["feature_group_count"], p["batch_group_count"]
  if fgc != 1 or bgc != 1:
    record_use(uses, rhs, Use(
        "other", primitive=name,
        note=f"grouped/depthwise convolution (feature_group_count={fgc}, "
             f"batch_group_count={bgc}) cannot be factorized channel-wise"))
    return [None]
  o, i, sp = dn.rhs_spec[0], dn.rhs_spec[1], dn.rhs_spec[2:]
  rows = _flat([rhs.axes[i]] + [rhs.axes[s] for s in sp])
  record_use(uses, rhs, Use("conv", rows, _flat([rhs.axes[o]]), rhs.stacked, name,
                            note=str(tuple(sp))))
  return [None]


def layout_gather(eqn, tin, uses, walk):
  """An embedding lookup: rows = the looked-up axes."""
  name, p = eqn.primitive.name, eqn.params
  t = tin[0]
  if t is None or tin[1] is not None:
    return other_use(eqn, tin, uses, "as gather indices")
  dn = p["dimension_numbers"]
  idx = set(dn.start_index_map) | set(dn.collapsed_slice_dims)
  rows = _flat(t.axes[i] for i in idx)
  if any(p["slice_sizes"][k] != eqn.invars[0].aval.shape[k] for k in range(len(t.axes))
         if k not in idx) or dn.operand_batching_dims:
    return other_use(eqn, tin, uses, "a gather that slices columns")
  record_use(uses, t, Use("gather", rows, _flat(t.axes) - rows, t.stacked, name))
  return [None]


def layout_call(eqn, tin, uses, walk):
  """``jit`` / ``closed_call``: follow the called jaxpr."""
  closed = eqn.params.get("jaxpr") or eqn.params.get("call_jaxpr")
  return walk(closed.jaxpr if isinstance(closed, jcore.ClosedJaxpr) else closed, tin)


def layout_remat(eqn, tin, uses, walk):
  return walk(eqn.params["jaxpr"], tin)


def layout_scan(eqn, tin, uses, walk):
  """A scanned-over kernel axis is a stacked-layer axis; carries are not kernels."""
  p = eqn.params
  nc, ncarry = p["num_consts"], p["num_carry"]
  inner_in = list(tin)
  for k in range(nc, nc + ncarry):
    if tin[k] is not None:
      other_use(eqn, [tin[k]], uses, "as a scan carry")
      inner_in[k] = None
  for k in range(nc + ncarry, len(tin)):
    t = tin[k]
    if t is not None:
      if len(t.axes[0]) != 1:
        other_use(eqn, [t], uses, "scanned over merged axes")
        inner_in[k] = None
      else:
        inner_in[k] = Tracked(t.leaf, t.axes[1:], t.stacked | frozenset(t.axes[0]))
  walk(p["jaxpr"].jaxpr, inner_in)
  return [None] * len(eqn.outvars)


def _reshape(eqn, t, uses):
  """Follow a reshape that only adds/removes size-1 axes or merges whole axes."""
  old = eqn.invars[0].aval.shape
  new = eqn.outvars[0].aval.shape
  if eqn.primitive.name == "reshape" and eqn.params.get("dimensions") is not None:
    other_use(eqn, [t], uses)
    return None
  groups = [g for g, d in zip(t.axes, old) if d != 1]
  dims = [d for d in old if d != 1]
  out, k = [], 0
  for d in new:
    if d == 1:
      out.append(())
      continue
    merged, size = (), 1
    while k < len(dims) and size * dims[k] <= d:
      merged, size, k = merged + groups[k], size * dims[k], k + 1
      if size == d:
        break
    if size != d:
      other_use(eqn, [t], uses, "a reshape that splits an axis")
      return None
    out.append(merged)
  if eqn.primitive.name == "broadcast_in_dim" and any(
      new[j] != 1 for j in range(len(new)) if j not in eqn.params["broadcast_dimensions"]):
    other_use(eqn, [t], uses)
    return None
  return Tracked(t.leaf, tuple(out), t.stacked)


# ----------------------------------------------------------------------------- layouts


def _layout(shape, uses: list[Use], conv: str, path: str = "") -> tuple[Layout | None, str]:
  if not uses:
    return None, "not used by the traced call"
  for u in uses:
    if u.kind == "other":
      what = u.note or "no factorized rule"
      return None, f"used by `{u.primitive}` ({what})"
  first = next((u for u in uses if u.kind == "gather"), uses[0])
  for u in uses:
    if u.stacked != first.stacked or {u.rows, u.cols} != {first.rows, first.cols}:
      return None, (f"used in two incompatible ways: rows {sorted(first.rows)} | columns "
                    f"{sorted(first.cols)} by `{first.primitive}` and rows {sorted(u.rows)} "
                    f"| columns {sorted(u.cols)} by `{u.primitive}`")
  k = len(first.stacked)
  if first.stacked != frozenset(range(k)):
    return None, f"stacked axes {sorted(first.stacked)} are not the leading axes"
  rows = tuple(sorted(a - k for a in first.rows))
  cols = tuple(sorted(a - k for a in first.cols))
  kshape = tuple(shape[k:])
  if not rows or not cols:
    return None, "no axes on one side of the product (nothing to factorize)"
  if len(rows) + len(cols) != len(kshape):
    return None, "some axes are neither contracted nor kept"
  nd = len(kshape)
  if all(u.kind == "conv" for u in uses) and cols == (nd - 1,) and rows == tuple(range(nd - 1)):
    if conv == "spatial":
      if nd != 4:  # a 1-D/3-D conv has no (kh, kw) split: refuse, never fall back to channel
        raise ValueError(f"{path}: conv='spatial': conv_spatial needs a 2-D conv kernel "
                         f"(kh, kw, cin, cout), got shape {kshape} (a {nd - 2}-D conv"
                         + (f", after {k} stacked axes" if k else "")
                         + "); use conv='channel', or a per-path layout for the 2-D convs")
      return Layout("conv_spatial", kshape), ""
    return Layout("conv_channel", kshape, nd - 1), ""
  if first.kind == "gather" and nd == 2 and rows == (0,):
    return Layout("embed", kshape), ""
  if rows + cols == tuple(range(nd)):
    return Layout("dense" if nd == 2 else "dense_general", kshape, len(rows)), ""
  return Layout("dense_general", kshape, len(rows), perm=rows + cols), ""


def _candidate(leaf) -> bool:
  return (isinstance(leaf, (jax.Array, np.ndarray, jax.ShapeDtypeStruct))
          and len(leaf.shape) >= 2 and jnp.issubdtype(leaf.dtype, jnp.floating))


def read(fn: Callable, params, *args, conv: str = "channel", **kwargs) -> ModelLayouts:
  """The :class:`ModelLayouts` of ``params`` as ``fn(params, *args, **kwargs)`` uses them.

  Nothing is computed (``jax.make_jaxpr``); ``args`` may be arrays or
  ``jax.ShapeDtypeStruct``s. Non-array leaves of ``args``/``kwargs`` are static.
  ``conv``: ``"channel"`` (default) or ``"spatial"`` (2-D convolutions only: a
  ValueError naming the leaf for any other conv kernel).
  """
  if conv not in ("channel", "spatial"):
    raise ValueError(f"conv must be 'channel' or 'spatial', got {conv!r}")
  p_flat, p_def = jax.tree_util.tree_flatten_with_path(params)
  a_flat, a_def = jax.tree_util.tree_flatten((args, kwargs))
  dyn = [i for i, x in enumerate(a_flat) if isinstance(x, (jax.Array, np.ndarray, jax.ShapeDtypeStruct))]

  def flat_fn(p_leaves, a_dyn):
    full = list(a_flat)
    for i, v in zip(dyn, a_dyn):
      full[i] = v
    a, k = jax.tree_util.tree_unflatten(a_def, full)
    return fn(jax.tree_util.tree_unflatten(p_def, p_leaves), *a, **k)

  closed = jax.make_jaxpr(flat_fn)([x for _, x in p_flat], [a_flat[i] for i in dyn])
  n_p = len(p_flat)
  ins = [Tracked(i, tuple((a,) for a in range(len(x.shape)))) if _candidate(x) else None
         for i, (_, x) in enumerate(p_flat)]
  ins += [None] * (len(closed.jaxpr.invars) - n_p)
  uses: dict[int, list[Use]] = {}
  _walk(closed.jaxpr, ins, uses)
  layouts, skipped, by_path = {}, {}, {}
  for i, (kp, x) in enumerate(p_flat):
    if ins[i] is None:
      continue
    path = path_str(kp)
    leaf_uses = uses.get(i, [])
    lay, why = _layout(tuple(x.shape), leaf_uses, conv, path)
    by_path[path] = leaf_uses
    if lay is None:
      # report what a user would expect factorized: kernels, and leaves fed to a matmul
      if leaf_name(path) in KERNEL_NAMES or any(
          u.kind != "other" or u.primitive in _FACTORIZABLE for u in leaf_uses):
        skipped[path] = why
    else:
      layouts[path] = lay
  shapes = {path_str(kp): tuple(x.shape) for kp, x in p_flat if hasattr(x, "shape")}
  return ModelLayouts(layouts, skipped, by_path, shapes)
