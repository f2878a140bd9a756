"""Decode benchmark of ops.engine against `transformers.generate` and llama.cpp.

Writes docs/benchmarks/decode.md and decode.json:
- batch-1 end-to-end tokens/s on the same prompts and the same number of new tokens;
- aggregate tokens/s and p50/p99 request latency at several concurrency levels;
- with --ppl-data, perplexity through the HF forward and through the engine's decode steps;
- adapters: 8 concurrent requests over 4 LoRA adapters (unmerged, one quantized base), and the
  resident memory that 16 loaded adapters add against their files' size;
- served: batch-1 streaming through the real Serve endpoint with serve/config.yaml's args (no index)
  and the pipeline's served model (what `make demo` serves: by default the adapter unmerged on the
  int4 base; `--served-model`), next to the in-process engine and llama.cpp of the same run (alone,
  and again while the cluster is up).

    python bench/decode.py [--threads 2] [--new-tokens 128] [--quant METHOD] [--ppl-data FILE] [--no-compile]
                           [--adapters 16] [--no-served] [--served-model pipeline|shipped|SPEC]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

# Measure the checkout this script lives in, not whichever one the venv has installed editable.
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from ops.engine import Engine, EngineConfig, Request  # noqa: E402
from ops.evaluation import DECODE_QUESTIONS, engine_decode_rate, engine_perplexity as engine_path_perplexity  # noqa: E402
from ops.model import DEFAULT_MODEL, embedded_gguf, load_model, load_tokenizer  # noqa: E402

QUESTIONS = DECODE_QUESTIONS


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="torch / llama.cpp threads")
    p.add_argument("--single-stream-threads", type=int, default=0, help="engine intra-op threads while one "
                   "request decodes (EngineConfig.single_stream_threads; 0 = same as --threads)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure the quantized engine with EngineConfig(compile=True)")
    p.add_argument("--new-tokens", type=int, default=128, help="new tokens per request (EOS ignored)")
    p.add_argument("--concurrency", default="1,4,8,16", help="comma-separated concurrent request counts")
    p.add_argument("--quant", default="weight_only_int4", help="quantized setting also measured (ops.quantization "
                   "method with its default settings; '' to skip)")
    p.add_argument("--ppl-data", default=None, help="text file for a float32 vs quantized perplexity check "
                   "(e.g. ../shared/data/wikitext2_valid.txt)")
    p.add_argument("--storage", default="./artifacts", help="artifact root holding the converted embedded model")
    p.add_argument("--adapters", type=int, default=16, help="random LoRA adapters loaded for the memory row "
                   "(4 of them serve the mixed run); 0 skips both")
    p.add_argument("--adapter-rank", type=int, default=16, help="their rank (the served default max_lora_rank)")
    p.add_argument("--served", action=argparse.BooleanOptionalAction, default=True,
                   help="also stream through the Serve endpoint with serve/config.yaml's args")
    p.add_argument("--served-model", default="pipeline", help="model the endpoint serves: 'pipeline' = the one "
                   "`make demo`'s pipeline serves (<storage>/reports/pipeline/summary.json; serve/config.yaml's "
                   "model when there is none), 'shipped' = serve/config.yaml's model, or a model spec under --storage")
    p.add_argument("--out", default="docs/benchmarks", help="folder for decode.md / decode.json")
    return p.parse_args()


def quantize(model, method: str):
    """The embedded model's int4 comes from its GGUF's Q4_1 blocks exactly (what Serve loads); other
    methods quantize the float weights."""
    from ops.quantization import int4_from_gguf
    from ops.quantization import quantize as quantize_model

    if method == "weight_only_int4":
        return int4_from_gguf(model, embedded_gguf(DEFAULT_MODEL))
    return quantize_model(model, method)


def make_adapters(model, directory: Path, n: int, rank: int) -> list[tuple[str, Path]]:
    """``n`` PEFT LoRA adapters with random A and B on every projection, saved under ``directory``."""
    import copy

    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(copy.deepcopy(model), LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                     "up_proj", "down_proj"]))
    out = []
    for i in range(n):
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, p in peft.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        path = directory / f"adapter{i:02d}"
        peft.save_pretrained(path)
        out.append((f"adapter{i:02d}", path))
    return out


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def bench_adapters(float_model, qmodel, tokenizer, prompts, config: EngineConfig, args) -> dict:
    """8 concurrent requests over 4 adapters, then every adapter resident: memory against file sizes."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_adapters(float_model, Path(tmp), args.adapters, args.adapter_rank)
        file_bytes = sum(f.stat().st_size for _, path in adapters for f in path.iterdir())
        cfg = dataclasses.replace(config, max_adapters=args.adapters, max_lora_rank=args.adapter_rank)
        with Engine(qmodel, tokenizer, cfg) as engine:
            engine.warmup()
            for name, path in adapters:
                engine.add_adapter(name, path)
            engine.generate_sync([Request(prompt=prompts[0], max_tokens=4)])  # first-call allocations
            before = rss_bytes()
            for name, _ in adapters:
                engine.generate_sync([Request(prompt=prompts[0], max_tokens=2, adapter=name)])
            growth = rss_bytes() - before
            mix = [Request(prompt=prompts[i % len(prompts)], max_tokens=args.new_tokens, ignore_eos=True,
                           adapter=adapters[i % 4][0]) for i in range(8)]
            t0 = time.perf_counter()
            outs = engine.generate_sync(mix)
            wall = time.perf_counter() - t0
            stats = engine.adapter_stats()
    out = {"adapters": args.adapters, "rank": args.adapter_rank, "file_bytes": file_bytes,
           "rss_growth_bytes": growth, "slot_bytes": stats["slot_bytes"], "slot_dtype": stats["slot_dtype"],
           "loads": stats["loads"],
           "mixed_concurrency": 8, "mixed_adapters": 4, "compile": cfg.compile,
           "mixed_tokens_per_s": sum(o.completion_tokens for o in outs) / wall}
    print(f"adapters: {out['mixed_tokens_per_s']:.1f} tok/s for 8 requests over 4 adapters; {args.adapters} "
          f"resident add {growth / 2**20:.1f} MiB for {file_bytes / 2**20:.1f} MiB of files", flush=True)
    return out


