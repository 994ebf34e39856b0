"""Figure 1: how fast ``jlr.factorize`` is, and how close to optimal, on a BERT-base tree.

A BERT-base-shaped params tree (per block: q, k, v, o 768x768, up 768x3072, down
3072x768) is factorized at ``ranks.ratio(0.25)`` and ``ratio(0.1)`` (fraction of each
kernel's parameters kept, ``r = floor(x m n / (m + n))``) by

* ``jlr svd``        -- ``jlr.factorize(method="svd")`` (exact, leaf by leaf);
* ``jlr randomized`` -- ``jlr.factorize(method="randomized", key)``: Halko-Martinsson-Tropp
  with ``oversample=10``, ``n_iter=2``;
* ``jlr rand batched`` -- a prototype of stacking same-shape leaves into one batched
  randomized SVD (see :func:`batched_factorize`; not in jlr);
* ``numpy svd loop`` -- ``numpy.linalg.svd(full_matrices=False)`` per layer, truncated;
* ``sklearn randomized`` -- ``sklearn.utils.extmath.randomized_svd`` per layer with the
  same rank, ``n_oversamples=10``, ``n_iter=2`` and QR power-iteration normalization.

Reported: time relative to the numpy loop (median of per-repeat ratios, variants
interleaved) and the error relative to optimal, ``||W - W_r||_F / ||W - W_r^*||_F`` over
the whole tree, with ``||W - W_r^*||_F^2 = sum_{i>r} s_i^2`` (Eckart-Young) from the
numpy SVD. Two spectra: ``decaying`` (``s_i = (1 + i)^-0.5`` with random orthogonal
singular vectors, a stand-in for trained weights) and ``gaussian`` (i.i.d. entries, a
flat Marchenko-Pastur spectrum: the hardest case for randomized SVD).

    python benchmarks/factorize_speed.py [--quick]
"""

from __future__ import annotations

import argparse
import functools
import sys

import plots  # noqa: I001  (first: sets OPENBLAS_NUM_THREADS before numpy loads)

import numpy as np

NAME = "factorize_speed"
METHODS = ("jlr svd", "jlr randomized", "jlr rand batched", "numpy svd loop", "sklearn randomized")


def parse(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true", help="1 block, 3 repeats")
  p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # tests: d=32
  p.add_argument("--blocks", type=int, default=None)
  p.add_argument("--repeats", type=int, default=None)
  p.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.1])
  p.add_argument("--spectra", nargs="+", default=["decaying", "gaussian"])
  p.add_argument("--out-dir", default=None)
  a = p.parse_args(argv)
  if a.tiny:
    a.ratios, a.spectra = a.ratios[:1], a.spectra[-1:]
  a.d = 32 if a.tiny else 768
  a.blocks = a.blocks or (1 if a.tiny or a.quick else 12)
  a.repeats = a.repeats or (1 if a.tiny else 3 if a.quick else 5)
  return a


def matrix(rng, m, n, spectrum):
  if spectrum == "gaussian":
    return (rng.standard_normal((m, n)) / np.sqrt(m)).astype(np.float32)
  k = min(m, n)
  u, _ = np.linalg.qr(rng.standard_normal((m, k)))
  v, _ = np.linalg.qr(rng.standard_normal((n, k)))
  s = (1.0 + np.arange(k)) ** -0.5
  return ((u * s) @ v.T).astype(np.float32)


def bert_tree(d, blocks, spectrum, seed=0):
  rng = np.random.default_rng(seed)
  shapes = {"query": (d, d), "key": (d, d), "value": (d, d), "out": (d, d),
            "intermediate": (d, 4 * d), "output": (4 * d, d)}
  return {"params": {f"layer_{i}": {k: {"kernel": matrix(rng, *s, spectrum), "bias": np.zeros(s[1], np.float32)}
                                    for k, s in shapes.items()} for i in range(blocks)}}


def kernels(tree):
  return [(f"{b}/{k}", leaf["kernel"]) for b, layer in tree["params"].items() for k, leaf in layer.items()]


@functools.lru_cache(maxsize=None)
def _batched_fn(layout, rank, method, oversample, n_iter):
  import jax
  from jlr import svd as svd_lib
  from jlr.lowrank import from_svd

  @jax.jit
  def fn(stack, key):
    mats = jax.vmap(layout.to_matrix)(stack)
    kw = dict(key=key, oversample=oversample, n_iter=n_iter) if method == "randomized" else {}
    u, s, vt = svd_lib.truncated(mats, rank, method=method, **kw)
    return from_svd(u, s, vt, layout, dtype=stack.dtype)
  return fn


def batched_factorize(params, rank, *, method="randomized", key=None, oversample=10, n_iter=2):
  """Prototype: ``jlr.factorize`` with same-(layout, rank) leaves stacked into one call.

  Same plan as jlr, one jitted batched SVD per group instead of one per leaf, then the
  stacked factors are sliced back into per-leaf ``LowRank`` s.
  """
  import jax
  import jax.numpy as jnp
  import jlr
  from jlr.lowrank import LowRank
  from jlr.transforms import _leaves

  the_plan = jlr.plan(params, rank)
  leaves, treedef = _leaves(params)
  groups: dict = {}
  for i, (path, leaf) in enumerate(leaves):
    e = the_plan.get(path)
    if e is not None and not e.batch_shape:
      groups.setdefault((e.layout, e.rank), []).append(i)
  out = [leaf for _, leaf in leaves]
  for g, ((layout, r), idx) in enumerate(groups.items()):
    stack = jnp.stack([leaves[i][1] for i in idx])
    k = jax.random.fold_in(key, g) if key is not None else None
    f = _batched_fn(layout, r, method, oversample, n_iter)(stack, k)
    for j, i in enumerate(idx):
      out[i] = LowRank(f.u[j], f.v[j], layout)
  return jax.tree_util.tree_unflatten(treedef, out)


