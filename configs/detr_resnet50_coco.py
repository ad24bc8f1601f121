"""DETR-R50 on COCO 2017: DETR's own baseline, to measure the QnA-ViT backbones against.

DETR's recipe: global batch 32, head lr 1e-4, backbone lr 1e-5 (layer2-4; the stem, layer1
and every batch-norm stay fixed), AdamW with weight decay 1e-4, gradient clipping at 0.1.
Point --config.pretrained.path at torchvision's ImageNet ResNet-50 state dict (`.pth`).
"""
from qna_detr import recipes


def get_config():
  return recipes.detr_resnet50_coco()
