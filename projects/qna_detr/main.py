"""Trains and evaluates a detector, launched like a Scenic project.

  python projects/qna_detr/main.py --config=configs/qna_detr_toy.py --workdir=/tmp/toy

Runs through `scenic.app.run` when Scenic is importable, otherwise through the project's own
launcher with the same flags (`qna_detr.launch`). The config's phases run in turn
(`qna_detr.train.phases`); a workdir that holds a checkpoint is resumed.
"""
from typing import Any

from absl import flags
import jax
import ml_collections

from qna_detr import launch
from qna_detr.train import phases

for _module in launch.flag_modules():
  flags.adopt_module_key_flags(_module)


def main(rng: jax.Array, config: ml_collections.ConfigDict, workdir: str,
         writer: Any) -> None:
  phases.run(rng, config, workdir, writer)


if __name__ == '__main__':
  launch.run(main)
