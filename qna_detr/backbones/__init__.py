"""Backbones: the feature-map contract (`base`), the registry (`registry`), QnA-ViT and
ResNet-50, and their pretrained-weight formats (`weights`).

Importing the package registers the built-in backbones.
"""
from qna_detr.backbones import qna_vit  # noqa: F401  (registers the QnA-ViT variants)
from qna_detr.backbones import resnet  # noqa: F401  (registers resnet50)
