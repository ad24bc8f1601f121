"""The DETR detector: a backbone, a transformer and set-prediction heads.

The parameter tree has the backbone's parameters under the top-level key 'backbone' and the
head's (input projection, transformer, object queries, prediction heads) under the other keys,
so an optimizer can give the two groups their own learning rates by that key.
"""
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from qna_detr.detectors import base
from qna_detr.detectors.position_encoding import sine_position_encoding
from qna_detr.detectors.detr.transformer import Transformer

Outputs = dict[str, Any]


class BoxHead(nn.Module):
  """3-layer ReLU MLP -> sigmoid: normalized (cx, cy, w, h) in float32."""
  hidden_dim: int
  num_layers: int = 3
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.num_layers - 1):
      x = nn.relu(nn.Dense(self.hidden_dim, dtype=self.dtype, name=f'layer_{i}')(x))
    x = nn.Dense(4, dtype=self.dtype, name=f'layer_{self.num_layers - 1}')(x)
    return jax.nn.sigmoid(x.astype(jnp.float32))


class DETR(nn.Module):
  """End-to-end set-prediction detector (Carion et al. 2020) on the last backbone feature map.

  Attributes:
    backbone: called as `backbone(images, padding_mask, train=train)`; returns a sequence of
      `FeatureMap`s ordered by increasing stride.
    num_classes: C object classes with contiguous labels 0..C-1; logit C is "no object".
    num_queries: object queries, i.e. the number of predictions per image.
    hidden_dim: transformer width.
    num_heads, num_encoder_layers, num_decoder_layers, dim_feedforward, dropout: transformer sizes.
    dtype: compute dtype (float32 or bfloat16); parameters and outputs are float32.
    aux_loss: also predict from every decoder layer but the last (for the auxiliary losses).
    position_at_input: also add the position encoding to the projected features once, so that
      the values attention moves around carry where they come from (DETR's "at input"
      variant). The decoder adds position codes to queries and keys only, so its output knows
      absolute positions only through the features; a ResNet's zero padding puts them there,
      a backbone that masks its padding (as QnA-ViT does) does not.
    feature_levels: the one backbone feature map the transformer reads, as a 1-tuple of its
      index in the pyramid ((-1,) = the last, DETR's choice).
  """
  backbone: nn.Module
  num_classes: int
  num_queries: int = 100
  hidden_dim: int = 256
  num_heads: int = 8
  num_encoder_layers: int = 6
  num_decoder_layers: int = 6
  dim_feedforward: int = 2048
  dropout: float = 0.1
  dtype: jnp.dtype = jnp.float32
  aux_loss: bool = True
  position_at_input: bool = True
  feature_levels: tuple[int, ...] = (-1,)

  @nn.compact
  def __call__(self, images: jax.Array, padding_mask: jax.Array, *, train: bool) -> Outputs:
    """Predicts `num_queries` boxes per image.

    Args:
      images: `[B, H, W, 3]` float32, normalized (or the level's features, on features).
      padding_mask: `[B, H, W]` bool, True where the image is padding.
      train: enables dropout and the backbone's training mode.

    Returns:
      `{'pred_logits': [B, Q, C + 1] f32, 'pred_boxes': [B, Q, 4] f32 normalized (cx, cy, w, h)
      relative to each image's unpadded extent, 'aux_outputs': [the same two-key dict for
      decoder layers 1..L-1]}`; 'aux_outputs' is empty without `aux_loss`.
    """
    if self.num_classes < 1:
      raise ValueError(f'num_classes must be >= 1, got {self.num_classes}')
    if self.hidden_dim % 4:
      raise ValueError(f'hidden_dim must be a multiple of 4 (sin/cos pairs for each axis of the '
                       f'position encoding), got {self.hidden_dim}')
    if len(self.feature_levels) != 1:
      raise ValueError(f'DETR reads one feature level, got {self.feature_levels}')
    base.check_images(images, padding_mask)
    pyramid = self.backbone(images, padding_mask, train=train)
    feature_map, = base.select_levels(pyramid, self.feature_levels)
    features, mask = feature_map.features, feature_map.mask
    batch, height, width, _ = features.shape

    src = nn.Dense(self.hidden_dim, dtype=self.dtype, name='input_proj')(features)
    pos = sine_position_encoding(mask, self.hidden_dim // 2)
    if self.position_at_input:
      src = src + pos.astype(src.dtype)
    query_embed = self.param('query_embed', nn.initializers.normal(1.0),
                             (self.num_queries, self.hidden_dim))
    transformer = Transformer(
        d_model=self.hidden_dim, num_heads=self.num_heads,
        num_encoder_layers=self.num_encoder_layers, num_decoder_layers=self.num_decoder_layers,
        dim_feedforward=self.dim_feedforward, dropout=self.dropout, dtype=self.dtype,
        name='transformer')
    tokens = lambda x: x.reshape(batch, height * width, *x.shape[3:])
    hidden = transformer(tokens(src), tokens(mask), tokens(pos), query_embed, train=train)
    if not self.aux_loss:
      hidden = hidden[-1:]

    logits = nn.Dense(self.num_classes + 1, dtype=self.dtype, name='class_embed')(hidden)
    logits = logits.astype(jnp.float32)
    boxes = BoxHead(self.hidden_dim, dtype=self.dtype, name='bbox_embed')(hidden)
    per_layer = [{'pred_logits': l, 'pred_boxes': b} for l, b in zip(logits, boxes)]
    return {**per_layer[-1], 'aux_outputs': per_layer[:-1]}
