"""`mmfuse info`: versions, the compiled SIMD flavours, threads and usable backends.
`mmfuse info --cmakedir` prints the folder to pass as -Dmmfuse_DIR= to CMake."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
from pathlib import Path

import mmfuse
from mmfuse import _core


def cmake_dir() -> Path:
    return Path(mmfuse.__file__).resolve().parent / "lib" / "cmake" / "mmfuse"


def include_dir() -> Path:
    return Path(mmfuse.__file__).resolve().parent / "include"


def _module_version(name: str) -> str | None:
    if importlib.util.find_spec(name) is None:
        return None
    try:
        module = importlib.import_module(name)
    except Exception as exc:  # a present but broken install is worth reporting, not crashing on
        return f"present but fails to import: {exc}"
    return getattr(module, "__version__", "unknown")


def _triton_status(cuda: bool) -> str:
    """Whether CUDA tensors will run the Triton kernels (rms_norm, swiglu, rotary, apply_mrope)."""
    version = _module_version("triton")
    if version is None:
        return "triton not installed (CUDA tensors run the reference)"
    if version.startswith("present but"):
        return version
    return f"usable (triton {version})" if cuda else f"no CUDA device (triton {version} installed)"


def collect() -> dict:
    import torch

    C = _core.load()
    report = {
        "mmfuse": mmfuse.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "triton": _module_version("triton"),
        "torch_npu": _module_version("torch_npu"),
        "cpp_core": None,
        "backends": {},
        "cmake_dir": str(cmake_dir()),
    }
    if C is not None:
        report["cpp_core"] = {
            "version": C.version(),
            "compiled_isas": C.compiled_isas(),
            "cpu_supported_isas": C.supported_isas(),
            "active_isa": C.active_isa(),
            "openmp_default_threads": C.default_num_threads(),
        }
    cuda = torch.cuda.is_available()
    npu = hasattr(torch, "npu") and torch.npu.is_available()
    report["backends"] = {
        "cpp (cpu)": "usable" if C is not None else f"unavailable: {_core.error()}",
        "reference (any device)": "usable",
        "triton (cuda)": _triton_status(cuda),
        "npu (torch_npu)": "not part of this build yet" if npu else "no NPU device",
        "MMFUSE_BACKEND": os.environ.get("MMFUSE_BACKEND", "auto"),
    }
    return report


def run(args: argparse.Namespace) -> int:
    if args.cmakedir:
        print(cmake_dir())
        return 0
    if args.includedir:
        print(include_dir())
        return 0
    report = collect()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    width = max(len(k) for k in report)
    for key, value in report.items():
        if isinstance(value, dict):
            print(f"{key}:")
            for k, v in value.items():
                print(f"  {k:<24} {v}")
        else:
            print(f"{key:<{width}}  {value}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="versions, SIMD level, threads and usable backends",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cmakedir", action="store_true", help="print the folder for -Dmmfuse_DIR= and exit")
    p.add_argument("--includedir", action="store_true", help="print the C++ include folder and exit")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=run)