async def stream_one(client, url: str, model: str, prompt: str, new_tokens: int) -> dict:
    """One streamed chat completion: tokens (from usage), time to first token, total time."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": new_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, tokens = None, 0
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"the endpoint answered {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: "):])
            if "error" in event:
                raise RuntimeError(f"stream error: {event['error']}")
            if first is None and any(c.get("delta", {}).get("content") for c in event.get("choices") or []):
                first = time.perf_counter() - t0
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return {"tokens": tokens, "ttft_s": first, "total_s": time.perf_counter() - t0}


def served_model(args) -> str | None:
    """The model spec ``--served-model`` names, None for serve/config.yaml's own."""
    if args.served_model == "shipped":
        return None
    if args.served_model == "pipeline":
        summary = Path(args.storage) / "reports" / "pipeline" / "summary.json"
        if not summary.is_file():
            print(f"no pipeline run under {args.storage} ({summary} absent): the endpoint serves "
                  f"serve/config.yaml's model", flush=True)
            return None
        return json.loads(summary.read_text())["served"]["model"]
    return args.served_model


def bench_served_adapter(qmodel, tokenizer, config: EngineConfig, args) -> dict | None:
    """When the endpoint's model is an adapter: batch 1 in process on the same int4 base + that
    adapter unmerged, in an engine with Serve's adapter slots (the endpoint's engine without Serve)."""
    spec = served_model(args) if args.served else None
    if not spec or not spec.startswith("adapters/"):
        return None
    from served import shipped_args

    shipped = shipped_args()
    cfg = dataclasses.replace(config, compile=bool(shipped.get("compile")), max_adapters=shipped["max_adapters"],
                              max_lora_rank=shipped["max_lora_rank"])
    with Engine(qmodel, tokenizer, cfg) as engine:
        engine.add_adapter("served", Path(args.storage) / spec)
        rate = engine_decode_rate(engine, tokenizer, adapter="served", new_tokens=args.new_tokens)
    print(f"engine with {spec} unmerged: {rate['tokens_per_s']:.1f} tok/s", flush=True)
    return {"model": spec, **rate}


