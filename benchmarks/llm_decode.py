"""Figure 7: where a decode step's time goes -- SmolLM2-135M-shaped Llama, KV-cache decode,
dense vs factorized projections, against the bytes each token reads.

Decode at small batch is memory-bound: each token reads every weight once. Factorizing
the 210 projections to keep ``1 - remove`` of their parameters shrinks the bytes read
per token, so a purely bandwidth-bound step would speed up as

    t_dense / (t_floor + (t_dense - t_floor) * proj_bytes_small / proj_bytes_dense)

where ``t_floor`` is the step with every projection at rank 8 (what a token costs besides
projection weights: the tied LM head's 113 MB, attention over the cache, norms, the
dispatch of a few hundred ops). The table puts the measured speed-up beside that bound
and beside the plain bytes ratio, and gives each variant's effective bandwidth on its
projection weights ``(bytes - floor bytes) / (t - t_floor)``: a factorized kernel is two
thin matrix-vector products where dense is one, and this column says what that costs.

Weights are random (speed does not depend on values; no GGUF needed); the cache is
donated; variants interleaved per repeat (``plots.interleaved``).

    python benchmarks/llm_decode.py [--quick]
"""

from __future__ import annotations

import argparse

import plots

NAME = "llm_decode"


def parse(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true", help="6 blocks, fewer repeats")
  p.add_argument("--remove", type=float, nargs="+", default=[0.2, 0.4, 0.6])
  p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
  p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--out-dir", default=None)
  a = p.parse_args(argv)
  a.layers = 2 if a.tiny else 6 if a.quick else 30
  a.repeats = 2 if a.tiny else 3 if a.quick else 7
  a.vocab = 512 if a.tiny else 49152
  return a


def main(argv=None) -> dict:
  a = parse(argv)
  import jax
  import jax.numpy as jnp

  import jlr
  import jlr.flax
  from jlr.models import llama
  from jlr.report import bandwidth_bound

  cfg = llama.LlamaConfig(vocab=a.vocab, d=576, layers=a.layers, heads=9, kv_heads=3,
                          ffn=1536, rope_base=1e5)
  model = llama.Llama(cfg)
  dense = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  proj = lambda path, x=None: path.endswith("/kernel") and ("/attn/" in path  # noqa: E731
                                                            or "/mlp/" in path)
  key = jax.random.key(1)
  variants = {"dense": dense}
  for r in a.remove:
    variants[f"{r:.0%} removed"] = jlr.factorize(dense, jlr.ranks.ratio(1 - r), select=proj,
                                                 method="randomized", key=key)
  variants["floor (rank 8)"] = jlr.factorize(dense, 8, select=proj, method="randomized", key=key)
  mb = {k: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(v)) / 2 ** 20
        for k, v in variants.items()}
  step = jax.jit(lambda v, ids, pos, cache: jlr.flax.apply(model, v, ids, pos, cache),
                 donate_argnums=3)
  length, tokens = 64, 4 if a.tiny else 16

  def decoder(tree, batch):
    ids = jnp.zeros((batch, 1), jnp.int32)

    def run():  # ``tokens`` steps from an empty cache; returns the last logits
      cache = model.init_cache(batch, length)
      for i in range(tokens):
        logits, cache = step(tree, ids, jnp.full((batch, 1), i, jnp.int32), cache)
      return logits
    return run

  rows, raw = [], {}
  for batch in a.batches:
    times = plots.interleaved({k: decoder(v, batch) for k, v in variants.items()},
                              repeats=a.repeats)
    t = {k: plots.median(v) / tokens for k, v in times.items()}
    raw[batch] = t
    t_d, t_f = t["dense"], t["floor (rank 8)"]
    for k in variants:
      speed = plots.ratio(times["dense"], times[k])
      bound = bandwidth_bound(t_d, t_f, mb[k], mb["floor (rank 8)"], mb["dense"])
      gbs = ((mb[k] - mb["floor (rank 8)"]) / 1024 / (t[k] - t_f)
             if k != "floor (rank 8)" and t[k] > t_f else None)
      rows.append([batch, k, mb[k], mb["dense"] / mb[k], 1e3 * t[k], speed,
                   bound if k not in ("dense", "floor (rank 8)") else None, gbs])
  res = {"name": NAME, "title": "Decode step: dense vs factorized projections "
                                f"(SmolLM2-135M shapes, {a.layers} blocks, KV cache)",
         "machine": plots.machine(argv, NAME),
         "table": plots.table(["batch", "model", "weights MB", "bytes ratio", "ms / token",
                               "speed-up", "bandwidth-bound speed-up",
                               "projection GB/s"], rows)}
  plots.write(NAME, res, a.out_dir)
  return res


if __name__ == "__main__":
  main()
