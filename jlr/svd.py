"""Every singular value decomposition in jlr goes through this module.

All functions are batched over leading axes, jittable for a static ``rank``, and run
in float32 (float64 when the input is float64 under ``jax_enable_x64``) whatever the
input dtype; callers cast results back.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

METHODS = ("svd", "randomized")


def compute_dtype(dtype):
  """float64 stays float64; every other float (bf16, f16, f32) computes in float32."""
  return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


def sequenced(x, after):
  """``x`` (a pytree), made to wait for ``after`` (a pytree, or ``None``: no wait) inside
  one XLA program, unchanged in value.

  jaxlib 0.10's CPU LAPACK kernels (QR, Cholesky, ...) split a batched call over the
  intra-op thread pool and block a pool thread until the pieces finish; independent
  batched calls that XLA CPU runs side by side fill the pool and deadlock (a jitted
  ``factorize`` of a BERT tree hung for good on 2 cores). jlr's programs with several
  decompositions chain them through this. ``lax.optimization_barrier`` does not order
  XLA CPU's thunks, which follow buffers; an elementwise read of one element of
  ``after`` does: ``x + 0``, with the zero an always-false comparison XLA cannot fold
  (NaN-safe, where ``0 * a`` is not). Outside a trace it returns ``x``: eager calls are
  programs of their own, run in dispatch order."""
  leaves = [y for y in jax.tree_util.tree_leaves(after)
            if jnp.issubdtype(jnp.result_type(y), jnp.inexact)]
  if not leaves or not any(isinstance(y, jax.core.Tracer) for y in jax.tree_util.tree_leaves(x)):
    return x  # eager calls are programs of their own, run in dispatch order
  d = jnp.ravel(leaves[0])[0]
  never = (d != d) & (d == d)

  def wait(y):
    if not jnp.issubdtype(jnp.result_type(y), jnp.inexact):
      return y
    return y + jnp.where(never, 1, 0).astype(jnp.result_type(y))
  return jax.tree_util.tree_map(wait, x)


def svdvals(a: jax.Array) -> jax.Array:
  """Singular values of ``(..., m, n)``, descending."""
  a = a.astype(compute_dtype(a.dtype))
  return jnp.linalg.svd(a, compute_uv=False)


def exact(a: jax.Array, rank: int | None = None):
  """Thin SVD ``a = u diag(s) vt`` truncated to ``rank`` (Eckart-Young optimal)."""
  a = a.astype(compute_dtype(a.dtype))
  u, s, vt = jnp.linalg.svd(a, full_matrices=False)
  if rank is not None:
    u, s, vt = u[..., :rank], s[..., :rank], vt[..., :rank, :]
  return u, s, vt


def _lu_basis(x: jax.Array, *, rows: bool = False) -> jax.Array:
  """A basis of the same span as the columns of a tall ``x`` (``(*batch, m, w)``), or of
  the rows of a wide one with ``rows``: the unit lower-trapezoidal factor ``L`` of the
  partially pivoted ``P X = L U``, rows put back in ``X``'s order (``X = P^T L U``, ``U``
  invertible where ``X`` has full rank). Pivoting bounds ``|L_ij| <= 1`` with a unit
  diagonal, so every direction of ``X``, however small, comes out at unit scale: what a
  power iteration needs between products, at ``m w^2`` FLOPs -- one LAPACK ``getrf``,
  no Gram or product -- where CholeskyQR2 costs ``8 m w^2`` and a Householder QR with
  its explicit ``Q`` ``4 m w^2`` in slow, noisy LAPACK calls on XLA CPU. Li, Linderman,
  Szlam, Stanton, Kluger & Tygert, "Algorithm 971: An implementation of a randomized
  algorithm for principal component analysis", ACM TOMS 2017, normalize the same way."""
  if rows:
    return jnp.swapaxes(_lu_basis(jnp.swapaxes(x, -1, -2)), -1, -2)
  packed, _, perm = lax.linalg.lu(x)
  m, w = x.shape[-2:]
  l = jnp.tril(packed[..., :w], -1) + jnp.eye(m, w, dtype=x.dtype)
  # row i of L is row perm[i] of X: a row scatter (cheaper than the element gather by
  # argsort(perm))
  put = lambda l, p: jnp.zeros_like(l).at[p].set(l, unique_indices=True)  # noqa: E731
  for _ in x.shape[:-2]:
    put = jax.vmap(put)
  return put(l, perm)


