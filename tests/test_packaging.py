"""What a wheel of ue_fast holds, from the build configuration (setup.py + pyproject.toml)
as setuptools reads it: no build, a fraction of a second.

A sub-package left out of the packaging config breaks only non-editable installs
(`pip install .`, a wheel, an sdist), which the rest of the tests never see: an
editable install serves the source tree. .ci/wheel_check.sh builds and installs
real wheels.
"""
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def dist():
    """The build's packages, package_dir and wheel files (relative to the wheel's root), from
    the setuptools Distribution that setup.py makes, stopped once its configuration is read."""
    import setuptools  # noqa: F401  (provides distutils on Python >= 3.12)
    from distutils.core import run_setup

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)  # setuptools reads pyproject.toml and finds files from the working directory
        mp.setenv("UE_FAST_NO_EXT", "1")  # the packages do not depend on the extension
        mp.setattr(sys, "path", list(sys.path))  # setup.py adds csrc/
        mp.setattr(sys, "argv", list(sys.argv))
        d = run_setup(str(ROOT / "setup.py"), script_args=["--name"], stop_after="config")
        # What build_py copies into the wheel: every module and package data file.
        build_py = d.get_command_obj("build_py")
        build_py.ensure_finalized()
        lib = Path(build_py.build_lib)
        files = {Path(p).relative_to(lib).as_posix() for p in build_py.get_outputs(include_bytecode=False)}
    return SimpleNamespace(packages=list(d.packages or []), package_dir=dict(d.package_dir or {}), files=files)


def _files(folder: Path):
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        for name in filenames:
            yield Path(dirpath, name)


def test_every_subpackage_is_packaged(dist):
    on_disk = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "ue_fast").rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    assert {"ue_fast", "ue_fast.generation"} <= on_disk  # the walk itself works
    expected = on_disk | {"ue_fast.kernels"}
    assert set(dist.packages) == expected, (
        f"missing: {sorted(expected - set(dist.packages))}, unexpected: {sorted(set(dist.packages) - expected)}")


def test_kernels_install_as_ue_fast_kernels(dist):
    assert dist.package_dir.get("ue_fast.kernels") == "kernels"
    assert "kernels" not in dist.packages
    outside = sorted(f for f in dist.files if f.split("/")[0] != "ue_fast")
    assert not outside, f"installs outside ue_fast/: {outside}"


def test_every_source_file_is_in_the_wheel(dist):
    files = dist.files
    expected = {p.relative_to(ROOT).as_posix() for p in _files(ROOT / "ue_fast") if p.suffix == ".py"}
    expected |= {"ue_fast/kernels/" + p.relative_to(ROOT / "kernels").as_posix()
                 for p in _files(ROOT / "kernels") if p.suffix == ".py"}
    assert "ue_fast/generation/__init__.py" in expected and "ue_fast/kernels/__init__.py" in expected
    missing = sorted(expected - files)
    assert not missing, f"not in the wheel (a folder without __init__.py?): {missing}"


def test_package_data_is_in_the_wheel(dist):
    files = dist.files
    demo = {p.relative_to(ROOT).as_posix() for p in _files(ROOT / "ue_fast" / "data" / "demo")}
    assert any(f.startswith("ue_fast/data/demo/train/") for f in demo)
    assert "ue_fast/data/demo/README.md" in demo
    assert not sorted(demo - files), f"demo files not in the wheel: {sorted(demo - files)[:10]}"
    assert "ue_fast/py.typed" in files


def test_py_typed_exists():
    # PEP 561: type checkers use the annotations of an installed ue_fast only with this marker.
    assert (ROOT / "ue_fast" / "py.typed").is_file()
