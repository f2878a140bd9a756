"""The RAG application on Ray Serve: Retriever + Generator deployments behind one FastAPI ingress.

    serve run serve/config.yaml                      # or: serve deploy serve/config.yaml
    serve.run(build_app({"storage": "./artifacts", "index": "stdlib"}))   # from Python

``build_app(args)`` validates ``args`` (:class:`AppArgs`, unknown keys are errors) and binds:

* ``Retriever``: embedder + FAISS + BM25 (``ops.retrieval``; hybrid search by default, optional
  cross-encoder reranking), concurrent queries batched with ``@serve.batch``;
* ``Generator``: the model through the continuous-batching engine (``ops.engine``), attention
  backend from ``ops.attention``, compiled ops from ``ops.patch``, LoRA adapters
  from ``<storage>/adapters/<name>/`` loaded per request with ``@serve.multiplexed``;
* ``Ingress``: ``/v1/rag``, OpenAI-compatible ``/v1/chat/completions`` and ``/v1/completions``,
  ``/v1/models``, ``/healthz``; API key, body limits, 503 + Retry-After on full queues, 504 on
  timeout.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Literal

from pydantic import Field, field_validator
from ray import serve
from ray.serve.handle import DeploymentHandle

from cluster.config import BaseConfig, ConfigError, _format_validation_error
from cluster.storage import local_storage_root, validate_name
from ops.model import DEFAULT_MODEL
from ops.rag_prompt import RAG_SYSTEM_PROMPT
from ops.rag_prompt import rag_messages as _rag_prompt_messages
from serve import schemas

log = logging.getLogger("ray.serve")

API_KEY_ENV = "RAYLM_API_KEY"
# Adapter engines kept per Generator replica; each holds a copy of the model, so this bounds memory.
MAX_ADAPTERS_PER_REPLICA = 2
# The prompt RAG fine-tuning (jobs.data, task=rag_qa) trains with: keep them the same.
DEFAULT_SYSTEM_PROMPT = RAG_SYSTEM_PROMPT


class AppArgs(BaseConfig):
    """``args`` of :func:`build_app` (the ``args:`` section of serve/config.yaml)."""

    storage: str = Field("./artifacts", description="artifact root holding models/, indexes/, adapters/")
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
    api_key: str | None = Field(None, description=f"require 'Authorization: Bearer <key>' (or env {API_KEY_ENV})")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="generator weights dtype")
    attention: Literal["auto", "eager", "sdpa", "flash_attention_2"] = Field("auto", description="attention kernel")
    max_batch_size: int = Field(8, ge=1, description="requests decoded together per generator replica")
    max_queue: int = Field(32, ge=1, description="requests waiting per engine; more get 503 + Retry-After")
    max_seq_len: int = Field(2048, ge=16, description="prompt + generated tokens per request")
    num_threads: int | None = Field(None, ge=1, description="torch threads per generator replica")
    compile: bool = Field(False, description="torch.compile the engine's decode step (faster decode; each engine "
                          "compiles before it serves, tens of seconds on a small CPU)")
    default_max_tokens: int = Field(128, ge=1, le=schemas.MAX_TOKENS_LIMIT, description="when a request omits it")
    request_timeout_s: float = Field(60.0, gt=0, description="end-to-end limit per request; then 504")
    max_body_bytes: int = Field(65_536, ge=1024, description="larger request bodies get 413")
    system_prompt: str = Field(DEFAULT_SYSTEM_PROMPT, description="system message of /v1/rag prompts")

    @field_validator("index", "model_id")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        return validate_name(v) if v else v


def parse_app_args(args: dict[str, Any] | None) -> AppArgs:
    """Validate ``args``; a bad key or value raises a one-line :class:`ConfigError`."""
    from pydantic import ValidationError

    try:
        parsed = AppArgs.model_validate(dict(args or {}))
    except ValidationError as err:
        raise ConfigError("serve app args: " + _format_validation_error(err)) from None
    if not parsed.api_key and os.environ.get(API_KEY_ENV):
        parsed.api_key = os.environ[API_KEY_ENV]
    parsed.storage = local_storage_root(parsed.storage)
    if not parsed.model_id:
        parsed.model_id = Path(parsed.model.rstrip("/")).name or parsed.model
    return parsed


class ApiError(Exception):
    """A request the app refuses: becomes ``{"error": {...}}`` with ``status``."""

    def __init__(self, status: int, message: str, param: str | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.retry_after = status, message, param, retry_after

    def to_dict(self) -> dict:
        return {"status": self.status, "message": self.message, "param": self.param, "retry_after": self.retry_after}

    @classmethod
    def from_dict(cls, d: dict) -> ApiError:
        return cls(d["status"], d["message"], d.get("param"), d.get("retry_after"))


def adapter_base(path: Path) -> str | None:
    """The base model an adapter was trained on: its manifest's ``base_model`` (this project's
    training and Tune write it), else PEFT's ``base_model_name_or_path``."""
    for name, key in (("manifest.json", "base_model"), ("adapter_config.json", "base_model_name_or_path")):
        try:
            value = json.loads((path / name).read_text()).get(key)
        except (OSError, ValueError):
            continue
        if value:
            return str(value)
    return None


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
    root = Path(storage) / "adapters"
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "adapter_config.json").is_file() and not p.name.startswith(".")
                  and (base is None or _same_model(adapter_base(p), base)))


