"""Build decisions for the extension ``ue_fast._C``, imported by setup.py.

Kept out of the ``ue_fast`` package (nothing here is needed at run time). The
decisions are pure functions of what they are given, so tests/test_build.py
checks them without compiling anything; ``probe_*`` gather the facts from the
installed torch and CUDA toolkit.
"""
from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Mapping, Sequence

# Used when TORCH_CUDA_ARCH_LIST is unset and no GPU is visible (build
# containers, login nodes, CI), where torch's own detection has nothing to read.
# SASS for sm_80 (A100; its binaries also run on 8.6 and 8.9) and sm_90
# (H100/H200), plus compute_90 PTX that the driver compiles for newer GPUs
# (Blackwell) on first use. CUDA 12 and 13 both support these (CUDA 13 dropped
# the archs before 7.5), and no torch >= 2.11 is built with an older CUDA.
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"

# torch versions whose headers need C++20, for a torch whose ATen.h cannot be
# read (its guard is what normally decides; 2.14 was the first to require it).
_CXX20_FROM_TORCH = (2, 14)


class BuildConfigError(RuntimeError):
    """The build cannot work as configured; the message says what to change."""


def cuda_arch_list(env_value: str | None, visible_capabilities: Sequence[tuple[int, int]]) -> tuple[str | None, str]:
    """The TORCH_CUDA_ARCH_LIST to build with and why.

    ``env_value``: the user's TORCH_CUDA_ARCH_LIST (None or blank when unset);
    ``visible_capabilities``: the compute capabilities of the visible GPUs.
    Returns ``(arch_list, reason)``; ``arch_list`` is None where torch's
    BuildExtension should decide (the user's setting, or the visible GPUs).
    With a GPU visible the extension is being built where it will run (as on
    the GPU machines, which build in place), so torch's detection serves: code
    for exactly those GPUs, clamped to what torch's CUDA supports.
    """
    value = (env_value or "").strip()
    if value and value != "native":
        return None, f"TORCH_CUDA_ARCH_LIST={value!r} (set by the user)"
    if visible_capabilities:
        archs = ";".join(sorted({f"{major}.{minor}" for major, minor in visible_capabilities}))
        return None, f"the visible GPUs ({archs}), detected by torch"
    if value == "native":
        raise BuildConfigError(
            "TORCH_CUDA_ARCH_LIST='native' but no GPU is visible to read an architecture from: "
            f"set TORCH_CUDA_ARCH_LIST to a list such as {DEFAULT_CUDA_ARCH_LIST!r}, or unset it "
            "to get that default."
        )
    return DEFAULT_CUDA_ARCH_LIST, "default (no GPU visible and TORCH_CUDA_ARCH_LIST unset)"


def _version_tuple(version: str) -> tuple[int, ...]:
    """``"2.14.1+cu130"`` -> ``(2, 14, 1)``; parts that are not numbers end it."""
    parts = []
    for part in version.split("+")[0].split("."):
        digits = re.match(r"\d+", part)
        if digits is None:
            break
        parts.append(int(digits.group()))
        if digits.group() != part:  # "0rc1", "0a0": a pre-release of this number
            break
    return tuple(parts)


def cxx_standard(aten_header: str | None, torch_version: str) -> int:
    """The C++ standard (17 or newer) to compile against this torch's headers.

    ``aten_header``: the text of torch's ``ATen/ATen.h`` (None if unreadable),
    whose guard ``#if ... __cplusplus < 202002L`` / ``#error C++20 or later ...``
    states the standard the headers need. Without it, torch >= 2.14 means 20.
    C++17 wherever it suffices: it asks the least of the host compiler.
    """
    if aten_header is not None:
        # __cplusplus is YYYYMM of the standard's year: 201703L is C++17, 202002L C++20.
        required = [int(year) % 100 for year in re.findall(r"__cplusplus\s*<\s*(\d{4})\d{2}L?", aten_header)]
        if required:
            return max(17, *required)
    return 20 if _version_tuple(torch_version)[:2] >= _CXX20_FROM_TORCH else 17


def parse_nvcc_release(nvcc_version_output: str) -> tuple[int, int] | None:
    """``(major, minor)`` from ``nvcc --version`` output ("... release 13.0, V13.0.88"), or None."""
    match = re.search(r"release (\d+)\.(\d+)", nvcc_version_output)
    return (int(match.group(1)), int(match.group(2))) if match else None


