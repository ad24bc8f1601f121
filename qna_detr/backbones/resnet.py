"""ResNet-50 with frozen batch norm: DETR's backbone (torchvision's ResNet v1.5).

A 7x7 stride-2 stem conv and a 3x3 stride-2 max pool, then four stages of bottleneck blocks
(1x1, 3x3, 1x1 convs; the stride sits on the 3x3 conv, and the first block of every stage
projects its shortcut with a 1x1 conv). Convs have no bias. Batch norm is DETR's
FrozenBatchNorm2d: fixed statistics, stored here folded into a per-channel affine, so no batch
statistics exist to keep or update. The pyramid is the four stage outputs, at strides 4, 8,
16 and 32.

Parameter names follow torchvision's, with flax separators: 'conv1', 'bn1', then
'layer{stage}_{block}' (e.g. 'layer2_0') holding 'conv1'..'conv3', 'bn1'..'bn3' and, on the
first block of a stage, 'downsample_conv' and 'downsample_bn'.
"""
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from qna_detr.backbones import base
from qna_detr.backbones import registry
from qna_detr.backbones.base import FeatureMap
from qna_detr.layers import masking

Array = jax.Array
BN_EPS = 1e-5  # torchvision's BatchNorm2d and DETR's FrozenBatchNorm2d.
EXPANSION = 4  # Bottleneck output width / inner width.
RESNET50_DEPTHS = (3, 4, 6, 3)
STEM_WIDTH = 64
# DETR trains the backbone's layer2-4 convs only; the stem and layer1 stay as pretrained.
TRAINED_STAGES = ('layer2', 'layer3', 'layer4')

# torchvision's initialization (kaiming_normal_, mode='fan_out', relu).
_conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


class FrozenBatchNorm(nn.Module):
  """Batch norm with fixed statistics, as `y = x * scale + bias` per channel.

  `scale = gamma / sqrt(var + eps)` and `bias = beta - mean * scale` fold a pretrained batch
  norm (`fold_batch_norm`); the initial (1, 0) is the identity.
  """
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    channels = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (channels,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (channels,), jnp.float32)
    return x * scale.astype(self.dtype) + bias.astype(self.dtype)


def fold_batch_norm(gamma, beta, mean, var, eps: float = BN_EPS):
  """(scale, bias) of FrozenBatchNorm equal to batch norm with these statistics."""
  scale = gamma / (var + eps) ** 0.5
  return scale, beta - mean * scale


def _conv(features: int, kernel: int, stride: int, dtype: jnp.dtype, name: str) -> nn.Conv:
  """A bias-free conv padded like torchvision's (kernel // 2 on every side)."""
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), strides=stride, padding=((pad, pad), (pad, pad)),
                 use_bias=False, kernel_init=_conv_init, dtype=dtype, name=name)


class Bottleneck(nn.Module):
  """ResNet v1.5 bottleneck: 1x1 -> 3x3 (strided) -> 1x1 (x4 wide), plus the shortcut."""
  width: int
  stride: int = 1
  downsample: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    bn = lambda name: FrozenBatchNorm(self.dtype, name=name)
    y = nn.relu(bn('bn1')(_conv(self.width, 1, 1, self.dtype, 'conv1')(x)))
    y = nn.relu(bn('bn2')(_conv(self.width, 3, self.stride, self.dtype, 'conv2')(y)))
    y = bn('bn3')(_conv(self.width * EXPANSION, 1, 1, self.dtype, 'conv3')(y))
    if self.downsample:
      x = _conv(self.width * EXPANSION, 1, self.stride, self.dtype, 'downsample_conv')(x)
      x = bn('downsample_bn')(x)
    return nn.relu(y + x)


