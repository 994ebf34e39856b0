"""A CIFAR-style ResNet (He et al. 2016, Sec. 4.2) for 28x28 grey images, in flax.linen.

The layout TRP reports on (Xu et al., arXiv 1812.02402): a 3x3 stem conv with 16
channels, three stages of ``n`` basic blocks (two 3x3 convs each, BatchNorm, ReLU) with
16, 32 and 64 channels and strides 1, 2, 2, global average pooling and one Dense
classifier; ``depth = 6 n + 2`` (ResNet-20: n = 3, ResNet-32: n = 5). Shortcuts that
change shape are 1x1 strided convs with BatchNorm (option B). On 28x28 inputs the stages
run at 28, 14 and 7 pixels.

Parameter names, used by the examples' ``select`` patterns:

* ``stem/kernel`` -- the first conv (TRP leaves it dense);
* ``stage{s}_block{b}/conv{1,2}/kernel`` -- the 3x3 convs TRP decomposes;
* ``stage{s}_block{b}/shortcut/kernel`` -- 1x1 projections (left dense);
* ``head/kernel`` -- the classifier (left dense).

Run unchanged with factorized kernels through ``jlr.flax.apply``.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

# The 3x3 convs of the residual blocks: what TRP decomposes (stem, 1x1 shortcuts and the
# classifier stay dense, as in the reference).
BLOCK_CONVS = r"stage\d+_block\d+/conv\d"


class BasicBlock(nn.Module):
  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x, train: bool):
    norm = lambda name: nn.BatchNorm(use_running_average=not train, momentum=0.9, name=name)  # noqa: E731
    y = nn.Conv(self.features, (3, 3), self.strides, use_bias=False, name="conv1")(x)
    y = nn.relu(norm("bn1")(y))
    y = nn.Conv(self.features, (3, 3), 1, use_bias=False, name="conv2")(y)
    y = norm("bn2")(y)
    if self.strides != 1 or x.shape[-1] != self.features:
      x = nn.Conv(self.features, (1, 1), self.strides, use_bias=False, name="shortcut")(x)
      x = norm("shortcut_bn")(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """CIFAR ResNet of ``depth = 6 n + 2`` layers; ``width`` scales the channels (16, 32, 64)."""

  depth: int = 20
  width: int = 16
  classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    if (self.depth - 2) % 6:
      raise ValueError(f"a CIFAR ResNet has depth 6n + 2 (20, 32, 44, ...), got {self.depth}")
    n = (self.depth - 2) // 6
    x = nn.Conv(self.width, (3, 3), use_bias=False, name="stem")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, name="stem_bn")(x))
    for s, mult in enumerate((1, 2, 4)):
      for b in range(n):
        strides = 2 if (s > 0 and b == 0) else 1
        x = BasicBlock(self.width * mult, strides, name=f"stage{s}_block{b}")(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.classes, name="head")(x)
