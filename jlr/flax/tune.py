"""Measured, per-layer choice of how each kernel runs: factorized channel-wise, spatial-wise,
or left dense.

The FLOPs of a factorized layer do not say how fast it runs. On XLA CPU a 3x3 conv to
``r`` output channels followed by a 1x1 conv is bound by memory traffic when ``r`` is
small or odd, and a conv with few input channels (an RGB stem) is *slower* factorized
than dense at every rank; the spatial-wise split (``kh x 1`` then ``1 x kw``, Jaderberg et
al. 2014) is often faster than the channel-wise one at the same parameter count.
:func:`autotune` times every candidate on each layer's real input shape, in isolation,
and keeps the fastest, so the compressed model is never slower than dense layer by
layer. Timings are cached per (backend, layer, input shape, dtype, layout, rank,
compiler options). Layers are timed under :func:`jlr.compiler_options` by default: run the
model under the same options (``jax.jit(f, compiler_options=jlr.compiler_options())``).

    tuned = jlr.flax.autotune(model, variables, x, rank=jlr.ranks.ratio(0.25))
    small = jlr.factorize(variables, tuned.plan)      # only the layers that pay
    print(tuned.table())
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Mapping

import flax.linen as nn
import jax
import numpy as np

from jlr import ops, ranks, transforms
from jlr.flax import linen as jlr_linen
from jlr.layouts import Layout
from jlr.usage import ModelLayouts

CONV_LAYOUTS = ("channel", "spatial")
_CACHE: dict[str, float] = {}  # this process's measurements (ms), keyed by _key


@dataclasses.dataclass(frozen=True)
class Tuned:
  """What :func:`autotune` measured and chose.

  ``plan``: the :class:`jlr.transforms.Plan` of the layers worth factorizing, in their
  fastest layout (pass it to :func:`jlr.factorize`); ``choices``: ``{path: "dense" |
  "channel" | "spatial"}`` for every candidate layer; ``times_ms``: ``{path: {choice:
  median ms}}`` of one forward of that layer on its input shape.
  """

  plan: transforms.Plan
  choices: dict[str, str]
  times_ms: dict[str, dict[str, float]]

  def table(self) -> str:
    names = ("dense",) + CONV_LAYOUTS
    lines = ["| layer | " + " | ".join(f"{n} ms" for n in names) + " | rank | chosen |",
             "|---|" + "---|" * (len(names) + 2)]
    for path, t in self.times_ms.items():
      cells = [f"{t[n]:.3g}" if n in t else "-" for n in names]
      entry = self.plan.get(path)
      lines.append(f"| {path} | " + " | ".join(cells) +
                   f" | {entry.rank if entry else '-'} | {self.choices[path]} |")
    return "\n".join(lines)


def _record_inputs(model: nn.Module, variables, args, apply_kwargs):
  """``{kernel path: [(unbound module, input ShapeDtypeStruct)]}`` of every Dense /
  DenseGeneral / Conv call (a module called twice is listed twice); nothing is computed."""
  seen: dict[str, list] = {}

  def interceptor(next_fun, a, kw, context):
    module = context.module
    if (context.method_name == "__call__" and a and
        isinstance(module, (nn.Dense, nn.DenseGeneral, nn.Conv))):
      path = f"params/{'/'.join(module.scope.path)}/kernel"
      seen.setdefault(path, []).append(
          (module.clone(parent=None), jax.ShapeDtypeStruct(a[0].shape, a[0].dtype)))
    return next_fun(*a, **kw)

  def run(v):
    with nn.intercept_methods(interceptor):
      return model.apply(v, *args, **apply_kwargs)

  jax.eval_shape(run, variables)
  return seen


def _with_conv(read: ModelLayouts, conv: str) -> ModelLayouts:
  """The layouts read from the model with every 2-D channel-wise conv made spatial-wise
  for ``conv="spatial"`` (1-D / 3-D convs keep their channel-wise layout)."""
  if conv == "channel":
    return read
  swap = {p: Layout("conv_spatial", lay.shape) if lay.kind == "conv_channel" and len(lay.shape) == 4
          else lay for p, lay in read.items()}
  return ModelLayouts(swap, read.skipped, read.uses, read.shapes)


def _get(tree, path: str):
  for k in path.split("/"):
    tree = tree[k]
  return tree


def _key(module, x, kernel, layout, rank, options) -> str:
  fields = {f.name: repr(getattr(module, f.name)) for f in dataclasses.fields(module)
            if f.name not in ("parent", "name")}
  dev = jax.devices()[0]
  key = [dev.platform, getattr(dev, "device_kind", ""), type(module).__name__,
         fields, list(x.shape), str(x.dtype), list(kernel.shape), layout, rank]
  if options:  # keys measured under XLA's own options stay as they were
    key.append(options)
  return json.dumps(key, sort_keys=True)


def _time(fns: dict[str, Any], repeats: int, min_seconds: float = 2e-3) -> dict[str, float]:
  """Median ms of one call of each zero-argument function, calls interleaved (one is not
  favoured by the machine's state), after a compile-and-warm-up call; each repeat runs
  a function enough times to last ``min_seconds``."""
  loops = {}
  for k, f in fns.items():
    jax.block_until_ready(f())
    t0 = time.perf_counter()
    jax.block_until_ready(f())
    loops[k] = max(1, int(np.ceil(min_seconds / max(time.perf_counter() - t0, 1e-7))))
  times: dict[str, list[float]] = {k: [] for k in fns}
  for _ in range(repeats):
    for k, f in fns.items():
      t0 = time.perf_counter()
      for _ in range(loops[k]):
        out = f()
      jax.block_until_ready(out)
      times[k].append((time.perf_counter() - t0) / loops[k])
  return {k: 1e3 * float(np.median(v)) for k, v in times.items()}


def autotune(model: nn.Module, variables, *args, rank, candidates=CONV_LAYOUTS, select=None,
             repeats: int = 7, cache: str | Mapping | None = None, apply_kwargs=None,
             key=None, compiler_options: Mapping[str, str] | None = None) -> Tuned:
  """Time each candidate kernel of ``model.apply(variables, *args)`` dense and factorized
  in every layout of ``candidates`` (convs; a Dense has one) at the ranks ``rank`` gives
  (resolved on the whole tree per layout, as :func:`jlr.factorize` would), and keep the
  fastest per layer.

  Args:
    model, variables, args: the model and an input batch *of the size it will serve*
      (the timings depend on the batch); ``args`` may be ``jax.ShapeDtypeStruct``s.
    rank: any rank argument of :func:`jlr.factorize` (a rule, an int, a mapping).
    candidates: conv layouts to try (``"channel"``, ``"spatial"``); dense is always one.
    select: ``select(path, leaf)`` as in :func:`jlr.factorize` (default: every kernel the
      model can run factorized where the rank saves parameters).
    repeats: interleaved timing repeats per layer (medians are kept).
    cache: a JSON file path (read, then updated) or a dict; timings already in it are not
      measured again. Measurements are always kept in this process.
    apply_kwargs: keyword arguments of ``model.apply`` (``train=False`` ...).
    key: PRNG key of the random timing inputs (default ``jax.random.key(0)``).
    compiler_options: the ``jax.jit`` compiler options the model will run under (default
      :func:`jlr.compiler_options`, where factorized convs run at their FLOPs on CPU;
      ``{}`` for XLA's defaults): the layers are timed under them.
  """
  options = dict(ops.compiler_options() if compiler_options is None else compiler_options)
  apply_kwargs = dict(apply_kwargs or {})
  unknown = set(candidates) - set(CONV_LAYOUTS)
  if unknown:
    raise ValueError(f"candidates must be among {CONV_LAYOUTS}, got {sorted(unknown)}")
  if not candidates:
    raise ValueError("autotune needs at least one candidate layout")
  stored = _read_cache(cache)
  read = jlr_linen.layouts(model, variables, *args, **apply_kwargs)
  plans = {c: transforms.plan(variables, rank, select=select, layout=_with_conv(read, c))
           for c in candidates}
  inputs = _record_inputs(model, variables, args, apply_kwargs)
  key = jax.random.key(0) if key is None else key
  chosen, choices, times_ms = {}, {}, {}
  for path in plans[candidates[0]]:
    calls = inputs.get(path)
    if not calls:  # used by something other than a layer call (e.g. attend)
      chosen[path] = plans[candidates[0]][path]
      choices[path] = candidates[0]
      continue
    module0 = calls[0][0]
    names = candidates if isinstance(module0, nn.Conv) else candidates[:1]
    layer = _get(variables["params"], path.removeprefix("params/").rsplit("/", 1)[0])
    t = {}
    for name in ("dense",) + tuple(names):
      entry = plans[name].get(path) if name != "dense" else None
      if name != "dense" and (entry is None or (
          name == "spatial" and entry.layout.kind != "conv_spatial")):
        continue  # not a candidate here (a 1-D / 3-D conv has no spatial-wise split)
      lay, r = (None, None) if entry is None else (entry.layout.kind, entry.rank)
      total = 0.0
      for i, (module, x_struct) in enumerate(calls):
        k = _key(module, x_struct, layer["kernel"], lay, r, options)
        if k not in stored and k not in _CACHE:
          x = jax.random.normal(jax.random.fold_in(key, i), x_struct.shape, x_struct.dtype)
          params = {"params": layer}
          if entry is not None:
            params = transforms.factorize(params, {"params/kernel": ranks.fixed(r)},
                                          layout={"params/kernel": entry.layout})
            fn = jax.jit(lambda p, x, m=module: jlr_linen.apply(m, p, x),
                         compiler_options=options)
          else:
            fn = jax.jit(lambda p, x, m=module: m.apply(p, x), compiler_options=options)
          _CACHE[k] = _time({"f": lambda fn=fn, p=params, x=x: fn(p, x)}, repeats)["f"]
        total += stored.get(k, _CACHE.get(k))
      t[name] = total
    times_ms[path] = t
    best = min(t, key=t.get)
    choices[path] = best
    if best != "dense":
      chosen[path] = plans[best][path]
  _write_cache(cache, stored)
  return Tuned(transforms.Plan(chosen), choices, times_ms)


def _read_cache(cache) -> dict:
  if cache is None:
    return {}
  if isinstance(cache, (str, os.PathLike)):
    if not os.path.exists(cache):
      return {}
    with open(cache) as f:
      return json.load(f)
  return cache


def _write_cache(cache, stored: dict) -> None:
  if cache is None:
    return
  new = dict(stored, **_CACHE)
  if isinstance(cache, (str, os.PathLike)):
    tmp = f"{cache}.tmp"
    with open(tmp, "w") as f:
      json.dump(new, f, indent=0, sort_keys=True)
    os.replace(tmp, cache)
  else:
    cache.update(new)
