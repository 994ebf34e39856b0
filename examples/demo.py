"""``make demo``: train a small CNN, factorize it at several ratios, compare.

1. Trains a flax.linen CNN (two 3x3 convs, two dense layers) with Adam on
   scikit-learn's bundled 8x8 digits (``--data mnist`` / ``fashion_mnist`` for the
   28x28 sets; see ``data.py``). Everything runs offline on CPU.
2. For each kept fraction r it factorizes the trained kernels three ways and runs the
   *unchanged* model on them with ``jlr.flax.apply`` (``x @ u @ v``, never ``u @ v``):
   uniform ``jlr.ranks.ratio(r)`` on every kernel it shrinks; one global
   ``jlr.ranks.budget(r)`` spread by spectral energy per parameter; and uniform with the
   first conv and the classifier kept dense (those two small, near-full-rank matrices
   are where a uniform ratio hurts most).
3. Prints params and test accuracy per strategy, then ``jlr.summary`` of one tree.

Ratio 1.0 is the dense model as trained: ``ratio(1.0)`` would still factorize the
kernels whose full-rank factors are smaller than the kernel itself.

    python examples/demo.py                     # digits, < 1 minute on 2 CPU cores
    python examples/demo.py --data mnist        # 1 epoch: about 1.5 minutes more
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
warnings.filterwarnings("ignore", category=DeprecationWarning)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # `data` when run from elsewhere

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import jlr  # noqa: E402
import jlr.flax  # noqa: E402
from data import NAMES, batches, load  # noqa: E402

DEFAULT_EPOCHS = {"digits": 30, "mnist": 1, "fashion_mnist": 1}
# The middle layers. The first conv (a 9x32 matrix: 1 input channel) and the classifier
# (128x10) are tiny and near full rank; a uniform ratio cuts most of their rank.
INNER = ("Conv_1/kernel", "Dense_0/kernel")


class CNN(nn.Module):
  """Conv(32, 3x3) -> pool -> Conv(64, 3x3) -> pool -> Dense(128) -> Dense(classes)."""

  classes: int = 10

  @nn.compact
  def __call__(self, x):
    x = nn.max_pool(nn.relu(nn.Conv(32, (3, 3))(x)), (2, 2), strides=(2, 2))
    x = nn.max_pool(nn.relu(nn.Conv(64, (3, 3))(x)), (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(128)(x))
    return nn.Dense(self.classes)(x)


def train(model, x_train, y_train, *, epochs, batch_size, lr, seed):
  """Adam on softmax cross-entropy; returns the trained variables."""
  variables = model.init(jax.random.key(seed), x_train[:1])
  tx = optax.adam(lr)
  opt_state = tx.init(variables)

  @jax.jit
  def step(variables, opt_state, x, y):
    def loss_fn(v):
      logits = model.apply(v, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(variables)
    updates, opt_state = tx.update(grads, opt_state, variables)
    return optax.apply_updates(variables, updates), opt_state, loss

  rng = np.random.default_rng(seed)
  steps_per_epoch = len(x_train) // batch_size
  with tqdm(total=epochs * steps_per_epoch, desc="train", unit="step", dynamic_ncols=True,
            leave=False) as bar:
    for epoch in range(1, epochs + 1):
      for x, y in batches(x_train, y_train, batch_size, rng):
        variables, opt_state, loss = step(variables, opt_state, x, y)
        bar.update()
      bar.set_postfix(epoch=f"{epoch}/{epochs}", loss=f"{float(loss):.4f}")
  return variables


def accuracy(predict, variables, x, y, batch_size: int = 1000) -> float:
  """Test accuracy; ``predict`` is jitted, batches keep memory flat on the 28x28 sets."""
  correct = 0
  for i in range(0, len(x), batch_size):
    logits = predict(variables, x[i: i + batch_size])
    correct += int((jnp.argmax(logits, -1) == y[i: i + batch_size]).sum())
  return correct / len(x)


STRATEGIES = {
    # name: (rank rule for a kept fraction r, select)
    "uniform": (jlr.ranks.ratio, None),
    "budget": (jlr.ranks.budget, None),
    "ends dense": (jlr.ranks.ratio, list(INNER)),
}


def forward_flops(predict, variables, x) -> float:
  """FLOPs of one example's forward pass, counted by XLA on the compiled function
  (so it is what actually runs: ``x @ u @ v``, never ``u @ v``)."""
  return predict.lower(variables, x[:1]).compile().cost_analysis()["flops"]


def compare(predict, variables, x_test, y_test, ratios, layouts=None) -> dict:
  """One row per kept fraction r, one (params, FLOPs, accuracy) triple per strategy:

  * uniform    -- ``ranks.ratio(r)``: every kernel keeps a fraction r of its params
                  (at rank >= 8: the default floor, so tiny layers stay usable);
  * budget     -- ``ranks.budget(r)``: one global budget of r x (all kernel params),
                  allocated by marginal spectral energy per parameter;
  * ends dense -- ``ranks.ratio(r)`` on the inner layers only (``select=INNER``).

  Returns ``{(strategy, r): jlr.summary}``.
  """
  head = ["kept r"]
  for name in STRATEGIES:
    head += [f"{name} params", "FLOPs", "acc"]
  rows, reports = [], {}
  for r in ratios:
    row = ["1.0 (dense)" if r >= 1.0 else f"{r:g}"]
    for name, (rule, select) in STRATEGIES.items():
      tree = variables if r >= 1.0 else jlr.factorize(variables, rule(r), select=select,
                                                       layout=layouts)
      rep = reports[name, r] = jlr.summary(tree)
      row += [f"{rep.total_params:,}", f"{forward_flops(predict, tree, x_test) / 1e3:,.0f}k",
              f"{accuracy(predict, tree, x_test, y_test):.2%}"]
    rows.append(row)
  widths = [max(len(c[i]) for c in (head, *rows)) for i in range(len(head))]
  line = lambda cells: "  ".join(  # noqa: E731
      c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
  print(line(head))
  print("-" * len(line(head)))
  for row in rows:
    print(line(row))
  return reports


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--data", choices=NAMES, default="digits")
  p.add_argument("--epochs", type=int, default=None,
                 help=f"training epochs (default per dataset: {DEFAULT_EPOCHS})")
  p.add_argument("--batch-size", type=int, default=64)
  p.add_argument("--lr", type=float, default=1e-3)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--ratios", type=float, nargs="+", default=[1.0, 0.75, 0.5, 0.25, 0.1],
                 help="fractions of each kernel's parameters kept; 1.0 = the dense model")
  p.add_argument("--show", type=float, default=0.25,
                 help="ratio whose per-layer jlr.summary is printed (0 = none)")
  args = p.parse_args(argv)
  epochs = args.epochs if args.epochs is not None else DEFAULT_EPOCHS[args.data]

  t0 = time.perf_counter()
  x_train, y_train, x_test, y_test = load(args.data)
  print(f"{args.data}: {len(x_train):,} train / {len(x_test):,} test images of shape "
        f"{x_train.shape[1:]}, {jax.device_count()} {jax.default_backend()} device(s)")

  model = CNN(classes=int(y_train.max()) + 1)
  variables = train(model, x_train, y_train, epochs=epochs, batch_size=args.batch_size,
                    lr=args.lr, seed=args.seed)
  print(f"trained {epochs} epoch{'s' * (epochs != 1)} in {time.perf_counter() - t0:.1f}s\n")

  # One jitted function serves every ratio; it retraces per tree structure/shapes.
  predict = jax.jit(lambda v, x: jlr.flax.apply(model, v, x))
  layouts = jlr.flax.layouts(model, variables, x_test[:1])  # read from the model, not guessed
  reports = compare(predict, variables, x_test, y_test, args.ratios, layouts)
  print("\nparams: all leaves, biases included. FLOPs: one image's forward, counted by XLA on the "
        "compiled function. uniform: every kernel keeps r of its params; "
        "budget: one global\nbudget of r x kernel params spread by spectral energy per "
        f"parameter; ends dense: uniform on {list(INNER)} only.")
  shown = reports.get(("budget", args.show))
  if shown is not None:
    print(f"\njlr.summary(jlr.factorize(variables, jlr.ranks.budget({args.show:g}))) -- "
          "FLOPs per layer application (input row / conv output position):\n")
    print(shown)
  print(f"\ntotal {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
  main()
