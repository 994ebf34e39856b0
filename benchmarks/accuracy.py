"""Figure 4: test accuracy vs compression on MNIST, five ways, at equal parameter budgets.

Model: an MLP 784-512-512-10 (``Dense_0``, ``Dense_1``, ``Dense_2``). The two hidden
kernels are compressed to a fraction ``x`` of their parameters (``ranks.ratio(x)``:
``r = floor(x m n / (m + n))``, the same ranks for every method); the 512x10 classifier
stays dense everywhere. Methods (Adam 1e-3, batch 128, the same epochs and data order):

* ``dense``            -- the uncompressed model (the reference);
* ``svd``              -- post-training truncated SVD of the dense model (``jlr.factorize``);
* ``svd + fine-tune``  -- the same, then ``--finetune`` epochs training the factors;
* ``trp``              -- TRP (Xu et al. 2019, ``jlr.trp``): ``nuclear_norm(3e-4)`` on
  projection steps + ``project(every=20, ratio(x))`` around Adam from scratch, then
  ``jlr.factorize`` at ``ratio(x)`` (the weights already sit at that rank);
* ``lod``              -- Maestro LoD (Horvath et al. 2024, ``jlr.lod``): full-rank factors
  trained from scratch with ordered dropout (``sample``, layer sampler) and the
  hierarchical group lasso (``lam=1e-4``); ONE training run serves every budget through
  ``lod.extract(ranks=...)`` (its nested prefixes).

    python benchmarks/accuracy.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys

import plots

NAME = "accuracy"
HIDDEN = ("Dense_0", "Dense_1")


def parse(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true", help="20k training images, 2 epochs")
  p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--keep", type=float, nargs="+", default=[0.25, 0.1])
  p.add_argument("--epochs", type=int, default=None)
  p.add_argument("--finetune", type=int, default=1)
  p.add_argument("--train-limit", type=int, default=None)
  p.add_argument("--dataset", default="mnist")
  p.add_argument("--out-dir", default=None)
  a = p.parse_args(argv)
  if a.tiny:
    a.dataset, a.keep = "digits", a.keep[:1]
  a.epochs = a.epochs or (1 if a.tiny else 2 if a.quick else 5)
  a.train_limit = a.train_limit or (20000 if a.quick else None)
  a.width = 32 if a.tiny else 512
  return a


def main(argv=None) -> dict:
  a = parse(argv)
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  import jlr
  import jlr.flax
  from jlr import lod

  sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
  import data  # examples/data.py

  xtr, ytr, xte, yte = data.load(a.dataset)
  xtr, ytr = xtr[: a.train_limit], ytr[: a.train_limit]
  flat = lambda x: x.reshape(len(x), -1)  # noqa: E731
  xtr, xte = flat(xtr), flat(xte)
  width = a.width

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Dense(width)(x))
      x = nn.relu(nn.Dense(width)(x))
      return nn.Dense(10)(x)

  model = MLP()
  init = model.init(jax.random.key(0), xtr[:1])
  hidden = lambda path, leaf: any(f"/{h}/" in path for h in HIDDEN) and path.endswith("kernel")  # noqa: E731

  def fwd(p, x):
    return jlr.flax.apply(model, p, x)

  def ce(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def fit(params, tx, epochs, loss=None, seed=0):
    loss = loss or (lambda p, x, y, k: ce(fwd(p, x), y))
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, x, y, k):
      g = jax.grad(loss)(params, x, y, k)
      upd, opt = tx.update(g, opt, params)
      return optax.apply_updates(params, upd), opt

    rng = np.random.default_rng(seed)
    key = jax.random.key(seed)
    for _ in range(epochs):
      for x, y in data.batches(xtr, ytr, 128, rng):
        key, k = jax.random.split(key)
        params, opt = step(params, opt, x, y, k)
    return params

  acc_fn = jax.jit(lambda p, x, y: jnp.mean(jnp.argmax(fwd(p, x), -1) == y))

  def acc(p):
    return float(np.mean([acc_fn(p, xte[i:i + 2000], yte[i:i + 2000]) for i in range(0, len(xte), 2000)]))

  def size(p):
    return int(sum(x.size for x in jax.tree_util.tree_leaves(p)))

  adam = optax.adam(1e-3)
  dense = fit(init, adam, a.epochs)
  rows = [["dense", 1.0, size(dense), acc(dense)]]
  print(f"dense: {rows[-1][3]:.4f}", flush=True)
  lod_params = fit(lod.init(init, select=hidden), adam, a.epochs,
                   loss=lambda p, x, y, k: ce(fwd(lod.sample(p, k), x), y) + 1e-4 * lod.group_lasso(p))
  for keep in a.keep:
    rule = jlr.ranks.ratio(keep, min_rank=1)  # the exact fraction, as before
    svd = jlr.factorize(dense, rule, select=hidden)
    ft = fit(svd, adam, a.finetune, seed=1)
    trp_tx = optax.chain(jlr.trp.nuclear_norm(3e-4, every=20, rank=rule, select=hidden), adam,
                         jlr.trp.project(20, rule, select=hidden))
    trp = jlr.factorize(fit(init, trp_tx, a.epochs), rule, select=hidden)
    the_plan = jlr.plan(dense, rule, select=hidden)
    ranks = {path: e.rank for path, e in the_plan.items()}
    lod_x = lod.extract(lod_params, ranks=ranks)
    for name, p in (("svd", svd), ("svd + fine-tune", ft), ("trp", trp), ("lod", lod_x)):
      rows.append([name, keep, size(p), acc(p)])
      print(f"{name} keep {keep}: {rows[-1][3]:.4f} ({rows[-1][2]} params)", flush=True)
  for r in rows:
    r.insert(3, r[2] / rows[0][2])
  cols = ["method", "kernels kept", "params", "params / dense", "test accuracy"]
  tab = plots.table(cols, rows)
  fig, axes = plots.figure(1, 1)
  ax = axes[0][0]
  for name in ("svd", "svd + fine-tune", "trp", "lod"):
    pts = sorted((r[3], r[4]) for r in rows if r[0] == name)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=name)
  ax.axhline(rows[0][4], ls=":", c="gray", label="dense")
  ax.set_xlabel("params / dense")
  ax.set_ylabel("test accuracy")
  ax.set_title(f"{a.dataset} MLP 784-{width}-{width}-10")
  ax.legend(fontsize=7)
  png = plots.save(fig, NAME, a.out_dir)
  result = {
      "name": NAME, "title": f"Accuracy vs compression ({a.dataset} MLP, equal budgets)",
      "setup": {"dataset": a.dataset, "train_images": len(xtr), "epochs": a.epochs,
                "finetune_epochs": a.finetune, "keep": a.keep, "width": width},
      "machine": plots.machine(argv, NAME), "table": tab, "png": png,
  }
  plots.write(NAME, result, a.out_dir)
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
