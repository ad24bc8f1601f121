"""DETR with a QnA-ViT-Small backbone on COCO 2017: the paper's recipe.

Global batch 32, 75 epochs, head lr 1e-4 and backbone lr 1e-5 (x0.1 after epoch 50), AdamW with
weight decay 1e-4 and gradient clipping at 0.1. Reads TFDS coco/2017 (set --config.dataset.data_dir
to TFDS's data_dir); point --config.pretrained.path at an ImageNet QnA-ViT-Small checkpoint.
"""
from qna_detr import recipes


def get_config():
  return recipes.detr_coco('qna_vit_small')
