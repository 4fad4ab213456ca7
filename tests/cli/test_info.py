"""`mmfuse info` reports what a bug report needs: versions, SIMD flavours, threads, backends."""

import json
import subprocess
import sys

import torch

import mmfuse
import mmfuse._C as C


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mmfuse", *args], capture_output=True, text=True, check=True)


def test_info_json_names_versions_isas_threads_and_backends():
    report = json.loads(_run("info", "--json").stdout)
    assert report["mmfuse"] == mmfuse.__version__
    assert report["torch"] == torch.__version__
    core = report["cpp_core"]
    assert core["active_isa"] in core["compiled_isas"]
    assert set(core["cpu_supported_isas"]) <= set(core["compiled_isas"])
    assert "generic" in core["compiled_isas"]
    assert core["openmp_default_threads"] >= 1 and report["torch_threads"] >= 1
    assert report["backends"]["cpp (cpu)"] == "usable"


def test_info_honours_the_isa_override():
    lowest = C.supported_isas()[0]
    out = subprocess.run([sys.executable, "-m", "mmfuse", "info", "--json"], capture_output=True, text=True,
                         check=True, env={**__import__("os").environ, "MMFUSE_CPU_ISA": lowest}).stdout
    assert json.loads(out)["cpp_core"]["active_isa"] == lowest


def test_help_lists_the_commands():
    out = _run("--help").stdout
    assert "info" in out and "demo" in out
