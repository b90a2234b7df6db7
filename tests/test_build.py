"""Build decisions of setup.py (csrc/build_config.py): CUDA toolkit, architectures, C++ standard.

Nothing here compiles the extension; CI builds it for real against a CUDA torch
(.ci/run). The toolkit is faked by small nvcc scripts in a temporary folder.
"""
import importlib.util
import os
import runpy
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("build_config", ROOT / "csrc" / "build_config.py")
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)

NVCC_13_0 = """nvcc: NVIDIA (R) Cuda compiler driver
Copyright (c) 2005-2025 NVIDIA Corporation
Built on Wed_Aug_20_01:58:59_PM_PDT_2025
Cuda compilation tools, release 13.0, V13.0.88
Build cuda_13.0.r13.0/compiler.36424714_0
"""


def fake_toolkit(root: Path, release: str) -> Path:
    """A folder that looks like a CUDA toolkit whose bin/nvcc reports ``release`` and its root."""
    (root / "include").mkdir(parents=True)
    (root / "include" / "cuda_runtime.h").write_text("")
    (root / "bin").mkdir()
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text(
        "#!/bin/sh\n"
        f'echo "Cuda compilation tools, release {release}, V{release}.1"\n'
        f'echo "#$ TOP={root}/bin/.." >&2\n'
    )
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IXUSR)
    return root


# --- CUDA architectures ---------------------------------------------------------------------


@pytest.mark.parametrize("gpus", [[], [(8, 6)]])
def test_user_arch_list_wins(gpus):
    archs, why = build.cuda_arch_list("7.5;8.6", gpus)
    assert archs is None  # left to torch, which reads the variable itself
    assert "7.5;8.6" in why


def test_default_arch_list_without_gpu():
    for unset in (None, "", "  "):
        archs, why = build.cuda_arch_list(unset, [])
        assert archs == build.DEFAULT_CUDA_ARCH_LIST
        assert "no GPU" in why


def test_visible_gpus_left_to_torch():
    archs, why = build.cuda_arch_list(None, [(9, 0), (8, 0), (9, 0)])
    assert archs is None
    assert "8.0;9.0" in why
    assert build.cuda_arch_list("native", [(9, 0)])[0] is None


def test_native_without_gpu_is_an_error():
    with pytest.raises(build.BuildConfigError, match="no GPU is visible"):
        build.cuda_arch_list("native", [])


def test_default_arch_list_as_torch_reads_it(monkeypatch):
    """The default gives SASS for sm_80 and sm_90 and PTX for newer GPUs, in torch's own parser."""
    if not hasattr(cpp_extension, "_get_cuda_arch_flags"):
        pytest.skip(f"torch {torch.__version__} has no cpp_extension._get_cuda_arch_flags")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", build.DEFAULT_CUDA_ARCH_LIST)
    flags = set(cpp_extension._get_cuda_arch_flags())
    assert {"-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
            "-gencode=arch=compute_90,code=compute_90"} <= flags
    # CUDA 13 compiles nothing before 7.5; every entry must build with CUDA 12 and 13.
    for flag in flags:
        sm = int(flag.rsplit("_", 1)[1])
        assert sm >= 75, flag


# --- C++ standard ---------------------------------------------------------------------------

ATEN_GUARD = """#pragma once

#if !defined(_MSC_VER) && __cplusplus < {value}L
#error C++{std} or later compatible compiler is required to use ATen.
#endif
"""


@pytest.mark.parametrize("value, std", [(201703, 17), (202002, 20), (202302, 23)])
def test_cxx_standard_from_header_guard(value, std):
    header = ATEN_GUARD.format(value=value, std=std)
    # The header decides, whatever the version says.
    assert build.cxx_standard(header, "2.13.0+cpu") == std
    assert build.cxx_standard(header, "2.14.1+cu130") == std


def test_cxx_standard_never_below_17():
    assert build.cxx_standard(ATEN_GUARD.format(value=201402, std=14), "2.13.0") == 17


@pytest.mark.parametrize("version, std", [
    ("2.11.0+cu130", 17), ("2.13.0+cpu", 17), ("2.14.1+cu130", 20), ("2.14.0a0+git1234", 20),
    ("2.15.0.dev20270101+cpu", 20), ("3.0.0", 20),
])
def test_cxx_standard_by_version_without_header(version, std):
    assert build.cxx_standard(None, version) == std
    assert build.cxx_standard("#pragma once\n", version) == std


def _preprocess_aten(std: int) -> subprocess.CompletedProcess:
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler on PATH")
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    return subprocess.run([cxx, "-E", f"-std=c++{std}", *includes, "-x", "c++", "-", "-o", os.devnull],
                          input="#include <ATen/ATen.h>\n", capture_output=True, text=True, timeout=120)


def test_cxx_standard_of_installed_torch_is_the_least_its_headers_accept():
    std = build.probe_cxx_standard()
    accepted = _preprocess_aten(std)
    assert accepted.returncode == 0, accepted.stderr[-2000:]
    older = {17: 14, 20: 17, 23: 20}[std]
    refused = _preprocess_aten(older)
    assert refused.returncode != 0 and "#error" in refused.stderr, f"C++{older} was accepted too"


def test_compile_args_one_standard_for_both_compilers():
    args = build.compile_args(20, linux=True)
    assert "-std=c++20" in args["cxx"] and "-std=c++20" in args["nvcc"]
    assert "-fopenmp" in args["cxx"]
    assert "-fopenmp" not in build.compile_args(17, linux=False)["cxx"]
    # torch drops its arch detection when a flag mentions "arch": ours must not.
    assert not any("arch" in flag for flags in args.values() for flag in flags)


