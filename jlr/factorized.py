"""Run any JAX function on parameter trees that hold :class:`jlr.LowRank` leaves.

``jlr.factorized(f)(*args, **kwargs)`` is ``f(*args, **kwargs)`` with every ``LowRank``
leaf of the arguments computed through its factors -- a function transformation at the
primitive level, in the manner of ``jax.experimental.sparse.sparsify`` for ``BCOO``:

1. ``f`` is traced to a jaxpr with each ``LowRank`` replaced by an abstract dense kernel
   of its shape and dtype (nothing is computed, ``u @ v`` is never formed);
2. the jaxpr is evaluated with each such kernel held as a *factored tensor*
   ``T = transpose(a (x)_r b)`` -- ``a: (*batch, *A, r)``, ``b: (*batch, r, *B)`` -- and
   every primitive that meets one is rewritten:

   * ``dot_general`` (``x @ W``, ``W^T @ x``, einsums, vmapped/batched kernels): two thin
     contractions, ``x . a`` then ``. b`` (or ``x . b`` then ``. a``, whichever costs
     fewer FLOPs); ``a . b`` is never formed;
   * ``conv_general_dilated`` (1-D/2-D/3-D, strides, padding, input and kernel dilation,
     any dimension numbers, so also ``ConvTranspose``): a conv over the axes held by the
     input-channel factor to ``r`` channels, then a conv over the rest (a plain channel
     contraction for the channel-wise layout; Jaderberg et al. 2014 / TRP's
     spatial-wise layout otherwise);
   * ``gather`` along the rows (embedding lookups): gather rows of one factor,
     ``u[ids]``, and stay factored until the next op (``u[ids] @ v``);
   * layout ops (``transpose``, ``convert_element_type``, size-1 ``reshape``/``squeeze``/
     ``broadcast_in_dim``, group-preserving ``reshape``, ``rev``), scalar ``mul``/``div``/
     ``neg`` and sharding constraints act on the factors;
   * ``jit``/``pjit`` calls are inlined; ``checkpoint``/``remat`` and ``scan`` (``nn.scan``,
     ``nnx.scan``, ``lax.scan``: stacked kernels sliced per step) are re-emitted with the
     factors as their operands.

   Any other primitive that meets a factored kernel (a grouped conv, a ``custom_jvp``
   function of the kernel, an elementwise op) gets the dense kernel, with a
   :class:`DensifiedWarning` naming the leaf path and the primitive: correct, not faster.

Because it is an interpreter over ordinary ``jax.numpy`` calls, the result composes with
``jax.jit``, ``jax.grad`` (gradients reach ``u`` and ``v``), ``jax.vmap`` and sharding, and
covers Flax linen (``nn.scan``, ``nn.remat``, ``nn.vmap``, ``nn.Einsum``, custom modules
such as Hugging Face's ``FlaxConv1D``), NNX (through ``nnx.split``/``nnx.merge``) and
plain JAX alike.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
import string
import warnings
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jcore

from jlr import rules
from jlr.lowrank import LowRank, is_lowrank
from jlr.select import is_array
from jlr.paths import path_str


class DensifiedWarning(UserWarning):
  """A factored kernel met a primitive with no factorized rule and was made dense."""


class DensifiedError(ValueError):
  """Raised instead of a :class:`DensifiedWarning` under ``factorized(fn, strict=True)``."""


_STRICT = contextvars.ContextVar("jlr_factorized_strict", default=False)
_RECORD = contextvars.ContextVar("jlr_factorized_record", default=None)


class Recorder:
  """Collects the real input of every contraction / conv that meets a recorded kernel,
  as the ``(..., tokens, m)`` matrix of rows in the kernel's row order (the rows of its
  layout's matrix), while :func:`factorized` evaluates a function (calibration: see
  :func:`jlr.stats.activations`). ``mode="gram"`` keeps ``(sum_i w_i x_i x_i^T, sum_i
  w_i)`` per leaf (summed over the leaf's uses); ``mode="abs"`` keeps ``(sum_i w_i |x_i|,
  sum_i w_i)`` (ASVD's per-channel mean magnitude); ``mode="rows"`` keeps ``(rows,
  weights)`` (concatenated over uses). ``weights(path, shape)`` gives per-row weights
  for an input of ``path`` whose non-contracted axes have ``shape`` (a padding mask), or
  None. A stacked kernel (``scan`` over layers, ``vmap``-ed layers) gets one record per
  layer, with the layer axes leading.

  ``records[path]`` holds the result; ``missing[path]`` why a recorded leaf met an input
  that could not be recorded (contracted over its columns, a conv whose rows are not its
  window and input channels, inside control flow without a rule)."""

  def __init__(self, paths, mode: str = "gram", weights: Callable | None = None):
    self.paths = frozenset(paths)
    self.mode = mode
    self.weights = weights
    self.records: dict[str, tuple] = {}
    self.missing: dict[str, str] = {}

  def child(self) -> "Recorder":
    return Recorder(self.paths, self.mode, self.weights)

  def add(self, path: str, rows, stacked: int = 0) -> None:
    """One use of ``path``'s kernel: ``rows`` is ``(*layers, *lead, m)``, ``lead`` the
    input's non-contracted axes, ``layers`` its first ``stacked`` axes (a ``vmap``-ed
    kernel contracted per layer: one record per layer)."""
    lead = rows.shape[stacked:-1]
    w = self.weights(path, lead) if self.weights is not None else None
    w = jnp.ones(lead, jnp.float32) if w is None else jnp.asarray(w, jnp.float32)
    w = jnp.broadcast_to(w, rows.shape[:-1]).reshape(rows.shape[:stacked] + (-1,))
    x = rows.astype(jnp.float32).reshape(rows.shape[:stacked] + (-1, rows.shape[-1]))
    if self.mode == "gram":
      self.merge(path, (jnp.einsum("...ti,...tj->...ij", x * w[..., None], x), jnp.sum(w, -1)))
    elif self.mode == "abs":
      self.merge(path, (jnp.einsum("...ti,...t->...i", jnp.abs(x), w), jnp.sum(w, -1)))
    else:
      self.merge(path, (x, w))

  def merge(self, path: str, value) -> None:
    """Add a record of ``path``: Grams and counts are summed, rows concatenated."""
    old = self.records.get(path)
    if old is None:
      self.records[path] = value
    elif self.mode in ("gram", "abs"):
      self.records[path] = (old[0] + value[0], old[1] + value[1])
    else:
      self.records[path] = (jnp.concatenate([old[0], value[0]], -2),
                            jnp.concatenate([old[1], value[1]], -1))

  def absorb(self, inner: "Recorder", values: dict) -> None:
    """Merge the records ``values`` made by ``inner`` inside a transform (a scan body's,
    stacked along a new leading layer axis) and what ``inner`` found missing."""
    self.missing.update(inner.missing)
    for path, value in values.items():
      self.merge(path, value)

  def fold(self, value):
    """A record stacked along a leading axis that is not a layer axis, as one record."""
    if self.mode in ("gram", "abs"):
      return value[0].sum(0), value[1].sum(0)
    rows, w = value
    return (jnp.moveaxis(rows, 0, -3).reshape(rows.shape[1:-2] + (-1, rows.shape[-1])),
            jnp.moveaxis(w, 0, -2).reshape(w.shape[1:-1] + (-1,)))

  def miss(self, path: str, why: str) -> None:
    self.missing.setdefault(path, why)


@contextlib.contextmanager
def recording(recorder: Recorder):
  """``with recording(rec): factorized(fn)(...)``: ``rec`` sees every contraction / conv
  input of its kernels while :func:`factorized` evaluates (also under ``jax.jit``)."""
  token = _RECORD.set(recorder)
  try:
    yield recorder
  finally:
    _RECORD.reset(token)


def _recording(f) -> "Recorder | None":
  rec = _RECORD.get()
  return rec if rec is not None and f.kernel and f.path in rec.paths else None


@dataclasses.dataclass(frozen=True)
class Factored:
  """A tensor ``T = transpose(C, axes)`` with ``C[z, i, j] = sum_r a[z, i, r] b[z, r, j]``.

  ``a``: ``(*batch, *A, r)``; ``b``: ``(*batch, r, *B)``; ``C`` has canonical axes
  ``(*batch, *A, *B)``; ``axes[k]`` is the canonical axis of logical axis ``k``.
  ``path`` names the params leaf it came from; ``source`` is that ``LowRank`` while the
  tensor is still exactly it (so a function that returns its parameters gets them back).
  ``kernel`` is False once rows were looked up (``u[ids]`` is an activation, and
  finishing it as ``u[ids] @ v`` is the intended computation, not a fallback).
  ``keep`` (``(*batch, r)`` or None): weights of the components, ``T = a diag(keep) b``
  -- ordered dropout's prefix mask (``jlr.factorized(fn, ranks=...)``), applied by the
  contraction rules to the ``r``-wide intermediate or the smaller factor, whichever is
  smaller, and folded into ``a`` before any other primitive.
  """

  a: Any
  b: Any
  nb: int
  na: int
  axes: tuple[int, ...]
  path: str
  source: Any = None
  kernel: bool = True
  keep: Any = None

  @property
  def ndim(self) -> int:
    return len(self.axes)

  @property
  def rank(self) -> int:
    return self.a.shape[-1]

  @property
  def canon_shape(self) -> tuple[int, ...]:
    return tuple(self.a.shape[:-1]) + tuple(self.b.shape[self.nb + 1:])

  @property
  def shape(self) -> tuple[int, ...]:
    cs = self.canon_shape
    return tuple(cs[c] for c in self.axes)

  @property
  def dtype(self):
    return self.a.dtype

  def group(self, k: int) -> str:
    """``"batch"``, ``"A"`` or ``"B"``: which part of the product holds logical axis k."""
    c = self.axes[k]
    return "batch" if c < self.nb else ("A" if c < self.nb + self.na else "B")

  def replace(self, **kw) -> "Factored":
    kw.setdefault("source", None)
    return dataclasses.replace(self, **kw)

  def folded(self, into: str = "a") -> "Factored":
    """The same tensor with ``keep`` multiplied into factor ``into`` (``keep`` None)."""
    if self.keep is None:
      return self
    bs, r = self.a.shape[:self.nb], self.rank
    if into == "a":
      k = self.keep.reshape(bs + (1,) * self.na + (r,))
      return self.replace(a=self.a * k.astype(self.a.dtype), keep=None)
    k = self.keep.reshape(bs + (r,) + (1,) * (self.b.ndim - self.nb - 1))
    return self.replace(b=self.b * k.astype(self.b.dtype), keep=None)

  def masked_where_cheapest(self, activation_size: int) -> "Factored":
    """Keep the mask for the ``r``-wide activation (``activation_size`` elements) when
    that is the cheapest place to apply it, else fold it into the smaller factor."""
    if self.keep is None or activation_size <= min(self.a.size, self.b.size):
      return self
    return self.folded("a" if self.a.size <= self.b.size else "b")

  def dense(self):
    if self.keep is not None:
      return self.folded().dense()
    nb, bs = self.nb, self.a.shape[:self.nb]
    a_sh, b_sh, r = self.a.shape[nb:-1], self.b.shape[nb + 1:], self.rank
    c = jnp.matmul(self.a.reshape(bs + (math.prod(a_sh), r)),
                   self.b.reshape(bs + (r, math.prod(b_sh))))
    return jnp.transpose(c.reshape(bs + a_sh + b_sh), self.axes)


def from_lowrank(f: LowRank, path: str = "") -> Factored:
  """The :class:`Factored` view of a ``LowRank`` leaf, logical axes = its kernel's axes."""
  lay, bs = f.layout, f.batch_shape
  nb, rows, cols = len(bs), lay.row_axes, lay.col_axes
  a = f.u.reshape(bs + tuple(lay.shape[i] for i in rows) + (f.rank,))
  b = f.v.reshape(bs + (f.rank,) + tuple(lay.shape[i] for i in cols))
  order = rows + cols
  axes = tuple(range(nb)) + tuple(nb + order.index(j) for j in range(len(lay.shape)))
  return Factored(a, b, nb, len(rows), axes, path, source=f)


