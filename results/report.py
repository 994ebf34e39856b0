"""Tables and plots from the suite's JSONs only (``results/runs/<size>/<task>/*.json``).

    python results/report.py                 # the CPU size: print, write the PNGs, update README.md
    python results/report.py --size quick --out /tmp/r --no-readme
    python results/report.py --task charlm   # one task

Every number is the mean +- sample std over the seeds that have a JSON (n is shown).
A difference smaller than the spread is reported as none: a method *ties* the best of
its column when ``best - mean <= std_best + std`` (one-sigma intervals overlap) and is
marked ``=``; the best is in bold.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import importlib
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
    ("from scratch, spectral init + Frobenius decay", "spectral@{b}", "score"),
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




@dataclasses.dataclass(frozen=True)
class Metric:
  """How a task is scored: ``test``/``val`` keys of a score, better when higher or lower."""
  test: str
  val: str
  higher: bool
  scale: float      # shown as scale * value
  digits: int
  label: str        # axis label
  unit: str = ""    # after the number (the kept-parameter column: "%")


METRICS = {"resnet20": Metric("test_acc", "val_acc", True, 100, 2, "test accuracy (%)"),
           "charlm": Metric("test_loss", "val_loss", False, 1, 3, "test loss (nats / char)")}
PERCENT = Metric("kernel_fraction", "", True, 100, 1, "", "%")
RATIO = Metric("flop_speedup", "", True, 1, 2, "")


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


def fmt(s, metric: Metric = METRICS["resnet20"], bold=False, tie=False) -> str:
  if s is None:
    return "-"
  m, sd, n = s[:3]
  k, d, u = metric.scale, metric.digits, metric.unit
  text = f"{k * m:.{d}f}{u} ± {k * sd:.{d}f}{u}"
  text = f"**{text}**" if bold else text + (" =" if tie else "")
  return f"{text} ({n})" if n != 3 else text


def ties(cells: dict, higher: bool = True):
  """``{label: (is_best, ties_best)}`` for one column ``{label: stat}``."""
  have = {k: v for k, v in cells.items() if v is not None}
  if not have:
    return {}
  sign = 1 if higher else -1
  best = max(have, key=lambda k: sign * have[k][0])
  bm, bs = have[best][:2]
  return {k: (k == best, k != best and sign * (bm - v[0]) <= bs + v[1]) for k, v in have.items()}


def rows(data, budgets, every: bool = False) -> list[tuple[str, str, str]]:
  """The :data:`CURVE` rows this size ran (the early ``cpu`` suite had no spectral
  cells), or ``every`` one (a suite still running: its missing cells show ``-``)."""
  return [r for r in CURVE if every or any(r[1].format(b=f"{b:g}") in data for b in budgets)]


def curve_table(data, budgets, metric: Metric, every: bool = False) -> tuple[str, dict]:
  dense = stat(data.get("dense"), "score", metric.test)
  cols = {}
  for b in budgets:
    cols[b] = {label: stat(data.get(cell.format(b=f"{b:g}")), key.format(b=f"{b:g}"), metric.test)
               for label, cell, key in rows(data, budgets, every)}
  marks = {b: ties(cols[b], metric.higher) for b in budgets}
  head = ["method (T steps each)"] + [f"{b:.0%} of kernel params" for b in budgets]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  lines.append("| dense (100%) | " + " | ".join(fmt(dense, metric) for _ in budgets) + " |")
  for label, _, _ in rows(data, budgets, every):
    row = [fmt(cols[b][label], metric, bold=marks[b].get(label, (0, 0))[0],
               tie=marks[b].get(label, (0, 0))[1]) for b in budgets]
    lines.append(f"| {label} | " + " | ".join(row) + " |")
  for label, cell, key in SEPARATE:
    row = [fmt(stat(data.get(cell.format(b=f"{b:g}")), key, metric.test), metric) for b in budgets]
    lines.append(f"| *{label}* | " + " | ".join(row) + " |")
  return "\n".join(lines), cols


def trp_table(data, metric: Metric, rows, paper: dict | None = None) -> str:
  """TRP's Table 1 shape: decoupled quality, FLOP speed-up, kernel parameters kept and the
  SVD of the dense model at the same ranks, for every ``(label, cell)`` of ``rows``; with
  ``paper``, the paper's numbers alongside."""
  dense = stat(data.get("dense"), "score", metric.test)
  name = metric.label.split(" (")[0]
  head = ["run", f"{name} (decoupled)", "FLOP speed-up", "kernel params kept",
          "SVD of dense at the same ranks"]
  head += ["paper top-1 (CIFAR-10)", "paper speed-up"] if paper else []
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  tail = lambda cell: [f"{v:.2f}" for v in paper.get(cell, ("-", "-"))] if paper else []  # noqa: E731
  lines.append(" | ".join([f"| dense | {fmt(dense, metric)} | 1.00 | 100% | -", *tail("dense")])
               + " |")
  for label, cell in rows:
    recs = data.get(cell)
    paper_cols = [f"{v:.2f}" for v in paper[cell]] if paper and cell in paper else \
        (["-", "-"] if paper else [])
    lines.append(" | ".join([
        f"| {label}", fmt(stat(recs, "score", metric.test), metric),
        fmt(stat(recs, "score", RATIO.test), RATIO), fmt(stat(recs, "score", PERCENT.test), PERCENT),
        fmt(stat(recs, "dense_svd_same_ranks", metric.test), metric), *paper_cols]) + " |")
  return "\n".join(lines)


