"""The built-in rules: one entry per primitive jlr runs factorized, both halves side by
side -- how the primitive moves a kernel's layout (:mod:`jlr.usage`) and how it runs on
the factors (:mod:`jlr.factorized`). See :mod:`jlr.rules` for the registry and how to
add a rule for a primitive of your own.

=========================  ===========================  ================================
primitive                  layout                       on the factors
=========================  ===========================  ================================
``dot_general``            rows = contracted axes       two thin contractions
``conv_general_dilated``   rows = window + in-channels  a conv to ``r`` channels, then the
                                                        rest (channel- or spatial-wise)
``gather``                 rows = looked-up axes        ``u[ids]``, kept factored
layout ops                 axes moved / merged          on the factors
scalar ``mul/div/neg``     unchanged                    scale one factor
``jit``, ``remat``,        followed                     followed (``scan`` slices
``scan``                                                stacked kernels per step)
=========================  ===========================  ================================
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.core import primitives as P

from jlr import factorized as run
from jlr import rules
from jlr import usage as layout


def _traced(fn, *args):
  """The primitive of the first equation of ``fn``'s jaxpr (names and modules of some
  primitives move between JAX versions; the objects a trace produces do not)."""
  return jax.make_jaxpr(fn)(*args).eqns[0].primitive


def _register_builtins() -> None:
  x = jnp.ones((2,), jnp.float32)
  layout_ops = dict(rows_stay_factored=True)
  for p in (P.convert_element_type_p,):
    rules.register(p, layout=layout.layout_unary, run=run.run_convert, carries_mask=True,
                   **layout_ops)
  for p in {P.copy_p, P.sharding_constraint_p, _traced(lax.optimization_barrier, x)}:
    rules.register(p, **rules.passthrough())
  rules.register(P.transpose_p, layout=layout.layout_transpose, run=run.run_transpose,
                 carries_mask=True, **layout_ops)
  rules.register(P.reshape_p, layout=layout.layout_reshape, run=run.run_reshape, **layout_ops)
  rules.register(P.squeeze_p, layout=layout.layout_reshape, run=run.run_squeeze, **layout_ops)
  rules.register(P.broadcast_in_dim_p, layout=layout.layout_reshape,
                 run=run.run_broadcast_in_dim, **layout_ops)
  rules.register(P.rev_p, layout=layout.layout_unary, run=run.run_rev, **layout_ops)
  for p in (P.mul_p, P.div_p):
    rules.register(p, layout=layout.layout_scale, run=run.run_scale, carries_mask=True)
  rules.register(P.neg_p, layout=layout.layout_unary, run=run.run_scale, carries_mask=True)
  rules.register(P.dot_general_p, layout=layout.layout_dot_general, run=run.run_dot_general,
                 carries_mask=True)
  rules.register(P.conv_general_dilated_p, layout=layout.layout_conv, run=run.run_conv,
                 carries_mask=True)
  rules.register(P.gather_p, layout=layout.layout_gather, run=run.run_gather)
  for p in {_traced(jax.jit(lambda a: a + 1), x), P.closed_call_p}:
    rules.register(p, layout=layout.layout_call, run=run.run_call, carries_mask=True)
  rules.register(_traced(jax.checkpoint(lambda a: a + 1), x), layout=layout.layout_remat,
                 run=run.run_remat)
  rules.register(P.scan_p, layout=layout.layout_scan, run=run.run_scan)


_register_builtins()
