"""A zoo of Hugging Face Flax models (transformers 4.46.3): every Flax class that its auto
mappings name (``modeling_flax_auto.FLAX_*_MAPPING_NAMES``), built from a tiny random
config (hidden <= 64, 2 layers, small vocabulary; HF's own random init, no download), and
run through jlr's public API:

  layouts = jlr.usage.read(fwd, params, inputs)       # read from the model, never guessed
  small = jlr.factorize(params, jlr.ranks.ratio(0.5), layout=layouts)

where ``fwd(params, inputs)`` is every floating-point output of ``model(**inputs,
params=params)``. Checks:

  (a) ``jlr.factorized(fwd, strict=True)(small, inputs)`` equals ``fwd(jlr.merge(small),
      inputs)`` (the dense model the factors stand for: a forward that never sees a
      ``LowRank``) to 1e-5 of the reference's max |value|, per output, in float32;
  (b) every block (a params prefix through its first layer index: ``layer/0``, ``h/1``,
      ``block/0``, ``stages/1``) holds ``LowRank`` leaves, and the same kernel is
      factorized in every block of a stack or in none;
  (c) ``strict=True`` runs: no kernel is densified (``DENSIFIED`` would list the leaves an
      architecture legitimately densifies, with the reason; the warnings must then name
      exactly those);
  (d) one jitted adam step on the factors only (everything else frozen) lowers a loss
      computed through ``jlr.factorized(fwd)``; exactly the factors with a gradient move.

``ZOO`` holds one ``Spec`` per model type (its richest class: task heads included);
``VARIANTS`` other code paths (``nn.remat`` layers, LongT5 local attention, ResNet
bottlenecks); ``HEADS`` every other class of the mappings, built from its type's Spec and
run through (a)-(c). Every exception is a module-level dict with its reason. Models are
built once per process (``built(name, cls)``, cached): a new per-model check is one more
test function parametrized over ``_cases()``. The whole zoo runs under ``-m slow``;
``DEFAULT`` (BERT, Llama, ResNet: encoder, decoder, conv net) also runs in the default run.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
import types
import warnings
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlr
from jlr import ranks
from jlr.paths import path_str
from conftest import normal

transformers = pytest.importorskip("transformers", reason="pip install -e '.[test]' (transformers==4.46.3)")
from transformers.models.auto import modeling_flax_auto  # noqa: E402

T = transformers
TOL = 1e-5


# ----------------------------------------------------------------------------- shims


class _ClipShim(types.ModuleType):
  """``jax.numpy`` with the ``jnp.clip(a_min=, a_max=)`` keywords that this jax removed
  (FlaxT5/FlaxLongT5 call ``jnp.clip(x, a_max=...)``: a transformers bug, shimmed here)."""

  def __init__(self):
    super().__init__("jnp_clip_shim")

  def __getattr__(self, name):
    return getattr(jnp, name)

  @staticmethod
  def clip(x, min=None, max=None, *, a_min=None, a_max=None, **kw):
    return jnp.clip(x, a_min if min is None else min, a_max if max is None else max, **kw)


def _split(self, indices_or_sections, axis=0):
  return jnp.split(self, indices_or_sections, axis=axis)


def apply_shims(monkeypatch):
  """The transformers calls this jax no longer accepts, restored for the duration of a
  test: ``jnp.clip(a_max=...)`` (FlaxT5, FlaxLongT5) and the ``Array.split`` method
  (FlaxRoFormer's rotary embedding; the question-answering heads of ALBERT, BigBird,
  DistilBERT, ELECTRA and RoFormer)."""
  from jax._src.array import ArrayImpl
  from transformers.models.longt5 import modeling_flax_longt5
  from transformers.models.t5 import modeling_flax_t5
  shim = _ClipShim()
  monkeypatch.setattr(modeling_flax_t5, "jnp", shim)
  monkeypatch.setattr(modeling_flax_longt5, "jnp", shim)
  for cls in (ArrayImpl, jax.core.Tracer):
    assert not hasattr(cls, "split")  # a jax with Array.split back: drop this shim
    monkeypatch.setattr(cls, "split", _split, raising=False)


@pytest.fixture(autouse=True)
def _transformers_shims(monkeypatch):
  apply_shims(monkeypatch)


# ----------------------------------------------------------------------------- the zoo

B, L = 2, 8
IDS = ((jnp.arange(B * L).reshape(B, L) * 7) % 90 + 3).at[:, -1].set(2)  # eos (2) last
DEC = (jnp.arange(B * 6).reshape(B, 6) * 5) % 90 + 3
TEXT = dict(vocab_size=99, max_position_embeddings=64)
BERTLIKE = dict(TEXT, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=37)
SEQ2SEQ = dict(TEXT, d_model=32, encoder_layers=2, decoder_layers=2,
               encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=37,
               decoder_ffn_dim=37)
DECODER = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
T5 = dict(vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
          relative_attention_num_buckets=8)
VIT = dict(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
           num_attention_heads=4, intermediate_size=37)
W2V = dict(vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
           intermediate_size=37, conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3),
           num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2,
           do_stable_layer_norm=True, feat_extract_norm="layer")  # Flax supports only these
GPT2_DECODER = dict(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                    add_cross_attention=True, is_decoder=True)


def _pixels(n=16):
  return normal((B, 3, n, n))


def _audio(n=400):
  return normal((B, n))


@dataclasses.dataclass(frozen=True)
class Spec:
  """How to build one architecture: ``cls`` (the richest Flax class of the type, task
  heads included, so their kernels are covered too) from ``config()``, run on
  ``inputs()``; ``init`` holds extra constructor arguments."""

  cls: str
  config: Callable
  inputs: Callable
  init: tuple = ()
  remat: bool = False  # model.enable_gradient_checkpointing(): layers under nn.remat


def _cfg(name, **kw):
  return lambda: getattr(T, name)(**kw)


def _text(cls, cfg, **kw):
  return Spec(cls, _cfg(cfg, **kw), lambda: {"input_ids": IDS})


def _s2s(cls, cfg, **kw):
  return Spec(cls, _cfg(cfg, **kw), lambda: {"input_ids": IDS, "decoder_input_ids": DEC})


def _vision(cls, cfg, n=16, **kw):
  return Spec(cls, _cfg(cfg, **kw), lambda: {"pixel_values": _pixels(n)})


# model_type (as the Flax auto mappings name it) -> Spec
ZOO = {
    "albert": _text("FlaxAlbertForPreTraining", "AlbertConfig", embedding_size=16, **BERTLIKE),
    "bart": _s2s("FlaxBartForConditionalGeneration", "BartConfig", **SEQ2SEQ),
    "beit": _vision("FlaxBeitForImageClassification", "BeitConfig",
                    use_relative_position_bias=True, **VIT),
    "bert": _text("FlaxBertForPreTraining", "BertConfig", **BERTLIKE),
    # block-sparse attention: 16 tokens > (5 + 2 * num_random_blocks) * block_size
    "big_bird": Spec("FlaxBigBirdForPreTraining", _cfg(
        "BigBirdConfig", attention_type="block_sparse", block_size=2, num_random_blocks=1,
        **BERTLIKE), lambda: {"input_ids": jnp.tile(IDS, (1, 2))}),
    "blenderbot": _s2s("FlaxBlenderbotForConditionalGeneration", "BlenderbotConfig",
                       **SEQ2SEQ),
    "blenderbot-small": _s2s("FlaxBlenderbotSmallForConditionalGeneration",
                             "BlenderbotSmallConfig", **SEQ2SEQ),
    "bloom": _text("FlaxBloomForCausalLM", "BloomConfig", vocab_size=99, hidden_size=32,
                   n_layer=2, n_head=4),
    "clip": Spec("FlaxCLIPModel", _cfg(
        "CLIPConfig", projection_dim=16, vision_config=dict(VIT),
        text_config=dict(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=37,
                         max_position_embeddings=16)),
        lambda: {"input_ids": IDS, "pixel_values": _pixels()}),
    "dinov2": _vision("FlaxDinov2ForImageClassification", "Dinov2Config", image_size=16,
                      patch_size=4, hidden_size=32, num_hidden_layers=2,
                      num_attention_heads=4, mlp_ratio=2),
    "distilbert": _text("FlaxDistilBertForMaskedLM", "DistilBertConfig", vocab_size=99,
                        dim=32, n_layers=2, n_heads=4, hidden_dim=37,
                        max_position_embeddings=64),
    "electra": _text("FlaxElectraForPreTraining", "ElectraConfig", embedding_size=16,
                     **BERTLIKE),
    "encoder-decoder": Spec("FlaxEncoderDecoderModel", lambda: (
        T.EncoderDecoderConfig.from_encoder_decoder_configs(
            T.BertConfig(**BERTLIKE), T.GPT2Config(**GPT2_DECODER))),
        lambda: {"input_ids": IDS, "decoder_input_ids": DEC}),
    "gemma": _text("FlaxGemmaForCausalLM", "GemmaConfig", head_dim=8,
                   hidden_activation="gelu_pytorch_tanh", **DECODER),
    "gpt2": _text("FlaxGPT2LMHeadModel", "GPT2Config", vocab_size=99, n_embd=32, n_layer=2,
                  n_head=4, n_positions=64),
    "gpt_neo": _text("FlaxGPTNeoForCausalLM", "GPTNeoConfig", vocab_size=99, hidden_size=32,
                     num_layers=2, attention_types=[[["global", "local"], 1]], num_heads=4,
                     intermediate_size=37, window_size=4, max_position_embeddings=64),
    "gptj": _text("FlaxGPTJForCausalLM", "GPTJConfig", vocab_size=99, n_positions=64,
                  n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_inner=37),
    "llama": _text("FlaxLlamaForCausalLM", "LlamaConfig", **DECODER),
    "longt5": _s2s("FlaxLongT5ForConditionalGeneration", "LongT5Config", local_radius=2,
                   global_block_size=4, encoder_attention_type="transient-global", **T5),
    "marian": _s2s("FlaxMarianMTModel", "MarianConfig", decoder_vocab_size=99, **SEQ2SEQ),
    "mbart": _s2s("FlaxMBartForConditionalGeneration", "MBartConfig", **SEQ2SEQ),
    "mistral": _text("FlaxMistralForCausalLM", "MistralConfig", sliding_window=4, **DECODER),
    "mt5": _s2s("FlaxMT5ForConditionalGeneration", "MT5Config", **T5),
    "opt": _text("FlaxOPTForCausalLM", "OPTConfig", vocab_size=99, hidden_size=32,
                 num_hidden_layers=2, ffn_dim=37, num_attention_heads=4,
                 max_position_embeddings=64, word_embed_proj_dim=16),
    "pegasus": _s2s("FlaxPegasusForConditionalGeneration", "PegasusConfig", **SEQ2SEQ),
    "regnet": _vision("FlaxRegNetForImageClassification", "RegNetConfig", n=32,
                      embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1], groups_width=8),
    "resnet": _vision("FlaxResNetForImageClassification", "ResNetConfig", n=32,
                      embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                      layer_type="basic"),
    "roberta": _text("FlaxRobertaForMaskedLM", "RobertaConfig", **BERTLIKE),
    "roberta-prelayernorm": _text("FlaxRobertaPreLayerNormForMaskedLM",
                                  "RobertaPreLayerNormConfig", **BERTLIKE),
    "roformer": _text("FlaxRoFormerForMaskedLM", "RoFormerConfig", **BERTLIKE),
    # input_shape: by default the decoder is initialized on the encoder's output length
    # (beyond its 64 positions)
    "speech-encoder-decoder": Spec("FlaxSpeechEncoderDecoderModel", lambda: (
        T.SpeechEncoderDecoderConfig.from_encoder_decoder_configs(
            T.Wav2Vec2Config(**W2V),
            T.BartConfig(**SEQ2SEQ, is_decoder=True, add_cross_attention=True))),
        lambda: {"inputs": _audio(), "decoder_input_ids": DEC},
        init=(("input_shape", ((1, 400), (1, 6))),)),
    "t5": _s2s("FlaxT5ForConditionalGeneration", "T5Config", **T5),
    "vision-encoder-decoder": Spec("FlaxVisionEncoderDecoderModel", lambda: (
        T.VisionEncoderDecoderConfig.from_encoder_decoder_configs(
            T.ViTConfig(**VIT), T.GPT2Config(**GPT2_DECODER))),
        lambda: {"pixel_values": _pixels(), "decoder_input_ids": DEC}),
    "vision-text-dual-encoder": Spec("FlaxVisionTextDualEncoderModel", lambda: (
        T.VisionTextDualEncoderConfig.from_vision_text_configs(
            T.ViTConfig(**VIT), T.BertConfig(**BERTLIKE), projection_dim=16)),
        lambda: {"input_ids": IDS, "pixel_values": _pixels()}),
    "vit": _vision("FlaxViTForImageClassification", "ViTConfig", **VIT),
    "wav2vec2": Spec("FlaxWav2Vec2Model", _cfg("Wav2Vec2Config", **W2V),
                     lambda: {"input_values": _audio()}),
    "whisper": Spec("FlaxWhisperForConditionalGeneration", _cfg(
        "WhisperConfig", vocab_size=99, num_mel_bins=8, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=37,
        decoder_ffn_dim=37, d_model=32, max_source_positions=8, max_target_positions=16),
        lambda: {"input_features": normal((B, 8, 16)),
                 "decoder_input_ids": DEC}),
    "xglm": _text("FlaxXGLMForCausalLM", "XGLMConfig", vocab_size=99, d_model=32, ffn_dim=37,
                  num_layers=2, attention_heads=4, max_position_embeddings=64),
    "xlm-roberta": _text("FlaxXLMRobertaForMaskedLM", "XLMRobertaConfig", **BERTLIKE),
}

# other code paths of zoo architectures: "<zoo name>+<what>" -> Spec
VARIANTS = {
    "bert+remat": dataclasses.replace(ZOO["bert"], remat=True),
    "t5+remat": dataclasses.replace(ZOO["t5"], remat=True),
    "whisper+remat": dataclasses.replace(ZOO["whisper"], remat=True),
    "longt5+local": _s2s("FlaxLongT5ForConditionalGeneration", "LongT5Config", local_radius=2,
                         encoder_attention_type="local", **T5),
    "resnet+bottleneck": _vision("FlaxResNetForImageClassification", "ResNetConfig", n=32,
                                 embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1],
                                 layer_type="bottleneck"),
}
SPECS = {**ZOO, **VARIANTS}

# model types the mappings name that run as another entry's classes
ALIASES = {"gpt-sw3": "gpt2"}  # GPT-SW3 runs FlaxGPT2Model / FlaxGPT2LMHeadModel

# model types not in the zoo, with the reason
REFUSED: dict[str, str] = {}

# leaves an architecture legitimately densifies under jlr.factorized: {name: {path: why}}
DENSIFIED: dict[str, dict[str, str]] = {}

# blocks (path prefixes) with no LowRank leaf, and why: {name: {prefix regex: why}}
_HEAD = "the 2-way classification head (hidden x 2) is no smaller factorized at the rank floor 8"
_STEM = ("the first feature-extractor conv (10x1x16, one input channel) is no smaller "
         "factorized at the rank floor 8")
DENSE_BLOCKS: dict[str, dict[str, str]] = {
    "regnet": {"params/classifier/1": _HEAD},
    "resnet": {"params/classifier/1": _HEAD},
    "wav2vec2": {"(wav2vec2/)?feature_extractor/conv_layers/0": _STEM},
    "speech-encoder-decoder": {"encoder/feature_extractor/conv_layers/0": _STEM},
}

# factorized kernels no output depends on (zero gradient): {name: {path: why}}
_POOLER = "the encoder's pooler: the model returns the encoder's hidden states only"
UNUSED: dict[str, dict[str, str]] = {
    "encoder-decoder": {"encoder/pooler/dense/kernel": _POOLER},
    "vision-encoder-decoder": {"encoder/pooler/dense/kernel": _POOLER},
}

# classes whose outputs are compared and trained on in part only: {class: (fields, why)}
OUTPUTS: dict[str, tuple[tuple[str, ...], str]] = {
    "FlaxWav2Vec2ForPreTraining": (("projected_states",), (
        "the quantized outputs pick codevectors by a hard argmax (deterministic quantizer): a "
        "float32 rounding flips it (the dense model jitted vs eager differs by 1.44 of "
        "max |projected_quantized_states|), so they are not a function to compare")),
}

ARCHS = sorted(ZOO)
DEFAULT = ("bert", "llama", "resnet")  # also in the default (not slow) run: ~15 s on one core


def _flax_classes() -> dict[str, set[str]]:
  """{model type: the Flax classes its auto mappings name}."""
  out: dict[str, set[str]] = {}
  for attr in dir(modeling_flax_auto):
    if attr.startswith("FLAX_") and attr.endswith("_MAPPING_NAMES"):
      for model_type, cls in getattr(modeling_flax_auto, attr).items():
        out.setdefault(model_type, set()).add(cls)
  return out


def _head_cases() -> list[tuple[str, str]]:
  """(zoo name, class) for every other Flax class the mappings name (task heads, bare
  models), built from its architecture's Spec."""
  cases = {}
  for model_type, classes in sorted(_flax_classes().items()):
    name = ALIASES.get(model_type, model_type)
    if name in ZOO:
      cases.update({cls: name for cls in classes if cls != ZOO[name].cls})
  return sorted((name, cls) for cls, name in cases.items())


