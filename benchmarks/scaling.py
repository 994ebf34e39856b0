"""Figure 6: how factorize cost grows with matrix size and rank, and factorize on a mesh.

Exact SVD costs O(m n min(m, n)) -- slope 3 in log(time) vs log(n) for n x n matrices
--, the randomized range finder O(m n r): slope 2 at a fixed rank, 3 when the rank
grows with n (but with a constant about ``r / n`` times smaller). Measured on
``jlr.factorize`` of one n x n Gaussian matrix at three sizes, exact and randomized,
variants interleaved; the slope is a least-squares fit of log time on log n.

Mesh: the same ``jlr.factorize`` call on a BERT-block-shaped tree placed with
``jlr.sharding.place(params, make_mesh("data=4,model=2"), "fsdp_tp")`` on 8 simulated
CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=8``, set by this script
before JAX is imported), against the unsharded tree: time ratio and the largest
relative difference of the reconstructed matrices ``u @ v``. On one CPU the 8 devices
share the same cores, so this shows that factorize runs sharded and gives the same
numbers, not a multi-device speed-up.

    python benchmarks/scaling.py [--quick]
"""

from __future__ import annotations

import os
import sys

if "jax" not in sys.modules:  # must precede JAX's initialization
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402

import plots  # noqa: E402,I001  (before numpy: sets OPENBLAS_NUM_THREADS)

import numpy as np  # noqa: E402

NAME = "scaling"


def parse(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true", help="sizes 512, 1024, 2048; 3 repeats")
  p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--sizes", type=int, nargs="+", default=None)
  p.add_argument("--rank", type=int, default=32, help="the fixed rank")
  p.add_argument("--fraction", type=float, default=0.125, help="rank = fraction * n")
  p.add_argument("--repeats", type=int, default=None)
  p.add_argument("--out-dir", default=None)
  a = p.parse_args(argv)
  a.sizes = a.sizes or ([32, 64] if a.tiny else [512, 1024, 2048] if a.quick else [1024, 2048, 4096])
  a.repeats = a.repeats or (1 if a.tiny else 3 if a.quick else 5)
  a.d = 32 if a.tiny else 768 // 2 if a.quick else 768
  if a.tiny:
    a.rank = 4
  return a


def slope(ns, ts) -> float:
  return float(np.polyfit(np.log(ns), np.log(ts), 1)[0])


def main(argv=None) -> dict:
  a = parse(argv)
  import jax
  import jax.numpy as jnp
  import jlr

  key = jax.random.key(0)
  rng = np.random.default_rng(0)
  times: dict[str, list[float]] = {}
  rank_of = {"fixed": lambda n: a.rank, "proportional": lambda n: max(1, int(a.fraction * n))}
  for n in a.sizes:
    tree = {"kernel": jnp.asarray(rng.standard_normal((n, n)), jnp.float32)}
    fns = {}
    for kind, rk in rank_of.items():
      rule = jlr.ranks.fixed(rk(n))
      fns[f"svd/{kind}"] = lambda rule=rule, t=tree: jlr.factorize(t, rule, select="kernel")
      fns[f"randomized/{kind}"] = lambda rule=rule, t=tree: jlr.factorize(
          t, rule, select="kernel", method="randomized", key=key)
    res = plots.interleaved(fns, repeats=a.repeats, warmup=1)
    for k, v in res.items():
      times.setdefault(k, []).append(plots.median(v))
    print(f"n={n}: " + ", ".join(f"{k} {plots.median(v):.3f}s" for k, v in res.items()), flush=True)
  rows = []
  for k, ts in times.items():
    method, kind = k.split("/")
    expect = 3.0 if method == "svd" or kind == "proportional" else 2.0
    rows.append([method, kind, *ts, slope(a.sizes, ts), expect])
  tab = plots.table(["method", "rank", *[f"n={n} s" for n in a.sizes], "fitted slope",
                     "theory slope"], rows)

  # ---- the same factorize on a mesh
  mesh_row = None
  ndev = jax.device_count()
  if ndev >= 2:
    from factorize_speed import bert_tree

    spec = "data=4,model=2" if ndev >= 8 else f"data={ndev}"
    mesh = jlr.sharding.make_mesh(spec)
    tree = jax.tree_util.tree_map(jnp.asarray, bert_tree(a.d, 1, "gaussian"))
    placed = jlr.sharding.place(tree, mesh, "fsdp_tp")
    rule = jlr.ranks.ratio(0.25, min_rank=1)
    out = {}
    fns = {}
    for label, t in (("unsharded", tree), ("sharded", placed)):
      for method in ("svd", "randomized"):
        def f(t=t, method=method, label=label):
          out[(label, method)] = jlr.factorize(t, rule, method=method, key=key)
          return out[(label, method)]
        fns[f"{label}/{method}"] = f
    res = plots.interleaved(fns, repeats=a.repeats, warmup=1)
    mesh_rows = []
    for method in ("svd", "randomized"):
      us, sh = out[("unsharded", method)], out[("sharded", method)]
      diffs = []
      for x, y in zip(jax.tree_util.tree_leaves(us, is_leaf=jlr.is_lowrank),
                      jax.tree_util.tree_leaves(sh, is_leaf=jlr.is_lowrank)):
        if jlr.is_lowrank(x):
          mx, my = np.asarray(x.matrix()), np.asarray(y.matrix())
          diffs.append(float(np.abs(mx - my).max() / np.abs(mx).max()))
      f = next(l for l in jax.tree_util.tree_leaves(sh, is_leaf=jlr.is_lowrank) if jlr.is_lowrank(l))
      mesh_rows.append([method, spec, str(f.u.sharding.spec), str(f.v.sharding.spec),
                        plots.median(res[f"unsharded/{method}"]), plots.median(res[f"sharded/{method}"]),
                        plots.ratio(res[f"sharded/{method}"], res[f"unsharded/{method}"]), max(diffs)])
    mesh_row = plots.table(["method", "mesh", "u spec", "v spec", "unsharded s", "sharded s",
                            "sharded / unsharded", "max rel diff of u@v"], mesh_rows)

  fig, axes = plots.figure(1, 1)
  ax = axes[0][0]
  for k, ts in times.items():
    ax.loglog(a.sizes, ts, "o-", label=f"{k} (slope {slope(a.sizes, ts):.2f})")
  ax.set_xlabel("n (n x n matrix)")
  ax.set_ylabel("seconds")
  ax.set_title(f"jlr.factorize cost (fixed rank {a.rank}, proportional {a.fraction} n)")
  ax.legend(fontsize=7)
  png = plots.save(fig, NAME, a.out_dir)
  result = {
      "name": NAME, "title": "Scaling with matrix size and rank; factorize on a device mesh",
      "setup": {"sizes": a.sizes, "fixed_rank": a.rank, "fraction": a.fraction,
                "repeats": a.repeats, "mesh_tree_d": a.d},
      "machine": plots.machine(argv, NAME), "table": tab, "png": png,
  }
  if mesh_row is not None:
    result["mesh"] = mesh_row
  else:
    result["mesh_note"] = "only one device: set XLA_FLAGS before importing jax to test the mesh"
  plots.write(NAME, result, a.out_dir)
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
