"""Where artifact bytes live: the storage root (``storage=``), a local path or a URI.

``storage`` is a local path or a ``pyarrow.fs`` URI (``s3://bucket/prefix``, ``gs://...``). Its
default is ``RAYLM_STORAGE`` when set (``ray_cluster.yaml`` exports it on every node), else
``./artifacts``. Relative local paths resolve against the directory the user launched from, also
under ``ray job submit --working-dir .``, where the job runs in a temporary copy of that directory:
``python -m cluster.submit`` (and ``make``) pass the launch directory as ``RAYLM_LAUNCH_DIR``.

URIs are read and written through ``pyarrow.fs``; S3 endpoint and credentials come from the standard
``AWS_ENDPOINT_URL`` / ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (/ ``AWS_REGION``)
variables, as boto3 reads them. A read copies the artifact into a node-local cache (``RAYLM_CACHE``,
default ``~/.cache/raylm/artifacts``) and refreshes it when the remote listing changed, so code that
needs files (``from_pretrained``, FAISS) gets a local directory on any node.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ops.errors import UserError

LAUNCH_DIR_ENV = "RAYLM_LAUNCH_DIR"
STORAGE_ENV = "RAYLM_STORAGE"
CACHE_ENV = "RAYLM_CACHE"
DEFAULT_STORAGE = "./artifacts"
# Read by boto3 and by pyarrow's S3 client; forwarded to Ray workers so every process sees one endpoint.
AWS_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
           "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION")
# Ray unpacks a job's --working-dir under .../runtime_resources/working_dir_files/<pkg>/.
_RAY_WORKING_DIR_MARK = os.sep + "runtime_resources" + os.sep
_STAMP = ".raylm-listing.json"


def is_uri(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def default_storage() -> str:
    """``RAYLM_STORAGE`` when set (a cluster's shared root), else ``./artifacts``."""
    return os.environ.get(STORAGE_ENV) or DEFAULT_STORAGE


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


def join(root: str, *parts: str) -> str:
    """``root/part/...`` for a local path or a URI."""
    return "/".join([root.rstrip("/"), *parts]) if is_uri(root) else str(Path(root).joinpath(*parts))


def validate_name(name: str) -> str:
    """Artifact names are single path components: no separators, no '..'."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith("."):
        raise UserError(f"bad artifact name {name!r}: use letters, digits, '-', '_' (no '/' or leading '.')")
    return name


def cache_root() -> Path:
    """The node-local artifact cache (``RAYLM_CACHE``); never shared between nodes."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "raylm" / "artifacts")


def filesystem(uri: str) -> tuple[Any, str]:
    """``(pyarrow filesystem, path inside it)`` for a URI.

    S3 gets an explicit ``S3FileSystem`` built from the AWS variables so that it pickles with its
    endpoint and keys: Ray ships it to Train workers and Tune trials, which may run where the
    variables are not set.
    """
    import pyarrow.fs as pafs

    if not uri.startswith("s3://"):
        return pafs.FileSystem.from_uri(uri)
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs: dict[str, Any] = {}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host.rstrip("/"), scheme=scheme or "https")
        # A custom endpoint (MinIO, moto, on-prem) answers at one host: no virtual-host buckets.
        kwargs["force_virtual_addressing"] = False
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        kwargs.update(access_key=os.environ["AWS_ACCESS_KEY_ID"],
                      secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY", ""),
                      session_token=os.environ.get("AWS_SESSION_TOKEN"))
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs), uri[len("s3://"):].rstrip("/")


def ray_storage(path: str) -> dict[str, Any]:
    """``storage_path`` (+ ``storage_filesystem`` for a URI) for Ray's ``RunConfig`` under ``path``."""
    path = resolve_storage(path)
    if not is_uri(path):
        Path(path).mkdir(parents=True, exist_ok=True)
        return {"storage_path": path}
    fs, inner = filesystem(path)
    return {"storage_path": inner, "storage_filesystem": fs}


