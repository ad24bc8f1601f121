"""The embedded default: DETR with a nano QnA-ViT on the synthetic shapes set, on a CPU.

The phases of one run: the dataset is made into WORKDIR/toy_coco, the backbone pretrains on
it (WORKDIR/backbone_pretraining), then DETR trains on top of it, frozen, reading the
backbone's features of every training image from memory, and is evaluated.
"""
from qna_detr import recipes


def get_config():
  return recipes.toy()
