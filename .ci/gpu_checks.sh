#!/usr/bin/env bash
# The checks that need a GPU, in one go (README "Running on GPUs"): the CUDA test module, the host-device
# synchronisations per training iteration measured with torch.cuda.set_sync_debug_mode, the step cost at
# the papers' model pairs and sizes (float32, as the references train), and the input pipeline rates.
# Usage, from anywhere: .ci/gpu_checks.sh [OUT_DIR]   (default: runs/gpu_checks in the repository); every
# command's output is also kept in OUT_DIR/<name>.txt, and the script stops at the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-runs/gpu_checks}"
mkdir -p "$out"
python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu_checks: no CUDA device visible')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"

python -m pytest -q -rs tests/test_cuda.py 2>&1 | tee "$out/test_cuda.txt"
python -m kd_ref.syncs --device cuda 2>&1 | tee "$out/syncs.txt"
# DeepLabV3-R101 -> R18 at 512x1024, batch 8 (CIRKD / SKD Cityscapes rows)
python -m kd_ref.bench cost --device cuda --tasks seg --student deeplabv3_r18 --teacher deeplabv3_r101 \
    --size 512 1024 --batch-size 8 2>&1 | tee "$out/cost_seg.txt"
# RetinaNet and Faster R-CNN R101 -> R50 at 1333x800, batch 2 per GPU (mmdet 2x rows); a small synthetic set
# keeps GKD's prototype pass, which runs once before the timing, short
for pair in retinanet faster_rcnn; do
    python -m kd_ref.bench cost --device cuda --tasks det --student "${pair}_r50" --teacher "${pair}_r101" \
        --size 800 1333 --batch-size 2 --set synthetic_train=16 2>&1 | tee "$out/cost_det_${pair}.txt"
done
python -m kd_ref.bench data 2>&1 | tee "$out/data.txt"
echo "gpu_checks: all passed; outputs in $out/"
