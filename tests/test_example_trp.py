"""Tests of examples/trp_cnn.py (TRP on a ResNet). Fast: the analytic conv FLOP count
against a hand count and XLA's cost analysis. Slow (a tiny ResNet-8 run, ~1 min on a
loaded 2-core machine): the JSON, the decoupled model against independent
recomputations (jax/numpy), and that an interrupted + resumed run is bit-identical to
an uninterrupted one."""

import json
import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
sys.path.insert(0, EXAMPLES)

from conftest import init, require  # noqa: E402

require("matplotlib", "orbax.checkpoint", "tqdm", "zarr")
import jlr  # noqa: E402
import jlr.flax  # noqa: E402

TINY = ["--dataset", "mnist", "--depth", "8", "--width", "8", "--train-limit", "256",
        "--test-limit", "128", "--batch-size", "32", "--period", "4", "--lr", "0.05",
        "--runs", "trp_nu_spatial", "--no-progress"]


def _example():
  import data

  try:
    data._mnist_zip()
  except FileNotFoundError as e:
    pytest.skip(str(e))
  import trp_cnn

  return trp_cnn


def _conv(h, w, k, cin, cout):
  return 2 * h * w * k * k * cin * cout


RESNET8_W8 = (_conv(28, 28, 3, 1, 8) + 2 * _conv(28, 28, 3, 8, 8)  # by hand, on 28x28
              + _conv(14, 14, 3, 8, 16) + _conv(14, 14, 3, 16, 16) + _conv(14, 14, 1, 8, 16)
              + _conv(7, 7, 3, 16, 32) + _conv(7, 7, 3, 32, 32) + _conv(7, 7, 1, 16, 32))


@pytest.mark.parametrize("layout", ["conv_channel", "conv_spatial"])
def test_conv_flops_match_a_hand_count_and_xla(layout):
  import jax

  trp_cnn = _example()
  model = trp_cnn.ResNet(depth=8, width=8)
  v = init(model, jnp.zeros((1, 28, 28, 1)), seed=0)
  dense = trp_cnn.conv_flops(model, v, (28, 28, 1))
  assert sum(dense.values()) == RESNET8_W8
  f = jlr.trp.decouple(v["params"], jlr.ranks.fixed(3), select=trp_cnn.BLOCK_CONVS, layout=layout)
  fv = {**v, "params": f}
  fact = trp_cnn.conv_flops(model, fv, (28, 28, 1))
  # stage1_block0/conv1: 3x3, 8 -> 16 channels, stride 2, 28x28 in, 14x14 out, rank 3
  got = fact["stage1_block0/conv1"]
  if layout == "conv_channel":
    assert got == 2 * 14 * 14 * (9 * 8 * 3 + 3 * 16)
  else:  # the 3x1 conv runs at 14 x 28 (vertical stride only), the 1x3 at 14 x 14
    assert got == 2 * (14 * 28 * 3 * 8 * 3 + 14 * 14 * 3 * 3 * 16)
  # XLA agrees on what factorizing saved (the rest of the forward is identical); it
  # skips the zero-padding taps of SAME convs, hence the tolerance
  fwd = lambda v: (lambda x: jlr.flax.apply(model, v, x, train=False))  # noqa: E731
  x1 = jnp.zeros((1, 28, 28, 1))
  saved_xla = trp_cnn.xla_flops(fwd(v), x1) - trp_cnn.xla_flops(fwd(fv), x1)
  saved = sum(dense.values()) - sum(fact.values())
  assert saved_xla == pytest.approx(saved, rel=0.15)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """Two epochs in one go (shared by the smoke and the resume test)."""
  trp_cnn = _example()
  out = tmp_path_factory.mktemp("trp_straight")
  res = trp_cnn.main(TINY + ["--epochs", "2", "--out-dir", str(out), "--timing-batch", "16",
                             "--timing-repeats", "1"])
  return res, out


