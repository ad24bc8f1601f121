"""ImageNet-style classification with a backbone's classifier and pretrained weights.

  python tools/classify.py --backbone=qna_vit_tiny --checkpoint=/path/to/checkpoint_300 \\
      --images=a.jpg,b.jpg [--top=5] [--logits=logits.npy]
  python tools/classify.py --backbone=resnet50 --checkpoint=resnet50.pth --images=a.jpg

Loads the whole classifier (backbone, final norm and head) from a checkpoint in any format the
backbone reads (`qna_detr.backbones.weights`), so that a converted checkpoint can be checked
against its source: the same images should get the same top classes and logits as the source
code gives them. Images are resized (shorter side --resize, bilinear) and centre-cropped to
--crop, then ImageNet-normalized.
"""
import logging

from absl import flags
import jax
import numpy as np
from PIL import Image

from qna_detr import backbones  # noqa: F401  (registers the backbones)
from qna_detr.backbones import registry
from qna_detr.backbones import weights
from qna_detr.data import transforms
from qna_detr.utils import runtime

_BACKBONE = flags.DEFINE_enum('backbone', 'qna_vit_tiny', registry.names(), 'Backbone.')
_CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'Pretrained classifier.', required=True)
_FORMAT = flags.DEFINE_enum('format', 'auto', weights.FORMATS, 'Checkpoint format.')
_IMAGES = flags.DEFINE_list('images', [], 'Image files.')
_NUM_CLASSES = flags.DEFINE_integer('num_classes', 1000, 'Classes of the head.')
_RESIZE = flags.DEFINE_integer('resize', 256, 'Shorter side before the crop.')
_CROP = flags.DEFINE_integer('crop', 224, 'Side of the centre crop.')
_TOP = flags.DEFINE_integer('top', 5, 'Classes printed per image.')
_LOGITS = flags.DEFINE_string('logits', None, 'Also save the logits [N, classes] (.npy).')
logger = logging.getLogger('qna_detr.tools.classify')


def preprocess(path: str, resize: int, crop: int) -> np.ndarray:
  """[crop, crop, 3] float32, ImageNet-normalized."""
  image = Image.open(path).convert('RGB')
  scale = resize / min(image.size)
  image = image.resize((max(crop, round(image.width * scale)),
                        max(crop, round(image.height * scale))), Image.Resampling.BILINEAR)
  left, top = (image.width - crop) // 2, (image.height - crop) // 2
  pixels = np.asarray(image.crop((left, top, left + crop, top + crop)), np.float32) / 255.0
  return (pixels - np.asarray(transforms.IMAGENET_MEAN)) / np.asarray(transforms.IMAGENET_STD)


def main(argv):
  del argv
  model = registry.build_classifier({'backbone': _BACKBONE.value}, _NUM_CLASSES.value)
  images = np.stack([preprocess(p, _RESIZE.value, _CROP.value) for p in _IMAGES.value])
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), images[:1])['params']
  params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), params)
  params, report = weights.load_classifier(params, _CHECKPOINT.value, _FORMAT.value,
                                           _BACKBONE.value)
  if report.missing:
    logger.warning('Not in the checkpoint, left at zero: %s', report.missing[:10])
  logits = np.asarray(jax.jit(lambda p, x: model.apply({'params': p}, x))(params, images))
  for path, row in zip(_IMAGES.value, logits):
    top = np.argsort(-row)[:_TOP.value]
    print(path, ' '.join(f'{c}:{row[c]:.3f}' for c in top))
  if _LOGITS.value:
    np.save(_LOGITS.value, logits)


if __name__ == '__main__':
  runtime.run_app(main)
