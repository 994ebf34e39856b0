"""jlr.llm: the language-model recipe on a tiny random Llama, against numpy truths."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlr
from jlr import llm, paths
from jlr.models import llama
from conftest import init

CFG = llama.LlamaConfig(vocab=64, d=32, layers=2, heads=4, kv_heads=2, ffn=96, max_len=64)
MODEL = llama.Llama(CFG)


def logits_fn(p, ids):
  return MODEL.apply(p, ids)[0]


def is_proj(path, leaf=None):
  return path.endswith("/kernel") and ("/attn/" in path or "/mlp/" in path)


@pytest.fixture(scope="module")
def setup():
  params = init(MODEL, jnp.zeros((1, 8), jnp.int32), seed=0)
  rng = np.random.default_rng(0)
  # a low-entropy source (a random bigram chain) so the model has something to learn
  trans = rng.dirichlet(np.full(CFG.vocab, 0.05), CFG.vocab)
  def chain(n, t):
    out = np.zeros((n, t), np.int32)
    out[:, 0] = rng.integers(0, CFG.vocab, n)
    for j in range(1, t):
      out[:, j] = [rng.choice(CFG.vocab, p=trans[i]) for i in out[:, j - 1]]
    return out
  windows = chain(24, 17)
  cal = llm.calibrate(logits_fn, params, windows[:8], select=is_proj, fisher=2, progress=False)
  return params, windows, cal


def test_calibration_collects_every_projection(setup):
  params, windows, cal = setup
  kernels = [p for p in paths.flatten(params) if is_proj(p)]
  assert sorted(cal.grams) == sorted(kernels) == sorted(cal.magnitudes) == sorted(cal.fisher)
  g = cal.grams["params/blocks_0/attn/q/kernel"]
  assert g.count == 8 * 16 and g.matrix.shape == (32, 32)
  m = cal.magnitudes["params/blocks_0/attn/q/kernel"]
  assert m.count == 8 * 16 and np.all(m.mean > 0)


def test_calibration_cache_loads_the_same_and_recomputes_when_stale(setup, tmp_path,
                                                                   monkeypatch):
  params, windows, _ = setup
  path = str(tmp_path / "cal.pkl")
  kw = dict(select=is_proj, magnitudes=False, cache=path, progress=False)
  first = llm.calibrate(logits_fn, params, windows[:4], **kw)
  recompute = llm._calibrate

  def refuse(*a, **k):
    raise AssertionError("recomputed")

  monkeypatch.setattr(llm, "_calibrate", refuse)
  again = llm.calibrate(logits_fn, params, windows[:4], **kw)  # loaded: not recomputed
  g = "params/blocks_1/mlp/down/kernel"
  np.testing.assert_array_equal(again.grams[g].matrix, first.grams[g].matrix)
  assert again.layout[g] == first.layout[g]
  with pytest.raises(AssertionError, match="recomputed"):  # other windows: stale
    llm.calibrate(logits_fn, params, windows[4:8], **kw)
  moved = jax.tree.map(lambda x: x * 1.01, params)
  with pytest.raises(AssertionError, match="recomputed"):  # other weights: stale
    llm.calibrate(logits_fn, moved, windows[:4], **kw)
  # another model function on the same weights (here: a different norm epsilon) is stale
  other = llama.Llama(llama.LlamaConfig(**{**CFG.__dict__, "eps": 1e-3}))
  with pytest.raises(AssertionError, match="recomputed"):
    llm.calibrate(lambda p, ids: other.apply(p, ids)[0], params, windows[:4], **kw)
  # ... and so is the same program closing over a constant of other values
  def shifted(bias):
    return lambda p, ids: logits_fn(p, ids) + bias
  monkeypatch.setattr(llm, "_calibrate", recompute)
  llm.calibrate(shifted(jnp.zeros(CFG.vocab)), params, windows[:4], **kw)
  monkeypatch.setattr(llm, "_calibrate", refuse)
  llm.calibrate(shifted(jnp.zeros(CFG.vocab)), params, windows[:4], **kw)  # loaded
  with pytest.raises(AssertionError, match="recomputed"):
    llm.calibrate(shifted(jnp.ones(CFG.vocab)), params, windows[:4], **kw)
  with open(path, "wb") as f:  # a file cut short: recomputed, not a crash
    f.write(b"\x80\x04truncated")
  with pytest.raises(AssertionError, match="recomputed"):
    llm.calibrate(logits_fn, params, windows[:4], **kw)
  monkeypatch.setattr(llm, "_calibrate", recompute)


def test_svd_llm_truncation_loss_is_the_whitened_tail(setup):
  """SVD-LLM: cutting to rank r costs exactly sum_{j>r} s_j^2 of ||X W - X W'||^2, the
  s_j those of (X^T X)^{1/2} W (small damping); checked against numpy."""
  params, windows, cal = setup
  f = llm.factors(params, cal, "svd_llm")
  path = "params/blocks_1/mlp/down/kernel"
  lay, s = f.spectra[path]
  small = llm.compress(f, {path: 10})
  w = np.asarray(paths.flatten(params)[path], np.float64)
  w2 = np.asarray(paths.flatten(small)[path].dense(), np.float64)
  g = cal.grams[path].matrix
  g = g + 1e-2 * np.mean(np.diag(g)) * np.eye(len(g))  # the damping the recipe uses
  err = np.trace((w - w2).T @ g @ (w - w2))
  np.testing.assert_allclose(err, np.sum(s[10:] ** 2), rtol=2e-3)
  u, v = paths.flatten(small)[path].u, paths.flatten(small)[path].v
  chex.assert_shape([u, v], [(96, 10), (10, 32)])
  np.testing.assert_allclose(np.linalg.norm(u, axis=0), np.linalg.norm(v, axis=1), rtol=1e-4)


def test_asvd_scales_rows_by_mean_abs_activation(setup):
  params, windows, cal = setup
  path = "params/blocks_0/mlp/gate/kernel"
  small = llm.compress(llm.factors(params, cal, "asvd", alpha=0.5), {path: 6})
  w = np.asarray(paths.flatten(params)[path], np.float64)
  sc = cal.magnitudes[path].mean ** 0.5
  p, s, qt = np.linalg.svd(sc[:, None] * w, full_matrices=False)
  want = (p[:, :6] * s[:6]) @ qt[:6] / sc[:, None]
  np.testing.assert_allclose(np.asarray(paths.flatten(small)[path].dense()), want, atol=2e-4)


@pytest.mark.parametrize("keep", [0.3, 0.6])
def test_loss_allocation_meets_the_budget_per_kind_with_a_floor(setup, keep):
  params, _, cal = setup
  spec = llm.factors(params, cal, "svd_llm").spectra
  rk = llm.allocate(spec, keep, by="loss", min_rank=3)  # a tiny model: 8 would not fit
  for k in {llm.kind(p) for p in spec}:
    members = [p for p in spec if llm.kind(p) == k]
    size = sum(spec[p][0].size for p in members)
    used = sum(rk[p] * sum(spec[p][0].matrix_shape) for p in members)
    assert used <= keep * size + 1e-9, k
    chunk = max(sum(spec[p][0].matrix_shape) for p in members)
    assert used > keep * size - chunk * len(members), k  # spent, up to one component a leaf
  assert min(rk.values()) >= 3
  assert llm.kind("params/blocks_3/attn/q/kernel") == "attn/q"


def test_a_steep_spectrum_gives_up_rank_a_flat_one_keeps_it():
  lay = jlr.Layout("dense", (64, 64))
  spec = {"blocks_0/attn/q/kernel": (lay, 0.5 ** np.arange(64)),
          "blocks_1/attn/q/kernel": (lay, np.ones(64))}
  rk = llm.allocate(spec, 0.5, by="loss")
  assert rk["blocks_0/attn/q/kernel"] == 8 and rk["blocks_1/attn/q/kernel"] == 24
  assert llm.allocate(spec, 0.5, by="uniform") == {p: 16 for p in spec}


def test_full_rank_factors_reproduce_the_dense_nll(setup):
  params, windows, cal = setup
  f = llm.factors(params, cal, "svd")
  small = f.tree  # every calibrated kernel at full rank
  assert sum(map(jlr.is_lowrank, jax.tree.leaves(small, is_leaf=jlr.is_lowrank))) == 14
  a = llm.nll(logits_fn, params, windows)
  b = llm.nll(logits_fn, small, windows)
  chex.assert_shape(a, (24,))
  np.testing.assert_allclose(a, b, rtol=1e-4)


def test_factorize_in_one_call_is_factors_allocate_compress(setup):
  params, windows, cal = setup
  before = jax.tree.map(np.array, params)
  small = llm.factorize(params, cal, 0.5, by="loss", min_rank=2)
  f = llm.factors(params, cal, "svd_llm")
  want = llm.compress(f, llm.allocate(f.spectra, 0.5, by="loss", min_rank=2))
  got, ref = paths.flatten(small), paths.flatten(want)
  assert sorted(got) == sorted(ref)
  for p, x in ref.items():
    if jlr.is_lowrank(x):
      assert got[p].rank == x.rank
      np.testing.assert_allclose(np.asarray(got[p].dense()), np.asarray(x.dense()), atol=1e-5)
  kept = sum(x.size for p, x in got.items() if is_proj(p))
  assert kept <= 0.5 * sum(x.size for p, x in paths.flatten(params).items() if is_proj(p))
  chex.assert_trees_all_equal(params, before)  # the input is not mutated


def test_a_kernel_at_break_even_comes_back_as_its_exact_dense_kernel(setup):
  """A rank whose factors hold the kernel's own parameter count gains nothing from being
  cut: ``compress`` returns the kernel itself, not its truncation at that rank."""
  params, _, cal = setup
  f = llm.factors(params, cal, "svd_llm")
  q = "params/blocks_0/attn/q/kernel"
  w = np.asarray(paths.flatten(params)[q])
  m, n = w.shape
  even = m * n // (m + n)
  assert even * (m + n) == m * n  # 32 x 32: rank 16 is break-even
  out = paths.flatten(llm.compress(f, {q: even, "params/blocks_0/attn/k/kernel": 4}))
  assert not jlr.is_lowrank(out[q])
  np.testing.assert_allclose(np.asarray(out[q]), w, rtol=1e-4, atol=1e-5)
  assert jlr.is_lowrank(out["params/blocks_0/attn/k/kernel"])


def test_perplexity_bootstrap_interval():
  x = np.random.default_rng(0).normal(3.0, 0.3, 400)
  r = llm.perplexity(x, bootstrap=2000)
  assert r["low"] < r["ppl"] < r["high"]
  np.testing.assert_allclose(r["ppl"], np.exp(x.mean()))
  half = 1.96 * x.std() / np.sqrt(len(x))  # the normal interval of the mean
  np.testing.assert_allclose(np.log([r["low"], r["high"]]), [x.mean() - half, x.mean() + half],
                             atol=0.01)


def test_gradients_of_the_picked_leaves_are_the_full_gradient_s_and_fisher_sums_them(setup):
  """Differentiating the projections only (the rest held constant) gives the full
  gradient's values there; FWSVD's row weights are the squared gradient summed over each
  kernel's columns and over the Fisher windows, one window at a time."""
  params, windows, cal = setup
  loss = lambda p, w: llm.token_nll(logits_fn, p, w)  # noqa: E731
  full = jax.jit(jax.value_and_grad(loss))
  part = jax.jit(llm._value_and_grad_of(loss, lambda p, x: is_proj(p), rest="zeros"))
  (full_v, g0), (v, pg) = full(params, windows[:1]), part(params, windows[:1])
  np.testing.assert_allclose(v, full_v, rtol=1e-6)
  g0, pg = paths.flatten(g0), paths.flatten(pg)
  assert sorted(pg) == sorted(g0)
  for p in pg:
    if is_proj(p):
      np.testing.assert_allclose(pg[p], g0[p], rtol=1e-4, atol=1e-7)
    else:  # norms and the embedding: held constant, no gradient
      assert not np.any(np.asarray(pg[p])), p
  path = "params/blocks_1/mlp/down/kernel"
  g1 = paths.flatten(full(params, windows[1:2])[1])
  want = sum((np.asarray(g[path], np.float64) ** 2).sum(-1) for g in (g0, g1))
  assert cal.fisher[path].count == 2
  np.testing.assert_allclose(cal.fisher[path].weights, want, rtol=1e-4)


