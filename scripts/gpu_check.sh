#!/usr/bin/env bash
# The GPU check of nrm-ood (docs/benchmarks.md, "GPU"): on a machine whose python3 has torch with CUDA,
#   1. the tests that need a GPU (tests/nrm/test_gpu.py; tests/jobs/test_gpu_decode.py: nvJPEG batch decode
#      with its CPU fallback, needs torchvision built for this torch),
#   2. `nrm-ood bench --device cuda` on the GPU: images/s of the presets and the CIFAR ResNets at batch 512
#      and 4096, NRM/plain ratios, peak GPU memory, and the precision table at batch 4096,
#   3. a whole `nrm-ood score` job with its actors on the GPU (when Ray is importable there),
#   4. one training step per precision and layout (scripts/train_steps.py on cuda).
# Usage: scripts/gpu_check.sh [OUT_DIR]   (default gpu-check/; PY=python3 SHARED=../shared ROWS=200000
#        JOB_TIMEOUT=900 override)
# Nothing is installed: the repository is put on PYTHONPATH (in front of what is there already, so a Ray
# unpacked elsewhere can be added to it first). Each step's log goes to OUT_DIR.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-gpu-check}}
PY=${PY:-python3}
SHARED=${SHARED:-../shared}
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: $PY's torch sees no CUDA device; run this on a machine with a GPU" >&2
    exit 1
fi
nvidia-smi > "$OUT_DIR/nvidia-smi.txt" 2>&1 || true
"$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))" | tee "$OUT_DIR/env.txt"

echo "== 1/4 tests on the GPU"
"$PY" -m pytest -q -p no:cacheprovider -o addopts="" tests/nrm/test_gpu.py tests/jobs/test_gpu_decode.py 2>&1 \
    | tee "$OUT_DIR/tests.log" || status=1

echo "== 2/4 bench on the GPU"
shared_opt=()
[ -d "$SHARED" ] && shared_opt=(--shared "$SHARED")
"$PY" -m jobs.cli bench --device cuda --section speed --section precision --reps 10 "${shared_opt[@]}" \
    --out "$OUT_DIR/bench-gpu.md" 2>&1 | tee "$OUT_DIR/bench.log" || status=1

echo "== 3/4 nrm-ood score with its actors on the GPU"
if "$PY" -c "import ray" 2>/dev/null; then
    RAY_USAGE_STATS_ENABLED=0 timeout "${JOB_TIMEOUT:-900}" "$PY" scripts/gpu_job.py "${JOB_DIR:-$(mktemp -d)}" "${ROWS:-200000}" 2>&1 | tee "$OUT_DIR/job.log" || status=1
else
    echo "Ray is not importable with $PY: the job step is skipped (carry it, see docs/benchmarks.md)" \
        | tee "$OUT_DIR/job.log"
fi

echo "== 4/4 training steps on the GPU"
"$PY" scripts/train_steps.py 10 cuda 2>&1 | tee "$OUT_DIR/train-steps.md" || status=1
exit $status
