"""Trains and evaluates DETR with a QnA-ViT backbone, launched like a Scenic project.

  python projects/qna_detr/main.py --config=configs/qna_detr_toy.py --workdir=/tmp/toy

Runs through `scenic.app.run` when Scenic is importable, otherwise through the project's own
entry point with the same flags. A workdir that holds a checkpoint is resumed.
"""
from clu import metric_writers
import jax
import ml_collections

from qna_detr import scenic
from qna_detr.train import loop
from qna_detr.utils import host_memory


def main(rng: jax.Array, config: ml_collections.ConfigDict, workdir: str,
         writer: metric_writers.MetricWriter) -> None:
  host_memory.keep_freed_memory_on_cpu()  # Faster CPU steps (see the module).
  loop.train_and_evaluate(rng, config, workdir, writer)


if __name__ == '__main__':
  scenic.run(main)
