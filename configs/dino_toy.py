"""DINO with a nano QnA-ViT on the synthetic shapes set, on a CPU: the toy DETR's set, backbone
and phases, with DINO reading the backbone's stride-8 and stride-16 maps (and one extra)."""
from qna_detr import recipes


def get_config():
  return recipes.dino_toy()
