"""DINO (Zhang et al. 2023, "DETR with Improved DeNoising Anchor Boxes"): a multi-scale
deformable DETR with two-stage query selection, contrastive denoising and look forward twice,
as IDEA-Research/DINO computes it (`models/dino/dino.py`, `deformable_transformer.py`).

Levels: each backbone level the detector reads is projected to the hidden width (1x1 conv +
GroupNorm(32)); extra levels come from a stride-2 3x3 conv + GroupNorm, the first on the last
backbone map, the next on the previous extra one. Each level gets the sine code of its
valid pixels (temperature 20) plus a learned level embedding. The mask of an extra level is
the nearest-neighbour resize (torch's rule) of the last backbone level's mask; the reference
resizes the image's mask, which gives the same mask where the padded size is a multiple of
the extra level's stride (they can differ by one row or column elsewhere).

Queries: with `two_stage`, the encoder's output proposes a box per token (`encoder_proposals`)
and the `num_queries` best-scoring ones become the decoder's anchors (detached), with learned
content queries (DINO's mixed query selection); without, anchors and contents are learned.
With `box_refinement`, each decoder layer refines the anchors; with `look_forward_twice`, a
layer's boxes are predicted from the previous layer's undetached refinement. In training,
`dn_number` > 0 prepends contrastive denoising queries (`denoising`).

The switches give DINO's ancestors in DINO's formulation (4-d anchor queries): Deformable
DETR (two_stage=False, box_refinement=False, look_forward_twice=False, dn_number=0), +box
refinement, +two-stage.

Switches and weights aside, names follow the reference so that its checkpoints convert
(`official_weights`).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qna_detr.detectors import base
from qna_detr.detectors.position_encoding import sine_position_encoding
from qna_detr.detectors.dino import denoising
from qna_detr.detectors.dino import transformer as tr
from qna_detr.detectors.dino.denoising import inverse_sigmoid

Array = jax.Array
Outputs = dict[str, Any]
DN_STREAM = 'denoise'  # The PRNG stream of the denoising noise.


def nearest_resize(mask: Array, size: tuple[int, int]) -> Array:
  """torch's `F.interpolate(mode='nearest')` of a [B, h, w] mask: output (i, j) reads input
  (floor(i * h / H), floor(j * w / W))."""
  height, width = mask.shape[1:]
  rows = np.minimum(np.floor(np.arange(size[0]) * (height / size[0])).astype(int), height - 1)
  cols = np.minimum(np.floor(np.arange(size[1]) * (width / size[1])).astype(int), width - 1)
  return mask[:, rows][:, :, cols]


def _prior_bias(num_classes: int):
  """Class logits start at a prior probability of 0.01 (the reference's focal init)."""
  return nn.initializers.constant(-math.log((1 - 0.01) / 0.01))


class DINO(nn.Module):
  """DINO over a backbone's pyramid.

  Attributes:
    backbone: returns a sequence of `FeatureMap`s (increasing stride).
    num_classes: object classes (sigmoid scores, no "no object" logit).
    feature_levels: the backbone levels read (indices, increasing stride).
    num_feature_levels: levels of the transformer: those read plus extra ones.
    hidden_dim, num_heads, num_encoder_layers, num_decoder_layers, dim_feedforward, dropout:
      the transformer's sizes.
    enc_points, dec_points: deformable sampling points per head and level.
    num_queries: matching queries (detections per image before post-processing).
    two_stage, box_refinement, look_forward_twice: see the module doc.
    dn_number, dn_label_noise, dn_box_noise: the denoising queries (`denoising.build`);
      dn_number = 0 turns them off.
    pe_temperature: of the levels' sine position codes.
    dtype: compute dtype; boxes, scores and sampling locations stay float32.
    attention_implementation: of the deformable attention.
  """
  backbone: nn.Module
  num_classes: int
  feature_levels: tuple[int, ...] = (1, 2, 3)
  num_feature_levels: int = 4
  hidden_dim: int = 256
  num_heads: int = 8
  num_encoder_layers: int = 6
  num_decoder_layers: int = 6
  dim_feedforward: int = 2048
  dropout: float = 0.0
  enc_points: int = 4
  dec_points: int = 4
  num_queries: int = 900
  two_stage: bool = True
  box_refinement: bool = True
  look_forward_twice: bool = True
  dn_number: int = 100
  dn_label_noise: float = 0.5
  dn_box_noise: float = 1.0
  pe_temperature: float = 20.0
  dtype: jnp.dtype = jnp.float32
  attention_implementation: str = 'auto'

  def _levels(self, images: Any, padding_mask: Any, train: bool):
    """(projected maps [B, h, w, D], their masks, position codes) of every level."""
    pyramid = base.select_levels(self.backbone(images, padding_mask, train=train),
                                 self.feature_levels)
    norm = lambda name: nn.GroupNorm(num_groups=32, epsilon=1e-5, dtype=self.dtype, name=name)
    srcs, masks = [], []
    for i, level in enumerate(pyramid):
      x = nn.Conv(self.hidden_dim, (1, 1), dtype=self.dtype, name=f'input_proj_{i}_conv',
                  kernel_init=nn.initializers.xavier_uniform())(level.features.astype(self.dtype))
      srcs.append(norm(f'input_proj_{i}_norm')(x))
      masks.append(level.mask)
    last, last_mask = pyramid[-1].features.astype(self.dtype), pyramid[-1].mask
    for i in range(len(pyramid), self.num_feature_levels):
      x = nn.Conv(self.hidden_dim, (3, 3), strides=2, padding=((1, 1), (1, 1)),
                  dtype=self.dtype, name=f'input_proj_{i}_conv',
                  kernel_init=nn.initializers.xavier_uniform())(last)
      srcs.append(norm(f'input_proj_{i}_norm')(x))
      masks.append(nearest_resize(last_mask, x.shape[1:3]))
      last = srcs[-1]
    pos = [sine_position_encoding(m, self.hidden_dim // 2, temperature=self.pe_temperature)
           for m in masks]
    return srcs, masks, pos

  def _select_queries(self, memory: Array, masks, batch: int):
    """(content [B, Q, D], anchors inverse-sigmoid [B, Q, 4] detached, and the encoder's
    outputs for its loss or None)."""
    d = self.hidden_dim
    tgt_embed = self.param('tgt_embed', nn.initializers.normal(1.0), (self.num_queries, d))
    content = jnp.broadcast_to(tgt_embed.astype(self.dtype), (batch, self.num_queries, d))
    if not self.two_stage:
      anchors = self.param('refpoint_embed', nn.initializers.xavier_uniform(),
                           (self.num_queries, 4))
      return content, jnp.broadcast_to(anchors, (batch, self.num_queries, 4)), None
    if memory.shape[1] < self.num_queries:
      raise ValueError(f'config.model.num_queries={self.num_queries} is more than the '
                       f'{memory.shape[1]} tokens of the levels of these images: the '
                       'two-stage selection picks a query per token.')
    output_memory, proposals = tr.encoder_proposals(memory, masks)
    output_memory = tr.dense(d, 'enc_output', self.dtype)(output_memory)
    output_memory = nn.LayerNorm(epsilon=tr.LN_EPS, dtype=self.dtype,
                                 name='enc_output_norm')(output_memory)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name='enc_out_class_embed',
                      bias_init=_prior_bias(self.num_classes))(output_memory)
    logits = logits.astype(jnp.float32)
    deltas = tr.MLP(d, 4, 3, self.dtype, zero_last=True, name='enc_out_bbox_embed')(
        output_memory)
    coords = deltas.astype(jnp.float32) + proposals  # Inverse sigmoid; +inf where unusable.
    _, top = jax.lax.top_k(logits.max(-1), self.num_queries)  # [B, Q]
    gather = lambda x: jnp.take_along_axis(x, top[..., None], 1)
    anchors = gather(coords)
    encoder = {'pred_logits': gather(logits), 'pred_boxes': jax.nn.sigmoid(anchors),
               'selected': top}
    return content, jax.lax.stop_gradient(anchors), encoder

  @nn.compact
  def __call__(self, images: Any, padding_mask: Any, *, train: bool,
               targets: Mapping[str, Array] | None = None) -> Outputs:
    """Detections of every decoder layer (and, in training, of the denoising queries).

    Args:
      images: [B, H, W, 3] normalized (or the levels read, on cached features).
      padding_mask: [B, H, W] True at padded pixels (or the levels' masks).
      train: dropout, the backbone's training mode and, with `targets`, denoising.
      targets: 'boxes' [B, N, 4] cxcywh, 'labels' [B, N], 'box_mask' [B, N]; read in
        training for the denoising queries (their noise from the 'denoise' PRNG stream).

    Returns:
      'pred_logits' [B, Q, C] and 'pred_boxes' [B, Q, 4] (normalized cxcywh) of the last
      layer; 'aux_outputs' of the others; 'interm_outputs' of the encoder's selection
      (two-stage; with 'selected' [B, Q], the token of each query); and in training with
      denoising 'dn_outputs' (per layer, the denoising slots' logits and boxes) and 'dn'
      (`denoising.Queries`).
    """
    base.check_images(images, padding_mask)
    d = self.hidden_dim
    srcs, masks, pos = self._levels(images, padding_mask, train)
    if len(srcs) != self.num_feature_levels:
      raise ValueError(f'{len(srcs)} levels for num_feature_levels={self.num_feature_levels}')
    batch = srcs[0].shape[0]
    shapes = tuple((int(s.shape[1]), int(s.shape[2])) for s in srcs)
    level_embed = self.param('level_embed', nn.initializers.normal(1.0),
                             (self.num_feature_levels, d))
    flat = lambda x: x.reshape(batch, -1, *x.shape[3:])
    src = jnp.concatenate([flat(s) for s in srcs], 1)
    mask = jnp.concatenate([flat(m) for m in masks], 1)
    lvl_pos = jnp.concatenate([flat(p) + level_embed[i] for i, p in enumerate(pos)], 1)
    lvl_pos = lvl_pos.astype(self.dtype)
    ratios = tr.valid_ratios(masks)

    sizes = dict(d_model=d, num_heads=self.num_heads, num_levels=self.num_feature_levels,
                 dim_feedforward=self.dim_feedforward, dropout=self.dropout, dtype=self.dtype,
                 implementation=self.attention_implementation)
    memory = src
    reference = tr.encoder_reference_points(shapes, ratios)
    for i in range(self.num_encoder_layers):
      memory = tr.EncoderLayer(num_points=self.enc_points, name=f'encoder_{i}', **sizes)(
          memory, lvl_pos, reference, shapes, mask, train=train)

    content, anchors, encoder = self._select_queries(memory, masks, batch)
    label_enc = nn.Embed(self.num_classes + 1, d, name='label_enc')
    dn = None
    if train and targets is not None and self.dn_number > 0:
      slots = denoising.num_slots(self.dn_number, targets['labels'].shape[1])
      noise = denoising.draw_noise(self.make_rng(DN_STREAM), batch, slots, self.num_classes)
      dn = denoising.build(targets['boxes'].astype(jnp.float32), targets['labels'],
                           targets['box_mask'], noise, dn_number=self.dn_number,
                           label_noise=self.dn_label_noise, box_noise=self.dn_box_noise,
                           num_queries=self.num_queries)
      dn_content = jnp.where(dn.has_box[..., None], label_enc(dn.labels), 0.0)
      content = jnp.concatenate([dn_content.astype(self.dtype), content], 1)
      anchors = jnp.concatenate([dn.boxes, anchors], 1)
    else:
      label_enc(jnp.zeros((1,), jnp.int32))  # Its parameters exist in every mode.

    class_embed = nn.Dense(self.num_classes, dtype=self.dtype, name='class_embed',
                           bias_init=_prior_bias(self.num_classes))
    bbox_embed = tr.MLP(d, 4, 3, self.dtype, zero_last=True, name='bbox_embed')
    ref_point_head = tr.MLP(d, d, 2, self.dtype, name='ref_point_head')
    decoder_norm = nn.LayerNorm(epsilon=tr.LN_EPS, dtype=self.dtype, name='decoder_norm')
    reference = jax.nn.sigmoid(anchors)
    references, hidden = [reference], []
    tgt = content
    scale = jnp.concatenate([ratios, ratios], -1)[:, None]  # [B, 1, L, 4]
    for i in range(self.num_decoder_layers):
      ref_input = reference[:, :, None] * scale
      query_pos = ref_point_head(tr.sine_box_embedding(ref_input[:, :, 0], d // 2).astype(
          self.dtype))
      tgt = tr.DecoderLayer(num_points=self.dec_points, name=f'decoder_{i}', **sizes)(
          tgt, query_pos, ref_input, memory, shapes, mask,
          None if dn is None else dn.attention_blocked, train=train)
      if self.box_refinement:
        refined = jax.nn.sigmoid(bbox_embed(tgt).astype(jnp.float32)
                                 + inverse_sigmoid(reference))
        reference = jax.lax.stop_gradient(refined)
        references.append(refined if self.look_forward_twice else reference)
      else:
        references.append(reference)
      hidden.append(decoder_norm(tgt))

    layers = []
    for i, h in enumerate(hidden):
      boxes = jax.nn.sigmoid(bbox_embed(h).astype(jnp.float32) + inverse_sigmoid(references[i]))
      layers.append({'pred_logits': class_embed(h).astype(jnp.float32), 'pred_boxes': boxes})
    outputs = _split_denoising(layers, dn)
    if encoder is not None:
      outputs['interm_outputs'] = encoder
    return outputs


def _split_denoising(layers: list[dict[str, Array]], dn) -> Outputs:
  """The matching queries' outputs (last layer, 'aux_outputs'), and the denoising slots'."""
  slots = 0 if dn is None else dn.exists.shape[0]
  matching = [{k: v[:, slots:] for k, v in layer.items()} for layer in layers]
  outputs = {**matching[-1], 'aux_outputs': matching[:-1]}
  if dn is not None:
    outputs['dn_outputs'] = [{k: v[:, :slots] for k, v in layer.items()} for layer in layers]
    outputs['dn'] = dn
  return outputs