HEADS = _head_cases()


# ----------------------------------------------------------------------------- building


def _outputs(out, cls: str):
  """Every floating-point array of a model output, in order (``OUTPUTS`` narrows it)."""
  if cls in OUTPUTS:
    out = tuple(out[k] for k in OUTPUTS[cls][0])
  leaves = jax.tree.leaves(out.to_tuple() if hasattr(out, "to_tuple") else out)
  return tuple(x for x in leaves if jnp.issubdtype(jnp.result_type(x), jnp.floating))


@dataclasses.dataclass
class Built:
  name: str
  model: object
  params: object  # the dense variables (HF's own random init)
  inputs: dict
  fwd: Callable
  layouts: jlr.ModelLayouts
  small: object  # the factorized variables


def _inputs_for(cls, inputs: dict) -> dict:
  """The zoo inputs adapted to a head class: only the arguments its ``__call__`` takes;
  ``(batch, choices, length)`` ids for multiple choice; no ``decoder_input_ids`` for an
  encoder-decoder sequence classifier (it pools the decoder states at the eos tokens of
  ``input_ids``, and derives its decoder inputs from them)."""
  takes = inspect.signature(cls.__call__).parameters
  out = {k: v for k, v in inputs.items() if k in takes}
  if cls.__name__.endswith("ForSequenceClassification"):
    out.pop("decoder_input_ids", None)
  if cls.__name__.endswith("ForMultipleChoice"):
    out = {k: jnp.stack([v, v[:, ::-1]], axis=1) for k, v in out.items()}
  return out


