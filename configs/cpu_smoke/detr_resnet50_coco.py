"""configs/detr_resnet50_coco.py as tools/accelerator_benchmarks.sh --cpu-smoke runs it (recipes.cpu_smoke)."""
from qna_detr import recipes


def get_config():
  return recipes.cpu_smoke(recipes.detr_resnet50_coco())
