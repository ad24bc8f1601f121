"""Writes the synthetic shapes dataset in COCO format.

  python tools/make_toy_coco.py --output=DIR --train=N --val=M [--image_size=S] [--seed=K]

Layout: DIR/annotations/instances_{train,val}.json and the images in DIR/{train,val}/.
The same seed gives the same dataset.
"""

from absl import flags

from qna_detr.data import toy
from qna_detr.utils import runtime

_OUTPUT = flags.DEFINE_string('output', None, 'Output folder.', required=True)
_TRAIN = flags.DEFINE_integer('train', 1000, 'Number of training images.', lower_bound=0)
_VAL = flags.DEFINE_integer('val', 100, 'Number of validation images.', lower_bound=0)
_IMAGE_SIZE = flags.DEFINE_integer('image_size', 128, 'Longer side of the images.',
                                   lower_bound=32)
_SEED = flags.DEFINE_integer('seed', 0, 'Random seed.')


def main(argv: list[str]) -> None:
  del argv
  written = toy.make_toy_coco(_OUTPUT.value, num_train=_TRAIN.value, num_val=_VAL.value,
                              image_size=_IMAGE_SIZE.value, seed=_SEED.value)
  for key, path in written.items():
    print(f'{key}: {path}')


if __name__ == '__main__':
  runtime.run_app(main)
