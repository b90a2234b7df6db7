#!/usr/bin/env bash
# Every Triton kernel compiled for sm_80 and sm_90 by Triton's own compiler (no GPU needed),
# under the Triton installed here and under each Triton that a supported CUDA build of
# torch pins: the one most Linux users get, as `pip install torch==X` resolves to the CUDA
# build there, which pins its Triton (torch 2.13.0 pins 3.7.1, for one). Fails on a compile
# error, or a register spill or a shared-memory excess in a configuration the launchers
# pick for the shapes that matter (benchmarks/triton_compile.py).
#
# The pins are resolved from the package index each run (`pip install --dry-run --report`
# in a clean environment: metadata only, no torch download), never written down here, so
# a new torch release's Triton is checked as soon as the supported range admits it. Each
# pinned Triton goes into its own folder (--target, no dependencies) put first on
# PYTHONPATH: the project's environment is not changed.
#   usage: bash .ci/triton_check.sh [RESULTS_DIR]     (run in the environment where ue_fast is installed)
set -euo pipefail
cd "$(dirname "$0")/.."

out="${1:-$(mktemp -d)}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
py="$(command -v python)"

# The supported torch releases (pyproject.toml: torch>=2.11,<=2.14.1), newest of each minor.
TORCH_SPECS=("torch==2.11.*" "torch==2.12.*" "torch==2.13.*" "torch>=2.14,<=2.14.1")

installed="$("$py" -c 'import triton; print(triton.__version__)')"
declare -A wanted=([$installed]="installed here")
for spec in "${TORCH_SPECS[@]}"; do
    # A clean environment: no PIP_* settings of this machine (a local CPU wheel would pin nothing).
    env -i HOME="$work" PATH=/usr/bin:/bin "$py" -m pip install --dry-run --ignore-installed --quiet \
        --report "$work/report.json" "$spec" > "$work/resolve.log" 2>&1 || {
        cat "$work/resolve.log" >&2
        echo "triton_check: could not resolve $spec from the package index" >&2
        exit 1
    }
    pin="$("$py" - "$work/report.json" <<'PY'
import json, sys
got = {i["metadata"]["name"]: i["metadata"]["version"] for i in json.load(open(sys.argv[1]))["install"]}
print(f'{got.get("triton", "")} {got["torch"]}')
PY
)"
    read -r triton_v torch_v <<< "$pin"
    if [[ -z "$triton_v" ]]; then
        echo "== $spec resolves to torch $torch_v, which pins no Triton here"
        continue
    fi
    echo "== $spec resolves to torch $torch_v, which pins triton $triton_v"
    wanted[$triton_v]="${wanted[$triton_v]:+${wanted[$triton_v]}, }torch $torch_v"
done

status=0
for v in $(printf '%s\n' "${!wanted[@]}" | sort -V); do
    echo "== Triton $v (${wanted[$v]}): every kernel compiled for sm_80 / sm_90"
    if [[ "$v" == "$installed" ]]; then
        "$py" benchmarks/triton_compile.py --out "$out/triton-$v" || status=1
    else
        "$py" -m pip install --quiet --no-deps --target "$work/triton-$v" "triton==$v"
        PYTHONPATH="$work/triton-$v" "$py" benchmarks/triton_compile.py --out "$out/triton-$v" || status=1
    fi
done
[[ $status == 0 ]] && echo "== Triton kernels: no compile error, no spill in a hot configuration (results: $out)"
exit $status