def bench_served(args, prompts: list[str]) -> dict:
    """Batch-1 streaming through the real endpoint with serve/config.yaml's args (no index) and the
    served model; llama.cpp again while that cluster is up (the machine in the state the endpoint
    was measured in)."""
    model = served_model(args)
    return _served_run(args, {"model": model} if model else {}, prompts)


def _served_run(args, overrides: dict, llama_prompts: list[str] | None) -> dict:
    import httpx

    from served import served_app, shipped_args

    async def run(url: str) -> list[dict]:
        async with httpx.AsyncClient(timeout=600) as client:
            model = (await client.get(f"{url}/v1/models")).json()["data"][0]["id"]
            await stream_one(client, url, model, QUESTIONS[0], 8)  # first-call allocations
            return [await stream_one(client, url, model, q, args.new_tokens) for q in QUESTIONS]

    t0 = time.perf_counter()
    llama_up = (None, "")
    with served_app(Path(args.storage).resolve(), index=None, **overrides) as (url, _):
        ready_s = time.perf_counter() - t0
        runs = asyncio.run(run(url))
        if llama_prompts is not None:  # the machine in the state the endpoint was measured in
            llama_up = bench_llama_cpp(llama_prompts, args.new_tokens, args.threads)
    tokens = sum(r["tokens"] for r in runs)
    keys = ("model", "quantization", "compile", "num_threads", "max_batch_size", "max_adapters")
    out = {"config": {k: v for k, v in {**shipped_args(), **overrides}.items() if k in keys},
           "overrides": {"index": None, **overrides}, "ready_s": ready_s,
           "tokens_per_s": tokens / sum(r["total_s"] for r in runs),
           "decode_tokens_per_s": (tokens - len(runs)) / sum(r["total_s"] - r["ttft_s"] for r in runs),
           "mean_completion_tokens": tokens / len(runs), "mean_ttft_s": statistics.mean(r["ttft_s"] for r in runs),
           "llama_cpp_cluster_up_tokens_per_s": llama_up[0]}
    print(f"served ({overrides or 'serve/config.yaml'}): {out['tokens_per_s']:.1f} tok/s end to end, "
          f"{out['mean_completion_tokens']:.0f} tokens per answer; llama.cpp with the cluster up: {llama_up}", flush=True)
    return out


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


def bench_llama_cpp(prompts: list[str], new_tokens: int, threads: int) -> tuple[float | None, str]:
    """End-to-end new tokens/s of llama.cpp on the GGUF at batch 1, in a child process.

    The child keeps llama.cpp's own thread pool out of the engine's process, and a crash of a
    llama.cpp build (a native extension) costs this row, not the run. (A native build on a CPU
    with AMX that the VM does not enable dies with SIGSEGV in libggml-cpu; build it with
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON
    -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON" pip install llama-cpp-python.)

    Returns:
        (tokens/s, build features) or (None, why there is no figure).
    """
    if importlib.util.find_spec("llama_cpp") is None:
        return None, "llama.cpp not installed (pip install .[bench])"
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import decode; "
            "print(json.dumps(decode.llama_cpp_rate(json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))))")
    proc = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), json.dumps(prompts),
                           str(new_tokens), str(threads)], capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or [""])[-1][:200]
        return None, f"llama.cpp failed (exit {proc.returncode}) {tail}".strip()
    rate, features = json.loads(proc.stdout.strip().splitlines()[-1])
    return rate, features


def llama_cpp_rate(prompts: list[str], new_tokens: int, threads: int) -> tuple[float, str]:
    """(new tokens/s of llama.cpp, greedy, EOS ignored, over `prompts`; its build features), this process."""
    from llama_cpp import Llama, llama_print_system_info

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
    features = [f.split("=")[0].strip() for f in llama_print_system_info().decode().split("|") if f.strip().endswith("= 1")]
    return total / elapsed, " ".join(f.removeprefix("CPU : ") for f in features)