def seed0(data, cell: str) -> dict | None:
  """A cell's seed-0 run (the one searches and ablations read), or None."""
  return next((r for r in data.get(cell, []) if r["seed"] == 0), None)


def ablation_table(data, metric: Metric) -> str:
  """Seed-0 validation score of every ``cell~setting`` next to its default ``cell``."""
  name = "val acc" if metric.higher else "val loss"
  lines = [f"| method | setting | {name} | default's {name} | difference |", "|---|---|---|---|---|"]
  sign, k, d = (1 if metric.higher else -1), metric.scale, metric.digits
  best = {}
  for cell in sorted(c for c in data if "~" in c and not c.startswith("spectral_same")):
    base, _, setting = cell.partition("~")
    rec, ref = seed0(data, cell), seed0(data, base)
    if rec is None:
      continue
    v = rec["score"][metric.val]
    r0 = ref["score"][metric.val] if ref else None
    diff = f"{k * (v - r0):+.{d}f}" if r0 is not None else "-"
    lines.append(f"| {base} | {setting} | {k * v:.{d}f} | "
                 f"{'-' if r0 is None else f'{k * r0:.{d}f}'} | {diff} |")
    if r0 is not None and sign * v > sign * best.get(base, (None, r0))[1]:
      best[base] = (setting, v)
  if len(lines) == 2:
    return ""
  found = "; ".join(f"{b}: {s_} ({k * v:.{d}f})" for b, (s_, v) in best.items()) or \
      "no setting beat the defaults"
  return "\n".join(lines) + f"\n\nBest on validation (seed 0): {found}."


def search_table(data, metric: Metric, grid: dict[str, list[str]]) -> str:
  """The converged suite's validation searches (seed 0): every setting's validation score,
  the one the method's cells take in bold -- named only once the whole grid has run (a
  partial search has no winner: its cells wait for the rest, ``cells.chosen``)."""
  name = "val acc" if metric.higher else "val loss"
  sign, k, d = (1 if metric.higher else -1), metric.scale, metric.digits
  lines = [f"| method | setting | {name} |", "|---|---|---|"]
  notes = []
  for method, cells in grid.items():
    vals = {c: seed0(data, c)["score"][metric.val] for c in cells if seed0(data, c)}
    best = max(vals, key=lambda c: sign * vals[c]) if len(vals) == len(cells) else None
    for cell in cells:
      v = f"{k * vals[cell]:.{d}f}" if cell in vals else "-"
      setting = cell.partition("~")[2]
      lines.append(f"| {method} | {setting} | {f'**{v}**' if cell == best else v} |")
    notes.append(f"{method}: {best.partition('~')[2]} ({k * vals[best]:.{d}f})" if best else
                 f"{method}: {len(vals)} of {len(cells)} settings run (its cells wait for the rest)")
    grid_cells = set(cells)
    for cell in sorted(c for c in data if c.startswith(f"{method}@") and "~" in c
                       and c not in grid_cells):  # an ablation beside the search (TRP, no Nu)
      if rec := seed0(data, cell):
        lines.append(f"| {method} | {cell.partition('~')[2]} (ablation, not a candidate) | "
                     f"{k * rec['score'][metric.val]:.{d}f} |")
  return "\n".join(lines) + f"\n\nChosen on validation (seed 0): {'; '.join(notes)}."


