"""DETR's encoder-decoder transformer (post-norm, as in Carion et al. 2020).

Position encodings are added to the queries and keys of every attention layer but never to the
values, so the content that attention moves around stays free of position codes; padded
positions are excluded as keys everywhere. The decoder returns every layer's output after one
shared final LayerNorm, which the auxiliary losses use.
"""
import jax
import jax.numpy as jnp
from flax import linen as nn

# torch.nn.LayerNorm's default, which the reference DETR uses.
_LN_EPS = 1e-5


class _FeedForward(nn.Module):
  """Linear -> ReLU -> dropout -> linear."""
  d_model: int
  dim_feedforward: int
  dropout: float
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    dense = lambda features, name: nn.Dense(
        features, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform(), name=name)
    x = nn.relu(dense(self.dim_feedforward, 'linear1')(x))
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    return dense(self.d_model, 'linear2')(x)


class _Attention(nn.Module):
  """Multi-head attention whose keys may be masked by a padding mask."""
  num_heads: int
  dropout: float
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, query: jax.Array, key: jax.Array, value: jax.Array,
               key_padding_mask: jax.Array | None, *, train: bool) -> jax.Array:
    mask = None
    if key_padding_mask is not None:
      mask = jnp.logical_not(key_padding_mask)[:, None, None, :]  # [B, 1, 1, K]: True attends.
    return nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype, dropout_rate=self.dropout,
        kernel_init=nn.initializers.xavier_uniform(), force_fp32_for_softmax=True,
        name='attn')(query, key, value, mask=mask, deterministic=not train)


class _Residual(nn.Module):
  """`LayerNorm(x + dropout(branch))`: the post-norm residual wrapper."""
  dropout: float
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x: jax.Array, branch: jax.Array, *, train: bool) -> jax.Array:
    branch = nn.Dropout(self.dropout)(branch, deterministic=not train)
    return nn.LayerNorm(epsilon=_LN_EPS, dtype=self.dtype, name='norm')(x + branch)


class _Layer(nn.Module):
  """Sizes and sub-layer builders shared by the encoder and decoder layers."""
  d_model: int
  num_heads: int
  dim_feedforward: int
  dropout: float
  dtype: jnp.dtype = jnp.float32

  def residual(self, name: str) -> _Residual:
    return _Residual(self.dropout, self.dtype, name=name)

  def attention(self, name: str) -> _Attention:
    return _Attention(self.num_heads, self.dropout, self.dtype, name=name)

  def ffn(self) -> _FeedForward:
    return _FeedForward(self.d_model, self.dim_feedforward, self.dropout, self.dtype, name='ffn')


class EncoderLayer(_Layer):
  """Self-attention over the image tokens, then a feed-forward block."""

  @nn.compact
  def __call__(self, src: jax.Array, pos: jax.Array, padding_mask: jax.Array, *,
               train: bool) -> jax.Array:
    q = k = src + pos
    attended = self.attention('self_attn')(q, k, src, padding_mask, train=train)
    src = self.residual('residual1')(src, attended, train=train)
    return self.residual('residual2')(src, self.ffn()(src, train=train), train=train)


class DecoderLayer(_Layer):
  """Self-attention among the object queries, cross-attention to the image, feed-forward."""

  @nn.compact
  def __call__(self, tgt: jax.Array, memory: jax.Array, pos: jax.Array, query_pos: jax.Array,
               memory_padding_mask: jax.Array, *, train: bool) -> jax.Array:
    q = k = tgt + query_pos
    attended = self.attention('self_attn')(q, k, tgt, None, train=train)
    tgt = self.residual('residual1')(tgt, attended, train=train)
    attended = self.attention('cross_attn')(
        tgt + query_pos, memory + pos, memory, memory_padding_mask, train=train)
    tgt = self.residual('residual2')(tgt, attended, train=train)
    return self.residual('residual3')(tgt, self.ffn()(tgt, train=train), train=train)


class Transformer(nn.Module):
  """Encoder over image tokens, decoder over object queries (`DETR` holds the default sizes).

  Attributes:
    d_model: token width.
    num_heads: attention heads; must divide `d_model`.
    num_encoder_layers: encoder depth (may be 0).
    num_decoder_layers: decoder depth (>= 1).
    dim_feedforward: hidden width of the feed-forward blocks.
    dropout: dropout rate on attention weights and every residual branch.
    dtype: compute dtype; parameters stay float32.
  """
  d_model: int
  num_heads: int
  num_encoder_layers: int
  num_decoder_layers: int
  dim_feedforward: int
  dropout: float
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, src: jax.Array, padding_mask: jax.Array, pos: jax.Array,
               query_pos: jax.Array, *, train: bool) -> jax.Array:
    """Runs the encoder and decoder.

    Args:
      src: `[B, S, d_model]` image tokens.
      padding_mask: `[B, S]` bool, True for padded tokens (never attended to).
      pos: `[B, S, d_model]` position encodings of the tokens.
      query_pos: `[Q, d_model]` learned object-query embeddings.
      train: enables dropout (needs the 'dropout' rng).

    Returns:
      `[L, B, Q, d_model]`: the normalized output of every decoder layer, the last one last.
    """
    if self.d_model % self.num_heads:
      raise ValueError(f'num_heads={self.num_heads} must divide d_model={self.d_model}')
    if self.num_decoder_layers < 1:
      raise ValueError(f'num_decoder_layers must be >= 1, got {self.num_decoder_layers}')
    sizes = dict(d_model=self.d_model, num_heads=self.num_heads,
                 dim_feedforward=self.dim_feedforward, dropout=self.dropout, dtype=self.dtype)
    src, pos = src.astype(self.dtype), pos.astype(self.dtype)
    memory = src
    for i in range(self.num_encoder_layers):
      memory = EncoderLayer(**sizes, name=f'encoder_{i}')(memory, pos, padding_mask, train=train)

    query_pos = jnp.broadcast_to(query_pos.astype(self.dtype), (src.shape[0], *query_pos.shape))
    tgt = jnp.zeros_like(query_pos)
    final_norm = nn.LayerNorm(epsilon=_LN_EPS, dtype=self.dtype, name='decoder_norm')
    outputs = []
    for i in range(self.num_decoder_layers):
      tgt = DecoderLayer(**sizes, name=f'decoder_{i}')(
          tgt, memory, pos, query_pos, padding_mask, train=train)
      outputs.append(final_norm(tgt))
    return jnp.stack(outputs)