@functools.cache
def built(name: str, cls: str | None = None) -> Built:
  """The architecture ``name`` (a SPECS key) as ``cls`` (default: the Spec's class), with
  its layouts read and its kernels factorized at ``ranks.ratio(0.5)``; built once."""
  spec = SPECS[name]
  klass = getattr(T, cls or spec.cls)
  # HF's own random init (what ``klass(config, seed=0)`` runs), compiled: cheaper than
  # its op-by-op run; the composite models (encoder-decoder, dual encoder) refuse that
  try:
    model = klass(spec.config(), seed=0, _do_init=False, **dict(spec.init))
    params = jax.jit(model.init_weights, static_argnums=1)(jax.random.PRNGKey(0),
                                                           model.input_shape)
  except ValueError as e:
    if "_do_init" not in str(e):
      raise
    model = klass(spec.config(), seed=0, **dict(spec.init))
    params = model.params
  if spec.remat:
    model.enable_gradient_checkpointing()
  inputs = _inputs_for(klass, spec.inputs())

  def fwd(params, inputs):
    return _outputs(model(**inputs, params=params), klass.__name__)

  layouts = jlr.usage.read(fwd, params, inputs)
  small = jlr.factorize(params, ranks.ratio(0.5), layout=layouts)
  return Built(name, model, params, inputs, fwd, layouts, small)


