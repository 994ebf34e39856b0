"""A trainer killed with SIGKILL mid-run and resumed from its orbax checkpoints ends
bit-identical to an uninterrupted run.

``examples/lod_mlp.py`` runs in a subprocess: LoD training with progressive shrinking
(so the killed run's checkpoints hold factors whose ranks changed), then a dense run.
The process is killed with SIGKILL right after it reports its second LoD epoch -- no
Python handler, no flush, no clean shutdown -- and restarted with ``--resume``. The
final parameters of both runs (sha256 over every leaf's bytes) must be equal.
"""

import json
import os
import signal
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "lod_mlp.py")

from conftest import require  # noqa: E402

require("orbax.checkpoint", "zarr")

TINY = ["--hidden", "64,64", "--train-limit", "2000", "--test-limit", "500", "--batch-size", "64",
        "--lam", "3e-3", "--eps", "0.1", "--epochs", "4", "--no-progress"]


def _env():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # one CPU device, like a user's run
  env["PYTHONUNBUFFERED"] = "1"
  return env


def _run(args, out_dir):
  subprocess.run([sys.executable, SCRIPT, *TINY, *args, "--out-dir", str(out_dir)],
                 check=True, env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL)
  return json.loads((out_dir / "lod_mlp.json").read_text())


@pytest.mark.slow  # an example run (~50 s): make test-slow
def test_sigkill_mid_run_then_resume_is_bit_identical(tmp_path):
  sys.path.insert(0, os.path.join(ROOT, "examples"))
  import data

  try:
    data._mnist_zip()
  except FileNotFoundError as e:
    pytest.skip(str(e))

  ckpt = tmp_path / "ckpt"
  proc = subprocess.Popen([sys.executable, SCRIPT, *TINY, "--out-dir", "", "--ckpt-dir", str(ckpt)],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                          env=_env(), cwd=ROOT)
  seen = []
  try:
    for line in proc.stdout:
      seen.append(line)
      if line.startswith("LoD: epoch=2 "):  # printed after epoch 2's checkpoint is written
        os.kill(proc.pid, signal.SIGKILL)
        break
  finally:
    proc.stdout.close()
    proc.wait(timeout=120)
  assert proc.returncode == -signal.SIGKILL, "".join(seen)
  index = json.loads((ckpt / "lod" / "ranks.json").read_text())
  assert max(map(int, index["ranks"])) < 4  # it really was killed mid-run
  assert not (ckpt / "dense").exists() or not any((ckpt / "dense").iterdir())

  resumed = _run(["--ckpt-dir", str(ckpt), "--resume"], tmp_path / "resumed")
  straight = _run([], tmp_path / "straight")
  assert resumed["lod_trained"]["fingerprint"] == straight["lod_trained"]["fingerprint"]
  assert resumed["lod_trained"]["ranks"] == straight["lod_trained"]["ranks"]
  assert resumed["dense"]["fingerprint"] == straight["dense"]["fingerprint"]
  assert resumed["rows"] == straight["rows"]
