import numpy as np
import pytest

import jlr
from jlr import ranks
from jlr.layouts import Layout


def spectrum(k, decay=0.7):
  return decay ** np.arange(k)


def test_fixed_and_ratio_units():
  layout = Layout("dense", (100, 60))
  assert ranks.fixed(7).resolve(layout, None) == 7
  # ratio = fraction of params kept: r (m + n) <= x m n
  r = ranks.ratio(0.25).resolve(layout, None)
  assert r * 160 <= 0.25 * 6000 < (r + 1) * 160
  assert ranks.ratio(1e-6, min_rank=1).resolve(layout, None) == 1
  assert ranks.ratio(1e-6).resolve(layout, None) == 8  # the default floor
  assert ranks.ratio(1e-6).resolve(Layout("dense", (100, 5)), None) == 5  # capped at full
  assert ranks.ratio(1.0).resolve(layout, None) == 37  # floor(6000/160), below full rank 60


@pytest.mark.parametrize("e", [0.5, 0.9, 0.95, 0.99, 1.0])
def test_energy_picks_the_minimal_rank(e):
  s = spectrum(30)
  r = ranks.energy(e).resolve(Layout("dense", (30, 40)), s)
  frac = np.cumsum(s ** 2) / (s ** 2).sum()
  assert frac[r - 1] >= e - 1e-9
  if r > 1:
    assert frac[r - 2] < e


def test_energy_stacked_takes_the_largest_need_and_zero_matrix_is_rank_one():
  s = np.stack([spectrum(10, 0.1), spectrum(10, 0.95)])
  layout = Layout("dense", (10, 10))
  need = [ranks.energy(0.9).resolve(layout, x) for x in s]
  assert ranks.energy(0.9).resolve(layout, s) == max(need)
  assert ranks.energy(0.9).resolve(layout, np.zeros(10)) == 1


def test_value_threshold():
  s = np.array([3.0, 1.0, 0.06, 0.05, 0.01])
  assert ranks.value(0.05).resolve(Layout("dense", (5, 5)), s) == 3
  assert ranks.value(10.0).resolve(Layout("dense", (5, 5)), s) == 1


def test_round_up_to_hardware_multiple():
  layout = Layout("dense", (100, 60))
  assert ranks.round_up(ranks.fixed(9), 8).resolve(layout, None) == 16
  assert ranks.round_up(ranks.fixed(59), 8).resolve(layout, None) == 60  # capped
  with pytest.raises(TypeError):
    ranks.round_up(ranks.budget(0.5), 8)


def _tree(seed=0):
  rng = np.random.default_rng(seed)
  def lowish(m, n, decay):
    p, _ = np.linalg.qr(rng.normal(size=(m, m)))
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    k = min(m, n)
    return ((p[:, :k] * decay ** np.arange(k)) @ q[:, :k].T).astype(np.float32)
  # very different spectra: a budget should move parameters to the slow-decaying leaf
  return {"a": {"kernel": lowish(64, 64, 0.6)}, "b": {"kernel": lowish(64, 48, 0.97)},
          "c": {"kernel": lowish(32, 96, 0.85)}}


def _kept_energy(params, factorized):
  total = 0.0
  for name in params:
    w = params[name]["kernel"]
    f = factorized[name]["kernel"]
    approx = np.asarray(f.dense()) if isinstance(f, jlr.LowRank) else w
    total += (w ** 2).sum() - ((w - approx) ** 2).sum()
  return total


@pytest.mark.parametrize("fraction", [0.2, 0.35, 0.5])
def test_budget_meets_budget_and_beats_uniform_ratio(fraction):
  params = _tree()
  dense = sum(x["kernel"].size for x in params.values())
  fb = jlr.factorize(params, ranks.budget(fraction, min_rank=1), select="kernel")
  fu = jlr.factorize(params, ranks.ratio(fraction, min_rank=1), select="kernel")
  used = jlr.summary(fb).total_params
  assert used <= fraction * dense
  assert jlr.summary(fu).total_params <= fraction * dense
  assert _kept_energy(params, fb) > _kept_energy(params, fu)


def test_budget_absolute_params_multiple_and_too_small():
  params = _tree()
  fb = jlr.factorize(params, ranks.budget(params=4000, multiple=8), select="kernel")
  assert jlr.summary(fb).total_params <= 4000
  assert all(x["kernel"].rank % 8 == 0 for x in fb.values())
  with pytest.warns(UserWarning, match="over the budget of 10"):  # as ratio: the floor wins
    plan = jlr.plan(params, ranks.budget(params=10), select="kernel")
  assert [e.rank for e in plan.values()] == [8, 8, 8]


def test_budget_floor_break_even_and_groups():
  """Every leaf keeps rank >= min_rank (8 by default, as ratio), no leaf is given a rank
  past its break-even m n / (m + n), and group= gives every group its own share."""
  s = 0.5 ** np.arange(64)  # a steep spectrum: the greedy alone would starve it
  flat = np.ones(64)
  lay = Layout("dense", (64, 64))
  items = [("a/q", lay, s), ("b/q", lay, flat), ("a/k", lay, flat), ("b/k", lay, flat)]
  r = ranks.budget(0.25).allocate(items)
  assert min(r) >= 8 and max(r) <= 32
  assert sum(r) * 128 <= 0.25 * 4 * 64 * 64
  assert ranks.budget(0.25, min_rank=1).allocate(items)[0] < 8
  grouped = ranks.budget(0.25, group=lambda p: p.split("/")[1]).allocate(items)
  assert grouped[0] + grouped[1] <= 16 and grouped[2] == grouped[3] == 8  # 25% per group
  tiny = Layout("dense", (9, 32))  # break-even rank 7 < the floor: stays dense, charged 288
  assert ranks.budget(params=288 + 8 * 128, min_rank=8).allocate(
      [("t", tiny, np.ones(9)), ("a", lay, flat)]) == [8, 8]


