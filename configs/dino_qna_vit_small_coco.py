"""DINO-4scale with a QnA-ViT-Small backbone on COCO 2017: DINO's 12-epoch recipe.

Global batch 16, AdamW lr 1e-4 (backbone 1e-5), weight decay 1e-4, clipping 0.1, x0.1 after
epoch 11; strides 8, 16, 32 of the backbone plus one stride-64 level, 900 queries, 100
denoising queries. 24 or 36 epochs: --config.num_epochs=24 (the decay moves to epoch 22).
Reads TFDS coco/2017 (--config.dataset.data_dir); point --config.pretrained.path at the
authors' ImageNet QnA-ViT-Small checkpoint.
"""
from qna_detr import recipes


def get_config():
  return recipes.dino_coco('qna_vit_small')
