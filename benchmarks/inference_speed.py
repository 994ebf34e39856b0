"""Figure 2: does a factorized model run as much faster as its FLOPs say?

Three linen models, each run dense (``model.apply``) and factorized
(``jlr.flax.apply`` on ``jlr.factorize(variables, ranks.ratio(x))``), both jitted:

* ``mlp``         -- 4 x ``Dense(2048)`` + relu on 2048 features;
* ``transformer`` -- one pre-LN block: ``MultiHeadDotProductAttention`` (d=768, 12 heads)
  and a 3072 GELU MLP, sequence length 128;
* ``convnet``     -- 3x3 convs 3->64->64->128 (stride 2)->128, mean pool, ``Dense(10)``,
  32x32x3 inputs (conv_channel layout: a 3x3 conv to r channels, then a 1x1 conv; the
  default selection factorizes every kernel where the rank saves parameters, the 27x64
  first conv and the 128x10 classifier included).

For each parameter ratio and batch size: the latency ratio factorized / dense (median of
per-repeat ratios, variants interleaved), next to the FLOP ratio of the two compiled
forwards (``jax.jit(f).lower(...).compile().cost_analysis()["flops"]``). ``latency /
FLOPs`` is how far the measured speed-up falls short of the FLOP count (1.0 = exact).
Both are jitted with ``compiler_options=jlr.compiler_options()`` (on CPU: XLA's YNNPACK
library fusions off, under which a factorized conv chain runs far below its FLOPs).
Factorized variants run side by side: ``default`` (every kernel channel-wise, as
``jlr.factorize`` does), ``autotuned`` (``jlr.flax.autotune`` at that batch: per
layer the fastest of dense / channel-wise / spatial-wise, measured on the layer's input
shape), and ``default, xla options`` (the default tree with dense and factorized both
under XLA's default options: what a plain ``jax.jit`` gives). The goal (issue 14):
within 1.5x of the FLOP ratio at batch 32 and never slower than dense at ratio <= 0.5.
The per-layer timings of the conv net at the largest batch are in a second table.

The *floor* is the same model with every kernel at rank 1: the latency of all the work a
factorization cannot shrink (the transformer's attention scores, softmax, LayerNorm and
GELU; activations, pooling and memory traffic). ``kernels: latency / FLOPs`` compares
only what lies above it, ``(lat - lat_floor) / (1 - lat_floor)`` against ``(FLOPs -
FLOPs_floor) / (1 - FLOPs_floor)``: 1.0 means the factorized kernels run exactly as fast
as their FLOPs say. A goal is reported as ``limit (floor)`` when even kernels running
exactly at their FLOPs (``floor + (1 - floor) x`` the kernel FLOP fraction) would be
above 1.5x the FLOP ratio: only a faster attention / memory path could meet it.

    python benchmarks/inference_speed.py [--quick]
"""

from __future__ import annotations

import argparse
import sys

import plots

NAME = "inference_speed"


def parse(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true", help="batches 1 and 32, 3 repeats")
  p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # tests: toy widths
  p.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.25, 0.1])
  p.add_argument("--batches", type=int, nargs="+", default=None)
  p.add_argument("--models", nargs="+", default=["mlp", "transformer", "convnet"])
  p.add_argument("--repeats", type=int, default=None)
  p.add_argument("--out-dir", default=None)
  a = p.parse_args(argv)
  if a.tiny:
    a.ratios = a.ratios[-1:]
  a.batches = a.batches or ([2] if a.tiny else [1, 32] if a.quick else [1, 32, 256])
  a.repeats = a.repeats or (1 if a.tiny else 3 if a.quick else 7)
  a.scale = 16 if a.tiny else 1  # widths divided by this
  return a