def range_basis(a: jax.Array, start: jax.Array, *, n_iter: int = 2) -> jax.Array:
  """An orthonormal ``(*batch, m, w)`` basis ``Q`` of the dominant range of ``a`` found
  from ``start`` (``(*batch, n, w)``): ``Q = orth(A Omega)`` after ``n_iter`` rounds
  ``Y <- A Z^T`` with ``Z = lu(lu(Y)^T A)`` (Halko, Martinsson & Tropp 2011, Alg. 4.4).

  Between products the basis only has to span the right space at a scale float32 keeps
  (``lu``: :func:`_lu_basis`, the pivoted LU's ``L``); the last ``orth`` is a Householder
  QR, so every direction of ``Q`` is normalized. The row-space iterate ``Z`` is kept as
  ``w x n`` rows, so both products are plain or ``A``-rhs transposed GEMMs (``A^T Y`` as
  such is slower on XLA CPU for wide ``A``). Cost ``O(m n w (1 + 2 n_iter))``
  matmul FLOPs. Jittable."""
  y = a @ start
  for _ in range(n_iter):
    z = _lu_basis(jnp.swapaxes(_lu_basis(y), -1, -2) @ a, rows=True)
    y = a @ jnp.swapaxes(z, -1, -2)
  q, _ = jnp.linalg.qr(y)
  return q


def subspace_svd(a: jax.Array, start: jax.Array, *, n_iter: int = 2, rank: int | None = None):
  """Truncated SVD ``(u, s, vt)`` of ``a`` (``(*batch, m, n)``) in the span found from
  ``start`` (``(*batch, n, w)``: a Gaussian sketch, or the right singular vectors of a
  nearby matrix).

  ``Q`` from :func:`range_basis`, then the SVD of the small ``B = Q^T A``. With ``rank``
  (only the leading ``rank`` components will be used) that SVD comes from the
  eigendecomposition of ``B B^T`` where float32 resolves it (:func:`_gram_svd`), else a
  Householder SVD. Cost ``O(m n w (2 + 2 n_iter))`` matmul FLOPs plus ``O((m + n) w^2)``.
  Jittable.
  """
  q = range_basis(a, start, n_iter=n_iter)
  b = jnp.swapaxes(q, -1, -2) @ a
  w = b.shape[-2]
  ub, s, vt = wide_svd(b) if rank is None or rank >= w else _gram_svd(b, rank)
  return q @ ub, s, vt


def _gram_svd(b: jax.Array, rank: int):
  """SVD ``(e, s, vt)`` of a wide ``b`` (``(*batch, w, n)``) good for its leading
  ``rank`` components, from ``B B^T = E diag(lam) E^T`` (``s = ||E^T B||`` by rows,
  ``vt = E^T B / s``): every truncation ``E_r E_r^T B`` is an orthogonal projection.

  The Gram squares the condition number: float32 resolves ``lam`` only to ~``eps lam_1``.
  By Ky Fan the projection's error exceeds the optimum by at most ``2 r ||Delta||`` for a
  perturbation ``Delta`` of the Gram, so it is used when the eigenvalues past ``rank``
  hold ``sum_{i>r} lam_i >= max(r, n) w eps lam_1`` in every matrix of the batch
  (measured over geometric, power-law, flat and cliff spectra, w = 11..317, n = 12..3072:
  within 1.0003x of ``B``'s optimal rank-``r`` error there, 1.01x down to 1/50 of that
  bound, up to 10^4x far below it); else it falls back to :func:`wide_svd` for the batch
  (one ``lax.cond``; under ``vmap`` both branches run). On XLA CPU the ``w x w``
  eigendecomposition costs less than the Householder SVD.
  """
  lam, e = _eigh_descending(b @ jnp.swapaxes(b, -1, -2))

  resolved = jnp.all(_gram_resolves(lam, rank, b.shape[-1]))
  return lax.cond(resolved, _eigvec_svd, lambda b, e: wide_svd(b), b, e)


