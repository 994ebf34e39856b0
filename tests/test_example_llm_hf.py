"""examples/llm_hf.py end to end (slow): transformers' FlaxLlamaForCausalLM loaded with the
SmolLM2 GGUF weights is the same model as jlr.models.llama, before and after the recipe."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("gguf", reason="pip install gguf (the `examples` extra)")
pytest.importorskip("transformers", reason="pip install transformers (the `examples` extra)")

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")


@pytest.mark.slow
def test_llm_hf_parity(tmp_path):
  subprocess.run([sys.executable, os.path.join(EXAMPLES, "llm_hf.py"), "--calib", "4",
                  "--eval-windows", "2", "--ctx", "64", "--out-dir", str(tmp_path)],
                 check=True, timeout=2400)
  res = json.loads((tmp_path / "llm_hf.json").read_text())
  assert res["dense"]["rel_diff"] < 1e-5
  assert res["compressed_same_ranks"]["rel_diff"] < 1e-3  # the same ranks: the same model
  assert res["dense"]["hf_unpatched"] > res["dense"]["jlr"] * 1.01  # RoPE base 10,000
  assert res["compressed"]["jlr"] > res["dense"]["jlr"]
