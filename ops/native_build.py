"""Build and load the compiled ops in `native/` once per machine, and say which path is active.

The extension is compiled on first use with `torch.utils.cpp_extension.load` into
`~/.cache/raylm/build/torch_extensions/<key>` (`RAYLM_BUILD_CACHE`; apart from the artifact cache), where the key hashes the sources, the flags, the torch
version and the CPU's ISA flags. A later process finds the built library under that key and
only `torch.ops.load_library`s it (well under a second). `RAYLM_OPS` picks the policy:

- `auto` (default): build/load the native ops; if that fails, log ONE line and use the reference.
- `native`: a build failure is an error.
- `reference`: never build; use the pure-PyTorch reference.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

NATIVE_DIR = Path(__file__).resolve().parents[1] / "native" / "csrc"
CPU_SOURCES = ("ops.cpp", "bf16_dot.cpp")
CUDA_SOURCES = ("ops_cuda.cu",)
HEADERS = ("dispatch.h", "bf16_dot.h")
# -march=native is safe because the library is built on the node that runs it (first use, JIT)
# and the cache key includes the CPU's ISA flags: a node without AVX-512 never loads a library
# built for one, it builds its own. That lets the compiler use AVX-512 where present with no
# runtime dispatch code of our own. -fno-trapping-math lets GCC vectorise the floor/convert
# in the kernels' exp (nothing here reads floating-point exception flags); results are unchanged.
CPU_FLAGS = ("-O3", "-march=native", "-fno-trapping-math", "-fopenmp")
CUDA_FLAGS = ("-O3",)
POLICIES = ("auto", "native", "reference")
LIB_NAME = "raylm_ops"


@dataclass(frozen=True)
class Backend:
    """Which implementation of the raylm ops serves which device.

    Attributes:
        name: "native-cuda", "native-cpu" or "reference".
        reason: one line on why this backend is active (for logs and the health endpoint).
        devices: device types ("cpu", "cuda") served by the native library; empty for reference.
    """

    name: str
    reason: str
    devices: frozenset[str]


_backend: Backend | None = None
# Run once the library is loaded (the fakes `torch.compile` needs are registered there), so that
# importing `ops` never builds anything: the build happens on first use.
_on_load: list[Callable[[], None]] = []
_hooks_ran = False


def on_load(hook: Callable[[], None]) -> None:
    """Calls ``hook()`` once the native library is loaded (now, if it already is)."""
    _on_load.append(hook)
    if _backend is not None and _backend.devices:
        _run_hooks()


def _run_hooks() -> None:
    global _hooks_ran
    if _hooks_ran:
        return
    _hooks_ran = True
    for hook in _on_load:
        hook()


def _cpu_isa_flags() -> str:
    """The CPU model flags of this machine, so that a build for one ISA is never reused on another."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return " ".join(sorted(f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "sse", "fma", "amx", "f16c"))))
    except OSError:
        pass
    return torch.backends.cpu.get_cpu_capability()


def _cuda_buildable() -> bool:
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.cuda.is_available() and torch.version.cuda is not None and CUDA_HOME is not None


def build_cache_root() -> Path:
    """Compiled code (this extension, Inductor's graphs): ``RAYLM_BUILD_CACHE``, apart from the
    artifact cache (``RAYLM_CACHE``) so that emptying that one never recompiles anything."""
    return Path(os.environ.get("RAYLM_BUILD_CACHE") or Path.home() / ".cache" / "raylm" / "build")


def cache_dir(with_cuda: bool) -> Path:
    """The build directory for this machine, sources, flags and torch version.

    Args:
        with_cuda: whether the CUDA sources are part of the build.
    """
    h = hashlib.sha256()
    names = HEADERS + CPU_SOURCES + (CUDA_SOURCES if with_cuda else ())
    for name in names:
        h.update(name.encode())
        h.update((NATIVE_DIR / name).read_bytes())
    h.update(repr((CPU_FLAGS, CUDA_FLAGS if with_cuda else (), torch.__version__, torch.version.cuda)).encode())
    h.update(_cpu_isa_flags().encode())
    root = build_cache_root() / "torch_extensions"
    return root / h.hexdigest()[:16]


def _build_and_load() -> frozenset[str]:
    """Loads the cached library, building it first if needed; returns the device types it serves."""
    with_cuda = _cuda_buildable()
    build_dir = cache_dir(with_cuda)
    lib = build_dir / f"{LIB_NAME}.so"
    if not lib.exists():
        if shutil.which(os.environ.get("CXX", "c++")) is None:
            raise RuntimeError("no C++ compiler found (set CXX or install g++)")
        from torch.utils.cpp_extension import load

        build_dir.mkdir(parents=True, exist_ok=True)
        sources = [str(NATIVE_DIR / s) for s in CPU_SOURCES + (CUDA_SOURCES if with_cuda else ())]
        log.info("building raylm native ops into %s", build_dir)
        load(
            name=LIB_NAME,
            sources=sources,
            extra_cflags=list(CPU_FLAGS),
            extra_cuda_cflags=list(CUDA_FLAGS),
            extra_ldflags=["-fopenmp"],
            build_directory=str(build_dir),
            is_python_module=False,
            with_cuda=with_cuda,
            verbose=False,
        )
    else:
        torch.ops.load_library(str(lib))
    return frozenset({"cpu", "cuda"} if with_cuda else {"cpu"})


def backend() -> Backend:
    """Decides the backend once per process (building the library if needed) and returns it.

    Raises:
        ValueError: RAYLM_OPS has a value other than auto, native or reference.
        RuntimeError: RAYLM_OPS=native and the native library could not be built or loaded.
    """
    global _backend
    if _backend is not None:
        return _backend
    policy = os.environ.get("RAYLM_OPS", "auto").strip().lower() or "auto"
    if policy not in POLICIES:
        raise ValueError(f"RAYLM_OPS={policy!r} is not valid; use one of {', '.join(POLICIES)}")
    if policy == "reference":
        _backend = Backend("reference", "RAYLM_OPS=reference", frozenset())
        log.info("raylm ops: reference (RAYLM_OPS=reference)")
        return _backend
    try:
        devices = _build_and_load()
    except Exception as e:  # any build/load failure means "no native ops here"
        if policy == "native":
            raise RuntimeError(f"RAYLM_OPS=native but the native ops failed to build or load: {e}") from e
        reason = f"native build unavailable ({type(e).__name__}: {_last_line(e)})"
        _backend = Backend("reference", reason, frozenset())
        log.warning("raylm ops: using the pure-PyTorch reference: %s", reason)
        return _backend
    name = "native-cuda" if "cuda" in devices else "native-cpu"
    _backend = Backend(name, f"compiled ops loaded for {', '.join(sorted(devices))}", devices)
    log.info("raylm ops: %s", name)
    _run_hooks()
    return _backend


def active_backend() -> str:
    """"native-cuda", "native-cpu" or "reference"."""
    return backend().name


def backend_reason() -> str:
    """One line saying why `active_backend()` is what it is."""
    return backend().reason


def _last_line(e: BaseException) -> str:
    """The line of an exception message that says why: the compiler's first ``error:`` line when
    there is one (ninja's own last line only says that a subcommand failed), else the last line."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    return (errors[0] if errors else lines[-1] if lines else "")[:300]