def _lowrank_paths(tree) -> list[str]:
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=jlr.is_lowrank)[0]
  return [path_str(kp) for kp, x in flat if jlr.is_lowrank(x)]


def _rel_err(got, want) -> float:
  errs = [float(jnp.abs(g - w).max() / jnp.maximum(jnp.abs(w).max(), 1e-30))
          for g, w in zip(got, want, strict=True)]
  return max(errs)


def _cases(heads=True, default=DEFAULT):
  """Every zoo architecture (its Spec class), the variants, then (``heads``) every other
  class of the mappings; those in ``default`` also run in the default run."""
  archs = [pytest.param(n, None, id=n, marks=() if n in default else pytest.mark.slow)
           for n in ARCHS + sorted(VARIANTS)]
  return archs + [pytest.param(n, c, id=f"{n}:{c}", marks=pytest.mark.slow)
                  for n, c in HEADS if heads]


def _arch(name: str) -> str:
  return name.split("+")[0]


# ----------------------------------------------------------------------------- checks


def test_zoo_covers_every_flax_model_type():
  """Every model type the Flax auto mappings name is built here, or an alias, or refused
  with a reason (a new transformers version with a new Flax model fails this)."""
  mapped = set(_flax_classes())
  listed = set(ZOO) | set(ALIASES) | set(REFUSED)
  assert mapped - listed == set(), sorted(mapped - listed)
  assert listed - mapped == set(), sorted(listed - mapped)
  assert not set(ZOO) & (set(ALIASES) | set(REFUSED))
  assert set(DEFAULT) <= set(ZOO) and set(ALIASES.values()) <= set(ZOO)
  # every class the mappings name for a zoo architecture is built: as its Spec or a head
  classes = {c for t, cs in _flax_classes().items() if ALIASES.get(t, t) in ZOO for c in cs}
  assert classes == {ZOO[n].cls for n in ZOO} | {c for _, c in HEADS}
  assert all(hasattr(T, c) for c in classes)


