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


def test_converged_search_names_a_choice_only_when_its_grid_has_run():
  """A converged method takes its search's best validation setting (``cells.chosen``): the
  report marks it once every setting ran, and a partial search names no winner."""
  metric = report.METRICS["charlm"]  # lower is better
  grid = {"trp_nu": ["trp_nu@0.25~nuclear=1e-05,period=10", "trp_nu@0.25~nuclear=0.0001,period=10"]}
  rec = lambda v, seed=0: {"seed": seed, "score": {"val_loss": v}}  # noqa: E731
  data = {grid["trp_nu"][0]: [rec(1.80)], "trp_nu@0.25~nuclear=0,period=10": [rec(1.90)]}
  part = report.search_table(data, metric, grid)
  assert "| trp_nu | nuclear=0.0001,period=10 | - |" in part and "**" not in part
  assert "trp_nu: 1 of 2 settings run" in part
  assert "| trp_nu | nuclear=0,period=10 (ablation, not a candidate) | 1.900 |" in part
  data[grid["trp_nu"][1]] = [rec(1.75), rec(1.5, seed=1)]  # only seed 0 is the search's
  full = report.search_table(data, metric, grid)
  assert "| trp_nu | nuclear=0.0001,period=10 | **1.750** |" in full
  assert "Chosen on validation (seed 0): trp_nu: nuclear=0.0001,period=10 (1.750)." in full


@pytest.mark.slow
def test_quick_suite_end_to_end(tmp_path):
  """``make results-quick``: every cell of the quick size trains, writes its JSON and the
  report renders; checks against independent expectations (budgets, whitening)."""
  out = str(tmp_path)
  env = dict(os.environ, PYTHONPATH=ROOT)
  # ~20-40 min on 2 cores; 2,400 s timed out on cores shared with 4 other jobs: the limit
  # is there to catch a hang, not to time the suite
  subprocess.run([sys.executable, os.path.join(ROOT, "results", "suite.py"), "--size", "quick",
                  "--jobs", "2", "--out", out], check=True, env=env, timeout=5400)
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


@pytest.mark.slow
def test_converged_quick_suite_end_to_end(tmp_path):
  """``--size converged-quick``: every cell of the converged suite at toy size. Checks what
  the converged tables rest on: the search decides TRP's and LoD's settings (recorded),
  LoD's threshold shrinking lands on the budget with per-layer ranks of its own, every
  run records one code digest, and the report refuses mixed code."""
  out = str(tmp_path)
  env = dict(os.environ, PYTHONPATH=ROOT)
  subprocess.run([sys.executable, os.path.join(ROOT, "results", "suite.py"), "--size",
                  "converged-quick", "--jobs", "2", "--out", out], check=True, env=env, timeout=5400)
  import cells
  import charlm
  import resnet20

  for mod in (resnet20, charlm):
    size = mod.SIZES["converged-quick"]
    data = report.load("converged-quick", mod.TASK, out)
    assert set(data) == {c for c, _ in mod.cells(size) + mod.ablations(size)}
    assert len({r["code"] for rs in data.values() for r in rs}) == 1
    (dense,) = data["dense"]
    assert len(dense["log"]["curve"]) == size.curve
    for method in ("trp_nu", "lod"):
      (rec,) = data[f"{method}@0.25"]
      vals = rec["options"]["search"]
      best = max(vals, key=vals.get)
      assert set(vals) == set(cells.search(size)[method])
      assert all(f"{k}={v:g}" in best for k, v in rec["options"]["chosen"].items())
    (lod,) = data["lod@0.25"]
    budget = data["scratch@0.25"][0]["score"]["kernel_params"]
    assert lod["score"]["kernel_params"] <= budget  # the budget projection
    assert lod["log"]["events"], "LoD never shrank"
    (spec,) = data["spectral_same~trp_nu"]
    assert spec["score"]["ranks"] == data["trp_nu"][0]["score"]["ranks"]
    block, _ = report.render("converged-quick", out, mod.TASK)
    assert "One code version" in block and "Dense convergence" in block
    assert "Chosen on validation (seed 0): trp_nu: nuclear=" in block and "; lod: lam=" in block
  # the report end to end: tables, the dense curve, quality vs latency at each cell's ranks
  blocks = report.main(["--size", "converged-quick", "--runs", out, "--out", out, "--no-readme"])
  assert all("![quality vs latency]" in b for b in blocks.values())
  png = os.path.join(out, "resnet20_converged-quick_latency.png")
  assert os.path.exists(png)
  # --keep-latency: the tables again, the measured plot kept as it is (not re-measured)
  before = os.stat(png).st_mtime_ns
  kept = report.main(["--size", "converged-quick", "--runs", out, "--out", out, "--no-readme",
                      "--keep-latency"])
  assert kept == blocks and os.stat(png).st_mtime_ns == before
  # a run of other code in the table is refused, or marked with --allow-mixed
  path = os.path.join(out, "converged-quick", "charlm", "scratch@0.25_s0.json")
  with open(path) as f:
    rec = json.load(f)
  rec["code"] = "0" * 12
  with open(path, "w") as f:
    json.dump(rec, f)
  with pytest.raises(SystemExit, match="2 code versions"):
    report.render("converged-quick", out, "charlm")
  assert "**Mixed code**" in report.render("converged-quick", out, "charlm", allow_mixed=True)[0]


