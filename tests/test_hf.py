"""Hugging Face Flax models (a codebase jlr did not write): tiny random-init configs of
BERT, GPT-2 (its FlaxConv1D projections), ViT and BART. Layouts are read from the model,
the factorized forward equals the merged dense forward, and TRP and LoD train steps run.

Pinned: transformers 4.46.3 (the `test` extra), the last 4.x line that still ships Flax
models and runs on jax 0.10 / flax 0.12. FlaxT5Model is not tested: transformers itself
calls ``jnp.clip(a_max=...)``, which this jax removed.
"""

import warnings

import jax
import jax.numpy as jnp
import optax
import pytest

import jlr
from jlr import ranks
from conftest import normal

transformers = pytest.importorskip("transformers", reason="pip install -e '.[test]' (transformers==4.46.3)")

IDS = jnp.arange(16).reshape(2, 8) % 90 + 3


def tiny(kind, layers=2):
  """``(model, params, inputs)``: the model built without its eager init (about 100
  op-by-op compiles), its params from one compiled ``init_weights`` instead."""
  model, inputs = _tiny(kind, layers)
  return model, jax.jit(model.init_weights, static_argnums=1)(model.key, model.input_shape), inputs


def _tiny(kind, layers):
  if kind == "bert":
    cfg = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=layers,
                                  num_attention_heads=4, intermediate_size=37,
                                  max_position_embeddings=64)
    return transformers.FlaxBertModel(cfg, seed=0, _do_init=False), {"input_ids": IDS}
  if kind == "gpt2":
    cfg = transformers.GPT2Config(vocab_size=99, n_embd=32, n_layer=layers, n_head=4,
                                  n_positions=64)
    return transformers.FlaxGPT2LMHeadModel(cfg, seed=0, _do_init=False), {"input_ids": IDS}
  if kind == "vit":
    cfg = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32,
                                 num_hidden_layers=layers, num_attention_heads=4,
                                 intermediate_size=37)
    return transformers.FlaxViTModel(cfg, seed=0, _do_init=False), {
        "pixel_values": normal((2, 3, 16, 16))}
  cfg = transformers.BartConfig(vocab_size=99, d_model=32, encoder_layers=layers,
                                decoder_layers=layers,
                                encoder_attention_heads=4, decoder_attention_heads=4,
                                encoder_ffn_dim=37, decoder_ffn_dim=37,
                                max_position_embeddings=64)
  return transformers.FlaxBartModel(cfg, seed=0, _do_init=False), {"input_ids": IDS}


def forward(model):
  def fwd(params, inputs):
    return model(**inputs, params=params)[0]  # last hidden state / LM logits
  return fwd


def n_lowrank(tree):
  return sum(jlr.is_lowrank(x) for x in jax.tree.leaves(tree, is_leaf=jlr.is_lowrank))


# kernels per block: BERT q,k,v,o,ffn1,ffn2; GPT-2 c_attn,c_proj,c_fc,c_proj (FlaxConv1D)
EXPECTED = {"bert": 12, "gpt2": 8, "vit": 12, "bart": 30}


@pytest.mark.parametrize("kind", [pytest.param("bert", marks=pytest.mark.slow), "gpt2",
                                  pytest.param("vit", marks=pytest.mark.slow),
                                  pytest.param("bart", marks=pytest.mark.slow)])
def test_factorized_forward_equals_merged(kind):
  model, params, inputs = tiny(kind)
  fwd = forward(model)
  lay = jlr.usage.read(fwd, params, inputs)
  f = jlr.factorize(params, ranks.ratio(0.5), layout=lay)
  assert n_lowrank(f) >= EXPECTED[kind], lay
  if kind == "gpt2":  # FlaxConv1D kernels are (out, in), used transposed
    k = f["transformer"]["h"]["0"]["mlp"]["c_fc"]["kernel"]
    assert k.layout.row_axes == (1,) and k.layout.matrix_shape == (32, 128)
  with warnings.catch_warnings():
    warnings.simplefilter("error", jlr.DensifiedWarning)
    got = jax.jit(jlr.factorized(fwd))(f, inputs)
  want = jax.jit(fwd)(jlr.merge(f), inputs)  # one compile, not ~60 op-by-op ones
  err = float(jnp.abs(got - want).max() / jnp.abs(want).max())
  assert err < 1e-5, err


@pytest.mark.slow  # heavy (default run <= ~3 min): make test-slow
@pytest.mark.parametrize("kind", ["bert", "gpt2", "vit", "bart"])
def test_trp_and_lod_steps_run(kind):
  model, params0, inputs = tiny(kind, layers=1)  # one block: the steps compile in a few seconds
  fwd = forward(model)
  lay = jlr.usage.read(fwd, params0, inputs)

  def loss_of(out):
    return jnp.mean(jnp.square(out - 0.5))

  # TRP: dense weights, periodic projection (every 2 steps) inside one jitted step
  tx = jlr.trp.trp(optax.adam(1e-3), every=2, energy=0.9, layout=lay)
  params, state = params0, tx.init(params0)

  @jax.jit
  def trp_step(p, s):
    val, g = jax.value_and_grad(lambda p: loss_of(fwd(p, inputs)))(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, val

  trp_losses = []
  for _ in range(4):
    params, state, val = trp_step(params, state)
    trp_losses.append(float(val))
  assert all(jnp.isfinite(jnp.array(trp_losses))) and trp_losses[-1] < trp_losses[0], trp_losses
  # LoD: factors trained with ordered-dropout ranks sampled in the loss
  fparams = jlr.lod.init(params0, layout=lay)
  tx2 = optax.adam(1e-3)
  s2 = tx2.init(fparams)

  @jax.jit
  def lod_step(p, s, key):
    def loss(p):
      return loss_of(jlr.factorized(fwd)(jlr.lod.sample(p, key), inputs)) \
          + 1e-4 * jlr.lod.group_lasso(p)
    val, g = jax.value_and_grad(loss)(p)
    u, s = tx2.update(g, s, p)
    return optax.apply_updates(p, u), s, val

  lod_losses = []
  for i in range(4):
    fparams, s2, val = lod_step(fparams, s2, jax.random.key(i))
    lod_losses.append(float(val))
  assert all(jnp.isfinite(jnp.array(lod_losses))) and lod_losses[-1] < lod_losses[0], lod_losses
  assert n_lowrank(fparams) >= EXPECTED[kind] // 2
  # the full-rank LoD start is exact: equal to the dense model
  start = jlr.lod.init(params0, layout=lay)
  err = jnp.abs(jlr.factorized(fwd)(start, inputs) - fwd(params0, inputs)).max()
  assert float(err) < 1e-4
