"""Decode benchmark of ops.engine against `transformers.generate` and llama.cpp.

Writes docs/benchmarks/decode.md and decode.json:
- batch-1 end-to-end tokens/s on the same prompts and the same number of new tokens;
- aggregate tokens/s and p50/p99 request latency at several concurrency levels.

    python bench/decode.py [--threads 2] [--new-tokens 128] [--quant METHOD] [--ppl-data FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

# Measure the checkout this script lives in, not whichever one the venv has installed editable.
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from ops.engine import Engine, EngineConfig, Request  # noqa: E402
from ops.model import DEFAULT_MODEL, embedded_gguf, load_model, load_tokenizer  # noqa: E402

QUESTIONS = [
    "Explain what a hash map is and when to use one.",
    "Write a short story about a robot learning to paint.",
    "What are the main causes of the seasons on Earth?",
    "Give me three tips for writing readable Python code.",
]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="torch / llama.cpp threads")
    p.add_argument("--single-stream-threads", type=int, default=1, help="engine intra-op threads while one "
                   "request decodes (EngineConfig.single_stream_threads; 0 = same as --threads)")
    p.add_argument("--new-tokens", type=int, default=128, help="new tokens per request (EOS ignored)")
    p.add_argument("--concurrency", default="1,4,8,16", help="comma-separated concurrent request counts")
    p.add_argument("--quant", default="weight_only_int4", help="quantized setting also measured (ops.quantization "
                   "method with its default settings; '' to skip)")
    p.add_argument("--ppl-data", default=None, help="text file for a float32 vs quantized perplexity check "
                   "(e.g. ../shared/data/wikitext2_valid.txt)")
    p.add_argument("--storage", default="./artifacts", help="artifact root holding the converted embedded model")
    p.add_argument("--out", default="docs/benchmarks", help="folder for decode.md / decode.json")
    return p.parse_args()




def quantize(model, method: str):
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
        model_path=str(embedded_gguf(DEFAULT_MODEL)), n_ctx=512, n_threads=threads,
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


def perplexity_of(model, tokenizer, path: str, tokens: int = 2048) -> float:
    """WikiText-style sliding-window perplexity (window 1024, stride 512) on the first `tokens`."""
    from ops.metrics import sliding_window_perplexity

    ids = tokenizer(Path(path).read_text()[: tokens * 8], add_special_tokens=False,
                    return_tensors="pt")["input_ids"][0, :tokens]
    return sliding_window_perplexity(model, ids, 1024, 512).perplexity


def main() -> None:
    args = parse_args()
    load_at_start = os.getloadavg()[0]  # the machine is shared: record how busy it was
    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(DEFAULT_MODEL, storage=args.storage)
    model = load_model(DEFAULT_MODEL, storage=args.storage)
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        for q in QUESTIONS
    ]
    levels = [int(c) for c in args.concurrency.split(",")]
    config = EngineConfig(max_batch_size=max(levels), max_seq_len=512, num_threads=args.threads,
                          single_stream_threads=args.single_stream_threads or None)

    hf = bench_hf(model, tokenizer, prompts, args.new_tokens)
    print(f"transformers.generate: {hf:.1f} tok/s", flush=True)
    with Engine(model, tokenizer, config) as engine:
        engine.generate_sync([Request(prompt=prompts[0], max_tokens=4)])  # warm-up
        eng_e2e, eng_decode = bench_engine_batch1(engine, prompts, args.new_tokens)
        backend = engine.backend
    print(f"engine fp32: {eng_e2e:.1f} tok/s (decode only {eng_decode:.1f})", flush=True)
    lcpp = bench_llama_cpp(prompts, args.new_tokens, args.threads)
    print(f"llama.cpp: {lcpp if lcpp is None else round(lcpp, 1)} tok/s", flush=True)
    ppl = {"data": args.ppl_data, "float32": None, "quantized": None}
    if args.ppl_data:
        ppl["float32"] = perplexity_of(model, tokenizer, args.ppl_data)
    quant_e2e = quant_decode = None
    if args.quant:
        model = quantize(model, args.quant)
        if args.ppl_data:
            ppl["quantized"] = perplexity_of(model, tokenizer, args.ppl_data)
    # The concurrency sweep runs on the quantized model when one is given: the setting to serve.
    with Engine(model, tokenizer, config) as engine:
        engine.generate_sync([Request(prompt=prompts[0], max_tokens=4)])  # warm-up
        if args.quant:
            quant_e2e, quant_decode = bench_engine_batch1(engine, prompts, args.new_tokens)
            print(f"engine {args.quant}: {quant_e2e:.1f} tok/s (decode only {quant_decode:.1f})", flush=True)
        concurrent = []
        for n in levels:
            concurrent.append(asyncio.run(bench_concurrent(engine, prompts, n, args.new_tokens)))
            print(concurrent[-1], flush=True)

    result = {
        "model": "SmolLM2-135M-Instruct (embedded GGUF, de-quantized to float32)",
        "quant": args.quant,
        "engine_backend": backend,
        "threads": args.threads,
        "single_stream_threads": args.single_stream_threads or args.threads,
        "new_tokens": args.new_tokens,
        "prompts": len(prompts),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "load_average_at_start": load_at_start,
        "perplexity": ppl,
        "batch1_tokens_per_s": {
            "engine": eng_e2e, "engine_decode_only": eng_decode, "engine_quantized": quant_e2e,
            "engine_quantized_decode_only": quant_decode, "transformers_generate": hf, "llama_cpp": lcpp,
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
    q = r["quant"]
    ppl = r["perplexity"]
    lines = [
        "# Decode benchmark",
        "",
        f"Generated by `bench/decode.py`: {r['model']}, quantized setting `{q}`, {r['threads']} threads "
        f"({r['single_stream_threads']} while the engine decodes a single request), "
        f"{r['new_tokens']} new tokens per request (EOS ignored), {r['prompts']} chat prompts, "
        f"engine backend `{r['engine_backend']}`, torch {r['torch']}, "
        f"1-min load average at start {r['load_average_at_start']:.1f} on {os.cpu_count()} CPUs. "
        "All rows come from this one run.",
        "",
        "## Batch 1 (end-to-end new tokens/s, prefill included)",
        "",
        "| generator | tokens/s | vs llama.cpp |",
        "|---|---|---|",
        f"| ops.engine (fp32) | {b['engine']:.1f} | {ratio(b['engine'])} |",
        f"| ops.engine (fp32), decode steps only | {b['engine_decode_only']:.1f} | {ratio(b['engine_decode_only'])} |",
    ]
    if q:
        lines += [
            f"| ops.engine ({q}) | {b['engine_quantized']:.1f} | {ratio(b['engine_quantized'])} |",
            f"| ops.engine ({q}), decode steps only | {b['engine_quantized_decode_only']:.1f} | "
            f"{ratio(b['engine_quantized_decode_only'])} |",
        ]
    lines += [
        f"| transformers.generate (fp32) | {b['transformers_generate']:.1f} | {ratio(b['transformers_generate'])} |",
        f"| llama.cpp (GGUF Q4_1) | {lcpp_cell} | {'1.00x' if lcpp else '-'} |",
        "",
    ]
    if ppl["float32"] is not None:
        rel = f"{ppl['quantized'] / ppl['float32']:.4f}x" if ppl["quantized"] is not None else "-"
        quant_cell = f"{ppl['quantized']:.4f}" if ppl["quantized"] is not None else "-"
        lines += [
            f"Perplexity on the first 2048 tokens of `{ppl['data']}` (window 1024, stride 512): "
            f"float32 {ppl['float32']:.4f}, {q or 'no quantization'} {quant_cell} ({rel}).",
            "",
        ]
    lines += [
        f"## Concurrent requests (ops.engine{', ' + q if q else ', fp32'}, continuous batching)",
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
