"""The trained detector from Python (`Detector`), from the command line (tools/predict.py) and
as an exported program run by jax alone (tools/export_model.py), on a trained micro run of
each registered detector (DETR, DINO), through the seam alone; and a workdir moved elsewhere.

References: tools/evaluate.py's detections.json for the same checkpoint, and the API itself
for the other two (whose code paths differ: the tool's files and the exported program).
"""
import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import numpy as np
from PIL import Image
import pytest

from qna_detr import Detector
import train_testing

pytestmark = pytest.mark.slow
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(script, args):
  result = train_testing.run_script(script, args)
  assert result.returncode == 0, result.stderr[-4000:]
  return result


@pytest.fixture(scope='module', params=['detr', 'dino'])
def run(tmp_path_factory, request):
  """A micro run trained for 6 steps through the launcher (its toy set in the workdir), and
  tools/evaluate.py's output."""
  root = tmp_path_factory.mktemp(f'inference_{request.param}')
  config_file = train_testing.write_config_file(root / 'micro_config.py', '', steps=6,
                                                detector=request.param)
  workdir = root / 'run'
  _run('projects/qna_detr/main.py', [f'--config={config_file}', f'--workdir={workdir}'])
  _run('tools/evaluate.py', [f'--workdir={workdir}', f'--output={root / "eval"}'])
  detections = json.loads((root / 'eval' / 'detections.json').read_text())
  data = workdir / 'toy_coco'
  with open(data / 'annotations' / 'instances_val.json') as f:
    images = {im['id']: str(data / 'val' / im['file_name']) for im in json.load(f)['images']}
  return {'root': root, 'workdir': workdir, 'detections': detections, 'images': images,
          'config_file': config_file}


@pytest.fixture(scope='module')
def detector(run):
  return Detector.from_workdir(str(run['workdir']))


def _sorted(boxes, scores, categories):
  order = np.lexsort((categories, -np.round(scores, 5)))
  return boxes[order], scores[order], categories[order]


def test_detections_equal_those_of_the_evaluation(run, detector):
  ids = sorted(run['images'])
  found = detector([run['images'][i] for i in ids])
  assert len(found) == len(ids) == 10
  for image_id, detections in zip(ids, found):
    theirs = [d for d in run['detections'] if d['image_id'] == image_id]
    assert len(detections) == len(theirs) == 8  # eval_top_k of the micro config.
    xywh = np.array([d['bbox'] for d in theirs], np.float32)
    want = _sorted(np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], -1),
                   np.array([d['score'] for d in theirs]),
                   np.array([d['category_id'] for d in theirs]))
    got = _sorted(detections.boxes, detections.scores, detections.category_ids)
    np.testing.assert_allclose(got[0], want[0], atol=1e-3)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(got[2], want[2])
    assert detections.class_names == [detector.class_names[label]
                                      for label in detections.labels]


def test_a_path_a_pil_image_and_an_array_agree(run, detector, tmp_path):
  pixels = np.asarray(Image.open(next(iter(run['images'].values()))).convert('RGB'))
  path = tmp_path / 'image.png'  # Lossless: every decoder reads the same pixels.
  Image.fromarray(pixels).save(path)
  results = [detector(source) for source in (str(path), Image.open(path), pixels)]
  for other in results[1:]:
    np.testing.assert_array_equal(other.boxes, results[0].boxes)
    np.testing.assert_array_equal(other.scores, results[0].scores)
  threshold = float(np.median(results[0].scores))
  kept = detector(pixels, score_threshold=threshold)
  assert 0 < len(kept) < len(results[0]) and (kept.scores >= threshold).all()


def test_bad_images_are_named(detector, tmp_path):
  with pytest.raises(FileNotFoundError, match=f'{tmp_path}/missing.jpg'):
    detector(str(tmp_path / 'missing.jpg'))
  (tmp_path / 'notes.jpg').write_text('not an image')
  with pytest.raises(ValueError, match=f'{tmp_path}/notes.jpg is not a readable image'):
    detector(str(tmp_path / 'notes.jpg'))
  with pytest.raises(ValueError, match=r'\[H, W, 3\] uint8'):
    detector(np.zeros((8, 8), np.float32))


@pytest.mark.parametrize('source', ['--images', '--image_dir'])
def test_predict_tool_writes_the_api_detections(run, detector, tmp_path, source):
  folder = tmp_path / 'photos'
  folder.mkdir()
  paths = []
  for i in sorted(run['images'])[:2]:
    paths.append(str(folder / os.path.basename(run['images'][i])))
    shutil.copy(run['images'][i], paths[-1])
  given = f'--images={",".join(paths)}' if source == '--images' else f'--image_dir={folder}'
  output = tmp_path / 'predictions'
  _run('tools/predict.py', [f'--workdir={run["workdir"]}', given, f'--output={output}',
                            '--threshold=0'])
  written = json.loads((output / 'predictions.json').read_text())
  for image_id, (path, detections) in enumerate(zip(paths, detector(paths))):
    mine = [d for d in written if d['image_id'] == image_id]
    assert {d['file_name'] for d in mine} == {path}
    np.testing.assert_allclose(sorted(d['score'] for d in mine), sorted(detections.scores),
                               rtol=1e-6)
  assert len(list(output.glob('*_detections.png'))) == 2


