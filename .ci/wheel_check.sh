#!/usr/bin/env bash
# Packaging check: what `pip install .`, a wheel or an sdist installs, which editable
# installs (and so the test suite) never see.
#   1. an sdist of the working tree, and a wheel built from that sdist (compiles
#      ue_fast._C once, CPU only);
#   2. a wheel built straight from the tree with UE_FAST_NO_EXT=1 (no second
#      compile): both wheels must hold the same files, less the compiled module;
#   3. the wheels hold every module of ue_fast/ and kernels/ (as ue_fast.kernels,
#      never a top-level `kernels`), py.typed and the demo subset; the sdist holds
#      every source the build needs;
#   4. the compiled wheel installed (non-editable) into the fresh virtual environment
#      that built it, its build tools removed first; from a folder outside the
#      checkout: `ue-fast --help`, `ue-fast check --device cpu` and a tiny
#      `ue-fast protect` of the demo subset shipped in the wheel.
# Builds in a copy of the working tree (tracked and untracked, not ignored files), so
# the checkout's build/, *.egg-info and ue_fast/_C*.so neither leak in nor change.
# Needs python3 (with venv), pip and a C++ compiler. torch==2.13.0 is installed first,
# so that pip never resolves another torch (a multi-gigabyte download); one virtual
# environment serves the build and the install, as torch takes most of the time
# to install (and to delete).
#   usage: bash .ci/wheel_check.sh            (PYTHON=python3.12 to pick the interpreter)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
TORCH_REQ="torch==2.13.0"
start=$SECONDS
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
# Nothing from the caller's environment may put the checkout or other packages on the path.
unset PYTHONPATH PYTHONHOME
export PYTHONNOUSERSITE=1
# CI has no GPU: never compile the CUDA sources, even where nvcc and a CUDA torch exist.
export UE_FAST_NO_CUDA=1
unset UE_FAST_NO_EXT UE_FAST_FORCE_CUDA

step() { echo "== [$((SECONDS - start)) s] $*"; }
fail() { echo "FAILED: $*" >&2; exit 1; }
# Runs a command with its output in a log; prints the log's end when it fails.
logged() {
  local log="$WORK/$1.log"; shift
  if ! "$@" >"$log" 2>&1; then
    echo "---- last lines of the output of: $*" >&2
    tail -n 60 "$log" >&2
    fail "$*"
  fi
}
torch_version() { "$VENV_PY" -c 'import importlib.metadata as m; print(m.version("torch"))'; }

step "copy of the working tree -> $WORK/src"
"$PYTHON" "$ROOT/.ci/copy_tree.py" "$ROOT" "$WORK/src"

step "fresh virtual environment: $TORCH_REQ first, then setuptools, wheel, ninja, build"
"$PYTHON" -m venv "$WORK/venv"
VENV_PY="$WORK/venv/bin/python"
logged pip "$VENV_PY" -m pip install --upgrade pip
logged torch "$VENV_PY" -m pip install "$TORCH_REQ"
torch_before="$(torch_version)"
logged build-tools "$VENV_PY" -m pip install "setuptools>=64" wheel ninja build
[[ "$(torch_version)" == "$torch_before" ]] || fail "installing the build tools replaced torch $torch_before"
echo "torch $torch_before, $("$VENV_PY" --version)"

# `python -m build` checks that the build environment satisfies [build-system] requires.
step "sdist, then a wheel from the sdist (compiles ue_fast._C, about 1.5 min on 2 cores)"
t=$SECONDS
logged build-sdist "$VENV_PY" -m build --no-isolation --outdir "$WORK/dist-sdist" "$WORK/src"
echo "built in $((SECONDS - t)) s: $(cd "$WORK/dist-sdist" && echo *)"

