"""The artifact root (``storage=``) and the layout under it.

``storage`` is a local path or a ``pyarrow.fs`` URI (``s3://``, ``gs://``, ...). Relative local
paths resolve against the directory the user launched from, also under
``ray job submit --working-dir .``, where the job runs in a temporary copy of that directory:
``python -m cluster.submit`` (and ``make``) pass the launch directory as ``RAYLM_LAUNCH_DIR``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ops.errors import UserError

LAUNCH_DIR_ENV = "RAYLM_LAUNCH_DIR"
KINDS = ("models", "runs", "adapters", "quantized", "indexes", "reports", "corpora")
# Ray unpacks a job's --working-dir under .../runtime_resources/working_dir_files/<pkg>/.
_RAY_WORKING_DIR_MARK = os.sep + "runtime_resources" + os.sep


def is_uri(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def in_ray_working_dir_copy(cwd: str | None = None) -> bool:
    """True when this process runs inside a Ray ``working_dir`` copy (``ray job submit --working-dir``)."""
    return _RAY_WORKING_DIR_MARK in (cwd or os.getcwd())


def launch_path(path: str) -> str:
    """A relative input path (``data=``) as the user meant it: against the launch directory.

    Under ``python -m cluster.submit`` the job runs in a copy of the working_dir, where
    ``../shared/data/x.txt`` does not exist; it does relative to ``RAYLM_LAUNCH_DIR``. Paths that
    exist where the job runs, absolute paths, URIs and names without a launch directory are kept.
    """
    launch_dir = os.environ.get(LAUNCH_DIR_ENV)
    candidate = Path(path).expanduser()
    if not launch_dir or is_uri(path) or candidate.is_absolute() or candidate.exists():
        return path
    moved = Path(launch_dir) / candidate
    return str(moved) if moved.exists() else path


def resolve_storage(storage: str) -> str:
    """Absolute local path or URI of the artifact root.

    Raises:
        UserError: a relative path inside a Ray working_dir copy with no launch directory known,
            since artifacts would silently land in a temporary copy and be lost.
    """
    if storage.startswith("file://"):
        storage = storage[len("file://"):]
    if is_uri(storage):
        return storage.rstrip("/")
    path = Path(storage).expanduser()
    if not path.is_absolute():
        launch_dir = os.environ.get(LAUNCH_DIR_ENV)
        if launch_dir:
            path = Path(launch_dir) / path
        elif in_ray_working_dir_copy():
            raise UserError(
                f"storage='{storage}' is relative, but this job runs in a temporary copy of its "
                f"working_dir ({os.getcwd()}), so artifacts would be lost; pass an absolute path or "
                f"URI (storage=/abs/path or s3://bucket/prefix), or submit with `python -m cluster.submit`, "
                f"which sets {LAUNCH_DIR_ENV}")
        else:
            path = Path.cwd() / path
    return str(path.resolve())


def artifact_path(storage: str, kind: str, name: str) -> str:
    """``<storage>/<kind>/<name>`` as a path or URI (not created)."""
    if kind not in KINDS:
        raise ValueError(f"unknown artifact kind {kind!r}; valid: {KINDS}")
    validate_name(name)
    root = resolve_storage(storage)
    return f"{root}/{kind}/{name}" if is_uri(root) else str(Path(root) / kind / name)


def validate_name(name: str) -> str:
    """Artifact names are single path components: no separators, no '..'."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith("."):
        raise UserError(f"bad artifact name {name!r}: use letters, digits, '-', '_' (no '/' or leading '.')")
    return name


def local_cache_root() -> Path:
    """A node-local directory used to mirror remote artifacts (``RAYLM_CACHE`` or ~/.cache/raylm)."""
    return Path(os.environ.get("RAYLM_CACHE", Path.home() / ".cache" / "raylm"))


def local_storage_root(storage: str) -> str:
    """A local directory standing for ``storage``: itself when local, a node-local mirror for URIs."""
    root = resolve_storage(storage)
    if not is_uri(root):
        Path(root).mkdir(parents=True, exist_ok=True)
        return root
    mirror = local_cache_root() / "storage" / root.replace("://", "/")
    mirror.mkdir(parents=True, exist_ok=True)
    return str(mirror)


@contextmanager
def writable_artifact(storage: str, kind: str, name: str) -> Iterator[Path]:
    """Yield a local directory to write an artifact into; it is published when the block ends.

    Local storage: written in a sibling temp directory and renamed into place, so a crash never
    leaves a half-written artifact. Remote storage: uploaded with ``pyarrow.fs.copy_files``.
    """
    dest = artifact_path(storage, kind, name)
    if is_uri(dest):
        with tempfile.TemporaryDirectory(prefix=f"raylm-{kind}-") as tmp:
            yield Path(tmp)
            import pyarrow.fs as pafs

            pafs.copy_files(tmp, dest)
        return
    dest_path = Path(dest)
    dest_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=dest_path.parent))
    try:
        yield tmp
        if dest_path.exists():
            old = dest_path.with_name(f".{name}.old-{os.getpid()}")
            dest_path.rename(old)
            tmp.rename(dest_path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(dest_path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def fetch_artifact(path_or_uri: str) -> str:
    """A local directory holding the artifact at ``path_or_uri`` (downloaded once for URIs)."""
    if not is_uri(path_or_uri):
        return path_or_uri
    import pyarrow.fs as pafs

    local = local_cache_root() / "fetched" / path_or_uri.replace("://", "/")
    if not local.exists():
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=local.parent))
        pafs.copy_files(path_or_uri, str(tmp))
        tmp.rename(local)
    return str(local)