def test_a_budget_keeps_a_leaf_dense_where_its_factors_would_not_save_parameters():
  """With an explicit select, a leaf the budget gives its break-even rank (a square
  kernel: r (m + n) = m n) or its floor past break-even stays the exact dense kernel, as
  the budget charged it; a fixed rank there is still obeyed (it is what the user asked)."""
  rng = np.random.default_rng(0)
  params = {"sq": {"kernel": rng.normal(size=(32, 32)).astype(np.float32)},  # flat spectrum
            "tiny": {"kernel": rng.normal(size=(9, 32)).astype(np.float32)},  # even 7 < 8
            "big": {"kernel": _tree()["a"]["kernel"]}}  # 64 x 64, steep
  rule = ranks.budget(params=32 * 32 + 9 * 32 + 8 * 128)
  chosen = jlr.plan(params, rule, select="kernel")
  assert sorted(chosen) == ["big/kernel"]
  out = jlr.factorize(params, rule, select="kernel")
  np.testing.assert_array_equal(out["sq"]["kernel"], params["sq"]["kernel"])
  np.testing.assert_array_equal(out["tiny"]["kernel"], params["tiny"]["kernel"])
  assert jlr.summary(out).total_params <= rule.params
  assert sorted(jlr.plan(params, 8, select="kernel")) == ["big/kernel", "sq/kernel", "tiny/kernel"]


def test_budget_normalized_gives_every_leaf_a_share():
  params = _tree()
  params["a"]["kernel"] = params["a"]["kernel"] * 100.0  # a huge-scale leaf
  raw = jlr.plan(params, ranks.budget(0.3), select="kernel")
  norm = jlr.plan(params, ranks.budget(0.3, normalize=True), select="kernel")
  assert raw["a/kernel"].rank > norm["a/kernel"].rank


@pytest.mark.parametrize("bad", [0.5, True, "8", None])
def test_as_rule_refuses_ambiguous_values(bad):
  with pytest.raises(TypeError):
    ranks.as_rule(bad)


@pytest.mark.parametrize("bad", [lambda: ranks.ratio(0), lambda: ranks.ratio(1.5),
                                 lambda: ranks.energy(0), lambda: ranks.budget(),
                                 lambda: ranks.budget(0.5, params=3), lambda: ranks.value(-1)])
def test_rule_arguments_are_checked(bad):
  with pytest.raises(ValueError):
    bad()


def test_parse():
  assert ranks.parse("ratio:0.25") == ranks.ratio(0.25)
  assert ranks.parse("fixed:64") == ranks.fixed(64)
  assert ranks.parse("energy:0.95") == ranks.energy(0.95)
  assert ranks.parse("budget:0.4") == ranks.budget(0.4)
  with pytest.raises(ValueError):
    ranks.parse("half")


@pytest.mark.parametrize("rule", [ranks.fixed(4), ranks.ratio(0.3), ranks.energy(0.5),
                                  ranks.energy(0.9), ranks.energy(0.99), ranks.value(0.2),
                                  ranks.round_up(ranks.energy(0.8), 4)])
def test_jittable_keep_mask_agrees_with_resolve(rule):
  import jax
  layout = Layout("dense", (30, 20))
  rng = np.random.default_rng(0)
  s = np.sort(np.abs(rng.normal(size=(3, 20))) * 0.8 ** np.arange(20), -1)[:, ::-1].copy()
  mask = np.asarray(jax.jit(lambda x: rule.mask(layout, x))(jax.numpy.asarray(s, "float32")))
  for i in range(3):
    r = rule.resolve(layout, s[i])
    np.testing.assert_array_equal(mask[i], np.arange(20) < r)


def test_budget_with_sensitivity_weights_normalized_energies():
  """``sensitivity={path: alpha}`` = the greedy on spectra rescaled to ``alpha_l s^2 /
  sum s^2`` (the first-order end-to-end distortion model), and a layer whose measured
  sensitivity is larger gets more rank."""
  s = np.linspace(2.0, 0.1, 12)
  lay = Layout("dense", (24, 12))
  items = [("a", lay, s), ("b", lay, s)]
  even = ranks.budget(0.5, sensitivity={"a": 1.0, "b": 1.0}, min_rank=1).allocate(items)
  assert even[0] == even[1]
  tilted = ranks.budget(0.5, sensitivity={"a": 10.0, "b": 1.0}, min_rank=1).allocate(items)
  assert tilted[0] > tilted[1] and sum(tilted) * 36 <= 0.5 * 2 * 288
  scaled = [(p, lay, s * np.sqrt(a / (s ** 2).sum())) for p, a in (("a", 10.0), ("b", 1.0))]
  assert tilted == ranks.budget(0.5, min_rank=1).allocate(scaled)
  with pytest.raises(ValueError, match="b: no sensitivity weight"):
    ranks.budget(0.5, sensitivity={"a": 1.0}).allocate(items)
