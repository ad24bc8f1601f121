"""A backbone registered from outside the project: three strided convolutions giving the DINO
fixture's levels (16, 24 and 32 channels at strides 8, 16 and 32), for the import tool's test.

Imported through `config.imports = ('levels_plugin',)` with this folder on PYTHONPATH.
"""
import flax.linen as nn

from qna_detr.backbones import registry
from qna_detr.backbones.base import FeatureMap
from qna_detr.layers import masking

NAME = 'fixture_levels'
LEVELS = ((8, 16), (16, 24), (32, 32))  # (stride, channels)


class FixtureLevels(nn.Module):
  """Each level a convolution of the image with a stride-sized kernel."""

  @nn.compact
  def __call__(self, images, padding_mask=None, *, train=False):
    del train
    padded = ~masking.valid_from_padding(padding_mask, images.shape)
    return [FeatureMap(nn.Conv(c, (s, s), strides=s, name=f'level_{i}')(images),
                       padded[:, ::s, ::s]) for i, (s, c) in enumerate(LEVELS)]


if NAME not in registry.names():
  registry.register(NAME, registry.BackboneEntry(build=lambda model_config: FixtureLevels(),
                                                 description='the DINO fixture\'s levels'))
