"""SASA: stand-alone self-attention over each pixel's own k x k neighbourhood.

Ramachandran et al., "Stand-Alone Self-Attention in Vision Models" (NeurIPS 2019), the local
attention baseline of the QnA paper. Every pixel has its own query, so the keys and values of
its neighbourhood are gathered per pixel: k^2 copies of K and V, which is the time and memory
QnA's shared learned queries avoid. Kept as a real layer so baselines and benchmarks use one
definition.
"""
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qna_detr.layers import masking
from qna_detr.layers import windows

Array = jax.Array


class SASA(nn.Module):
  """Local self-attention: each pixel attends its k x k neighbourhood with its own query.

  Out-of-image and padded positions are left out of every softmax; a pixel whose whole
  neighbourhood is padding outputs zeros (as QnA does).

  Attributes:
    features: channels D (input and output); heads * head dim.
    heads: attention heads h.
    kernel_size: odd neighbourhood size k.
    dtype: compute dtype; logits and softmax run in float32.
  """
  features: int
  heads: int
  kernel_size: int = 7
  dtype: jnp.dtype = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x: Array, padding_mask: Optional[Array] = None) -> Array:
    """x: [B, H, W, C]; padding_mask: [B, H, W] bool, True = padded (never attended to)."""
    if self.heads < 1 or self.features % self.heads:
      raise ValueError(f'features ({self.features}) must be a positive multiple of heads '
                       f'({self.heads}).')
    if self.kernel_size < 1 or self.kernel_size % 2 == 0:
      raise ValueError(f'kernel_size must be a positive odd integer, got {self.kernel_size}.')
    if x.ndim != 4:
      raise ValueError(f'x must have rank 4 [B, H, W, C], got shape {x.shape}.')
    valid = masking.valid_from_padding(padding_mask, x.shape)
    k, nh = self.kernel_size, self.heads
    hd = self.features // nh

    def project(name: str) -> Array:
      y = nn.Dense(self.features, use_bias=False, dtype=self.dtype,
                   kernel_init=self.kernel_init, name=name)(x.astype(self.dtype))
      return y.reshape(*y.shape[:3], nh, hd)

    q, keys, values = project('to_q'), project('to_k'), project('to_v')
    # Heads before the neighbourhood: the layout both einsums contract in, so the k^2-fold
    # gathered tensors are not transposed again (that copy would add to the peak memory).
    keys = windows.gather(keys, k, axis=4)  # [B, H, W, h, k*k, d]
    values = windows.gather(values, k, axis=4)
    key_valid = windows.gather(valid, k, fill=False, axis=3)  # [B, H, W, k*k]

    bias = self.param('rpe_bias', nn.initializers.zeros, (k, k, nh)).reshape(k * k, nh)
    logits = jnp.einsum('bywhd,bywhnd->bywhn', q / np.sqrt(hd).astype(q.dtype), keys,
                        preferred_element_type=jnp.float32) + bias.T
    present = key_valid[:, :, :, None, :]
    logits = jnp.where(present, logits, jnp.finfo(jnp.float32).min)
    # Zero weights for absent keys also zero the output of an all-padding neighbourhood.
    attn = jnp.where(present, jax.nn.softmax(logits, axis=-1), 0.0).astype(self.dtype)
    out = jnp.einsum('bywhn,bywhnd->bywhd', attn, values).reshape(*x.shape[:3], self.features)
    return nn.Dense(self.features, use_bias=False, dtype=self.dtype,
                    kernel_init=self.kernel_init, name='to_out')(out)