class ResNet(nn.Module):
  """Bottleneck ResNet feature extractor with frozen batch norm.

  Attributes:
    depths: blocks per stage; (3, 4, 6, 3) is ResNet-50.
    dtype: compute dtype; parameters stay float32.
  """
  depths: Sequence[int] = RESNET50_DEPTHS
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, images: Array, padding_mask: Optional[Array] = None, *,
               train: bool = False) -> list[FeatureMap]:
    """images: [B, H, W, 3]; padding_mask: [B, H, W] bool, True = padded pixel.

    Returns one FeatureMap per stage (strides 4, 8, 16, 32; 256 << stage channels). As in
    DETR, padded pixels go through the convs like real ones (the pipeline sets them to zero),
    so padded positions of the features are not zero. `train` changes nothing: the batch norm
    is frozen and there is no dropout.
    """
    del train
    if images.ndim != 4:
      raise ValueError(f'images must have rank 4 [B, H, W, C], got shape {images.shape}.')
    padded = ~masking.valid_from_padding(padding_mask, images.shape)
    x = _conv(STEM_WIDTH, 7, 2, self.dtype, 'conv1')(images.astype(self.dtype))
    x = nn.relu(FrozenBatchNorm(self.dtype, name='bn1')(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    stride, pyramid = 4, []
    for stage, depth in enumerate(self.depths):
      for block in range(depth):
        first = block == 0
        x = Bottleneck(STEM_WIDTH << stage, stride=2 if first and stage else 1,
                       downsample=first, dtype=self.dtype,
                       name=f'layer{stage + 1}_{block}')(x)
      # Every strided layer gives ceil(size / 2) rows, as the mask's every-s-th row does
      # (DETR's nearest-neighbour resize of the mask, when sizes are multiples of s).
      pyramid.append(FeatureMap(x, masking.downsample(padded, stride)))
      stride *= 2
    return pyramid


def frozen_param(path: tuple[str, ...]) -> bool:
  """Whether DETR keeps a backbone parameter fixed: every batch-norm scale and bias, and the
  stem and layer1 entirely.

  path: the parameter's keys inside the backbone's own tree, e.g. ('layer1_0', 'conv1',
  'kernel').
  """
  return batch_norm_leaf(path) or not path[0].startswith(TRAINED_STAGES)


def batch_norm_leaf(path: tuple[str, ...]) -> bool:
  """Whether a leaf is a frozen batch norm's (torch keeps those as buffers)."""
  return 'bn' in path[-2]


class ResNetClassifier(nn.Module):
  """ResNet with the ImageNet head: average over the real pixels of the last map, Dense."""
  num_classes: int
  depths: Sequence[int] = RESNET50_DEPTHS
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, images: Array, padding_mask: Optional[Array] = None, *,
               train: bool = False) -> Array:
    last = ResNet(self.depths, self.dtype, name='backbone')(
        images, padding_mask, train=train)[-1]
    weight = (~last.mask)[..., None].astype(jnp.float32)
    pooled = (last.features.astype(jnp.float32) * weight).sum((1, 2))
    pooled = pooled / jnp.maximum(weight.sum((1, 2)), 1.0)
    return nn.Dense(self.num_classes, name='head')(pooled)


TORCHVISION_RESNET50_PARAMS = 25_557_032  # With its 1000-class head.


def _build(model_config: registry.ModelConfig) -> ResNet:
  """Reads `dtype`."""
  return ResNet(dtype=base.compute_dtype(model_config.get('dtype', 'float32')))


def _build_classifier(model_config: registry.ModelConfig, num_classes: int) -> ResNetClassifier:
  return ResNetClassifier(num_classes,
                          dtype=base.compute_dtype(model_config.get('dtype', 'float32')))


registry.register('resnet50', registry.BackboneEntry(
    build=_build, build_classifier=_build_classifier,
    weight_formats=('qna_detr', 'torchvision'), frozen=frozen_param,
    released_params=TORCHVISION_RESNET50_PARAMS,
    check=lambda model_config: base.compute_dtype(model_config.get('dtype', 'float32')),
    buffer=batch_norm_leaf,
    description='ResNet-50 with frozen batch norm (DETR\'s backbone)'))
