"""The README's quick start runs as written."""

import pathlib
import re


def test_quick_start_runs(capsys):
  text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
  code = re.search(r"## Quick start\n+```python\n(.*?)```", text, re.S).group(1)
  assert len(code.strip().splitlines()) == 5
  exec(compile(code, "README.md", "exec"), {})
  out = capsys.readouterr().out
  assert "total (all leaves)" in out and "smaller" in out