def winners(cols, budgets, metric: Metric, every: bool = False, seeds: int = 1) -> str:
  """The best cell of each budget column (and those tied with it). With ``every`` (a
  table of every method: the converged suite) no verdict while any cell lacks one of its
  ``seeds`` runs: one seed has no spread, so "tied" would mean nothing."""
  if every:
    values = [v for b in budgets for v in cols[b].values()]
    full = sum(v is not None and v[2] >= seeds for v in values)
    if full < len(values):
      have = sum(v is not None for v in values)
      return (f"not yet: {full} of {len(values)} cells of the table have all {seeds} "
              f"seeds ({have} have at least one)")
  out = []
  for b in budgets:
    m = ties(cols[b], metric.higher)
    if not m:
      continue
    best = [k for k, (is_best, _) in m.items() if is_best][0]
    tied = [k for k, (_, t) in m.items() if t]
    out.append(f"at {b:.0%}: best {best}" + (f" (no difference from: {', '.join(tied)})" if tied else ""))
  return "; ".join(out)


def _figure(figsize):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt.subplots(figsize=figsize, dpi=120)


def _save(fig, ax, path: str, xlabel: str, ylabel: str, title: str, loc: str = "best") -> None:
  import matplotlib.pyplot as plt

  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title, fontsize=9)
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=7, loc=loc)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def plot(path: str, data, budgets, cols, title: str, metric: Metric, xlabel: str) -> None:
  from matplotlib.ticker import NullFormatter

  fig, ax = _figure((7.2, 4.6))
  k = metric.scale
  dense = stat(data.get("dense"), "score", metric.test)
  if dense:
    ax.axhline(k * dense[0], color="k", lw=1, ls="--", label="dense")
  for i, (label, _, _) in enumerate(CURVE):
    pts = [(b, cols[b][label]) for b in budgets if cols[b].get(label) is not None]
    if pts:
      ax.errorbar([100 * b for b, _ in pts], [k * s[0] for _, s in pts],
                  yerr=[k * s[1] for _, s in pts], marker="o", capsize=3, label=label,
                  color=f"C{i}")
  ax.set_xscale("log")
  ax.set_xticks([100 * b for b in budgets], [f"{b:.0%}" for b in budgets])
  ax.xaxis.set_minor_formatter(NullFormatter())
  _save(fig, ax, path, xlabel, metric.label, title,
        loc="lower right" if metric.higher else "upper right")


def convergence(data, metric: Metric) -> str:
  """The dense cell's curve (scored at evenly spaced steps): its final mean and how much
  the last fifth of training moved it, per seed, against the suite's targets."""
  recs = [r for r in data.get("dense", []) if isinstance(r.get("log"), dict) and r["log"].get("curve")]
  if not recs:
    return ""
  k, d = metric.scale, metric.digits
  moves, finals = [], []
  for r in recs:
    pts = r["log"]["curve"]
    at = min(pts, key=lambda q: abs(q["step"] - 0.8 * pts[-1]["step"]))
    moves.append(k * (pts[-1][metric.test] - at[metric.test]))
    finals.append(k * pts[-1][metric.test])
  return (f"Dense convergence: final {np.mean(finals):.{d}f} (seeds: "
          f"{', '.join(f'{v:.{d}f}' for v in finals)}); the last fifth of training moved it by "
          f"{', '.join(f'{v:+.{d}f}' for v in moves)}.")