def local_storage_root(storage: str) -> str:
    """A local directory standing for ``storage``: itself when local, its node-local cache for URIs.

    Under a URI root it holds what :func:`fetch` copied and node-local derived files (the embedded
    model's one-time safetensors conversion); nothing written there reaches other nodes.
    """
    root = resolve_storage(storage)
    if not is_uri(root):
        Path(root).mkdir(parents=True, exist_ok=True)
        return root
    mirror = cache_root() / root.replace("://", "/")
    mirror.mkdir(parents=True, exist_ok=True)
    return str(mirror)


def _listing(fs: Any, inner: str) -> list[list]:
    """``[relative path, size, mtime ns]`` of every file under ``inner`` (empty when absent)."""
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(inner, recursive=True, allow_not_found=True))
    return sorted([i.path[len(inner) + 1:], i.size, i.mtime_ns] for i in infos if i.type == pafs.FileType.File)


def fetch(storage: str, relpath: str) -> Path | None:
    """A local directory holding ``<storage>/<relpath>``, or None when there is none.

    For a URI the directory is the node-local cache, copied from the URI when it is missing or the
    remote listing (names, sizes, modification times) changed since it was copied.
    """
    root = resolve_storage(storage)
    if not is_uri(root):
        path = Path(root) / relpath
        return path if path.exists() else None
    from filelock import FileLock

    fs, inner = filesystem(join(root, relpath))
    local = Path(local_storage_root(root)) / relpath
    listing = _listing(fs, inner)
    stamp = local / _STAMP
    if not listing:
        return None
    local.parent.mkdir(parents=True, exist_ok=True)
    # Several Ray workers on one node read the same artifact: one copies, the others wait.
    with FileLock(str(local) + ".lock"):
        if stamp.is_file() and json.loads(stamp.read_text()) == listing:
            return local
        tmp = Path(tempfile.mkdtemp(prefix=f".{local.name}.fetch-", dir=local.parent))
        try:
            import pyarrow.fs as pafs

            pafs.copy_files(inner, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
            (tmp / _STAMP).write_text(json.dumps(listing))
            _replace(tmp, local)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return local


def list_names(storage: str, kind: str) -> list[str]:
    """Names of the entries directly under ``<storage>/<kind>/`` (hidden ones left out)."""
    root = resolve_storage(storage)
    if not is_uri(root):
        base = Path(root) / kind
        return sorted(p.name for p in base.iterdir() if not p.name.startswith(".")) if base.is_dir() else []
    import pyarrow.fs as pafs

    fs, inner = filesystem(join(root, kind))
    infos = fs.get_file_info(pafs.FileSelector(inner, allow_not_found=True))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory and not i.base_name.startswith("."))


def remove(storage: str, relpath: str) -> bool:
    """Delete ``<storage>/<relpath>`` (and its cached copy); whether there was anything."""
    root = resolve_storage(storage)
    cached = Path(local_storage_root(root)) / relpath
    if not is_uri(root):
        existed = cached.exists()
        shutil.rmtree(cached, ignore_errors=True)
        return existed
    fs, inner = filesystem(join(root, relpath))
    existed = bool(_listing(fs, inner))
    if existed:
        fs.delete_dir(inner)
    shutil.rmtree(cached, ignore_errors=True)
    return existed


def _replace(src: Path, dest: Path) -> None:
    """Rename ``src`` to ``dest``, moving an existing ``dest`` aside first (readers never see a mix)."""
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        dest.rename(old)
        src.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        src.rename(dest)


@contextmanager
def writable_dir(storage: str, relpath: str) -> Iterator[Path]:
    """Yield a local directory to write ``<storage>/<relpath>`` into; it is published when the block ends.

    Local storage: written in a sibling temp directory and renamed into place, so a crash never
    leaves a half-written directory. URI: the old copy is deleted, the new one uploaded (object
    stores have no rename) and the local directory becomes this node's cached copy of it.
    """
    root = resolve_storage(storage)
    dest = Path(local_storage_root(root)) / relpath
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        yield tmp
        if is_uri(root):
            import pyarrow.fs as pafs

            fs, inner = filesystem(join(root, relpath))
            if _listing(fs, inner):
                fs.delete_dir(inner)
            pafs.copy_files(str(tmp), inner, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
            (tmp / _STAMP).write_text(json.dumps(_listing(fs, inner)))
        _replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
