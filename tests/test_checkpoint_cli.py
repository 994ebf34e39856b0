import os
import subprocess
import sys

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlr
import jlr.flax
from jlr import checkpoint, cli, lod


class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(16, (3, 3))(x))
    return nn.Dense(10)(x.reshape(x.shape[0], -1))


def test_factorized_tree_roundtrips_without_a_template(tmp_path):
  model, x = Net(), jnp.ones((2, 8, 8, 3))
  v = jax.jit(model.init)(jax.random.key(0), x)  # flax's own init: energy 0.9 cuts its conv
  f = jlr.factorize(v, jlr.ranks.ratio(0.3, min_rank=1),
                    layout={"Conv_0": "conv_spatial"})
  checkpoint.save(str(tmp_path / "a"), f)
  g = checkpoint.load(str(tmp_path / "a"))
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, g), jax.tree.map(np.asarray, f))
  assert g["params"]["Conv_0"]["kernel"].layout.kind == "conv_spatial"
  np.testing.assert_allclose(jlr.flax.apply(model, g, x), jlr.flax.apply(model, f, x), rtol=1e-6)
  with pytest.raises(FileExistsError):
    checkpoint.save(str(tmp_path / "a"), f)
  # after LoD shrinking changed ranks, the new shapes come back as saved
  s = lod.extract(lod.init(v), ranks={"params/Dense_0/kernel": 3})
  checkpoint.save(str(tmp_path / "b"), s)
  assert checkpoint.load(str(tmp_path / "b"))["params"]["Dense_0"]["kernel"].rank == 3


def test_missing_and_corrupt_checkpoints(tmp_path):
  with pytest.raises(FileNotFoundError):
    checkpoint.load(str(tmp_path / "nope"))
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "garbage").write_text("x")
  with pytest.raises(ValueError, match="cannot load a checkpoint"):
    checkpoint.load(str(bad))


def test_cli_summary_and_compress(tmp_path, capsys):
  model, x = Net(), jnp.ones((2, 8, 8, 3))
  v = jax.jit(model.init)(jax.random.key(0), x)  # flax's own init: energy 0.9 cuts its conv
  plain = str(tmp_path / "plain")
  import orbax.checkpoint as ocp  # imported here: collection on every worker stays cheap

  with ocp.StandardCheckpointer() as ck:  # a plain orbax checkpoint of linen params
    ck.save(plain, jax.tree.map(np.asarray, v))
  assert cli.main(["summary", plain]) == 0
  assert "params/Dense_0/kernel" in capsys.readouterr().out
  out = str(tmp_path / "small")
  assert cli.main(["compress", plain, "--rank", "ratio:0.25", "--out", out]) == 0
  assert "smaller" in capsys.readouterr().out
  small = checkpoint.load(out)
  assert isinstance(small["params"]["Dense_0"]["kernel"], jlr.LowRank)
  assert cli.main(["compress", plain, "--rank", "ratio:0.25", "--out", out]) == 2
  assert "exists" in capsys.readouterr().err
  assert cli.main(["compress", plain, "--rank", "energy:0.9", "--method", "randomized",
                   "--layout", "conv_spatial", "--out", out, "--force"]) == 0
  assert checkpoint.load(out)["params"]["Conv_0"]["kernel"].layout.kind == "conv_spatial"
  assert cli.main(["compress", plain, "--rank", "half", "--out", out, "--force"]) == 2
  assert cli.main(["summary", str(tmp_path / "missing")]) == 2
  assert "no checkpoint" in capsys.readouterr().err


@pytest.mark.slow  # a second interpreter start: the entry point runs by default in
# test_cli_existing_out_as_a_command, `summary` of a missing checkpoint in-process above
def test_console_script_entry_point(tmp_path):
  exe = os.path.join(os.path.dirname(sys.executable), "jlr")
  r = subprocess.run([exe, "summary", str(tmp_path / "x")], capture_output=True, text=True)
  assert r.returncode == 2 and "no checkpoint" in r.stderr


def test_cli_refuses_an_existing_out_before_any_work(tmp_path, capsys, monkeypatch):
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep").write_text("mine")

  def no_load(directory):
    raise AssertionError("the checkpoint was loaded before refusing --out")
  monkeypatch.setattr(checkpoint, "load", no_load)
  assert cli.main(["compress", str(tmp_path / "in"), "--rank", "ratio:0.25",
                   "--out", str(out)]) == 2
  cap = capsys.readouterr()
  assert cap.out == ""  # no summary printed: nothing was factorized
  assert f"{out} exists" in cap.err and "--force" in cap.err and "force=True" not in cap.err
  assert (out / "keep").read_text() == "mine"


def test_cli_existing_out_as_a_command(tmp_path):
  """The console script: nonzero exit, the message on stderr, no traceback."""
  out = tmp_path / "out"
  out.mkdir()
  exe = os.path.join(os.path.dirname(sys.executable), "jlr")
  r = subprocess.run([exe, "compress", str(tmp_path / "missing"), "--rank", "ratio:0.25",
                      "--out", str(out)], capture_output=True, text=True)
  assert r.returncode == 2 and r.stdout == ""
  assert "--force" in r.stderr and "Traceback" not in r.stderr


def test_missing_orbax_says_how_to_install_it(tmp_path, capsys, monkeypatch):
  monkeypatch.setitem(sys.modules, "orbax.checkpoint", None)  # import orbax.checkpoint fails
  with pytest.raises(ImportError, match=r"pip install 'jlr\[cli\]'"):
    checkpoint.load(str(tmp_path))
  with pytest.raises(ImportError, match=r"pip install 'jlr\[cli\]'"):
    checkpoint.save(str(tmp_path / "x"), {"w": jnp.ones(2)})
  assert not (tmp_path / "x").exists()
  assert cli.main(["summary", str(tmp_path)]) == 2
  err = capsys.readouterr().err
  assert "orbax-checkpoint" in err and "pip install 'jlr[cli]'" in err