step "wheel straight from the tree (UE_FAST_NO_EXT=1: the same files less ue_fast/_C*.so, no second compile)"
logged build-tree env UE_FAST_NO_EXT=1 "$VENV_PY" -m build --no-isolation --wheel --outdir "$WORK/dist-tree" "$WORK/src"
echo "built: $(cd "$WORK/dist-tree" && echo *)"

step "contents of the sdist and the wheels"
"$VENV_PY" - "$WORK" <<'PY'
import glob, os, re, sys, tarfile, zipfile

work = sys.argv[1]
src = os.path.join(work, "src")


def one(pattern):
    found = glob.glob(os.path.join(work, pattern))
    if len(found) != 1:
        sys.exit(f"FAILED: expected one {pattern}, found {found}")
    return found[0]


sdist, wheel, tree_wheel = one("dist-sdist/*.tar.gz"), one("dist-sdist/*.whl"), one("dist-tree/*.whl")
ok = True


def check(cond, message):
    global ok
    if not cond:
        ok = False
        print("FAILED:", message, file=sys.stderr)


# The tree as copied: every file of the sources a wheel or an sdist needs.
tree = sorted(os.path.relpath(os.path.join(d, f), src).replace(os.sep, "/")
              for d, _, files in os.walk(src) for f in files)
package_files = [f for f in tree if f.startswith("ue_fast/") and (f.endswith(".py") or f.startswith("ue_fast/data/demo/"))]
package_files += ["ue_fast/py.typed"]
kernel_files = [f for f in tree if f.startswith("kernels/") and f.endswith(".py")]
in_wheel = sorted(package_files + ["ue_fast/" + f for f in kernel_files])
check("ue_fast/generation/__init__.py" in in_wheel and "ue_fast/kernels/__init__.py" in in_wheel,
      "the tree has no ue_fast/generation or kernels package")

# The sdist: every source a build needs, and no build output.
with tarfile.open(sdist) as tar:
    names = [m.name.split("/", 1)[1] for m in tar.getmembers() if m.isfile()]
needed = ([f for f in tree if f.startswith("csrc/") and "__pycache__" not in f]
          + package_files + kernel_files + ["setup.py", "pyproject.toml", "README.md", "MANIFEST.in"])
missing = sorted(set(needed) - set(names))
check(not missing, f"not in the sdist: {missing}")
junk = sorted(n for n in names if re.search(r"(\.so|\.pyd|\.py[cod]|__pycache__/.*)$", n))
check(not junk, f"build outputs in the sdist: {junk}")
folders = {}
for n in names:
    top = n.split("/", 1)[0] + ("/" if "/" in n else "")
    folders[top] = folders.get(top, 0) + 1
print(f"sdist {os.path.basename(sdist)}: {len(names)} files: "
      + ", ".join(f"{k} ({v})" if k.endswith("/") else k for k, v in sorted(folders.items())))

ext = re.compile(r"^ue_fast/_C\.[^/]*\.(so|pyd)$")
lists = {}
for label, path in (("wheel from the sdist", wheel), ("wheel from the tree", tree_wheel)):
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    lists[label] = sorted(n for n in names if not ext.match(n))
    top = sorted({n.split("/", 1)[0] for n in names})
    check(top[0] == "ue_fast" and len(top) == 2 and top[1].endswith(".dist-info"),
          f"{label}: top-level entries {top} (only ue_fast/ and its .dist-info may be)")
    missing = sorted(set(in_wheel) - set(names))
    check(not missing, f"{label}: missing {missing}")
    packages = sorted({n.rsplit("/", 1)[0].replace("/", ".") for n in names
                       if n.startswith("ue_fast/") and n.endswith("/__init__.py")} | {"ue_fast"})
    exts = [n for n in names if ext.match(n)]
    print(f"{label} {os.path.basename(path)}: {len(names)} files, packages {packages}, extension {exts}")
    if label == "wheel from the sdist":
        check(len(exts) == 1, f"{label}: expected one compiled ue_fast/_C module, found {exts}")
    else:
        check(not exts, f"{label}: built with UE_FAST_NO_EXT=1 but holds {exts}")

