"""NNX model surgery: ``compress(model, rank)`` returns a new model in which every
``nnx.Linear``, ``nnx.LinearGeneral``, ``nnx.Conv`` and ``nnx.Embed`` chosen by the plan
is replaced by its low-rank twin. The twin holds the factors as one
``nnx.Param(LowRank)`` named like the kernel it replaces (``kernel`` / ``embedding``), so
``nnx.state(model, nnx.Param)`` is a tree that ``jlr.summary``, ``jlr.truncate`` and
``jlr.merge`` understand. The input model is not touched.

Layouts come from the module types, never from shape guesses: Linear ``(in, out)``,
LinearGeneral (its ``axis``), Conv (spatial + input channels | output channels), Embed,
and ``nnx.Einsum`` (contracted labels of its equation | the rest). Leading axes beyond a
module's own kernel rank are stacked layers (``nnx.vmap``-created modules run under
``nnx.scan`` / ``nnx.vmap``): one factorization per layer. ``nnx.Einsum`` and subclasses
such as ``nnx.LoRALinear`` are wrapped in :class:`Factorized`, which runs the module's own
``__call__`` through :func:`jlr.factorized` (its LoRA adapter keeps working beside the
factors); their kernel paths gain an ``inner/`` component.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jlr import ops
from jlr.factorized import factorized
from jlr.layouts import Layout, Spec
from jlr.lowrank import LowRank, is_lowrank
from jlr.paths import path_str
from jlr.transforms import Plan, _selector, _spec_for, factorize, plan as make_plan

SUPPORTED = (nnx.Linear, nnx.LinearGeneral, nnx.Conv, nnx.Embed, nnx.Einsum)
_EXACT = (nnx.Linear, nnx.LinearGeneral, nnx.Conv, nnx.Embed)  # have thin-layer twins


def _promote(module, *xs):
  """Cast to the module's ``dtype`` (or the inputs' common type), keeping ``None``s."""
  dtype = module.dtype
  if dtype is None:
    dtype = jnp.result_type(*[x for x in xs if x is not None])
  return [None if x is None else jnp.asarray(x, dtype) for x in xs]


def _constrain(y, out_sharding):
  """What Flax layers do with their ``out_sharding`` argument."""
  return y if out_sharding is None else jax.lax.with_sharding_constraint(y, out_sharding)


class LowRankLinear(nnx.Module):
  """Twin of ``nnx.Linear`` / ``nnx.LinearGeneral``: ``y = (x . u) . v + b``."""

  def __init__(self, kernel: LowRank, bias, *, axis=(-1,), dtype=None, precision=None):
    self.kernel = nnx.Param(kernel)
    self.bias = nnx.Param(bias) if bias is not None else nnx.data(None)
    self.axis = tuple(axis)
    self.dtype = dtype
    self.precision = precision

  def __call__(self, x, out_sharding=None):
    f = self.kernel.get_value()
    bias = self.bias.get_value() if self.bias is not None else None
    x, u, v, bias = _promote(self, x, f.u, f.v, bias)
    axis = tuple(sorted(a % x.ndim for a in self.axis))  # Flax's kernel-axis order
    y = ops.dense_general(x, LowRank(u, v, f.layout), axis, precision=self.precision)
    return _constrain(y if bias is None else y + bias, out_sharding)


class LowRankConv(nnx.Module):
  """Twin of ``nnx.Conv``: two thin convolutions (see :func:`jlr.ops.conv`)."""

  def __init__(self, kernel: LowRank, bias, *, kernel_size, strides=1, padding="SAME",
               input_dilation=1, kernel_dilation=1, dtype=None, precision=None):
    self.kernel = nnx.Param(kernel)
    self.bias = nnx.Param(bias) if bias is not None else nnx.data(None)
    self.kernel_size = tuple(kernel_size)
    self.strides, self.padding = strides, padding
    self.input_dilation, self.kernel_dilation = input_dilation, kernel_dilation
    self.dtype, self.precision = dtype, precision

  def __call__(self, x, out_sharding=None):
    f = self.kernel.get_value()
    bias = self.bias.get_value() if self.bias is not None else None
    x, u, v, bias = _promote(self, x, f.u, f.v, bias)
    y = _constrain(ops.conv_like_flax(x, LowRank(u, v, f.layout), kernel_size=self.kernel_size,
                           strides=self.strides, padding=self.padding,
                           input_dilation=self.input_dilation,
                           kernel_dilation=self.kernel_dilation, precision=self.precision),
                   out_sharding)
    return y if bias is None else y + bias


class LowRankEmbed(nnx.Module):
  """Twin of ``nnx.Embed``: ``u[ids] @ v``; ``attend(q) = (q v^T) u^T``."""

  def __init__(self, embedding: LowRank, *, dtype=None):
    self.embedding = nnx.Param(embedding)
    self.dtype = dtype

  def __call__(self, ids):
    if not jnp.issubdtype(ids.dtype, jnp.integer):
      raise ValueError("Input type must be an integer or unsigned integer.")
    f = self.embedding.get_value()
    u, v = _promote(self, f.u, f.v)
    return ops.embed(ids, LowRank(u, v, f.layout))

  def attend(self, q):
    f = self.embedding.get_value()
    q, u, v = _promote(self, q, f.u, f.v)
    return ops.attend(q, LowRank(u, v, f.layout))


class Factorized(nnx.Module):
  """Any NNX module whose kernel holds a ``LowRank``, run by its own ``__call__`` under
  :func:`jlr.factorized` (``nnx.split``/``nnx.merge``; state it updates is written back)."""

  def __init__(self, inner: nnx.Module):
    self.inner = inner

  def __call__(self, *args, **kwargs):
    graphdef, state = nnx.split(self.inner)

    def run(state, *args, **kwargs):
      module = nnx.merge(graphdef, state)
      return module(*args, **kwargs), nnx.state(module)

    out, new_state = factorized(run)(state, *args, **kwargs)
    nnx.update(self.inner, new_state)
    return out


def _twin(module, f: LowRank, kernel_name: str):
  if type(module) not in _EXACT or (f.layout.perm is not None):
    inner = nnx.clone(module)
    getattr(inner, kernel_name).set_value(f)
    return Factorized(inner)
  bias = getattr(module, "bias", None)
  bias = bias.get_value() if bias is not None else None
  if isinstance(module, nnx.Embed):
    return LowRankEmbed(f, dtype=module.dtype)
  if isinstance(module, nnx.Linear):
    return LowRankLinear(f, bias, dtype=module.dtype, precision=module.precision)
  if isinstance(module, nnx.LinearGeneral):
    return LowRankLinear(f, bias, axis=module.axis, dtype=module.dtype, precision=module.precision)
  return LowRankConv(f, bias, kernel_size=module.kernel_size, strides=module.strides,
                     padding=module.padding, input_dilation=module.input_dilation,
                     kernel_dilation=module.kernel_dilation, dtype=module.dtype,
                     precision=module.precision)


def _unsupported(module) -> str | None:
  if isinstance(module, nnx.Einsum) and not module.einsum_str:
    return "Einsum with its equation given at call time has no fixed layout"
  if isinstance(module, nnx.Conv):
    if module.feature_group_count != 1:
      return (f"grouped/depthwise convolutions (feature_group_count="
              f"{module.feature_group_count}) are not supported")
    if module.mask is not None:
      return "masked convolutions are not supported"
  if isinstance(module, nnx.LinearGeneral) and module.batch_axis:
    return "LinearGeneral with batch_axis is not supported"
  return None


def _layers(model) -> dict[str, Any]:
  """``{kernel path: module}`` for every supported layer, in graph order."""
  out = {}
  for path, node in nnx.iter_graph(model):
    if isinstance(node, SUPPORTED) and not isinstance(node, Factorized):
      name = "embedding" if isinstance(node, nnx.Embed) else "kernel"
      out["/".join(map(str, path + (name,)))] = node
  return out


def _einsum_layout(module, kshape) -> Layout:
  """Rows = kernel labels contracted with the input, columns = labels kept."""
  eq = module.einsum_str.replace(" ", "")
  ins, out = eq.split("->")
  lhs, rhs = ins.split(",")
  if "..." in rhs or len(rhs) != len(kshape):
    raise ValueError(f"cannot read a layout from einsum {eq!r} for a kernel {kshape}")
  rows = tuple(i for i, c in enumerate(rhs) if c in lhs and c not in out)
  cols = tuple(i for i, c in enumerate(rhs) if i not in rows)
  if any(c in lhs and c in out for c in rhs):
    raise ValueError(f"einsum {eq!r} has batch labels on its kernel")
  kind = "dense" if len(kshape) == 2 and rows == (0,) else "dense_general"
  return Layout(kind, kshape, len(rows), perm=rows + cols if kind == "dense_general" else None)


def module_layout(module, kernel) -> Layout | Spec:
  """The layout of ``module``'s kernel read from its type; stacked (``nnx.vmap``) layers
  are the leading axes beyond the module's own kernel rank."""
  nd = jnp.ndim(kernel)
  shape = tuple(jnp.shape(kernel))
  if isinstance(module, nnx.Einsum):
    k = len(module.kernel_shape)
    return _einsum_layout(module, shape[nd - k:])
  if isinstance(module, nnx.LinearGeneral):
    n_in = len(module.axis)
    n_out = len(module.out_features) if not isinstance(module.out_features, int) else 1
    return Spec(kind="dense_general" if n_in + n_out > 2 else None, n_in=n_in,
                batch_ndim=nd - n_in - n_out)
  if isinstance(module, nnx.Conv):
    ks = (module.kernel_size,) if isinstance(module.kernel_size, int) else module.kernel_size
    return Spec(kind="conv_channel", batch_ndim=nd - len(ks) - 2)
  if isinstance(module, nnx.Embed):
    return Spec(kind="embed", batch_ndim=nd - 2)
  return Spec(kind="dense", batch_ndim=nd - 2)  # Linear


