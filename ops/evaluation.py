"""One evaluation: sliding-window perplexity, batch-1 latency and size, with one set of key names.

Every job that measures a model with an HF forward (evaluate, quantize, pipeline) embeds
:class:`EvalSpec` as its ``eval`` section and calls :func:`measure`, so ``eval.window`` means the
same in each job's ``--help`` and a row from one job compares with a row from another. Measures
through the serving engine (Tune's trials, the pipeline's served row) use :func:`engine_measure`.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ops.metrics import check_window, measure_latency, sliding_window_perplexity
from ops.model import model_size_bytes


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LatencySpec(_Section):
    enabled: bool = Field(True, description="measure batch-1 prefill/decode latency at all")
    prompt_tokens: int = Field(64, ge=1, description="prompt length (tokens from the head of the evaluated "
                               "tokens) for prefill timing")
    new_tokens: int = Field(16, ge=1, description="greedy tokens decoded for decode timing")
    repeats: int = Field(3, ge=1, description="timed runs; the median is reported")


class _Threads:
    """``apply_threads`` of a section with a ``num_threads`` field."""

    def apply_threads(self) -> None:
        if self.num_threads:
            torch.set_num_threads(self.num_threads)


class EvalSpec(_Threads, _Section):
    max_tokens: int = Field(2048, ge=0, description="held-out tokens scored for perplexity (0 = all)")
    window: int = Field(512, description="tokens per forward pass for perplexity (>= 2)")
    stride: int = Field(256, description="step between perplexity windows (1 <= stride <= window)")
    num_threads: int = Field(0, ge=0, description="torch intra-op threads while measuring (0 = torch default)")
    latency: LatencySpec = Field(default_factory=LatencySpec)

    @model_validator(mode="after")
    def _window(self) -> "EvalSpec":
        check_window(self.window, self.stride)
        return self


class EngineEvalSpec(_Threads, _Section):
    """How a model is measured through the serving engine (:func:`engine_measure`)."""

    max_tokens: int = Field(2048, ge=0, description="held-out tokens scored for perplexity (0 = all), cut into "
                            "`rows` rows the engine decodes side by side, each scored from its first token")
    rows: int = Field(16, ge=1, description="rows of held-out tokens decoded side by side")
    new_tokens: int = Field(128, ge=0, description="batch-1 decode rate: tokens decoded for each of bench/decode.py's "
                            "prompts, EOS ignored (0 = no latency)")
    num_threads: int = Field(0, ge=0, description="torch intra-op threads while measuring (0 = torch default)")



def measure(model: torch.nn.Module, ids: torch.Tensor, spec: EvalSpec,
            progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Perplexity over ``ids`` (1-D, already cut to ``spec.max_tokens``), latency and size of ``model``.

    Returns:
        ``perplexity``, ``nll_sum``, ``tokens`` (evaluated), ``predicted_tokens`` (scored), ``window``, ``stride`` (as used: at most the tokens
        there are), ``perplexity_s``, ``prefill_ms_per_token`` and ``decode_ms_per_token`` (None
        with latency off), ``size_mb`` (weights in memory) and ``num_threads``.
    """
    window = min(spec.window, ids.numel())
    stride = min(spec.stride, window)
    t0 = time.perf_counter()
    ppl = sliding_window_perplexity(model, ids, window, stride, progress=progress)
    row: dict[str, Any] = {"perplexity": ppl.perplexity, "nll_sum": ppl.nll_sum, "tokens": ppl.tokens,
                           "predicted_tokens": ppl.predicted, "window": ppl.window,
                           "stride": ppl.stride, "perplexity_s": time.perf_counter() - t0,
                           "prefill_ms_per_token": None, "decode_ms_per_token": None,
                           "size_mb": model_size_bytes(model) / 2**20, "num_threads": torch.get_num_threads()}
    if spec.latency.enabled:
        lat = measure_latency(model, ids[: spec.latency.prompt_tokens], spec.latency.new_tokens, spec.latency.repeats)
        row.update(prefill_ms_per_token=lat.prefill_ms_per_token, decode_ms_per_token=lat.decode_ms_per_token)
    return row


def describe(row: dict[str, Any]) -> str:
    """One line for a log: perplexity with its window, and latency when measured."""
    text = f"perplexity={row['perplexity']:.4f} over {row['tokens']} tokens (window={row['window']}, " \
           f"stride={row['stride']})"
    if row.get("decode_ms_per_token") is not None:
        text += f", prefill {row['prefill_ms_per_token']:.2f} ms/token, decode {row['decode_ms_per_token']:.2f} ms/token"
    return text


# bench/decode.py's prompt set: the engine-path latency of a report is measured as that benchmark
# measures it, so the two agree on the same artifact.
DECODE_QUESTIONS = [
    "Explain what a hash map is and when to use one.",
    "Write a short story about a robot learning to paint.",
    "What are the main causes of the seasons on Earth?",
    "Give me three tips for writing readable Python code.",
]