@pytest.mark.slow
def test_trp_cnn_smoke(straight):
  import data

  res, out = straight
  rows = res["rows"]
  assert list(rows) == ["dense", "trp_nu_spatial"]
  saved = json.loads((out / "trp_cnn.json").read_text())
  assert set(saved["rows"]) == set(rows) and saved["rows"]["trp_nu_spatial"]["fingerprint"]
  assert (out / "trp_cnn.png").stat().st_size > 10_000
  assert "trp_nu_spatial" in res["table"] and "measured_speedup" in rows["trp_nu_spatial"]

  _, _, x_test, y_test = data.mnist()
  x, y = jnp.asarray(x_test[:128]), np.asarray(y_test[:128])
  trp_cnn = _example()
  model = trp_cnn.ResNet(depth=8, width=8)
  for name, row in rows.items():
    art = res["artifacts"][name]
    dec = art["decoupled"]
    # the reported decoupled accuracy is jlr.flax.apply's on the factorized model
    logits = jlr.flax.apply(model, dec, x, train=False)
    assert row["acc_decoupled"] == pytest.approx(float(np.mean(np.argmax(logits, -1) == y)))
    dense_logits = model.apply(art["variables"], x, train=False)
    assert row["acc_dense_weights"] == pytest.approx(float(np.mean(np.argmax(dense_logits, -1) == y)))
    # each block conv kept exactly the singular values above the threshold (numpy SVD)
    for path, rank in row["decoupled_ranks"].items():
      w, f = art["variables"]["params"], dec["params"]
      for part in path.split("/"):
        w, f = w[part], f[part]
      assert isinstance(f, jlr.LowRank) and f.rank == rank
      lay = jlr.layouts.infer("kernel", w.shape, jlr.layouts.Spec(kind=row["decouple_layout"]))[0]
      s = np.linalg.svd(np.asarray(lay.to_matrix(w), np.float64), compute_uv=False)
      assert rank == max(1, int((s > 0.05).sum())), path
    assert len(row["decoupled_ranks"]) == 6  # 3 stages x 1 block x 2 convs
    assert row["conv_flops"] > 0 and row["flop_speedup"] == pytest.approx(
        row["conv_flops_dense"] / row["conv_flops"])
  assert rows["dense"]["conv_flops_dense"] == RESNET8_W8
  # TRP: the energy rank of the trained block convs is below full rank
  r = rows["trp_nu_spatial"]
  assert sum(r["energy_ranks"].values()) < sum(r["full_ranks"].values())


@pytest.mark.slow
def test_trp_cnn_resume_is_bit_identical(straight, tmp_path):
  trp_cnn = _example()
  res, _ = straight
  ckpt = str(tmp_path / "ckpt")
  common = TINY + ["--no-timing", "--out-dir", "", "--ckpt-dir", ckpt]
  stopped = trp_cnn.main(common + ["--epochs", "2", "--stop-after", "1"])  # "interrupted"
  assert stopped["stopped_after"] == 1
  resumed = trp_cnn.main(common + ["--epochs", "2", "--resume"])
  for name, row in res["rows"].items():
    assert resumed["history"][name][0]["epoch"] == 2  # it did resume, not retrain
    assert resumed["rows"][name]["fingerprint"] == row["fingerprint"], name


@pytest.mark.slow
def test_trp_cnn_on_a_mesh_matches_unsharded(straight):
  import jax

  if len(jax.devices()) < 8:
    pytest.skip("needs 8 (simulated) devices: see tests/conftest.py")
  trp_cnn = _example()
  res, _ = straight
  got = trp_cnn.main(TINY + ["--epochs", "2", "--no-timing", "--out-dir", "", "--mesh",
                             "data=4,model=2"])
  for name, row in res["rows"].items():
    for a, b in zip(res["history"][name], got["history"][name]):
      assert b["loss"] == pytest.approx(a["loss"], rel=1e-3, abs=1e-4)
    g = got["rows"][name]
    assert g["decoupled_ranks"] == row["decoupled_ranks"]
    assert abs(g["acc_decoupled"] - row["acc_decoupled"]) <= 1 / 128 + 1e-9  # one image at most
    for path in row["energy_ranks"]:
      w0 = res["artifacts"][name]["variables"]["params"]
      w1 = got["artifacts"][name]["variables"]["params"]
      for part in path.split("/"):
        w0, w1 = w0[part], w1[part]
      # reduction order differs across devices; 16 SGD steps (and 4 projections) amplify it
      w0, w1 = np.asarray(w0, np.float64), np.asarray(w1, np.float64)
      assert np.linalg.norm(w1 - w0) <= 1e-2 * np.linalg.norm(w0), (name, path)
