"""QnA-ViT (supplement section 3, Table 1; the authors' released architecture).

A 4x4 stride-4 patch stem, then four stages. Inside stage i: windowed self-attention blocks,
then QnA blocks, then (except in the last stage) one stride-2 QnA block that doubles width and
heads with a 1x1 stride-2 conv on its shortcut. The feature pyramid is read before each
downsampling block: strides 4, 8, 16 and 32 for the four-stage variants, with their padding
masks.
"""
import dataclasses
import functools
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qna_detr.backbones import base
from qna_detr.backbones import registry
from qna_detr.backbones.base import FeatureMap
from qna_detr.layers import masking
from qna_detr.layers.blocks import Block
from qna_detr.layers import qna
from qna_detr.layers.qna import QnA
from qna_detr.layers.window_attention import WindowAttention

Array = jax.Array
PATCH = 4


@dataclasses.dataclass(frozen=True)
class QnAViTSpec:
  """Per-stage architecture of a QnA-ViT variant (supplement Table 1)."""
  dims: Sequence[int]
  qna_blocks: Sequence[int]
  qna_heads: Sequence[int]
  sa_blocks: Sequence[int]
  sa_windows: Sequence[int]
  sa_heads: Sequence[int]
  drop_path: float
  qna_kernel: int = 3
  num_queries: int = 2

  def drop_path_rates(self) -> list[float]:
    """Stochastic depth rising linearly over every block, downsampling blocks included."""
    total = sum(self.sa_blocks) + sum(self.qna_blocks) + len(self.dims) - 1
    return np.linspace(0.0, self.drop_path, total).tolist()


VARIANTS = {
    'qna_vit_tiny': QnAViTSpec(
        dims=(64, 128, 256, 512), qna_blocks=(2, 3, 2, 0), qna_heads=(8, 16, 32, 64),
        sa_blocks=(0, 0, 4, 2), sa_windows=(7, 7, 14, 7), sa_heads=(2, 4, 8, 16),
        drop_path=0.05),
    # The authors' release with 7 x 7 windows in every QnA layer (82.0% top-1 on ImageNet).
    'qna_vit_tiny_7x7': QnAViTSpec(
        dims=(64, 128, 256, 512), qna_blocks=(2, 3, 2, 0), qna_heads=(8, 16, 32, 64),
        sa_blocks=(0, 0, 4, 2), sa_windows=(7, 7, 14, 7), sa_heads=(2, 4, 8, 16),
        drop_path=0.05, qna_kernel=7),
    'qna_vit_small': QnAViTSpec(
        dims=(64, 128, 256, 512), qna_blocks=(2, 3, 6, 0), qna_heads=(8, 16, 32, 64),
        sa_blocks=(0, 0, 12, 2), sa_windows=(7, 7, 14, 7), sa_heads=(2, 4, 8, 16),
        drop_path=0.2),
    'qna_vit_base': QnAViTSpec(
        dims=(96, 192, 384, 768), qna_blocks=(2, 3, 6, 0), qna_heads=(6, 12, 24, 48),
        sa_blocks=(0, 0, 12, 2), sa_windows=(7, 7, 14, 7), sa_heads=(3, 6, 12, 24),
        drop_path=0.5),
    # Not from the paper: every block kind at CPU size, for the toy dataset and tests. Three
    # stages, so the detector reads stride-16 features (8 x 8 tokens on 128 px images).
    'qna_vit_nano': QnAViTSpec(
        dims=(32, 64, 128), qna_blocks=(1, 2, 2), qna_heads=(4, 8, 16),
        sa_blocks=(0, 0, 2), sa_windows=(7, 7, 8), sa_heads=(1, 2, 4), drop_path=0.0),
}


# Parameter counts of the authors' released ImageNet checkpoints (224 x 224, 1000 classes).
RELEASED_IMAGENET_PARAMS = {
    'qna_vit_tiny': 15_716_000, 'qna_vit_tiny_7x7': 15_753_960, 'qna_vit_small': 24_972_000,
    'qna_vit_base': 55_670_000}