def _eigh_descending(h: jax.Array):
  """``(lam, e)`` of the symmetric ``h``, eigenvalues descending (``eigh`` ascends)."""
  lam, e = jnp.linalg.eigh(h)
  return lam[..., ::-1], e[..., ::-1]


def _eigvec_svd(b: jax.Array, e: jax.Array):
  """``(e, s, vt)`` with ``E E^T B = e diag(s) vt`` for eigenvectors ``e`` of ``B B^T``:
  ``s = ||E^T B||`` by rows, ``vt = E^T B / s``."""
  svt = jnp.swapaxes(e, -1, -2) @ b
  s = jnp.linalg.norm(svt, axis=-1)
  return e, s, svt / jnp.maximum(s, jnp.finfo(b.dtype).tiny)[..., None]


def _gram_resolves(lam: jax.Array, rank: int, n: int, slack: float = 1.0) -> jax.Array:
  """Whether the descending Gram eigenvalues ``lam`` (``(*batch, w)``) of a ``w x n``
  matrix leave enough past ``rank`` above float rounding for :func:`_gram_svd`: the tail
  at least ``1 / slack`` of the Ky Fan bound."""
  w = lam.shape[-1]
  eps = jnp.finfo(lam.dtype).eps
  return jnp.sum(lam[..., rank:], -1) * slack >= max(rank, n) * w * eps * lam[..., 0]


def projected_eigh(a: jax.Array, q: jax.Array):
  """``(u, s, svt, v)`` with ``Q Q^T A = u @ svt``: ``u`` orthonormal (``(*batch, m, w)``),
  ``s`` descending, ``svt = diag(s) V^T`` and ``v = V`` (``(*batch, n, w)``) -- the SVD of
  ``B = Q^T A`` in projector form, from the eigendecomposition ``B B^T = E diag(s^2) E^T``
  (``u = Q E``, ``svt = E^T B``, ``v = B^T E / s`` with ``s`` floored at ``1e-6 s_1``).

  Any truncation ``(u * keep) @ svt = Q E_k E_k^T B`` is an orthogonal projection of
  ``B`` onto eigenvectors, so it needs no division by ``s`` and stays exact where ``s``
  is tiny; only ``s`` itself loses relative accuracy below ~``sqrt(eps) s_1`` (float32:
  ``3e-4 s_1``), which rank rules on energy or on values above that never see. The
  ``w x w`` eigendecomposition costs less than the SVD of the ``w x n`` ``B`` on XLA
  CPU. ``v`` is its own small product (not ``svt^T``), so it comes out in row-major
  layout with no transpose. Jittable."""
  b = jnp.swapaxes(q, -1, -2) @ a
  lam, e = _eigh_descending(b @ jnp.swapaxes(b, -1, -2))
  s = jnp.sqrt(jnp.maximum(lam, 0.0))
  floor = jnp.maximum(s[..., :1] * 1e-6, jnp.finfo(s.dtype).tiny)
  v = (jnp.swapaxes(b, -1, -2) @ e) / jnp.maximum(s, floor)[..., None, :]
  return q @ e, s, jnp.swapaxes(e, -1, -2) @ b, v


def wide_svd(b: jax.Array):
  """Thin SVD of a wide ``b`` (``(*batch, w, n)``, ``w <= n``) as the SVD of its
  transpose: ``b^T = P S Q^T`` gives ``b = Q S P^T``. LAPACK reduces a tall matrix by a
  QR first and runs the SVD iteration on the ``w x w`` factor only, which on XLA CPU is
  faster than the same SVD of the wide matrix."""
  p, s, qt = jnp.linalg.svd(jnp.swapaxes(b, -1, -2), full_matrices=False)
  return jnp.swapaxes(qt, -1, -2), s, jnp.swapaxes(p, -1, -2)