a, b = lists.values()
check(a == b, "the two wheels hold different files: only in the sdist's "
      f"{sorted(set(a) - set(b))}, only in the tree's {sorted(set(b) - set(a))}")
if not ok:
    sys.exit(1)
print("OK: the sdist and both wheels hold what they should; the wheels the same files")
PY

WHEEL="$(echo "$WORK"/dist-sdist/*.whl)"
step "install $(basename "$WHEEL") (non-editable) after removing the build tools"
# ue_fast needs none of them at run time (setuptools stays: venv puts it there anyway).
logged uninstall-build-tools "$VENV_PY" -m pip uninstall --yes build pyproject_hooks ninja wheel
logged install-wheel "$VENV_PY" -m pip install "$WHEEL"
torch_after="$(torch_version)"
[[ "$torch_after" == "$torch_before" ]] || fail "installing the wheel replaced torch $torch_before by $torch_after"
logged pip-check "$VENV_PY" -m pip check
echo "torch $torch_after kept; $("$VENV_PY" -m pip show ue-fast | grep -E '^(Name|Version|Location):' | tr '\n' ' ')"

# From a folder outside the checkout, with the venv's entry point.
mkdir -p "$WORK/run"
cd "$WORK/run"
export PATH="$WORK/venv/bin:$PATH"
step "import check (from $PWD)"
python - "$ROOT" <<'PY'
import importlib.util, os, sys
root = os.path.realpath(sys.argv[1])
import ue_fast, ue_fast.generation, ue_fast.kernels, ue_fast._C  # noqa: E401
where = os.path.realpath(os.path.dirname(ue_fast.__file__))
assert os.path.commonpath([where, root]) != root, f"ue_fast imported from the checkout: {where}"
assert os.path.commonpath([where, os.path.realpath(sys.prefix)]) == os.path.realpath(sys.prefix), where
assert os.path.dirname(os.path.realpath(ue_fast.kernels.__file__)) == os.path.join(where, "kernels")
assert importlib.util.find_spec("kernels") is None, "a top-level `kernels` module is installed"
assert os.path.isfile(os.path.join(where, "py.typed")), "no py.typed"
print(f"OK: ue_fast {ue_fast.__version__} from {where}; ue_fast._C, ue_fast.generation, ue_fast.kernels import")
PY

step "ue-fast --help"
ue-fast --help

step "ue-fast check --device cpu"
ue-fast check --device cpu

step "ue-fast protect: 2 classes x 4 images of the shipped demo subset"
demo="$(python -c 'import ue_fast.data as d; print(d.demo_dir())')"
[[ -d "$demo/train" ]] || fail "no demo subset in the installed package: $demo"
mapfile -t classes < <(find "$demo/train" -mindepth 1 -maxdepth 1 -type d | sort | head -n 2)
[[ ${#classes[@]} -eq 2 ]] || fail "fewer than 2 classes in $demo/train"
for c in "${classes[@]}"; do
  mkdir -p "in/$(basename "$c")"
  mapfile -t images < <(find "$c" -maxdepth 1 -type f -name '*.jpg' | sort | head -n 4)
  [[ ${#images[@]} -eq 4 ]] || fail "fewer than 4 images in $c"
  cp "${images[@]}" "in/$(basename "$c")/"
done
ue-fast protect in out --arch cnn-small --epochs 1 --preset cpu-small --device cpu --no-progress
[[ -f out/manifest.json ]] || fail "ue-fast protect wrote no out/manifest.json (out/ holds: $(ls out 2>/dev/null | tr '\n' ' '))"
python -c 'import json, sys; json.load(open(sys.argv[1]))' out/manifest.json || fail "out/manifest.json is not JSON"
echo "OK: out/ holds $(ls out | tr '\n' ' ')"

echo "== [$((SECONDS - start)) s] wheel check passed"
