"""NNX model surgery: ``compress(model, rank)`` returns a new model in which every
``nnx.Linear``, ``nnx.LinearGeneral``, ``nnx.Conv``, ``nnx.Embed`` and ``nnx.Einsum``
(and subclasses, e.g. ``nnx.LoRALinear``) chosen by the plan holds its kernel as two
factors and computes through them. The input model is not touched.

Each chosen module becomes a :class:`Factorized` twin: the factors are two
``nnx.Param`` variables, ``u (..., m, r)`` and ``v (..., r, n)`` (the idiomatic NNX form, so the
stock ``nnx.Optimizer``, ``nnx.state`` filters and checkpointing treat them as any other
parameter), and the original module -- without its kernel -- runs its own ``__call__``
(or ``attend``, or any other method) under :func:`jlr.factorized`. Whatever the module's
code does with its kernel -- a custom ``dot_general``, ``promote_dtype``,
``preferred_element_type``, a LoRA adapter beside the kernel -- is therefore kept: the
interpreter rewrites the primitives it meets (two thin contractions / convs / a row
lookup), and anything without a factorized rule densifies with a
:class:`jlr.DensifiedWarning` naming the leaf, never a silent wrong answer.

Sharing is kept: a module referenced from several places (weight tying, ``self.head =
self.emb``; ``nnx.LoRA(base_module=self.base)`` beside ``self.base``) is compressed once
and every reference sees the same twin. A kernel *variable* shared by two different
modules cannot be compressed by one of them: ``compress`` refuses, naming both paths.

Layouts come from the module types, never from shape guesses: Linear ``(in, out)``,
LinearGeneral (its ``axis``), Conv (spatial + input channels | output channels), Embed,
and Einsum (contracted labels of its equation | the rest). Leading axes beyond a
module's own kernel rank are stacked layers (``nnx.vmap``-created modules run under
``nnx.scan`` / ``nnx.vmap``): one factorization per layer.

:func:`params` is the model's parameters as a plain tree in which each twin shows a
:class:`jlr.LowRank` at its kernel's path (for ``jlr.summary``, ``jlr.truncate``,
``jlr.merge``); :func:`update` writes such a tree back.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx import graph as nnx_graph

from jlr.factorized import factorized
from jlr.layouts import Layout, Spec
from jlr.lowrank import LowRank, is_lowrank
from jlr.paths import path_str
from jlr.select import selector, spec_for
from jlr.transforms import Plan, factorize, plan as make_plan

SUPPORTED = (nnx.Linear, nnx.LinearGeneral, nnx.Conv, nnx.Embed, nnx.Einsum)


class Factorized(nnx.Module):
  """A module whose kernel is held as two factors and run by the module's own code.

  Attributes:
    inner: the original module with its kernel attribute removed (its bias, adapters,
      RNG streams and other state stay in it and are updated as the module updates them).
    u, v: ``nnx.Param`` variables with the factors ``(..., m, r)`` and ``(..., r, n)``.
    layout: the static :class:`jlr.Layout` of one kernel (stacked-layer axes are the
      leading axes of ``u`` and ``v``, so ``nnx.scan`` slices them like any parameter).
    kernel_name: the attribute the kernel had (``"kernel"`` or ``"embedding"``).

  Calling the twin (``twin(x)``, ``twin.attend(q)``, any method of the original module)
  runs that method with the kernel computed through ``u`` and ``v`` by
  :func:`jlr.factorized`; ``u @ v`` is never formed where a factorized rule exists.
  """

  def __init__(self, inner: nnx.Module, kernel_name: str, factors: LowRank):
    self.inner = inner
    self.kernel_name = kernel_name
    self.layout = factors.layout
    self.u = nnx.Param(factors.u)
    self.v = nnx.Param(factors.v)

  @property
  def factors(self) -> LowRank:
    """The kernel as a :class:`jlr.LowRank` (the current values of ``u`` and ``v``)."""
    return LowRank(self.u.get_value(), self.v.get_value(), self.layout)

  def run(self, method: str, *args, **kwargs):
    """``inner.<method>(*args, **kwargs)`` with the kernel computed factorized."""
    graphdef, state = nnx.split(self.inner)
    name = self.kernel_name

    def call(kernel, state, *args, **kwargs):
      module = nnx.merge(graphdef, state)
      setattr(module, name, nnx.Param(kernel))  # a dense stand-in while traced
      out = getattr(module, method)(*args, **kwargs)
      setattr(module, name, None)
      return out, nnx.state(module)

    out, new_state = factorized(call)(self.factors, state, *args, **kwargs)
    nnx.update(self.inner, new_state)
    return out

  def __call__(self, *args, **kwargs):
    return self.run("__call__", *args, **kwargs)

  def __getattr__(self, name):  # other methods of the original module (Embed.attend, ...)
    if name.startswith("_") or name in ("inner", "kernel_name", "layout", "u", "v"):
      raise AttributeError(name)
    inner = self.inner
    if callable(getattr(type(inner), name, None)):
      return lambda *args, **kwargs: self.run(name, *args, **kwargs)
    if name == self.kernel_name:
      raise AttributeError(
          f"{type(inner).__name__}.{name} is held as two factors (.u, .v; .factors is the "
          "LowRank); code that reads the dense kernel directly must run the whole model "
          "through jlr.factorized instead of nnx surgery")
    return getattr(inner, name)


# names that read like the layer kinds they stand for (isinstance checks, reprs)
class LowRankLinear(Factorized):
  """The :class:`Factorized` twin of an ``nnx.Linear`` / ``nnx.LinearGeneral``."""


class LowRankConv(Factorized):
  """The :class:`Factorized` twin of an ``nnx.Conv``."""


class LowRankEmbed(Factorized):
  """The :class:`Factorized` twin of an ``nnx.Embed`` (``attend`` included)."""


def _twin(module, f: LowRank, kernel_name: str) -> Factorized:
  inner = nnx.clone(module)
  setattr(inner, kernel_name, None)
  kind = type(module)
  if kind in (nnx.Linear, nnx.LinearGeneral):
    return LowRankLinear(inner, kernel_name, f)
  if kind is nnx.Conv:
    return LowRankConv(inner, kernel_name, f)
  if kind is nnx.Embed:
    return LowRankEmbed(inner, kernel_name, f)
  return Factorized(inner, kernel_name, f)


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


def _kernel_name(module) -> str:
  return "embedding" if isinstance(module, nnx.Embed) else "kernel"


def _references(model) -> tuple[dict[int, list], dict[int, list[str]]]:
  """Every reference in the graph: ``({id(module): [(parent, key, path), ...]},
  {id(variable): [path, ...]})``. A module reached twice is listed twice and its
  children once, so a variable listed twice is held by two modules (or two attributes).
  The model itself is listed with ``parent=None``."""
  modules: dict[int, list] = {id(model): [(None, None, "")]}
  variables: dict[int, list[str]] = {}
  stack = [(model, "")]
  while stack:
    node, path = stack.pop()
    for key, child in nnx_graph.iter_children(node):
      cpath = f"{path}/{key}" if path else str(key)
      if isinstance(child, nnx.Variable):
        variables.setdefault(id(child), []).append(cpath)
      elif id(child) not in modules:
        modules[id(child)] = [(node, key, cpath)]
        stack.append((child, cpath))
      else:
        modules[id(child)].append((node, key, cpath))
  return modules, variables


def _layers(model) -> dict[str, Any]:
  """``{kernel path: module}`` for every supported layer, in graph order (a shared module
  once, at its first path in ``nnx.state`` order)."""
  out = {}
  for path, node in nnx.iter_graph(model):
    if isinstance(node, SUPPORTED) and not isinstance(node, Factorized):
      out["/".join(map(str, path + (_kernel_name(node),)))] = node
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


def plan(model, rank, *, select=None, layout=None, stats=None, damping: float = 1e-2) -> Plan:
  """The :class:`jlr.Plan` that :func:`compress` would apply (to inspect its cost with
  ``jlr.summary(nnx.state(model, nnx.Param), the_plan)``)."""
  layers = _layers(model)
  user_select = select

  def chosen(path, leaf):
    if path not in layers:
      return False
    if user_select is None:
      return _unsupported(layers[path]) is None
    if not selector(user_select)(path, leaf):
      return False
    problem = _unsupported(layers[path])
    if problem:
      raise ValueError(f"{path}: {problem}")
    return True

  def layout_for(path, leaf):
    read = module_layout(layers[path], leaf)
    spec = spec_for(layout, path, leaf) if layout is not None else Spec()
    if isinstance(spec, Layout):
      return spec
    if spec.kind == "conv_spatial" and isinstance(read, Spec):
      return Spec(kind="conv_spatial", batch_ndim=read.batch_ndim)
    if spec != Spec():
      return spec
    return read

  state = nnx.state(model, nnx.Param)
  p = make_plan(state, rank, select=chosen, layout=layout_for, stats=stats, damping=damping)
  if user_select is None:  # same break-even rule as the default select of jlr.plan
    p = Plan({k: e for k, e in p.items() if e.layout.factor_size(e.rank) < e.layout.size})
  return p


def compress(model, rank, *, select=None, layout=None, method: str = "svd", key=None,
             split: str = "balanced", stats=None, damping: float = 1e-2):
  """A new NNX model with chosen layers replaced by :class:`Factorized` twins.

  ``rank``, ``select`` and ``layout`` take the same forms as in :func:`jlr.factorize`,
  with paths as in ``nnx.state(model)`` (``layers/0/kernel``); ``rank`` may also be a
  Plan from :func:`plan`. Linear, LinearGeneral, Conv, Embed and Einsum layers (and
  their subclasses) are candidates; grouped or masked convs are skipped by default and
  rejected with a ``ValueError`` naming the path when selected explicitly.
  LinearGeneral kernels are split between their contracted and output axes.

  A module referenced from several places is compressed once and stays shared. A kernel
  variable that another module also holds cannot be compressed: ``ValueError`` naming
  both paths. ``model`` may itself be a layer (``compress(nnx.Linear(...), 8)``): its
  twin is returned. ``stats`` (``{kernel path: jlr.stats.Gram}``, e.g. from
  ``jlr.stats.activations(lambda p, x: nnx.merge(graphdef, p)(x), state, batches)``)
  makes it data-aware (whitened), as in :func:`jlr.factorize`.
  """
  if isinstance(rank, Plan) and stats is not None:
    raise ValueError("compress(model, plan, stats=...): a plan carries its statistics; pass "
                     "them to jnnx.plan(model, rank, stats=...)")
  the_plan = rank if isinstance(rank, Plan) else plan(model, rank, select=select, layout=layout,
                                                      stats=stats, damping=damping)
  new = nnx.clone(model)
  layers = _layers(new)
  modules, variables = _references(new)
  for kpath in the_plan:
    held = variables[id(getattr(layers[kpath], kpath.rsplit("/", 1)[-1]))]
    if len(held) > 1:
      raise ValueError(f"{kpath}: this kernel variable is held at {' and '.join(sorted(held))}; a "
                       "variable shared by two modules (or attributes) cannot be compressed "
                       "by one of them (leave it out with select=, or share the module)")
  state = factorize(nnx.state(new, nnx.Param), the_plan, method=method, key=key, split=split)
  flat = {path_str(p): v
          for p, v in jax.tree_util.tree_flatten_with_path(state, is_leaf=is_lowrank)[0]}
  for kpath in the_plan:
    module = layers[kpath]
    twin = _twin(module, flat[kpath], kpath.rsplit("/", 1)[-1])
    for parent, key, _ in modules[id(module)]:
      if parent is None:
        return twin  # the model is the layer itself
      nnx_graph.get_node_impl(parent).set_key(parent, key, twin)
  return new


def _twins(model) -> dict[str, Factorized]:
  """``{kernel path: twin}`` for every :class:`Factorized` in ``model`` (first path)."""
  if isinstance(model, Factorized):
    return {model.kernel_name: model}
  return {"/".join(map(str, path + (node.kernel_name,))): node
          for path, node in nnx.iter_graph(model) if isinstance(node, Factorized)}


def params(model, *filters) -> dict:
  """``model``'s parameters (``nnx.state(model, nnx.Param)``, or ``*filters``) as a plain
  nested dict in which every :class:`Factorized` twin shows its kernel as a
  :class:`jlr.LowRank` at the original path (``layers/0/kernel``) and its other
  parameters where the original module had them (``layers/0/bias``): the tree
  ``jlr.summary``, ``jlr.truncate``, ``jlr.merge`` and ``jlr.plan`` understand."""
  tree = nnx.state(model, *(filters or (nnx.Param,))).to_pure_dict()
  for kpath, twin in _twins(model).items():
    sub = tree
    for k in kpath.split("/")[:-1]:
      sub = sub[int(k) if k.isdigit() and int(k) in sub else k]
    inner = sub.pop("inner", {})
    sub.pop("u", None), sub.pop("v", None)
    sub.update(inner)
    sub[twin.kernel_name] = twin.factors
  return tree


def update(model, tree) -> None:
  """Write ``tree`` (shaped as :func:`params` returns it) into ``model`` in place: a
  :class:`jlr.LowRank` sets its twin's ``u`` and ``v`` (ranks may change, e.g. after
  ``jlr.truncate``), every other leaf the parameter at its path."""
  twins = _twins(model)
  flat = {path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_lowrank)[0]}
  for kpath, twin in twins.items():
    f = flat.pop(kpath, None)
    if f is None:
      continue
    if not is_lowrank(f) or f.layout != twin.layout:
      raise ValueError(f"{kpath}: expected a LowRank with layout {twin.layout}, got {f!r}")
    twin.u.set_value(f.u)
    twin.v.set_value(f.v)
  prefix = {k.rsplit("/", 1)[0]: twin for k, twin in twins.items()}
  for path, value in flat.items():
    head, _, name = path.rpartition("/")
    owner = prefix.get(head)
    target = owner.inner if owner is not None else model
    for k in ([] if owner is not None else path.split("/")[:-1]):
      target = target[int(k)] if k.isdigit() and not hasattr(target, k) else getattr(target, k)
    getattr(target, name).set_value(value)


Optimizer = nnx.Optimizer  # twins hold plain nnx.Params: the stock optimizer works