def randomized(a: jax.Array, rank: int, key: jax.Array, *, oversample: int = 10,
               n_iter: int = 2):
  """Randomized truncated SVD (Halko, Martinsson & Tropp 2011, Alg. 4.4 + 5.1).

  A Gaussian sketch ``Y = A Omega`` with ``rank + oversample`` columns finds the range
  of ``A``; ``n_iter`` rounds of LU-normalized subspace iteration sharpen it for
  slowly decaying spectra (:func:`subspace_svd`). Cost O(m n (rank + oversample)
  (2 + 2 n_iter)), and no intermediate is larger than the input. ``key`` is one PRNG
  key for the whole batch, or typed keys for its leading axes (``key.shape`` a prefix
  of ``a.shape[:-2]``): ``a[j]`` then gets the sketch ``key[j]`` draws for it alone, so
  a stacked call equals the loop over ``j``.

  On CPU a cost model (:func:`_route`) may run the same range finder on the small-side
  Gram instead (:func:`_gram_sketch_svd`; rectangular kernels at moderate ranks), or take
  the Gram's full eigendecomposition (:func:`_small_side_gram_svd`; high ranks); both fall
  back to the sketch where float32 cannot resolve the Gram.
  """
  a = a.astype(compute_dtype(a.dtype))
  batch, (m, n) = a.shape[:-2], a.shape[-2:]
  width = min(rank + oversample, m, n)

  def gaussian(rows):
    if (jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) and key.ndim
        and batch[:key.ndim] == key.shape):
      draw = lambda k: jax.random.normal(k, batch[key.ndim:] + (rows, width), a.dtype)  # noqa: E731
      return jax.vmap(draw)(key.reshape(-1)).reshape(batch + (rows, width))
    return jax.random.normal(key, batch + (rows, width), a.dtype)

  def sketched(a):
    u, s, vt = subspace_svd(a, gaussian(n), n_iter=n_iter, rank=rank)
    return u[..., :rank], s[..., :rank], vt[..., :rank, :]

  route = _route(m, n, rank, width, n_iter)
  if route == "gram":
    return _small_side_gram_svd(a, rank, fallback=sketched)
  if route == "gram_sketch":
    return _gram_sketch_svd(a, rank, gaussian(min(m, n)), n_iter=n_iter, fallback=sketched)
  return sketched(a)


def _route(m: int, n: int, rank: int, width: int, n_iter: int) -> str:
  """The cheapest of three routes to a rank-``rank`` SVD on XLA CPU: ``"sketch"``
  (:func:`subspace_svd` on ``A``), ``"gram_sketch"`` (the same range finder on the
  small-side Gram, :func:`_gram_sketch_svd`) or ``"gram"`` (the Gram's eigendecomposition,
  :func:`_small_side_gram_svd`). Cost model in matmul-peak FLOPs, from timings on 2 cores:
  the skinny ``w``-column products run at ~0.3 of the matmul peak, the Gram's square
  product at ~0.7, and XLA CPU's eigh costs ~``33 N^3`` (``N = min(m, n)``). Only on
  CPU: elsewhere eigh is relatively slower still, and the sketch is what the GPU
  literature tunes."""
  big, small = max(m, n), min(m, n)
  if jax.default_backend() != "cpu" or rank >= small:  # full rank: no tail to test
    return "sketch"
  gram = 2 * big * small * small / 0.7
  costs = {
      "sketch": (2 + 2 * n_iter) * 2 * m * n * width / 0.3,
      "gram_sketch": gram + ((n_iter + 2) * 2 * small * small * width
                             + 2 * big * small * rank) / 0.3,
      "gram": gram + 2 * big * small * rank / 0.7 + 33 * small ** 3,
  }
  return min(costs, key=costs.get)


