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
    monkeypatch.setenv("RAYLM_BUILD_CACHE", str(tmp_path))


def test_native_backend_is_active_wherever_a_compiler_exists(native_ops) -> None:
    # native_ops fails (not skips) when a compiler exists and the build broke: this names it.
    assert native_build.active_backend() == "native-cpu"
    assert "cpu" in native_build.backend().devices
    assert native_build.cache_dir(with_cuda=False).joinpath(f"{native_build.LIB_NAME}.so").is_file()


@pytest.mark.subprocess
def test_importing_ops_builds_nothing(tmp_path: Path) -> None:
    # An empty build cache: a build at import would create the library under it.
    out = _run("import ops.kernels, ops.patch, ops.engine; from ops import native_build as nb; print(nb._backend)",
               RAYLM_BUILD_CACHE=str(tmp_path), RAYLM_OPS="auto")
    assert out.splitlines()[-1] == "None"
    assert not list(tmp_path.rglob("*.so"))


@pytest.mark.subprocess
def test_cached_library_is_loaded_not_rebuilt(native_ops) -> None:
    # With the library in the build cache, a new process must load it without calling the
    # compiler driver (torch.utils.cpp_extension.load), which is made to fail here.
    out = _run(
        "import torch.utils.cpp_extension as ext\n"
        "def _no_build(*a, **k): raise AssertionError('rebuilt')\n"
        "ext.load = _no_build\n"
        "from ops import native_build as nb; print(nb.active_backend())",
        RAYLM_OPS="native",
    )
    assert out.splitlines()[-1] == native_build.active_backend() == "native-cpu"


def test_reference_is_forced_by_env(fresh_backend, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAYLM_OPS", "reference")
    assert (native_build.active_backend(), native_build.backend_reason()) == ("reference", "RAYLM_OPS=reference")
    assert native_build.backend().devices == frozenset()


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