def _factorized_and_merged(b: Built, strict: bool):
  """``jlr.factorized(fwd)(small)`` and the reference ``fwd(jlr.merge(small))`` (a plain
  dense forward: no LowRank reaches it), compiled together."""
  both = jax.jit(lambda s, x: (jlr.factorized(b.fwd, strict=strict)(s, x),
                               b.fwd(jlr.merge(s), x)))
  return both(b.small, b.inputs)


@pytest.mark.parametrize("name,cls", _cases())
def test_factorized_equals_merged_and_strict(name, cls):
  """(a) factorized forward == merged dense forward; (c) strict=True unless listed."""
  b = built(name, cls)
  expected = DENSIFIED.get(_arch(name), {})
  if expected:
    with pytest.raises(jlr.DensifiedError):
      _factorized_and_merged(b, strict=True)
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always", jlr.DensifiedWarning)
      got, want = _factorized_and_merged(b, strict=False)
    named = {str(w.message).split(":", 1)[0] for w in caught
             if issubclass(w.category, jlr.DensifiedWarning)}
    assert named == set(expected), (named, expected)
  else:
    got, want = _factorized_and_merged(b, strict=True)
  assert len(got) == len(want) and len(want) >= 1
  err = _rel_err(got, want)
  assert err <= TOL, (name, err)