def cuda_mismatch_message(
    nvcc: str, nvcc_release: tuple[int, int], torch_version: str, torch_cuda: str | None
) -> str | None:
    """Why the toolkit cannot build against this torch, or None when it can.

    A different CUDA major version cannot work (torch's headers and libraries
    are built for one); a different minor version only makes torch warn.
    """
    if torch_cuda is None:
        return None
    torch_major = int(torch_cuda.split(".")[0])
    if nvcc_release[0] == torch_major:
        return None
    toolkit = f"{nvcc_release[0]}.{nvcc_release[1]}"
    return (
        f"the CUDA toolkit at {nvcc} is CUDA {toolkit}, but torch {torch_version} was built with "
        f"CUDA {torch_cuda}: an extension built with CUDA {nvcc_release[0]} cannot work with it. Either "
        f"install a CUDA {torch_major}.x toolkit and point CUDA_HOME at it (CUDA_HOME=/path/to/cuda-{torch_cuda}), "
        f"install the torch build for CUDA {nvcc_release[0]}, or set UE_FAST_NO_CUDA=1 to build the CPU op only."
    )


def is_cuda_toolkit(path: str) -> bool:
    """Whether ``path`` is the root of a CUDA toolkit (it has ``include/cuda_runtime.h``)."""
    return os.path.isfile(os.path.join(path, "include", "cuda_runtime.h"))


def parse_nvcc_toolkit_root(nvcc_dryrun_output: str) -> str | None:
    """The toolkit root from ``nvcc -v --dryrun`` output (its line ``#$ TOP=/usr/local/cuda-13.0/bin/..``)."""
    match = re.search(r"^#\$ TOP=(.+)$", nvcc_dryrun_output, re.MULTILINE)
    return os.path.normpath(match.group(1).strip()) if match else None


def find_cuda_home(env: Mapping[str, str], nvcc_on_path: str | None) -> str | None:
    """A CUDA_HOME to set where torch's own guess would miss the toolkit, else None.

    torch takes CUDA_HOME or CUDA_PATH, else the grandparent of the first nvcc on
    PATH. That misses when this nvcc is a link or wrapper script outside the
    toolkit (``/usr/local/bin/nvcc`` running ``/usr/local/cuda-13.0/bin/nvcc``):
    torch would then look in ``/usr/local`` for the CUDA headers and libcudart,
    and linking fails. nvcc itself knows where its toolkit is.
    """
    if env.get("CUDA_HOME") or env.get("CUDA_PATH") or nvcc_on_path is None:
        return None
    if is_cuda_toolkit(os.path.dirname(os.path.dirname(nvcc_on_path))):
        return None
    try:
        out = subprocess.run(
            [nvcc_on_path, "-v", "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
            capture_output=True, text=True, timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    root = parse_nvcc_toolkit_root(out.stderr + out.stdout)
    return root if root is not None and is_cuda_toolkit(root) else None


def compile_args(std: int, linux: bool) -> dict[str, list[str]]:
    """``extra_compile_args`` for the C++ and the nvcc compiles, one standard for both."""
    cxx = ["-O3", f"-std=c++{std}"]
    if linux:
        cxx.append("-fopenmp")  # at::parallel_for is OpenMP-backed in torch's Linux builds
    return {"cxx": cxx, "nvcc": ["-O3", f"-std=c++{std}"]}


def probe_cxx_standard() -> int:
    """:func:`cxx_standard` for the installed torch."""
    import torch
    from torch.utils.cpp_extension import include_paths

    try:
        with open(os.path.join(include_paths()[0], "ATen", "ATen.h"), encoding="utf-8") as header:
            text: str | None = header.read()
    except OSError:
        text = None
    return cxx_standard(text, torch.__version__)


def probe_nvcc_release(cuda_home: str) -> tuple[str, tuple[int, int] | None]:
    """The nvcc that torch's BuildExtension will run (``$CUDA_HOME/bin/nvcc``) and its release."""
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return nvcc, None
    return nvcc, parse_nvcc_release(out)


def probe_cuda_arch_list(env: Mapping[str, str]) -> tuple[str | None, str]:
    """:func:`cuda_arch_list` for this machine's environment and visible GPUs."""
    import torch

    capabilities = [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
    return cuda_arch_list(env.get("TORCH_CUDA_ARCH_LIST"), capabilities)