def _dense(x):
  return x.dense() if isinstance(x, Factored) else x


def _densify_warning(path: str, prim: str, why: str = "") -> None:
  rec = _RECORD.get()
  if rec is not None and path in rec.paths:
    rec.miss(path, f"used by `{prim}`{why}, which has no factorized rule")
  where = f"{path or 'a LowRank leaf'}: no factorized rule for `{prim}`{why}"
  if _STRICT.get():
    raise DensifiedError(
        f"{where}; strict=True refuses to form its dense kernel. Leave this leaf dense "
        "(factorize(select=...)) or run without strict=True to densify it with a warning.")
  warnings.warn(
      f"{where}; its dense kernel is formed there (the result is exact, not faster). Leave "
      "this leaf dense (factorize(select=...)) if that is not intended.", DensifiedWarning,
      stacklevel=4)


# ----------------------------------------------------------------------------- evaluation


def _bind(eqn, ins):
  with eqn.ctx.manager:
    return eqn.primitive.bind(*ins, **eqn.primitive.get_bind_params(eqn.params))


def _fallback(eqn, ins, why: str = ""):
  for x in ins:
    if isinstance(x, Factored) and x.kernel:
      _densify_warning(x.path, eqn.primitive.name, why)
  return _bind(eqn, [_dense(x) for x in ins])


