#!/usr/bin/env bash
# Build ue_fast._C with its CUDA sources the way a user does on a machine with
# nvcc and no GPU (build containers, login nodes, CI): a fresh virtual
# environment with a CUDA build of torch, README's `pip install -e .
# --no-build-isolation`, no TORCH_CUDA_ARCH_LIST and no GPU visible. Then checks
# that pip kept that torch, that the module imports and reports has_cuda(), that
# it embeds sm_80 and sm_90 code and compute_90 PTX (setup.py's default), and
# that a toolkit of another CUDA major version is refused with a clear message.
# Builds in a copy of the working tree, so the checkout's own ue_fast/_C*.so is left alone.
#   usage: nvcc_check.sh [TORCH_REQUIREMENT]   (default: torch==2.14.1)
# Exits 0 with a message when there is no nvcc; non-zero when a check fails.
set -euo pipefail

TORCH_REQ="${1:-torch==2.14.1}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if ! command -v nvcc >/dev/null && [[ ! -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]]; then
  echo "nvcc not found: CUDA build check skipped"
  exit 0
fi
start=$SECONDS
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# The working tree as git sees it: tracked and untracked, not ignored (no build outputs).
python3 "$ROOT/.ci/copy_tree.py" "$ROOT" "$WORK/src"

python3 -m venv "$WORK/venv"
# shellcheck disable=SC1091
. "$WORK/venv/bin/activate"
python -m pip install --upgrade --quiet pip
pip install --quiet "$TORCH_REQ" ninja wheel
torch_before="$(python -c 'import torch; print(torch.__version__)')"
if [[ "$(python -c 'import torch; print(torch.version.cuda)')" == None ]]; then
  echo "FAILED: '$TORCH_REQ' installed torch $torch_before, not a CUDA build" >&2
  exit 1
fi
echo "torch $torch_before; $(nvcc --version | tail -n 1); installed in $((SECONDS - start)) s"

cd "$WORK/src"
# No GPU may decide the architectures, nor a variable left in the environment.
export CUDA_VISIBLE_DEVICES=""
unset TORCH_CUDA_ARCH_LIST
pip install --quiet -e . --no-build-isolation
torch_after="$(python -c 'import torch; print(torch.__version__)')"
if [[ "$torch_after" != "$torch_before" ]]; then
  echo "FAILED: installing ue_fast replaced torch $torch_before by $torch_after" >&2
  exit 1
fi
so="$(python - <<'PY'
import ue_fast._C as ext
assert ext.has_cuda(), "ue_fast._C was built without its CUDA sources"
print(ext.__file__)
PY
)"
echo "OK: ue_fast._C imports with CUDA (built in $((SECONDS - start)) s): $so"

# triton, a dependency of CUDA torch, ships cuobjdump; a toolkit may too.
cuobjdump="$(python -c 'import os, triton; print(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump"))')"
[[ -x "$cuobjdump" ]] || cuobjdump="$(command -v cuobjdump || true)"
if [[ -z "$cuobjdump" ]]; then
  echo "FAILED: no cuobjdump to list the embedded architectures" >&2
  exit 1
fi
elf="$("$cuobjdump" --list-elf "$so")"
ptx="$("$cuobjdump" --list-ptx "$so")"
echo "$elf"; echo "$ptx"
for want in "sm_80.cubin" "sm_90.cubin"; do
  grep -q "$want" <<<"$elf" || { echo "FAILED: no $want in $so" >&2; exit 1; }
done
grep -q "sm_90.ptx" <<<"$ptx" || { echo "FAILED: no compute_90 PTX in $so" >&2; exit 1; }

# A toolkit of another major version must stop setup.py before any compiler runs, saying what to do.
torch_cuda_major="$(python -c 'import torch; print(torch.version.cuda.split(".")[0])')"
other="$((torch_cuda_major - 1)).8"
mkdir -p "$WORK/cuda-$other/bin" "$WORK/cuda-$other/include"
touch "$WORK/cuda-$other/include/cuda_runtime.h"
printf '#!/bin/sh\necho "Cuda compilation tools, release %s, V%s.1"\n' "$other" "$other" >"$WORK/cuda-$other/bin/nvcc"
chmod +x "$WORK/cuda-$other/bin/nvcc"
if CUDA_HOME="$WORK/cuda-$other" pip install -e . --no-build-isolation >"$WORK/mismatch.log" 2>&1; then
  echo "FAILED: setup.py accepted CUDA $other with a torch built for CUDA $torch_cuda_major" >&2
  exit 1
fi
if ! grep -q "UE_FAST_NO_CUDA=1" "$WORK/mismatch.log"; then
  echo "FAILED: the CUDA $other build failed without saying what to do:" >&2
  tail -n 30 "$WORK/mismatch.log" >&2
  exit 1
fi
echo "OK: CUDA $other refused: $(grep -m 1 -o 'the CUDA toolkit at.*' "$WORK/mismatch.log")"
echo "OK: CUDA build check with $TORCH_REQ in $((SECONDS - start)) s"