def _gram_sketch_svd(a: jax.Array, rank: int, start: jax.Array, *, n_iter: int, fallback):
  """Rank-``rank`` truncated SVD of ``a`` by the randomized range finder run on the
  small-side Gram ``G = B B^T`` (``B`` the wide orientation of ``a``, ``N x M``, ``N <=
  M``): ``Y = G^(1 + n_iter) Omega`` with LU normalization between products
  (``start = Omega``, ``N x w``), ``Q = qr(Y)``, the eigendecomposition of the ``w x w``
  ``Q^T G Q = E diag(lam) E^T``, then the projection of ``B`` onto ``U = Q E_r``
  (``s = ||U^T B||`` by rows, ``vt = U^T B / s``; the transpose for a tall ``a``).

  The Gram power ``2 + 2 n_iter`` is one more than the sketch's ``1 + 2 n_iter`` (Halko
  et al. 2011, Sec. 4.5), for ``2 M N^2`` FLOPs in one square product plus skinny
  ``N x N`` ones, where the sketch's ``(2 + 2 n_iter) 2 M N w`` are all skinny: faster
  on MiniLM's 384 x 1536 kernels (README.md, Benchmarks). The result is an orthogonal
  projection of ``B``, so the Gram's rounding only tilts the basis: by Ky Fan the error
  exceeds the optimum by at most ``~2 r ||Delta G||``, negligible where the Gram
  resolves the tail (:func:`_gram_resolves`, with the full-Gram slack, on the ``w`` Ritz
  values -- a partial tail, so a stricter test); else ``fallback(a)`` (the sketch) for
  the batch, one ``lax.cond``."""
  b = _wide(a)
  g = b @ jnp.swapaxes(b, -1, -2)
  y = g @ start
  for _ in range(n_iter):
    y = g @ _lu_basis(y)
  q, _ = jnp.linalg.qr(y)
  lam, e = _eigh_descending(jnp.swapaxes(q, -1, -2) @ (g @ q))
  resolved = jnp.all(_gram_resolves(lam, rank, b.shape[-1], slack=_FULL_GRAM_SLACK))
  return lax.cond(resolved, lambda a, q, e: _projected(a, q @ e[..., :rank]),
                  lambda a, q, e: fallback(a), a, q, e)


def _small_side_gram_svd(a: jax.Array, rank: int, *, fallback):
  """Rank-``rank`` truncated SVD of ``a`` from ``B B^T = E diag(lam) E^T`` with ``B`` the
  wide orientation of ``a`` (``u = E_r``, ``vt = E_r^T B / s`` for a wide ``a``; the
  transpose for a tall one): an orthogonal projection onto the leading eigenvectors,
  Eckart-Young optimal to float32 rounding where float32 resolves the kept spectrum
  (:func:`_gram_resolves`, the bound of :func:`_gram_svd` with a measured slack); else
  ``fallback(a)`` (the sketch) for the batch, one ``lax.cond``."""
  b = _wide(a)
  lam, e = _eigh_descending(b @ jnp.swapaxes(b, -1, -2))
  resolved = jnp.all(_gram_resolves(lam, rank, b.shape[-1], slack=_FULL_GRAM_SLACK))
  return lax.cond(resolved, lambda a, e: _projected(a, e[..., :rank]),
                  lambda a, e: fallback(a), a, e)


def _wide(a: jax.Array) -> jax.Array:
  """``a`` in its wide orientation (``a`` or ``a^T``, whichever has fewer rows)."""
  return a if a.shape[-2] <= a.shape[-1] else jnp.swapaxes(a, -1, -2)


def _projected(a: jax.Array, u: jax.Array):
  """SVD ``(u, s, vt)`` of ``U U^T B`` for orthonormal ``u`` and ``B`` the wide
  orientation of ``a`` (:func:`_eigvec_svd`), handed back in ``a``'s orientation."""
  u, s, vt = _eigvec_svd(_wide(a), u)
  if a.shape[-2] <= a.shape[-1]:
    return u, s, vt
  return jnp.swapaxes(vt, -1, -2), s, jnp.swapaxes(u, -1, -2)


