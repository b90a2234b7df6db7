"""Build of the ue_fast C++/CUDA extension (``ue_fast._C``), and its packages.

Metadata lives in pyproject.toml; this file only declares the packages (see
PACKAGES) and the extension. The extension's decisions (C++ standard, CUDA
toolkit and architectures) are made by csrc/build_config.py.

Environment switches:
  UE_FAST_NO_EXT=1      build no extension at all (the torch backends then serve)
  UE_FAST_FORCE_CUDA=1  compile the CUDA sources even if no CUDA build of torch
                        or CUDA toolkit is detected (the build fails if it cannot)
  UE_FAST_NO_CUDA=1     never compile the CUDA sources
  TORCH_CUDA_ARCH_LIST  GPU architectures, e.g. "8.0;9.0+PTX" (default: those of
                        the visible GPUs, else build_config.DEFAULT_CUDA_ARCH_LIST)
  CUDA_HOME             the CUDA toolkit (default: the one of the nvcc on PATH)
"""
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))

# The build's decisions live beside the sources they are for (setuptools' PEP 517
# backend does not put the project on sys.path anyway).
sys.path.insert(0, os.path.join(ROOT, "csrc"))
import build_config  # noqa: E402

# ue_fast and every sub-package of it (a folder with an __init__.py), found rather
# than listed so that a new one cannot be left out of the wheel; plus kernels/,
# which lives at the top of the repository but installs as ue_fast.kernels (never
# as a top-level `kernels`: that name is taken on PyPI). Package data is declared
# in pyproject.toml; tests/test_packaging.py checks what the wheel gets.
PACKAGE_DIR = {"ue_fast.kernels": "kernels"}
PACKAGES = sorted(find_packages(where=ROOT, include=["ue_fast", "ue_fast.*"]) + list(PACKAGE_DIR))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _note(message: str) -> None:
    print(f"ue_fast: {message}", file=sys.stderr)


def _extensions():
    if _flag("UE_FAST_NO_EXT"):
        return [], {}
    import torch

    force_cuda = _flag("UE_FAST_FORCE_CUDA")
    want_cuda = force_cuda or (not _flag("UE_FAST_NO_CUDA") and torch.version.cuda is not None)
    if want_cuda:
        # Before torch.utils.cpp_extension is imported: it reads CUDA_HOME once, then.
        cuda_home = build_config.find_cuda_home(os.environ, shutil.which("nvcc"))
        if cuda_home is not None:
            os.environ["CUDA_HOME"] = cuda_home
            _note(f"CUDA_HOME={cuda_home} (the toolkit of the nvcc on PATH)")
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    with_cuda = force_cuda or (want_cuda and CUDA_HOME is not None)
    std = build_config.probe_cxx_standard()
    args = build_config.compile_args(std, linux=sys.platform.startswith("linux"))
    sources = ["csrc/bindings.cpp", "csrc/covariance.cpp"]
    cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=True)}
    _note(f"torch {torch.__version__}, C++{std}, CUDA sources {'on' if with_cuda else 'off'}"
          + (" (no CUDA toolkit found: set CUDA_HOME)" if want_cuda and not with_cuda else ""))
    if not with_cuda:
        return [CppExtension("ue_fast._C", sources, extra_compile_args=args)], cmdclass

    if CUDA_HOME is not None:
        # torch's own check comes later, in build_ext, and says neither why nor what to do.
        nvcc, release = build_config.probe_nvcc_release(CUDA_HOME)
        if release is not None:
            problem = build_config.cuda_mismatch_message(nvcc, release, torch.__version__, torch.version.cuda)
            if problem:
                sys.exit(f"error: {problem}")
    try:
        archs, why = build_config.probe_cuda_arch_list(os.environ)
    except build_config.BuildConfigError as err:
        sys.exit(f"error: {err}")
    if archs is not None:
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs  # read by BuildExtension when it compiles the .cu file
    _note(f"CUDA architectures {archs}: {why}" if archs else f"CUDA architectures: {why}")
    ext = CUDAExtension(
        "ue_fast._C", sources + ["csrc/covariance_cuda.cu"], define_macros=[("UE_FAST_WITH_CUDA", None)],
        extra_compile_args=args,
    )
    return [ext], cmdclass


ext_modules, cmdclass = _extensions()
setup(packages=PACKAGES, package_dir=PACKAGE_DIR, ext_modules=ext_modules, cmdclass=cmdclass)
