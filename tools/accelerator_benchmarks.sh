#!/usr/bin/env bash
# The accelerator check, in one call: QnA against its peers (every implementation, k = 3..11,
# forward and forward+backward), multi-scale deformable attention at DINO's encoder and
# decoder sizes of an 800 x 1216 image (each formulation), the train steps of QnA-ViT-T DETR
# and DETR-R50 (800 x 1216, global batch 32 or the largest that fits, float32 and bfloat16),
# and QnA-ViT-T DINO against QnA-ViT-T DETR (512 x 768, batch 2, float32), as JSON files in
# --out, with summary.json holding the goals met or missed. Sized to finish within 8 minutes
# on one H100-class GPU (not yet run on one).
#
#   tools/accelerator_benchmarks.sh --out DIR [--wheels DIR] [--cpu-smoke]
#
# Needs jax (with the accelerator's plugin), flax, optax, orbax and ml_collections; no
# TensorFlow, CLU or pycocotools. Where ml_collections is missing, --wheels names a folder of
# wheels to install it from (e.g. `pip download --no-deps ml_collections` made elsewhere).
# --cpu-smoke runs the same steps at tiny sizes, the QnA-ViT configs on the nano backbone, on a
# CPU (the tests run it).
set -euo pipefail

out=""
wheels=""
smoke=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --out=*) out="${1#*=}"; shift ;;
    --wheels) wheels="$2"; shift 2 ;;
    --wheels=*) wheels="${1#*=}"; shift ;;
    --cpu-smoke) smoke=1; shift ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
