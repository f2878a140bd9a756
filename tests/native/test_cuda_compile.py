"""Compile-only check of the CUDA kernels for Ampere (sm_80) and Hopper (sm_90): no GPU needed."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths

from ops.native_build import CUDA_SOURCES, NATIVE_DIR

ARCHS = (80, 90)
_FATBIN_MAGIC = struct.pack("<I", 0xBA55ED50)
_CUBIN = 2  # fatbin entry kind of an ELF cubin (1 is PTX)


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


def _cubin_archs(obj: bytes) -> list[int]:
    """SM versions of the cubins in an object's embedded fatbin (header: magic u32, version u16,
    header size u16, payload size u64; each entry: kind u16, u16, header size u32, size u64, ...,
    arch u32 at offset 28)."""
    start = obj.find(_FATBIN_MAGIC)
    assert start >= 0, "the object holds no fatbin"
    _, _, header, size = struct.unpack_from("<IHHQ", obj, start)
    archs, pos, end = [], start + header, start + header + size
    while pos < end:
        kind, _, entry_header, entry_size = struct.unpack_from("<HHIQ", obj, pos)
        if kind == _CUBIN:
            archs.append(struct.unpack_from("<I", obj, pos + 28)[0])
        pos += entry_header + entry_size
    return sorted(archs)


# One nvcc call builds both architectures: the host side and the preprocessing happen once
# (about a minute per architecture on 2 CPUs otherwise), and --threads compiles the two device
# passes in parallel where there are cores for it.
@pytest.mark.subprocess
@pytest.mark.parametrize("source", CUDA_SOURCES)
def test_cuda_sources_compile_with_nvcc(tmp_path: Path, includes: list[str], source: str) -> None:
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc is not on PATH nor in CUDA_HOME or /usr/local/cuda, so the CUDA sources cannot be "
                    "compile-checked here")
    out = tmp_path / f"{source}.o"
    cmd = [nvcc, "-c", "-std=c++20", *(f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS), "--threads=0",
           *COMMON_NVCC_FLAGS, *(f"-I{p}" for p in includes), str(NATIVE_DIR / source), "-o", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"nvcc failed on {source}:\n{result.stderr[-4000:]}"
    assert _cubin_archs(out.read_bytes()) == list(ARCHS)