def test_update_moves_u_then_v_only_and_lowers_the_calibration_loss(setup):
  params, windows, cal = setup
  f = llm.factors(params, cal, "svd_llm")
  small = llm.compress(f, llm.allocate(f.spectra, 0.3, min_rank=3))
  before = llm.nll(logits_fn, small, windows[:8]).mean()
  u0 = np.array(paths.flatten(small)["params/blocks_0/attn/q/kernel"].u)
  new = llm.update(logits_fn, small, windows[:8], steps=8, lr=3e-3, progress=False)
  assert llm.nll(logits_fn, new, windows[:8]).mean() < before
  for path, x in paths.flatten(small).items():
    y = paths.flatten(new)[path]
    if not jlr.is_lowrank(x):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # norms, embedding
  np.testing.assert_array_equal(  # pure: the input tree is untouched
      np.asarray(paths.flatten(small)["params/blocks_0/attn/q/kernel"].u), u0)
  q0, q1 = (paths.flatten(t)["params/blocks_0/attn/q/kernel"] for t in (small, new))
  assert not np.allclose(q0.u, q1.u) and not np.allclose(q0.v, q1.v)  # both phases ran


def test_update_resumes_from_its_checkpoint_to_the_same_result(setup, tmp_path, monkeypatch):
  """Cut short after its second save (mid-``u``), a rerun with the same checkpoint ends
  exactly where an uninterrupted update does; another run's checkpoint is refused."""
  params, windows, cal = setup
  f = llm.factors(params, cal, "svd_llm")
  small = llm.compress(f, llm.allocate(f.spectra, 0.3, min_rank=3))
  kw = dict(steps=4, lr=3e-3, save_every=1, progress=False)
  want = llm.update(logits_fn, small, windows[:8], **kw)
  ckpt, real, calls = str(tmp_path / "update.pkl"), llm._save, []

  def interrupted(*args):
    real(*args)
    calls.append(1)
    if len(calls) == 2:
      raise KeyboardInterrupt
  monkeypatch.setattr(llm, "_save", interrupted)
  with pytest.raises(KeyboardInterrupt):
    llm.update(logits_fn, small, windows[:8], checkpoint=ckpt, **kw)
  monkeypatch.setattr(llm, "_save", real)
  got = llm.update(logits_fn, small, windows[:8], checkpoint=ckpt, **kw)
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
  with pytest.raises(ValueError, match="another run"):  # other settings, same file
    llm.update(logits_fn, small, windows[:8], checkpoint=ckpt, **{**kw, "lr": 1e-3})
  other = jax.tree.map(lambda x: x * 1.01, small)  # another model of the same shapes
  with pytest.raises(ValueError, match="another run"):
    llm.update(logits_fn, other, windows[:8], checkpoint=ckpt, **kw)
  with pytest.raises(ValueError, match="another run"):  # another call's file
    llm.heal(logits_fn, small, windows[:8], windows[8:], steps=2, checkpoint=ckpt,
             progress=False)


