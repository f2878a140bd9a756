"""Evaluate a model: sliding-window perplexity, batch-1 latency, size.

    python -m jobs.evaluate model=smollm2-135m-instruct data=../shared/data/wikitext2_valid.txt \\
        eval.max_tokens=4096 eval.window=1024 eval.stride=512 name=check

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
from cluster.config import save_config, storage_field
from cluster.runtime import init_ray
from cluster.storage import resolve_storage, validate_name
from ops import artifacts
from jobs.data import DataConfig, read_documents, token_stream
from ops.evaluation import EvalSpec, LatencySpec, describe, measure
from ops.model import DEFAULT_MODEL, load_model, load_tokenizer, parameter_count, torch_dtype


class EvaluateConfig(DataConfig):
    model: str = Field(DEFAULT_MODEL, description="model spec: embedded name, HF id, local dir, adapter or "
                       "quantized artifact dir")
    adapter: str | None = Field(None, description="LoRA adapter directory applied on top of `model`")
    name: str = Field("eval", description="report name: writes <storage>/reports/<name>/")
    storage: str = storage_field()
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="weights dtype")
    attn_implementation: Literal["auto", "eager", "sdpa", "flash_attention_2"] = Field(
        "auto", description="attention kernel; auto picks flash_attention_2 on GPU when possible, else sdpa")
    eval: EvalSpec = Field(default_factory=lambda: EvalSpec(max_tokens=4096, window=1024, stride=512,
                                                            latency=LatencySpec(prompt_tokens=128, new_tokens=32)))

    @model_validator(mode="after")
    def _name(self) -> "EvaluateConfig":
        validate_name(self.name)
        return self


DESCRIPTION = __doc__


def evaluate(cfg: EvaluateConfig) -> dict:
    """Compute the report for ``cfg`` (no files written)."""
    from ops.attention import choose_attention

    storage = resolve_storage(cfg.storage)
    cfg.eval.apply_threads()
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
    ids = torch.from_numpy(token_stream(docs, tokenizer, cfg.eval.max_tokens or None))

    def progress(done: int, total: int) -> None:
        print(f"[evaluate] perplexity: {done}/{total} tokens", flush=True)

    row = measure(model, ids, cfg.eval, progress=progress)
    return {"model": cfg.model, "adapter": cfg.adapter, "data": cfg.data, **row, "dtype": cfg.dtype,
            "attention": attention.name, "parameters": parameter_count(model), "load_s": load_s, "device": device,
            "torch": torch.__version__, "machine": platform.machine()}


def main(cfg: EvaluateConfig) -> dict:
    report = evaluate(cfg)
    with artifacts.publish(cfg.storage, artifacts.Kind.REPORTS, cfg.name) as out:
        (out / "report.json").write_text(json.dumps(report, indent=2))
        save_config(cfg, out)
    print(f"[evaluate] {describe(report)}, size {report['size_mb']:.1f} MB", flush=True)
    print(f"[evaluate] report: {artifacts.uri(cfg.storage, artifacts.Kind.REPORTS, cfg.name)}/report.json", flush=True)
    return report


if __name__ == "__main__":
    run_job(main, EvaluateConfig, prog="jobs.evaluate", description=DESCRIPTION)
