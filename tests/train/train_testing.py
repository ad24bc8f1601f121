"""A micro experiment (tiny images, tiny DETR) that compiles and trains in seconds on a CPU."""
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import ml_collections
import numpy as np

from qna_detr import detectors
from qna_detr import recipes
from qna_detr.data import toy
from qna_detr.train import checkpoints
from qna_detr.train import train_step

ROOT = pathlib.Path(__file__).resolve().parents[2]
# The toy set of the tests (tests/conftest.py's toy_dir is one): a toy dataset folder is
# only reused by a config that asks for the arguments that made it.
TOY_SET = dict(num_train=24, num_val=10, image_size=64, seed=0)


def _micro_run(config: ml_collections.ConfigDict, data_dir: str, batch_size: int,
               steps: int) -> ml_collections.ConfigDict:
  """The tests' toy set and run settings: whole model trained from images, a few steps."""
  config.toy_data.update(data_dir=data_dir, **TOY_SET)
  config.dataset.max_boxes = 8
  config.backbone_pretraining.steps = 0
  config.optimizer.freeze_backbone = False
  config.train_input = 'images'
  config.eval_top_k = 8
  config.batch_size = config.eval_batch_size = batch_size
  config.num_train_steps = steps
  config.log_every_steps = 1
  config.checkpoint_every_steps = 2
  config.eval_every_epochs = None
  return config


def micro_config(data_dir: str, *, batch_size: int = 4,
                 steps: int = 4, detector: str = 'detr') -> ml_collections.ConfigDict:
  """A micro DETR (or with detector='dino', a micro DINO) on the tests' toy set."""
  if detector == 'dino':
    config = recipes.dino_toy(image_size=TOY_SET['image_size'])
    config.model.update(dict(hidden_dim=32, num_heads=2, num_encoder_layers=1,
                             num_decoder_layers=2, dim_feedforward=64, num_queries=8,
                             enc_points=2, dec_points=2, dn_number=50))
    return _micro_run(config, data_dir, batch_size, steps)
  config = recipes.toy(image_size=TOY_SET['image_size'])
  config.model.update(dict(num_queries=8, hidden_dim=32, num_heads=2, num_encoder_layers=1,
                           num_decoder_layers=2, dim_feedforward=64))
  return _micro_run(config, data_dir, batch_size, steps)


def write_config_file(path: pathlib.Path, data_dir: str, **kwargs) -> pathlib.Path:
  """A config file whose get_config() is `micro_config(data_dir, **kwargs)`, for the tools."""
  path.write_text(textwrap.dedent(f'''
      import sys
      sys.path.insert(0, {str(ROOT / 'tests' / 'train')!r})
      import train_testing

      def get_config():
        return train_testing.micro_config({data_dir!r}, **{kwargs!r})
  '''))
  return path


def run_script(script: str, args: list[str], extra_env: dict | None = None,
               timeout: int = 900, cwd: str | None = None) -> subprocess.CompletedProcess:
  """Runs a script of the repository (e.g. 'tools/evaluate.py') on the CPU, from `cwd`;
  output captured."""
  python_path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get('PYTHONPATH')]))
  return subprocess.run(
      [sys.executable, str(ROOT / script)] + args,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': python_path, **(extra_env or {})},
      capture_output=True, text=True, timeout=timeout, cwd=cwd)


def write_random_checkpoint(workdir: str, config: ml_collections.ConfigDict, step: int = 1,
                            keep: int = 1):
  """Saves a train state of config's model (toy classes) with random parameters, without
  compiling anything; returns it (host arrays)."""
  detector = detectors.build(config, len(toy.CLASSES))
  rng = np.random.default_rng(step)
  state = jax.tree.map(
      lambda leaf: (rng.normal(scale=0.5, size=leaf.shape).astype(leaf.dtype)
                    if np.issubdtype(leaf.dtype, np.floating) else np.zeros(leaf.shape,
                                                                            leaf.dtype)),
      train_step.abstract_state(config, detector))
  writer = checkpoints.Checkpointer(workdir, keep=keep)
  writer.save(step, state)
  writer.close()
  return state
