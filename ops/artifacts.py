"""The artifacts every stage hands to the next: their kinds, paths and manifests.

Layout under the storage root (a local path or a URI; ``cluster.storage`` moves the bytes)::

    models/<name>/      HF model (embedded base converted once, full fine-tune, merged adapter)
    runs/<name>/        Ray Train / Tune state and checkpoints
    adapters/<name>/    LoRA adapter in PEFT format
    quantized/<name>/   quantized model (quantization.json, written by ops.quantization)
    indexes/<name>/     retrieval index (manifest written and read by ops.retrieval.RetrievalStore)
    reports/<name>/     tables, plots and report.json of a job

``manifest.json`` of a model or adapter is written by :func:`write_manifest` and read by
:func:`read_manifest` only. Readers get a local directory from :func:`local` / :func:`resolve`,
which copy a remote artifact into the node-local cache first; writers use :func:`publish`.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Iterator, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from cluster import storage as _storage
from ops.errors import UserError

MANIFEST = "manifest.json"
ADAPTER_CONFIG = "adapter_config.json"
QUANTIZATION_FILE = "quantization.json"


class Kind(str, Enum):
    MODELS = "models"
    RUNS = "runs"
    ADAPTERS = "adapters"
    QUANTIZED = "quantized"
    INDEXES = "indexes"
    REPORTS = "reports"


KINDS = tuple(k.value for k in Kind)


class _Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelManifest(_Manifest):
    """A plain HF model directory this project wrote."""

    kind: Literal["model"] = "model"
    name: str | None = None
    base_model: str | None = Field(None, description="the model it was trained from or merged onto")
    method: str | None = Field(None, description="full: a full fine-tune")
    run: str | None = None
    step: int | None = None
    val_perplexity: float | None = None
    adapter: str | None = Field(None, description="merged: the adapter merged into base_model")
    merged: bool = False
    source: str | None = Field(None, description="embedded: the file it was converted from")
    source_format: str | None = None
    description: str | None = None
    dtype: str | None = None


class AdapterManifest(_Manifest):
    """A LoRA adapter (PEFT files beside it)."""

    kind: Literal["adapter"] = "adapter"
    name: str | None = None
    base_model: str
    method: Literal["lora"] = "lora"
    run: str | None = Field(None, description="the training run it was exported from")
    step: int | None = Field(None, description="the step of the exported checkpoint")
    val_perplexity: float | None = None
    sweep: str | None = Field(None, description="Tune: the sweep and trial that chose it")
    trial_id: str | None = None
    quantization: dict[str, Any] | None = Field(None, description="Tune: the winner's quantization recipe")


Manifest = Union[ModelManifest, AdapterManifest]


def write_manifest(directory: str | os.PathLike, manifest: Manifest) -> None:
    """The one writer of ``manifest.json``."""
    Path(directory, MANIFEST).write_text(manifest.model_dump_json(indent=2, exclude_none=True))


def read_manifest(directory: str | os.PathLike) -> Manifest | None:
    """The one reader of ``manifest.json`` (None when the directory has none)."""
    path = Path(directory, MANIFEST)
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    cls = AdapterManifest if data.get("kind") == "adapter" else ModelManifest
    try:
        return cls.model_validate(data)
    except ValueError as exc:
        raise UserError(f"{path}: not a manifest this project reads ({exc.__class__.__name__}: "
                        f"{str(exc).splitlines()[0]})") from None


def relpath(kind: Kind | str, name: str) -> str:
    """``<kind>/<name>`` after checking both."""
    try:
        kind = Kind(kind).value
    except ValueError:
        raise ValueError(f"unknown artifact kind {kind!r}; valid: {KINDS}") from None
    return f"{kind}/{_storage.validate_name(name)}"


def uri(storage: str, kind: Kind | str, name: str) -> str:
    """Where the artifact lives: ``<storage>/<kind>/<name>`` as a local path or URI (for messages and manifests)."""
    return _storage.join(_storage.resolve_storage(storage), relpath(kind, name))


def local(storage: str, kind: Kind | str, name: str) -> Path | None:
    """A local directory holding the artifact (copied into the node-local cache for a URI), or None."""
    return _storage.fetch(storage, relpath(kind, name))


def require(storage: str, kind: Kind | str, name: str) -> Path:
    """:func:`local`, raising a UserError that lists what exists when the artifact does not."""
    path = local(storage, kind, name)
    if path is None:
        raise UserError(f"no {Kind(kind).value} artifact '{name}' under {_storage.resolve_storage(storage)}; "
                        f"valid: {names(storage, kind) or 'none yet'}")
    return path


def names(storage: str, kind: Kind | str) -> list[str]:
    """Names of the artifacts of ``kind`` under ``storage``."""
    return _storage.list_names(storage, Kind(kind).value)


def remove(storage: str, kind: Kind | str, name: str) -> bool:
    return _storage.remove(storage, relpath(kind, name))


@contextmanager
def publish(storage: str, kind: Kind | str, name: str) -> Iterator[Path]:
    """Yield a local directory; its content becomes ``<storage>/<kind>/<name>`` when the block ends."""
    with _storage.writable_dir(storage, relpath(kind, name)) as out:
        yield out


def local_root(storage: str) -> Path:
    """The local directory standing for ``storage`` (the node-local cache for a URI)."""
    return Path(_storage.local_storage_root(storage))


@dataclass(frozen=True)
class Resolved:
    """What a model spec names: ``kind`` is ``hf`` (directory or hub id), ``adapter`` or ``quantized``."""

    kind: str
    path: str
    spec: str


def _artifact_dir(spec: str, storage: str | None) -> Path | None:
    """The local directory of ``spec`` when it names an artifact: a URI, or ``<kind>/<name>`` under storage."""
    if _storage.is_uri(spec):
        parent, _, name = spec.rstrip("/").rpartition("/")
        return _storage.fetch(parent, name)
    parts = spec.strip("/").split("/")
    if storage is not None and len(parts) == 2 and parts[0] in KINDS and not Path(spec).expanduser().is_dir():
        return local(storage, parts[0], parts[1])
    return None


def resolve(spec: str, storage: str | None = None) -> Resolved | None:
    """Decide what a model spec names without loading weights; None when it names no local directory.

    ``spec`` may be a local directory, ``<kind>/<name>`` relative to ``storage`` or a URI of an
    artifact directory; the directory's files decide its kind.

    Raises:
        UserError: a directory that holds no model.
    """
    path = _artifact_dir(spec, storage) or Path(spec).expanduser()
    if not path.is_dir():
        return None
    if (path / ADAPTER_CONFIG).is_file():
        return Resolved("adapter", str(path.resolve()), spec)
    if (path / QUANTIZATION_FILE).is_file():
        return Resolved("quantized", str(path.resolve()), spec)
    if (path / "config.json").is_file():
        return Resolved("hf", str(path.resolve()), spec)
    raise UserError(f"model directory '{spec}' holds no config.json, {ADAPTER_CONFIG} or {QUANTIZATION_FILE}; "
                    f"valid: a Hugging Face model directory or an artifact of this project")


def base_of(path: str | os.PathLike) -> str | None:
    """The base model spec an adapter or quantized artifact was built on: our manifest first, then
    PEFT's ``base_model_name_or_path`` / the quantization record; None when none says."""
    path = Path(path)
    manifest = read_manifest(path)
    if manifest is not None and manifest.base_model:
        return manifest.base_model
    for file, key in ((ADAPTER_CONFIG, "base_model_name_or_path"), (QUANTIZATION_FILE, "base_model")):
        if (path / file).is_file():
            value = json.loads((path / file).read_text()).get(key)
            if value:
                return str(value)
    return None