def models(scale: int):
  """``{name: (model, input shape without batch, max batch)}``."""
  import flax.linen as nn

  w = 2048 // scale
  mlp = nn.Sequential([f for _ in range(4) for f in (nn.Dense(w), nn.relu)])

  d, ff, heads, seq = 768 // scale, 3072 // scale, 12 // min(scale, 12) or 1, 128 // scale

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.LayerNorm()(x)
      x = x + nn.MultiHeadDotProductAttention(num_heads=heads, qkv_features=d)(h, h)
      h = nn.LayerNorm()(x)
      return x + nn.Dense(d)(nn.gelu(nn.Dense(ff)(h)))

  c1, c2 = 64 // scale, 128 // scale
  size = 32 // min(scale, 4)

  class ConvNet(nn.Module):
    @nn.compact
    def __call__(self, x):
      for feat, stride in ((c1, 1), (c1, 1), (c2, 2), (c2, 1)):
        x = nn.relu(nn.Conv(feat, (3, 3), strides=stride)(x))
      return nn.Dense(10)(x.mean((1, 2)))

  # The transformer at batch 256 x seq 128 is ~460 GFLOP per forward: capped at 128.
  return {"mlp": (mlp, (w,), 256), "transformer": (Block(), (seq, d), 128),
          "convnet": (ConvNet(), (size, size, 3), 256)}


def n_params(tree) -> int:
  import jax
  return sum(x.size for x in jax.tree_util.tree_leaves(tree))


def flops(fn, *args) -> float:
  cost = fn.lower(*args).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost["flops"])


def goal(batch: int, r: float, f_ratio: float, lat: float, lat_floor: float,
         f_floor: float) -> str:
  """Issue 14's goal at batch 32: latency within 1.5x of the FLOP ratio, and never slower
  than dense at ratio <= 0.5. ``limit (floor)`` where it cannot be met even if the
  factorized kernels ran exactly at their FLOPs: the rank-1 floor (everything a
  factorization cannot shrink: attention scores and softmax, norms, activations, memory
  traffic) plus the dense kernel time scaled by the kernel FLOP ratio is above 1.5x."""
  if batch != 32:
    return "-"
  if lat / f_ratio <= 1.5 and (r > 0.5 or lat <= 1.0):
    return "met"
  ideal = lat_floor + (1 - lat_floor) * (f_ratio - f_floor) / (1 - f_floor)
  return "limit (floor)" if ideal > 1.5 * f_ratio else "missed"