def plot_convergence(path: str, data, title: str, metric: Metric) -> bool:
  recs = [r for r in data.get("dense", []) if isinstance(r.get("log"), dict) and r["log"].get("curve")]
  if not recs:
    return False
  fig, ax = _figure((6.4, 4.0))
  for r in recs:
    pts = r["log"]["curve"]
    ax.plot([q["step"] for q in pts], [metric.scale * q[metric.test] for q in pts], marker="o",
            label=f"test, seed {r['seed']}")
    ax.plot([q["step"] for q in pts], [metric.scale * q[metric.val] for q in pts], ls=":",
            color=ax.lines[-1].get_color(), label=f"val, seed {r['seed']}")
  _save(fig, ax, path, "optimizer step", metric.label, title)
  return True


def latencies(task: str, size: str, data, budgets) -> dict:
  """``{"dense": seconds, label: {b: seconds}}``: each curve cell's inference latency at its
  seed-0 per-layer ranks, measured in one process, interleaved (``Task.latency``); cells
  with the same ranks share one measurement."""
  sys.path.insert(0, HERE)
  mod = importlib.import_module(task)
  s = mod.Setting(mod.SIZES[size], 0, bars=False)
  where, shapes = {}, [None]
  for label, cell, key in rows(data, budgets):
    for b in budgets:
      recs = [r for r in data.get(cell.format(b=f"{b:g}"), []) if r["seed"] == 0]
      scored = get(recs[0], key.format(b=f"{b:g}")) if recs else None
      if scored and scored.get("ranks"):
        if scored["ranks"] not in shapes:
          shapes.append(scored["ranks"])
        where[(label, b)] = shapes.index(scored["ranks"])
  seconds = s.latency(shapes)
  out: dict = {"dense": seconds[0]}
  for (label, b), i in where.items():
    out.setdefault(label, {})[b] = seconds[i]
  return out


def plot_latency(path: str, lat: dict, cols, budgets, title: str, metric: Metric, dense) -> None:
  fig, ax = _figure((7.2, 4.6))
  k = metric.scale
  if dense:
    ax.errorbar([1e3 * lat["dense"]], [k * dense[0]], yerr=[k * dense[1]], marker="s",
                color="k", capsize=3, label="dense")
  for i, (label, _, _) in enumerate(CURVE):
    pts = [(lat[label][b], cols[b][label]) for b in budgets
           if label in lat and b in lat[label] and cols[b].get(label)]
    if pts:
      ax.errorbar([1e3 * t for t, _ in pts], [k * m[0] for _, m in pts],
                  yerr=[k * m[1] for _, m in pts], marker="o", capsize=3, label=label,
                  color=f"C{i}")
  _save(fig, ax, path, "inference latency, one batch of 64 (ms, measured in one run)",
        metric.label, title)


def code_versions(recs: list[dict], size: str, allow_mixed: bool = False) -> str:
  """One table, one code version: runs whose recorded code digest (``cells.code_hash``)
  differs are refused (a converged size) or named in the table's text (``--allow-mixed``,
  and the early ``cpu`` tables, whose runs predate the digest)."""
  codes = {r.get("code") for r in recs}
  if len(codes) == 1 and None not in codes:
    return f"One code version ({codes.pop()}, commit {recs[0].get('commit')})."
  commits = sorted({r.get("commit") or "?" for r in recs})
  if None in codes:  # runs that predate the digest: their commits are all there is
    msg = (f"these {len(recs)} runs recorded no code digest and span {len(commits)} commits "
           f"({', '.join(commits)})")
  else:
    msg = f"these {len(recs)} runs span {len(codes)} code versions (commits {', '.join(commits)})"
  if size.startswith("converged") and not allow_mixed:
    stale = sorted({f"{r['cell']} s{r['seed']}" for r in recs if r.get("code") != recs[-1].get("code")})
    raise SystemExit(f"{size}: {msg}; rerun the stale cells (results/suite.py --rerun-stale) "
                     f"or pass --allow-mixed to mark them. Differs from the newest: {stale[:10]}")
  return f"**Mixed code**: {msg}."


