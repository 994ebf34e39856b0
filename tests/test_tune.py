"""jlr.flax.autotune: the per-layer choice follows the measured times, the plan it returns
factorizes exactly the chosen layers in the chosen layout, and the cache is honoured."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlr
import jlr.flax
from jlr.flax import tune as at
from conftest import init, normal


class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(16, (3, 3), name="c1")(x))
    x = nn.relu(nn.Conv(16, (3, 3), name="c2")(x))
    return nn.Dense(10, name="head")(x.mean((1, 2)))


@pytest.fixture(scope="module")
def setup():
  model = Net()
  x = normal((2, 8, 8, 4))
  return model, init(model, x, seed=0), x


def _fake_times(table):
  """A stand-in for the stopwatch: ms by (layer kind, layout) from ``table``."""
  calls = []

  def fake(fns, repeats):
    calls.append(1)
    return {"f": table[len(calls) - 1]}
  return fake, calls


def test_choices_follow_measured_times(setup, monkeypatch):
  model, v, x = setup
  # measured in this order: c1 dense, channel, spatial; c2 dense, channel, spatial; head dense, dense-layout
  fake, calls = _fake_times([5.0, 4.0, 1.0, 1.0, 3.0, 2.0, 1.0, 0.5])
  monkeypatch.setattr(at, "_time", fake)
  monkeypatch.setattr(at, "_CACHE", {})
  rule = jlr.ranks.ratio(0.25, min_rank=1)
  tuned = at.autotune(model, v, x, rank=rule)
  assert len(calls) == 8
  assert tuned.choices == {"params/c1/kernel": "spatial", "params/c2/kernel": "dense",
                           "params/head/kernel": "channel"}
  assert tuned.times_ms["params/c2/kernel"] == {"dense": 1.0, "channel": 3.0, "spatial": 2.0}
  small = jlr.factorize(v, tuned.plan)
  # the dense-chosen kernel is untouched; the others are exactly jlr.factorize in that layout
  np.testing.assert_array_equal(small["params"]["c2"]["kernel"], v["params"]["c2"]["kernel"])
  sp = jlr.factorize(v, rule, layout=jlr.flax.layouts(model, v, x, conv="spatial"))
  ch = jlr.factorize(v, rule, layout=jlr.flax.layouts(model, v, x, conv="channel"))
  for path, ref in (("c1", sp), ("head", ch)):
    got, want = small["params"][path]["kernel"], ref["params"][path]["kernel"]
    assert got.layout == want.layout and got.rank == want.rank
    np.testing.assert_allclose(got.dense(), want.dense(), rtol=1e-5, atol=1e-6)
  assert small["params"]["c1"]["kernel"].layout.kind == "conv_spatial"
  y = jlr.flax.apply(model, small, x)
  chex.assert_shape(y, (2, 10))
  chex.assert_tree_all_finite(y)
  assert "| params/c1/kernel |" in tuned.table()


def test_dense_everywhere_leaves_the_tree_alone(setup, monkeypatch):
  model, v, x = setup
  fake, _ = _fake_times([1.0, 2.0, 3.0] * 2 + [1.0, 2.0])
  monkeypatch.setattr(at, "_time", fake)
  monkeypatch.setattr(at, "_CACHE", {})
  tuned = at.autotune(model, v, x, rank=jlr.ranks.ratio(0.5))
  assert set(tuned.choices.values()) == {"dense"} and not tuned.plan
  same = jlr.factorize(v, tuned.plan)
  chex.assert_trees_all_equal(same, v)


def test_cache_file_is_read_and_not_remeasured(setup, tmp_path):
  model, v, x = setup
  path = str(tmp_path / "times.json")
  first = at.autotune(model, v, x, rank=jlr.ranks.ratio(0.25), repeats=2, cache=path)
  at._CACHE.clear()  # a new process: only the file remains

  def boom(fns, repeats):
    raise AssertionError("measured again despite the cache")
  orig, at._time = at._time, boom
  try:
    again = at.autotune(model, v, x, rank=jlr.ranks.ratio(0.25), cache=path)
  finally:
    at._time = orig
  assert again.choices == first.choices and again.times_ms == first.times_ms


def test_bad_candidates(setup):
  model, v, x = setup
  with pytest.raises(ValueError, match="candidates"):
    at.autotune(model, v, x, rank=0.5, candidates=("diagonal",))


def test_real_timings_give_a_model_no_slower_per_layer(setup):
  """Every chosen layer's measured time is the minimum of its row (the dense one included)."""
  model, v, x = setup
  tuned = at.autotune(model, v, jnp.ones((4, 8, 8, 4)), rank=jlr.ranks.ratio(0.25), repeats=3)
  for path, t in tuned.times_ms.items():
    assert t[tuned.choices[path]] == min(t.values())


def test_compiler_options_keep_the_factorized_forward_equal_to_the_merged_dense_one(setup):
  """Under ``jlr.compiler_options()`` a factorized conv net computes what the dense model
  computes with the merged kernels, and what a plain ``jax.jit`` computes."""
  model, v, x = setup
  opts = jlr.compiler_options()
  assert opts == ({"xla_cpu_experimental_ynn_fusion_type": ""}
                  if jax.default_backend() == "cpu" else {})
  assert jlr.compiler_options("gpu") == {} and jlr.compiler_options("tpu") == {}
  opts["mutated"] = "x"  # a copy: the cached options are not changed by the caller
  assert "mutated" not in jlr.compiler_options()
  small = jlr.factorize(v, jlr.ranks.ratio(0.5))
  low = jax.jit(lambda p, x: jlr.flax.apply(model, p, x), compiler_options=jlr.compiler_options())
  plain = jax.jit(lambda p, x: jlr.flax.apply(model, p, x))
  want = model.apply(jlr.merge(small), x)
  chex.assert_trees_all_close(low(small, x), want, rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(plain(small, x), want, rtol=1e-5, atol=1e-5)


def test_timings_are_cached_per_compiler_options(setup):
  model, v, x = setup
  at._CACHE.clear()
  store = {}
  at.autotune(model, v, x, rank=jlr.ranks.ratio(0.25), repeats=1, cache=store,
              compiler_options={})
  plain = set(store)
  at.autotune(model, v, x, rank=jlr.ranks.ratio(0.25), repeats=1, cache=store)
  new = set(store) - plain
  if jax.default_backend() == "cpu":  # the default options' timings are new entries
    assert len(new) == len(plain) > 0
    assert all("xla_cpu_experimental_ynn_fusion_type" in k for k in new)
    assert not any("xla_cpu_experimental_ynn_fusion_type" in k for k in plain)


def test_a_1d_conv_beside_2d_ones_has_no_spatial_candidate():
  class Mixed(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.relu(nn.Conv(32, (3, 3), name="c2")(x))
      return nn.Conv(32, (3,), name="c1")(h.reshape(h.shape[0], -1, h.shape[-1]))

  model, x = Mixed(), jnp.ones((1, 6, 6, 16))
  v = init(model, x, seed=0)
  tuned = at.autotune(model, v, x, rank=jlr.ranks.ratio(0.25), repeats=1)
  assert set(tuned.times_ms["params/c2/kernel"]) == {"dense", "channel", "spatial"}
  assert set(tuned.times_ms["params/c1/kernel"]) == {"dense", "channel"}
