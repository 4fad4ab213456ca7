"""The installed package serves C++ users: find_package(mmfuse) finds headers, library and
targets, and a program built against them runs and agrees with a plain loop."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mmfuse.cli.info import cmake_dir

REPO = Path(__file__).resolve().parents[2]


def _cmake() -> str:
    beside_python = Path(sys.executable).parent / "cmake"
    found = str(beside_python) if beside_python.exists() else shutil.which("cmake")
    assert found, "cmake is needed to build the C++ consumer example (pip install cmake)"
    return found


def test_mmfuse_info_cmakedir_holds_the_package_config():
    out = subprocess.run([sys.executable, "-m", "mmfuse", "info", "--cmakedir"], check=True,
                         capture_output=True, text=True).stdout.strip()
    assert Path(out) == cmake_dir()
    if not (Path(out) / "mmfuseConfig.cmake").exists():
        pytest.fail(f"{out}/mmfuseConfig.cmake is missing: run the tests against an installed package "
                    "(`make test` installs it), not a bare source tree")


def test_cpp_example_builds_against_installed_package_and_runs(tmp_path):
    if not (cmake_dir() / "mmfuseConfig.cmake").exists():
        pytest.fail("mmfuse is not installed with its CMake package (run `make test`, which installs it)")
    build = tmp_path / "build"
    env = dict(os.environ)
    subprocess.run([_cmake(), "-S", str(REPO / "examples" / "cpp"), "-B", str(build),
                    f"-Dmmfuse_DIR={cmake_dir()}", "-DCMAKE_BUILD_TYPE=Release"],
                   check=True, capture_output=True, text=True, env=env)
    subprocess.run([_cmake(), "--build", str(build)], check=True, capture_output=True, text=True, env=env)
    run = subprocess.run([str(build / "rms_norm_example")], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    first, second = run.stdout.strip().splitlines()
    assert first.startswith("mmfuse 0.1.0 isa=") and "rows=5 dim=80" in first
    assert float(first.split("max_abs_diff=")[1]) < 1e-5
    assert second == "OK"