_EXPORTED = textwrap.dedent('''
    import json, sys
    sys.modules['qna_detr'] = None  # Nothing of the project can be imported here.
    import jax
    import numpy as np
    info = json.load(open(sys.argv[1] + '/model.json'))
    program = info['programs'][0]
    exported = jax.export.deserialize(open(sys.argv[1] + '/' + program['file'], 'rb').read())
    inputs = np.load(sys.argv[2])
    out = exported.call(inputs['images'], inputs['sizes'], inputs['orig_sizes'])
    np.savez(sys.argv[3], **{k: np.asarray(v) for k, v in out.items()})
    print(json.dumps({'classes': info['class_names'], 'shape': [program['height'],
                                                                program['width']]}))
''')


def test_exported_model_runs_with_jax_alone(run, detector, tmp_path):
  _run('tools/export_model.py', [f'--workdir={run["workdir"]}', f'--output={tmp_path / "m"}'])
  paths = [run['images'][i] for i in sorted(run['images'])[:3]]
  height, width = detector.bucket_shapes[0]
  images = np.zeros((3, height, width, 3), np.uint8)
  sizes, orig = np.zeros((3, 2), np.int32), np.zeros((3, 2), np.int32)
  for row, path in enumerate(paths):  # The documented resize: the API's preprocessing.
    pixels = np.asarray(Image.open(path).convert('RGB'))
    _, resized = detector.preprocess(pixels)
    images[row, :resized.shape[0], :resized.shape[1]] = resized
    sizes[row], orig[row] = resized.shape[:2], pixels.shape[:2]
  np.savez(tmp_path / 'inputs.npz', images=images, sizes=sizes, orig_sizes=orig)
  result = subprocess.run(
      [sys.executable, '-c', _EXPORTED, str(tmp_path / 'm'), str(tmp_path / 'inputs.npz'),
       str(tmp_path / 'out.npz')], capture_output=True, text=True, timeout=600,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu'}, cwd=str(tmp_path))
  assert result.returncode == 0, result.stderr[-3000:]
  assert json.loads(result.stdout.splitlines()[-1])['classes'] == detector.class_names
  out = np.load(tmp_path / 'out.npz')
  for row, path in enumerate(paths):
    want = detector(np.asarray(Image.open(path).convert('RGB')))
    np.testing.assert_allclose(out['boxes'][row], want.boxes, atol=1e-3)
    np.testing.assert_allclose(out['scores'][row], want.scores, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out['labels'][row], want.labels)


def test_a_moved_workdir_evaluates_the_same_from_anywhere(run, tmp_path):
  """config.json keeps the toy set's paths relative to the workdir: a copy, then moved,
  evaluated from another directory, gives the run's own metrics."""
  shutil.copytree(run['workdir'], tmp_path / 'copy')
  os.rename(tmp_path / 'copy', tmp_path / 'moved')
  stored = json.loads((tmp_path / 'moved' / 'config.json').read_text())['config']['dataset']
  assert stored['val_json'] == os.path.join('toy_coco', 'annotations', 'instances_val.json')
  elsewhere = tmp_path / 'elsewhere'
  elsewhere.mkdir()
  result = train_testing.run_script('tools/evaluate.py', [
      f'--workdir={tmp_path / "moved"}', '--output=eval_here'], cwd=str(elsewhere))
  assert result.returncode == 0, result.stderr[-3000:]
  metrics = json.loads((elsewhere / 'eval_here' / 'metrics.json').read_text())
  assert metrics == json.loads((run['root'] / 'eval' / 'metrics.json').read_text())


def test_a_start_with_a_config_that_does_not_fit_changes_nothing(run, tmp_path):
  """Another num_queries on the finished workdir: refused, naming the misfit, before a file of
  the workdir changed; the run still evaluates as before."""
  def files():
    return {str(p.relative_to(run['workdir'])): p.read_bytes()
            for p in sorted(run['workdir'].rglob('*')) if p.is_file()}
  before = files()
  result = train_testing.run_script('projects/qna_detr/main.py', [
      f'--config={run["config_file"]}', f'--workdir={run["workdir"]}',
      '--config.model.num_queries=9'])
  assert result.returncode != 0
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('ERROR: MismatchedCheckpoint: ') and 'does not fit' in last, last
  assert files() == before
