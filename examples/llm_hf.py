"""The ``jlr.llm`` recipe on a model a user brings: transformers' ``FlaxLlamaForCausalLM``
(4.46.3) built from a config matching SmolLM2-135M and loaded with the GGUF weights,
against ``jlr.models.llama`` on the same weights -- perplexity before and after the same
compression (calibrate -> truncation-loss allocation -> SVD-LLM), which must agree to
1e-3 relative.

transformers 4.46.3's Flax Llama builds its rotary table with base 10,000 whatever the
config's ``rope_theta`` (``create_sinusoidal_positions``); SmolLM2 uses 100,000. Loaded
as is, the Hugging Face model is a different model (its perplexity is reported as
``hf_unpatched``); :func:`hf_model` builds it with the config's base.

    python examples/llm_hf.py            # ~10 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from jlr import llm  # noqa: E402
from jlr.models import llama  # noqa: E402
from compress_llm import RESULTS, is_target, windows  # noqa: E402
from text import kjv_verses, shakespeare_sentences  # noqa: E402


@contextlib.contextmanager
def rope_base(base: float):
  """transformers' Flax Llama rotary table, built with ``base`` inside the block."""
  from transformers.models.llama import modeling_flax_llama as m

  old = m.create_sinusoidal_positions

  def table(num_pos, dim):
    inv = 1.0 / (base ** (np.arange(0, dim, 2) / dim))
    freqs = np.einsum("i,j->ij", np.arange(num_pos), inv).astype("float32")
    emb = np.concatenate((freqs, freqs), -1)
    return jnp.array(np.concatenate((np.sin(emb)[:, None, :], np.cos(emb)[:, None, :]), -1))

  m.create_sinusoidal_positions = table
  try:
    yield
  finally:
    m.create_sinusoidal_positions = old


def hf_model(cfg: llama.LlamaConfig, variables, *, patch: bool = True, max_len: int = 1024):
  """``(logits_fn, params)`` of a ``FlaxLlamaForCausalLM`` holding ``variables``' weights
  (the tied embedding copied into ``lm_head``: Flax Llama has no tying)."""
  from transformers import FlaxLlamaForCausalLM, LlamaConfig

  hc = LlamaConfig(vocab_size=cfg.vocab, hidden_size=cfg.d, intermediate_size=cfg.ffn,
                   num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                   num_key_value_heads=cfg.kv_heads, rms_norm_eps=cfg.eps,
                   rope_theta=cfg.rope_base, max_position_embeddings=max_len,
                   tie_word_embeddings=False)
  with rope_base(cfg.rope_base) if patch else contextlib.nullcontext():
    model = FlaxLlamaForCausalLM(hc, _do_init=False)
    module = model.module
  p = variables["params"]
  layers = {}
  for i in range(cfg.layers):
    b = p[f"blocks_{i}"]
    layers[str(i)] = {
        "input_layernorm": {"weight": b["attn_norm"]["scale"]},
        "post_attention_layernorm": {"weight": b["mlp_norm"]["scale"]},
        "self_attn": {f"{n}_proj": {"kernel": b["attn"][n]["kernel"]} for n in "qkvo"},
        "mlp": {f"{n}_proj": {"kernel": b["mlp"][n]["kernel"]} for n in ("gate", "up", "down")}}
  params = {"model": {"embed_tokens": {"embedding": p["embed"]["embedding"]},
                      "layers": layers, "norm": {"weight": p["norm"]["scale"]}},
            "lm_head": {"kernel": p["embed"]["embedding"].T}}

  def logits_fn(params, ids):
    with rope_base(cfg.rope_base) if patch else contextlib.nullcontext():
      pos = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
      return module.apply({"params": params}, ids, attention_mask=jnp.ones_like(ids),
                          position_ids=pos).logits
  return logits_fn, params


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--remove", type=float, default=0.4)
  p.add_argument("--calib", type=int, default=16)
  p.add_argument("--eval-windows", type=int, default=16)
  p.add_argument("--ctx", type=int, default=256)
  p.add_argument("--out-dir", default=RESULTS)
  a = p.parse_args(argv)
  t0 = time.perf_counter()
  model, variables, tok = llama.load_gguf()
  calib = windows(tok, shakespeare_sentences(), a.ctx, a.calib)
  evalw = windows(tok, kjv_verses()[20000:], a.ctx, a.eval_windows)
  jfn = lambda p, ids: model.apply(p, ids)[0]  # noqa: E731
  hfn, hparams = hf_model(model.cfg, variables)
  ufn, _ = hf_model(model.cfg, variables, patch=False)
  is_proj = is_target(["attn", "mlp"])
  hf_proj = lambda path, leaf=None: path.endswith("_proj/kernel")  # noqa: E731
  res = {"command": "python examples/llm_hf.py", "remove": a.remove,
         "eval_tokens": int(evalw[:, 1:].size)}

  def ppl(fn, params):
    return math.exp(float(llm.nll(fn, params, evalw).mean()))

  res["dense"] = {"jlr": ppl(jfn, variables), "hf": ppl(hfn, hparams),
                  "hf_unpatched": ppl(ufn, hparams)}
  small, fac = {}, {}
  for name, fn, params, sel in (("jlr", jfn, variables, is_proj), ("hf", hfn, hparams, hf_proj)):
    cal = llm.calibrate(fn, params, calib, select=sel, magnitudes=False, progress=False)
    fac[name] = llm.factors(params, cal, "svd_llm")
    rk = llm.allocate(fac[name].spectra, 1 - a.remove, by="loss")
    small[name] = (fn, llm.compress(fac[name], rk), rk)
  res["compressed"] = {n: ppl(fn, tree) for n, (fn, tree, _) in small.items()}
  # the ranks each allocation found differ where float rounding of the two forwards flips
  # near-ties of the greedy; jlr's ranks on the Hugging Face factors isolate the rest
  to_hf = {p: p.replace("params/blocks_", "model/layers/").replace("/attn/", "/self_attn/")
           .replace("/kernel", "_proj/kernel") for p in small["jlr"][2]}
  moved = {to_hf[p]: r for p, r in small["jlr"][2].items()}
  res["ranks_differ"] = sum(moved[p] != r for p, r in small["hf"][2].items())
  res["compressed_same_ranks"] = {"jlr": res["compressed"]["jlr"],
                                  "hf": ppl(hfn, llm.compress(fac["hf"], moved))}
  for k in ("dense", "compressed", "compressed_same_ranks"):
    res[k]["rel_diff"] = abs(res[k]["hf"] / res[k]["jlr"] - 1)
  res["wall_seconds"] = time.perf_counter() - t0
  print(json.dumps(res, indent=1))
  os.makedirs(a.out_dir, exist_ok=True)
  with open(os.path.join(a.out_dir, "llm_hf.json"), "w") as f:
    json.dump(res, f, indent=1)
  return res


if __name__ == "__main__":
  main()
