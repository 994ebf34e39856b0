"""The results suite: the report's statistics against numpy, and (slow) the quick suite end to end."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "results"))

import report  # noqa: E402


def _write(runs, cell, seed, task="resnet20", **metrics):
  d = os.path.join(runs, "quick", task)
  os.makedirs(d, exist_ok=True)
  rec = {"cell": cell, "seed": seed, "wall_s": 10.0, "dataset": "fashion_mnist",
         "device": "cpu:test", **metrics}
  with open(os.path.join(d, f"{cell}_s{seed}.json"), "w") as f:
    json.dump(rec, f)


def _score(acc, frac=0.25, speed=4.0):
  return {"test_acc": acc, "val_acc": acc, "kernel_fraction": frac, "flop_speedup": speed}


def test_report_statistics_ties_and_readme_block(tmp_path):
  runs = str(tmp_path)
  accs = {"dense": [0.90, 0.91, 0.92], "svd_ft@0.25": [0.85, 0.86, 0.87],
          "scratch@0.25": [0.80, 0.84, 0.88], "lod@0.25": [0.70, 0.71, 0.72]}
  for cell, vals in accs.items():
    for seed, a in enumerate(vals):
      extra = {"derived": {"svd@0.25": _score(0.3 + seed / 100)}} if cell == "dense" else {}
      _write(runs, cell, seed, score=_score(a), **extra)
  data = report.load("quick", "resnet20", runs)
  m, sd, n, _ = report.stat(data["scratch@0.25"], "score")
  assert n == 3 and m == pytest.approx(np.mean(accs["scratch@0.25"]))
  assert sd == pytest.approx(np.std(accs["scratch@0.25"], ddof=1))
  # svd_ft is best; scratch (0.84 +- 0.04) overlaps it (0.86 +- 0.01); LoD does not
  marks = report.ties({k: report.stat(data[k], "score") for k in ("svd_ft@0.25", "scratch@0.25",
                                                                   "lod@0.25")})
  assert marks == {"svd_ft@0.25": (True, False), "scratch@0.25": (False, True),
                   "lod@0.25": (False, False)}
  block, _ = report.render("quick", runs)
  assert "**86.00 ± 1.00** (3)" not in block  # n is shown only when below 3 seeds
  assert "| SVD + fine-tune | **86.00 ± 1.00** |" in block
  assert "| low-rank from scratch | 84.00 ± 4.00 = |" in block
  assert "| SVD of dense (no training) | 31.00 ± 1.00 |" in block
  assert "no difference from: low-rank from scratch" in block
  readme = tmp_path / "README.md"
  readme.write_text("a\n<!-- results:resnet20-quick:begin -->\nSTALE TABLE\n<!-- results:resnet20-quick:end -->\nb\n")
  report.update_readme(str(readme), "resnet20-quick", block)
  text = readme.read_text()
  assert "STALE TABLE" not in text and block in text and text.startswith("a\n") and text.endswith("b\n")


def test_report_lower_is_better_for_the_language_model(tmp_path):
  """The char LM is scored by test loss: the lowest mean is best, ties use the same spread."""
  runs = str(tmp_path)
  losses = {"dense": [1.50, 1.52, 1.54], "svd_ft@0.25": [1.70, 1.71, 1.72],
            "scratch@0.25": [1.66, 1.74, 1.82], "lod@0.25": [1.90, 1.91, 1.92]}
  for cell, vals in losses.items():
    for seed, v in enumerate(vals):
      _write(runs, cell, seed, task="charlm", dataset="shakespeare",
             score={"test_loss": v, "val_loss": v, "kernel_fraction": 0.25, "flop_speedup": 3.0})
  _write(runs, "lod@0.25~lam=0", 0, task="charlm", dataset="shakespeare",
         score={"test_loss": 1.8, "val_loss": 1.85, "kernel_fraction": 0.25, "flop_speedup": 3.0})
  block, ctx = report.render("quick", runs, "charlm")
  m = report.stat(ctx["data"]["svd_ft@0.25"], "score", "test_loss")
  assert m[0] == pytest.approx(1.71) and m[1] == pytest.approx(0.01)
  assert "| SVD + fine-tune | **1.710 ± 0.010** |" in block
  assert "| low-rank from scratch | 1.740 ± 0.080 = |" in block  # 1.74 - 1.71 <= 0.01 + 0.08
  assert "| LoD, progressive shrink to the budget | 1.910 ± 0.010 |" in block
  # the ablation's lower validation loss (seed 0: 1.85 < 1.90) is the better setting
  assert "| lod@0.25 | lam=0 | 1.850 | 1.900 | -0.050 |" in block
  assert "Best on validation (seed 0): lod@0.25: lam=0 (1.850)" in block


@pytest.mark.slow
def test_quick_suite_end_to_end(tmp_path):
  """``make results-quick``: every cell of the quick size trains, writes its JSON and the
  report renders; checks against independent expectations (budgets, whitening)."""
  out = str(tmp_path)
  env = dict(os.environ, PYTHONPATH=ROOT)
  subprocess.run([sys.executable, os.path.join(ROOT, "results", "suite.py"), "--size", "quick",
                  "--jobs", "2", "--out", out], check=True, env=env, timeout=1500)
  import resnet20

  size = resnet20.SIZES["quick"]
  data = report.load("quick", "resnet20", out)
  assert set(data) == {c for c, _ in resnet20.cells(size) + resnet20.ablations(size)
                       + resnet20.trp_plain(size)}
  for cell, recs in data.items():
    (rec,) = recs
    assert rec["command"].endswith(f"--cell {cell} --seed 0") and rec["versions"]["jax"]
    assert 0.0 <= rec["score"]["test_acc"] <= 1.0
    if "@" in cell:  # every budgeted model keeps at most its fraction of kernel params
      assert rec["score"]["kernel_fraction"] <= size.budgets[0] + 1e-9
  dense = data["dense"][0]
  assert dense["score"]["test_acc"] > 0.5
  d = dense["derived"]
  # SVD-LLM's claim on a real net: whitening beats plain truncation at the same ranks
  assert d["whiten@0.25"]["test_acc"] > d["svd@0.25"]["test_acc"]
  assert d["svd@0.25"]["ranks"] == d["whiten@0.25"]["ranks"] == data["scratch@0.25"][0]["score"]["ranks"]
  block, _ = report.render("quick", out)
  assert "SVD + fine-tune" in block and "TRP spatial + Nu" in block

  import charlm

  size = charlm.SIZES["quick"]
  data = report.load("quick", "charlm", out)
  assert set(data) == {c for c, _ in charlm.cells(size) + charlm.ablations(size)}
  vocab = len(charlm.split()[3])
  for cell, recs in data.items():
    (rec,) = recs
    assert 0.0 < rec["score"]["test_loss"] < 1.5 * np.log(vocab)  # finite, not diverged
    if "@" in cell:
      assert rec["score"]["kernel_fraction"] <= size.budgets[0] + 1e-9
  d = data["dense"][0]["derived"]
  assert d["whiten@0.25"]["test_loss"] < d["svd@0.25"]["test_loss"]
  assert d["svd@0.25"]["ranks"] == d["whiten@0.25"]["ranks"] == data["scratch@0.25"][0]["score"]["ranks"]
  assert "TRP + Nu" in report.render("quick", out, "charlm")[0]
