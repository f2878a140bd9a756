"""The RAG application on Ray Serve: Retriever + Generator deployments behind one FastAPI ingress.

    serve run serve/config.yaml                      # or: serve deploy serve/config.yaml
    serve run serve/config.gpu.yaml                  # a GPU node: the Generator asks Ray for one GPU
    serve.run(build_app({"storage": "./artifacts", "index": "stdlib"}))   # from Python

``build_app(args)`` validates ``args`` (:class:`AppArgs`, unknown keys are errors) and binds:

* ``Retriever``: embedder + FAISS + BM25 (``ops.retrieval``; hybrid search by default, optional
  cross-encoder reranking), concurrent queries batched with ``@serve.batch``;
* ``Generator``: the model through the continuous-batching engine (``ops.engine``; on a GPU
  ``ops.cuda_runner``: CUDA graphs, FlashAttention), attention backend from ``ops.attention``,
  compiled ops from ``ops.patch``, device and format from ``ops.model.choose_placement``, LoRA
  adapters from ``<storage>/adapters/<name>/`` loaded per request with ``@serve.multiplexed``;
  with ``use_gpu`` on, its replicas ask Ray for ``num_gpus: 1``;
* ``Ingress``: ``/v1/rag``, OpenAI-compatible ``/v1/chat/completions`` and ``/v1/completions``,
  ``/v1/models``, ``/healthz``; API key (required off loopback), body limits, 503 + Retry-After on
  full queues, 504 on timeout; ``raylm_*`` metrics (:mod:`serve.metrics`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import re
import threading
import time
import weakref
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Literal

from pydantic import Field, SecretStr, field_validator
from ray import serve
from ray.serve.handle import DeploymentHandle

from cluster.config import BaseConfig, ConfigError, format_validation_error, storage_field
from cluster.storage import resolve_storage, validate_name
from ops import artifacts
from ops.model import DEFAULT_MODEL
from ops.rag_prompt import RAG_SYSTEM_PROMPT, passages_trained_on
from ops.rag_prompt import rag_messages as _rag_prompt_messages
from serve import schemas
from serve.errors import ApiError
from serve.metrics import GeneratorMetrics, IngressMetrics
from serve.security import API_KEY_ENV, require_key_off_loopback, serve_proxy_host

log = logging.getLogger("ray.serve")

# Seconds between two readings of the engine's queue depth, batch size and adapter counters.
GAUGE_PERIOD_S = 1.0
# The prompt RAG fine-tuning (jobs.data, task=rag_qa) trains with: keep them the same.
DEFAULT_SYSTEM_PROMPT = RAG_SYSTEM_PROMPT


class AppArgs(BaseConfig):
    """``args`` of :func:`build_app` (the ``args:`` section of serve/config.yaml)."""

    storage: str = storage_field()
    model: str = Field(DEFAULT_MODEL, description="generator: embedded name, HF dir/id or a quantized/adapter "
                       "artifact dir")
    model_id: str | None = Field(None, description="model id in /v1/models (default: last part of `model`)")
    index: str | None = Field("stdlib", description="index name under <storage>/indexes/ (null: no retrieval)")
    embedder: str | None = Field(None, description="override the embedder named in the index manifest")
    search: Literal["hybrid", "dense", "bm25"] = Field("hybrid", description="retrieval: dense + BM25 fused by "
                                                       "reciprocal rank, or one of them (an index without BM25 "
                                                       "searches dense)")
    reranker: str | None = Field(None, description="local cross-encoder directory to rerank retrieved passages "
                                 "(null: no reranking)")
    api_key: SecretStr | None = Field(None, description=f"require 'Authorization: Bearer <key>' (or env "
                                      f"{API_KEY_ENV}); needed when Serve's HTTP host is not loopback")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="generator weights dtype; auto = bfloat16 on a GPU, float32 on CPU")
    use_gpu: bool | Literal["auto"] = Field(
        "auto", description="give each Generator replica one GPU (ray_actor_options num_gpus: 1); auto = when "
        "the Ray cluster has GPUs (without a running Ray: when this machine has a CUDA device)")
    attention: Literal["auto", "eager", "sdpa", "flash_attention_2"] = Field("auto", description="attention kernel")
    max_batch_size: int = Field(8, ge=1, description="requests decoded together per generator replica")
    max_queue: int = Field(32, ge=1, description="requests waiting per engine; more get 503 + Retry-After")
    max_seq_len: int = Field(3072, ge=16, description="prompt + generated tokens per request: a 2k-token RAG "
                             "prompt plus the longest answer a request may ask for (1024); the KV cache holds "
                             "max_batch_size rows of it")
    num_threads: int | None = Field(None, ge=1, description="torch threads per generator replica; null = every CPU "
                                    "the replica's process may run on (Ray sets OMP_NUM_THREADS to the replica's "
                                    "num_cpus, 1, which would leave prefill, a matmul, on one core); set it when "
                                    "several replicas share a node")
    quantization: Literal["weight_only_int4", "weight_only_int8", "none"] = Field(
        "weight_only_int4", description="quantize a float generator as it loads on CPU (the embedded model's int4 "
        "holds its GGUF's Q4_1 weights bit for bit); an adapter artifact as `model` serves unmerged on its "
        "quantized base, which is the trained model itself; quantized artifacts load as saved; GPUs serve "
        "bfloat16")
    prefill_chunk_tokens: int = Field(64, ge=1, description="prompt tokens prefilled per engine step; a long "
                                      "prompt is prefilled in chunks between the running streams' decode steps "
                                      "(the largest chunk; prefill_stall sizes each one)")
    prefill_stall: float | None = Field(2.0, gt=1, description="while streams decode, a step that also prefills "
                                        "takes at most about this many times a decode step: each chunk is sized "
                                        "by a cost model of its Linear and attention work fitted to the measured "
                                        "steps (deep in a long prompt, fewer tokens); null: always "
                                        "prefill_chunk_tokens")
    prefix_cache_mb: float = Field(0, ge=0, description="MiB of prompt-prefix keys/values kept per generator "
                                   "replica and reused by later prompts with the same prefix (LRU); 0: off")
    compile: bool = Field(False, description="torch.compile the engine's decode step, one decoder layer's graph "
                          "run for every layer (docs/benchmarks/decode.md). The replica serves at once with the "
                          "eager step while a helper thread builds the graphs on a scratch KV cache; decode steps "
                          "then switch to them (/healthz: engine_compiling, engine_compiled); eager if compiling "
                          "fails; later starts read the Inductor cache in the node-local build cache. Off by "
                          "default: on CPU the eager step on the raylm ops is faster than the compiled graph, and "
                          "with adapter slots the compiled step computes every row's LoRA update, where the eager "
                          "one skips base rows")
    max_adapters: int = Field(16, ge=0, description="LoRA adapters resident per generator replica, applied unmerged "
                              "on the one shared base (least recently used evicted); 0: no adapters")
    max_lora_rank: int = Field(16, ge=1, description="largest adapter rank the replica's adapter slots hold")
    default_max_tokens: int = Field(128, ge=1, le=schemas.MAX_TOKENS_LIMIT, description="when a request omits it")
    stream_interval_s: float = Field(0.05, ge=0, le=1, description="a streamed answer's deltas at most this often: "
                                     "the tokens decoded meanwhile travel as one (the first token is sent at once). "
                                     "Each delta crosses the Generator, the Ingress and the proxy, which on a small CPU "
                                     "cost the decode step per token; 0: a delta per token")
    request_timeout_s: float = Field(60.0, gt=0, description="end-to-end limit per request; then 504")
    max_body_bytes: int = Field(65_536, ge=1024, description="larger request bodies get 413")
    system_prompt: str = Field(DEFAULT_SYSTEM_PROMPT, description="system message of /v1/rag prompts")

    @field_validator("index", "model_id")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        return validate_name(v) if v else v

    @field_validator("api_key", mode="before")
    @classmethod
    def _key(cls, v: Any) -> Any:
        # A YAML `api_key: 0123` is a number: take it as text rather than print it in a type error.
        return None if v in (None, "") else v if isinstance(v, SecretStr) else str(v)


def parse_app_args(args: dict[str, Any] | None) -> AppArgs:
    """Validate ``args``; a bad key or value raises a one-line :class:`ConfigError`."""
    from pydantic import ValidationError

    try:
        parsed = AppArgs.model_validate(dict(args or {}))
    except ValidationError as err:
        raise ConfigError("serve app args: " + format_validation_error(err)) from None
    if not parsed.api_key and os.environ.get(API_KEY_ENV):
        parsed.api_key = os.environ[API_KEY_ENV]
    parsed.storage = resolve_storage(parsed.storage)
    if not parsed.model_id:
        parsed.model_id = default_model_id(parsed.model)
    return parsed


def default_model_id(model: str) -> str:
    """The id a model spec is served under when ``model_id`` is not given: its last path part."""
    return Path(model.rstrip("/")).name or model


def _same_model(a: str | None, b: str) -> bool:
    if a is None:
        return False
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.is_dir() and pb.is_dir() and pa.resolve() == pb.resolve()


def registered_adapters(storage: str, base: str | None = None) -> list[str]:
    """Names of the adapters under ``<storage>/adapters/`` (directories with adapter_config.json);
    with ``base``, only those trained on that base model: an adapter stacked on another model
    (a quantized artifact that already holds a merged adapter, a different base) would be wrong."""
    found = []
    for name in artifacts.names(storage, artifacts.Kind.ADAPTERS):
        path = artifacts.local(storage, artifacts.Kind.ADAPTERS, name)
        if path is not None and (path / artifacts.ADAPTER_CONFIG).is_file() \
                and (base is None or _same_model(artifacts.base_of(path), base)):
            found.append(name)
    return found


def adapter_dir(storage: str, name: str, base: str | None = None) -> Path:
    """The directory of registered adapter ``name`` (trained on ``base`` when given).

    Raises:
        ApiError: 422 for a name that is not a plain artifact name (paths never are), 404 for one
            that is not registered, 422 for one trained on another base model.
    """
    if not re.match(schemas.NAME_PATTERN, name) or ".." in name:
        raise ApiError(422, f"adapter name {name[:80]!r} is not a registry name (letters, digits, '.', '-', '_')",
                       "adapter")
    path = artifacts.local(storage, artifacts.Kind.ADAPTERS, name)
    if path is None or not (path / artifacts.ADAPTER_CONFIG).is_file():
        raise ApiError(404, f"adapter '{name}' is not registered; registered: {registered_adapters(storage, base)}",
                       "adapter", code="model_not_found")
    if base is not None and not _same_model(artifacts.base_of(path), base):
        raise ApiError(422, f"adapter '{name}' was trained on '{artifacts.base_of(path)}', not on the served model "
                       f"'{base}'; serve that base model to use it", "adapter")
    return path


def rag_messages(question: str, sources: list[dict], system: str, count_tokens: Callable[[list[dict]], int],
                 budget: int) -> list[dict]:
    """Chat messages for a RAG answer (``ops.rag_prompt``), trimming passages until the prompt fits ``budget``."""
    return _rag_prompt_messages(question, [s["text"] for s in sources], system, count_tokens, budget)


def op_path(model: Any) -> str:
    """Patch ``model`` with the compiled ops (RMSNorm, SwiGLU, fused add+norm); name the active path."""
    from ops.patch import patch_model

    report = patch_model(model)
    if report.reason:
        return f"reference ({report.reason})"
    return f"{report.backend} (rms_norm x{report.rms_norms}, silu_mul x{report.mlps}, " \
           f"fused_add_rms_norm x{report.fused_layers})"


def serving_quantization(model: Any, spec: str, kind: str, method: str, device: str) -> tuple[Any, str]:
    """``model`` quantized for serving with ``method`` on CPU, and a line saying what runs.

    How: :func:`ops.quantization.quantize_served_base`; a method that does not apply leaves the
    float weights (logged), so a replica still starts.
    """
    if method == "none" or kind == "quantized" or device != "cpu":
        why = "a quantized artifact" if kind == "quantized" else f"{method}" if method == "none" else f"on {device}"
        return model, f"as loaded ({why})"
    from ops.errors import UserError
    from ops.quantization import quantize_served_base

    try:
        return quantize_served_base(model, spec, method)
    except UserError as exc:  # e.g. a layer width the group size does not divide: serve what loaded
        log.warning("serving float weights: %s does not apply to %s: %s", method, spec, exc)
        return model, f"as loaded ({method} does not apply: {exc})"


def generator_threads(num_threads: int | None) -> int:
    """Intra-op threads of a generator replica: ``num_threads``, else every CPU this process may run on."""
    if num_threads:
        return num_threads
    # sched_getaffinity is Linux-only (macOS laptops have none); cpu_count is the machine's CPUs there
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def resolve_use_gpu(use_gpu: bool | str) -> tuple[bool, str]:
    """Whether Generator replicas get a GPU, and why (``use_gpu: auto`` asks the cluster).

    Serve builds the app on the cluster (``serve run`` / ``serve deploy``), where Ray is up; a
    Python caller may build it before ``serve.run`` starts a local Ray, whose GPUs are then this
    machine's, so those are counted instead of starting Ray here.
    """
    if use_gpu != "auto":
        return bool(use_gpu), f"use_gpu={str(use_gpu).lower()}"
    import ray

    if ray.is_initialized():
        gpus = ray.cluster_resources().get("GPU", 0)
        return gpus > 0, f"use_gpu=auto: the Ray cluster has {gpus:g} GPUs"
    import torch

    gpus = torch.cuda.device_count()
    return gpus > 0, f"use_gpu=auto: Ray is not running, this machine has {gpus} CUDA devices"


def generator_actor_options(use_gpu: bool) -> dict[str, Any]:
    """``ray_actor_options`` of the Generator: one CPU, and one GPU when ``use_gpu``.

    A Serve config's ``deployments`` entry replaces these as a whole, so a YAML that serves on
    GPUs must list ``num_gpus`` itself (serve/config.gpu.yaml).
    """
    return {"num_cpus": 1, "num_gpus": 1} if use_gpu else {"num_cpus": 1}


@serve.deployment(name="Generator", max_ongoing_requests=16, health_check_period_s=10, health_check_timeout_s=30,
                  ray_actor_options={"num_cpus": 1})
class Generator:
    """The model behind one engine; LoRA adapters by name, unmerged on the shared base (bounded, LRU)."""

    def __init__(self, args: dict):
        import torch

        from ops.attention import choose_attention
        from ops.model import choose_placement, load_tokenizer, torch_dtype

        self.args = AppArgs.model_validate(args)
        self.model_id = self.args.model_id or default_model_id(self.args.model)
        # build_app resolves "auto"; a Generator built directly (tests) uses a GPU it can see
        want_gpu = torch.cuda.is_available() if self.args.use_gpu == "auto" else self.args.use_gpu
        self.placement = choose_placement(self.args.model, self.args.storage, self.args.dtype, want_gpu)
        self.device = self.placement.device
        if self.device == "cuda":
            self.device_name = f"cuda ({torch.cuda.get_device_name()})"
        else:
            self.device_name = "cpu"
        self.attention = choose_attention(self.args.attention, device=self.device,
                                          dtype=torch_dtype(self.placement.dtype))
        self.tokenizer = load_tokenizer(self.args.model, storage=self.args.storage)
        from ops.native_build import build_cache_root

        # compiled decode graphs persist across restarts (Inductor's FX graph cache is on by default)
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(build_cache_root() / "inductor"))
        self.op_path = "reference"
        self.default_adapter: str | None = None  # set when `model` is an adapter artifact (served unmerged)
        self.engine = self._engine()
        self.metrics = GeneratorMetrics()
        self._adapter_counts: dict[str, tuple[int, int]] = {}  # name -> (loads, evictions) already counted
        self._prefix_counts = (0, 0)  # prefix cache (hit tokens, lookup tokens) already counted
        threading.Thread(target=_sample_engines, args=(weakref.ref(self),), name="raylm-gauges", daemon=True).start()
        log.info("generator ready: model=%s device=%s format=%s (%s) attention=%s ops=%s engine=%s",
                 self.args.model, self.device_name, self.placement.format, self.placement.reason,
                 self.engine_attention().name, self.op_path, self.engine.backend)

    def _engine(self):
        from ops.engine import Engine, EngineConfig
        from ops.model import base_spec_of, load_model, resolve

        source = resolve(self.args.model, self.args.storage)
        # an adapter artifact runs unmerged on its base: merging into a quantized base would round the delta
        unmerged = source.kind == "adapter" and self.args.max_adapters > 0 and self.device == "cpu"
        spec = base_spec_of(source.path) if unmerged else self.args.model
        model = load_model(spec, storage=self.args.storage, dtype=self.placement.dtype,
                           device=self.device, attn_implementation=self.attention.name)
        model, self.quantization = serving_quantization(model, spec, source.kind, self.args.quantization, self.device)
        self.op_path = op_path(model)
        config = EngineConfig(max_batch_size=self.args.max_batch_size, max_queue=self.args.max_queue,
                              max_seq_len=self.args.max_seq_len, num_threads=generator_threads(self.args.num_threads),
                              compile=self.args.compile, compile_background=True,
                              max_adapters=self.args.max_adapters,
                              max_lora_rank=self.args.max_lora_rank,
                              prefill_chunk_tokens=self.args.prefill_chunk_tokens,
                              prefill_stall=self.args.prefill_stall,
                              prefix_cache_mb=self.args.prefix_cache_mb)
        try:
            engine = Engine(model, self.tokenizer, config)
        except ValueError as exc:  # not a Llama-family model: no unmerged adapters there
            log.warning("serving %s without adapter slots: %s", self.args.model, exc)
            engine = Engine(model, self.tokenizer, dataclasses.replace(config, max_adapters=0))
        if unmerged:
            engine.add_adapter(self.model_id, source.path)
            self.default_adapter = self.model_id
        engine.warmup()  # ready at once; with `compile` the graphs are built by the engine's helper thread
        return engine

    def sample_engines(self) -> None:
        """Read the engine's queue depth and running batch size into the gauges, and its adapter loads
        and evictions since the last reading into their counters."""
        self.metrics.engine_load(self.model_id, self.engine.num_waiting, self.engine.num_running)
        prefix = self.engine.prefix_cache_stats()
        if prefix:
            seen_hits, seen_lookups = self._prefix_counts
            tags = {"model": self.model_id}
            if prefix["hit_tokens"] > seen_hits:
                self.metrics.prefix_hits.inc(prefix["hit_tokens"] - seen_hits, tags=tags)
            if prefix["lookup_tokens"] > seen_lookups:
                self.metrics.prefix_lookups.inc(prefix["lookup_tokens"] - seen_lookups, tags=tags)
            self._prefix_counts = (prefix["hit_tokens"], prefix["lookup_tokens"])
        if self.engine.adapters is None:
            return
        stats = self.engine.adapters
        for name in set(stats.loads_by_name) | set(stats.evictions_by_name):
            loads, evictions = stats.loads_by_name[name], stats.evictions_by_name[name]
            seen_loads, seen_evictions = self._adapter_counts.get(name, (0, 0))
            if loads > seen_loads:
                self.metrics.adapter_loads.inc(loads - seen_loads, tags={"adapter": name})
            if evictions > seen_evictions:
                self.metrics.adapter_evictions.inc(evictions - seen_evictions, tags={"adapter": name})
            self._adapter_counts[name] = (loads, evictions)

    def _adapter_for_request(self) -> str | None:
        """The request's adapter (Serve's multiplexed model id), registered with the engine on first use."""
        name = serve.get_multiplexed_model_id()
        if not name:
            return self.default_adapter
        if self.engine.adapters is None or name not in self.engine.adapters.specs:
            path = adapter_dir(self.args.storage, name, self.args.model)
            try:
                self.engine.add_adapter(name, path)
            except ValueError as exc:
                raise ApiError(422, str(exc), "model") from None
        return name

    def _request(self, engine: Any, payload: dict, adapter: str | None = None):
        from ops.engine import Request

        params = {k: payload[k] for k in ("max_tokens", "temperature", "top_p", "seed") if k in payload}
        params["stop"] = payload.get("stop") or []
        params["adapter"] = adapter
        if "rag" in payload:
            budget = engine.config.max_seq_len - payload["max_tokens"]
            count = lambda m: len(engine.encode(Request(messages=m, max_tokens=1)))  # noqa: E731
            rag = payload["rag"]
            messages = rag_messages(rag["question"], rag["sources"], self.args.system_prompt, count, budget)
            texts = [s["text"] for s in rag["sources"] if s["text"].strip()]
            extract = texts if rag.get("extractive") and texts else None
            beams = payload.get("beams")
            if beams is None:  # the default: a beam where it is built for (extractive, greedy) and the engine can
                beams = (min(schemas.DEFAULT_RAG_BEAMS, engine.config.max_batch_size)
                         if extract and params.get("temperature", 0) == 0 and engine.backend == "llama" else 1)
            weight = payload.get("support_weight")
            if beams < 2:
                weight = 0.0  # ranks a beam's final answers; greedy and sampled answers have one
            elif weight is None:
                weight = schemas.DEFAULT_SUPPORT_WEIGHT
            return Request(messages=messages, extract_from=extract, beams=beams, question=rag["question"],
                           support_weight=weight, **params)
        if "messages" in payload:
            return Request(messages=payload["messages"], **params)
        return Request(prompt=payload["prompt"], **params)

    def _start(self, payload: dict, stream: bool = True) -> Any:
        """The engine's delta stream for ``payload`` (``stream``), else the future of its completion."""
        from ops.engine import QueueFullError

        try:
            request = self._request(self.engine, payload, self._adapter_for_request())
            return self.engine.stream(request, self.args.stream_interval_s) if stream else self.engine.generate(request)
        except QueueFullError as exc:
            raise ApiError(503, f"generator queue is full, retry later ({exc})", retry_after=1) from None
        except ValueError as exc:  # too long for max_seq_len, empty prompt, bad sampling values
            raise ApiError(422, str(exc), "max_tokens" if "max_tokens" in str(exc) else None) from None

    def _finished(self, completion: Any) -> dict:
        """``{"completion"}`` of a finished request, or ``{"error"}`` when the engine cancelled it: a
        client that is still listening only loses its request when the engine shut down under it."""
        if completion.finish_reason not in ("stop", "length"):
            return {"error": ApiError(503, "generation was cut off: its engine shut down (adapter evicted or replica "
                                      "stopping); retry", retry_after=1, code="cancelled").to_dict()}
        done = _completion_dict(completion)
        self.metrics.completed(serve.get_multiplexed_model_id() or self.model_id, done)
        return {"completion": done}

    async def stream(self, payload: dict) -> AsyncIterator[dict]:
        """Yield ``{"text"}`` events, then ``{"text", "completion"}``; or an ``{"error"}`` event last."""
        try:
            deltas = self._start(payload)
        except ApiError as exc:
            yield {"error": exc.to_dict()}
            return
        async for delta in deltas:
            if delta.completion is None:
                yield {"text": delta.text}
                continue
            finished = self._finished(delta.completion)
            yield {"text": delta.text, **finished} if "completion" in finished else finished

    async def generate(self, payload: dict) -> dict:
        """``{"completion": {...}}`` or ``{"error": {...}}``."""
        try:
            completion = self._start(payload, stream=False)
        except ApiError as exc:
            return {"error": exc.to_dict()}
        return self._finished(await completion)

    def engine_attention(self):
        """The attention that runs: the engine's own forward's, else the HF model's implementation."""
        return self.engine.attention or self.attention

    def info(self) -> dict:
        adapters = self.engine.adapter_stats()
        loaded = adapters["resident"]
        attention = self.engine_attention()
        return {"adapter_loads": adapters["loads"], "adapter_evictions": adapters["evictions"],
                "model": self.args.model, "attention": attention.name, "attention_reason": attention.reason,
                "op_path": self.op_path, "engine_backend": self.engine.backend,
                "engine_compiled": self.engine.compiled,
                "engine_compiling": self.engine.compiling, "adapters_loaded": loaded,
                "device": self.device_name,
                "format": f"{self.placement.format}, {self.quantization} ({self.placement.reason})",
                "prefix_cache": self.engine.prefix_cache_stats(), "pid": os.getpid()}


