"""``summary``: what a factorization costs and saves, per leaf and in total.

FLOPs are counted per application of a layer -- one input row for Dense/DenseGeneral,
one token for Embed, one output position for Conv -- as ``2 * multiply-adds``:
``2 m n`` dense and ``2 r (m + n)`` factorized. A dense embedding lookup costs no
FLOPs; its factorized form costs ``2 r n`` per token (a gather then a matmul), and the
report says so rather than hiding it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp

from jlr import ranks as ranks_lib
from jlr import select as select_lib
from jlr.lowrank import is_lowrank
from jlr.paths import leaf_name
from jlr.select import KERNEL_NAMES, is_array, layout_for
from jlr.transforms import Plan, PyTree, plan as make_plan


@dataclasses.dataclass(frozen=True)
class Row:
  path: str
  kind: str
  shape: tuple[int, ...]
  rank: int | None  # None: dense
  max_rank: int | None
  params: int
  dense_params: int
  flops: int
  dense_flops: int
  rule: str = ""

  @property
  def larger_than_dense(self) -> bool:
    return self.params >= self.dense_params and self.rank is not None


@dataclasses.dataclass(frozen=True)
class Report:
  """Per-leaf rows (kernels only) and totals over the whole tree."""

  rows: tuple[Row, ...]
  total_params: int  # every array leaf, factorized or not
  dense_total_params: int  # the same tree with every LowRank merged

  @property
  def kernel_params(self) -> int:
    return sum(r.params for r in self.rows)

  @property
  def dense_kernel_params(self) -> int:
    return sum(r.dense_params for r in self.rows)

  @property
  def flops(self) -> int:
    return sum(r.flops for r in self.rows)

  @property
  def dense_flops(self) -> int:
    return sum(r.dense_flops for r in self.rows)

  @property
  def compression(self) -> float:
    """Dense params / params over the whole tree (> 1 means smaller)."""
    return self.dense_total_params / max(self.total_params, 1)

  @property
  def flop_speedup(self) -> float:
    """Dense FLOPs / FLOPs over the kernels (the theoretical speed-up)."""
    return self.dense_flops / max(self.flops, 1)

  def to_dict(self) -> dict:
    return dict(rows=[dataclasses.asdict(r) for r in self.rows], total_params=self.total_params,
                dense_total_params=self.dense_total_params, compression=self.compression,
                flops=self.flops, dense_flops=self.dense_flops, flop_speedup=self.flop_speedup)

  def __str__(self) -> str:
    head = ("path", "layout", "shape", "rank", "params", "dense", "FLOPs", "dense FLOPs")
    body = []
    for r in self.rows:
      rank = "dense" if r.rank is None else f"{r.rank}/{r.max_rank}"
      mark = " !" if r.larger_than_dense else ""
      body.append((r.path, r.kind, "x".join(map(str, r.shape)), rank + mark, f"{r.params:,}",
                   f"{r.dense_params:,}", _si(r.flops), _si(r.dense_flops)))
    body.append(("total (all leaves)", "", "", "", f"{self.total_params:,}",
                 f"{self.dense_total_params:,}", _si(self.flops), _si(self.dense_flops)))
    widths = [max(len(str(x[i])) for x in [head] + body) for i in range(len(head))]
    line = lambda cells: "  ".join(  # noqa: E731
        str(c).ljust(w) if i < 4 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    rule = "-" * len(line(head))
    out = [line(head), rule] + [line(b) for b in body[:-1]] + [rule, line(body[-1])]
    out.append(f"params {self.total_params:,} vs {self.dense_total_params:,} dense: "
               f"{self.compression:.2f}x smaller; kernel FLOPs {self.flop_speedup:.2f}x fewer "
               "(per input row / output position)")
    if any(r.larger_than_dense for r in self.rows):
      out.append("! factorized leaf is not smaller than its dense kernel (past break-even)")
    return "\n".join(out)

  def __repr__(self) -> str:
    return str(self)


def _si(x: float) -> str:
  for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
    if x >= scale:
      return f"{x / scale:.2f}{unit}"
  return f"{int(x)}"


def _row(path, layout, batch, rank, rule="") -> Row:
  count = math.prod(batch)
  dense_params = count * layout.size
  dense_flops = count * layout.flops()
  if rank is None:
    return Row(path, layout.kind, batch + layout.shape, None, layout.max_rank, dense_params,
               dense_params, dense_flops, dense_flops)
  flops = count * layout.flops(rank)
  return Row(path, layout.kind, batch + layout.shape, rank, layout.max_rank,
             count * layout.factor_size(rank), dense_params, flops, dense_flops, rule)


def summary(params: PyTree, rank: ranks_lib.RankArg | Plan | None = None,
            **plan_kwargs: Any) -> Report:
  """Report per-leaf shape, rank, params and FLOPs of ``params``.

  With ``rank`` (and optionally ``select``/``layout``, as in :func:`jlr.plan`), or a
  :class:`jlr.Plan`, reports the cost of that plan *before* applying it.
  """
  the_plan = None
  if rank is not None:
    the_plan = rank if isinstance(rank, Plan) else make_plan(params, rank, **plan_kwargs)
  rows, total, dense_total = [], 0, 0
  for path, leaf in select_lib.leaves(params)[0]:
    if is_lowrank(leaf):
      row = _row(path, leaf.layout, leaf.batch_shape, leaf.rank)
    elif is_array(leaf):
      size = math.prod(jnp.shape(leaf))
      total, dense_total = total + size, dense_total + size
      entry = the_plan.get(path) if the_plan is not None else None
      if entry is not None:
        row = _row(path, entry.layout, entry.batch_shape, entry.rank, entry.rule)
        total += row.params - row.dense_params
      elif leaf_name(path) in KERNEL_NAMES and jnp.ndim(leaf) >= 2:
        try:  # a dense row: the layout only names its kind and largest rank
          layout, b = layout_for(plan_kwargs.get("layout"), path, leaf)
        except ValueError:  # e.g. layout="conv_spatial" aimed at the selected convs only
          layout, b = layout_for(None, path, leaf)
        row = _row(path, layout, tuple(jnp.shape(leaf))[:b], None)
      else:
        continue
      rows.append(row)
      continue
    else:
      continue
    total += row.params
    dense_total += row.dense_params
    rows.append(row)
  return Report(tuple(rows), total, dense_total)


def bandwidth_bound(t_dense: float, t_floor: float, size: float, size_floor: float,
                    size_dense: float) -> float:
  """The decode speed-up over dense of a model reading ``size`` bytes of weights per
  token, if every step were bound by reading them: a step costs the floor's time
  ``t_floor`` (what a token costs besides the compressible weights, measured on a model
  with those weights cut to almost nothing, of ``size_floor`` bytes) plus the dense
  remainder scaled by the bytes left,

      t = t_floor + (t_dense - t_floor) (size - size_floor) / (size_dense - size_floor),

  and the bound is ``t_dense / t``."""
  share = (size - size_floor) / (size_dense - size_floor)
  return t_dense / (t_floor + (t_dense - t_floor) * share)