def bench_engine_batch1(engine: Engine, new_tokens: int) -> tuple[float, float]:
    """Returns (end-to-end new tokens/s, decode-only tokens/s) of the engine at batch 1."""
    rate = engine_decode_rate(engine, engine.tokenizer, new_tokens=new_tokens, questions=QUESTIONS)
    return rate["tokens_per_s"], rate["decode_tokens_per_s"]


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


def engine_perplexity(engine: Engine, tokenizer, path: str, rows: int = 2, length: int = 512) -> float:
    """Teacher-forced perplexity through the engine's own prefill + decode steps (compiled or not):
    `rows` pieces of `length` tokens of `path` side by side, one token per row per decode step."""
    ids = tokenizer(Path(path).read_text()[: rows * length * 8], add_special_tokens=False)["input_ids"]
    return engine_path_perplexity(engine, torch.tensor(ids[: rows * length]), rows=rows)["perplexity"]


def run_engine(model, tokenizer, prompts, config: EngineConfig, args, levels: list[int] | None,
               label: str) -> dict:
    """Batch-1 rate, optional concurrency sweep and engine-path perplexity of one engine setting."""
    out: dict = {"label": label, "compile": config.compile}
    with Engine(model, tokenizer, config) as engine:
        t0 = time.perf_counter()
        engine.warmup()
        out["warmup_s"] = time.perf_counter() - t0
        if config.compile and not engine.compiled:
            raise SystemExit(f"compiling the decode step failed: {engine.warmup_error}")
        engine.generate_sync([Request(prompt=prompts[0], max_tokens=4)])  # first-call allocations
        out["batch1"], out["batch1_decode_only"] = bench_engine_batch1(engine, args.new_tokens)
        print(f"engine {label}: {out['batch1']:.1f} tok/s (decode only {out['batch1_decode_only']:.1f}), "
              f"warm-up {out['warmup_s']:.1f} s", flush=True)
        out["concurrent"] = []
        for n in levels or []:
            out["concurrent"].append(asyncio.run(bench_concurrent(engine, prompts, n, args.new_tokens)))
            print(label, out["concurrent"][-1], flush=True)
        out["engine_perplexity"] = None
        if args.ppl_data:
            out["engine_perplexity"] = engine_perplexity(engine, tokenizer, args.ppl_data)
            print(f"engine {label} perplexity (decode path): {out['engine_perplexity']:.4f}", flush=True)
        out["backend"] = engine.backend
    return out


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
    engines = [run_engine(model, tokenizer, prompts, config, args, None, "fp32")]
    lcpp, lcpp_info = bench_llama_cpp(prompts, args.new_tokens, args.threads)
    print(f"llama.cpp: {lcpp if lcpp is None else round(lcpp, 1)} tok/s ({lcpp_info})", flush=True)
    ppl = {"data": args.ppl_data, "float32": None, "quantized": None}
    if args.ppl_data:
        ppl["float32"] = perplexity_of(model, tokenizer, args.ppl_data)
    float_model = model
    if args.quant:
        model = quantize(model, args.quant)
        if args.ppl_data:
            ppl["quantized"] = perplexity_of(model, tokenizer, args.ppl_data)
    # The concurrency sweeps run on the quantized model when one is given: the setting to serve.
    name = args.quant or "fp32"
    engines.append(run_engine(model, tokenizer, prompts, config, args, levels, name))
    if args.compile:
        compiled = dataclasses.replace(config, compile=True)
        engines.append(run_engine(model, tokenizer, prompts, compiled, args, levels, f"{name}, compiled"))
    adapters = None
    if args.adapters:
        from served import shipped_args

        served_compile = dataclasses.replace(config, compile=bool(shipped_args().get("compile")))
        adapters = bench_adapters(float_model, model, tokenizer, prompts, served_compile, args)
    served_adapter = bench_served_adapter(model, tokenizer, config, args)
    served = bench_served(args, prompts) if args.served else None

    result = {
        "model": "SmolLM2-135M-Instruct (embedded GGUF, de-quantized to float32)",
        "quant": args.quant,
        "engine_backend": engines[0]["backend"],
        "threads": args.threads,
        "single_stream_threads": args.single_stream_threads or args.threads,
        "new_tokens": args.new_tokens,
        "prompts": len(prompts),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "load_average_at_start": load_at_start,
        "perplexity": ppl,
        "transformers_generate_tokens_per_s": hf,
        "llama_cpp_tokens_per_s": lcpp,
        "llama_cpp_info": lcpp_info,
        "engines": engines,
        "adapters": adapters,
        "served": served,
        "served_adapter_in_process": served_adapter,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "decode.md").write_text(render_markdown(result))
    print(render_markdown(result))