def eval_jaxpr(jaxpr, consts, args):
  """Evaluate ``jaxpr`` where some values are :class:`Factored`."""
  env: dict = {}

  def read(v):
    return v.val if isinstance(v, jcore.Literal) else env[v]

  def write(v, x):
    if not isinstance(v, jcore.DropVar):
      env[v] = x

  for v, x in zip(jaxpr.constvars, consts):
    write(v, x)
  for v, x in zip(jaxpr.invars, args):
    write(v, x)
  for eqn in jaxpr.eqns:
    ins = [read(v) for v in eqn.invars]
    rule = rules.get(eqn.primitive)
    if rule is None or not rule.rows_stay_factored:  # looked-up rows end here: u[ids] @ v
      ins = [x.dense() if isinstance(x, Factored) and not x.kernel else x for x in ins]
    if rule is None or not rule.carries_mask:
      ins = [x.folded() if isinstance(x, Factored) else x for x in ins]
    if any(isinstance(x, Factored) for x in ins):
      outs = rule.run(eqn, ins) if rule is not None and rule.run is not None else None
      if outs is None:
        outs = _fallback(eqn, ins)
    else:
      outs = _bind(eqn, ins)
    if not eqn.primitive.multiple_results:
      outs = [outs]
    for v, x in zip(eqn.outvars, outs):
      write(v, x)
  return [read(v) for v in jaxpr.outvars]


def _out_aval(eqn):
  return eqn.outvars[0].aval


def _cast(y, eqn):
  dt = _out_aval(eqn).dtype
  return y if y.dtype == dt else y.astype(dt)


# ----------------------------------------------------------------------------- run rules
# (the interpreter halves of the built-in rules, registered in jlr.primitives)


def _transpose(x: Factored, perm) -> Factored:
  return x.replace(axes=tuple(x.axes[p] for p in perm))


