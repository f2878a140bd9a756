"""Evaluate a model: sliding-window perplexity, batch-1 latency, size.

    python -m jobs.evaluate model=smollm2-135m-instruct data=../shared/data/wikitext2_valid.txt \\
        max_tokens=4096 window=1024 stride=512 name=check

Reads: a model spec (embedded name, HF dir/id, ``adapters/<x>``, ``quantized/<x>``), a corpus.
Writes: ``<storage>/reports/<name>/report.json`` and ``config.yaml``.
"""

from __future__ import annotations

import json
import platform
import time
from typing import Literal

import torch
from pydantic import Field, model_validator

from cluster.cli import run_job
from cluster.config import BaseConfig, save_config
from cluster.runtime import init_ray
from cluster.storage import local_storage_root, validate_name, writable_artifact
from jobs.data import DataConfig, read_documents, token_stream
from ops.metrics import measure_latency, sliding_window_perplexity
from ops.model import DEFAULT_MODEL, load_model, load_tokenizer, model_size_bytes, parameter_count, torch_dtype


class LatencyConfig(BaseConfig):
    prompt_tokens: int = Field(128, ge=1, description="prompt length (tokens, taken from the data) for prefill timing")
    new_tokens: int = Field(32, ge=1, description="greedy tokens decoded for decode timing")
    repeats: int = Field(3, ge=1, description="timed runs; the median is reported")
    enabled: bool = Field(True, description="measure latency at all")


class EvaluateConfig(DataConfig):
    model: str = Field(DEFAULT_MODEL, description="model spec: embedded name, HF id, local dir, adapter or "
                       "quantized artifact dir")
    adapter: str | None = Field(None, description="LoRA adapter directory applied on top of `model`")
    name: str = Field("eval", description="report name: writes <storage>/reports/<name>/")
    storage: str = Field("./artifacts", description="artifact root: local path or URI")
    window: int = Field(1024, description="tokens per forward pass for perplexity")
    stride: int = Field(512, description="step between windows (1 <= stride <= window)")
    max_tokens: int = Field(4096, ge=0, description="evaluate the first N tokens of the corpus (0 = all)")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="weights dtype")
    attn_implementation: Literal["auto", "eager", "sdpa", "flash_attention_2"] = Field(
        "auto", description="attention kernel; auto picks flash_attention_2 on GPU when possible, else sdpa")
    threads: int = Field(0, ge=0, description="torch intra-op threads (0 = torch default)")
    latency: LatencyConfig = Field(default_factory=LatencyConfig)

    @model_validator(mode="after")
    def _window(self) -> "EvaluateConfig":
        if self.window < 2:
            raise ValueError(f"window must be >= 2, got {self.window}")
        if not 1 <= self.stride <= self.window:
            raise ValueError(f"stride must be between 1 and window ({self.window}), got {self.stride}")
        validate_name(self.name)
        return self


DESCRIPTION = __doc__


def evaluate(cfg: EvaluateConfig) -> dict:
    """Compute the report for ``cfg`` (no files written)."""
    from ops.attention import choose_attention

    storage = local_storage_root(cfg.storage)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    attention = choose_attention(cfg.attn_implementation, device=device, dtype=torch_dtype(cfg.dtype))
    docs = read_documents(cfg.data, cfg.data_format, cfg.text_field)
    tokenizer = load_tokenizer(cfg.model, storage=storage)
    t0 = time.perf_counter()
    model = load_model(cfg.model, storage=storage, dtype=cfg.dtype, adapter=cfg.adapter, device=device,
                       attn_implementation=attention.name)
    load_s = time.perf_counter() - t0
    print(f"[evaluate] model loaded in {load_s:.2f}s; attention={attention.name} ({attention.reason})", flush=True)
    init_ray()
    ids = torch.from_numpy(token_stream(docs, tokenizer, cfg.max_tokens or None))
    window = min(cfg.window, ids.numel())
    stride = min(cfg.stride, window)

    def progress(done: int, total: int) -> None:
        print(f"[evaluate] perplexity: {done}/{total} tokens", flush=True)

    t0 = time.perf_counter()
    ppl = sliding_window_perplexity(model, ids, window, stride, progress=progress)
    ppl_s = time.perf_counter() - t0
    report = {
        "model": cfg.model,
        "adapter": cfg.adapter,
        "data": cfg.data,
        "perplexity": ppl.perplexity,
        "nll_sum": ppl.nll_sum,
        "tokens": ppl.tokens,
        "predicted_tokens": ppl.predicted,
        "window": ppl.window,
        "stride": ppl.stride,
        "dtype": cfg.dtype,
        "attention": attention.name,
        "parameters": parameter_count(model),
        "size_mb": model_size_bytes(model) / 2**20,
        "load_s": load_s,
        "perplexity_s": ppl_s,
        "device": device,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
    }
    if cfg.latency.enabled:
        prompt = ids[: cfg.latency.prompt_tokens]
        lat = measure_latency(model, prompt, cfg.latency.new_tokens, cfg.latency.repeats)
        report.update(prefill_ms_per_token=lat.prefill_ms_per_token, decode_ms_per_token=lat.decode_ms_per_token,
                      latency_prompt_tokens=lat.prompt_tokens, latency_new_tokens=lat.new_tokens)
    else:
        report.update(prefill_ms_per_token=None, decode_ms_per_token=None)
    return report


def main(cfg: EvaluateConfig) -> dict:
    report = evaluate(cfg)
    with writable_artifact(cfg.storage, "reports", cfg.name) as out:
        (out / "report.json").write_text(json.dumps(report, indent=2))
        save_config(cfg, out)
    print(f"[evaluate] perplexity={report['perplexity']:.4f} over {report['tokens']} tokens "
          f"(window={report['window']}, stride={report['stride']})", flush=True)
    if report["decode_ms_per_token"] is not None:
        print(f"[evaluate] prefill {report['prefill_ms_per_token']:.2f} ms/token, decode "
              f"{report['decode_ms_per_token']:.2f} ms/token, size {report['size_mb']:.1f} MB", flush=True)
    print(f"[evaluate] report: {local_storage_root(cfg.storage)}/reports/{cfg.name}/report.json", flush=True)
    return report


if __name__ == "__main__":
    run_job(main, EvaluateConfig, prog="jobs.evaluate", description=DESCRIPTION)