# --- CUDA toolkit -----------------------------------------------------------------------------


def test_parse_nvcc_release():
    assert build.parse_nvcc_release(NVCC_13_0) == (13, 0)
    assert build.parse_nvcc_release("Cuda compilation tools, release 12.8, V12.8.93") == (12, 8)
    assert build.parse_nvcc_release("not nvcc") is None


def test_mismatch_of_major_versions_says_what_to_do():
    message = build.cuda_mismatch_message("/opt/cuda-12.8/bin/nvcc", (12, 8), "2.13.0+cu130", "13.0")
    assert message is not None
    for needed in ("/opt/cuda-12.8/bin/nvcc", "12.8", "2.13.0+cu130", "13.0", "CUDA_HOME", "UE_FAST_NO_CUDA=1"):
        assert needed in message, needed


def test_no_mismatch_within_a_major_version():
    assert build.cuda_mismatch_message("nvcc", (13, 1), "2.13.0+cu130", "13.0") is None
    assert build.cuda_mismatch_message("nvcc", (12, 8), "2.13.0+cpu", None) is None


def test_probe_nvcc_release_runs_the_toolkits_nvcc(tmp_path):
    root = fake_toolkit(tmp_path / "cuda", "12.6")
    assert build.probe_nvcc_release(str(root)) == (str(root / "bin" / "nvcc"), (12, 6))
    assert build.probe_nvcc_release(str(tmp_path / "missing"))[1] is None


def test_find_cuda_home_behind_a_wrapper(tmp_path):
    """nvcc on PATH is a script outside the toolkit: its toolkit is asked for."""
    root = fake_toolkit(tmp_path / "cuda-13.0", "13.0")
    (tmp_path / "local" / "bin").mkdir(parents=True)
    wrapper = tmp_path / "local" / "bin" / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec "{root}/bin/nvcc" "$@"\n')
    wrapper.chmod(0o755)
    assert build.find_cuda_home({}, str(wrapper)) == str(root)
    # The user's setting, a toolkit that torch finds by itself, and no nvcc: nothing to do.
    assert build.find_cuda_home({"CUDA_HOME": "/elsewhere"}, str(wrapper)) is None
    assert build.find_cuda_home({"CUDA_PATH": "/elsewhere"}, str(wrapper)) is None
    assert build.find_cuda_home({}, str(root / "bin" / "nvcc")) is None
    assert build.find_cuda_home({}, None) is None


def test_parse_nvcc_toolkit_root():
    out = "#$ _HERE_=/usr/local/cuda-13.0/bin\n#$ TOP=/usr/local/cuda-13.0/bin/..\n#$ CICC_PATH=x\n"
    assert build.parse_nvcc_toolkit_root(out) == "/usr/local/cuda-13.0"
    assert build.parse_nvcc_toolkit_root("nvcc fatal: no input files") is None


# --- setup.py itself, with a faked CUDA build of torch ---------------------------------------


def run_setup(monkeypatch, capsys, *, cuda_home: Path, torch_cuda: str, arch_list: str) -> str:
    """Run setup.py --name as if torch were a CUDA build and cuda_home its toolkit; its stderr."""
    monkeypatch.setattr(torch.version, "cuda", torch_cuda)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(cuda_home))
    monkeypatch.setenv("CUDA_HOME", str(cuda_home))  # so setup.py leaves the machine's nvcc alone
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", arch_list)  # also restores the variable afterwards
    for name in ("UE_FAST_NO_EXT", "UE_FAST_NO_CUDA", "UE_FAST_FORCE_CUDA"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(sys, "argv", ["setup.py", "--name"])
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "path", list(sys.path))
    runpy.run_path(str(ROOT / "setup.py"), run_name="__main__")
    return capsys.readouterr().err


def test_setup_refuses_a_toolkit_of_another_major_version(monkeypatch, capsys, tmp_path):
    toolkit = fake_toolkit(tmp_path / "cuda-12.8", "12.8")
    with pytest.raises(SystemExit) as exit_info:
        run_setup(monkeypatch, capsys, cuda_home=toolkit, torch_cuda="13.0", arch_list="")
    message = str(exit_info.value.code)
    assert "CUDA 12.8" in message and "CUDA 13.0" in message and "UE_FAST_NO_CUDA=1" in message


def test_setup_sets_the_default_arch_list_without_gpu(monkeypatch, capsys, tmp_path):
    toolkit = fake_toolkit(tmp_path / "cuda-13.0", "13.0")
    err = run_setup(monkeypatch, capsys, cuda_home=toolkit, torch_cuda="13.0", arch_list="")
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == build.DEFAULT_CUDA_ARCH_LIST
    assert "CUDA sources on" in err


def test_setup_keeps_the_users_arch_list(monkeypatch, capsys, tmp_path):
    toolkit = fake_toolkit(tmp_path / "cuda-13.0", "13.0")
    run_setup(monkeypatch, capsys, cuda_home=toolkit, torch_cuda="13.0", arch_list="8.6")
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "8.6"


# --- supported torch range --------------------------------------------------------------------


def test_torch_range_is_the_same_for_build_and_run():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    torch_reqs = [r for r in pyproject["project"]["dependencies"] if r.startswith("torch")]
    build_reqs = [r for r in pyproject["build-system"]["requires"] if r.startswith("torch")]
    assert len(torch_reqs) == 1 and torch_reqs == build_reqs, (torch_reqs, build_reqs)
    readme = (ROOT / "README.md").read_text()
    assert f"`{torch_reqs[0]}`" in readme, f"README.md does not state the range {torch_reqs[0]}"