def plan(model, rank, *, select=None, layout=None) -> Plan:
  """The :class:`jlr.Plan` that :func:`compress` would apply (to inspect its cost with
  ``jlr.summary(nnx.state(model, nnx.Param), the_plan)``)."""
  layers = _layers(model)
  user_select = select

  def chosen(path, leaf):
    if path not in layers:
      return False
    if user_select is None:
      return _unsupported(layers[path]) is None
    if not _selector(user_select)(path, leaf):
      return False
    problem = _unsupported(layers[path])
    if problem:
      raise ValueError(f"{path}: {problem}")
    return True

  def layout_for(path, leaf):
    read = module_layout(layers[path], leaf)
    spec = _spec_for(layout, path, leaf) if layout is not None else Spec()
    if isinstance(spec, Layout):
      return spec
    if spec.kind == "conv_spatial" and isinstance(read, Spec):
      return Spec(kind="conv_spatial", batch_ndim=read.batch_ndim)
    if spec != Spec():
      return spec
    return read

  state = nnx.state(model, nnx.Param)
  p = make_plan(state, rank, select=chosen, layout=layout_for)
  if user_select is None:  # same break-even rule as the default select of jlr.plan
    p = Plan({k: e for k, e in p.items() if e.layout.factor_size(e.rank) < e.layout.size})
  return p


