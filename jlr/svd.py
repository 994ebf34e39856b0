"""Every singular value decomposition in jlr goes through this module.

All functions are batched over leading axes, jittable for a static ``rank``, and run
in float32 (float64 when the input is float64 under ``jax_enable_x64``) whatever the
input dtype; callers cast results back.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

METHODS = ("svd", "randomized")


def compute_dtype(dtype):
  """float64 stays float64; every other float (bf16, f16, f32) computes in float32."""
  return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


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


def randomized(a: jax.Array, rank: int, key: jax.Array, *, oversample: int = 10,
               n_iter: int = 2):
  """Randomized truncated SVD (Halko, Martinsson & Tropp 2011, Alg. 4.4 + 5.1).

  A Gaussian sketch ``Y = A Omega`` with ``rank + oversample`` columns finds the range
  of ``A``; ``n_iter`` rounds of re-orthonormalized subspace iteration
  (``Q <- qr(A qr(A^T Q))``) sharpen it for slowly decaying spectra; the SVD of the
  small ``B = Q^T A`` gives the factors. Cost O(m n (rank + oversample) (1 + 2 n_iter)),
  and no intermediate is larger than the input.
  """
  a = a.astype(compute_dtype(a.dtype))
  m, n = a.shape[-2:]
  width = min(rank + oversample, m, n)
  omega = jax.random.normal(key, a.shape[:-2] + (n, width), a.dtype)
  at = jnp.swapaxes(a, -1, -2)
  q, _ = jnp.linalg.qr(a @ omega)
  for _ in range(n_iter):
    z, _ = jnp.linalg.qr(at @ q)
    q, _ = jnp.linalg.qr(a @ z)
  b = jnp.swapaxes(q, -1, -2) @ a
  ub, s, vt = jnp.linalg.svd(b, full_matrices=False)
  u = q @ ub
  return u[..., :rank], s[..., :rank], vt[..., :rank, :]


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
  qv, rv = jnp.linalg.qr(jnp.swapaxes(v, -1, -2).astype(dt))
  p, s, wt = jnp.linalg.svd(ru @ jnp.swapaxes(rv, -1, -2), full_matrices=False)
  return qu @ p, s, wt @ jnp.swapaxes(qv, -1, -2)
