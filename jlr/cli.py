"""``jlr`` command line: inspect and compress saved params trees.

    jlr summary CKPT
    jlr compress CKPT --rank ratio:0.25|energy:0.95|fixed:64|value:0.05|budget:0.4
                      [--method svd|randomized] [--seed 0] [--layout conv_spatial]
                      --out OUT [--force]

CKPT is a directory written by ``jlr.checkpoint.save`` or a plain orbax checkpoint of a
(linen or NNX) params tree.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax

from jlr import checkpoint, ranks
from jlr.report import summary
from jlr.transforms import factorize


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="jlr", description=__doc__.split("\n\n")[0])
  sub = p.add_subparsers(dest="command", required=True)
  s = sub.add_parser("summary", help="print per-leaf params and FLOPs of a checkpoint")
  s.add_argument("ckpt")
  c = sub.add_parser("compress", help="factorize a checkpoint's kernels and save the result")
  c.add_argument("ckpt")
  c.add_argument("--rank", required=True, help="ratio:X | energy:X | fixed:N | value:T | budget:X")
  c.add_argument("--method", default="svd", choices=("svd", "randomized"))
  c.add_argument("--seed", type=int, default=0, help="PRNG seed for --method randomized")
  c.add_argument("--layout", default=None, help="conv layout for 4-D kernels, e.g. conv_spatial")
  c.add_argument("--out", required=True)
  c.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
  return p


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  if args.command == "compress" and os.path.exists(args.out) and not args.force:
    # refuse before loading or factorizing anything
    print(f"jlr: error: {args.out} exists; pass --force to overwrite it", file=sys.stderr)
    return 2
  try:
    params = checkpoint.load(args.ckpt)
    if args.command == "summary":
      print(summary(params))
      return 0
    rule = ranks.parse(args.rank)
    layout = None
    if args.layout:  # a conv layout applies to the 4-D (conv) kernels only
      layout = lambda path, leaf: args.layout if leaf.ndim == 4 else None  # noqa: E731
    key = jax.random.key(args.seed) if args.method == "randomized" else None
    out = factorize(params, rule, method=args.method, key=key, layout=layout)
    print(summary(out))
    checkpoint.save(args.out, out, force=args.force)
    print(f"saved to {args.out}")
    return 0
  except FileExistsError:  # OUT appeared while compressing
    print(f"jlr: error: {args.out} exists; pass --force to overwrite it", file=sys.stderr)
    return 2
  except (FileNotFoundError, ImportError, ValueError, TypeError) as e:
    print(f"jlr: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