def test_heal_early_stops_and_never_returns_worse_than_it_started(setup, tmp_path):
  params, windows, cal = setup
  f = llm.factors(params, cal, "svd_llm")
  upd = dict(steps=1, lr=3e-3, progress=False, checkpoint=str(tmp_path / "update.pkl"))
  small = llm.update(logits_fn, llm.compress(f, llm.allocate(f.spectra, 0.3, min_rank=3)),
                     windows[:8], **upd)
  healed, log = llm.heal(logits_fn, small, windows[:16], windows[16:], steps=20, lr=3e-3,
                         eval_every=5, patience=2, progress=False,
                         checkpoint=str(tmp_path / "heal.pkl"))
  vals = dict(log.val)
  assert vals[log.best_step] == min(vals.values()) <= vals[0]
  got = llm.nll(logits_fn, healed, windows[16:]).mean()
  np.testing.assert_allclose(got, vals[log.best_step], rtol=1e-5)
  assert log.best_step > 0  # it learned the chain
  for p, x in paths.flatten(small).items():  # only the factors train; the rest is as given
    if not jlr.is_lowrank(x):
      np.testing.assert_array_equal(paths.flatten(healed)[p], x, err_msg=p)
  # resumable, as a pipeline: the update's checkpoint gives back its result bit for bit,
  # which is healing's starting tree, so its checkpoint resumes and ends where it did
  small = llm.update(logits_fn, llm.compress(f, llm.allocate(f.spectra, 0.3, min_rank=3)),
                     windows[:8], **upd)
  again, log2 = llm.heal(logits_fn, small, windows[:16], windows[16:], steps=20, lr=3e-3,
                         eval_every=5, patience=2, progress=False,
                         checkpoint=str(tmp_path / "heal.pkl"))
  assert log2.best_step == log.best_step