def render_markdown(r: dict) -> str:
    lcpp = r["llama_cpp_tokens_per_s"]
    ratio = lambda x: "-" if lcpp is None else f"{x / lcpp:.2f}x"  # noqa: E731
    q = r["quant"]
    lines = [
        "# Decode benchmark",
        "",
        f"Generated by `bench/decode.py`: {r['model']}, quantized setting `{q}`, {r['threads']} threads "
        f"({r['single_stream_threads']} while the engine decodes a single request), "
        f"{r['new_tokens']} new tokens per request (EOS ignored), {r['prompts']} chat prompts, "
        f"engine backend `{r['engine_backend']}`, torch {r['torch']}, "
        f"1-min load average at start {r['load_average_at_start']:.1f} on {os.cpu_count()} CPUs. "
        "All rows come from this one run. \"compiled\" = `EngineConfig(compile=True)`: each decoder layer of "
        "the decode step through one `torch.compile`d layer graph (Inductor, C++ wrapper; regional compilation); "
        "its warm-up is the time to build the two graphs (one request / several).",
        "",
        "## Batch 1 (end-to-end new tokens/s, prefill included)",
        "",
        "| generator | tokens/s | vs llama.cpp | engine warm-up s |",
        "|---|---|---|---|",
    ]
    for e in r["engines"]:
        lines += [
            f"| ops.engine ({e['label']}) | {e['batch1']:.1f} | {ratio(e['batch1'])} | {e['warmup_s']:.1f} |",
            f"| ops.engine ({e['label']}), decode steps only | {e['batch1_decode_only']:.1f} | "
            f"{ratio(e['batch1_decode_only'])} | |",
        ]
    lines += _served_and_baseline_rows(r, ratio) + _perplexity_lines(r) + _adapter_lines(r, ratio)
    lines += _concurrency_lines(r, ratio)
    return "\n".join(lines)


def _served_and_baseline_rows(r: dict, ratio) -> list[str]:
    """Batch-1 rows of the endpoint, transformers and llama.cpp."""
    lcpp = r["llama_cpp_tokens_per_s"]
    lcpp_cell = r["llama_cpp_info"] if lcpp is None else f"{lcpp:.1f}"
    lines: list[str] = []
    hf = r["transformers_generate_tokens_per_s"]
    served = r.get("served")
    in_process = r.get("served_adapter_in_process")
    if in_process:
        lines += [f"| ops.engine ({r['quant']} + `{in_process['model']}` unmerged, Serve's adapter slots: the "
                  f"endpoint's model in process) | {in_process['tokens_per_s']:.1f} | "
                  f"{ratio(in_process['tokens_per_s'])} | |"]
    if served:
        cfg = ", ".join(f"{k}={v}" for k, v in served["config"].items())
        lines += [f"| **Serve endpoint, serve/config.yaml** ({cfg}; streamed, EOS honoured: "
                  f"{served['mean_completion_tokens']:.0f} tokens per answer) | {served['tokens_per_s']:.1f} | "
                  f"{ratio(served['tokens_per_s'])} | {served['ready_s']:.1f} (app ready) |",
                  f"| Serve endpoint, after the first token | {served['decode_tokens_per_s']:.1f} | "
                  f"{ratio(served['decode_tokens_per_s'])} | |"]
        up = served.get("llama_cpp_cluster_up_tokens_per_s")
        if up:
            lines += [f"| llama.cpp with the cluster up (run right after the endpoint rows; the endpoint vs it: "
                      f"{served['tokens_per_s'] / up:.2f}x) | {up:.1f} | {ratio(up)} | |"]
    lines += [
        f"| transformers.generate (fp32) | {hf:.1f} | {ratio(hf)} | |",
        f"| llama.cpp (GGUF Q4_1{'; built with ' + r['llama_cpp_info'] if lcpp else ''}) | {lcpp_cell} | "
        f"{'1.00x' if lcpp else '-'} | |",
        "",
    ]
    return lines


