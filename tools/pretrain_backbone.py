"""Runs the backbone's dense pretraining phase alone (train/dense_pretraining.py).

  python tools/pretrain_backbone.py --config=configs/qna_detr_toy.py --workdir=workdirs/toy

Writes WORKDIR/backbone_pretraining (checkpoints, settings.json), resuming a killed phase;
`projects/qna_detr/main.py` on the same workdir and config then starts DETR from its result.
The same flags as the main entry point.
"""
from typing import Any

from absl import flags
import jax
import ml_collections

from qna_detr import launch
from qna_detr.train import dense_pretraining
from qna_detr.train import phases

for _module in launch.flag_modules():
  flags.adopt_module_key_flags(_module)


def main(rng: jax.Array, config: ml_collections.ConfigDict, workdir: str,
         writer: Any) -> None:
  del rng  # The phase derives its keys from config.rng_seed.
  config = phases.prepare(config, workdir)
  if config.backbone_pretraining.steps < 1:
    raise ValueError('config.backbone_pretraining.steps must be > 0 for this tool')
  print(dense_pretraining.run(config, workdir, writer), flush=True)


if __name__ == '__main__':
  launch.run(main)
