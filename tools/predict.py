"""Runs a trained detector on image files.

  python tools/predict.py --workdir=workdirs/toy --images=a.jpg,b.png --output=predictions
  python tools/predict.py --workdir=workdirs/toy --image_dir=photos --output=predictions \\
      [--checkpoint=workdirs/toy/checkpoints/6000] [--threshold=0.5]

Writes to --output: predictions.json (COCO results: image_id, category_id, bbox as x, y,
width, height in original pixels, score; plus file_name) of the detections scoring >=
--threshold, and NAME_detections.png per image with its boxes, class and score. Files of
--image_dir that are not readable images are skipped and listed.
"""
import json
import logging
import os

from absl import flags
from PIL import Image

from qna_detr import inference
from qna_detr.data import image_folder
from qna_detr.utils import runtime
from qna_detr.visualization import drawing

_WORKDIR = flags.DEFINE_string('workdir', None, 'The training run\'s workdir.', required=True)
_CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'A checkpoint step directory; default: '
                                  'the newest intact one in the workdir.')
_IMAGES = flags.DEFINE_list('images', None, 'Image files.')
_IMAGE_DIR = flags.DEFINE_string('image_dir', None, 'A folder of images (not its subfolders).')
_OUTPUT = flags.DEFINE_string('output', None, 'Where to write the results.', required=True)
_THRESHOLD = flags.DEFINE_float('threshold', 0.5, 'Smallest score of a kept detection.')
flags.mark_flags_as_mutual_exclusive(['images', 'image_dir'], required=True)
logger = logging.getLogger('qna_detr.tools.predict')


def image_paths(images: list[str], image_dir: str | None) -> list[str]:
  """The files to run on: --images as given, or the readable images of --image_dir."""
  if not image_dir:
    return images
  source, skipped = image_folder.image_folder(image_dir)
  if skipped:
    logger.warning('Skipped %d file(s) of %s:\n  %s', len(skipped), image_dir,
                   '\n  '.join(skipped))
  return [os.path.join(image_dir, im['file_name']) for im in source.ground_truth()['images']]


def predict(workdir: str, checkpoint: str | None, paths: list[str], output: str,
            threshold: float) -> list[dict]:
  detector = inference.Detector.from_workdir(workdir, checkpoint)
  found = detector(paths, score_threshold=threshold)
  os.makedirs(output, exist_ok=True)
  results = []
  for image_id, (path, detections) in enumerate(zip(paths, found)):
    xywh = detections.boxes.copy()
    xywh[:, 2:] -= xywh[:, :2]
    results += [{'image_id': image_id, 'file_name': path, 'category_id': int(category),
                 'bbox': [float(v) for v in box], 'score': float(score)}
                for box, score, category in zip(xywh, detections.scores,
                                                detections.category_ids)]
    picture = drawing.draw_boxes(
        Image.fromarray(inference.load_image(path)), xywh,
        [f'{name} {score:.2f}' for name, score in zip(detections.class_names,
                                                       detections.scores)],
        [drawing.class_colour(label) for label in detections.labels])
    stem = os.path.splitext(os.path.basename(path))[0]
    picture.save(os.path.join(output, f'{stem}_{image_id}_detections.png'))
  with open(os.path.join(output, 'predictions.json'), 'w') as f:
    json.dump(results, f)
  logger.info('%d detections (score >= %g) in %d images: %s', len(results), threshold,
              len(paths), os.path.join(output, 'predictions.json'))
  return results


def main(argv):
  del argv
  predict(_WORKDIR.value, _CHECKPOINT.value, image_paths(_IMAGES.value, _IMAGE_DIR.value),
          _OUTPUT.value, _THRESHOLD.value)


if __name__ == '__main__':
  runtime.run_app(main)
