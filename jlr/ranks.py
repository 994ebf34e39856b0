"""Rank rules: how many singular components each factorized leaf keeps.

A rule is resolved per leaf from its layout and (when it needs them) its singular
values. Every rule names its unit:

* :func:`fixed` ``(r)`` -- exactly ``r`` components; :func:`full` ``()`` -- ``min(m, n)``.
* :func:`ratio` ``(x)`` -- keep a fraction ``x`` of the leaf's *parameters*:
  ``r = floor(x * m * n / (m + n))``. ``ratio(0.25)`` makes the factors 1/4 the size.
  Never below ``min_rank`` (default 8, capped at full rank): a 64 -> 10 classifier at
  ``ratio(0.25)`` would otherwise keep 2 of its 10 directions and the model collapses;
  where the floor makes a leaf no smaller than dense it stays dense, and ``summary``
  flags raised ranks. ``ratio(x, min_rank=1)`` is the plain rule.
* :func:`energy` ``(e)`` -- smallest ``r`` with ``sum_{i<=r} s_i^2 >= e * sum_i s_i^2``
  (the energy threshold of TRP, Xu et al. 2019, arXiv 1812.02402).
* :func:`value` ``(t)`` -- keep singular values ``s_i > t`` (TRP's decoupling rule).
* :func:`budget` ``(fraction | params=)`` -- one global parameter budget over all
  leaves that share the rule (or per ``group=``), allocated greedily by largest
  marginal energy per parameter (``s_j^2 / (m + n)``), every leaf at rank >= 8.
* :func:`round_up` ``(rule, multiple)`` -- round another rule's rank up to a hardware
  multiple (8, 128), capped at full rank.

For stacked leaves (leading batch axes) one rank serves the whole stack: spectrum
rules take the largest rank any member needs.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Callable, Iterable, Mapping, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from jlr.layouts import Layout


class Rule:
  """Base class. ``needs_spectrum`` says whether ``resolve`` reads singular values."""

  needs_spectrum: bool = False
  is_global: bool = False

  def resolve(self, layout: Layout, s: np.ndarray | None) -> int:
    raise NotImplementedError

  def mask(self, layout: Layout, s: jax.Array, total: jax.Array | None = None) -> jax.Array:
    """Jittable boolean mask over ``s`` (``(..., k)``, descending) of the components
    this rule keeps, per matrix. Static shapes: used by TRP's in-step projection.
    Energy sums run in float32 here, so thresholds within ~1e-7 of 1.0 may keep one
    component fewer than :meth:`resolve` (float64) would."""
    r = self.resolve(layout, None)
    return jnp.broadcast_to(jnp.arange(s.shape[-1]) < r, s.shape)

  def describe(self) -> str:
    return repr(self)


RankArg = Union[int, Rule, Mapping[str, Any], Callable[[str, Any], Any]]
"""What a ``rank=`` argument may be: an int (:class:`fixed`), a rule, a mapping ``{path
pattern: int | rule}`` (leaves matching no pattern stay dense) or a callable ``(path,
leaf) -> int | rule | None`` (``None``: leave the leaf dense)."""


@dataclasses.dataclass(frozen=True)
class fixed(Rule):  # noqa: N801 - rules read as functions: ranks.fixed(64)
  """Exactly ``rank`` components."""

  rank: int

  def __post_init__(self) -> None:
    if isinstance(self.rank, bool) or not isinstance(self.rank, (int, np.integer)):
      raise TypeError(f"fixed rank must be an int, got {self.rank!r}")

  def resolve(self, layout: Layout, s: np.ndarray | None) -> int:
    return int(self.rank)

  def describe(self) -> str:
    return f"fixed {self.rank}"


@dataclasses.dataclass(frozen=True)
class full(Rule):  # noqa: N801
  """Full rank ``min(m, n)``: an exact factorization (Maestro's starting point)."""

  def resolve(self, layout: Layout, s: np.ndarray | None) -> int:
    return layout.max_rank

  def describe(self) -> str:
    return "full"


@dataclasses.dataclass(frozen=True)
class ratio(Rule):  # noqa: N801
  """Keep a fraction ``keep`` in (0, 1] of the leaf's parameters, at rank >= ``min_rank``
  (capped at the leaf's full rank)."""

  keep: float
  min_rank: int = 8

  def __post_init__(self) -> None:
    if not 0.0 < float(self.keep) <= 1.0:
      raise ValueError(f"ratio(keep) is the fraction of parameters kept, in (0, 1]; got {self.keep}")
    if isinstance(self.min_rank, bool) or not isinstance(self.min_rank, (int, np.integer)) \
        or self.min_rank < 1:
      raise ValueError(f"min_rank must be an int >= 1, got {self.min_rank!r}")

  def plain(self, layout: Layout) -> int:
    """The rank the fraction alone gives (before the ``min_rank`` floor)."""
    m, n = layout.matrix_shape
    return max(1, min(math.floor(self.keep * m * n / (m + n)), layout.max_rank))

  def resolve(self, layout: Layout, s: np.ndarray | None) -> int:
    return max(self.plain(layout), min(int(self.min_rank), layout.max_rank))

  def describe(self) -> str:
    return f"{self.keep:.0%} of params"


@dataclasses.dataclass(frozen=True)
class energy(Rule):  # noqa: N801
  """Smallest rank whose squared singular values reach fraction ``threshold``."""

  threshold: float
  needs_spectrum = True

  def __post_init__(self) -> None:
    if not 0.0 < float(self.threshold) <= 1.0:
      raise ValueError(f"energy threshold must be in (0, 1], got {self.threshold}")

  def resolve(self, layout: Layout, s: np.ndarray | None) -> int:
    s2 = np.asarray(s, np.float64) ** 2
    s2 = s2.reshape(-1, s2.shape[-1])
    total = s2.sum(-1, keepdims=True)
    frac = np.where(total > 0, np.cumsum(s2, -1) / np.where(total > 0, total, 1.0), 1.0)
    # tolerance so that energy(1.0) does not fail on rounding of the last term
    need = (frac < self.threshold - 1e-9).sum(-1) + 1
    return int(min(max(1, need.max()), s2.shape[-1]))

  def mask(self, layout: Layout, s: jax.Array, total: jax.Array | None = None) -> jax.Array:
    """``total``: the full squared Frobenius norm, when ``s`` holds only the top values
    (a randomized SVD); by default ``sum(s^2)``."""
    s2 = jnp.square(s.astype(jnp.float32))
    total = s2.sum(-1, keepdims=True) if total is None else total[..., None]
    before = jnp.cumsum(s2, -1) - s2  # energy of the components ahead of each one
    return (before < (self.threshold - 1e-9) * total) | (jnp.arange(s.shape[-1]) == 0)

  def describe(self) -> str:
    return f"{self.threshold:.0%} energy"


@dataclasses.dataclass(frozen=True)
class value(Rule):  # noqa: N801
  """Keep every singular value strictly above ``threshold`` (at least one)."""

  threshold: float
  needs_spectrum = True

  def __post_init__(self) -> None:
    if not float(self.threshold) >= 0.0:
      raise ValueError(f"value threshold must be >= 0, got {self.threshold}")

  def resolve(self, layout: Layout, s: np.ndarray | None) -> int:
    s = np.asarray(s).reshape(-1, np.shape(s)[-1])
    return int(max(1, (s > self.threshold).sum(-1).max()))

  def mask(self, layout: Layout, s: jax.Array, total: jax.Array | None = None) -> jax.Array:
    return (s > self.threshold) | (jnp.arange(s.shape[-1]) == 0)

  def describe(self) -> str:
    return f"s > {self.threshold:g}"


@dataclasses.dataclass(frozen=True)
class round_up(Rule):  # noqa: N801
  """Round ``rule``'s rank up to a multiple of ``multiple``, capped at full rank."""

  rule: Rule
  multiple: int

  def __post_init__(self) -> None:
    if self.multiple < 1:
      raise ValueError(f"multiple must be >= 1, got {self.multiple}")
    if getattr(self.rule, "is_global", False):
      raise TypeError("round a budget with budget(..., multiple=k), not round_up")
    object.__setattr__(self, "rule", as_rule(self.rule))

  @property
  def needs_spectrum(self) -> bool:
    return self.rule.needs_spectrum

  def resolve(self, layout: Layout, s: np.ndarray | None) -> int:
    r = self.rule.resolve(layout, s)
    return min(-(-r // self.multiple) * self.multiple, layout.max_rank)

  def mask(self, layout: Layout, s: jax.Array, total: jax.Array | None = None) -> jax.Array:
    r = self.rule.mask(layout, s, total).sum(-1, keepdims=True)
    r = -(-r // self.multiple) * self.multiple
    return jnp.arange(s.shape[-1]) < r

  def describe(self) -> str:
    return f"{self.rule.describe()}, x{self.multiple}"


@dataclasses.dataclass(frozen=True)
class budget(Rule):  # noqa: N801
  """One parameter budget shared by every leaf that uses this rule.

  Give either ``fraction`` (of those leaves' dense parameter count) or ``params``
  (an absolute count). Every leaf starts at rank ``min_rank`` (default 8, as
  :class:`ratio`; capped at full rank, rounded up to ``multiple``); then components are
  added in chunks of ``multiple`` in order of marginal energy per parameter,
  ``sum(s_j^2) / (multiple * (m + n))`` (per-leaf normalized energy
  ``s_j^2 / ||W||_F^2`` when ``normalize=True``, which makes layers of different
  scale comparable), while the total stays within the budget. Because each leaf's
  spectrum is non-increasing, this greedy is the optimal allocation of total kept
  energy up to one chunk per leaf.

  A leaf never gets a rank past its break-even ``floor(m n / (m + n))`` (beyond it the
  factors are larger than the kernel); a leaf whose rank's factors hold at least its
  ``m n`` parameters (its floor alone past break-even, or a square kernel at break-even,
  where ``r (m + n) = m n``) stays dense in :func:`jlr.plan` -- the exact kernel for the
  same parameters -- and is charged its ``m n``.

  ``group(path) -> key`` splits the budget: each group of leaves (e.g. every layer's
  query projection) gets the same fraction of its own dense parameters, allocated
  inside the group. Spectra of one kind of matrix are comparable; across kinds (a value
  projection, an FFN down-projection) their energies are in different units, and a
  single greedy can starve a whole kind (SVD-LLM V2, Wang et al. 2025, allocates per
  type of matrix for this reason).

  ``sensitivity={path: alpha}`` scores component ``j`` of leaf ``l`` by
  ``alpha_l s_j^2 / sum_i s_i^2 / (m + n)``: a first-order model of an end-to-end
  distortion ``D ~ sum_l alpha_l e_l(r_l)``, where ``e_l`` is leaf ``l``'s relative
  (data-aware, with ``stats=``) truncation error and ``alpha_l = D_l / e_l`` is measured
  by truncating that leaf alone (``D_l``: the model's output distortion, e.g. an
  embedding's ``1 - cos`` or an LM's extra NLL).
  """

  fraction: float | None = None
  params: int | None = None
  multiple: int = 1
  normalize: bool = False
  sensitivity: Mapping[str, float] | Iterable[tuple[str, float]] | None = None
  min_rank: int = 8
  group: Callable[[str], Any] | None = None
  needs_spectrum = True
  is_global = True

  def __post_init__(self) -> None:
    if self.sensitivity is not None:
      items = self.sensitivity.items() if hasattr(self.sensitivity, "items") else self.sensitivity
      items = tuple(sorted((str(p), float(a)) for p, a in items))
      if any(not (a >= 0 and np.isfinite(a)) for _, a in items):
        raise ValueError("sensitivity weights must be finite and >= 0")
      object.__setattr__(self, "sensitivity", items)
    if (self.fraction is None) == (self.params is None):
      raise ValueError("budget needs exactly one of fraction= or params=")
    if self.fraction is not None and not 0.0 < self.fraction <= 1.0:
      raise ValueError(f"budget fraction is the share of parameters kept, in (0, 1]; got {self.fraction}")
    if self.params is not None and self.params <= 0:
      raise ValueError(f"budget params must be positive, got {self.params}")
    if isinstance(self.min_rank, bool) or not isinstance(self.min_rank, (int, np.integer)) \
        or self.min_rank < 1:
      raise ValueError(f"min_rank must be an int >= 1, got {self.min_rank!r}")
    if self.multiple < 1:
      raise ValueError(f"multiple must be >= 1, got {self.multiple}")

  def mask(self, layout: Layout, s: jax.Array, total: jax.Array | None = None) -> jax.Array:
    raise ValueError("a global budget needs every leaf's spectrum at once on the host; "
                     "it cannot be resolved inside a jitted step (use energy, value or fixed)")

  def describe(self) -> str:
    what = f"{self.fraction:.0%}" if self.fraction is not None else f"{self.params:,} params"
    return f"budget {what}"

  def allocate(self, items: Sequence[tuple[str, Layout, np.ndarray]]) -> list[int]:
    """Ranks for ``items = [(path, layout, s)]``; ``s`` is ``(batch..., k)``."""
    k = self.multiple
    alpha = dict(self.sensitivity) if self.sensitivity is not None else None
    sizes, costs, gains, floors, tops = [], [], [], [], []
    for path, layout, s in items:
      s2 = np.asarray(s, np.float64) ** 2
      s2 = s2.reshape(-1, s2.shape[-1])
      count = s2.shape[0]
      if self.normalize or alpha is not None:
        s2 = s2 / np.maximum(s2.sum(-1, keepdims=True), 1e-300)
      if alpha is not None:
        if path not in alpha:
          raise ValueError(f"{path}: no sensitivity weight given to ranks.budget(sensitivity=)")
        s2 = s2 * alpha[path]
      m, n = layout.matrix_shape
      g = s2.sum(0)
      floor = min(-(-max(k, int(self.min_rank)) // k) * k, len(g))
      even = (m * n) // (m + n)  # break-even rank
      sizes.append(count * layout.size)
      costs.append(count * (m + n))
      gains.append(g)
      floors.append(floor)
      tops.append(max(floor, min(even, len(g))))
    keys = [None] * len(items) if self.group is None else [self.group(p) for p, _, _ in items]
    if self.params is not None:
      whole = float(sum(sizes))
      share = lambda members: self.params * sum(sizes[i] for i in members) / whole  # noqa: E731
    else:
      share = lambda members: self.fraction * sum(sizes[i] for i in members)  # noqa: E731
    ranks = list(floors)
    for key in dict.fromkeys(keys):
      members = [i for i, x in enumerate(keys) if x == key]
      total = share(members)
      spent = 0
      for i in members:  # a floor past break-even: the leaf stays dense, at its size
        spent += sizes[i] if floors[i] * costs[i] >= sizes[i] else floors[i] * costs[i]
      if spent > total + 1e-9:  # as ratio(): the floor wins over the nominal size
        where = "" if key is None else f" (group {key!r})"
        warnings.warn(
            f"ranks.budget: the floor of rank {max(k, self.min_rank)} in each of "
            f"{len(members)} leaves{where} costs {spent:,} params, over the budget of "
            f"{int(total):,}; every leaf keeps its floor (lower min_rank= to go below)",
            stacklevel=4)
      chunks = []  # (score, leaf, chunk start, chunk stop)
      for i in members:
        for start in range(floors[i], tops[i], k):
          stop = min(start + k, tops[i])
          chunks.append((gains[i][start:stop].sum() / ((stop - start) * costs[i]), i, start, stop))
      chunks.sort(key=lambda c: (-c[0], c[1], c[2]))
      closed = set()
      for _, i, start, stop in chunks:
        if i in closed or ranks[i] != start:
          continue
        extra = (stop - start) * costs[i]
        if spent + extra > total:
          closed.add(i)
          continue
        ranks[i], spent = stop, spent + extra
    return ranks


def as_rule(rank: int | Rule) -> Rule:
  """Coerce an int to :func:`fixed`; pass rules through; refuse ambiguous floats."""
  if isinstance(rank, Rule):
    return rank
  if isinstance(rank, bool):
    raise TypeError(f"rank must be an int or a jlr.ranks rule, got {rank!r}")
  if isinstance(rank, (int, np.integer)):
    return fixed(int(rank))
  if isinstance(rank, float):
    raise TypeError(
        f"rank={rank} is ambiguous: use jlr.ranks.ratio({rank}) (fraction of parameters "
        f"kept) or jlr.ranks.energy({rank}) (fraction of spectral energy kept)")
  raise TypeError(f"rank must be an int or a jlr.ranks rule, got {type(rank).__name__}: {rank!r}")


def parse(text: str) -> Rule:
  """``"ratio:0.25"``, ``"energy:0.95"``, ``"fixed:64"``, ``"value:0.05"``, ``"budget:0.4"``."""
  kind, _, arg = text.partition(":")
  makers = {"ratio": lambda a: ratio(float(a)), "energy": lambda a: energy(float(a)),
            "fixed": lambda a: fixed(int(a)), "value": lambda a: value(float(a)),
            "budget": lambda a: budget(float(a))}
  if kind not in makers or not arg:
    raise ValueError(f"cannot parse rank rule {text!r}; expected one of "
                     "ratio:X, energy:X, fixed:N, value:T, budget:X")
  return makers[kind](arg)
