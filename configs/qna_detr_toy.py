"""The embedded default: DETR with a nano QnA-ViT on the synthetic shapes set, on a CPU.

The dataset is generated into WORKDIR/toy_coco on first use, and the backbone is pretrained on
it (WORKDIR/backbone_pretraining) before DETR trains on top of it, frozen, reading the
backbone's features of every training image from memory (`cache_backbone_features`).
"""
from qna_detr import configs


def get_config():
  return configs.toy()