def compress(model, rank, *, select=None, layout=None, method: str = "svd", key=None,
             split: str = "balanced"):
  """A new NNX model with chosen layers replaced by low-rank twins.

  ``rank``, ``select`` and ``layout`` take the same forms as in :func:`jlr.factorize`,
  with paths as in ``nnx.state(model)`` (``layers/0/kernel``); ``rank`` may also be a
  Plan from :func:`plan`. Only Linear, LinearGeneral, Conv and Embed layers are
  candidates; grouped or masked convs are skipped by default and rejected with a
  ``ValueError`` naming the path when selected explicitly. LinearGeneral kernels are
  split between their contracted and output axes.
  """
  the_plan = rank if isinstance(rank, Plan) else plan(model, rank, select=select, layout=layout)
  new = nnx.clone(model)
  layers = _layers(new)
  state = factorize(nnx.state(new, nnx.Param), the_plan, method=method, key=key, split=split)
  flat = {path_str(p): v
          for p, v in jax.tree_util.tree_flatten_with_path(state, is_leaf=is_lowrank)[0]}
  for kpath in the_plan:
    *parent_path, attr = kpath.split("/")[:-1]
    parent = new
    for k in parent_path:
      parent = parent[int(k)] if k.isdigit() and not hasattr(parent, k) else getattr(parent, k)
    twin = _twin(layers[kpath], flat[kpath], kpath.rsplit("/", 1)[-1])
    if attr.isdigit() and not hasattr(parent, attr):
      parent[int(attr)] = twin
    else:
      setattr(parent, attr, twin)
  return new


class Optimizer(nnx.Optimizer):
  """``nnx.Optimizer`` for models holding ``LowRank`` params (a drop-in subclass).

  ``nnx.Optimizer.update`` writes its new optax state back with
  ``nnx.update(self.opt_state, nnx.state(new_opt_state))``, which turns the state of a
  Variable whose value is a pytree (a ``LowRank``: its moments are ``LowRank``s too)
  into a ``State`` dict, so the second step fails with a pytree-structure error (flax
  0.12). This subclass writes each optimizer Variable's value back as it is; everything
  else is ``nnx.Optimizer``'s own code path.
  """

  def update(self, model, grads, /, **kwargs):
    params = nnx.as_pure(nnx.state(model, self.wrt))
    grads = nnx.as_pure(nnx.state(grads, self.wrt))
    updates, new_opt_state = self.tx.update(grads, nnx.as_pure(self.opt_state), params,
                                            **nnx.as_pure(kwargs))
    nnx.update(model, optax.apply_updates(params, updates))
    jax.tree.map(lambda var, val: var.set_value(val), self.opt_state, new_opt_state,
                 is_leaf=lambda x: isinstance(x, nnx.Variable))
    self.step[...] += 1
    return updates