def main(argv=None) -> dict:
  a = parse(argv)
  import jax
  import jax.numpy as jnp
  import jlr
  from sklearn.utils.extmath import randomized_svd

  key = jax.random.key(0)
  rows, raw = [], {}
  for spectrum in a.spectra:
    tree_np = bert_tree(a.d, a.blocks, spectrum)
    tree = jax.tree_util.tree_map(jnp.asarray, tree_np)
    mats = kernels(tree_np)
    n_leaves = len(mats)
    state = {}

    def numpy_loop():
      state["np"] = [np.linalg.svd(w, full_matrices=False) for _, w in mats]
      return 0

    def sk_loop(x):
      res = []
      for _, w in mats:
        r = jlr.ranks.ratio(x).resolve(jlr.layouts.Layout("dense", w.shape), None)
        res.append(randomized_svd(w, r, n_oversamples=10, n_iter=2,
                                  power_iteration_normalizer="QR", random_state=0))
      state[("sk", x)] = res
      return 0

    fns = {"numpy svd loop": numpy_loop}
    for x in a.ratios:
      rule = jlr.ranks.ratio(x)

      def svd(rule=rule, x=x):
        state[("svd", x)] = jlr.factorize(tree, rule)
        return state[("svd", x)]

      def rnd(rule=rule, x=x):
        state[("rnd", x)] = jlr.factorize(tree, rule, method="randomized", key=key)
        return state[("rnd", x)]

      def bat(rule=rule, x=x):
        state[("bat", x)] = batched_factorize(tree, rule, method="randomized", key=key)
        return state[("bat", x)]

      fns.update({f"jlr svd@{x}": svd, f"jlr randomized@{x}": rnd,
                  f"jlr rand batched@{x}": bat, f"sklearn randomized@{x}": functools.partial(sk_loop, x)})
    times = plots.interleaved(fns, repeats=a.repeats, warmup=1)
    raw[spectrum] = times
    print(f"{spectrum}: " + ", ".join(f"{k} {plots.median(v):.3f}s" for k, v in times.items()),
          flush=True)

    s_all = [s for _, s, _ in state["np"]]
    for x in a.ratios:
      rs = [jlr.ranks.ratio(x).resolve(jlr.layouts.Layout("dense", w.shape), None) for _, w in mats]
      opt2 = sum(float(np.sum(s.astype(np.float64)[r:] ** 2)) for s, r in zip(s_all, rs))

      def err_of(approx):
        e2 = sum(float(np.sum((w.astype(np.float64) - p) ** 2)) for (_, w), p in zip(mats, approx))
        return float(np.sqrt(e2 / opt2))

      def lowrank_mats(t):
        return [np.asarray(t["params"][path.split("/")[0]][path.split("/")[1]]["kernel"].matrix(), np.float64)
                for path, _ in mats]

      approx = {
          "jlr svd": lowrank_mats(state[("svd", x)]),
          "jlr randomized": lowrank_mats(state[("rnd", x)]),
          "jlr rand batched": lowrank_mats(state[("bat", x)]),
          "numpy svd loop": [(u[:, :r] * s[:r]) @ vt[:r] for (u, s, vt), r in zip(state["np"], rs)],
          "sklearn randomized": [(u * s) @ vt for u, s, vt in state[("sk", x)]],
      }
      base = times["numpy svd loop"]
      for m in METHODS:
        t = base if m == "numpy svd loop" else times[f"{m}@{x}"]
        speed = plots.ratio(base, t)
        err = err_of(approx[m])
        rows.append([spectrum, f"ratio({x})", m, plots.median(t), speed, err,
                     bool(speed >= 10 and err <= 1.05)])
  cols = ["spectrum", "rank rule", "method", "median s", "speed-up vs numpy", "error / optimal",
          "goal (>=10x, <=1.05)"]
  tab = plots.table(cols, rows)
  fig, axes = plots.figure(1, len(a.spectra))
  for ax, spectrum in zip(axes[0], a.spectra):
    for m in METHODS:
      pts = [(r[4], r[5]) for r in rows if r[0] == spectrum and r[2] == m]
      ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=m)
    ax.axvline(10, ls=":", c="gray")
    ax.axhline(1.05, ls=":", c="gray")
    ax.set_xscale("log")
    ax.set_xlabel("speed-up vs numpy SVD loop")
    ax.set_ylabel("Frobenius error / optimal")
    ax.set_title(f"{spectrum} spectrum, {a.blocks} BERT blocks (d={a.d})")
  axes[0][0].legend(fontsize=7)
  png = plots.save(fig, NAME, a.out_dir)
  result = {
      "name": NAME, "title": "Factorize speed and error (BERT-base-shaped tree)",
      "setup": {"d": a.d, "blocks": a.blocks, "leaves": n_leaves, "repeats": a.repeats,
                "ratios": a.ratios, "oversample": 10, "n_iter": 2},
      "machine": plots.machine(argv, NAME), "table": tab, "png": png,
      "raw_seconds": raw,
  }
  plots.write(NAME, result, a.out_dir)
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