def adapter_dir(storage: str, name: str, base: str | None = None) -> Path:
    """The directory of registered adapter ``name`` (trained on ``base`` when given).

    Raises:
        ApiError: 422 for a name that is not a plain artifact name (paths never are), 404 for one
            that is not registered, 422 for one trained on another base model.
    """
    if not re.match(schemas.NAME_PATTERN, name) or ".." in name:
        raise ApiError(422, f"adapter name {name[:80]!r} is not a registry name (letters, digits, '.', '-', '_')",
                       "adapter")
    path = Path(storage) / "adapters" / name
    if not (path / "adapter_config.json").is_file():
        raise ApiError(404, f"adapter '{name}' is not registered; registered: {registered_adapters(storage, base)}",
                       "adapter")
    if base is not None and not _same_model(adapter_base(path), base):
        raise ApiError(422, f"adapter '{name}' was trained on '{adapter_base(path)}', not on the served model "
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


class _AdapterEngine:
    """An engine over base + one LoRA adapter; Serve calls ``__del__`` when it evicts it."""

    def __init__(self, name: str, engine: Any):
        self.name, self.engine = name, engine

    def __del__(self) -> None:
        self.engine.close()


@serve.deployment(name="Generator", max_ongoing_requests=16, health_check_period_s=10, health_check_timeout_s=30,
                  ray_actor_options={"num_cpus": 1})
class Generator:
    """The model behind the engine; one engine per loaded LoRA adapter (bounded, LRU)."""

    def __init__(self, args: dict):
        import torch

        from ops.attention import choose_attention
        from ops.model import load_tokenizer, torch_dtype

        self.args = AppArgs.model_validate(args)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.attention = choose_attention(self.args.attention, device=self.device, dtype=torch_dtype(self.args.dtype))
        self.tokenizer = load_tokenizer(self.args.model, storage=self.args.storage)
        self.op_path = "reference"
        self.engine = self._engine(None)
        log.info("generator ready: model=%s attention=%s (%s) ops=%s engine=%s", self.args.model,
                 self.attention.name, self.attention.reason, self.op_path, self.engine.backend)

    def _engine(self, adapter: Path | None):
        from ops.engine import Engine, EngineConfig
        from ops.model import load_model

        model = load_model(self.args.model, storage=self.args.storage, dtype=self.args.dtype, device=self.device,
                           attn_implementation=self.attention.name, adapter=str(adapter) if adapter else None)
        self.op_path = op_path(model)
        config = EngineConfig(max_batch_size=self.args.max_batch_size, max_queue=self.args.max_queue,
                              max_seq_len=self.args.max_seq_len, num_threads=self.args.num_threads,
                              compile=self.args.compile)
        engine = Engine(model, self.tokenizer, config)
        engine.warmup()  # with `compile`, the replica (or adapter) is ready once its decode graphs are built
        if self.args.compile and not engine.compiled:
            log.warning("serving %s with the eager decode step: %s", self.args.model, engine.warmup_error)
        return engine

    @serve.multiplexed(max_num_models_per_replica=MAX_ADAPTERS_PER_REPLICA)
    async def adapter_engine(self, name: str) -> _AdapterEngine:
        path = adapter_dir(self.args.storage, name, self.args.model)
        return _AdapterEngine(name, await asyncio.to_thread(self._engine, path))

    async def _engine_for_request(self):
        name = serve.get_multiplexed_model_id()
        return (await self.adapter_engine(name)).engine if name else self.engine

    def _request(self, engine: Any, payload: dict):
        from ops.engine import Request

        params = {k: payload[k] for k in ("max_tokens", "temperature", "top_p", "seed") if k in payload}
        params["stop"] = payload.get("stop") or []
        if "rag" in payload:
            budget = engine.config.max_seq_len - payload["max_tokens"]
            count = lambda m: len(engine.encode(Request(messages=m, max_tokens=1)))  # noqa: E731
            messages = rag_messages(payload["rag"]["question"], payload["rag"]["sources"], self.args.system_prompt,
                                    count, budget)
            return Request(messages=messages, **params)
        if "messages" in payload:
            return Request(messages=payload["messages"], **params)
        return Request(prompt=payload["prompt"], **params)

    async def _start(self, payload: dict) -> AsyncIterator[Any]:
        from ops.engine import QueueFullError

        try:
            engine = await self._engine_for_request()
            return engine.stream(self._request(engine, payload))
        except QueueFullError as exc:
            raise ApiError(503, f"generator queue is full, retry later ({exc})", retry_after=1) from None
        except ValueError as exc:  # too long for max_seq_len, empty prompt, bad sampling values
            raise ApiError(422, str(exc), "max_tokens" if "max_tokens" in str(exc) else None) from None

    async def stream(self, payload: dict) -> AsyncIterator[dict]:
        """Yield ``{"text"}`` events, then ``{"text", "completion"}``; or one ``{"error"}`` event."""
        try:
            deltas = await self._start(payload)
        except ApiError as exc:
            yield {"error": exc.to_dict()}
            return
        async for delta in deltas:
            event: dict[str, Any] = {"text": delta.text}
            if delta.completion is not None:
                event["completion"] = _completion_dict(delta.completion)
            yield event

    async def generate(self, payload: dict) -> dict:
        """``{"completion": {...}}`` or ``{"error": {...}}``."""
        try:
            deltas = await self._start(payload)
        except ApiError as exc:
            return {"error": exc.to_dict()}
        async for delta in deltas:
            if delta.completion is not None:
                return {"completion": _completion_dict(delta.completion)}
        raise RuntimeError("engine stream ended without a completion")

    def info(self) -> dict:
        wrapper = getattr(self, "__serve_multiplex_wrapper", None)
        loaded = list(getattr(wrapper, "models", {}) or {}) if wrapper is not None else []
        return {"model": self.args.model, "attention": self.attention.name, "attention_reason": self.attention.reason,
                "op_path": self.op_path, "engine_backend": self.engine.backend,
                "engine_compiled": self.engine.compiled, "adapters_loaded": loaded,
                "pid": os.getpid()}


def _completion_dict(completion: Any) -> dict:
    d = dataclasses.asdict(completion)
    d.pop("token_ids", None)
    return d


@serve.deployment(name="Retriever", max_ongoing_requests=64, health_check_period_s=10, health_check_timeout_s=30,
                  ray_actor_options={"num_cpus": 0.5})
class Retriever:
    """Embedder + FAISS + BM25; concurrent queries are embedded and searched as one batch."""

    def __init__(self, index_dir: str, embedder: str | None = None, search: str = "hybrid",
                 reranker: str | None = None):
        from ops.retrieval import RetrievalStore

        self.store = RetrievalStore.load(index_dir, embedder, reranker=reranker)
        self.name = Path(index_dir).name
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


def _sse(data: Any) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


@serve.deployment(name="Ingress", max_ongoing_requests=64, health_check_period_s=10, health_check_timeout_s=30,
                  ray_actor_options={"num_cpus": 0})
@serve.ingress()
class Ingress:
    """HTTP front: validation, auth, limits; calls Retriever and Generator through handles."""

    def __init__(self, generator: DeploymentHandle, retriever: DeploymentHandle | None, args: dict):
        self.generator = generator
        self.retriever = retriever
        self.args = AppArgs.model_validate(args)
        self.created = int(time.time())

    def __serve_build_asgi_app__(self):
        from serve.api import make_api

        return make_api(self)

    # ----------------------------------------------------------------- calls to the deployments

    def resolve_model(self, model: str | None) -> str:
        """The adapter a request's ``model`` names ('' = the base model)."""
        if not model or model == self.args.model_id:
            return ""
        adapter_dir(self.args.storage, model, self.args.model)
        return model

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
        return await self._call(lambda: self.retriever.search.remote((question, top_k)), deadline)

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
                "index": index["index"] if index else None,
                "index_chunks": index["chunks"] if index else None, "adapters_loaded": info["adapters_loaded"],
                "generator_pid": info["pid"]}


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    """The RAG application for ``serve run serve/config.yaml``, ``serve deploy`` or ``serve.run``.

    Args:
        args: :class:`AppArgs` keys (storage, model, index, api_key, ...).

    Raises:
        ConfigError: unknown key, bad value, or a missing index directory.
    """
    parsed = parse_app_args(args)
    dumped = parsed.model_dump()
    retriever = None
    if parsed.index:
        index_dir = Path(parsed.storage) / "indexes" / parsed.index
        if not (index_dir / "manifest.json").is_file():
            raise ConfigError(f"index '{parsed.index}' not found at {index_dir}; build it with "
                              f"`python -m jobs.index name={parsed.index} storage={parsed.storage}` or set index: null")
        retriever = Retriever.bind(str(index_dir), parsed.embedder, parsed.search, parsed.reranker)
    return Ingress.bind(Generator.bind(dumped), retriever, dumped)
