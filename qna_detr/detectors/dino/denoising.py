"""Contrastive denoising queries (DINO's `prepare_for_cdn`, IDEA-Research/DINO), static shapes.

In training, DINO adds G groups of noised ground-truth queries to the decoder: in each group
every ground-truth box of an image appears twice, as a positive (box corners moved by less
than half its size times `box_noise`) that learns to reconstruct the box, and as a negative
(moved by one to two half sizes) that learns to say "no object"; labels are replaced by a
random class with probability `label_noise / 2`. With m the most boxes of any image of the
batch, a group is 2m queries wide (positives at [0, m), negatives at [m, 2m), padded where an
image has fewer boxes) and G = 2 * dn_number // (2m) for 2 * dn_number >= 100 (at least one),
else G = 2 * dn_number. Matching queries never see denoising ones, and a group sees no other.

m and G depend on the batch, so here the denoising part has a fixed number of slots
(`num_slots`) of which the first 2mG are DINO's queries in DINO's order (slot s is query s);
the others exist only to keep shapes static: no query sees them, they see only themselves
and no loss reads them. The outputs of DINO's queries are then exactly DINO's.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


class Noise(NamedTuple):
  """The random draws of the denoising queries, per image and slot."""
  flip: Array  # [B, S] uniform in [0, 1): the label is replaced where < label_noise / 2.
  new_label: Array  # [B, S] int: the replacement label.
  sign: Array  # [B, S, 4] in {-1, 1}: the direction each box corner moves.
  amount: Array  # [B, S, 4] uniform in [0, 1): how far, in half sizes (negatives add 1).


class Queries(NamedTuple):
  """The denoising part of the decoder's input, and what its loss needs."""
  labels: Array  # [B, S] int: noised labels (0 where the slot holds no box).
  has_box: Array  # [B, S] bool: the slot is a query of DINO's holding a ground-truth box.
  boxes: Array  # [B, S, 4] inverse-sigmoid noised boxes (0 where no box).
  exists: Array  # [S] bool: the slot is one of DINO's 2mG queries.
  target: Array  # [B, S] int: the ground-truth index a positive slot reconstructs, else -1.
  groups: Array  # scalar int G.
  attention_blocked: Array  # [S + Q, S + Q] bool, True where a query may not see a key.


def num_slots(dn_number: int, max_boxes: int) -> int:
  """Slots that hold DINO's denoising queries for any batch of at most `max_boxes` boxes per
  image."""
  doubled = 2 * dn_number
  return 2 * doubled * max_boxes if doubled < 100 else max(doubled, 2 * max_boxes)


def group_count(dn_number: int, most_boxes: Array) -> Array:
  """DINO's number of groups G for a batch whose fullest image has `most_boxes` boxes."""
  doubled = 2 * dn_number
  if doubled < 100:
    return jnp.asarray(doubled, jnp.int32)
  groups = doubled // jnp.maximum(2 * most_boxes, 1)
  return jnp.where((most_boxes == 0) | (groups == 0), 1, groups).astype(jnp.int32)


def inverse_sigmoid(x: Array, eps: float = 1e-3) -> Array:
  """DINO's: log(x / (1 - x)) with both clipped to at least `eps`."""
  x = jnp.clip(x, 0.0, 1.0)
  return jnp.log(jnp.maximum(x, eps) / jnp.maximum(1.0 - x, eps))


def draw_noise(key: Array, batch: int, slots: int, num_classes: int) -> Noise:
  """The draws DINO makes with torch.rand_like / randint_like, from `key`."""
  keys = jax.random.split(key, 4)
  return Noise(flip=jax.random.uniform(keys[0], (batch, slots)),
               new_label=jax.random.randint(keys[1], (batch, slots), 0, num_classes),
               sign=jax.random.randint(keys[2], (batch, slots, 4), 0, 2).astype(jnp.float32)
               * 2.0 - 1.0,
               amount=jax.random.uniform(keys[3], (batch, slots, 4)))