class QnAViT(nn.Module):
  """QnA-ViT feature extractor.

  Attributes:
    spec: the architecture.
    drop_path: overrides spec.drop_path when set (e.g. lower for detection fine-tuning).
    dtype: compute dtype; parameters stay float32.
    qna_implementation: the QnA layers' implementation (`qna_detr.layers.qna.IMPLEMENTATIONS`).
  """
  spec: QnAViTSpec
  drop_path: Optional[float] = None
  dtype: jnp.dtype = jnp.float32
  qna_implementation: str = 'auto'

  @nn.compact
  def __call__(self, images: Array, padding_mask: Optional[Array] = None, *,
               train: bool = False) -> list[FeatureMap]:
    """images: [B, H, W, 3]; padding_mask: [B, H, W] bool, True = padded pixel.

    Returns one FeatureMap per stage (strides 4, 8, 16, ...). Padded positions hold zeros.
    """
    if images.ndim != 4:
      raise ValueError(f'images must have rank 4 [B, H, W, C], got shape {images.shape}.')
    spec = self.spec
    if self.drop_path is not None:
      spec = dataclasses.replace(spec, drop_path=self.drop_path)
    padded = ~masking.valid_from_padding(padding_mask, images.shape)
    # Pad bottom/right to a multiple of the patch: an image alone and inside a padded batch
    # then sees the same patches.
    extra = ((0, 0), (0, -images.shape[1] % PATCH), (0, -images.shape[2] % PATCH))
    x = jnp.pad(jnp.where(padded[..., None], 0.0, images), extra + ((0, 0),))
    padded = jnp.pad(padded, extra, constant_values=True)
    x = nn.Conv(spec.dims[0], (PATCH, PATCH), strides=PATCH, padding='VALID', use_bias=False,
                dtype=self.dtype, name='stem')(x.astype(self.dtype))
    mask = masking.downsample(padded, PATCH)

    rates = iter(spec.drop_path_rates())
    pyramid = []
    for stage, dim in enumerate(spec.dims):
      for i in range(spec.sa_blocks[stage]):
        mixer = WindowAttention(dim, spec.sa_heads[stage], spec.sa_windows[stage],
                                dtype=self.dtype, parent=None)
        x = Block(mixer, next(rates), dtype=self.dtype,
                  name=f'stage{stage + 1}_sa{i + 1}')(x, mask, train=train)
      for i in range(spec.qna_blocks[stage]):
        mixer = QnA(dim, spec.qna_heads[stage], spec.qna_kernel,
                    num_queries=spec.num_queries, dtype=self.dtype,
                    implementation=self.qna_implementation, parent=None)
        x = Block(mixer, next(rates), dtype=self.dtype,
                  name=f'stage{stage + 1}_qna{i + 1}')(x, mask, train=train)
      pyramid.append(FeatureMap(jnp.where(mask[..., None], 0, x), mask))
      if stage + 1 < len(spec.dims):
        mixer = QnA(2 * dim, 2 * spec.qna_heads[stage], spec.qna_kernel, stride=2,
                    num_queries=spec.num_queries, dtype=self.dtype,
                    implementation=self.qna_implementation, parent=None)
        skip = nn.Conv(2 * dim, (1, 1), strides=2, padding='VALID', use_bias=False,
                       dtype=self.dtype, parent=None)
        x = Block(mixer, next(rates), skip=skip, dtype=self.dtype,
                  name=f'stage{stage + 1}_down')(x, mask, train=train)
        mask = masking.downsample(mask, 2)
    return pyramid


class QnAViTClassifier(nn.Module):
  """QnA-ViT with the classification head: LayerNorm, average over real pixels, Dense."""
  spec: QnAViTSpec
  num_classes: int
  drop_path: Optional[float] = None
  dtype: jnp.dtype = jnp.float32
  qna_implementation: str = 'auto'

  @nn.compact
  def __call__(self, images: Array, padding_mask: Optional[Array] = None, *,
               train: bool = False) -> Array:
    last = QnAViT(self.spec, self.drop_path, self.dtype, self.qna_implementation,
                  name='backbone')(
        images, padding_mask, train=train)[-1]
    x = nn.LayerNorm(dtype=self.dtype, name='norm')(last.features).astype(jnp.float32)
    weight = (~last.mask)[..., None].astype(jnp.float32)
    pooled = (x * weight).sum((1, 2)) / jnp.maximum(weight.sum((1, 2)), 1.0)
    return nn.Dense(self.num_classes, name='head')(pooled)


def _check(model_config: registry.ModelConfig) -> None:
  """`dtype`, `qna_implementation` and `backbone_drop_path`, before a run starts."""
  base.compute_dtype(model_config.get('dtype', 'float32'))
  implementation = model_config.get('qna_implementation', 'auto')
  if implementation not in qna.IMPLEMENTATIONS:
    raise ValueError(f'config.model.qna_implementation={implementation!r} is not one of '
                     f'{qna.IMPLEMENTATIONS}.')
  drop_path = model_config.get('backbone_drop_path')
  if drop_path is not None and not 0 <= drop_path < 1:
    raise ValueError(f'config.model.backbone_drop_path={drop_path} must be in [0, 1) (None: '
                     "the variant's rate).")


def _build(spec: QnAViTSpec, model_config: registry.ModelConfig) -> QnAViT:
  """Reads `dtype`, `backbone_drop_path` (None: the variant's rate) and
  `qna_implementation` (`qna_detr.layers.qna.IMPLEMENTATIONS`)."""
  return QnAViT(spec, model_config.get('backbone_drop_path'),
                base.compute_dtype(model_config.get('dtype', 'float32')),
                qna_implementation=model_config.get('qna_implementation', 'auto'))


def _build_classifier(spec: QnAViTSpec, model_config: registry.ModelConfig,
                      num_classes: int) -> QnAViTClassifier:
  return QnAViTClassifier(spec, num_classes, model_config.get('backbone_drop_path'),
                          base.compute_dtype(model_config.get('dtype', 'float32')),
                          qna_implementation=model_config.get('qna_implementation', 'auto'))


for _name, _spec in VARIANTS.items():
  registry.register(_name, registry.BackboneEntry(
      build=functools.partial(_build, _spec),
      build_classifier=functools.partial(_build_classifier, _spec),
      weight_formats=('qna_detr', 'authors'),
      released_params=RELEASED_IMAGENET_PARAMS.get(_name), check=_check,
      description=f'QnA-ViT, dims {tuple(_spec.dims)}, {_spec.qna_kernel} x {_spec.qna_kernel} '
                  'QnA windows'))
