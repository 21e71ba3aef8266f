#!/usr/bin/env bash
# The checks that need a GPU (README "Running on GPUs"): the CUDA test module, the host-device
# synchronisations per training iteration measured with torch.cuda.set_sync_debug_mode, the step cost at
# the papers' model pairs and sizes (float32, as the references train), and the input pipeline rates.
# Usage, from anywhere: .ci/gpu_checks.sh [OUT_DIR [STEP...]]   (default: runs/gpu_checks in the repository,
# every step; steps: tests syncs cost_seg cost_det_retinanet cost_det_faster_rcnn data). Each step runs under
# its own `timeout` (seconds below; exit status 124 when it ran out) and the script goes on to the next one
# whatever a step's status; every step's output is kept in OUT_DIR/<step>.txt, the exit status of each is
# listed at the end (and in OUT_DIR/status.txt), and the script exits non-zero when any step failed.
# Budget: about 5 min for the test module on one H100, 1-2 min for each other step.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-runs/gpu_checks}"
shift || true
selected=("$@")
mkdir -p "$out"
python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu_checks: no CUDA device visible')" \
    || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"

names=()
codes=()
# step NAME SECONDS COMMAND...: run COMMAND under `timeout SECONDS` (when selected), its output also in
# OUT_DIR/NAME.txt, and record its exit status
step() {
    local name=$1 seconds=$2
    shift 2
    if ((${#selected[@]})) && [[ " ${selected[*]} " != *" $name "* ]]; then
        return
    fi
    echo "gpu_checks: $name (timeout ${seconds}s)"
    timeout --kill-after=20 "$seconds" "$@" 2>&1 | tee "$out/$name.txt"
    local code=${PIPESTATUS[0]}
    names+=("$name")
    codes+=("$code")
    echo "gpu_checks: $name exited $code"
}

step tests 420 python -m pytest -q -rs tests/test_cuda.py
step syncs 180 python -m kd_ref.syncs --device cuda
# DeepLabV3-R101 -> R18 at 512x1024, batch 8 (CIRKD / SKD Cityscapes rows)
step cost_seg 240 python -m kd_ref.bench_cost --device cuda --tasks seg --student deeplabv3_r18 \
    --teacher deeplabv3_r101 --size 512 1024 --batch-size 8
# RetinaNet and Faster R-CNN R101 -> R50 at 1333x800, batch 2 per GPU (mmdet 2x rows); a small synthetic set
# keeps GKD's prototype pass, which runs once before the timing, short
for pair in retinanet faster_rcnn; do
    step "cost_det_${pair}" 240 python -m kd_ref.bench_cost --device cuda --tasks det --student "${pair}_r50" \
        --teacher "${pair}_r101" --size 800 1333 --batch-size 2 --set synthetic_train=16
done
step data 180 python -m kd_ref.bench_data

failed=0
: > "$out/status.txt"
for index in "${!names[@]}"; do
    printf '%-24s exit %s\n' "${names[$index]}" "${codes[$index]}" | tee -a "$out/status.txt"
    ((codes[index] == 0)) || failed=1
done
if ((failed)); then
    echo "gpu_checks: some steps failed (exit 124: ran out of time); outputs in $out/"
    exit 1
fi
echo "gpu_checks: all passed; outputs in $out/"
