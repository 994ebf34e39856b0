"""examples/compress_llm.py --quick end to end (slow: several minutes on 2 cores)."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("gguf", reason="pip install gguf (the `examples` extra)")

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")


@pytest.mark.slow
def test_compress_llm_quick(tmp_path):
  subprocess.run([sys.executable, os.path.join(EXAMPLES, "compress_llm.py"), "--quick",
                  "--no-progress", "--out-dir", str(tmp_path)], check=True, timeout=1500)
  res = json.loads((tmp_path / "compress_llm_quick.json").read_text())
  cells = {c["key"]: c for c in res["cells"]}
  dense = res["dense"]["ppl"]
  assert 5 < dense < 100
  for level in (0.2, 0.4):  # SVD-LLM's ordering: whitened far ahead of plain SVD
    assert cells[f"whitened/uniform/{level}"]["ppl"] < cells[f"svd/uniform/{level}"]["ppl"]
    assert abs(cells[f"svd/uniform/{level}"]["target_params_kept"] - (1 - level)) < 0.02
  assert all(c["ppl"] > dense for c in res["cells"])  # compression costs perplexity
  assert {r["model"] for r in res["throughput"]} >= {"dense"}
  assert (tmp_path / "compress_llm_quick.png").stat().st_size > 10_000
