"""Quantize a model with several methods and compare each against full precision in the same run.

    python -m jobs.quantize model=smollm2-135m-instruct methods=all \\
        data=../shared/data/wikitext2_valid.txt name=qcheck

For every method: quantize the float model (``adapter=`` is merged in first), save the artifact
to ``<storage>/quantized/<name>-<method>/``, load it back through ``ops.model.load_model``, check
its logits equal the in-memory model's, then measure size on disk, perplexity on ``data`` and
batch-1 prefill/decode latency of the reloaded model. The float32 model is measured first, as the
baseline of every ratio.

Writes: ``<storage>/quantized/<name>-<method>/`` (artifact + ``report.json``) and
``<storage>/reports/<name>/`` (``report.json`` with all rows, the table ``quantization.md``,
``config.yaml``). ``python bench/quantization.py`` copies the table into ``docs/benchmarks/``.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, field_validator, model_validator

from cluster.cli import run_job
from cluster.config import BaseConfig, save_config, storage_field
from cluster.runtime import init_ray
from cluster.storage import resolve_storage, validate_name
from ops import artifacts
from jobs.data import DataConfig, detect_format, read_documents, token_stream
from ops.errors import UserError
from ops.evaluation import EvalSpec, LatencySpec, describe, measure
from ops.model import DEFAULT_MODEL, load_model, load_tokenizer
from ops.quantization import (METHODS, check, DynamicInt8Settings, StaticInt8Settings, WeightOnlyInt4Settings,
                              WeightOnlyInt8Settings, quantize, save_quantized)

# The promise of the seed pipeline, checked per row.
PROMISE = {"decode_ratio_max": 0.70, "perplexity_ratio_max": 1.02, "size_ratio_max": 0.50}


class CalibrationConfig(BaseConfig):
    data: str | None = Field(None, description="calibration corpus for static_int8 (null = the same corpus as "
                             "`data`, taken from the END of its token stream, away from the evaluated head)")
    samples: int = Field(16, ge=1, description="calibration sequences")
    seq_len: int = Field(256, ge=2, description="tokens per calibration sequence")


class QuantizeConfig(DataConfig):
    model: str = Field(DEFAULT_MODEL, description="float model spec: embedded name, HF id or local dir")
    adapter: str | None = Field(None, description="LoRA adapter directory merged into `model` before quantizing")
    methods: list[str] = Field(list(METHODS), description=f"'all' or a list of: {', '.join(METHODS)} (default: all)")
    name: str = Field("quant", description="artifact name: writes <storage>/quantized/<name>-<method>/ and "
                      "<storage>/reports/<name>/")
    storage: str = storage_field()
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    eval: EvalSpec = Field(default_factory=lambda: EvalSpec(
        max_tokens=2048, window=1024, stride=512, num_threads=2,
        latency=LatencySpec(prompt_tokens=128, new_tokens=32, repeats=5)))
    dynamic_int8: DynamicInt8Settings = Field(default_factory=DynamicInt8Settings)
    static_int8: StaticInt8Settings = Field(default_factory=StaticInt8Settings)
    weight_only_int8: WeightOnlyInt8Settings = Field(default_factory=WeightOnlyInt8Settings)
    weight_only_int4: WeightOnlyInt4Settings = Field(default_factory=WeightOnlyInt4Settings)

    @field_validator("methods", mode="before")
    @classmethod
    def _methods(cls, v: Any) -> list[str]:
        chosen = list(METHODS) if v == "all" else ([v] if isinstance(v, str) else list(v))
        bad = [m for m in chosen if m not in METHODS]
        if bad or not chosen:
            raise ValueError(f"unknown method {bad[0] if bad else '(none)'!r}; valid: all or a list of "
                             f"{', '.join(METHODS)}")
        return chosen

    @model_validator(mode="after")
    def _name(self) -> "QuantizeConfig":
        validate_name(self.name)
        return self

    def settings(self, method: str) -> dict[str, Any]:
        section = getattr(self, method, None)
        return section.model_dump(mode="json") if section is not None else {}


DESCRIPTION = __doc__


def dir_size_bytes(directory: Path, pattern: str = "*.safetensors") -> int:
    return sum(p.stat().st_size for p in Path(directory).glob(pattern))


def calibration_ids(cfg: QuantizeConfig, tokenizer: Any, eval_ids: torch.Tensor, all_ids: torch.Tensor | None
                    ) -> torch.Tensor:
    """(samples, seq_len) token ids for static_int8, disjoint from the evaluated tokens."""
    need = cfg.calibration.samples * cfg.calibration.seq_len
    if cfg.calibration.data is None:
        ids = all_ids
        if ids.numel() - eval_ids.numel() < need:
            raise UserError(f"calibration needs {need} tokens of `data` beyond the {eval_ids.numel()} evaluated, "
                            f"but it has {ids.numel()}; set calibration.data=<another corpus>, lower "
                            f"calibration.samples/seq_len or eval.max_tokens")
    else:
        docs = read_documents(cfg.calibration.data, "auto", cfg.text_field)
        ids = torch.from_numpy(token_stream(docs, tokenizer, need))
        if ids.numel() < need:
            raise UserError(f"calibration.data '{cfg.calibration.data}' has {ids.numel()} tokens, fewer than "
                            f"calibration.samples*seq_len = {need}")
    return ids[-need:].reshape(cfg.calibration.samples, cfg.calibration.seq_len)


def measure_row(model: torch.nn.Module, ids: torch.Tensor, cfg: QuantizeConfig, label: str) -> dict[str, Any]:
    """:func:`ops.evaluation.measure` of ``model`` on ``ids``, logged."""
    row = measure(model, ids, cfg.eval)
    print(f"[quantize] {label}: {describe(row)}", flush=True)
    return row


def add_ratios(row: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """Ratios to the float32 row and whether the row meets :data:`PROMISE`."""
    for key, out in (("size_mb", "size_ratio"), ("perplexity", "perplexity_ratio"),
                     ("prefill_ms_per_token", "prefill_ratio"), ("decode_ms_per_token", "decode_ratio")):
        row[out] = row[key] / base[key] if row.get(key) is not None and base.get(key) else None
    row["meets_promise"] = bool(
        row["decode_ratio"] is not None and row["decode_ratio"] <= PROMISE["decode_ratio_max"]
        and row["perplexity_ratio"] <= PROMISE["perplexity_ratio_max"]
        and row["size_ratio"] <= PROMISE["size_ratio_max"])
    return row


def markdown_table(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    def f(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    lines = [
        "# Quantization: quality / latency / size",
        "",
        f"Generated by `python -m jobs.quantize {meta['command']}` on {meta['date']} "
        f"(torch {meta['torch']}, {meta['machine']}, {meta['threads']} threads; CPU shared with other jobs, "
        f"so latencies are noisy).",
        f"Model `{meta['model']}`; perplexity on `{meta['data']}`, first {meta['tokens']} tokens, window "
        f"{meta['window']}, stride {meta['stride']}; latency at batch 1: prompt {meta['prompt_tokens']} tokens, "
        f"{meta['new_tokens']} greedy tokens, median of {meta['repeats']} (HF forward + KV cache). Ratios are to "
        f"the float32 row of the same run. Size = safetensors bytes on disk.",
        f"Promise: decode <= {PROMISE['decode_ratio_max']:.2f}x, perplexity <= {PROMISE['perplexity_ratio_max']:.2f}x,"
        f" size <= {PROMISE['size_ratio_max']:.2f}x of float32.",
        "",
        "| method | size MB | size x | perplexity | ppl x | prefill ms/tok | prefill x | decode ms/tok | decode x "
        "| reload exact | meets promise | lm_head / settings |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        settings = ", ".join(f"{k}={v}" for k, v in r.get("settings", {}).items())
        lines.append(
            f"| {r['method']} | {f(r['size_mb'], '.1f')} | {f(r['size_ratio'], '.3f')} | {f(r['perplexity'], '.4f')} "
            f"| {f(r['perplexity_ratio'], '.4f')} | {f(r.get('prefill_ms_per_token'), '.2f')} "
            f"| {f(r['prefill_ratio'], '.3f')} | {f(r.get('decode_ms_per_token'), '.2f')} "
            f"| {f(r['decode_ratio'], '.3f')} | {r.get('reload_exact', '-')} "
            f"| {'**yes**' if r['meets_promise'] else 'no'} | {settings or '-'} |")
    return "\n".join(lines) + "\n"


def quantize_one(cfg: QuantizeConfig, method: str, float_model: torch.nn.Module, tokenizer: Any,
                 calibration: torch.Tensor | None, check_ids: torch.Tensor, eval_ids: torch.Tensor,
                 float_row: dict[str, Any]) -> dict[str, Any]:
    """Quantize, save the artifact, reload it from the saved files, check its logits, measure it and
    publish it with its ``report.json``; returns the row."""
    settings = cfg.settings(method)
    t0 = time.perf_counter()
    qmodel = quantize(float_model, method, calibration=calibration, **settings)
    quantize_s = time.perf_counter() - t0
    with torch.inference_mode():
        expected = qmodel(input_ids=check_ids).logits
    base = cfg.model if cfg.adapter is None else f"{cfg.model} + adapter {cfg.adapter}"
    name = f"{cfg.name}-{method}"
    with artifacts.publish(cfg.storage, artifacts.Kind.QUANTIZED, name) as out:
        save_quantized(qmodel, out, method, settings, cfg.model, tokenizer,
                       extra={"adapter": cfg.adapter, "base_description": base, "quantize_s": quantize_s})
        save_config(cfg, out)
        del qmodel
        reloaded = load_model(str(out), storage=cfg.storage)
        with torch.inference_mode():
            diff = (reloaded(input_ids=check_ids).logits.float() - expected.float()).abs().max().item()
        if diff != 0.0:
            raise RuntimeError(f"{method}: reloaded artifact differs from the in-memory model (max |diff| {diff})")
        row = measure_row(reloaded, eval_ids, cfg, method)
        # Size on disk: what a quantized format saves is bytes to ship and load.
        row.update(method=method, settings=settings, artifact=artifacts.uri(cfg.storage, artifacts.Kind.QUANTIZED, name),
                   reload_exact=True, reload_max_abs_diff=diff, size_mb=dir_size_bytes(out) / 2**20)
        add_ratios(row, float_row)
        (out / "report.json").write_text(json.dumps(row, indent=2))
    return row


def main(cfg: QuantizeConfig) -> dict[str, Any]:
    storage = resolve_storage(cfg.storage)
    cfg.eval.apply_threads()
    docs = read_documents(cfg.data, cfg.data_format, cfg.text_field)
    if "static_int8" in cfg.methods and cfg.calibration.data is not None:
        detect_format(cfg.calibration.data)  # fail before any model work
    tokenizer = load_tokenizer(cfg.model, storage=storage)
    float_model = load_model(cfg.model, storage=storage, adapter=cfg.adapter)
    if cfg.adapter:
        from ops.lora import merge_adapter

        float_model = merge_adapter(float_model).eval()
    for method in cfg.methods:
        check(float_model, method, **cfg.settings(method))
    init_ray()
    needs_stream = "static_int8" in cfg.methods and cfg.calibration.data is None
    all_ids = torch.from_numpy(token_stream(docs, tokenizer, None)) if needs_stream else None
    eval_ids = all_ids[: cfg.eval.max_tokens or None] if all_ids is not None else \
        torch.from_numpy(token_stream(docs, tokenizer, cfg.eval.max_tokens or None))
    calibration = calibration_ids(cfg, tokenizer, eval_ids, all_ids) if "static_int8" in cfg.methods else None
    check_ids = eval_ids[:64].reshape(1, -1)
    # Ray is only needed for tokenizing; leaving it keeps the long measurements independent of the cluster.
    import ray

    ray.shutdown()

    float_row = measure_row(float_model, eval_ids, cfg, "float32")
    float_row.update(method="float32", settings={}, reload_exact=None)
    rows = [add_ratios(float_row, float_row)]
    for method in cfg.methods:
        rows.append(quantize_one(cfg, method, float_model, tokenizer, calibration, check_ids, eval_ids, float_row))
    meta = {"model": cfg.model, "adapter": cfg.adapter, "data": cfg.data, "tokens": int(eval_ids.numel()),
            "window": float_row["window"], "stride": float_row["stride"], "prompt_tokens": cfg.eval.latency.prompt_tokens,
            "new_tokens": cfg.eval.latency.new_tokens, "repeats": cfg.eval.latency.repeats,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.machine(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "promise": PROMISE,
            "command": " ".join(f"{k}={v}" for k, v in (("model", cfg.model), ("methods", ",".join(cfg.methods)),
                                                         ("data", cfg.data), ("name", cfg.name)))}
    report = {"meta": meta, "rows": rows, "config": json.loads(json.dumps(cfg.model_dump(mode="json")))}
    with artifacts.publish(cfg.storage, artifacts.Kind.REPORTS, cfg.name) as out:
        (out / "report.json").write_text(json.dumps(report, indent=2))
        (out / "quantization.md").write_text(markdown_table(rows, meta))
        save_config(cfg, out)
    print(markdown_table(rows, meta), flush=True)
    print(f"[quantize] report: {artifacts.uri(cfg.storage, artifacts.Kind.REPORTS, cfg.name)}/quantization.md "
          f"(+ report.json)", flush=True)
    return report


if __name__ == "__main__":
    run_job(main, QuantizeConfig, prog="jobs.quantize", description=DESCRIPTION)
