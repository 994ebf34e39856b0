"""examples/train.py: the examples' loop helpers (not part of the jlr API)."""

import os
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlr
from jlr import trp
from conftest import f32

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
sys.path.insert(0, EXAMPLES)

import train  # noqa: E402


def setup():
  rng = np.random.default_rng(0)
  x = f32(rng.normal(size=(64, 12)))
  y = x @ f32(rng.normal(size=(12, 4)))
  params = jlr.factorize({"w": {"kernel": f32(rng.normal(size=(12, 4)))}}, 2,
                         select="kernel")

  def loss_fn(p, extra, batch, key):
    xb, yb = batch
    noise = 1e-3 * jax.random.normal(key, yb.shape)  # uses the per-step key
    loss = jnp.mean((xb @ p["w"]["kernel"].u @ p["w"]["kernel"].v - yb + noise) ** 2)
    return loss, ({"seen": extra["seen"] + xb.shape[0]}, {})

  tx = optax.sgd(0.05, momentum=0.9)
  state = train.TrainState.create(params, tx, key=jax.random.key(1), extra={"seen": jnp.int32(0)})
  return state, jax.jit(train.train_step(loss_fn, tx)), (x, y)


def test_step_trains_and_threads_key_and_extra():
  state, step, batch = setup()
  first = None
  for _ in range(30):
    state, m = step(state, batch)
    first = first if first is not None else float(m["loss"])
  assert float(m["loss"]) < first
  assert int(state.step) == 30 and int(state.extra["seen"]) == 30 * 64
  assert isinstance(state.params["w"]["kernel"], jlr.LowRank)


def test_checkpoint_resume_is_bit_identical(tmp_path):
  state, step, batch = setup()
  ref = state
  for _ in range(10):
    ref, _ = step(ref, batch)
  ck = train.Checkpoints(str(tmp_path / "ck"))
  assert ck.restore(state) is None
  s = state
  for _ in range(4):
    s, _ = step(s, batch)
  ck.save(int(s.step), s)
  restored = ck.restore(state)  # template: the freshly created state
  assert ck.latest_step() == 4 and isinstance(restored.params["w"]["kernel"], jlr.LowRank)
  for _ in range(6):
    restored, _ = step(restored, batch)
  chex.assert_trees_all_equal(restored, ref)


def test_trp_inside_train_step():
  rng = np.random.default_rng(0)
  p = {"w": {"kernel": f32(rng.normal(size=(12, 8)))}}
  tx = trp.trp(optax.sgd(0.01), every=2, energy=0.5)
  loss_fn = lambda p, e, b, k: (jnp.sum(p["w"]["kernel"] ** 2), (e, {}))  # noqa: E731
  step = jax.jit(train.train_step(loss_fn, tx))
  s = train.TrainState.create(p, tx, key=jax.random.key(0))
  s, _ = step(s, None)
  s, _ = step(s, None)
  assert np.linalg.matrix_rank(np.asarray(s.params["w"]["kernel"]), tol=1e-5) < 8


def test_evaluate_weights_by_count():
  out = train.evaluate(lambda b: {"acc": b, "count": 1 if b == 1.0 else 3}, [1.0, 0.0])
  assert out["acc"] == 0.25