def _reshape_to(x: Factored, new_shape) -> Factored | None:
  """Reshape that keeps batch / A / B parts apart; ``None`` when it mixes them."""
  new_shape = tuple(int(d) for d in new_shape)
  if x.axes != tuple(range(x.ndim)):
    # logical order is not canonical: only size-1 axes may come and go
    if [d for d in x.shape if d != 1] != [d for d in new_shape if d != 1]:
      return None
    y = x
    for k in sorted((k for k in range(x.ndim) if x.shape[k] == 1), key=lambda k: -x.axes[k]):
      y = _drop_axis(y, k)
    for j, d in enumerate(new_shape):
      if d == 1:
        y = _insert_unit(y, j)
    return y
  cs = x.canon_shape
  bounds = [math.prod(cs[:x.nb]), math.prod(cs[:x.nb + x.na])]
  prefix, cuts, total = 1, [], math.prod(new_shape)
  for d in new_shape:
    cuts.append(prefix)
    prefix *= d
  cuts.append(prefix)
  if prefix != total:
    return None
  # new axes [0, i) form batch, [i, j) form A, [j, n) form B
  try:
    i = next(k for k, c in enumerate(cuts) if c == bounds[0])
    j = next(k for k in range(len(cuts) - 1, -1, -1) if cuts[k] == bounds[1])
  except StopIteration:
    return None
  if not i <= j:
    return None
  nbs, nas, nbs_b = new_shape[:i], new_shape[i:j], new_shape[j:]
  if math.prod(nbs) != bounds[0] or math.prod(nas) * bounds[0] != bounds[1]:
    return None
  a = x.a.reshape(nbs + nas + (x.rank,))
  b = x.b.reshape(nbs + (x.rank,) + nbs_b)
  return Factored(a, b, len(nbs), len(nas), tuple(range(len(new_shape))), x.path, kernel=x.kernel)


def _drop_axis(x: Factored, k: int) -> Factored:
  """Remove size-1 logical axis ``k``."""
  c = x.axes[k]
  g = x.group(k)
  if g == "batch":
    a, b = jnp.squeeze(x.a, c), jnp.squeeze(x.b, c)
    nb, na = x.nb - 1, x.na
  elif g == "A":
    a, b, nb, na = jnp.squeeze(x.a, c), x.b, x.nb, x.na - 1
  else:
    a, b, nb, na = x.a, jnp.squeeze(x.b, c - x.na + 1), x.nb, x.na
  axes = tuple(ax - (ax > c) for i, ax in enumerate(x.axes) if i != k)
  return Factored(a, b, nb, na, axes, x.path, kernel=x.kernel)


def _insert_unit(x: Factored, j: int) -> Factored:
  """Insert a size-1 logical axis at position ``j`` (held by the ``B`` factor, last)."""
  c = len(x.axes)  # new canonical position: the end of B
  b = jnp.expand_dims(x.b, x.b.ndim)
  axes = x.axes[:j] + (c,) + x.axes[j:]
  return Factored(x.a, b, x.nb, x.na, axes, x.path, kernel=x.kernel)


def run_convert(eqn, ins):
  (x,) = ins
  dt = eqn.params["new_dtype"]
  return x.replace(a=x.a.astype(dt), b=x.b.astype(dt))


def run_identity(eqn, ins):
  return ins[0] if len(ins) == 1 else None


def run_transpose(eqn, ins):
  return _transpose(ins[0], eqn.params["permutation"])


def run_reshape(eqn, ins):
  if eqn.params.get("dimensions") is not None:
    return None
  return _reshape_to(ins[0], _out_aval(eqn).shape)


def run_squeeze(eqn, ins):
  return _reshape_to(ins[0], _out_aval(eqn).shape)


def run_broadcast_in_dim(eqn, ins):
  x = ins[0]
  shape, dims = eqn.params["shape"], eqn.params["broadcast_dimensions"]
  if any(shape[d] != x.shape[i] for i, d in enumerate(dims)):
    return None
  if any(shape[j] != 1 for j in range(len(shape)) if j not in dims):
    return None
  if list(dims) != sorted(dims):
    return None
  return _reshape_to(x, shape)


def run_rev(eqn, ins):
  x = ins[0]
  y = x
  for k in eqn.params["dimensions"]:
    c, g = x.axes[k], x.group(k)
    if g == "batch":
      y = y.replace(a=jnp.flip(y.a, c), b=jnp.flip(y.b, c))
    elif g == "A":
      y = y.replace(a=jnp.flip(y.a, c))
    else:
      y = y.replace(b=jnp.flip(y.b, c - x.na + 1))
  return y


def run_scale(eqn, ins):
  """``-T``, ``T * s``, ``s * T``, ``T / s`` for a scalar ``s``: scale the ``a`` factor."""
  name = eqn.primitive.name
  if name == "neg":
    return ins[0].replace(a=-ins[0].a)
  x, s = ins
  if name == "mul" and not isinstance(x, Factored):
    x, s = s, x
  if isinstance(s, Factored) or not isinstance(x, Factored) or jnp.ndim(s) != 0:
    return None
  a = x.a * s if name == "mul" else x.a / s
  return x.replace(a=a.astype(x.a.dtype))


# ----------------------------------------------------------------------------- dot_general


def _einsum(spec, x, y, eqn):
  return jnp.einsum(spec, x, y, precision=eqn.params.get("precision"),
                    preferred_element_type=eqn.params.get("preferred_element_type"))


