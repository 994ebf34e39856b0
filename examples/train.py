"""The examples' loop helpers: small training pieces shared by the example trainers,
``results/`` and ``benchmarks/`` (import it with ``examples/`` on ``sys.path``, as they
do). Not part of the jlr API, and not a framework: every piece works in a hand-written
loop.

* :class:`TrainState` -- step, params, optimizer state, extra model collections
  (e.g. ``batch_stats``) and the PRNG key (as raw key data, so checkpoints hold arrays).
* :func:`train_step` -- builds ``step(state, batch) -> (state, metrics)`` from a loss.
* :class:`Checkpoints` -- orbax save / restore / resume, ``LowRank`` leaves included.
* :func:`progress` -- a tqdm bar (plain iteration when tqdm is missing or disabled).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import optax


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  extra: Any
  rng: jax.Array  # jax.random.key_data of the current key

  @classmethod
  def create(cls, params, tx: optax.GradientTransformation, *, key, extra=None) -> "TrainState":
    return cls(jnp.zeros([], jnp.int32), params, tx.init(params), extra if extra is not None else {},
               jax.random.key_data(key))

  @property
  def key(self):
    return jax.random.wrap_key_data(self.rng)

  def replace(self, **kw) -> "TrainState":
    return dataclasses.replace(self, **kw)


LossFn = Callable[[Any, Any, Any, jax.Array], tuple[jax.Array, tuple[Any, dict]]]


def train_step(loss_fn: LossFn, tx: optax.GradientTransformation):
  """``step(state, batch) -> (state, metrics)`` (not jitted: wrap it in ``jax.jit``).

  ``loss_fn(params, extra, batch, key) -> (loss, (new_extra, metrics))``; ``key`` is a
  fresh subkey each step (dropout, LoD rank sampling). ``tx.update`` receives params,
  so TRP's transforms work inside it.
  """

  def step(state: TrainState, batch):
    key, sub = jax.random.split(state.key)
    (loss, (extra, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.extra, batch, sub)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new = TrainState(state.step + 1, params, opt_state, extra, jax.random.key_data(key))
    return new, dict(metrics, loss=loss)

  return step


def evaluate(fn: Callable[[Any], dict], batches: Iterable) -> dict:
  """Example-weighted mean of ``fn(batch)`` metrics over ``batches`` (``fn`` should be
  jitted and return per-batch means plus ``"count"``)."""
  totals, n = {}, 0
  for batch in batches:
    m = jax.device_get(fn(batch))
    c = int(m.pop("count"))
    n += c
    for k, v in m.items():
      totals[k] = totals.get(k, 0.0) + float(v) * c
  return {k: v / max(n, 1) for k, v in totals.items()}


class Checkpoints:
  """Orbax checkpoints of any pytree (a :class:`TrainState` with ``LowRank`` leaves
  included) in ``directory``, keeping the newest ``max_to_keep``.

  ``restore(template)`` restores the latest step into ``template``'s structure (types,
  shapes, dtypes and static ``LowRank`` layouts come from the template), or returns
  ``None`` when there is nothing to resume.
  """

  def __init__(self, directory: str, *, max_to_keep: int = 2):
    import orbax.checkpoint as ocp  # optional dependency, imported on use

    self._ocp = ocp
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, tree) -> None:
    self.manager.save(int(step), args=self._ocp.args.StandardSave(tree), force=True)
    self.manager.wait_until_finished()

  def restore(self, template, step: int | None = None):
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    abstract = jax.tree.map(self._ocp.utils.to_shape_dtype_struct, template)
    return self.manager.restore(step, args=self._ocp.args.StandardRestore(abstract))


def progress(iterable: Iterable, *, total: int | None = None, desc: str | None = None,
             disable: bool = False, **kw):
  """A tqdm progress bar over ``iterable`` (plain iteration if tqdm is unavailable)."""
  try:
    from tqdm.auto import tqdm
  except ImportError:  # pragma: no cover
    return iterable
  return tqdm(iterable, total=total, desc=desc, disable=disable, dynamic_ncols=True, **kw)