def _runs_line(recs, size, task) -> str:
  cpu = sum(r.get("cpu_s", r["wall_s"]) for r in recs)  # runs before cpu_s: their wall time
  devices = sorted({r["device"] for r in recs})
  return (f"{len(recs)} runs, {cpu / 3600:.1f} CPU-hours of cells on {'; '.join(devices)}. "
          f"Reproduce: `python results/suite.py --size {size} --task {task} --jobs 2 && "
          f"python results/report.py --size {size} --task {task}`.")


LEGEND = ("mean ± std over seeds {seeds} (n in brackets when fewer); bold: best of the "
          "column, `=`: within the spread of the best (no difference).")


def render(size: str, runs: str, task: str = "resnet20", allow_mixed: bool = False
           ) -> tuple[str, dict]:
  """The README block of one task and what its plot needs."""
  sys.path.insert(0, HERE)
  mod = importlib.import_module(task)
  data = load(size, task, runs)
  if not data:
    raise SystemExit(f"no results under {os.path.join(runs, size, task)}: run results/suite.py")
  st, metric = mod.SIZES[size], METRICS[task]
  budgets = st.budgets
  curve, cols = curve_table(data, budgets, metric, every=st.converged)
  recs = [r for rs in data.values() for r in rs]
  dataset = recs[0]["dataset"]
  legend = LEGEND.format(seeds=", ".join(map(str, st.seeds))) + " " + code_versions(
      recs, size, allow_mixed)
  if st.converged:
    net = f"ResNet-{st.depth}" if task == "resnet20" else (
        f"Character-level transformer ({st.layers} layers, d = {st.d}, context {st.ctx})")
    unit = f"{st.batch} images" if task == "resnet20" else f"{st.batch} x {st.ctx} characters"
    text = (f"{net} on {dataset}, size `{size}`: every run {st.steps} steps of {unit} "
            f"(fine-tunes: the last {st.ft}), {metric.label} on the test split, {legend} "
            f"{_runs_line(recs, size, task)} {convergence(data, metric)}\n\n{curve}\n\n"
            f"Winners: {winners(cols, budgets, metric, every=True, seeds=len(st.seeds))}.\n\n"
            "TRP + nuclear norm (every step) at its energy-threshold operating point, "
            "decoupled, beside the dense model's SVD and Khodak's from-scratch training at "
            "the same per-layer ranks:\n\n"
            + trp_table(data, metric, [("TRP + Nu", "trp_nu"), ("spectral + Frobenius decay, "
                                        "TRP's ranks", "spectral_same~trp_nu")]))
    held = (f"{st.val:,} held-out training images" if task == "resnet20" else
            f"{st.val_tokens:,} characters of other held-out plays")
  elif task == "resnet20":
    text = (f"ResNet-20 on {dataset}, size `{size}`: every run {st.steps} SGD steps of "
            f"{st.batch} images (fine-tunes: the last {st.ft} of them), test accuracy "
            f"on {st.test:,} images after BatchNorm recalibration, {legend} "
            f"{_runs_line(recs, size, task)}\n\n{curve}\n\n"
            f"Winners: {winners(cols, budgets, metric)}.\n\n"
            "TRP's Table 1 shape (energy-threshold operating point, decoupled; our dataset is "
            f"{dataset}, the paper's CIFAR-10, so only the *gaps to dense* compare):\n\n"
            + trp_table(data, metric, TRP_ROWS, PAPER_TRP))
    held = f"{st.val:,} held-out training images"
  else:
    text = (f"Character-level transformer ({st.layers} layers, d = {st.d}, context {st.ctx}) "
            f"on Shakespeare, size `{size}`: every run {st.steps} Adam steps of {st.batch} x "
            f"{st.ctx} characters (fine-tunes: the last {st.ft}), test cross-entropy in nats "
            f"per character (lower is better) on {st.test_tokens:,} characters of held-out "
            f"plays, {legend} {_runs_line(recs, size, task)}\n\n{curve}\n\n"
            f"Winners: {winners(cols, budgets, metric)}.\n\n"
            "TRP + nuclear norm at its energy-threshold operating point (decoupled):\n\n"
            + trp_table(data, metric, [("TRP + Nu", "trp_nu")]))
    held = f"{st.val_tokens:,} characters of other held-out plays"
  if st.converged:  # a search picks the setting: there is no default to ablate against
    import cells
    search = search_table(data, metric, cells.search(st))
    if search:
      text += ("\n\nThe validation search TRP's and LoD's cells take their settings from "
               f"(seed 0, the first budget; {held}, never the test split):\n\n" + search)
  elif abl := ablation_table(data, metric):
    text += ("\n\nAblation (one seed, the middle budget; chosen on the validation split, "
             f"{held}, never the test split):\n\n" + abl)
  return text, {"data": data, "budgets": budgets, "cols": cols, "dataset": dataset,
                "setting": st, "metric": metric}