[ -n "$out" ] || { echo "--out DIR is required" >&2; exit 2; }
mkdir -p "$out"
out="$(cd "$out" && pwd)"
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! "$python" -c 'import ml_collections' 2>/dev/null; then
  [ -n "$wheels" ] || { echo "ml_collections is not installed: pass --wheels DIR" >&2; exit 2; }
  "$python" -m pip install -q --no-index --no-deps --target /tmp/qna_detr_site "$wheels"/*.whl
  export PYTHONPATH="/tmp/qna_detr_site:$PYTHONPATH"
fi

if [ "$smoke" = 1 ]; then
  export JAX_PLATFORMS=cpu
  qna_args=(--batch=1 --height=12 --width=16 --windows=3,5 --repeats=1 --budget_s=0.1)
  deformable_args=(--scale=0.1 --repeats=1 --budget_s=0.1)
  image_size=64,96
  pair_size=64,96
  batch=2
  train_args=(--steps=1 --warmup=0)
  configs=configs/cpu_smoke  # The same configs shrunk (recipes.cpu_smoke).
else
  qna_args=(--repeats=20 --budget_s=2)
  deformable_args=(--repeats=10 --budget_s=3)
  image_size=800,1216
  pair_size=512,768
  batch=32
  train_args=(--steps=10 --warmup=2)
  configs=configs
fi

# train NAME CONFIG DTYPE SIZE BATCH: the train step's figures in $out/train_NAME.json, halving
# the batch while it does not fit.
train() {
  local name="$1" config="$2" dtype="$3" shape="$4" size="$5"
  local file="$out/train_$name.json"
  while [ "$size" -ge 1 ]; do
    echo "train step of $config, $dtype, batch $size -> $file" >&2
    if "$python" tools/benchmark_train.py --config="$configs/$config.py" \
        --image_size="$shape" --config.batch_size="$size" --config.model.dtype="$dtype" \
        --json="$file" "${train_args[@]}" 2> "$out/stderr.txt"; then
      rm -f "$out/stderr.txt"
      return 0
    fi
    if ! grep -q -i -E 'RESOURCE_EXHAUSTED|out of memory' "$out/stderr.txt"; then
      cat "$out/stderr.txt" >&2
      exit 1
    fi
    size=$((size / 2))
  done
  echo "$config does not fit one image of $shape" >&2
  exit 1
}

"$python" - "$out/environment.json" <<'EOF'
import json, platform, sys
import jax
json.dump({'jax': jax.__version__, 'backend': jax.default_backend(),
           'devices': [d.device_kind for d in jax.devices()], 'python': platform.python_version()},
          open(sys.argv[1], 'w'), indent=1)
EOF

echo "QnA and its peers -> $out/qna.json" >&2
"$python" tools/benchmark_qna.py --json="$out/qna.json" "${qna_args[@]}"

echo "deformable attention -> $out/deformable.json" >&2
"$python" tools/benchmark_deformable.py --json="$out/deformable.json" "${deformable_args[@]}"

for dtype in float32 bfloat16; do
  train "qna_detr_tiny_coco_$dtype" qna_detr_tiny_coco "$dtype" "$image_size" "$batch"
  train "detr_resnet50_coco_$dtype" detr_resnet50_coco "$dtype" "$image_size" "$batch"
done
train dino_qna_vit_tiny_coco_512 dino_qna_vit_tiny_coco float32 "$pair_size" 2
train qna_detr_tiny_coco_512 qna_detr_tiny_coco float32 "$pair_size" 2

"$python" - "$out" <<'EOF'
"""summary.json: the figures the accelerator goals are about, and whether each is met."""
import json, os, sys
out = sys.argv[1]
load = lambda name: json.load(open(os.path.join(out, name)))
rows = load('qna.json')['results']
def row(layer, k, passes='fwd_bwd'):
  return next(r for r in rows
              if r['layer'] == layer and r['window'] == k and r['pass'] == passes)
ks = sorted({r['window'] for r in rows})
goals = {}
for impl in sorted({r['layer'] for r in rows if r['layer'].startswith('qna')}):
  floor = [row(impl, k)['median_s'] / row('floor', k)['median_s'] for k in ks]
  goals[f'{impl}: <= 1.5x its floor at every k (fwd+bwd)'] = (max(floor) <= 1.5, floor)
  if 7 in ks:
    speed = row('sasa', 7)['median_s'] / row(impl, 7)['median_s']
    memory = row('sasa', 7)['peak_bytes'] / row(impl, 7)['peak_bytes']
    goals[f'{impl}: >= 3x faster than SASA at k = 7'] = (speed >= 3, speed)
    goals[f'{impl}: >= 10x less memory than SASA at k = 7'] = (memory >= 10, memory)
train = {f'{c}_{d}': load(f'train_{c}_{d}.json') for c in ('qna_detr_tiny_coco',
         'detr_resnet50_coco') for d in ('float32', 'bfloat16')}
pair = {name: load(f'train_{name}.json') for name in ('dino_qna_vit_tiny_coco_512',
                                                      'qna_detr_tiny_coco_512')}
deformable = load('deformable.json')['results']
tiny, r50 = train['qna_detr_tiny_coco_bfloat16'], train['detr_resnet50_coco_bfloat16']
goals['QnA-ViT-T DETR >= DETR-R50 images/s (bfloat16)'] = (
    tiny['images_per_s'] >= r50['images_per_s'], [tiny['images_per_s'], r50['images_per_s']])
goals['compile <= 60 s per shape'] = (
    max(t['compile_s'] for t in train.values()) <= 60,
    {name: t['compile_s'] for name, t in train.items()})
keys = ('batch_size', 'image_shape', 'images_per_s', 'compile_s', 'peak_bytes',
        'median_step_s')
summary = {'environment': load('environment.json'),
           'train': {name: {k: t[k] for k in keys} for name, t in train.items()},
           'dino_vs_detr': {name: {k: t[k] for k in keys} for name, t in pair.items()},
           'deformable': [{k: r.get(k) for k in ('case', 'row', 'pass', 'median_s',
                                                 'peak_bytes', 'skipped')}
                          for r in deformable],
           'goals': {name: {'met': bool(met), 'value': value}
                     for name, (met, value) in goals.items()}}
json.dump(summary, open(os.path.join(out, 'summary.json'), 'w'), indent=1)
for name, goal in summary['goals'].items():
  print(('met   ' if goal['met'] else 'MISSED'), name, goal['value'])
EOF