def test_sensitivity_rank_search_meets_the_budget(setup):
  params, windows, cal = setup
  f = llm.factors(params, cal, "asvd")
  score = lambda p: float(llm.nll(logits_fn, p, windows[:4]).mean())  # noqa: E731
  table = llm.sensitivity(score, params, f, levels=(0.25, 0.5, 0.75), progress=False)
  assert len(table) == 14 * 3
  rk = llm.sensitivity_ranks(table, f, 0.5)
  lays = {p: lay for p, (lay, _) in f.spectra.items()}
  used = sum(min(rk[p] * sum(lay.matrix_shape), lay.size) for p, lay in lays.items())
  assert used <= 0.5 * sum(lay.size for lay in lays.values())  # (past break-even: dense)
  assert len(set(rk.values())) > 1  # kernels differ in sensitivity
  # resumable: from a partial table (saved after each kernel) only the rest is scored
  saved, calls = [], []
  counted = lambda p: calls.append(1) or score(p)  # noqa: E731
  llm.sensitivity(counted, params, f, levels=(0.25, 0.5, 0.75), progress=False,
                  on_kernel=lambda t: saved.append(dict(t)))
  assert len(saved) == 14 and saved[-1] == table
  calls.clear()
  again = llm.sensitivity(counted, params, f, levels=(0.25, 0.5, 0.75), progress=False,
                          known=saved[4])
  assert again == table and len(calls) == 3 * (14 - 5)