TITLES = {"resnet20": ("ResNet / {dataset}: accuracy vs size at {steps} steps per run "
                       "(mean ± std)", "block-conv kernel parameters kept"),
          "charlm": ("char transformer / Shakespeare: test loss vs size at {steps} steps per "
                     "run (mean ± std)", "attention + MLP kernel parameters kept")}


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


def main(argv=None) -> dict[str, str]:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--size", default="cpu", choices=("quick", "cpu", "full", "converged-quick",
                                                   "converged"))
  p.add_argument("--allow-mixed", action="store_true",
                 help="put runs of different code versions in one table, marked")
  p.add_argument("--task", default=None, help="one task (default: every task with results)")
  p.add_argument("--runs", default=os.path.join(HERE, "runs"))
  p.add_argument("--out", default=HERE, help="where <task>_<size>.png goes")
  p.add_argument("--readme", default=os.path.join(ROOT, "README.md"))
  p.add_argument("--no-readme", action="store_true", help="print only")
  p.add_argument("--keep-latency", action="store_true",
                 help="leave the latency plots as they are (measuring them wants a quiet "
                      "machine): tables and the other plots from the JSONs")
  args = p.parse_args(argv)
  tasks = [args.task] if args.task else [t for t in METRICS if load(args.size, t, args.runs)]
  blocks = {}
  for task in tasks:
    block, ctx = render(args.size, args.runs, task, args.allow_mixed)
    png = os.path.join(args.out, f"{task}_{args.size}.png")
    os.makedirs(args.out, exist_ok=True)
    title, xlabel = TITLES[task]
    plot(png, ctx["data"], ctx["budgets"], ctx["cols"],
         title.format(dataset=ctx["dataset"], steps=ctx["setting"].steps), ctx["metric"], xlabel)
    block += f"\n\n![{ctx['metric'].label.split(' (')[0]} vs size]({os.path.relpath(png, ROOT)})"
    lat_png = os.path.join(args.out, f"{task}_{args.size}_latency.png")
    if ctx["setting"].converged and not args.keep_latency:
      lat = latencies(task, args.size, ctx["data"], ctx["budgets"])
      plot_latency(lat_png, lat, ctx["cols"], ctx["budgets"], f"{task}: quality vs measured latency",
                   ctx["metric"], stat(ctx["data"].get("dense"), "score", ctx["metric"].test))
    if ctx["setting"].converged and os.path.exists(lat_png):
      block += f"\n\n![quality vs latency]({os.path.relpath(lat_png, ROOT)})"
    conv = os.path.join(args.out, f"{task}_{args.size}_dense_curve.png")
    if plot_convergence(conv, ctx["data"], f"{task}: the dense model's curve", ctx["metric"]):
      block += f"\n\n![dense convergence]({os.path.relpath(conv, ROOT)})"
    print(block + "\n")
    if not args.no_readme:
      update_readme(args.readme, f"{task}-{args.size}", block)
      print(f"updated {args.readme}\n")
    blocks[task] = block
  return blocks


if __name__ == "__main__":
  main()
