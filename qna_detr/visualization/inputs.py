"""Single images as the detector sees them, with a picture in original pixels to draw on.

Images come from an evaluation pass of a `DetectionDataset`: a split of the config's dataset
or image files (`image_folder.image_files`), through the same evaluation transform.
"""
from collections.abc import Iterator, Mapping
import dataclasses

import numpy as np
from PIL import Image

from qna_detr.data import transforms
from qna_detr.data.pipeline import DetectionDataset


@dataclasses.dataclass(frozen=True)
class Example:
  """One image as a batch of one, and the picture in original pixels."""
  name: str  # For output file names.
  inputs: np.ndarray  # float32 [1, H, W, 3], normalized, 0.0 at padding.
  padding_mask: np.ndarray  # bool [1, H, W], True at padding.
  size: tuple[int, int]  # Resized, unpadded (height, width).
  orig_size: tuple[int, int]  # Original (height, width).
  picture: Image.Image  # RGB, orig_size.


def denormalize(inputs: np.ndarray) -> np.ndarray:
  """ImageNet-normalized float pixels -> uint8 RGB (the inverse of `normalize_image`)."""
  mean = np.asarray(transforms.IMAGENET_MEAN, np.float32)
  std = np.asarray(transforms.IMAGENET_STD, np.float32)
  return np.clip(np.round((inputs * std + mean) * 255.0), 0, 255).astype(np.uint8)


def from_split(dataset: DetectionDataset, num_images: int,
               names: Mapping[int, str] | None = None) -> Iterator[Example]:
  """The first `num_images` real examples of an evaluation dataset.

  The picture is the network input turned back into pixels and resized to the original size
  (the split's sources need not keep image files). Examples are named by `names[image id]`,
  or by the image id.
  """
  count = 0
  for batch in dataset.iterator(fixed_length=False):
    for i in np.flatnonzero(batch['valid']):
      if count == num_images:
        return
      size = tuple(int(v) for v in batch['size'][i])
      orig = tuple(int(v) for v in batch['orig_size'][i])
      pixels = denormalize(batch['inputs'][i, :size[0], :size[1]])
      picture = Image.fromarray(pixels).resize((orig[1], orig[0]), Image.Resampling.BILINEAR)
      image_id = int(batch['image_id'][i])
      name = names[image_id] if names else str(image_id)
      yield Example(name, batch['inputs'][i:i + 1],
                    batch['padding_mask'][i:i + 1], size, orig, picture)
      count += 1
