"""Generation engine: continuous-batching, streaming decode over a loaded HF causal LM (gpt-fast's generate.py).

One background thread owns the model and runs the scheduler loop (admit -> prefill a chunk of
at most `prefill_chunk_tokens` prompt tokens, sized by ops/prefill_budget.py while others decode
-> decode_one_token -> sample -> emit); asyncio
callers and plain scripts talk to it through thread-safe queues. The forward itself lives in
ops/runner.py (Llama-family models through `LlamaRunner` with a static KV cache, any other causal
LM through `HFRunner`), sampling in ops/sampling.py, the OpenMP thread hygiene of the decode
thread in ops/openmp.py and the prefix cache in ops/prefix_cache.py.
On a CUDA device the Llama-family forward is `ops.cuda_runner.CudaLlamaRunner` (CUDA graphs,
FlashAttention, the compiled ops in the hot path).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import math
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator, Sequence

import torch
from torch import nn

from ops.attention import AttentionChoice
from ops.extractive import SpanConstraint
from ops.lora import DEFAULT_TARGETS
from ops.multi_lora import LORA_DTYPES, AdapterRegistry, MultiLora, slot_dtype
from ops.openmp import release_openmp_workers, set_threads
from ops.prefill_budget import PrefillBudget, keys_per_unit
from ops.prefix_cache import PrefixCache
from ops.runner import LLAMA_FAMILY, HFRunner, LlamaRunner, is_llama_family
from ops.sampling import sample

__all__ = [
    "Completion", "Delta", "Engine", "EngineConfig", "EngineError", "HFRunner", "LLAMA_FAMILY", "LlamaRunner",
    "QueueFullError", "Request", "release_openmp_workers", "sample",
]

log = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """Raised by `Engine.submit` when `max_queue` requests are already waiting."""


class EngineError(RuntimeError):
    """Raised to a request's consumer when the engine failed while serving it."""


