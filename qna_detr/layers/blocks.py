"""Pre-norm transformer blocks shared by every token mixer (QnA, windowed self-attention)."""
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


class DropPath(nn.Module):
  """Stochastic depth: drops a residual branch for whole samples, rescaling the survivors."""
  rate: float

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    if not train or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(self.make_rng('dropout'), keep, shape)
    return jnp.where(mask, x / keep, 0.0).astype(x.dtype)


class Mlp(nn.Module):
  """Inverted bottleneck FFN: Dense(expansion * C), GELU (tanh approximation), Dense(C)."""
  expansion: int = 4
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    features = x.shape[-1]
    x = nn.Dense(self.expansion * features, dtype=self.dtype, name='fc1')(x)
    return nn.Dense(features, dtype=self.dtype, name='fc2')(nn.gelu(x))


class Block(nn.Module):
  """x + Mix(LN(x)), then x + FFN(LN(x)).

  With `skip` (a 1x1 strided conv), the block changes resolution and width: the mixer must
  stride the same way, and the mixer branch gets no stochastic depth (as released).

  Build `mixer` and `skip` with parent=None so that the block adopts them and their
  parameters live under it ('mixer', 'skip').

  Attributes:
    mixer: token mixer called as mixer(x, padding_mask).
    drop_path: stochastic depth rate of the residual branches.
    skip: optional projection of the shortcut.
  """
  mixer: nn.Module
  drop_path: float = 0.0
  skip: Optional[nn.Module] = None
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, padding_mask: Array, *, train: bool) -> Array:
    mixed = self.mixer(nn.LayerNorm(dtype=self.dtype, name='norm1')(x), padding_mask)
    if self.skip is None:
      x = x + DropPath(self.drop_path, name='drop_path1')(mixed, train=train)
    else:
      x = self.skip(x) + mixed
    ffn = Mlp(dtype=self.dtype, name='mlp')(nn.LayerNorm(dtype=self.dtype, name='norm2')(x))
    return x + DropPath(self.drop_path, name='drop_path2')(ffn, train=train)
