import jax.numpy as jnp
import numpy as np
import pytest

import jlr
from jlr import select
from jlr.layouts import Layout, Spec


def test_default_select_takes_float_kernels_and_embeddings_only():
  w = jnp.ones((4, 3))
  assert select.default_select("params/Dense_0/kernel", w)
  assert select.default_select("params/Embed_0/embedding", w)
  assert not select.default_select("params/Dense_0/bias", w)
  assert not select.default_select("params/Dense_0/kernel", jnp.ones((4,)))
  assert not select.default_select("params/Dense_0/kernel", jnp.ones((4, 3), jnp.int32))
  assert select.KERNEL_NAMES == ("kernel", "embedding")


def test_selector_normalizes_every_form():
  w = jnp.ones((2, 2))
  assert select.selector(None) is select.default_select
  assert select.selector("Dense_0")("params/Dense_0/bias", w)
  assert not select.selector("Dense_0")("params/Dense_01/kernel", w)
  both = select.selector(["Dense_0", r"Conv_\d+"])
  assert both("a/Conv_3/kernel", w) and both("Dense_0/kernel", w) and not both("x/kernel", w)
  fn = lambda path, leaf: True  # noqa: E731
  assert select.selector(fn) is fn
  with pytest.raises(TypeError, match="select must be"):
    select.selector(3)


def test_leaves_keep_lowrank_whole_and_rebuild_the_tree():
  import jax

  f = jlr.LowRank(jnp.ones((4, 2)), jnp.ones((2, 3)), Layout("dense", (4, 3)))
  tree = {"a": {"kernel": f, "bias": np.zeros(3)}}
  flat, treedef = select.leaves(tree)
  assert [p for p, _ in flat] == ["a/bias", "a/kernel"] and flat[1][1] is f
  assert jax.tree_util.tree_unflatten(treedef, [x for _, x in flat])["a"]["kernel"] is f
  assert not select.is_array(f) and select.is_array(np.zeros(2)) and select.is_array(jnp.ones(2))


def test_layout_for_reads_every_form_and_names_the_path():
  k = jnp.ones((3, 3, 8, 16))
  assert select.layout_for(None, "c/kernel", k) == (Layout("conv_channel", (3, 3, 8, 16), 3), 0)
  assert select.layout_for("conv_spatial", "c/kernel", k)[0].kind == "conv_spatial"
  assert select.layout_for({"c": Spec(kind="conv_spatial")}, "c/kernel", k)[0].kind == \
      "conv_spatial"
  assert select.layout_for(lambda p, x: None, "c/kernel", k)[0].kind == "conv_channel"
  stacked = jnp.ones((2, 4, 5))
  assert select.layout_for(Layout("dense", (4, 5)), "s/kernel", stacked) == \
      (Layout("dense", (4, 5)), 1)
  with pytest.raises(ValueError, match="^s/kernel: layout shape"):
    select.layout_for(Layout("dense", (5, 4)), "s/kernel", stacked)
  with pytest.raises(TypeError, match="^c/kernel: layout must be"):
    select.spec_for(3, "c/kernel", k)


def test_candidates_with_model_layouts_and_a_missing_layout():
  read = jlr.ModelLayouts({"params/d/kernel": Layout("dense", (4, 3))},
                          {"params/e/kernel": "never used"})
  chosen = select.candidates(None, read)
  assert chosen("params/d/kernel", jnp.ones((4, 3)))
  assert not chosen("params/e/kernel", jnp.ones((4, 3)))
  assert select.candidates("e", read)("params/e/kernel", jnp.ones((4, 3)))
  with pytest.raises(ValueError, match=r"^params/e/kernel: no layout read from the model \(never used\)"):
    select.layout_for(read, "params/e/kernel", jnp.ones((4, 3)))
