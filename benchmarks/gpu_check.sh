#!/usr/bin/env bash
# ue_fast's GPU check: one call on a GPU machine (H100/H200, no network needed) gives the
# whole verdict within 8 minutes:
#   1. build the extension ue_fast._C in place for the GPU's architecture
#      (pip install -e . --no-deps --no-build-isolation --no-index: ue_fast is installed
#      editable into the interpreter's environment);
#   2. pytest -m gpu: every kernel compiled and compared with its reference on the GPU, and
#      the engine's CUDA paths (bf16 autocast, channels-last, CUDA graphs, pinned host memory);
#   3. the op benchmarks (supcon, pgd_step_, class_covariance, centroid) against the plain
#      and torch.compile'd formulations, with their floors;
#   4. MI-UE with ResNet-18 on 10,000 CIFAR-10 images for 2 outer epochs against the plain
#      implementation for 1: ms per image per outer epoch, the ratio, the projected time of
#      the authors' full schedule and where the time goes;
#   5. if time is left, the same run with compile="reduce-overhead" on 2,048 images.
# Each step has its own timeout; a failed step does not stop the next; the exit status is
# non-zero if any step failed. benchmarks/gpu_check.py has the details.
#
# Usage:
#   bash benchmarks/gpu_check.sh [--dry-run] [--name NAME] [--steps a,b] [TARBALL]
#     TARBALL    CIFAR-10 as an image-folder tarball (cifar10-jpeg.tar.gz: train/<class>/*.jpg);
#                without it the demo subset shipped in the package (1,000 images) is used
#     --dry-run  the same steps on the CPU at toy sizes, in a few minutes (CI runs it so the
#                script cannot rot; the extension is not rebuilt; the numbers mean nothing)
#     --name     report file name stem (default: <device>-<date>)
#     --steps    run only these steps (build,gpu_tests,ops,generation,generation_compiled)
# Environment:
#   OUT        output folder (default benchmarks/results/): NAME.json, NAME.md, NAME.log, NAME-ops.json
#   PYTHON     interpreter to use (default python3)
#   UE_FAST_COMMIT  the commit to record where the tree is a copy without git
set -uo pipefail

# Paths given are taken from the caller's folder; the steps themselves run from the repository root.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
DRY=0
for arg in "$@"; do
    case "$arg" in
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        --dry-run) DRY=1 ;;
    esac
done
if ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "gpu_check: interpreter $PYTHON not found (set PYTHON)" >&2
    exit 2
fi
OUT_DIR="${OUT:-$ROOT/benchmarks/results}"
# gpu_check.py keeps its own deadline (460 s on a GPU); this backstop only catches a hang of
# the driver itself, so that the whole call stays within 8 minutes.
LIMIT=475
[[ $DRY == 1 ]] && LIMIT=900
timeout --kill-after=5 "$LIMIT" "$PYTHON" "$ROOT/benchmarks/gpu_check.py" --python "$PYTHON" \
    --out-dir "$OUT_DIR" "$@"
status=$?
if [[ $status == 124 || $status == 137 ]]; then
    echo "gpu_check: stopped by the ${LIMIT} s backstop; the report in $OUT_DIR holds the steps that finished" >&2
fi
exit "$status"
