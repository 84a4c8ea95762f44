#!/usr/bin/env python3
"""Compile-only check of fastlstm's ATen-version-sensitive CUDA host files against an older torch's headers.

The GPU machine's torch is 2.11 while CI builds against a newer one; csrc/cuda/fp32_precision.cpp
reads ATen's fp32-precision API, whose enums are recent, and csrc/cuda/cublas_gemm.cpp calls cuBLAS
through ATen. This compiles both with ``-fsyntax-only`` against torch 2.11.0's include tree, so a
use of an API 2.11 lacks fails CI instead of the GPU run.

The include tree is taken from the torch wheel (``pip download``, ~530 MB once) and kept in
``$XDG_CACHE_HOME/fastlstm/torch-<version>-include`` (default ``~/.cache``); later runs only compile
(a few seconds). The CUDA runtime headers come from the toolkit (CUDA_HOME or /usr/local/cuda), the
cuBLAS headers from the toolkit or the running torch's ``nvidia/*/include``, as setup.py finds them.

    python tests/torch_headers_check.py [--version 2.11.0]
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [ROOT / "csrc" / "cuda" / "cublas_gemm.cpp", ROOT / "csrc" / "cuda" / "fp32_precision.cpp"]


def cache_dir(version: str) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "fastlstm" / f"torch-{version}-include"


def include_tree(version: str) -> Path:
    """The ``torch/include`` directory of torch ``version``, extracted once into the cache."""
    target = cache_dir(version)
    if (target / ".complete").exists():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        f"torch=={version}", "-d", tmp], check=True)
        wheels = glob.glob(os.path.join(tmp, "torch-*.whl"))
        if len(wheels) != 1:
            sys.exit(f"torch_headers_check: expected one torch wheel in {tmp}, found {wheels}")
        staging = Path(tmp) / "include"
        prefix = "torch/include/"
        with zipfile.ZipFile(wheels[0]) as wheel:
            for name in wheel.namelist():
                if name.startswith(prefix) and not name.endswith("/"):
                    out = staging / name[len(prefix):]
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_bytes(wheel.read(name))
        (staging / ".complete").write_text(version + "\n")
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging), str(target))
    return target


def cuda_include_dirs() -> list[Path]:
    """The CUDA runtime headers and the cuBLAS headers (toolkit first, then the torch wheel's)."""
    home = Path(os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda")
    toolkit = home / "include"
    if not (toolkit / "cuda_runtime_api.h").exists():
        sys.exit(f"torch_headers_check: no CUDA toolkit headers at {toolkit} (set CUDA_HOME)")
    if (toolkit / "cublas_v2.h").exists():
        return [toolkit]
    for base in sys.path:
        for inc in sorted(glob.glob(os.path.join(base, "nvidia", "*", "include"))):
            if os.path.exists(os.path.join(inc, "cublas_v2.h")):
                return [toolkit, Path(inc)]
    sys.exit("torch_headers_check: no cublas_v2.h in the toolkit nor in this Python's nvidia/*/include")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", default="2.11.0", help="torch version whose headers to check against")
    args = parser.parse_args()
    torch_include = include_tree(args.version)
    includes = [torch_include, torch_include / "torch" / "csrc" / "api" / "include", *cuda_include_dirs()]
    failed = 0
    for source in SOURCES:
        command = [os.environ.get("CXX", "c++"), "-std=c++17", "-fsyntax-only", "-DFASTLSTM_WITH_CUDA",
                   f"-I{ROOT / 'csrc'}"] + [flag for d in includes for flag in ("-isystem", str(d))] + [str(source)]
        done = subprocess.run(command)
        verdict = "ok" if done.returncode == 0 else "FAILED"
        print(f"torch_headers_check: {source.relative_to(ROOT)} against torch {args.version} headers: {verdict}")
        failed += done.returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
