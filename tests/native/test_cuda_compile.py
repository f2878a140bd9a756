"""Compile-only check of the CUDA kernels for Ampere (sm_80) and Hopper (sm_90): no GPU needed."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths

from ops.native_build import CUDA_SOURCES, NATIVE_DIR

ARCHS = ("sm_80", "sm_90")


def _nvcc() -> str | None:
    """nvcc on PATH, else the toolkit's usual place (CUDA_HOME or /usr/local/cuda)."""
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return None


@pytest.fixture(scope="module")
def includes(tmp_path_factory) -> list[str]:
    paths = list(include_paths())
    if not any((Path(p) / "c10/cuda/impl/cuda_cmake_macros.h").exists() for p in paths):
        # A CPU-only torch wheel ships the c10/cuda headers but not this one generated file;
        # a CUDA wheel's version holds exactly this define.
        shim = tmp_path_factory.mktemp("shim")
        (shim / "c10" / "cuda" / "impl").mkdir(parents=True)
        (shim / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").write_text(
            "#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        paths.append(str(shim))
    return paths


@pytest.mark.subprocess  # nvcc in a child process, about a minute per architecture on 2 CPUs
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", CUDA_SOURCES)
def test_cuda_sources_compile_with_nvcc(tmp_path: Path, includes: list[str], source: str, arch: str) -> None:
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc is not on PATH nor in CUDA_HOME or /usr/local/cuda, so the CUDA sources cannot be "
                    "compile-checked here")
    cmd = [nvcc, "-c", "-std=c++20", f"-arch={arch}", *COMMON_NVCC_FLAGS, *(f"-I{p}" for p in includes),
           str(NATIVE_DIR / source), "-o", str(tmp_path / f"{source}.{arch}.o")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"nvcc -arch={arch} failed on {source}:\n{result.stderr[-4000:]}"
    assert (tmp_path / f"{source}.{arch}.o").stat().st_size > 0
