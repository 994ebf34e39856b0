"""The README's quick start runs as written."""

import pathlib
import re

import pytest


def test_quick_start_runs(capsys):
  text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
  code = re.search(r"## Quick start\n+```python\n(.*?)```", text, re.S).group(1)
  assert len(code.strip().splitlines()) == 5
  exec(compile(code, "README.md", "exec"), {})
  out = capsys.readouterr().out
  assert "total (all leaves)" in out and "smaller" in out


@pytest.mark.slow  # heavy (default run <= ~3 min): make test-slow
def test_your_model_snippets_run(capsys):
  text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
  section = text[text.index("## Your model"):text.index("## Trainable compression")]
  blocks = re.findall(r"```python\n(.*?)```", section, re.S)
  assert len(blocks) == 4  # linen + scan stack, NNX, Hugging Face / any function, autotune
  for i, code in enumerate(blocks):
    exec(compile(code, f"README.md (Your model, block {i})", "exec"), {})
  out = capsys.readouterr().out
  assert "ScanCheckpointBlock_0/Dense_0/kernel: dense 64x64 -> 64x64, stacked 4" in out
  assert "| params/Conv_0/kernel |" in out and "chosen" in out