def _blocks(params) -> set[str]:
  """Kernel path prefixes through their first layer index: ``.../layer/0``, ``h/1``,
  ``block/0`` (T5: attention and MLP sublayers together), ``stages/1``."""
  out = set()
  for kp, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    if jnp.ndim(x) < 2:
      continue
    parts = path_str(kp).split("/")
    i = next((i for i, part in enumerate(parts[:-1]) if part.isdigit()), None)
    if i is not None:
      out.add("/".join(parts[:i + 1]))
  return out


@pytest.mark.parametrize("name,cls", _cases())
def test_every_block_is_factorized(name, cls):
  """(b) every block (a prefix through a layer index) holds LowRank leaves, the same
  kernels in every block of its stack."""
  b = built(name, cls)
  low = _lowrank_paths(b.small)
  count = {blk: sum(p.startswith(blk + "/") for p in low) for blk in _blocks(b.params)}
  assert count, "no layer index found in any kernel path"
  allowed = DENSE_BLOCKS.get(_arch(name), {})
  dense = sorted(blk for blk, n in count.items() if n == 0)
  unexplained = [blk for blk in dense if not any(re.fullmatch(pat, blk) for pat in allowed)]
  assert not unexplained, (unexplained, b.layouts)
  stale = [pat for pat in allowed if not any(re.fullmatch(pat, blk) for blk in dense)]
  assert cls is not None or not stale, stale  # (a head class may lack a listed block)
  # the same kernel (path and shape) in every layer of a stack (layer/0/.../query,
  # layer/1/.../query) is factorized in all of them or in none (blocks listed dense aside)
  seen: dict[tuple, set[bool]] = {}
  for kp, x in jax.tree_util.tree_flatten_with_path(b.params)[0]:
    path = path_str(kp)
    blk = next((blk for blk in count if path.startswith(blk + "/")), None)
    if blk is not None and blk not in dense and jnp.ndim(x) >= 2:
      stack, rel = blk.rsplit("/", 1)[0], path[len(blk):]
      seen.setdefault((stack, rel, jnp.shape(x)), set()).add(path in low)
  assert all(len(v) == 1 for v in seen.values()), sorted(k for k, v in seen.items() if len(v) > 1)