def _noised_boxes(boxes: Array, sign: Array, amount: Array, negative: Array,
                  box_noise: float) -> Array:
  """cxcywh boxes with each corner moved by sign * amount * half its size * box_noise
  (amount + 1 for negatives), clipped to the image."""
  if box_noise <= 0:
    return boxes
  centre, size = boxes[..., :2], boxes[..., 2:]
  corners = jnp.concatenate([centre - size / 2, centre + size / 2], -1)
  half = jnp.concatenate([size / 2, size / 2], -1)
  amount = amount + negative[..., None].astype(amount.dtype)
  corners = jnp.clip(corners + sign * amount * half * box_noise, 0.0, 1.0)
  return jnp.concatenate([(corners[..., :2] + corners[..., 2:]) / 2,
                          corners[..., 2:] - corners[..., :2]], -1)


def _attention_blocked(group: Array, exists: Array, num_queries: int) -> Array:
  """[S + Q, S + Q]: matching queries see no denoising slot, a slot of DINO's sees its own
  group and the matching queries, any other slot sees only itself."""
  slots = group.shape[0]
  group = jnp.concatenate([group, jnp.full((num_queries,), -1, group.dtype)])
  exists = jnp.concatenate([exists, jnp.zeros((num_queries,), bool)])
  is_slot = jnp.arange(slots + num_queries) < slots
  row_slot, col_slot = is_slot[:, None], is_slot[None, :]
  blocked = (~row_slot & col_slot)  # Matching queries do not see denoising ones.
  other_group = group[:, None] != group[None, :]
  blocked |= row_slot & exists[:, None] & col_slot & (other_group | ~exists[None, :])
  lone = row_slot & ~exists[:, None]
  blocked |= lone & ~jnp.eye(slots + num_queries, dtype=bool)
  return blocked


def build(boxes: Array, labels: Array, box_mask: Array, noise: Noise, *, dn_number: int,
          label_noise: float, box_noise: float, num_queries: int) -> Queries:
  """DINO's contrastive denoising queries of a batch.

  Args:
    boxes: [B, N, 4] ground truth, normalized cxcywh.
    labels: [B, N] int.
    box_mask: [B, N] bool, True for real boxes (the real ones of an image come first).
    noise: the draws, each [B, num_slots(dn_number, N), ...].
    dn_number: DINO's dn_number (100 in its recipe).
    label_noise, box_noise: DINO's dn_label_noise_ratio and dn_box_noise_scale.
    num_queries: matching queries after the denoising ones (for the attention mask).
  """
  batch, max_boxes = labels.shape
  slots = num_slots(dn_number, max_boxes)
  counts = box_mask.sum(-1).astype(jnp.int32)  # [B]
  most = counts.max()
  groups = group_count(dn_number, most)
  width = jnp.maximum(2 * most, 1)
  s = jnp.arange(slots)
  group, within = s // width, s % width
  negative = within >= most
  index = within - jnp.where(negative, most, 0)  # The ground-truth box of the slot.
  exists = (s < 2 * most * groups) & (most > 0)
  has_box = exists[None] & (index[None] < counts[:, None])  # [B, S]
  safe = jnp.minimum(index, max_boxes - 1)
  known_labels = jnp.take_along_axis(labels, jnp.broadcast_to(safe, (batch, slots)), 1)
  known_boxes = jnp.take_along_axis(boxes, jnp.broadcast_to(safe, (batch, slots))[..., None],
                                    1)
  if label_noise > 0:
    known_labels = jnp.where(noise.flip < label_noise * 0.5, noise.new_label, known_labels)
  noised = _noised_boxes(known_boxes, noise.sign, noise.amount, negative[None], box_noise)
  target = jnp.where(has_box & ~negative[None], index[None], -1)
  return Queries(labels=jnp.where(has_box, known_labels, 0), has_box=has_box,
                 boxes=jnp.where(has_box[..., None], inverse_sigmoid(noised), 0.0),
                 exists=exists, target=target, groups=groups,
                 attention_blocked=_attention_blocked(group, exists, num_queries))