def _completion_dict(completion: Any) -> dict:
    d = dataclasses.asdict(completion)
    d.pop("token_ids", None)
    return d


def _sample_engines(generator: weakref.ref) -> None:
    """The gauge thread of a Generator replica; ends once the replica object is gone."""
    while True:
        time.sleep(GAUGE_PERIOD_S)
        replica = generator()
        if replica is None:
            return
        replica.sample_engines()
        del replica


@serve.deployment(name="Retriever", max_ongoing_requests=64, health_check_period_s=10, health_check_timeout_s=30,
                  ray_actor_options={"num_cpus": 0.5})
class Retriever:
    """Embedder + FAISS + BM25; concurrent queries are embedded and searched as one batch."""

    def __init__(self, storage: str, index: str, embedder: str | None = None, search: str = "hybrid",
                 reranker: str | None = None):
        from ops.retrieval import RetrievalStore

        # This replica's node reads the index into its own cache (a URI root: from the bucket).
        self.store = RetrievalStore.load(artifacts.require(storage, artifacts.Kind.INDEXES, index), embedder,
                                         reranker=reranker)
        self.name = index
        # An index built before BM25 existed searches dense (the store logged why).
        self.mode = search if self.store.bm25 is not None else "dense"

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def search(self, queries: list[tuple[str, int]]) -> list[list[dict]]:
        """Each query is ``(text, k)``; returns its hits as ``{"id","doc_id","score","text","source"}``."""
        k = max(q[1] for q in queries)
        hits = await asyncio.to_thread(self.store.search_text, [q[0] for q in queries], k, self.mode)
        return [[h.to_dict() for h in row[:qk]] for row, (_, qk) in zip(hits, queries)]

    def info(self) -> dict:
        return {"index": self.name, "chunks": len(self.store), **self.store.manifest, "search": self.mode,
                "reranker": self.store.reranker.path if self.store.reranker else None}


