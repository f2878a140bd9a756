"""OpenMP thread hygiene for a decode thread: free other threads' idle worker teams, set intra-op threads."""

from __future__ import annotations

import ctypes
from typing import Any

import torch


def release_openmp_workers() -> bool:
    """Frees the calling thread's idle OpenMP worker threads (libgomp's `omp_pause_resource_all`).

    libgomp spins only ~100 iterations instead of ~300,000 before sleeping whenever it manages
    more threads than there are CPUs, and every thread that ever ran a multi-threaded torch op
    keeps a team of workers. A model loaded or evaluated on the main thread therefore made each
    parallel region of the engine's decode thread wake sleeping workers: a 2-thread int4 decode
    step took 1.5x as long as on the main thread (bench/engine_threads.py). Freeing the loading
    thread's team (it is rebuilt if that thread runs parallel ops again) leaves the decode
    thread's team the only one.

    Every libgomp loaded in the process is asked (wheels such as faiss bundle their own copy,
    each with its own teams).

    Returns:
        Whether a libgomp was found and released this thread's resources (False elsewhere, e.g.
        on macOS: a no-op).
    """
    try:
        with open("/proc/self/maps") as maps:  # libraries loaded now (some load late, e.g. with faiss)
            paths = sorted({line.split()[-1] for line in maps if "libgomp" in line.rsplit("/", 1)[-1]})
    except OSError:
        return False
    released = False
    for path in paths:
        if path not in _libgomps:
            try:
                _libgomps[path] = ctypes.CDLL(path)
            except OSError:
                _libgomps[path] = None
        lib = _libgomps[path]
        if lib is not None and hasattr(lib, "omp_pause_resource_all"):
            released |= lib.omp_pause_resource_all(1) == 0  # omp_pause_soft
    return released


_libgomps: dict[str, Any] = {}  # path -> loaded handle (None: could not be opened)


def set_threads(n: int) -> None:
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)

