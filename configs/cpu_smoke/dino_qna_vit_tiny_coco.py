"""configs/dino_qna_vit_tiny_coco.py as tools/accelerator_benchmarks.sh --cpu-smoke runs it (recipes.cpu_smoke)."""
from qna_detr import recipes


def get_config():
  return recipes.cpu_smoke(recipes.dino_coco('qna_vit_tiny'))
