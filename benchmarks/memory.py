"""Figure 5: memory of factorizing and of training, from XLA's compiled memory analysis.

``jax.jit(f).lower(*shapes).compile().memory_analysis()`` gives the bytes of a compiled
program's arguments, outputs and temporaries (and how many outputs alias donated
arguments). It is deterministic -- no noisy process RSS -- and needs no run, so large
trees cost only a compile. ``total = argument + output + temp - alias`` is the peak a
program can need for its buffers.

* factorize: one jitted ``jlr.factorize`` over a BERT-large-shaped tree (d=1024,
  ffn 4096) and, per distinct kernel shape, over that single kernel: exact SVD vs
  randomized. ``temp / kernel`` is the largest-intermediate check (jlr promises no
  dense intermediate much larger than the kernel).
* train step: one jitted Adam step (``optax.adam``, params and optimizer state donated)
  of the 4x2048 MLP (batch 256) and the BERT-base-sized transformer block (batch 32,
  seq 128), dense vs factorized at ``ranks.ratio(0.25)``.

    python benchmarks/memory.py [--quick]
"""

from __future__ import annotations

import argparse
import sys

import plots

NAME = "memory"
MB = 2.0 ** 20


def parse(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true", help="4 BERT-large blocks instead of 24")
  p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--blocks", type=int, default=None)
  p.add_argument("--ratio", type=float, default=0.25)
  p.add_argument("--out-dir", default=None)
  a = p.parse_args(argv)
  a.blocks = a.blocks or (1 if a.tiny else 4 if a.quick else 24)
  a.d = 64 if a.tiny else 1024
  a.scale = 16 if a.tiny else 1
  return a


def analysis(fn, *args, donate=()) -> dict:
  import jax
  m = jax.jit(fn, donate_argnums=donate).lower(*args).compile().memory_analysis()
  out = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp", "alias")}
  out["total"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
  return out


def tree_shapes(d, blocks):
  import jax
  import jax.numpy as jnp
  shapes = {"query": (d, d), "key": (d, d), "value": (d, d), "out": (d, d),
            "intermediate": (d, 4 * d), "output": (4 * d, d)}
  return {"params": {f"layer_{i}": {k: {"kernel": jax.ShapeDtypeStruct(s, jnp.float32)}
                                    for k, s in shapes.items()} for i in range(blocks)}}


def main(argv=None) -> dict:
  a = parse(argv)
  import jax
  import jax.numpy as jnp
  import optax
  import jlr
  import jlr.flax

  import inference_speed

  rule = jlr.ranks.ratio(a.ratio, min_rank=1)
  key = jax.random.key(0)
  facto = {"svd": lambda p: jlr.factorize(p, rule),
           "randomized": lambda p: jlr.factorize(p, rule, method="randomized", key=key)}
  rows_f = []
  tree = tree_shapes(a.d, a.blocks)
  kernel_bytes = sum(4 * x.size for x in jax.tree_util.tree_leaves(tree))
  trees = [(f"{a.blocks} blocks d={a.d}", tree)]
  if not a.tiny:  # per-shape rows: the largest intermediate of one leaf
    trees += [(f"{a.d}x{a.d}", {"kernel": jax.ShapeDtypeStruct((a.d, a.d), jnp.float32)}),
              (f"{a.d}x{4 * a.d}", {"kernel": jax.ShapeDtypeStruct((a.d, 4 * a.d), jnp.float32)})]
  for label, t in trees:
    kb = sum(4 * x.size for x in jax.tree_util.tree_leaves(t))
    for method, fn in facto.items():
      m = analysis(fn, t)
      rows_f.append([label, method, kb / MB, m["argument"] / MB, m["output"] / MB, m["temp"] / MB,
                     m["total"] / MB, m["temp"] / kb])
      print(f"factorize {label} {method}: temp {m['temp'] / MB:.1f} MB", flush=True)

  rows_t = []
  for name, batch in (("mlp", 256), ("transformer", 32))[: 1 if a.tiny else 2]:
    model, shape, _ = inference_speed.models(a.scale)[name]
    x = jnp.ones((batch // min(a.scale, 8), *shape), jnp.float32)
    variables = model.init(jax.random.key(0), x[:1])
    tx = optax.adam(1e-3)
    for label, params, apply in (
        ("dense", variables, model.apply),
        (f"ratio({a.ratio})", jlr.factorize(variables, rule),
         lambda v, x, model=model: jlr.flax.apply(model, v, x))):
      def step(params, opt, x, apply=apply):
        loss = lambda p: jnp.mean(jnp.square(apply(p, x)))
        g = jax.grad(loss)(params)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), opt
      m = analysis(step, params, tx.init(params), x, donate=(0, 1))
      n = sum(p.size for p in jax.tree_util.tree_leaves(params))
      rows_t.append([name, x.shape[0], label, n, m["argument"] / MB, m["temp"] / MB,
                     m["total"] / MB])
  for r in rows_t:
    dense = next(d for d in rows_t if d[0] == r[0] and d[2] == "dense")
    r.append(r[6] / dense[6])
  tab_f = plots.table(["tree", "method", "kernels MB", "argument MB", "output MB", "temp MB",
                       "total MB", "temp / kernels"], rows_f)
  tab_t = plots.table(["model", "batch", "params", "param count", "argument MB", "temp MB",
                       "total MB", "total / dense"], rows_t)
  fig, axes = plots.figure(1, 2)
  ax = axes[0][0]
  labels = [f"{r[0]}\n{r[1]}" for r in rows_f]
  ax.bar(range(len(rows_f)), [r[5] for r in rows_f], color=["C0" if r[1] == "svd" else "C1" for r in rows_f])
  ax.set_xticks(range(len(rows_f)), labels, fontsize=6, rotation=30)
  ax.set_ylabel("XLA temp MB")
  ax.set_title(f"factorize ratio({a.ratio}): temporaries")
  ax = axes[0][1]
  ax.bar(range(len(rows_t)), [r[6] for r in rows_t], color=["C2" if r[2] == "dense" else "C3" for r in rows_t])
  ax.set_xticks(range(len(rows_t)), [f"{r[0]}\n{r[2]}" for r in rows_t], fontsize=7)
  ax.set_ylabel("total MB (arg + out + temp - alias)")
  ax.set_title("Adam train step")
  png = plots.save(fig, NAME, a.out_dir)
  result = {
      "name": NAME, "title": "Memory (XLA compiled memory analysis)",
      "setup": {"d": a.d, "blocks": a.blocks, "ratio": a.ratio, "tree_kernel_MB": kernel_bytes / MB},
      "machine": plots.machine(argv, NAME), "table": tab_f, "train_step": tab_t, "png": png,
  }
  plots.write(NAME, result, a.out_dir)
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
