#!/usr/bin/env bash
# The one-shot GPU measurements of issues #8, #7 and #3, prepared to run once on a lent GPU (a few minutes
# each on an H100/H200; the loader bench builds its 2000 JPEGs first, about a minute):
#
#     bash bench/gpu.sh            # appends its lines to bench/RESULTS.md (RESULTS=FILE to choose another)
#
# bf16, batch 256 per GPU, 224 px, the project's TrainStep against the straightforward step
# (bench/reference_step.py), for mobilenetv3_large <- resnet50 and efficientnet_b0 <- SwAV resnet50x2:
# images/s of each and their ratio, peak memory (GiB and MiB per image), model FLOP utilisation against
# the card's measured bf16 matmul peak, and the largest batch for an 80 GB card (extrapolated from the
# peaks at batch 128 and 256). Needs the project's environment (make setup) and one visible CUDA device.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
RESULTS=${RESULTS:-bench/RESULTS.md}
common=(--device cuda --precision bf16 --batch 256 --resolutions 224 --iters 10 --warmup 3 --mfu --max-batch
        --results "$RESULTS")
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PYTHON" bench/train_step.py --students mobilenetv3_large_100 --teacher resnet50 "${common[@]}"
"$PYTHON" bench/train_step.py --students efficientnet_b0 --teacher swav_resnet50w2 "${common[@]}"
# Issue #7's GPU figure: SEED steps from the teacher feature cache vs the live bf16 teacher.
"$PYTHON" bench/teacher_cache.py --device cuda --precision bf16 --batch 256 --images 4096 --steps 10 | tee -a "$RESULTS"
# Issue #3's GPU half: the loader with the seeded flip + photometric ops on the GPU vs torchvision on the same
# CPU threads (set THREADS to the CPU cores a GPU gets on the cluster; default: all of this machine's).
"$PYTHON" bench/data_loader.py --device cuda ${THREADS:+--threads "$THREADS"} | tee -a "$RESULTS"
echo "appended to $RESULTS"