def run_dot_general(eqn, ins):
  lhs, rhs = ins
  if isinstance(lhs, Factored) and isinstance(rhs, Factored):
    _densify_warning(lhs.path, "dot_general", " with two factored operands")
    lhs = lhs.dense()
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  ft_rhs = isinstance(rhs, Factored)
  x, f = (lhs, rhs) if ft_rhs else (rhs, lhs)
  xc, fc, xb, fb = (lc, rc, lb, rb) if ft_rhs else (rc, lc, rb, lb)
  letters = iter(string.ascii_letters)
  x_lab = [next(letters) for _ in range(jnp.ndim(x))]
  f_lab: list[str | None] = [None] * f.ndim
  for i, j in list(zip(xc, fc)) + list(zip(xb, fb)):
    f_lab[j] = x_lab[i]
  f_lab = [lab if lab is not None else next(letters) for lab in f_lab]
  r = next(letters)
  canon = [""] * f.ndim
  for k, c in enumerate(f.axes):
    canon[c] = f_lab[k]
  a_lab = canon[:f.nb + f.na] + [r]
  b_lab = canon[:f.nb] + [r] + canon[f.nb + f.na:]
  x_free = [x_lab[i] for i in range(len(x_lab)) if i not in xc and i not in xb]
  f_free = [f_lab[j] for j in range(f.ndim) if j not in fc and j not in fb]
  out = [x_lab[i] for i in xb] + (x_free + f_free if ft_rhs else f_free + x_free)
  size = dict(zip(x_lab, jnp.shape(x)))
  size.update(zip(f_lab, f.shape))
  size[r] = f.rank
  rec = _recording(f)
  if rec is not None:
    _record_dot(rec, x, xc, xb, f, fc, fb)

  def plan(first_lab, second_lab):
    keep = set(second_lab) | set(out)
    t_lab = [lab for lab in dict.fromkeys(x_lab + first_lab) if lab in keep]
    cost = (math.prod(size[c] for c in set(x_lab + first_lab))
            + math.prod(size[c] for c in set(t_lab + second_lab)))
    return cost, t_lab

  (ca, ta), (cb, tb) = plan(a_lab, b_lab), plan(b_lab, a_lab)
  f = f.masked_where_cheapest(math.prod(size[c] for c in (ta if ca <= cb else tb)))
  j = "".join
  if ca <= cb:
    t = _einsum(f"{j(x_lab)},{j(a_lab)}->{j(ta)}", x, f.a, eqn)
    t = _masked(t, ta, f, canon[:f.nb] + [r])
    y = _einsum(f"{j(ta)},{j(b_lab)}->{j(out)}", t, f.b, eqn)
  else:
    t = _einsum(f"{j(x_lab)},{j(b_lab)}->{j(tb)}", x, f.b, eqn)
    t = _masked(t, tb, f, canon[:f.nb] + [r])
    y = _einsum(f"{j(tb)},{j(a_lab)}->{j(out)}", t, f.a, eqn)
  return _cast(y, eqn)


COLUMNS = "^T"
"""Suffix of a :class:`Recorder` key holding the inputs a kernel met on its column side
(``x @ W^T``: a tied LM head contracts its input with the embedding's feature axis),
recorded in the kernel's column order: the row statistics of ``W^T``."""


def _record_dot(rec: Recorder, x, xc, xb, f: Factored, fc, fb) -> None:
  """Record ``x``'s rows for ``f`` when ``x`` is contracted with exactly ``f``'s rows, or
  under ``f.path + COLUMNS`` when with exactly its columns."""
  contracted = {f.axes[j] for j in fc}
  rows_c = set(range(f.nb, f.nb + f.na))
  cols_c = set(range(f.nb + f.na, f.ndim))
  key = f.path if contracted == rows_c else f.path + COLUMNS if contracted == cols_c else None
  if key is None or {f.axes[j] for j in fb} != set(range(f.nb)):
    rec.miss(f.path, "an input contracted with axes that are neither the kernel's rows "
             "nor its columns")
    return
  by_c = sorted(zip(xc, fc), key=lambda p: f.axes[p[1]])  # kernel row (column) order
  by_b = sorted(zip(xb, fb), key=lambda p: f.axes[p[1]])  # stacked layers first
  free = [i for i in range(jnp.ndim(x)) if i not in xc and i not in xb]
  t = jnp.transpose(x, [i for i, _ in by_b] + free + [i for i, _ in by_c])
  nb = len(by_b)
  rec.add(key, t.reshape(t.shape[:nb + len(free)] + (-1,)), stacked=nb)


def _masked(t, t_lab, f: Factored, keep_lab):
  """``t`` (labels ``t_lab``, holding the rank label and ``f``'s batch labels) times
  ``f.keep`` (labels ``keep_lab``) broadcast along the other labels: O(|t|) work."""
  if f.keep is None:
    return t
  order = [lab for lab in t_lab if lab in keep_lab]
  k = jnp.transpose(f.keep, [keep_lab.index(lab) for lab in order])
  k = k.reshape([t.shape[i] if lab in keep_lab else 1 for i, lab in enumerate(t_lab)])
  return t * k.astype(t.dtype)


# ----------------------------------------------------------------------------- conv