@serve.deployment(name="Ingress", max_ongoing_requests=64, health_check_period_s=10, health_check_timeout_s=30,
                  ray_actor_options={"num_cpus": 0})
@serve.ingress()
class Ingress:
    """HTTP front: validation, auth, limits; calls Retriever and Generator through handles."""

    def __init__(self, generator: DeploymentHandle, retriever: DeploymentHandle | None, args: dict):
        self.generator = generator
        self.retriever = retriever
        self.args = AppArgs.model_validate(args)
        # Every way of deploying (serve run/deploy, serve.run, the REST API) starts this replica with
        # the proxy's final options in place: the check that cannot be skipped.
        require_key_off_loopback(serve_proxy_host(), self.args.api_key, "Serve's http_options.host")
        self.created = int(time.time())
        self.metrics = IngressMetrics()
        self._passages_read: dict[str, int | None] = {}

    def __serve_build_asgi_app__(self):
        from serve.api import make_api

        return make_api(self)

    # ----------------------------------------------------------------- calls to the deployments

    def resolve_model(self, model: str | None, param: str = "model") -> str:
        """The adapter a request's ``model`` names ('' = the base model).

        Raises:
            ApiError: 404 (``model_not_found``) or 422 naming ``param``.
        """
        if not model or model == self.args.model_id:
            return ""
        try:
            adapter_dir(self.args.storage, model, self.args.model)
        except ApiError as exc:
            exc.param = param
            raise
        return model

    def passages_read(self, adapter: str) -> int | None:
        """How many retrieved passages the model serving ``adapter`` ('' = the app's own model) reads
        by default: the ``qa.passages`` it was fine-tuned on (``ops.rag_prompt.passages_trained_on``),
        None (all of them) for a model not fine-tuned for RAG. Read once per model."""
        if adapter not in self._passages_read:
            if adapter:
                path: Any = adapter_dir(self.args.storage, adapter, self.args.model)
            else:
                resolved = artifacts.resolve(self.args.model, self.args.storage)
                path = resolved.path if resolved is not None else None
            try:
                self._passages_read[adapter] = passages_trained_on(path)
            except ValueError as exc:  # a broken config beside the weights: still answer, from every passage
                log.warning("reading every retrieved passage for %r: %s", adapter or self.args.model, exc)
                self._passages_read[adapter] = None
        return self._passages_read[adapter]

    def model_cards(self) -> list[dict]:
        """``/v1/models`` entries: the base model and every adapter trained on it."""
        cards = [{"id": self.args.model_id, "created": self.created, "owned_by": "raylm"}]
        return cards + [{"id": name, "created": self.created, "owned_by": "raylm", "parent": self.args.model_id}
                        for name in registered_adapters(self.args.storage, self.args.model)]

    async def _call(self, make_call: Callable[[], Any], deadline: float, cancel: Callable[[], Any] | None = None) -> Any:
        """Await a handle call within ``deadline`` (monotonic); map Serve/Ray failures to ApiError."""
        from ray.exceptions import RayActorError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

        response = make_call()
        try:
            return await asyncio.wait_for(response, max(0.001, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            (cancel or response.cancel)()
            raise ApiError(504, f"request took longer than request_timeout_s={self.args.request_timeout_s}") from None
        except BackPressureError:
            raise ApiError(503, "too many requests in flight, retry later", retry_after=1) from None
        except (RayActorError, DeploymentUnavailableError, ReplicaUnavailableError) as exc:
            raise ApiError(503, f"replica unavailable ({type(exc).__name__}), retry later", retry_after=1) from None

    async def retrieve(self, question: str, top_k: int, deadline: float) -> list[dict]:
        if self.retriever is None:
            raise ApiError(400, "this app serves no index (args.index is null); use /v1/chat/completions", "rag")
        t0 = time.monotonic()
        hits = await self._call(lambda: self.retriever.search.remote((question, top_k)), deadline)
        self.metrics.retrieval.observe(time.monotonic() - t0)
        return hits

    async def generate(self, adapter: str, payload: dict, deadline: float) -> dict:
        handle = self.generator.options(multiplexed_model_id=adapter) if adapter else self.generator
        out = await self._call(lambda: handle.generate.remote(payload), deadline)
        if "error" in out:
            raise ApiError.from_dict(out["error"])
        return out["completion"]

    async def stream(self, adapter: str, payload: dict, deadline: float) -> AsyncIterator[dict]:
        """Start a generation stream; errors before the first token raise :class:`ApiError`."""
        handle = self.generator.options(multiplexed_model_id=adapter, stream=True) if adapter else \
            self.generator.options(stream=True)
        gen = handle.stream.remote(payload)
        first = await self._call(lambda: gen.__anext__(), deadline, gen.cancel)
        if "error" in first:
            raise ApiError.from_dict(first["error"])
        return self._rest(gen, first, deadline)

    async def _rest(self, gen: Any, first: dict, deadline: float) -> AsyncIterator[dict]:
        yield first
        if "completion" in first:
            return
        while True:
            try:
                event = await self._call(lambda: gen.__anext__(), deadline, gen.cancel)
            except StopAsyncIteration:
                return
            except ApiError as exc:
                yield {"error": exc.to_dict()}
                return
            except Exception as exc:  # noqa: BLE001 - the client gets an error event, not a cut connection
                log.exception("generation stream failed")
                failed = ApiError(500, f"generation failed ({type(exc).__name__}); see the replica logs")
                yield {"error": failed.to_dict()}
                return
            yield event
            if "completion" in event:
                return

    async def health(self) -> dict:
        deadline = time.monotonic() + min(10.0, self.args.request_timeout_s)
        info = await self._call(lambda: self.generator.info.remote(), deadline)
        index = await self._call(lambda: self.retriever.info.remote(), deadline) if self.retriever else None
        return {"status": "ok", "model": self.args.model_id, "attention": info["attention"],
                "attention_reason": info["attention_reason"], "op_path": info["op_path"],
                "engine_backend": info["engine_backend"], "engine_compiled": info["engine_compiled"],
                "engine_compiling": info["engine_compiling"],
                "device": info["device"], "format": info["format"],
                "index": index["index"] if index else None,
                "index_chunks": index["chunks"] if index else None, "adapters_loaded": info["adapters_loaded"],
                "prefix_cache": info["prefix_cache"], "generator_pid": info["pid"]}


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    """The RAG application for ``serve run serve/config.yaml``, ``serve deploy`` or ``serve.run``.

    Args:
        args: :class:`AppArgs` keys (storage, model, index, api_key, ...).

    Raises:
        ConfigError: unknown key, bad value, a missing index directory, or a running Serve whose
            HTTP host is not loopback while no API key is set.
    """
    parsed = parse_app_args(args)
    try:
        # Serve already runs (serve run/deploy of a config, or serve.start first): refuse here, in one
        # line, before any replica starts. Otherwise the Ingress replicas check when they start.
        require_key_off_loopback(serve_proxy_host(), parsed.api_key, "Serve's http_options.host")
    except LookupError:
        pass
    parsed.use_gpu, why = resolve_use_gpu(parsed.use_gpu)
    log.info("generator replicas %s a GPU (%s)", "get" if parsed.use_gpu else "do not get", why)
    dumped = parsed.model_dump()
    retriever = None
    if parsed.index:
        if parsed.index not in artifacts.names(parsed.storage, artifacts.Kind.INDEXES):
            raise ConfigError(f"index '{parsed.index}' not found at "
                              f"{artifacts.uri(parsed.storage, artifacts.Kind.INDEXES, parsed.index)}; build it with "
                              f"`python -m jobs.index name={parsed.index} storage={parsed.storage}` or set index: null")
        retriever = Retriever.bind(parsed.storage, parsed.index, parsed.embedder, parsed.search, parsed.reranker)
    generator = Generator.options(ray_actor_options=generator_actor_options(parsed.use_gpu)).bind(dumped)
    return Ingress.bind(generator, retriever, dumped)
