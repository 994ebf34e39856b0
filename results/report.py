"""Tables and plots from the suite's JSONs only (``results/runs/<size>/<task>/*.json``).

    python results/report.py                 # the CPU size: print, write the PNG, update README.md
    python results/report.py --size quick --out /tmp/r --no-readme

Every number is the mean +- sample std over the seeds that have a JSON (n is shown).
A difference smaller than the spread is reported as none: a method *ties* the best of
its column when ``best - mean <= std_best + std`` (one-sigma intervals overlap) and is
marked ``=``; the best is in bold.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# label, how to find it: (cell, key inside the JSON), in table order
CURVE = [
    ("SVD of dense (no training)", "dense", "derived/svd@{b}"),
    ("whitened SVD of dense (no training)", "dense", "derived/whiten@{b}"),
    ("SVD + fine-tune", "svd_ft@{b}", "score"),
    ("whitened SVD + fine-tune", "whiten_ft@{b}", "score"),
    ("low-rank from scratch", "scratch@{b}", "score"),
    ("TRP + nuclear norm at the budget", "trp_nu@{b}", "score"),
    ("LoD, progressive shrink to the budget", "lod@{b}", "score"),
    ("LoD nested (one run, extracted)", "lod_nested", "derived/lod_nested@{b}"),
]
SEPARATE = [("LoD nested + fine-tune (T + F steps)", "lod_nested_ft@{b}", "score")]
TRP_ROWS = [("TRP channel", "trp_channel"), ("TRP spatial", "trp_spatial"),
            ("TRP channel + Nu", "trp_nu_channel"), ("TRP spatial + Nu", "trp_nu_spatial")]
# Xu et al. 2019, Table 1 (CIFAR-10 ResNet-20): top-1 and FLOP speed-up
# (the rows without the nuclear norm are left out: examples/trp_cnn.py cites only these)
PAPER_TRP = {"dense": (91.74, 1.0), "trp_nu_channel": (90.50, 2.17), "trp_nu_spatial": (90.62, 2.84)}


def load(size: str, task: str, runs: str) -> dict[str, list[dict]]:
  """``{cell: [record per seed]}``."""
  out: dict[str, list[dict]] = {}
  for path in sorted(glob.glob(os.path.join(runs, size, task, "*_s*.json"))):
    with open(path) as f:
      rec = json.load(f)
    out.setdefault(rec["cell"], []).append(rec)
  return out


def get(rec: dict, key: str):
  for part in key.split("/"):
    rec = rec.get(part) if isinstance(rec, dict) else None
  return rec


def stat(recs: list[dict] | None, key: str, metric: str = "test_acc"):
  """``(mean, std, n, [values])`` of ``metric`` at ``key`` over the seeds (``None`` if none)."""
  vals = [get(r, key)[metric] for r in recs or [] if get(r, key) is not None]
  if not vals:
    return None
  a = np.asarray(vals, np.float64)
  return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0, len(a), vals


def fmt(s, pct=True, bold=False, tie=False) -> str:
  if s is None:
    return "-"
  m, sd, n = s[:3]
  text = f"{100 * m:.2f} ± {100 * sd:.2f}" if pct else f"{m:.2f} ± {sd:.2f}"
  text = f"**{text}**" if bold else text + (" =" if tie else "")
  return f"{text} ({n})" if n != 3 else text


def ties(cells: dict):
  """``{label: (is_best, ties_best)}`` for one column ``{label: stat}``."""
  have = {k: v for k, v in cells.items() if v is not None}
  if not have:
    return {}
  best = max(have, key=lambda k: have[k][0])
  bm, bs = have[best][:2]
  return {k: (k == best, k != best and bm - v[0] <= bs + v[1]) for k, v in have.items()}


def curve_table(data, budgets) -> tuple[str, dict]:
  dense = stat(data.get("dense"), "score")
  cols = {}
  for b in budgets:
    cols[b] = {label: stat(data.get(cell.format(b=f"{b:g}")), key.format(b=f"{b:g}"))
               for label, cell, key in CURVE}
  marks = {b: ties(cols[b]) for b in budgets}
  head = ["method (T steps each)"] + [f"{b:.0%} of kernel params" for b in budgets]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  lines.append("| dense (100%) | " + " | ".join(fmt(dense) for _ in budgets) + " |")
  for label, _, _ in CURVE:
    row = [fmt(cols[b][label], bold=marks[b].get(label, (0, 0))[0],
               tie=marks[b].get(label, (0, 0))[1]) for b in budgets]
    lines.append(f"| {label} | " + " | ".join(row) + " |")
  for label, cell, key in SEPARATE:
    row = [fmt(stat(data.get(cell.format(b=f"{b:g}")), key)) for b in budgets]
    lines.append(f"| *{label}* | " + " | ".join(row) + " |")
  return "\n".join(lines), cols


def trp_table(data) -> str:
  dense = stat(data.get("dense"), "score")
  head = ["run", "top-1 (decoupled)", "FLOP speed-up", "kernel params kept",
          "SVD of dense at the same ranks", "paper top-1 (CIFAR-10)", "paper speed-up"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  p = PAPER_TRP["dense"]
  lines.append(f"| dense | {fmt(dense)} | 1.00 | 100% | - | {p[0]:.2f} | {p[1]:.2f} |")
  for label, cell in TRP_ROWS:
    recs = data.get(cell)
    paper = [f"{v:.2f}" for v in PAPER_TRP[cell]] if cell in PAPER_TRP else ["-", "-"]
    lines.append(" | ".join([
        f"| {label}", fmt(stat(recs, "score")), fmt(stat(recs, "score", "flop_speedup"), pct=False),
        fmt(stat(recs, "score", "kernel_fraction")).replace(" ± ", "% ± ") if recs else "-",
        fmt(stat(recs, "dense_svd_same_ranks")), *paper]) + " |")
  return "\n".join(lines)


def ablation_table(data) -> str:
  """Seed-0 validation accuracy of every ``cell~setting`` next to its default ``cell``."""
  lines = ["| method | setting | val acc | default's val acc | difference |", "|---|---|---|---|---|"]
  best = {}
  for cell in sorted(c for c in data if "~" in c):
    base, _, setting = cell.partition("~")
    (rec,) = [r for r in data[cell] if r["seed"] == 0] or [None]
    ref = [r for r in data.get(base, []) if r["seed"] == 0]
    if rec is None:
      continue
    v = rec["score"]["val_acc"]
    r0 = ref[0]["score"]["val_acc"] if ref else None
    diff = f"{100 * (v - r0):+.2f}" if r0 is not None else "-"
    lines.append(f"| {base} | {setting} | {100 * v:.2f} | "
                 f"{'-' if r0 is None else f'{100 * r0:.2f}'} | {diff} |")
    if r0 is not None and v > best.get(base, (None, r0))[1]:
      best[base] = (setting, v)
  if len(lines) == 2:
    return ""
  found = "; ".join(f"{b}: {s_} ({100 * v:.2f})" for b, (s_, v) in best.items()) or \
      "no setting beat the defaults"
  return "\n".join(lines) + f"\n\nBest on validation (seed 0): {found}."


def winners(cols, budgets) -> str:
  out = []
  for b in budgets:
    m = ties(cols[b])
    if not m:
      continue
    best = [k for k, (is_best, _) in m.items() if is_best][0]
    tied = [k for k, (_, t) in m.items() if t]
    out.append(f"at {b:.0%}: best {best}" + (f" (no difference from: {', '.join(tied)})" if tied else ""))
  return "; ".join(out)


def plot(path: str, data, budgets, cols, title: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7.2, 4.6), dpi=120)
  dense = stat(data.get("dense"), "score")
  if dense:
    ax.axhline(100 * dense[0], color="k", lw=1, ls="--", label="dense")
  for i, (label, _, _) in enumerate(CURVE):
    pts = [(b, cols[b][label]) for b in budgets if cols[b][label] is not None]
    if pts:
      ax.errorbar([100 * b for b, _ in pts], [100 * s[0] for _, s in pts],
                  yerr=[100 * s[1] for _, s in pts], marker="o", capsize=3, label=label,
                  color=f"C{i}")
  ax.set_xscale("log")
  ax.set_xticks([100 * b for b in budgets], [f"{b:.0%}" for b in budgets])
  ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
  ax.set_xlabel("block-conv kernel parameters kept")
  ax.set_ylabel("test accuracy (%)")
  ax.set_title(title, fontsize=9)
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=7, loc="lower right")
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def render(size: str, runs: str) -> tuple[str, dict]:
  """The README block of the ResNet-20 task and what the plot needs."""
  sys.path.insert(0, HERE)
  import resnet20

  data = load(size, "resnet20", runs)
  if not data:
    raise SystemExit(f"no results under {os.path.join(runs, size, 'resnet20')}: run results/suite.py")
  setting = resnet20.SIZES[size]
  budgets = setting.budgets
  curve, cols = curve_table(data, budgets)
  recs = [r for rs in data.values() for r in rs]
  wall = sum(r["wall_s"] for r in recs)
  dataset = recs[0]["dataset"]
  devices = sorted({r["device"] for r in recs})
  text = (f"ResNet-20 on {dataset}, size `{size}`: every run {setting.steps} SGD steps of "
          f"{setting.batch} images (fine-tunes: the last {setting.ft} of them), test accuracy "
          f"on {setting.test:,} images after BatchNorm recalibration, mean ± std over seeds "
          f"{', '.join(map(str, setting.seeds))} (n in brackets when fewer); bold: best of the "
          "column, `=`: within the spread of the best (no difference). "
          f"{len(recs)} runs, {wall / 3600:.1f} CPU-hours of cells on {'; '.join(devices)}. "
          f"Reproduce: `python results/suite.py --size {size} --jobs 2 && "
          f"python results/report.py --size {size}`.\n\n" + curve + "\n\n"
          f"Winners: {winners(cols, budgets)}.\n\n"
          "TRP's Table 1 shape (energy-threshold operating point, decoupled; our dataset is "
          f"{dataset}, the paper's CIFAR-10, so only the *gaps to dense* compare):\n\n"
          + trp_table(data))
  abl = ablation_table(data)
  if abl:
    text += ("\n\nAblation (one seed, the middle budget; chosen on the validation split, "
             f"{setting.val:,} held-out training images, never the test split):\n\n" + abl)
  return text, {"data": data, "budgets": budgets, "cols": cols, "dataset": dataset,
                "setting": setting}


def update_readme(readme: str, tag: str, block: str) -> None:
  with open(readme) as f:
    text = f.read()
  begin, end = f"<!-- results:{tag}:begin -->", f"<!-- results:{tag}:end -->"
  if begin not in text:
    raise SystemExit(f"{readme} has no {begin} ... {end} markers")
  pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
  text = pattern.sub(lambda _: f"{begin}\n{block}\n{end}", text)
  with open(readme, "w") as f:
    f.write(text)


def main(argv=None) -> str:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--size", default="cpu", choices=("quick", "cpu", "full"))
  p.add_argument("--runs", default=os.path.join(HERE, "runs"))
  p.add_argument("--out", default=HERE, help="where resnet20_<size>.png goes")
  p.add_argument("--readme", default=os.path.join(ROOT, "README.md"))
  p.add_argument("--no-readme", action="store_true", help="print only")
  args = p.parse_args(argv)
  block, ctx = render(args.size, args.runs)
  png = os.path.join(args.out, f"resnet20_{args.size}.png")
  os.makedirs(args.out, exist_ok=True)
  st = ctx["setting"]
  plot(png, ctx["data"], ctx["budgets"], ctx["cols"],
       f"ResNet-20 / {ctx['dataset']}: accuracy vs size at {st.steps} steps per run (mean ± std)")
  block += f"\n\n![accuracy vs size]({os.path.relpath(png, ROOT)})"
  print(block)
  if not args.no_readme:
    update_readme(args.readme, f"resnet20-{args.size}", block)
    print(f"\nupdated {args.readme}")
  return block


if __name__ == "__main__":
  main()
