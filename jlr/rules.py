"""One registry of primitive rules, keyed by the JAX primitive objects.

A factored kernel (a :class:`jlr.LowRank`) meets JAX primitives twice: when
:func:`jlr.usage.read` follows a kernel through a traced function to read its layout,
and when :func:`jlr.factorized` evaluates the function on the factors. Each
:class:`Rule` says both -- how the primitive moves a kernel's layout, and how it runs on
factors -- so the two can never disagree (a primitive the reader lets through is one
the interpreter can run), in the manner of ``jax.experimental.sparse``'s rule tables.

* ``layout(eqn, ins, uses, walk) -> outs``: ``ins`` are the tracked kernel values of the
  equation's inputs (:class:`jlr.usage.Tracked` or ``None``); return one per output (a
  ``Tracked`` when the output is still the kernel, re-axed) after recording in ``uses``
  how the kernel was consumed (:func:`jlr.usage.record_use`); ``walk(jaxpr, ins)``
  follows a sub-jaxpr.
* ``run(eqn, ins) -> outs | None``: ``ins`` hold :class:`jlr.factorized.Factored` values;
  return the outputs (``Factored`` or arrays; a list for multiple-result primitives), or
  ``None`` to let the interpreter form the dense kernel (with a
  :class:`jlr.DensifiedWarning`, or a :class:`jlr.DensifiedError` under ``strict``).
* ``rows_stay_factored``: a looked-up row block (``u[ids]``) passes through it still
  factored (layout ops); before any other primitive it is finished as ``u[ids] @ v``.
* ``carries_mask``: it handles an ordered-dropout component mask (``Factored.keep``);
  before any other primitive the mask is folded into a factor.

A primitive with no rule is a use the reader reports (the kernel is left dense by
``jlr.flax.factorize``) and a place where the interpreter densifies. Register a rule for
a custom primitive with :func:`register`; :func:`passthrough` is the rule of an
identity-like unary primitive (a barrier, a no-op annotation)::

    jlr.rules.register(my_barrier_p, **jlr.rules.passthrough())
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from jax.extend import core as jcore

__all__ = ["Rule", "get", "passthrough", "register", "registered", "unregister"]


@dataclasses.dataclass(frozen=True)
class Rule:
  """How one primitive moves a kernel's layout and how it runs on its factors."""

  layout: Callable | None = None
  run: Callable | None = None
  rows_stay_factored: bool = False
  carries_mask: bool = False


_REGISTRY: dict[jcore.Primitive, Rule] = {}


def register(primitive: jcore.Primitive, *, layout: Callable | None = None,
             run: Callable | None = None, rows_stay_factored: bool = False,
             carries_mask: bool = False, replace: bool = False) -> Rule:
  """Register the :class:`Rule` of ``primitive`` (a ``jax.extend.core.Primitive``).

  ``layout`` or ``run`` may be ``None`` (the reader reports the use / the interpreter
  densifies there). Registering a primitive twice is an error unless ``replace=True``.
  """
  if not isinstance(primitive, jcore.Primitive):
    raise TypeError(f"register needs a jax.extend.core.Primitive, got {type(primitive).__name__}")
  if primitive in _REGISTRY and not replace:
    raise ValueError(f"a rule for `{primitive.name}` is already registered; pass replace=True")
  rule = Rule(layout, run, rows_stay_factored, carries_mask)
  _REGISTRY[primitive] = rule
  return rule


def unregister(primitive: jcore.Primitive) -> None:
  """Remove the rule of ``primitive`` (the reader then reports it, the interpreter
  densifies)."""
  _REGISTRY.pop(primitive, None)


def get(primitive: Any) -> Rule | None:
  """The rule registered for ``primitive``, or ``None``."""
  return _REGISTRY.get(primitive)


def registered() -> dict[jcore.Primitive, Rule]:
  """A copy of the registry: ``{primitive: Rule}``."""
  return dict(_REGISTRY)


def _identity_layout(eqn, ins, uses, walk):
  return list(ins) if len(ins) == len(eqn.outvars) else [None] * len(eqn.outvars)


def _identity_run(eqn, ins):
  if eqn.primitive.multiple_results:
    return list(ins) if len(ins) == len(eqn.outvars) else None
  return ins[0] if len(ins) == 1 else None


def passthrough() -> dict:
  """The keyword arguments of :func:`register` for a unary primitive whose output is its
  input (an optimization barrier, a copy, a sharding annotation): the kernel passes
  through unchanged, still factored."""
  return dict(layout=_identity_layout, run=_identity_run, rows_stay_factored=True,
              carries_mask=True)
