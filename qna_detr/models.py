"""Builds the detector named by a config: a registered backbone under the DETR head."""
import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from qna_detr.backbones import registry
from qna_detr.detr import DETR

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def compute_dtype(name: str) -> jnp.dtype:
  if name not in DTYPES:
    raise ValueError(f'config.model.dtype must be one of {sorted(DTYPES)}, got {name!r}.')
  return DTYPES[name]


def build_backbone(model_config: ml_collections.ConfigDict) -> nn.Module:
  """The backbone `model_config` names, in its compute dtype and stochastic depth."""
  return registry.build_backbone(model_config.backbone, dtype=compute_dtype(model_config.dtype),
                                 drop_path=model_config.backbone_drop_path)


def build_detr(model_config: ml_collections.ConfigDict, num_classes: int) -> DETR:
  """DETR over `model_config.backbone`; the backbone's params live under 'backbone'."""
  m = model_config
  return DETR(backbone=build_backbone(m), num_classes=num_classes, num_queries=m.num_queries,
              hidden_dim=m.hidden_dim, num_heads=m.num_heads,
              num_encoder_layers=m.num_encoder_layers, num_decoder_layers=m.num_decoder_layers,
              dim_feedforward=m.dim_feedforward, dropout=m.dropout, dtype=compute_dtype(m.dtype),
              aux_loss=m.aux_loss, position_at_input=m.position_at_input,
              feature_level=m.feature_level)