@pytest.mark.parametrize("name,cls", _cases(heads=False, default=("llama",)))
def test_one_adam_step_on_the_factors_lowers_the_loss(name, cls):
  """(d) one jitted adam step on the LowRank factors (all else frozen) lowers a loss
  computed through jlr.factorized."""
  b = built(name, cls)
  run = jlr.factorized(b.fwd, strict=not DENSIFIED.get(_arch(name)))

  def loss_fn(p):
    return sum(jnp.mean(jnp.square(o - 0.5)) for o in run(p, b.inputs))

  tx = optax.multi_transform({"factors": optax.adam(1e-3), "rest": optax.set_to_zero()},
                             jlr.masks.labels(b.small))
  state = tx.init(b.small)

  @jax.jit
  def step(p, s):
    val, g = jax.value_and_grad(loss_fn)(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), val, g

  new, before, grads = step(b.small, state)
  after = step(new, state)[1]  # the loss at the new factors (same compiled step)
  assert float(after) < float(before), (float(before), float(after))
  # the factors with a gradient moved; nothing else did
  old_flat = jax.tree_util.tree_flatten_with_path(b.small, is_leaf=jlr.is_lowrank)[0]
  new_flat = jax.tree.leaves(new, is_leaf=jlr.is_lowrank)
  g_flat = jax.tree.leaves(grads, is_leaf=jlr.is_lowrank)
  dead = set()
  for (kp, x), y, g in zip(old_flat, new_flat, g_flat, strict=True):
    if jlr.is_lowrank(x):
      live = bool(jnp.any(g.u != 0))
      assert np.array_equal(x.u, y.u) != live, path_str(kp)
      if not live:
        dead.add(path_str(kp))
    else:
      assert np.array_equal(x, y), path_str(kp)
  assert dead == set(UNUSED.get(_arch(name), {})), dead


@pytest.mark.parametrize("name,cls", [
    pytest.param(n, None, id=n, marks=() if n == "bert" else pytest.mark.slow)
    for n in ARCHS + sorted(VARIANTS)])
def test_calibration_covers_every_factorized_kernel(name, cls):
  """(e) jlr.stats.activations records the real input of every factorized kernel; the only
  kernels without statistics are the ones with no input to record (an embedding that is
  only looked up), each named in ``.missing`` with that reason -- never silently absent;
  a tied LM head's embedding, met on its columns, has column statistics."""
  b = built(name, cls)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", jlr.stats.MissingStatisticsWarning)
    st = jlr.stats.activations(b.fwd, b.params, [(b.inputs,)], layout=b.layouts)
  for path in _lowrank_paths(b.small):
    if path in st:
      g = st[path]
      m = b.layouts[path].matrix_shape[0 if g.side == "rows" else 1]
      assert g.matrix.shape[-2:] == (m, m) and g.count > 0, path
      assert np.isfinite(g.matrix).all() and (np.diagonal(g.matrix, axis1=-2, axis2=-1) >= 0).all()
    else:
      why = st.missing.get(path, "")
      assert "only looked up" in why, (path, why)