def run_conv(eqn, ins):
  lhs, f = ins
  p = eqn.params
  if isinstance(lhs, Factored) or not isinstance(f, Factored):
    return None
  if p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
    _densify_warning(f.path, "conv_general_dilated",
                     f" with feature_group_count={p['feature_group_count']} "
                     f"(grouped/depthwise)")
    return _bind(eqn, [lhs, f.dense()])
  if f.nb:
    return None
  dn = p["dimension_numbers"]
  lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
  o_ax, i_ax, sp = rhs_spec[0], rhs_spec[1], tuple(rhs_spec[2:])
  rec = _recording(f)
  if rec is not None:
    _record_conv(rec, lhs, f, p)
  gi, go = f.group(i_ax), f.group(o_ax)
  if gi == go:
    return None
  r = f.rank
  out_shape = eqn.outvars[0].aval.shape  # the r-wide intermediate is about y with r channels
  f = f.masked_where_cheapest(math.prod(out_shape) // out_shape[out_spec[1]] * r)
  # first: the factor holding the input channels, as (its logical axes..., r)
  inv = {c: k for k, c in enumerate(f.axes)}
  a_axes = [inv[c] for c in range(f.na)]
  b_axes = [inv[c] for c in range(f.na, f.ndim)]
  if gi == "A":
    f1, f1_axes, f2, f2_axes = f.a, a_axes, jnp.moveaxis(f.b, 0, -1), b_axes
  else:
    f1, f1_axes, f2, f2_axes = jnp.moveaxis(f.b, 0, -1), b_axes, f.a, a_axes
  s1 = [k for k, ax in enumerate(sp) if ax in f1_axes]  # spatial dims done by conv 1

  def as_kernel(fac, fac_axes, r_axis):
    """``fac`` (fac_axes..., r) as a kernel in the original logical axis order, with the
    ``r`` axis standing for logical axis ``r_axis`` and size-1 axes elsewhere."""
    names = list(fac_axes) + [r_axis]
    k = fac
    for ax in range(f.ndim):
      if ax not in names:
        k = jnp.expand_dims(k, k.ndim)
        names.append(ax)
    return jnp.transpose(k, [names.index(ax) for ax in range(f.ndim)])

  def pick(vals, keep, other):
    return tuple(v if k in keep else other for k, v in enumerate(vals))

  s2 = [k for k in range(len(sp)) if k not in s1]
  nsp = len(sp)
  strides, pads = tuple(p["window_strides"]), tuple(tuple(q) for q in p["padding"])
  lhs_dil = tuple(p["lhs_dilation"] or (1,) * nsp)
  rhs_dil = tuple(p["rhs_dilation"] or (1,) * nsp)
  common = dict(dimension_numbers=dn, precision=p.get("precision"),
                preferred_element_type=p.get("preferred_element_type"))
  k1 = as_kernel(f1, f1_axes, o_ax)
  z = lax.conv_general_dilated(lhs, k1, pick(strides, s1, 1), pick(pads, s1, (0, 0)),
                               lhs_dilation=pick(lhs_dil, s1, 1),
                               rhs_dilation=pick(rhs_dil, s1, 1), **common)
  if f.keep is not None:  # the r channels of z: (r,) along the output-feature axis
    shape = [1] * z.ndim
    shape[out_spec[1]] = r
    z = z * f.keep.reshape(shape).astype(z.dtype)
  if not s2:  # channel-wise: the second factor (cout, r) is a channel contraction
    c = out_spec[1]
    y = jnp.moveaxis(jnp.tensordot(z, f2, axes=([c], [f2.ndim - 1]),
                                   precision=p.get("precision")), -1, c)
    return _cast(y, eqn)
  k2 = as_kernel(f2, f2_axes, i_ax)  # r input channels, the remaining spatial axes
  dn2 = lax.ConvDimensionNumbers(out_spec, rhs_spec, out_spec)
  y = lax.conv_general_dilated(z, k2, pick(strides, s2, 1), pick(pads, s2, (0, 0)),
                               lhs_dilation=pick(lhs_dil, s2, 1),
                               rhs_dilation=pick(rhs_dil, s2, 1),
                               dimension_numbers=dn2, precision=p.get("precision"),
                               preferred_element_type=p.get("preferred_element_type"))
  return _cast(y, eqn)


def _record_conv(rec: Recorder, lhs, f: Factored, p) -> None:
  """Record the im2col patches of ``lhs`` (rows in the kernel's row order) for a
  channel-wise kernel: rows = its window and input-channel axes."""
  dn = p["dimension_numbers"]
  o_ax, i_ax, sp = dn.rhs_spec[0], dn.rhs_spec[1], tuple(dn.rhs_spec[2:])
  if f.group(o_ax) != "B" or any(f.group(k) != "A" for k in (i_ax,) + sp):
    rec.miss(f.path, "a conv whose kernel rows are not its window and input channels")
    return
  window = tuple(f.shape[k] for k in sp)
  patches = lax.conv_general_dilated_patches(
      lhs, window, p["window_strides"], p["padding"], lhs_dilation=p["lhs_dilation"],
      rhs_dilation=p["rhs_dilation"], dimension_numbers=dn, precision=p.get("precision"))
  out = dn.out_spec
  patches = jnp.transpose(patches, (out[0],) + tuple(out[2:]) + (out[1],))
  lead = patches.shape[:-1]
  patches = patches.reshape(lead + (f.shape[i_ax],) + window)  # features in (cin, *window)
  order = sorted(range(1 + len(sp)), key=lambda k: f.axes[((i_ax,) + sp)[k]])  # row order
  patches = jnp.transpose(patches, tuple(range(len(lead))) + tuple(len(lead) + k for k in order))
  rec.add(f.path, patches.reshape(lead + (-1,)))


# ----------------------------------------------------------------------------- gather


def run_gather(eqn, ins):
  x, idx = ins
  if not isinstance(x, Factored) or isinstance(idx, Factored) or x.nb:
    return None
  p = eqn.params
  dn = p["dimension_numbers"]
  if dn.operand_batching_dims or dn.start_indices_batching_dims:
    return None
  # rows of the `a` factor are looked up (an embedding): indexed axes all in A, the
  # logical order canonical, B fully sliced and trailing in the output
  indexed = set(dn.start_index_map) | set(dn.collapsed_slice_dims)
  ky = list(range(x.na, x.ndim))
  if (x.axes != tuple(range(x.ndim)) or any(x.group(k) != "A" for k in indexed)
      or any(p["slice_sizes"][k] != x.shape[k] for k in ky)):
    return None
  kx, fx, fy = list(range(x.na)), x.a, x.b
  n_out = _out_aval(eqn).ndim
  offs = tuple(dn.offset_dims)
  if offs[len(offs) - len(ky):] != tuple(range(n_out - len(ky), n_out)):
    return None
  new_dn = lax.GatherDimensionNumbers(
      offset_dims=offs[:len(offs) - len(ky)] + (n_out - len(ky),),
      collapsed_slice_dims=dn.collapsed_slice_dims, start_index_map=dn.start_index_map,
      operand_batching_dims=(), start_indices_batching_dims=())
  g = lax.gather(fx, idx, new_dn, tuple(p["slice_sizes"][k] for k in kx) + (x.rank,),
                 indices_are_sorted=p["indices_are_sorted"],
                 unique_indices=p["unique_indices"], mode=p["mode"],
                 fill_value=p["fill_value"])
  na = g.ndim - 1
  return Factored(g, fy, 0, na, tuple(range(na + len(ky))), x.path, kernel=False)


# ----------------------------------------------------------------------------- control flow


def _pack(ins):
  """Flatten Factored values to (a, b) for a transform boundary; ``unpack`` rebuilds."""
  flat, meta = [], []
  for x in ins:
    if isinstance(x, Factored):
      flat += [x.a, x.b]
      meta.append(x)
    else:
      flat.append(x)
      meta.append(None)

  def unpack(vals, drop_batch: int = 0):
    out, it = [], iter(vals)
    for m in meta:
      if m is None:
        out.append(next(it))
      else:
        a, b = next(it), next(it)
        axes = m.axes
        if drop_batch:
          axes = tuple(c - 1 for c in axes[1:])
        out.append(Factored(a, b, m.nb - drop_batch, m.na, axes, m.path, kernel=m.kernel))
    return out

  return flat, unpack


def run_call(eqn, ins):
  closed = eqn.params.get("jaxpr") or eqn.params.get("call_jaxpr")
  if isinstance(closed, jcore.ClosedJaxpr):
    return eval_jaxpr(closed.jaxpr, closed.consts, ins)
  return eval_jaxpr(closed, (), ins)


def _recorded_inside(fn):
  """``fn`` evaluated with a child :class:`Recorder` (when recording): returns ``fn``'s
  outputs and the child's records, so a transform boundary (scan, remat) passes the
  records out as outputs instead of leaking tracers; ``inner[0]`` is the child."""
  rec, inner = _RECORD.get(), []

  def wrapped(*args):
    if rec is None:
      return fn(*args), {}
    child = rec.child()
    inner[:] = [child]
    token = _RECORD.set(child)
    try:
      out = fn(*args)
    finally:
      _RECORD.reset(token)
    return out, child.records

  return wrapped, rec, inner


def run_remat(eqn, ins):
  jaxpr = eqn.params["jaxpr"]
  flat, unpack = _pack(ins)

  def fun(*vals):
    return [_dense(o) for o in eval_jaxpr(jaxpr, (), unpack(vals))]

  fun, rec, inner = _recorded_inside(fun)
  outs, records = jax.checkpoint(fun, prevent_cse=eqn.params.get("prevent_cse", True),
                                 policy=eqn.params.get("policy"))(*flat)
  if rec is not None:
    rec.absorb(inner[0], records)
  return outs


def run_scan(eqn, ins):
  p = eqn.params
  nc, ncarry = p["num_consts"], p["num_carry"]
  consts, carry, xs = ins[:nc], ins[nc:nc + ncarry], ins[nc + ncarry:]
  carry = [_dense(c) for c in carry]
  # a stacked kernel is sliced along its logical axis 0: it must be its first batch axis
  xs_ok = []
  for x in xs:
    if isinstance(x, Factored) and not (x.nb and x.axes[0] == 0):
      _densify_warning(x.path, "scan", " over an axis that is not a stacked-layer axis")
      x = x.dense()
    xs_ok.append(x)
  closed = p["jaxpr"]
  flat_xs, unpack_xs = _pack(xs_ok)

  def step(c, x_slices):
    outs = eval_jaxpr(closed.jaxpr, closed.consts,
                      list(consts) + list(c) + unpack_xs(x_slices, drop_batch=1))
    return [_dense(o) for o in outs]

  step, rec, inner = _recorded_inside(step)

  def body(c, x_slices):
    outs, records = step(c, x_slices)
    return outs[:ncarry], (outs[ncarry:], records)  # records stack per layer

  c_out, (ys, records) = lax.scan(body, carry, flat_xs, length=p["length"],
                                  reverse=p["reverse"], unroll=p["unroll"])
  if rec is not None:  # a kernel sliced per step is a stack of layers: one record each;
    sliced = {x.path for x in xs_ok if isinstance(x, Factored)}  # others: sum the steps
    rec.absorb(inner[0], {path: v if path in sliced else rec.fold(v)
                          for path, v in records.items()})
  return list(c_out) + list(ys)


# ----------------------------------------------------------------------------- entry point


def factorized(fn: Callable, *, ranks: Mapping[str, Any] | None = None,
               strict: bool = False) -> Callable:
  """``fn`` transformed to accept :class:`jlr.LowRank` leaves anywhere in its arguments.

  ``factorized(fn)(*args, **kwargs)`` equals ``fn(*jlr.merge(args), **jlr.merge(kwargs))``
  up to floating-point rounding, computed without forming any ``u @ v`` wherever a
  factorized rule exists (see the module docstring). Array leaves of the arguments are
  traced; other leaves (Python bools, strings, ``None``) are static. Output leaves that
  are an input ``LowRank`` passed through unchanged come back as that ``LowRank``.

  ``ranks`` (ordered dropout, e.g. :func:`jlr.lod.sample_ranks`) maps leaf paths to a
  rank ``b`` (a Python int or a traced int32 scalar): that ``LowRank`` computes with
  its first ``b`` components only -- the values and gradients of ``factorized(fn)`` on
  factors masked by :func:`jlr.lod.with_ranks` -- with the mask applied where it is
  cheapest: the ``r``-wide intermediate ``x u`` (``O(batch r)`` work) when it is smaller
  than both factors, else the smaller factor (a memory pass over it per step). A key
  names a leaf by its path inside the argument (``params/Dense_0/kernel``) or by any
  ``/``-suffix of it (``Dense_0/kernel``, as ``sample_ranks(params)`` names it); a key
  that names no ``LowRank`` leaf, or several, is an error.

  ``strict=True`` raises :class:`DensifiedError` (a ``ValueError`` naming the leaf path and
  the primitive) wherever a :class:`DensifiedWarning` would be emitted, so a model that
  would silently run some kernel dense fails loudly instead.

  Example::

    logits = jlr.factorized(model.apply)(factorized_variables, x)
    loss, grads = jax.value_and_grad(lambda p: loss_fn(jlr.factorized(model.apply)(p, x)))(p)
    sub = jlr.factorized(model.apply, ranks=jlr.lod.sample_ranks(p, key))({"params": p}, x)
  """

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    flat, treedef = jax.tree_util.tree_flatten_with_path((args, kwargs), is_leaf=is_lowrank)
    if not any(is_lowrank(x) for _, x in flat):
      _rank_masks(ranks, {})  # ranks for a tree with no LowRank leaf: an error, not a no-op
      return fn(*args, **kwargs)
    dyn_idx, placeholders, values = [], [], []
    leaves = [x for _, x in flat]
    keeps = _rank_masks(ranks, {_strip_args_prefix(kp): x for kp, x in flat if is_lowrank(x)})
    for i, (kp, x) in enumerate(flat):
      if is_lowrank(x):
        path = _strip_args_prefix(kp)
        x.check(path)
        dyn_idx.append(i)
        placeholders.append(jax.ShapeDtypeStruct(x.shape, x.dtype))
        f = from_lowrank(x, path)
        values.append(f if path not in keeps else f.replace(keep=keeps[path]))
      elif is_array(x):
        dyn_idx.append(i)
        placeholders.append(x)
        values.append(x)

    def flat_fn(*dyn):
      full = list(leaves)
      for i, v in zip(dyn_idx, dyn):
        full[i] = v
      a, k = jax.tree_util.tree_unflatten(treedef, full)
      return fn(*a, **k)

    closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*placeholders)
    token = _STRICT.set(strict)
    try:
      outs = eval_jaxpr(closed.jaxpr, closed.consts, values)
    finally:
      _STRICT.reset(token)
    outs = [o.source if isinstance(o, Factored) and o.source is not None else _dense(o)
            for o in outs]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)

  return wrapper