def test_sensitivity_rank_search_says_when_one_threshold_overshoots(setup):
  """STRS cuts every kernel scoring under one threshold: when the budget needs a cut that
  scores as high as most kernels (here: all tie), it lands far under the budget -- said,
  with the kernel parameters it kept, not silently."""
  params, _, cal = setup
  f = llm.factors(params, cal, "asvd")
  table = {(p, 0.5): 1.0 for p in f.spectra}
  with pytest.warns(UserWarning, match=r"sensitivity_ranks: kept 50\.0%.*target of 95\.0%"):
    rk = llm.sensitivity_ranks(table, f, 0.95)
  lays = {p: lay for p, (lay, _) in f.spectra.items()}
  assert all(rk[p] == llm.ranks.ratio(0.5, min_rank=1).plain(lays[p]) for p in lays)


def test_negative_or_malformed_token_windows_are_refused(setup):
  """-100 padding would index the embedding from its end: a wrong number, so an error."""
  params, windows, _ = setup
  bad = windows[:4].copy()
  bad[2, 5] = -100
  with pytest.raises(ValueError, match=r"llm.nll: window 2 holds a negative token id \(-100"):
    llm.nll(logits_fn, params, bad)
  with pytest.raises(ValueError, match="llm.calibrate: window 2 holds a negative"):
    llm.calibrate(logits_fn, params, bad, progress=False)
  with pytest.raises(ValueError, match=r"llm.nll: windows must be an \(n, T \+ 1\) integer"):
    llm.nll(logits_fn, params, windows[:4].astype(np.float32))


def test_training_a_tree_without_factors_is_refused(setup):
  params, windows, _ = setup
  with pytest.raises(ValueError, match="llm.update: params has no jlr.LowRank leaf"):
    llm.update(logits_fn, params, windows[:4], steps=1, progress=False)
  with pytest.raises(ValueError, match="llm.heal: params has no jlr.LowRank leaf"):
    llm.heal(logits_fn, params, windows[:4], windows[4:6], steps=1, progress=False)


def test_unknown_method_and_missing_statistics_are_refused(setup):
  params, _, cal = setup
  with pytest.raises(ValueError, match="method must be one of"):
    llm.stats_for(cal, "magic")
  bare = llm.Calibration(cal.grams, None, None, cal.layout)
  with pytest.raises(ValueError, match="needs calibrate"):
    llm.stats_for(bare, "asvd")


def test_allocation_strength_interpolates_within_budget_and_uniform_is_a_candidate():
  lay = jlr.Layout("dense", (64, 64))
  spec = {"blocks_0/attn/q/kernel": (lay, 0.5 ** np.arange(64)),
          "blocks_1/attn/q/kernel": (lay, np.ones(64))}
  half = llm.allocate(spec, 0.5, strength=0.5)
  assert half == {"blocks_0/attn/q/kernel": 12, "blocks_1/attn/q/kernel": 20}
  loss = llm.allocate(spec, 0.5)
  prefers_loss = lambda rk: sum(abs(rk[p] - loss[p]) for p in rk)  # noqa: E731
  t, scores = llm.choose_strength(prefers_loss, spec, 0.5)
  assert t == 1.0 and set(scores) == {0.0, 0.25, 0.5, 1.0}
  t, _ = llm.choose_strength(lambda rk: -prefers_loss(rk), spec, 0.5, strengths=(0.5, 1.0))
  assert t == 0.0  # uniform is always among the candidates
  with pytest.raises(ValueError, match="strength"):
    llm.allocate(spec, 0.5, strength=2.0)