def test_augment_is_a_crop_of_the_padded_image_or_its_mirror():
  import resnet20

  x = np.random.default_rng(0).random((16, 28, 28, 1)).astype(np.float32)
  y = resnet20.augment(x, np.random.default_rng(1))
  assert y.shape == x.shape and y.dtype == x.dtype
  padded = np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)))
  for i in range(len(x)):
    windows = [padded[i, a:a + 28, b:b + 28] for a in range(5) for b in range(5)]
    assert any(np.array_equal(y[i], w) or np.array_equal(y[i], w[:, ::-1]) for w in windows)


def test_cell_names_parse_typed_settings_and_the_search_grid():
  import cells
  import charlm

  size = charlm.SIZES["converged"]
  method, b, sz, opts = cells.parse("lod@0.25~lam=1e-05,eps=0.1,shrink=schedule", size)
  assert (method, b, sz.lam, sz.eps, sz.shrink, opts) == ("lod", 0.25, 1e-5, 0.1, "schedule", {})
  assert cells.parse("spectral_same~trp_nu", size)[3] == {"ranks_of": "trp_nu"}
  grid = cells.search(size)
  assert len(grid["trp_nu"]) == len(size.nuclear_grid) * len(size.period_grid)
  assert all(cells.parse(c, size)[0] == m for m, cs in grid.items() for c in cs)
  deps = dict(charlm.cells(size))
  assert set(deps["lod@0.1"]) == {f"{c}|s0" for c in grid["lod"]}
  assert cells.search(charlm.SIZES["cpu"]) == {}  # the early suite chose by hand


def test_a_converged_table_names_no_winner_while_cells_are_missing():
  """The converged table lists every method (missing cells show ``-``) and names a winner
  only once all have every seed; the early tables judge the cells they have."""
  metric = report.METRICS["resnet20"]
  cols = {0.25: {"SVD + fine-tune": (0.86, 0.01, 3, [0.85, 0.86, 0.87]), "LoD": None}}
  assert report.winners(cols, [0.25], metric, every=True, seeds=3) == \
      "not yet: 1 of 2 cells of the table have all 3 seeds (1 have at least one)"
  assert report.winners(cols, [0.25], metric) == "at 25%: best SVD + fine-tune"
  cols[0.25]["LoD"] = (0.87, 0.0, 1, [0.87])  # one seed: no spread to judge a tie by
  assert report.winners(cols, [0.25], metric, every=True, seeds=3).startswith(
      "not yet: 1 of 2 cells of the table have all 3 seeds (2 have")
  assert report.winners(cols, [0.25], metric, every=True, seeds=1) == "at 25%: best LoD"
  table, _ = report.curve_table({}, [0.25], metric, every=True)
  assert len(table.splitlines()) == 3 + len(report.CURVE) + len(report.SEPARATE)


def test_the_cache_parks_for_git_and_restores_what_a_fresh_machine_lacks(tmp_path):
  """suite.carry: park mirrors <out>/.cache/<size>/ (pickles only; a finished cell's
  checkpoint leaves the carry too); restore fills a fresh cache and keeps newer files."""
  import suite

  cache = tmp_path / ".cache" / "converged"
  (cache / "charlm" / "s0" / "inflight" / "abc").mkdir(parents=True)
  (cache / "charlm" / "s0" / "dense.pkl").write_bytes(b"dense")
  (cache / "charlm" / "s0" / "inflight" / "abc" / "lod.pkl").write_bytes(b"step 10")
  (cache / "charlm" / "s0" / "dense.pkl.tmp").write_bytes(b"half-written")
  assert suite.carry(str(tmp_path), "converged", "park") == [
      "charlm/s0/dense.pkl", "charlm/s0/inflight/abc/lod.pkl"]
  kept = tmp_path / "carry" / "converged" / "charlm" / "s0"
  assert (kept / "dense.pkl").read_bytes() == b"dense" and not (kept / "dense.pkl.tmp").exists()
  assert suite.carry(str(tmp_path), "converged", "park") == []  # nothing changed

  (cache / "charlm" / "s0" / "inflight" / "abc" / "lod.pkl").unlink()  # the cell finished
  suite.carry(str(tmp_path), "converged", "park")
  assert not (kept / "inflight" / "abc" / "lod.pkl").exists() and (kept / "dense.pkl").exists()
  # a finished cell that leaves its checkpoint behind: its JSON is the result, not carried
  (cache / "charlm" / "s0" / "inflight" / "abc" / "tr.pkl").write_bytes(b"last step")
  assert suite.carry(str(tmp_path), "converged", "park") == ["charlm/s0/inflight/abc/tr.pkl"]
  (tmp_path / "converged" / "charlm").mkdir(parents=True)
  (tmp_path / "converged" / "charlm" / "tr_s0.json").write_text("{}")
  assert suite.carry(str(tmp_path), "converged", "park") == []
  assert not (kept / "inflight" / "abc" / "tr.pkl").exists()

  import shutil
  shutil.rmtree(tmp_path / ".cache")  # a fresh machine
  assert suite.carry(str(tmp_path), "converged", "restore") == ["charlm/s0/dense.pkl"]
  assert (cache / "charlm" / "s0" / "dense.pkl").read_bytes() == b"dense"
  (cache / "charlm" / "s0" / "dense.pkl").write_bytes(b"newer")
  assert suite.carry(str(tmp_path), "converged", "restore") == []
  assert (cache / "charlm" / "s0" / "dense.pkl").read_bytes() == b"newer"
