"""DINO-4scale with ResNet-50 on COCO 2017: IDEA-Research/DINO's 12-epoch recipe (49.0 AP).

Global batch 16, AdamW lr 1e-4 (backbone 1e-5; the stem, layer1 and batch norms fixed),
weight decay 1e-4, clipping 0.1, x0.1 after epoch 11; strides 8, 16, 32 plus one stride-64
level, 900 queries, 100 denoising queries. Point --config.pretrained.path at torchvision's
ImageNet ResNet-50 state dict (`.pth`).
"""
from qna_detr import recipes


def get_config():
  return recipes.dino_coco('resnet50')