def test_an_embedding_without_statistics_gets_plain_svd_factors(setup):
  params = setup[0]
  emb = "params/embed/embedding"
  f = llm.factors(params, None, "svd", select=lambda p, x=None: p == emb)
  assert list(f.spectra) == [emb]
  w = np.asarray(paths.flatten(params)[emb], np.float64)
  np.testing.assert_allclose(f.spectra[emb][1], np.linalg.svd(w, compute_uv=False),
                             rtol=1e-4)
  small = llm.compress(f, {emb: 5})
  e = paths.flatten(small)[emb]
  p, s, qt = np.linalg.svd(w, full_matrices=False)
  np.testing.assert_allclose(np.asarray(e.dense()), (p[:, :5] * s[:5]) @ qt[:5], atol=2e-5)
  with pytest.raises(ValueError, match="plain SVD"):
    llm.factors(params, None, "svd_llm", select=lambda p, x=None: p == emb)


@pytest.fixture(scope="module")
def nnx_lm():
  """A tiny NNX LM given as ``nnx.merge(graphdef, state)(ids)``, its state calibrated and
  half its block kernels' parameters removed."""
  nnx = pytest.importorskip("flax.nnx")

  class Block(nnx.Module):
    def __init__(self, d, rngs):
      self.attn = nnx.MultiHeadAttention(num_heads=4, in_features=d, qkv_features=d,
                                         decode=False, rngs=rngs)
      self.up, self.down = nnx.Linear(d, 3 * d, rngs=rngs), nnx.Linear(3 * d, d, rngs=rngs)
      self.norm = nnx.LayerNorm(d, rngs=rngs)

    def __call__(self, x):
      x = x + self.attn(self.norm(x), mask=nnx.make_causal_mask(jnp.ones(x.shape[:2])))
      return x + self.down(jax.nn.gelu(self.up(x)))

  class LM(nnx.Module):
    def __init__(self, rngs):
      self.emb = nnx.Embed(CFG.vocab, 32, rngs=rngs)
      self.blocks = nnx.List([Block(32, rngs)])
      self.head = nnx.Linear(32, CFG.vocab, rngs=rngs)

    def __call__(self, ids):
      x = self.emb(ids)
      for b in self.blocks:
        x = b(x)
      return self.head(x)

  graphdef, state = nnx.split(LM(nnx.Rngs(0)))
  fn = lambda s, ids: nnx.merge(graphdef, s)(ids)  # noqa: E731
  windows = np.random.default_rng(1).integers(0, CFG.vocab, (12, 17)).astype(np.int32)
  sel = lambda path, leaf=None: path.startswith("blocks/") and path.endswith("kernel")  # noqa: E731
  cal = llm.calibrate(fn, state, windows[:8], select=sel, progress=False)
  before = jax.tree.map(np.array, state)
  small = llm.factorize(state, cal, 0.5)
  chex.assert_trees_all_equal(state, before)  # the input is not mutated
  return fn, state, windows, sel, small


