"""Build policy of the native ops: cached load, RAYLM_OPS, and the one-line fallback."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ops import native_build

REPO = Path(__file__).resolve().parents[2]


def _run(code: str, **env: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip()


@pytest.fixture
def fresh_backend(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A process state where the backend is not decided yet, with an empty build cache."""
    monkeypatch.setattr(native_build, "_backend", None)
    monkeypatch.setenv("RAYLM_CACHE", str(tmp_path))


def test_cached_library_loads_in_under_a_second() -> None:
    if native_build.backend().name == "reference":
        pytest.skip(f"native ops not built here: {native_build.backend_reason()}")
    out = _run(
        "import time; from ops import native_build as nb; t = time.perf_counter(); name = nb.active_backend(); "
        "print(name, time.perf_counter() - t)"
    )
    name, seconds = out.split()
    assert name == native_build.active_backend()
    assert float(seconds) < 1.0


def test_reference_is_forced_by_env() -> None:
    out = _run("from ops import kernels as K; print(K.active_backend(), '|', K.backend_reason())", RAYLM_OPS="reference")
    assert out == "reference | RAYLM_OPS=reference"


def test_missing_compiler_falls_back_with_one_log_line(
    fresh_backend, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    monkeypatch.delenv("RAYLM_OPS", raising=False)
    with caplog.at_level(logging.INFO, logger="ops.native_build"):
        assert native_build.active_backend() == "reference"
        native_build.active_backend()
    assert "no C++ compiler" in native_build.backend_reason()
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert "reference" in warnings[0].getMessage()


def test_native_policy_makes_a_build_failure_an_error(fresh_backend, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    monkeypatch.setenv("RAYLM_OPS", "native")
    with pytest.raises(RuntimeError, match="RAYLM_OPS=native"):
        native_build.backend()


def test_unknown_policy_is_an_error(fresh_backend, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAYLM_OPS", "fast")
    with pytest.raises(ValueError, match="auto, native, reference"):
        native_build.backend()


def test_cache_key_depends_on_cpu_isa(monkeypatch: pytest.MonkeyPatch) -> None:
    here = native_build.cache_dir(with_cuda=False)
    monkeypatch.setattr(native_build, "_cpu_isa_flags", lambda: "avx avx2")
    assert native_build.cache_dir(with_cuda=False) != here