@dataclass
class Request:
    """One generation request.

    Attributes:
        prompt: Raw text prompt, tokenized as-is (exactly one of `prompt`/`messages`).
        messages: Chat messages (`[{"role": ..., "content": ...}]`); the tokenizer's chat
            template is applied with the generation prompt appended.
        max_tokens: Upper bound on generated tokens.
        temperature: 0 means greedy; otherwise logits are divided by it before sampling.
        top_p: Nucleus sampling mass in (0, 1]; 1 disables it.
        top_k: Keep only the k most likely tokens; 0 disables it.
        seed: Seed of this request's own generator, so sampling is reproducible per request.
        stop: Stop strings; generation ends at the first one and it is not emitted.
        ignore_eos: Keep generating past EOS (benchmarks, equality tests).
        adapter: Name of a LoRA adapter registered with `Engine.add_adapter`, applied unmerged to
            this request only; None = the base model.
        extract_from: Passages the answer must be copied from (`ops.extractive`): every generated
            token keeps the text a run of words of one of them (compared as SQuAD compares
            answers); None = free generation.
        beams: Beam width; 1 = greedy or sampled decoding. With more, the request holds `beams` KV
            rows and returns the most likely sequence found (sum of its tokens' log-probabilities,
            EOS included, no length penalty); its text arrives whole when it finishes. Needs
            temperature 0 and no stop strings.
        question: The question an extractive answer answers, for `support_weight`.
        support_weight: With `extract_from` and `beams` > 1: the beam's final answers are ranked by
            likelihood + this x how much of `question` the passage sentence each was copied from
            repeats (`ops.extractive.SpanConstraint.rank`); 0 = likelihood only.
    """

    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    adapter: str | None = None
    extract_from: list[str] | None = None
    beams: int = 1
    question: str | None = None
    support_weight: float = 0.0

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("Request needs exactly one of prompt= or messages=")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if any(not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty, got {self.stop!r}")
        if self.extract_from is not None and not any(s.strip() for s in self.extract_from):
            raise ValueError("extract_from needs at least one non-empty passage")
        if self.beams < 1:
            raise ValueError(f"beams must be >= 1, got {self.beams}")
        if self.beams > 1 and self.temperature > 0:
            raise ValueError(f"beams={self.beams} searches for the most likely answer: it needs temperature 0, got "
                             f"{self.temperature}")
        if self.beams > 1 and self.stop:
            raise ValueError(f"beams={self.beams} does not take stop strings (it finishes on EOS or max_tokens)")
        if self.support_weight < 0:
            raise ValueError(f"support_weight must be >= 0, got {self.support_weight}")
        if self.support_weight and not (self.extract_from and self.beams > 1 and (self.question or "").strip()):
            raise ValueError(f"support_weight={self.support_weight} ranks a beam search's extractive answers: it needs "
                             "extract_from, beams > 1 and a question")


@dataclass
class Completion:
    """Final result of a request.

    Attributes:
        text: Generated text, without stop string or special tokens.
        token_ids: Generated token ids (including a final EOS or stop-completing token).
        finish_reason: "stop" (EOS or stop string), "length" (max_tokens) or "cancelled".
        prompt_tokens: Number of prompt tokens.
        completion_tokens: Number of generated tokens.
        time_to_first_token_s: Seconds from submit to the first generated token.
        latency_s: Seconds from submit to the end of the request.
        tokens_per_s: Decode rate after the first token, (completion_tokens - 1) / decode time.
        beams: Beam width the request was decoded with (1: greedy or sampled).
        support_weight: `Request.support_weight` the answer was ranked with (0: likelihood only).
    """

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    time_to_first_token_s: float
    latency_s: float
    tokens_per_s: float
    beams: int = 1
    support_weight: float = 0.0


@dataclass
class Delta:
    """One streaming event: new text, and on the last event the `Completion`."""

    text: str
    completion: Completion | None = None


@dataclass
class EngineConfig:
    """Engine settings.

    Attributes:
        max_batch_size: Requests decoded together at most (rows of the KV cache).
        max_queue: Requests waiting for a free row at most; more raise `QueueFullError`.
        max_seq_len: Prompt + generated tokens per request at most (KV cache length).
        num_threads: `torch.set_num_threads` for the engine; None leaves torch's setting.
        single_stream_threads: Intra-op threads while exactly one request decodes; None = as
            `num_threads`. (With the OpenMP workers of the loading thread released, see
            `release_openmp_workers`, 2 threads beat 1 on 2 CPUs at batch 1 as well.)
        fuse_qkv: Concatenate q/k/v projections into one matmul when all three are plain
            `nn.Linear` (a snapshot of their weights is taken at engine creation), and q/k/v
            and SwiGLU gate/up when they are weight-only int4/int8 modules of one kind.
        force_hf_forward: Use the plain HF forward even for Llama-family models.
        compile: `torch.compile` the decoder layer of the Llama-family decode step (Inductor; on
            CPU with its C++ wrapper), so the small ops between the matmuls become generated
            code. Regional: one layer's graph is built and runs for every layer (with adapter
            slots a whole-model graph holds a LoRA gather per projection per layer, and its
            build took longer than anyone would wait). Two graphs (one request / several) are
            built at warm-up (Inductor caches them on disk). Ignored, with a warning, by the HF
            fallback, and on a CUDA device, whose decode step is captured in CUDA graphs instead
            (`cuda_graphs`).
        compile_background: With `compile`, build the graphs on a helper thread over a scratch KV
            cache while the engine already serves with the eager forward; decode steps switch to
            the graphs once both are built (`compiled`; `wait_compiled` waits for it). A server
            is then ready in seconds, not after the compile. False: `warmup` compiles first.
        max_adapters: LoRA adapters resident at once (slots of stacked weights, allocated at
            creation: ``max_adapters * adapter_slot_bytes``); 0 = no unmerged adapters. More
            registered adapters are loaded on use and the least recently used idle one is evicted.
        max_lora_rank: Largest adapter rank the slots hold (smaller ranks are zero-padded).
        lora_targets: Projections the slots cover; an adapter adapting others is refused.
        lora_dtype: Storage of the slots' weights: "auto" (bfloat16 when the base's projections
            compute in bfloat16, as weight-only int4/int8 layers do; else float32), "float32" or
            "bfloat16" (`ops.multi_lora.slot_dtype`). The update is summed in float32 either way.
        cuda_graphs: On a CUDA device, capture the Llama-family decode step in one CUDA graph per
            batch bucket at warm-up (`ops.cuda_runner`); False decodes eagerly there.
        prefill_chunk_tokens: Prompt tokens prefilled per scheduler step at most (chunked prefill):
            a long prompt is prefilled over several steps, each followed by one decode step of the
            running requests, so their streams keep going while it arrives; several short prompts
            share one step's budget. On CUDA prompts are prefilled whole (`CudaLlamaRunner`).
        prefill_stall: With requests decoding, size each prefill chunk so that the step takes at
            most about this many times a decode step (`ops.prefill_budget`: a cost model of the
            chunk's Linear and attention work, fitted to the steps measured so far), at most
            `prefill_chunk_tokens`; a chunk deep in a long prompt reads more keys, so it gets
            fewer tokens. None: always `prefill_chunk_tokens` (deterministic chunk boundaries).
        prefix_cache_mb: Memory bound of the prefix cache (MiB of keys and values): the KV of
            every whole `prefix_block_tokens` block of a prefilled prompt is kept, per model and
            adapter, and a later prompt that starts with the same blocks copies them instead of
            prefilling them; least recently used blocks are evicted. 0 = off. Ignored, with a
            warning, where prompts are prefilled whole or by the HF forward.
        prefix_block_tokens: Tokens per prefix cache block (only whole blocks are reused).
    """

    max_batch_size: int = 8
    max_queue: int = 64
    max_seq_len: int = 2048
    num_threads: int | None = None
    single_stream_threads: int | None = None
    fuse_qkv: bool = True
    force_hf_forward: bool = False
    compile: bool = False
    compile_background: bool = False
    max_adapters: int = 0
    max_lora_rank: int = 16
    lora_targets: tuple[str, ...] = DEFAULT_TARGETS
    lora_dtype: str = "auto"
    cuda_graphs: bool = True
    prefill_chunk_tokens: int = 256
    prefill_stall: float | None = None
    prefix_cache_mb: float = 0
    prefix_block_tokens: int = 32

    def __post_init__(self) -> None:
        if self.single_stream_threads is not None and self.single_stream_threads < 1:
            raise ValueError(f"single_stream_threads must be >= 1 or None, got {self.single_stream_threads}")
        if self.lora_dtype not in LORA_DTYPES:
            raise ValueError(f"lora_dtype={self.lora_dtype!r}; valid: {', '.join(LORA_DTYPES)}")
        if self.max_adapters < 0 or self.max_lora_rank < 1:
            raise ValueError(f"max_adapters must be >= 0 and max_lora_rank >= 1, got {self.max_adapters} and "
                             f"{self.max_lora_rank}")
        if self.prefill_stall is not None and self.prefill_stall <= 1:
            raise ValueError(f"prefill_stall must be > 1 or None, got {self.prefill_stall}")
        if self.prefix_cache_mb < 0:
            raise ValueError(f"prefix_cache_mb must be >= 0 (0: off), got {self.prefix_cache_mb}")
        for name in ("max_batch_size", "max_queue", "max_seq_len", "prefill_chunk_tokens", "prefix_block_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")



_ids = itertools.count()


@dataclass
class _Sequence:
    """Scheduler state of one request."""

    request: Request
    prompt_ids: list[int]
    on_event: Callable[[Delta | BaseException], None]
    submitted: float
    generator: torch.Generator | None
    request_id: int = field(default_factory=lambda: next(_ids))
    token_ids: list[int] = field(default_factory=list)
    emitted: int = 0  # characters of text already sent
    text: str = ""
    first_token_at: float = 0.0
    cancelled: bool = False
    finish_reason: str | None = None
    slot: int = 0  # LoRA slot pinned while running (0: no adapter)
    row: int = -1  # KV cache row while prefilling (while decoding: its index in `Engine._running`)
    prefilled: int = 0  # prompt tokens already in the KV cache
    constraint: SpanConstraint | None = None  # Request.extract_from
    beam: _Beam | None = None  # the beam search this sequence is a hypothesis of
    score: float = 0.0  # beam search: sum of the log-probabilities of `token_ids`

    @property
    def position(self) -> int:
        """KV cache index of the last token (the next one fed to the model)."""
        return len(self.prompt_ids) + len(self.token_ids) - 1

    @property
    def cached(self) -> int:
        """Filled KV cache positions of the request's row."""
        return self.prefilled + max(len(self.token_ids) - 1, 0)


@dataclass
class _Beam:
    """A beam search: `width` hypotheses, one KV row each, decoded in the batch like other requests.

    The leader is the request's own `_Sequence` (its id, events and LoRA slot); the other rows are
    followers that share its prompt. A hypothesis that continues another's tokens is written into a
    row by copying the other's generated keys and values (the prompt's are the same in every row).
    """

    leader: _Sequence
    width: int
    finished: list[tuple[float, float, list[int], str]] = field(default_factory=list)  # (rank, score, ids, reason)


class Engine:
    """Continuous-batching generation engine over a loaded HF causal LM.

    Usage from asyncio::

        engine = Engine(model, tokenizer, EngineConfig(max_batch_size=8))
        async for delta in engine.stream(Request(messages=[...])):
            ...                      # delta.text; the last delta carries .completion
        completion = await engine.generate(Request(prompt="..."))

    and from scripts: `engine.generate_sync([...])` / `for d in engine.stream_sync(req)`.
    The first request starts the background thread; `close()` (or `with Engine(...)`) stops it.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, config: EngineConfig | None = None):
        cfg = config or EngineConfig()
        if hasattr(model, "get_base_model"):  # PEFT: LoRA layers stay in place and apply
            model = model.get_base_model()
        self.model = model.eval()
        self.tokenizer = tokenizer
        max_pos = getattr(model.config, "max_position_embeddings", None)
        if max_pos is not None and cfg.max_seq_len > max_pos:
            cfg = dataclasses.replace(cfg, max_seq_len=max_pos)
        self.config = cfg
        self.device = next(model.parameters()).device
        llama = not cfg.force_hf_forward and is_llama_family(model, cfg.max_seq_len)
        if llama and self.device.type == "cuda":
            from ops.cuda_runner import CudaLlamaRunner  # imports ops.runner's CUDA-only pieces: load when used

            if cfg.max_adapters:
                raise ValueError(f"max_adapters={cfg.max_adapters}: unmerged LoRA slots run on CPU only; on CUDA "
                                 "merge the adapter (valid there: max_adapters=0)")
            if cfg.compile:
                log.info("EngineConfig.compile is not used on CUDA: the decode step is captured in CUDA graphs")
            self.adapters = None
            self.runner: LlamaRunner | HFRunner = CudaLlamaRunner(
                model, cfg.max_batch_size, cfg.max_seq_len, cfg.fuse_qkv, cfg.cuda_graphs
            )
        elif llama:
            lora = MultiLora(model, cfg.lora_targets, cfg.max_adapters, cfg.max_lora_rank,
                             slot_dtype(model, cfg.lora_dtype)) if cfg.max_adapters else None
            self.adapters = AdapterRegistry(lora) if lora is not None else None
            self.runner = LlamaRunner(
                model, cfg.max_batch_size, cfg.max_seq_len, cfg.fuse_qkv, cfg.compile, lora
            )
        else:
            if cfg.max_adapters:
                raise ValueError(f"max_adapters={cfg.max_adapters} needs a Llama-family model (unmerged LoRA runs in "
                                 f"LlamaRunner); {type(model).__name__} runs through the HF forward; valid: 0")
            self.adapters = None
            if cfg.compile:
                log.warning("EngineConfig.compile ignored: %s runs through the plain HF forward",
                            type(model).__name__)
            self.runner = HFRunner(model, cfg.max_batch_size, cfg.max_seq_len)
        self.eos_token_ids = self._eos_ids(model, tokenizer)
        self.prefix_cache = self._prefix_cache(cfg)
        self._budget = self._prefill_budget(cfg)
        self._model_key = getattr(model.config, "_name_or_path", "") or type(model).__name__
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []  # decoding requests; index == KV cache row
        # the request whose prompt is being prefilled, in chunks, in the row after the running ones
        self._prefilling: _Sequence | None = None
        self._by_id: dict[int, _Sequence] = {}  # unfinished requests, for cancel() from any thread
        self._wakeup = threading.Condition()
        self._ready = threading.Event()  # set by the engine thread once warm (decode graphs compiled)
        self.warmup_error: BaseException | None = None  # why compiling failed
        self._compile_thread: threading.Thread | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self._adapter_lock = threading.Lock()  # registry: add_adapter from callers, acquire on the engine thread
        self._threads = cfg.num_threads or torch.get_num_threads()  # intra-op threads of prefill / batches
        release_openmp_workers()  # this thread loaded the model: its idle OpenMP team would slow decode

    def _prefill_budget(self, cfg: EngineConfig) -> PrefillBudget | None:
        if cfg.prefill_stall is None or not isinstance(self.runner, LlamaRunner) or not self.runner.chunked_prefill:
            return None
        mc, r = self.model.config, self.runner
        return PrefillBudget(cfg.prefill_stall, cfg.prefill_chunk_tokens, keys_per_unit(
            mc.hidden_size, mc.intermediate_size, r.n_head, r.n_kv_head, r.head_dim))

    def _prefix_cache(self, cfg: EngineConfig) -> PrefixCache | None:
        if not cfg.prefix_cache_mb:
            return None
        if type(self.runner) is not LlamaRunner:
            log.warning("EngineConfig.prefix_cache_mb ignored: %s prefills prompts %s", type(self.runner).__name__,
                        "through the HF forward" if isinstance(self.runner, HFRunner) else "whole")
            return None
        return PrefixCache(cfg.prefix_block_tokens, int(cfg.prefix_cache_mb * 2**20))

    def prefix_cache_stats(self) -> dict[str, int]:
        """Prefix cache counters (`PrefixCacheStats` fields); empty without a prefix cache."""
        return dataclasses.asdict(self.prefix_cache.stats) if self.prefix_cache is not None else {}

    @property
    def backend(self) -> str:
        """"llama" (own forward with static KV cache) or "hf" (plain HF forward)."""
        return "llama" if isinstance(self.runner, LlamaRunner) else "hf"

    @property
    def attention(self) -> AttentionChoice | None:
        """The attention the engine's own Llama-family forward runs; None: the HF forward's own."""
        return getattr(self.runner, "attention", None)

    @property
    def num_running(self) -> int:
        """Requests currently holding a KV cache row."""
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        """Requests queued for a free row, and one whose prompt is being prefilled."""
        return len(self._waiting) + (self._prefilling is not None)

    @staticmethod
    def _eos_ids(model: nn.Module, tokenizer: Any) -> set[int]:
        ids: set[int] = set()
        for source in (getattr(model, "generation_config", None), model.config, tokenizer):
            eos = getattr(source, "eos_token_id", None)
            if eos is not None:
                ids.update([eos] if isinstance(eos, int) else eos)
        return ids

    # ----------------------------------------------------------------- public API

    def encode(self, request: Request) -> list[int]:
        """Tokenizes a request's prompt (applying the chat template to `messages`)."""
        if request.messages is not None:
            text = self.tokenizer.apply_chat_template(
                request.messages, add_generation_prompt=True, tokenize=False
            )
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.tokenizer(request.prompt)["input_ids"]

    def submit(self, request: Request, on_event: Callable[[Delta | BaseException], None]) -> int:
        """Queues a request; `on_event` is called from the engine thread for every event.

        Returns:
            The request id (for `cancel`).

        Raises:
            QueueFullError: `max_queue` requests are already waiting.
            ValueError: The prompt plus `max_tokens` exceeds `max_seq_len`, or is empty.
        """
        if self._closed:
            raise EngineError("engine is closed")
        prompt_ids = self.encode(request)
        if not prompt_ids:
            raise ValueError("prompt encodes to zero tokens")
        if request.adapter is not None and (self.adapters is None or request.adapter not in self.adapters.specs):
            raise ValueError(f"adapter {request.adapter!r} is not registered with this engine; registered: "
                             f"{sorted(self.adapters.specs) if self.adapters else []}")
        if len(prompt_ids) + request.max_tokens > self.config.max_seq_len:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({request.max_tokens}) exceeds "
                f"max_seq_len={self.config.max_seq_len}"
            )
        if request.beams > self.config.max_batch_size:
            raise ValueError(f"beams={request.beams} needs as many KV rows; this engine has max_batch_size="
                             f"{self.config.max_batch_size}")
        if request.beams > 1 and not isinstance(self.runner, LlamaRunner):
            raise ValueError(f"beams={request.beams}: beam search copies KV rows, which the HF fallback "
                             f"({type(self.model).__name__}) does not expose; valid: 1")
        generator = None
        if request.temperature > 0:
            generator = torch.Generator(device=self.device)
            if request.seed is None:
                generator.seed()
            else:
                generator.manual_seed(request.seed)
        seq = _Sequence(request, prompt_ids, on_event, time.perf_counter(), generator)
        if request.extract_from is not None:
            seq.constraint = SpanConstraint(request.extract_from, self.tokenizer, self.eos_token_ids,
                                            question=request.question, support_weight=request.support_weight)
        with self._wakeup:
            if len(self._waiting) >= self.config.max_queue:
                raise QueueFullError(
                    f"{len(self._waiting)} requests already waiting (max_queue={self.config.max_queue})"
                )
            self._waiting.append(seq)
            self._by_id[seq.request_id] = seq
            self._wakeup.notify()
        self.start()
        return seq.request_id

    def add_adapter(self, name: str, path: str | Path) -> None:
        """Registers LoRA adapter ``name`` (a PEFT directory); it loads into a slot at first use.

        Raises:
            ValueError: the engine has no LoRA slots (``max_adapters=0``), or the adapter is not a plain
                LoRA that fits them (rank, target modules).
        """
        if self.adapters is None:
            raise ValueError("this engine has no LoRA slots; valid: EngineConfig(max_adapters >= 1)")
        with self._adapter_lock:
            self.adapters.add(name, path)
            if self.prefix_cache is not None:  # the same name may now hold other weights
                self.prefix_cache.drop((self._model_key, name))

    @contextlib.contextmanager
    def adapter_slot(self, name: str | None) -> Iterator[int]:
        """Pins ``name``'s LoRA slot (loading it) for direct ``runner`` calls; yields it (0: no adapter).

        For evaluation on an engine with no requests in flight (``ops.evaluation.engine_perplexity``).
        """
        if name is None:
            yield 0
            return
        if self.adapters is None:
            raise ValueError("this engine has no LoRA slots; valid: EngineConfig(max_adapters >= 1)")
        with self._adapter_lock:
            slot = self.adapters.acquire(name)
        if slot is None:
            raise EngineError(f"every LoRA slot is pinned by running requests; none free for {name!r}")
        try:
            yield slot
        finally:
            with self._adapter_lock:
                self.adapters.release(slot)

    def adapter_stats(self) -> dict[str, Any]:
        """Resident adapters (least recently used first), loads, evictions, capacity and bytes per slot."""
        if self.adapters is None:
            return {"resident": [], "loads": 0, "evictions": 0, "capacity": 0, "slot_bytes": 0}
        with self._adapter_lock:
            return self.adapters.stats()

    def cancel(self, request_id: int) -> None:
        """Cancels a request; its row is freed at the next engine step."""
        seq = self._by_id.get(request_id)
        if seq is not None:
            seq.cancelled = True

    def stream(self, request: Request, interval_s: float = 0.0) -> AsyncIterator[Delta]:
        """Submits a request now and returns an async iterator over its `Delta`s.

        Deltas that queued up while the consumer was busy arrive merged into one (same text in
        order; the last carries the `Completion`). Closing or cancelling the iterator (client went
        away) cancels the request.

        Args:
            interval_s: After a delta, the next one waits until this long after it, merging the
                tokens decoded meanwhile (the first delta and the last, the completion, never wait).
                A server whose every delta crosses processes sets this so that its per-message cost
                is paid per interval instead of per token (vLLM's ``stream_interval``, in time).

        Raises:
            QueueFullError: immediately, so a server can answer 503 before streaming.
        """
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Delta | BaseException] = asyncio.Queue()
        request_id = self.submit(request, lambda e: loop.call_soon_threadsafe(events.put_nowait, e))
        return self._aiter(request_id, events, interval_s)

    async def _aiter(self, request_id: int, events: asyncio.Queue, interval_s: float) -> AsyncIterator[Delta]:
        done, failed, sent = False, None, -math.inf
        loop = asyncio.get_running_loop()
        try:
            while not done:
                event = failed or await events.get()
                if isinstance(event, BaseException):
                    raise EngineError(str(event)) from event
                # A consumer that fell behind (a slow client, a busy event loop) gets what queued up
                # meanwhile as one delta, as vLLM's output collector merges them: every event costs
                # the serving path a message per hop, so a backlog drains instead of growing. Within
                # `interval_s` of the last delta sent, what arrives is merged too.
                while event.completion is None:
                    if events.empty():
                        wait = sent + interval_s - loop.time()
                        if wait <= 0:
                            break
                        try:
                            more = await asyncio.wait_for(events.get(), wait)
                        except TimeoutError:
                            break
                    else:
                        more = events.get_nowait()
                    if isinstance(more, BaseException):
                        failed = more
                        break
                    event = Delta(event.text + more.text, more.completion)
                done = event.completion is not None
                sent = loop.time()
                yield event
        finally:
            if not done:
                self.cancel(request_id)

    def generate(self, request: Request) -> asyncio.Future[Completion]:
        """Submits a request now; the returned future resolves to its `Completion`.

        No per-token events: the caller's event loop wakes once, when the request finishes (a
        server thread that only needs the answer does not trade the GIL with the decode thread
        every token). Cancelling the future (a timeout, a client that went away) cancels the request.

        Raises:
            QueueFullError: immediately, so a server can answer 503.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Completion] = loop.create_future()

        def settle(event: Delta | BaseException) -> None:
            if future.done():
                return
            if isinstance(event, BaseException):
                future.set_exception(EngineError(str(event)))
            else:
                future.set_result(event.completion)

        def on_event(event: Delta | BaseException) -> None:
            if isinstance(event, BaseException) or event.completion is not None:
                loop.call_soon_threadsafe(settle, event)

        request_id = self.submit(request, on_event)
        future.add_done_callback(lambda f: self.cancel(request_id) if f.cancelled() else None)
        return future

    def stream_sync(self, request: Request) -> Iterator[Delta]:
        """Synchronous `stream` for scripts: submits now, yields `Delta`s."""
        events: queue.Queue[Delta | BaseException] = queue.Queue()
        request_id = self.submit(request, events.put)
        return self._iter(request_id, events)

    def _iter(self, request_id: int, events: queue.Queue) -> Iterator[Delta]:
        done = False
        try:
            while not done:
                event = events.get()
                if isinstance(event, BaseException):
                    raise EngineError(str(event)) from event
                done = event.completion is not None
                yield event
        finally:
            if not done:
                self.cancel(request_id)

    def generate_sync(self, requests: Sequence[Request]) -> list[Completion]:
        """Runs requests concurrently (continuous batching) and returns their completions."""
        streams = [self.stream_sync(r) for r in requests]
        return [[d for d in s][-1].completion for s in streams]

    def start(self) -> None:
        """Starts the background decode thread (idempotent)."""
        with self._wakeup:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="engine-decode", daemon=True)
                self._thread.start()

    def warmup(self, timeout: float | None = None) -> None:
        """Starts the engine and waits until it is warm: with `compile`, its decode graphs are built.

        Without it, this only starts the thread. Requests submitted earlier simply wait. If
        compiling fails, the error is logged, kept in `warmup_error`, and the engine decodes with
        the eager forward (`compiled` is then False).

        Raises:
            EngineError: The engine was not warm within `timeout` seconds.
        """
        self.start()
        if not self._ready.wait(timeout):
            raise EngineError(f"engine not warm after {timeout} s")

    def wait_compiled(self, timeout: float | None = None) -> bool:
        """Starts the engine and waits until compiling is over (at once without `compile`).

        Returns:
            `compiled`: False when there was nothing to compile, compiling failed
            (`warmup_error`), or it was still running after `timeout` seconds.
        """
        self.warmup(timeout)
        thread = self._compile_thread
        if thread is not None:
            thread.join(timeout)
        return self.compiled

    @property
    def compiled(self) -> bool:
        """Whether decode steps run compiled: torch.compile's graphs (CPU) or captured CUDA graphs
        (with `compile_background`: from the first step after the graphs were built)."""
        runner = self.runner
        return isinstance(runner, LlamaRunner) and (runner.compiled or runner._pending_step is not None)

    @property
    def compiling(self) -> bool:
        """Whether the decode graphs are being built in the background right now."""
        return self._compile_thread is not None and self._compile_thread.is_alive()

    def close(self) -> None:
        """Stops the decode thread; running and waiting requests end as cancelled."""
        with self._wakeup:
            self._closed = True
            self._wakeup.notify()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- engine thread

    def _decode_threads(self, batch: int) -> int:
        single = self.config.single_stream_threads
        return single if single is not None and batch == 1 else self._threads

    def _warm(self) -> None:
        runner = self.runner
        if self.config.compile_background and type(runner) is LlamaRunner and runner.compiles:
            self._compile_thread = threading.Thread(target=self._compile_off_thread, name="engine-compile",
                                                    daemon=True)
            self._compile_thread.start()
            self._ready.set()
            return
        try:
            if isinstance(self.runner, LlamaRunner):
                self.runner.warmup(lambda batch: set_threads(self._decode_threads(batch)))
        except Exception as exc:  # noqa: BLE001 - serve eagerly rather than not at all
            log.exception("compiling the decode step failed; decoding eagerly")
            self.warmup_error = exc
            self.runner._step = self.runner._decode
            self.runner.compiled = False
        finally:
            self._ready.set()

    def _compile_off_thread(self) -> None:
        started = time.perf_counter()
        try:
            self.runner.warmup(lambda batch: set_threads(self._decode_threads(batch)), background=True)
            log.info("decode graphs built in the background in %.1f s; decode steps run them from now on",
                     time.perf_counter() - started)
        except Exception as exc:  # noqa: BLE001 - the engine keeps serving eagerly
            log.exception("compiling the decode step failed; decoding eagerly")
            self.warmup_error = exc
        finally:
            release_openmp_workers()  # this thread's idle OpenMP team would slow the decode thread's steps

    def _loop(self) -> None:
        if self.config.num_threads is not None:
            torch.set_num_threads(self.config.num_threads)
        self._warm()
        while True:
            with self._wakeup:
                while not self._closed and not self._waiting and not self._running and self._prefilling is None:
                    self._wakeup.wait()
                closed = self._closed
            if closed:
                for seq in self._drain_waiting():
                    self._finish(seq, "cancelled")
                if self._prefilling is not None:
                    self._finish(self._prefilling, "cancelled")
                    self._prefilling = None
                for seq in self._running:
                    seq.cancelled = True
                self._retire()
                return
            try:
                self.step()
            except Exception as exc:  # noqa: BLE001 - delivered to every affected client
                prefilling = [self._prefilling] if self._prefilling is not None else []
                for seq in itertools.chain(self._running, prefilling, self._drain_waiting()):
                    self._by_id.pop(seq.request_id, None)
                    seq.on_event(exc)
                self._running.clear()
                self._prefilling = None

    def _drain_waiting(self) -> list[_Sequence]:
        with self._wakeup:
            seqs = list(self._waiting)
            self._waiting.clear()
        return seqs

    def step(self) -> None:
        """One scheduler iteration: prefill up to `prefill_chunk_tokens` prompt tokens, decode one token for all."""
        self._retire()
        prefilled = self._prefill_step()
        self._retire()
        if not self._running:
            return
        set_threads(self._decode_threads(len(self._running)))
        started = time.perf_counter()
        tokens = torch.tensor([s.token_ids[-1] for s in self._running], device=self.device)
        positions = torch.tensor([s.position for s in self._running], device=self.device)
        if self.adapters is not None:
            slots = torch.tensor([s.slot for s in self._running], device=self.device)
            logits = self.runner.decode_one_token(tokens, positions, slots)  # (B, V)
        else:
            logits = self.runner.decode_one_token(tokens, positions)
        greedy = logits.argmax(-1).tolist()
        if self._budget is not None and not prefilled:  # a decode step alone: what a chunk's stall is measured against
            self._budget.observe_decode(time.perf_counter() - started)
        beams: dict[int, list[tuple[_Sequence, torch.Tensor]]] = {}
        for b, seq in enumerate(self._running):
            if seq.beam is not None:  # a beam search's rows step together, below
                beams.setdefault(id(seq.beam), []).append((seq, logits[b]))
                continue
            if seq.constraint is not None:
                token = self._next_token(seq, logits[b])
            else:
                token = greedy[b] if seq.request.temperature == 0 else sample(logits[b], seq.request, seq.generator)
            self._accept(seq, token)
        for hypotheses in beams.values():
            self._beam_step(hypotheses)

    # ----------------------------------------------------------------- beam search

    def _start_beam(self, seq: _Sequence, logits: torch.Tensor) -> None:
        """Turns a request whose prompt was just prefilled into a beam search: its first tokens choose
        the hypotheses; rows after its own get the prompt's keys and values for them."""
        seq.first_token_at = time.perf_counter()
        seq.beam = _Beam(seq, seq.request.beams)
        self._beam_step([(seq, logits)], expanding=True)

    def _beam_step(self, hypotheses: list[tuple[_Sequence, torch.Tensor]], expanding: bool = False) -> None:
        """One step of a beam search: extends its open hypotheses by their `width` most likely (allowed)
        tokens each, keeps the `width` best non-final extensions and rewrites its rows to hold them.

        A hypothesis ending in EOS, or reaching max_tokens, is final, ranked by its score plus what its
        constraint adds (``SpanConstraint.rank``). The search ends once no open hypothesis can beat the
        best final one (a score only falls as tokens are added; the most a rank adds is the constraint's
        ``max_bonus``) or none is open; the leader then carries the best final hypothesis and the
        followers are dropped.
        """
        beam = hypotheses[0][0].beam
        request, width = beam.leader.request, beam.width
        candidates = []
        for seq, logits in hypotheses:
            logprobs = torch.log_softmax(logits.float(), -1)
            allowed = seq.constraint.mask(logprobs, seq.token_ids, seq.text) if seq.constraint else logprobs
            k = min(width, int(torch.isfinite(allowed).sum()))
            values, tokens = torch.topk(allowed, k)
            candidates += [(seq.score + v, seq, t) for v, t in zip(values.tolist(), tokens.tolist())]
        candidates.sort(key=lambda c: -c[0])
        survivors: list[tuple[float, _Sequence, int]] = []
        constraint = beam.leader.constraint

        def final(score: float, token_ids: list[int], reason: str) -> None:
            text_ids = token_ids[:-1] if reason == "stop" else token_ids
            rank = constraint.rank(score, text_ids) if constraint is not None else score
            beam.finished.append((rank, score, token_ids, reason))

        for score, seq, token in candidates:
            if token in self.eos_token_ids and not request.ignore_eos:
                final(score, [*seq.token_ids, token], "stop")
            elif len(survivors) < width:
                if len(seq.token_ids) + 1 >= request.max_tokens:
                    final(score, [*seq.token_ids, token], "length")
                else:
                    survivors.append((score, seq, token))
        best_final = max((f[0] for f in beam.finished), default=float("-inf"))
        bonus = constraint.max_bonus if constraint is not None else 0.0
        if not survivors or best_final >= survivors[0][0] + bonus or beam.leader.cancelled:
            self._end_beam(beam, [seq for seq, _ in hypotheses])
            return
        self._rewrite_beam_rows(beam, [seq for seq, _ in hypotheses], survivors, expanding)

    def _rewrite_beam_rows(self, beam: _Beam, members: list[_Sequence],
                           survivors: list[tuple[float, _Sequence, int]], expanding: bool) -> None:
        """Puts the surviving hypotheses into the beam's rows (adding follower rows on its first step),
        copying a parent's generated keys and values into a row that continues another's tokens."""
        rows = {id(seq): b for b, seq in enumerate(self._running)}
        if expanding:  # the leader's row only so far: followers in the rows after it
            leader = beam.leader
            for _ in range(len(survivors) - 1):
                follower = _Sequence(leader.request, leader.prompt_ids, _ignore_event, leader.submitted, None,
                                     slot=leader.slot, prefilled=leader.prefilled, constraint=leader.constraint,
                                     beam=beam, first_token_at=leader.first_token_at)
                follower.row = len(self._running)
                self._running.append(follower)
                self.runner.move(rows[id(leader)], follower.row, leader.cached)
                rows[id(follower)] = follower.row
                members.append(follower)
        # A surviving hypothesis stays in its parent's row where it can; the leader always holds one.
        assigned: dict[int, tuple[float, _Sequence, int]] = {}
        rest = []
        for survivor in survivors:
            parent = survivor[1]
            if id(parent) not in assigned and not expanding:
                assigned[id(parent)] = survivor
            else:
                rest.append(survivor)
        free = sorted((m for m in members if id(m) not in assigned), key=lambda m: m is not beam.leader)
        for seq, survivor in zip(free, rest):
            assigned[id(seq)] = survivor
        if id(beam.leader) not in assigned:  # only when fewer survivors than rows: hand the leader one
            donor = next(m for m in members if id(m) in assigned)
            assigned[id(beam.leader)] = assigned.pop(id(donor))
        prompt = len(beam.leader.prompt_ids)
        copies = [(seq, self.runner.read_kv(rows[id(parent)], prompt, prompt + len(parent.token_ids)))
                  for seq in members if id(seq) in assigned
                  for _, parent, _ in [assigned[id(seq)]] if parent is not seq and parent.token_ids]
        for seq, kv in copies:  # every source is read before any row is written
            self.runner.write_kv(rows[id(seq)], prompt, kv)
        updates = {id(seq): (score, [*parent.token_ids, token]) for seq in members if id(seq) in assigned
                   for score, parent, token in [assigned[id(seq)]]}
        for seq in members:
            if id(seq) in updates:
                seq.score, seq.token_ids = updates[id(seq)]
                seq.text = self.tokenizer.decode(seq.token_ids, skip_special_tokens=True)
            else:
                seq.finish_reason = "beam"  # a row no hypothesis needs: retired

    def _end_beam(self, beam: _Beam, members: list[_Sequence]) -> None:
        """Gives the leader the best final hypothesis (the best open one if none is final) and drops the rows."""
        leader = beam.leader
        final = beam.finished or [(m.score, m.score, m.token_ids, "length") for m in members]
        _, score, token_ids, reason = max(final, key=lambda f: f[0])
        leader.score, leader.token_ids = score, list(token_ids)
        text_ids = token_ids[:-1] if reason == "stop" else token_ids
        leader.text = self.tokenizer.decode(text_ids, skip_special_tokens=True)
        for seq in members:
            seq.finish_reason = "beam"
        leader.finish_reason = "cancelled" if leader.cancelled else reason

    def _next_token(self, seq: _Sequence, logits: torch.Tensor) -> int:
        """Samples `seq`'s next token from its (V,) logits, within its span constraint if it has one."""
        if seq.constraint is not None:
            logits = seq.constraint.mask(logits, seq.token_ids, seq.text, first_only=seq.request.temperature == 0)
        return sample(logits, seq.request, seq.generator)

    def _prefill_step(self) -> bool:
        """The prefill part of a step: prompt chunks of the admitted requests, within the step's budget.

        Returns whether any prompt token was prefilled.

        Chunks exist for the running streams' sake; with none running, one forward over the whole
        prompt is the fastest prefill (docs/benchmarks/prefill.md: 1.13 vs 1.54 ms/token for 1024 vs
        256). With streams running, a step prefills at most `prefill_chunk_tokens`, and with
        `prefill_stall` at most what fits in its time budget.
        """
        chunk = self.config.prefill_chunk_tokens
        tokens = chunk if self._running else self.config.max_seq_len
        budget_ms = self._budget.step_ms() if self._budget is not None and self._running else None
        prefilled = False
        while tokens > 0:
            seq = self._prefilling or self._admit()
            if seq is None:
                break
            take = tokens
            if budget_ms is not None:
                take = min(tokens, self._budget.tokens(seq.prefilled, budget_ms))
            start, t0 = seq.prefilled, time.perf_counter()
            taken = self._prefill_chunk(seq, take)
            elapsed = time.perf_counter() - t0
            prefilled |= taken > 0
            tokens -= taken
            if self._running:
                tokens = min(tokens, chunk)
            if self._budget is not None and taken <= chunk:  # the chunk sizes the model is for
                self._budget.observe_prefill(start, taken, elapsed)
                if budget_ms is None and self._running:
                    budget_ms = self._budget.step_ms()
                if budget_ms is not None:
                    budget_ms -= 1000.0 * elapsed
                    if budget_ms <= 0:
                        break
        return prefilled

    def _admit(self) -> _Sequence | None:
        """Takes the next waiting request into the free row after the running ones (None: no row or none waiting)."""
        while len(self._running) < self.config.max_batch_size:
            with self._wakeup:
                if not self._waiting:
                    return None
                if len(self._running) + self._waiting[0].request.beams > self.config.max_batch_size:
                    return None  # a beam search waits for its rows; first come, first served
                seq = self._waiting.popleft()
            if seq.cancelled:
                self._finish(seq, "cancelled")
                continue
            taken = self._take_slot(seq)
            if taken is None:
                return None
            if taken:
                seq.row = len(self._running)
                self._prefilling = seq
                self._reuse_prefix(seq)
                return seq
        return None

    def _prefill_chunk(self, seq: _Sequence, budget: int) -> int:
        """Prefills the next chunk (at most `budget` tokens) of `seq`'s prompt; returns the tokens it took.

        Once the whole prompt is in the cache, the request joins the running ones with its first token.
        """
        if seq.cancelled:
            self._prefilling = None
            self._finish(seq, "cancelled")
            return 0
        total = len(seq.prompt_ids)
        end = min(total, seq.prefilled + budget) if self.runner.chunked_prefill else total
        set_threads(self._threads)
        ids = torch.tensor(seq.prompt_ids[seq.prefilled : end], device=self.device)
        kwargs: dict[str, int] = {"start": seq.prefilled} if seq.prefilled else {}
        if seq.slot:
            kwargs["slot"] = seq.slot
        logits = self.runner.prefill(seq.row, ids, **kwargs)
        taken, seq.prefilled = end - seq.prefilled, end
        if end == total:
            self._prefilling = None
            self._store_prefix(seq)
            if seq.row != len(self._running):  # rows before it retired meanwhile: keep running rows contiguous
                self.runner.move(seq.row, len(self._running), seq.cached)
            seq.row = len(self._running)
            self._running.append(seq)
            if seq.request.beams > 1:
                self._start_beam(seq, logits)
            else:
                self._accept(seq, self._next_token(seq, logits))
        return taken

    def _reuse_prefix(self, seq: _Sequence) -> None:
        """Copies the KV of the longest cached prefix of `seq`'s prompt into its row.

        At most all but the last prompt token come from the cache: its logits need a prefill.
        """
        if self.prefix_cache is None:
            return
        blocks = self.prefix_cache.match((self._model_key, seq.request.adapter), seq.prompt_ids,
                                         len(seq.prompt_ids) - 1)
        if blocks:
            self.runner.write_kv(seq.row, 0, torch.cat(blocks, dim=3))
            seq.prefilled = len(blocks) * self.prefix_cache.block_tokens

    def _store_prefix(self, seq: _Sequence) -> None:
        """Caches the KV of every whole block of `seq`'s prompt that is not cached yet."""
        if self.prefix_cache is None:
            return
        size = self.prefix_cache.block_tokens
        for i, key in enumerate(self.prefix_cache.keys((self._model_key, seq.request.adapter), seq.prompt_ids)):
            if key not in self.prefix_cache:
                self.prefix_cache.insert(key, self.runner.read_kv(seq.row, i * size, (i + 1) * size))

    def _take_slot(self, seq: _Sequence) -> bool | None:
        """Pins the LoRA slot of an admitted request, loading its adapter into a slot if needed.

        Returns:
            True: admitted. None: every slot is pinned by running requests; the request is back at
            the head of the queue. False: loading failed; the request got the error and is dropped.
        """
        if seq.request.adapter is None:
            return True
        try:
            with self._adapter_lock:
                slot = self.adapters.acquire(seq.request.adapter)
        except Exception as exc:  # noqa: BLE001 - delivered to the request that named the adapter
            self._by_id.pop(seq.request_id, None)
            seq.on_event(exc)
            return False
        if slot is None:
            with self._wakeup:
                self._waiting.appendleft(seq)
            return None
        seq.slot = slot
        return True

    def _accept(self, seq: _Sequence, token: int) -> None:
        """Appends a token, emits the text that is safe to emit, and sets `finish_reason`."""
        now = time.perf_counter()
        if not seq.token_ids:
            seq.first_token_at = now
        seq.token_ids.append(token)
        request = seq.request
        is_eos = token in self.eos_token_ids and not request.ignore_eos
        text_ids = seq.token_ids[:-1] if is_eos else seq.token_ids
        seq.text = self.tokenizer.decode(text_ids, skip_special_tokens=True)
        end = len(seq.text)
        stops = [i for i in (seq.text.find(s) for s in request.stop) if i >= 0]
        if stops:
            end, seq.finish_reason = min(stops), "stop"
        elif is_eos:
            seq.finish_reason = "stop"
        elif len(seq.token_ids) >= request.max_tokens:
            seq.finish_reason = "length"
        if seq.finish_reason is not None:
            seq.text = seq.text[:end]  # the rest is sent with the completion by _finish
            return
        if seq.text.endswith("\ufffd"):  # incomplete UTF-8 character: wait for its bytes
            return
        # hold back a tail that may still grow into a stop string
        end -= _stop_prefix_len(seq.text, request.stop)
        if end > seq.emitted:
            seq.on_event(Delta(seq.text[seq.emitted : end]))
            seq.emitted = end

    def _retire(self) -> None:
        """Removes finished and cancelled requests, compacting running rows to 0..n-1."""
        for row in reversed(range(len(self._running))):
            seq = self._running[row]
            follower = seq.beam is not None and seq is not seq.beam.leader
            done = seq.finish_reason is not None or seq.cancelled
            if follower:  # goes with its beam search
                done = done or seq.beam.leader.finish_reason is not None or seq.beam.leader.cancelled
            if not done:
                continue
            last = len(self._running) - 1
            if row != last:
                moved = self._running[last]
                self.runner.move(last, row, moved.cached)
                self._running[row] = moved
            self._running.pop()
            if not follower:
                self._finish(seq, seq.finish_reason or "cancelled")

    def _finish(self, seq: _Sequence, reason: str) -> None:
        self._by_id.pop(seq.request_id, None)
        if seq.slot:
            with self._adapter_lock:
                self.adapters.release(seq.slot)
            seq.slot = 0
        now = time.perf_counter()
        n = len(seq.token_ids)
        first = seq.first_token_at or now
        completion = Completion(
            text=seq.text,
            token_ids=list(seq.token_ids),
            finish_reason=reason,
            prompt_tokens=len(seq.prompt_ids),
            completion_tokens=n,
            time_to_first_token_s=first - seq.submitted,
            latency_s=now - seq.submitted,
            tokens_per_s=(n - 1) / (now - first) if n > 1 and now > first else 0.0,
            beams=seq.request.beams,
            support_weight=seq.request.support_weight,
        )
        seq.on_event(Delta(seq.text[seq.emitted :], completion))
        seq.emitted = len(seq.text)



def _ignore_event(event: Delta | BaseException) -> None:
    """Events of a beam search's follower rows: the leader reports the search."""


def _stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best
