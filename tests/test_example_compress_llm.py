"""examples/compress_llm.py --quick end to end (slow: several minutes on 2 cores)."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("gguf", reason="pip install gguf (the `examples` extra)")

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")


def test_speed_table_compares_speed_ups_with_bytes_and_the_bandwidth_bound():
  sys.path.insert(0, EXAMPLES)
  import compress_llm as ex
  row = lambda m, mb, b1: {"model": m, "weight_mb": mb, "prefill_tok_s": 100.0,  # noqa: E731
                           "decode_tok_s_b1": b1, "decode_tok_s_b8": 8 * b1, "sample": ""}
  # dense 0.1 s a token over 500 MB; the floor (100 MB) 0.025 s; half the projection bytes
  # left (300 MB): bandwidth-bound, 0.025 + 0.075 / 2 = 0.0625 s, 1.6x
  res = {"speed": [row("dense", 500, 10.0), row("small", 300, 12.5), row(ex.FLOOR, 100, 40.0)]}
  small = ex.speed_table(res).splitlines()[3]
  assert "| 1.67x |" in small and "12.5 (1.25x)" in small and small.endswith("| 1.60x |")


def test_readme_block_from_the_committed_quick_json():
  sys.path.insert(0, EXAMPLES)
  import compress_llm as ex
  res = json.loads(open(os.path.join(EXAMPLES, "results", "compress_llm_quick.json")).read())
  block = ex.readme_block(res)
  cells = {c["key"]: c for c in res["cells"]}
  assert block.startswith("`python examples/compress_llm.py --quick`")
  head = block.split("\n")[0]
  assert "{" not in head and f"heal <= {res['config']['heal_steps']} steps at lr 5e-05" in head
  assert f"| SVD-LLM, uniform | {ex._pair(cells['svd_llm/uniform/0.2'])} |" in block
  assert "| projection params removed | best row |" in block  # the targets table
  assert "SVD-LLM allocated <= uniform on both texts" in block
  assert ex.FLOOR not in block.split("Greedy samples")[-1]  # no sample from the floor


def test_a_sample_is_shown_up_to_its_first_end_of_turn():
  sys.path.insert(0, EXAMPLES)
  import compress_llm as ex
  assert ex.reply("The sea.<|im_end|>\nmore<|im_end|>") == "The sea.<|im_end|>"
  assert ex.reply("<|im_end|><|im_end|>") == "<|im_end|>"
  assert ex.reply("\n\n\n") == "\n\n\n"  # no end of turn: all of it


def test_a_resume_with_other_settings_is_refused(tmp_path):
  """Cells are skipped by key on a rerun, so a JSON of other settings would mix two
  configurations in one table: refused, naming the setting (a level subset is fine)."""
  sys.path.insert(0, EXAMPLES)
  import compress_llm as ex
  saved = ex.settings(ex.parse_args(["--quick"]))
  with open(tmp_path / "compress_llm_quick.json", "w") as f:
    json.dump({"config": {**saved, "eval_windows": 99}, "cells": []}, f)
  with pytest.raises(SystemExit, match="eval_windows"):
    ex.main(["--quick", "--no-progress", "--out-dir", str(tmp_path)])


def test_a_resumed_row_keeps_its_recorded_ranks_and_names_a_change():
  sys.path.insert(0, EXAMPLES)
  import compress_llm as ex
  cell = {"key": "svd_llm/strs/0.2", "ranks": {"a": 8, "b": 16}}
  assert ex.recorded_ranks(cell, {"a": 8, "b": 16}) == {"a": 8, "b": 16}
  with pytest.warns(UserWarning, match=r"at 1 kernels \(e.g. b: 16 recorded, 24 now\)"):
    assert ex.recorded_ranks(cell, {"a": 8, "b": 24}) == {"a": 8, "b": 16}


def test_train_levels_must_be_compression_levels():
  sys.path.insert(0, EXAMPLES)
  import compress_llm as ex
  assert ex.parse_args(["--quick"]).train_levels == (0.4,)
  assert ex.parse_args([]).train_levels == (0.2, 0.4, 0.6)
  with pytest.raises(SystemExit):
    ex.parse_args(["--quick", "--train-levels", "0.3"])


@pytest.mark.slow
def test_compress_llm_quick(tmp_path):
  subprocess.run([sys.executable, os.path.join(EXAMPLES, "compress_llm.py"), "--quick",
                  "--no-progress", "--out-dir", str(tmp_path)], check=True, timeout=2400)
  res = json.loads((tmp_path / "compress_llm_quick.json").read_text())
  cells = {c["key"]: c for c in res["cells"]}
  dense = res["dense"]["ppl"]
  assert set(dense) == {"kjv", "docstrings"} and all(5 < d["ppl"] < 100 for d in dense.values())
  for level in (0.2, 0.4):  # SVD-LLM's ordering: whitened far ahead of plain SVD
    for text in dense:
      assert cells[f"svd_llm/uniform/{level}"]["ppl"][text]["ppl"] < \
          cells[f"svd/uniform/{level}"]["ppl"][text]["ppl"]
    assert abs(cells[f"svd/uniform/{level}"]["target_params_kept"] - (1 - level)) < 0.02
    assert f"asvd/strs/{level}" in cells and cells[f"asvd/strs/{level}"]["alpha"] in (0.5, 1.0)
  for c in res["cells"]:
    for text, p in c["ppl"].items():
      assert p["low"] <= p["ppl"] <= p["high"] and p["ppl"] > dense[text]["ppl"]
  trained = sorted(k for k in cells if k.endswith(("/update", "/heal")))
  assert [k.split("/")[2] for k in trained] == ["0.4", "0.4"]  # quick trains its last level
  assert cells[trained[1]]["heal_best_step"] >= 0 and trained[1].endswith("/heal")
  assert {r["model"] for r in res["speed"]} >= {"dense"}
  assert all(r["decode_tok_s_b8"] > 0 for r in res["speed"])
  # the README block is written from the JSON alone, between its markers
  readme = tmp_path / "README.md"
  readme.write_text("a\n<!-- results:llm-quick:begin -->\nold\n<!-- results:llm-quick:end -->\nb\n")
  subprocess.run([sys.executable, os.path.join(EXAMPLES, "compress_llm.py"), "--quick",
                  "--out-dir", str(tmp_path), "--readme", str(readme)], check=True, timeout=600)
  text = readme.read_text()
  assert "old" not in text and text.startswith("a\n") and text.endswith("b\n")
  assert f"{cells['svd_llm/uniform/0.2']['ppl']['kjv']['ppl']:.1f}" in text
  # a heal variant at another level: its own row (no default heal there), and the level
  # trained earlier runs speed on its healed checkpoint
  subprocess.run([sys.executable, os.path.join(EXAMPLES, "compress_llm.py"), "--quick",
                  "--no-progress", "--out-dir", str(tmp_path), "--train-levels", "0.2",
                  "--lr-heal", "1e-4", "--heal-then", "4", "shakespeare:2"], check=True,
                 timeout=1200)
  res = json.loads((tmp_path / "compress_llm_quick.json").read_text())
  heals = sorted((c["key"].split("/", 2)[2], c) for c in res["cells"] if "/heal" in c["key"])
  assert [k for k, _ in heals] == [  # a row for the model after each stage
      "0.2/update/heal~lr=0.0001", "0.2/update/heal~lr=0.0001,then=4",
      "0.2/update/heal~lr=0.0001,then=4+shakespeare:2", "0.4/update/heal"]
  assert heals[0][1]["heal_lr"] == 1e-4 and "heal_then" not in heals[0][1]
  assert len(heals[1][1]["heal_then"]) == 1
  stages = heals[2][1]["heal_then"]  # each later heal: its own windows, its own curve
  assert [(s["windows"], s["text"]) for s in stages] == [(4, "mixed"), (2, "shakespeare")]
  assert all(s["val"][0][0] == 0 and s["best_step"] >= 0 for s in stages)
  assert res["config"]["lr_heal"] == 5e-5 and res["config"]["train_levels"] == [0.2, 0.4]
  assert [r["weights"] for r in res["speed"]][:2] == ["dense", "healed"]  # 40%: quick's last
  # a resume on a machine without the (uncommitted) cache: no row is recomputed, and the
  # speed section, which needs only the ranks, names the weights it ran and shows no
  # sample for a level whose healed weights are gone (not the one-shot model's as its own)
  import shutil
  shutil.rmtree(tmp_path / ".cache")
  res.pop("speed")
  (tmp_path / "compress_llm_quick.json").write_text(json.dumps(res))
  subprocess.run([sys.executable, os.path.join(EXAMPLES, "compress_llm.py"), "--quick",
                  "--no-progress", "--out-dir", str(tmp_path)], check=True, timeout=1200)
  again = json.loads((tmp_path / "compress_llm_quick.json").read_text())
  assert again["cells"] == res["cells"]
  rows = {r["model"]: r for r in again["speed"]}
  assert rows["svd_llm 40% removed"]["weights"].startswith("one-shot (")
  assert "sample" not in rows["svd_llm 40% removed"] and rows["dense"]["sample"]


def test_a_heal_variant_is_its_own_row_and_resumes_the_same_json():
  """A heal with other settings keys its own row (the default heal's is kept), names its
  settings in the table, and is no clash with the JSON's saved settings."""
  sys.path.insert(0, EXAMPLES)
  import compress_llm as ex
  assert ex.heal_suffix(ex.parse_args([])) == "heal"
  variant = ex.parse_args(["--lr-heal", "2e-4", "--heal-extra", "800"])
  assert ex.heal_suffix(variant) == "heal~extra=800,lr=0.0002"
  assert ex.settings(variant)["lr_heal"] == 5e-5  # the config holds the default heal's
  staged = ex.parse_args(["--lr-heal", "2e-4", "--heal-extra", "800", "--heal-then", "680", "500"])
  assert ex.heal_suffix(staged) == "heal~extra=800,lr=0.0002,then=680+500"
  assert [ex.heal_suffix(staged, k) for k in (0, 1)] == [  # each stage's checkpoint
      "heal~extra=800,lr=0.0002", "heal~extra=800,lr=0.0002,then=680"]
  assert ex.settings(staged)["heal_then"] == ()
  one_text = ex.parse_args(["--heal-then", "680", "shakespeare:0680"])  # one text's windows
  assert ex.heal_suffix(one_text) == "heal~then=680+shakespeare:680"
  assert ex.variant_label("lr=0.0002,then=680+shakespeare:680") == (
      "lr 0.0002, then healed again on 680 + 680 of Shakespeare only")
  for bad in ("poems:10", "shakespeare:", "0", "-3"):
    with pytest.raises(SystemExit):
      ex.parse_args(["--heal-then", bad])
  ppl = lambda k, d: {t: {"ppl": v, "low": v, "high": v} for t, v in zip(ex.TEXTS, (k, d))}  # noqa: E731
  cell = lambda key, k, d: {"key": key, "ppl": ppl(k, d), "remove": 0.2,  # noqa: E731
                            "model_params_kept": 0.84}
  res = {"dense": {"ppl": ppl(26.0, 22.0)}, "config": {"blocks": 0}, "cells": [
      cell("svd_llm/strs/0.2/update", 53.5, 38.7),
      cell("svd_llm/strs/0.2/update/heal", 45.1, 33.4),
      cell("svd_llm/strs/0.2/update/heal~extra=800,lr=0.0002", 38.0, 30.0),
      cell("svd_llm/strs/0.2/update/heal~extra=800,lr=0.0002,then=680", 39.0, 31.0)]}
  lines = ex.table(res).splitlines()
  assert "| SVD-LLM + update + heal | 45.1 / 33.4 |" in lines
  assert "| SVD-LLM + update + heal, extra 800, lr 0.0002 | 38.0 / 30.0 |" in lines
  assert ("| SVD-LLM + update + heal, extra 800, lr 0.0002, then healed again on 680 "
          "| 39.0 / 31.0 |") in lines
  best = [x for x in ex.targets_table(res).splitlines() if x.startswith("| 20% |")][0]
  assert "heal~extra=800,lr=0.0002" in best and best.endswith("| 1.5x | yes |")