# The bound is worst-case rounding; measured on the full Gram (768 x 3072 and 384 x 1536 at
# rank 0.5 m n / (m + n)): power-law spectra at 1/144 and 1/18 of it came out within
# 1.0004x of the optimal error, an exponential one at 1/30000 at 1.08x, low-rank-plus-noise
# at 1e-8 at 1.23x. 1/200 keeps the first and sends the others to the sketch.
_FULL_GRAM_SLACK = 200.0


def truncated(a: jax.Array, rank: int, *, method: str = "svd", key=None, **kwargs):
  """Dispatch to :func:`exact` or :func:`randomized` (``key`` required for the latter)."""
  if method == "svd":
    return exact(a, rank)
  if method == "randomized":
    if key is None:
      raise ValueError("method='randomized' needs a PRNG key: pass key=jax.random.key(0)")
    return randomized(a, rank, key, **kwargs)
  raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def of_product(u: jax.Array, v: jax.Array):
  """SVD of ``u @ v`` without forming it: QR of both factors, SVD of the r x r core.

  ``u = Qu Ru``, ``v^T = Qv Rv``  =>  ``u v = Qu (Ru Rv^T) Qv^T``; cost O((m + n) r^2).
  """
  dt = compute_dtype(u.dtype)
  qu, ru = jnp.linalg.qr(u.astype(dt))
  qv, rv = jnp.linalg.qr(sequenced(jnp.swapaxes(v, -1, -2).astype(dt), ru))
  p, s, wt = jnp.linalg.svd(ru @ jnp.swapaxes(rv, -1, -2), full_matrices=False)
  return qu @ p, s, wt @ jnp.swapaxes(qv, -1, -2)


def whitener(gram: jax.Array | None = None, row_weights: jax.Array | None = None, *,
             damping: float = 1e-2):
  """``(R, R^{-1})`` with ``||R (W - W')||_F`` the data-aware error of a kernel ``W``.

  * activation-whitened (SVD-LLM, Wang et al. 2024; ASVD, Yuan et al. 2023): ``gram`` is
    ``X^T X`` of the layer's inputs; ``||X (W - W')||_F = ||G^{1/2} (W - W')||_F``, so
    ``R = G^{1/2}``. ``X^T X`` is often singular (rank-deficient activations), so
    ``damping * mean(diag G)`` is added and the square root comes from an
    eigendecomposition with eigenvalues clipped at that floor -- no Cholesky failure.
  * Fisher-weighted (FWSVD, Hsu et al. 2022): ``row_weights`` are per-row sums of squared
    loss gradients; ``R = diag(sqrt(w))`` after the same relative damping, returned as
    its diagonal, an ``(..., m, 1)`` column (a vocabulary-sized embedding would need an
    ``m x m`` matrix: 49,152 rows are 9.7 GB); :func:`whiten` applies either form.
  """
  if (gram is None) == (row_weights is None):
    raise ValueError("whitener needs exactly one of gram= or row_weights=")
  if gram is not None:
    g = jnp.asarray(gram, jnp.float32)
    g = (g + jnp.swapaxes(g, -1, -2)) / 2
    floor = damping * jnp.mean(jnp.diagonal(g, axis1=-2, axis2=-1), -1, keepdims=True)
    floor = jnp.maximum(floor, 1e-12)
    lam, e = jnp.linalg.eigh(g)
    lam = jnp.maximum(lam, 0.0) + floor
    r = (e * jnp.sqrt(lam)[..., None, :]) @ jnp.swapaxes(e, -1, -2)
    r_inv = (e / jnp.sqrt(lam)[..., None, :]) @ jnp.swapaxes(e, -1, -2)
    return r, r_inv
  w = jnp.asarray(row_weights, jnp.float32)
  w = jnp.maximum(w, 0.0) + jnp.maximum(damping * jnp.mean(w, -1, keepdims=True), 1e-12)
  s = jnp.sqrt(w)[..., :, None]
  return s, 1.0 / s