@torch.inference_mode()
def engine_perplexity(engine: Any, ids: torch.Tensor, adapter: str | None = None, rows: int = 0) -> dict[str, Any]:
    """Teacher-forced perplexity of ``ids`` through the engine's own prefill and decode steps.

    ``ids`` is cut into ``rows`` equal pieces (at most the engine's batch size) that run side by
    side in cache rows 0..rows-1, one token per row per decode step, with ``adapter`` (registered
    with ``engine.add_adapter``) in every row: exactly the kernels, LoRA gather and KV cache that
    serve a request. Call it on an engine with no requests in flight.

    Returns:
        ``perplexity``, ``nll_sum``, ``predicted_tokens``, ``rows`` and ``row_tokens`` (context of each row).
    """
    import math

    from ops.openmp import release_openmp_workers

    runner = engine.runner
    rows = max(1, min(rows or engine.config.max_batch_size, engine.config.max_batch_size, ids.numel() // 2))
    length = min(ids.numel() // rows, engine.config.max_seq_len)
    pieces = ids[: rows * length].reshape(rows, length)
    with engine.adapter_slot(adapter) as slot:
        kwargs = {"slot": slot} if slot else {}
        logits = torch.stack([runner.prefill(r, pieces[r, :1], **kwargs) for r in range(rows)])  # (rows, V)
        slots = torch.full((rows,), slot, dtype=torch.long) if slot else None
        nll = 0.0
        for t in range(1, length):
            nll -= torch.log_softmax(logits.float(), -1).gather(1, pieces[:, t:t + 1]).sum().item()
            if t + 1 < length:
                step = (pieces[:, t], torch.full((rows,), t)) + ((slots,) if slots is not None else ())
                logits = runner.decode_one_token(*step)
    count = rows * (length - 1)
    # The steps above ran on this thread, which now holds an idle OpenMP team again: free it, or
    # every later step of the engine's own decode thread wakes it and decodes far slower
    release_openmp_workers()
    return {"perplexity": math.exp(nll / count), "nll_sum": nll, "predicted_tokens": count, "rows": rows,
            "row_tokens": length}


def engine_decode_rate(engine: Any, tokenizer: Any, adapter: str | None = None, new_tokens: int = 128,
                       questions: list[str] = DECODE_QUESTIONS) -> dict[str, float]:
    """Batch-1 decode through the engine as ``bench/decode.py`` measures it: its chat prompts, one at a
    time, ``new_tokens`` each (EOS ignored).

    Returns:
        ``tokens_per_s`` (end to end, prefill included), ``decode_tokens_per_s`` (after the first
        token) and ``decode_ms_per_token`` (its inverse).
    """
    import statistics

    from ops.engine import Request

    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                             tokenize=False) for q in questions]
    total, elapsed, decode = 0, 0.0, []
    for prompt in prompts:
        t0 = time.perf_counter()
        out = engine.generate_sync([Request(prompt=prompt, max_tokens=new_tokens, ignore_eos=True,
                                            adapter=adapter)])[0]
        elapsed += time.perf_counter() - t0
        total += out.completion_tokens
        decode.append(out.tokens_per_s)
    rate = statistics.mean(decode)
    return {"tokens_per_s": total / elapsed, "decode_tokens_per_s": rate, "decode_ms_per_token": 1000.0 / rate}


def engine_measure(model: torch.nn.Module, tokenizer: Any, ids: torch.Tensor, adapter: Any = None,
                   new_tokens: int | None = 128, rows: int = 16) -> dict[str, Any]:
    """Perplexity of ``ids`` and batch-1 decode rate of ``model`` through the serving engine.

    The same kernels, KV cache and (with ``adapter``, a PEFT adapter directory) unmerged LoRA
    gather that a Serve replica runs: :func:`engine_perplexity` over ``rows`` rows side by side (a
    decode step of 16 rows costs little more than one of 4 on a CPU) and, unless ``new_tokens`` is
    None, :func:`engine_decode_rate` (``bench/decode.py``'s prompts). So trials and pipeline rows
    measured this way compare with each other and with the benchmark.

    Returns:
        ``perplexity``, ``nll_sum``, ``predicted_tokens``, ``rows``, ``row_tokens``, ``size_mb``
        (weights in memory + the adapter's files) and, with latency, ``tokens_per_s``,
        ``decode_tokens_per_s`` and ``decode_ms_per_token``.
    """
    import json
    from pathlib import Path

    from ops.engine import Engine, EngineConfig

    rank = json.loads((Path(adapter) / "adapter_config.json").read_text())["r"] if adapter else None
    config = EngineConfig(max_batch_size=rows, max_seq_len=max(512, ids.numel() // rows + 1),
                          max_adapters=1 if adapter else 0, num_threads=torch.get_num_threads(),
                          **({"max_lora_rank": rank} if rank else {}))
    name = "measured" if adapter else None
    with Engine(model, tokenizer, config) as engine:
        if adapter:
            engine.add_adapter(name, adapter)
        row = engine_perplexity(engine, ids, adapter=name)
        if new_tokens:
            row.update(engine_decode_rate(engine, tokenizer, adapter=name, new_tokens=new_tokens))
    files = sum(f.stat().st_size for f in Path(adapter).glob("adapter_model.*")) if adapter else 0
    row["size_mb"] = (model_size_bytes(model) + files) / 2**20
    return row