def _perplexity_lines(r: dict) -> list[str]:
    q, ppl, lines = r["quant"], r["perplexity"], []
    if ppl["float32"] is not None:
        rel = f"{ppl['quantized'] / ppl['float32']:.4f}x" if ppl["quantized"] is not None else "-"
        quant_cell = f"{ppl['quantized']:.4f}" if ppl["quantized"] is not None else "-"
        lines += [
            f"Perplexity on the first 2048 tokens of `{ppl['data']}` (HF forward, window 1024, stride 512): "
            f"float32 {ppl['float32']:.4f}, {q or 'no quantization'} {quant_cell} ({rel}).",
            "",
        ]
        through = [e for e in r["engines"] if e.get("engine_perplexity") is not None]
        if through:
            lines += [
                "Through the engine's own prefill + decode steps (teacher-forced, 2 rows of 512 tokens of "
                "the same file): " + ", ".join(f"{e['label']} {e['engine_perplexity']:.4f}" for e in through)
                + ".",
                "",
            ]
    return lines


def _adapter_lines(r: dict, ratio) -> list[str]:
    q, lines = r["quant"], []
    a = r.get("adapters")
    if a:
        lines += [
            f"## LoRA adapters, unmerged on the {q or 'float32'} base (compile={a['compile']})", "",
            "| measure | value |", "|---|---|",
            f"| {a['mixed_concurrency']} concurrent requests over {a['mixed_adapters']} adapters (r={a['rank']}), "
            f"aggregate tokens/s | {a['mixed_tokens_per_s']:.1f} ({ratio(a['mixed_tokens_per_s'])} of llama.cpp "
            f"batch 1) |",
            f"| their files (adapter_model.safetensors + config), {a['adapters']} adapters | "
            f"{a['file_bytes'] / 2**20:.1f} MiB |",
            f"| memory of their {a['adapters']} slots ({a.get('slot_dtype', 'float32')}, rank {a['rank']}, "
            f"allocated and zeroed when the "
            f"engine starts) | {a['adapters'] * a['slot_bytes'] / 2**20:.1f} MiB "
            f"({a['adapters'] * a['slot_bytes'] / a['file_bytes']:.2f}x the files) |",
            f"| resident memory added by then loading all {a['adapters']} into their slots | "
            f"{a['rss_growth_bytes'] / 2**20:.1f} MiB |",
            "",
        ]
    return lines


def _concurrency_lines(r: dict, ratio) -> list[str]:
    lines: list[str] = []
    for e in r["engines"]:
        if not e["concurrent"]:
            continue
        lines += [
            f"## Concurrent requests (ops.engine, {e['label']}, continuous batching)",
            "",
            "| concurrent | aggregate tokens/s | vs llama.cpp batch 1 | p50 latency s | p99 latency s | mean TTFT s |",
            "|---|---|---|---|---|---|",
        ]
        for c in e["concurrent"]:
            lines.append(
                f"| {c['concurrency']} | {c['aggregate_tokens_per_s']:.1f} | {ratio(c['aggregate_tokens_per_s'])} | "
                f"{c['p50_latency_s']:.2f} | {c['p99_latency_s']:.2f} | {c['mean_ttft_s']:.2f} |"
            )
        lines.append("")
    return lines

if __name__ == "__main__":
    main()