def whiten(r: jax.Array, a: jax.Array) -> jax.Array:
  """``R @ a`` for a whitener of :func:`whitener`: an ``(..., m, m)`` matrix, or a
  diagonal held as an ``(..., m, 1)`` column (the two agree at ``m = 1``), broadcast
  against ``a``'s leading axes either way."""
  return r * a if jnp.shape(r)[-1] == 1 else r @ a


def _unwhiten(r_inv, p, s, vt):
  """The SVD of ``W' = R^{-1} P diag(s) V^T`` (``P`` a whitened basis, ``R^{-1} P`` not
  orthonormal): QR ``R^{-1} P = Q T``, then the r x r SVD ``T diag(s) = P' S' W^T``, so
  ``W' = (Q P') S' (W^T V^T)``. Cost O(m r^2). Without it the "balanced" split would put
  the whole scale of ``R^{-1}`` (huge where activations are small) into ``u``: the
  product is the same but gradient steps on such factors are badly conditioned."""
  q, t = jnp.linalg.qr(whiten(r_inv, p))
  p2, s2, wt = jnp.linalg.svd(t * s[..., None, :], full_matrices=False)
  return q @ p2, s2, wt @ vt


def weighted(a: jax.Array, rank: int, r: jax.Array, r_inv: jax.Array, *, nested: bool = False):
  """Best rank-``rank`` ``W'`` under ``||R (W - W')||_F``: ``W' = R^{-1} (R W)_rank``.

  Returns the SVD ``(u, s, vt)`` of ``W'`` itself (orthonormal ``u`` and ``vt``; ``s``
  its singular values, not those of the whitened ``R W``). With ``nested=True`` it
  returns the whitened components instead, ``(R^{-1} P, S, V^T)`` with ``R W = P S V^T``:
  ``u`` is not orthonormal, but every prefix of them is the optimum at its own rank
  (the SVD of ``W'`` at full rank is the plain SVD of ``W``, whose prefixes are not).
  """
  a = a.astype(compute_dtype(a.dtype))
  p, s, vt = jnp.linalg.svd(whiten(r, a), full_matrices=False)
  p, s, vt = p[..., :rank], s[..., :rank], vt[..., :rank, :]
  return (whiten(r_inv, p), s, vt) if nested else _unwhiten(r_inv, p, s, vt)


def regression(a: jax.Array, rank: int, gram: jax.Array, cross: jax.Array, *,
               damping: float = 1e-2):
  """Best rank-``rank`` ``W'`` mapping shifted inputs onto the reference outputs.

  ``X'`` are a layer's inputs in a (partly) compressed model, ``X`` its inputs in the
  reference model; ``gram = X'^T X'`` and ``cross = X'^T X``. ``W'`` minimizes

      ||X' W' - X W||_F^2 + lam ||W' - W||_F^2,   lam = damping * mean(diag(gram)).

  Expanding, the objective is ``||R W' - R^{-1} (cross + lam I) W||_F^2 + const`` with
  ``R = (gram + lam I)^{1/2}``, so ``W' = R^{-1} (R^{-1} (cross + lam I) W)_rank``
  (Eckart-Young on the target; the closed-form "update given the whitened basis" of
  SVD-LLM, Wang et al. 2024, and the error feedback of sequential calibration). With
  ``X' = X`` the target is ``R W`` and this is exactly :func:`weighted`; at full rank
  it is the ridge regression of ``X W`` on ``X'`` shrunk towards ``W``.
  Returns the SVD ``(u, s, vt)`` of ``W'`` (as :func:`weighted`).
  """
  a = a.astype(compute_dtype(a.dtype))
  r, r_inv = whitener(gram=gram, damping=damping)
  g = jnp.asarray(gram, jnp.float32)
  lam = jnp.maximum(damping * jnp.mean(jnp.diagonal(g, axis1=-2, axis2=-1), -1), 1e-12)
  c = jnp.asarray(cross, jnp.float32) + lam[..., None, None] * jnp.eye(g.shape[-1], dtype=g.dtype)
  p, s, vt = jnp.linalg.svd(r_inv @ (c @ a), full_matrices=False)
  return _unwhiten(r_inv, p[..., :rank], s[..., :rank], vt[..., :rank, :])