def main(argv=None) -> dict:
  a = parse(argv)
  import jax
  import jax.numpy as jnp
  import jlr
  import jlr.flax

  from jlr.flax import autotune

  rows, layers = [], []
  for name in a.models:
    model, shape, max_batch = models(a.scale)[name]
    x0 = jnp.ones((1, *shape), jnp.float32)
    variables = model.init(jax.random.key(0), x0)
    opts = jlr.compiler_options()
    dense_fn = jax.jit(model.apply, compiler_options=opts)
    low_fn = jax.jit(lambda v, x, model=model: jlr.flax.apply(model, v, x), compiler_options=opts)
    dense_xla = jax.jit(model.apply)  # XLA's default options, for the "xla options" rows
    low_xla = jax.jit(lambda v, x, model=model: jlr.flax.apply(model, v, x))
    layouts = jlr.flax.layouts(model, variables, x0)
    rules = {r: jlr.ranks.ratio(r, min_rank=1) for r in a.ratios}
    small = {r: jlr.factorize(variables, rules[r], layout=layouts) for r in a.ratios}
    p_dense = n_params(variables)
    for b in a.batches:
      if b > max_batch:
        continue
      x = jax.random.normal(jax.random.key(1), (b, *shape), jnp.float32)
      f_dense = flops(dense_fn, variables, x)
      tuned = {r: autotune(model, variables, x, rank=rules[r], repeats=a.repeats)
               for r in a.ratios}
      if name == "convnet" and b == max(a.batches):
        for r, t in tuned.items():
          for path, ms in t.times_ms.items():
            entry = t.plan.get(path)
            layers.append([r, path.removeprefix("params/").removesuffix("/kernel"),
                           *(ms.get(k, "-") for k in ("dense", "channel", "spatial")),
                           entry.rank if entry else "-", t.choices[path]])
      fast = {r: jlr.factorize(variables, tuned[r].plan) for r in a.ratios}
      floor = jlr.factorize(variables, jlr.ranks.fixed(1), layout=layouts)
      fns = {"dense": lambda x=x: dense_fn(variables, x), "floor": lambda x=x: low_fn(floor, x),
             "dense, xla options": lambda x=x: dense_xla(variables, x),
             "floor, xla options": lambda x=x: low_xla(floor, x)}
      for r in a.ratios:
        fns[("default", r)] = lambda x=x, r=r: low_fn(small[r], x)
        fns[("autotuned", r)] = lambda x=x, r=r: low_fn(fast[r], x)
        fns[("default, xla options", r)] = lambda x=x, r=r: low_xla(small[r], x)
      for f in fns.values():
        plots.block(f())  # compile before calibrating
      calls = {k: plots.calibrate(f) for k, f in fns.items()}
      times = plots.interleaved(fns, repeats=a.repeats, warmup=1, calls=calls)
      f_floor = flops(low_fn, floor, x) / f_dense
      for r in a.ratios:
        for variant, tree in (("default", small[r]), ("autotuned", fast[r]),
                              ("default, xla options", small[r])):
          f_ratio = flops(low_fn, tree, x) / f_dense
          xla = variant.endswith("xla options")
          dense_t, floor_t = ((times["dense, xla options"], times["floor, xla options"]) if xla
                              else (times["dense"], times["floor"]))
          lat = plots.ratio(times[(variant, r)], dense_t)
          floor_lat = plots.ratio(floor_t, dense_t)
          # the part the factorization shrinks: latency and FLOPs above the rank-1 floor
          kernels = (lat - floor_lat) / max(f_ratio - f_floor, 1e-9) * (1 - f_floor) / (1 - floor_lat)
          rows.append([name, b, r, variant, n_params(tree) / p_dense, f_ratio, lat,
                       lat / f_ratio, floor_lat, kernels, plots.median(dense_t) * 1e3,
                       plots.median(times[(variant, r)]) * 1e3,
                       goal(b, r, f_ratio, lat, floor_lat, f_floor)])
      print(f"{name} batch {b}: dense {plots.median(times['dense']) * 1e3:.2f} ms "
            f"({plots.median(times['dense, xla options']) * 1e3:.2f} ms under XLA's options)",
            flush=True)
  cols = ["model", "batch", "ratio", "variant", "params kept", "FLOP ratio", "latency ratio",
          "latency / FLOPs", "floor latency", "kernels: latency / FLOPs", "dense ms",
          "factorized ms", "goal (batch 32: <= 1.5x FLOPs, <= dense)"]
  tab = plots.table(cols, rows)
  fig, axes = plots.figure(1, len(a.models))
  for ax, name in zip(axes[0], a.models):
    for b in a.batches:
      for variant, style in (("default", "o-"), ("autotuned", "s--"),
                             ("default, xla options", "x:")):
        pts = [(r[5], r[6]) for r in rows if r[0] == name and r[1] == b and r[3] == variant]
        if pts:
          ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=f"batch {b} {variant}")
    ax.plot([0, 1], [0, 1], ":", c="gray", label="latency = FLOPs")
    ax.plot([0, 1], [0, 1.5], ":", c="red", lw=0.8, label="1.5x FLOPs")
    ax.set_xlabel("FLOP ratio (factorized / dense)")
    ax.set_ylabel("latency ratio")
    ax.set_title(name)
    ax.legend(fontsize=7)
  png = plots.save(fig, NAME, a.out_dir)
  result = {
      "name": NAME, "title": "Inference latency vs FLOPs (factorized / dense, jitted forward)",
      "setup": {"ratios": a.ratios, "batches": a.batches, "repeats": a.repeats,
                "models": a.models, "width_divisor": a.scale,
                "note": "transformer batches above 128 skipped (460 GFLOP per forward)"},
      "machine": plots.machine(argv, NAME), "table": tab, "png": png,
      "convnet_layers": plots.table(["ratio", "layer", "dense ms", "channel ms", "spatial ms",
                                     "rank", "autotune chose"], layers),
  }
  plots.write(NAME, result, a.out_dir)
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