def _rank_masks(ranks, lowranks: dict) -> dict:
  """``ranks`` (keys: paths or ``/``-suffixes of paths of ``lowranks``) -> ``{path: keep}``
  with ``keep = (arange(r) < b)`` of shape ``(*batch, r)``."""
  if not ranks:
    return {}
  out = {}
  for key, b in ranks.items():
    hits = [p for p in lowranks if p == key or p.endswith("/" + key)]
    if len(hits) != 1:
      raise ValueError(
          f"ranks[{key!r}]: names {'no' if not hits else len(hits)} LowRank leaves "
          f"({', '.join(hits) or 'LowRank leaves: ' + (', '.join(lowranks) or 'none')})")
    f = lowranks[hits[0]]
    if isinstance(b, (int, np.integer)) and not 0 <= b <= f.rank:
      raise ValueError(f"ranks[{key!r}] = {b}: {hits[0]} has rank {f.rank}; a rank "
                       f"must be in [0, {f.rank}]")
    keep = jnp.arange(f.rank) < jnp.asarray(b, jnp.int32)[..., None]
    out[hits[0]] = jnp.broadcast_to(keep, f.batch_shape + (f.rank,)).astype(f.dtype)
  return out


def _strip_args_prefix(kp) -> str:
  """Key path inside ``(args, kwargs)`` -> the path inside the argument it belongs to
  (``params/Dense_0/kernel`` for ``fn(params, x)``), as ``jlr.factorize`` names leaves."""
  kp = tuple(kp)
  if len(kp) >= 2 and isinstance(kp[0], jax.tree_util.SequenceKey):
    kp = kp[2:]  # (args|kwargs index, position or keyword)
  return path_str(kp)