def test_the_recipe_factorizes_an_nnx_lm_with_multi_head_attention_kernels(nnx_lm):
  """``MultiHeadAttention``'s kernels are 3-D (``(d, heads, head_dim)``, ``(heads,
  head_dim, d)``): the factorized state's logits equal the NNX model run on dense kernels
  rebuilt from the factors in numpy."""
  fn, state, windows, sel, small = nnx_lm
  flat, dense = paths.flatten(small), paths.flatten(state)
  factored = [p for p, x in flat.items() if jlr.is_lowrank(x)]
  assert sorted(factored) == sorted(p for p in dense if sel(p)) and len(factored) == 6
  assert flat["blocks/0/attn/query/kernel"].rank < 16  # 3-D kernels cut too
  rebuilt = paths.replace(state, {p: (np.asarray(flat[p].u) @ np.asarray(flat[p].v)).reshape(
      dense[p].shape) for p in factored})
  ids = windows[8:, :-1]
  np.testing.assert_allclose(np.asarray(jax.jit(jlr.factorized(fn))(small, ids)),
                             np.asarray(jax.jit(fn)(rebuilt, ids)), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_update_and_heal_train_an_nnx_lm_s_factors_only(nnx_lm):
  fn, _, windows, _, small = nnx_lm
  updated = llm.update(fn, small, windows[:8], steps=2, lr=1e-3, progress=False)
  healed, log = llm.heal(fn, updated, windows[:8], windows[8:], steps=2, lr=1e-3,
                         eval_every=1, progress=False)
  assert dict(log.val)[log.best_step] <= dict(log.val)[0]
  for p, x in paths.flatten(small).items():
    y = paths.flatten(healed)[p]
    if jlr.is_lowrank(x):
      chex.assert_equal_shape([x.u, y.u])
      assert not np.allclose(np.asarray(x.u), np.asarray(y.u)), p
    else:
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=p)


def test_rank_searches_compile_nothing_per_rank_pattern(setup, caplog):
  """``compress`` and ``merged`` slice, cast and transfer on the host: a new rank pattern
  compiles no XLA program (``jnp.asarray`` of a new shape would, in this JAX)."""
  params, _, cal = setup
  f = llm.factors(params, cal, "svd_llm")
  with jax.log_compiles(True), caplog.at_level("WARNING"):
    for keep in (0.21, 0.33, 0.47):
      llm.merged(llm.compress(f, llm.allocate(f.spectra, keep, min_rank=1)))
  assert not [r for r in caplog.records if "Finished XLA compilation" in r.getMessage()]


def test_nll_is_numpy_cross_entropy_with_one_program_per_window_count(setup, caplog):
  """``nll`` of 7 windows in batches of 4 equals numpy's per-window cross-entropy of the
  model's logits, and runs one shape (the last batch padded): a second call with another
  count compiles a forward at most once more."""
  params, windows, _ = setup
  w = windows[:7]
  logits = np.asarray(logits_fn(params, jnp.asarray(w[:, :-1])), np.float64)
  lp = logits - logits.max(-1, keepdims=True)
  lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
  truth = -np.take_along_axis(lp, w[:, 1:, None], -1)[..., 0].mean(-1)
  llm.nll(logits_fn, params, windows[8:12])  # the batch-4 program, compiled once here
  with jax.log_compiles(True), caplog.at_level("WARNING"):
    got = llm.nll(logits_fn, params, w, batch=4)
  chex.assert_shape(got, (7,))
  np.testing.assert_allclose(got, truth, rtol=1e-5)
  compiled = [r.getMessage() for r in caplog.records if "Finished XLA compilation" in r.getMessage()]
  assert not [m for m in compiled if "_per_window" in m or "lambda" in m], compiled


@pytest.mark.slow  # ~8 s alone (a full update and heal): make test-slow
def test_readme_recipe_runs_as_written(setup, tmp_path, monkeypatch):
  """README's ``jlr.llm`` recipe, executed as written on the tiny Llama (the names it
  leaves to the reader bound here): every call and keyword it shows exists, its
  checkpoints land where it says, and healing never ends worse than the update on its
  own validation windows."""
  import pathlib
  import re
  params, windows, _ = setup
  text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
  code = re.search(r"\*\*The recipe, as library calls \(`jlr.llm`\)\*\*.*?```python\n(.*?)```",
                   text, re.S).group(1)
  monkeypatch.chdir(tmp_path)
  ns = {"model": MODEL, "params": params, "is_projection": is_proj,
        "calib_windows": windows[:8], "train_windows": windows[8:16],
        "val_windows": windows[16:20], "test_windows": windows[20:24],
        "probe_ppl": lambda t: float(np.exp(llm.nll(logits_fn, llm.merged(t),
                                                    windows[16:20]).mean()))}
  exec(compile(code, "README.md (the jlr.llm recipe)", "exec"), ns)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["calibration.pkl", "heal.pkl",
                                                        "update.pkl"]
  small, log = ns["small"], ns["log"]
  assert any(jlr.is_lowrank(x) for x in jax.tree.leaves(small, is_leaf=jlr.is_lowrank))
  assert jlr.summary(small).total_params < jlr.summary(params).total_params
  assert min(v for _, v in log.val) <= log.val[0][1]
