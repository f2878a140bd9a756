"""RAG latency through the real endpoint: time to first token, /v1/rag end to end, streams under long prompts.

    python bench/rag_latency.py [--model smollm2-135m-instruct] [--requests 20] [--prefix-cache-mb 0 256]

One run, the app of serve/config.yaml (its `args`, except `storage`, the index and `prefix_cache_mb`,
which this script sets) on a loopback Ray cluster (token auth), once per `--prefix-cache-mb` value:
- TTFT of `/v1/chat/completions` (stream) at --ttft-tokens prompt tokens (distinct filler text per
  request, so the prefix cache can only reuse the chat template's system prefix), next to
  llama.cpp on the same GGUF (llama-cpp-python, 2 threads, in a child process) measured alone
  (before Ray starts) and with the cluster up, and next to the machine's limit: prefill GFLOP
  (Linear layers + causal attention) / the best float32 and bfloat16 matmul GFLOP/s measured here;
- `/v1/rag` end to end, p50/p99, top_k=4 passages from an index of the SQuAD Notre Dame
  paragraphs, --rag-tokens answer tokens, one request at a time;
- inter-token latency p50/p99 of 4 running streams alone, and while --long-tokens prompts arrive.
Writes docs/benchmarks/rag_latency.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import platform
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

OUT = REPO / "docs" / "benchmarks"
INDEX = "rag-latency-bench"
STREAM_PROMPTS = ["Write a long story about a lighthouse keeper and a storm.",
                  "Explain in detail how a steam engine works.",
                  "Describe the history of the printing press at length.",
                  "Write a long letter from a sailor to his family."]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=REPO / "serve" / "config.yaml", help="Serve config whose args run")
    p.add_argument("--model", default=None, help="override the config's model (e.g. a quantized artifact dir)")
    p.add_argument("--storage", default="./artifacts", help="artifact root (models, the bench index)")
    p.add_argument("--squad", type=Path, default=REPO.parent / "shared" / "data" / "squad_notre_dame.json")
    p.add_argument("--ttft-tokens", type=int, nargs="+", default=[256, 1024, 1800])
    p.add_argument("--requests", type=int, default=10, help="requests per TTFT length and for /v1/rag")
    p.add_argument("--rag-tokens", type=int, default=32, help="answer tokens of the /v1/rag requests")
    p.add_argument("--long-tokens", type=int, default=2000, help="prompt tokens arriving during the stream test")
    p.add_argument("--long-prompts", type=int, default=2, help="long prompts sent, one after the other")
    p.add_argument("--stream-tokens", type=int, default=96, help="max_tokens of each of the 4 running streams")
    p.add_argument("--prefix-cache-mb", type=float, nargs="+", default=[0, 256], help="one deployment per value")
    p.add_argument("--threads", type=int, default=2, help="llama.cpp threads and the matmul peak's torch threads")
    p.add_argument("--out", type=Path, default=OUT)
    return p.parse_args()


def pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def prefill_gflop(cfg, tokens: int) -> float:
    """Linear layers (2 * params per token) + causal attention (QK^T and AV over the lower triangle) + head once."""
    hs = cfg.hidden_size // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * hs, cfg.num_key_value_heads * hs
    per_layer = cfg.hidden_size * (q + 2 * kv) + q * cfg.hidden_size + 3 * cfg.hidden_size * cfg.intermediate_size
    linear = 2 * per_layer * cfg.num_hidden_layers * tokens
    attention = 2 * tokens * tokens * q * cfg.num_hidden_layers  # 2 matmuls x 2 flop x T^2 / 2 (causal)
    head = 2 * cfg.hidden_size * cfg.vocab_size
    return (linear + attention + head) / 1e9


def matmul_peak(threads: int) -> dict[str, float]:
    """Best GFLOP/s of a (1024 x 576) @ (576 x 1536) matmul (a prefill's MLP shape), float32 and bfloat16."""
    import torch

    torch.set_num_threads(threads)
    out = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        a, b = torch.randn(1024, 576, dtype=dtype), torch.randn(576, 1536, dtype=dtype)
        best = float("inf")
        for _ in range(30):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
        out[name] = 2 * 1024 * 576 * 1536 / best / 1e9
    return out


def llama_cpp_ttft(prompts: dict[int, list[str]], threads: int) -> dict:
    """Median TTFT per prompt length of llama.cpp on the embedded GGUF, in a child process (see bench/decode.py)."""
    if importlib.util.find_spec("llama_cpp") is None:
        return {"error": "llama.cpp not installed (pip install .[bench])"}
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import rag_latency; "
            "print(json.dumps(rag_latency.llama_cpp_child(json.loads(sys.argv[2]), int(sys.argv[3]))))")
    proc = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), json.dumps(prompts), str(threads)],
                          capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or [""])[-1][:200]
        return {"error": f"llama.cpp failed (exit {proc.returncode}) {tail}".strip()}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def llama_cpp_child(prompts: dict[str, list[str]], threads: int) -> dict:
    """In the child: for each length, the median seconds from a fresh context to the first generated token."""
    from llama_cpp import Llama

    from ops.model import DEFAULT_MODEL, embedded_gguf

    llm = Llama(model_path=str(embedded_gguf(DEFAULT_MODEL)), n_ctx=4096, n_threads=threads,
                n_threads_batch=threads, verbose=False)
    llm.reset()
    next(iter(llm.generate(llm.tokenize(b"Hello", add_bos=False), top_k=1, temp=0.0)))  # warm-up: first call's setup
    out = {}
    for length, texts in prompts.items():
        times = []
        for text in texts:
            tokens = llm.tokenize(text.encode(), add_bos=False, special=True)
            llm.reset()
            t0 = time.perf_counter()
            next(iter(llm.generate(tokens, top_k=1, temp=0.0)))
            times.append(time.perf_counter() - t0)
        out[length] = {"p50_s": float(np.median(times)), "prompt_tokens": len(tokens)}
    return out


def chat_prompts(tokenizer, lengths: list[int], per_length: int, seed: int = 0) -> dict[int, list[str]]:
    """Chat-templated texts of exactly `length` tokens: a user turn of distinct filler words, cut to size."""
    rng = random.Random(seed)
    words = [w for w in tokenizer.get_vocab() if w.isalpha() and w.isascii() and 3 <= len(w) <= 8]
    out = {}
    for length in lengths:
        texts = []
        for _ in range(per_length):
            filler = " ".join(rng.choice(words) for _ in range(length))
            messages = [{"role": "user", "content": filler}]
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            excess = len(tokenizer(text, add_special_tokens=False)["input_ids"]) - length  # as Engine.encode counts
            filler_ids = tokenizer(filler, add_special_tokens=False)["input_ids"][: -excess or None]
            messages[0]["content"] = tokenizer.decode(filler_ids)
            texts.append(messages[0]["content"])
        out[length] = texts
    return out


async def stream_chat(client, content: str, max_tokens: int) -> tuple[float, list[float], int]:
    """(seconds to the first content chunk, arrival times of every content chunk, prompt tokens)."""
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    arrivals, prompt_tokens = [], 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"chat stream: {r.status_code} {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                prompt_tokens = chunk["usage"]["prompt_tokens"]
            if any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                arrivals.append(time.perf_counter())
    return (arrivals[0] - t0 if arrivals else float("nan")), arrivals, prompt_tokens


async def measure_ttft(client, prompts: dict[int, list[str]]) -> list[dict]:
    rows = []
    for length, texts in prompts.items():
        await stream_chat(client, texts[0][: len(texts[0]) // 4], 1)  # warm-up at this shape's neighbourhood
        ttfts, tokens = [], 0
        for text in texts:
            ttft, _, tokens = await stream_chat(client, text, 1)
            ttfts.append(ttft)
        rows.append({"prompt_tokens": tokens, "target_tokens": length, "requests": len(texts),
                     "ttft_p50_s": pct(ttfts, 50), "ttft_p99_s": pct(ttfts, 99)})
        print(f"[bench.rag_latency] TTFT {rows[-1]}", flush=True)
    return rows


async def measure_rag(client, questions: list[str], n: int, max_tokens: int) -> dict:
    latencies, ttfts, prompt_tokens = [], [], []
    for question in questions[:n]:
        t0 = time.perf_counter()
        r = await client.post("/v1/rag", json={"question": question, "top_k": 4, "max_tokens": max_tokens,
                                               "temperature": 0})
        if r.status_code != 200:
            raise RuntimeError(f"/v1/rag: {r.status_code} {r.text[:200]}")
        latencies.append(time.perf_counter() - t0)
        body = r.json()
        ttfts.append(body["timings"]["time_to_first_token_s"])
        prompt_tokens.append(body["usage"]["prompt_tokens"])
    row = {"requests": n, "top_k": 4, "max_tokens": max_tokens, "p50_s": pct(latencies, 50),
           "p99_s": pct(latencies, 99), "engine_ttft_p50_s": pct(ttfts, 50),
           "prompt_tokens_p50": pct(prompt_tokens, 50)}
    print(f"[bench.rag_latency] /v1/rag {row}", flush=True)
    return row


async def measure_streams(client, long_texts: list[str], max_tokens: int) -> dict:
    """ITL of 4 concurrent streams, alone and while the long prompts arrive one after the other."""
    async def streams(with_long: bool) -> tuple[list[float], list[float]]:
        tasks = [asyncio.create_task(stream_chat(client, p, max_tokens)) for p in STREAM_PROMPTS]
        long_ttfts = []
        if with_long:
            await asyncio.sleep(1.0)  # the streams are decoding
            for text in long_texts:
                long_ttfts.append((await stream_chat(client, text, 1))[0])
        gaps = []
        for _, arrivals, _ in await asyncio.gather(*tasks):
            gaps += list(np.diff(arrivals))
        return gaps, long_ttfts

    alone, _ = await streams(False)
    loaded, long_ttfts = await streams(True)
    row = {"streams": len(STREAM_PROMPTS), "itl_alone_p50_s": pct(alone, 50), "itl_alone_p99_s": pct(alone, 99),
           "itl_loaded_p50_s": pct(loaded, 50), "itl_loaded_p99_s": pct(loaded, 99),
           "long_prompts": len(long_texts), "long_ttft_p50_s": pct(long_ttfts, 50)}
    row["p99_loaded_over_p50_alone"] = (row["itl_loaded_p99_s"] / row["itl_alone_p50_s"]
                                        if alone and loaded else None)
    print(f"[bench.rag_latency] streams {row}", flush=True)
    return row


def app_args(args: argparse.Namespace, prefix_cache_mb: float) -> dict:
    import yaml

    config = yaml.safe_load(args.config.read_text())
    app_args = dict(config["applications"][0]["args"])
    app_args.update(storage=args.storage, index=INDEX, prefix_cache_mb=prefix_cache_mb)
    if args.model:
        app_args["model"] = args.model
    return app_args


def run_deployment(args, app: dict, prompts, questions, long_texts, llama_prompts) -> dict:
    """Deploys the app once on a fresh loopback cluster, measures everything, shuts it down."""
    import httpx
    import ray
    from ray import serve

    from cluster.runtime import init_ray
    from serve.app import build_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    init_ray(num_cpus=os.cpu_count())
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(app), name="rag", route_prefix="/")

        async def measure() -> dict:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=600) as client:
                await stream_chat(client, "Hello", 4)  # first request pays lazy initialisation
                return {"ttft": await measure_ttft(client, prompts),
                        "rag": await measure_rag(client, questions, args.requests, args.rag_tokens),
                        "streams": await measure_streams(client, long_texts, args.stream_tokens)}

        result = asyncio.run(measure())
        # llama.cpp with the machine in the endpoint's state: cluster and app up, idle
        result["llama_cpp_cluster_up"] = llama_cpp_ttft(llama_prompts, args.threads) if llama_prompts else None
        return result
    finally:
        serve.shutdown()
        ray.shutdown()


def build_index(storage: Path, squad: Path) -> list[str]:
    """Indexes the SQuAD paragraphs (once) under `<storage>/indexes/<INDEX>`; returns the questions, shuffled."""
    from jobs.data import read_squad
    from ops.retrieval import DEFAULT_EMBEDDER, RetrievalStore, chunk_documents, embed, load_embedder

    docs, questions = read_squad(squad)
    target = storage / "indexes" / INDEX
    if not (target / "manifest.json").is_file():
        chunks = chunk_documents(docs, 1000, 100)
        store = RetrievalStore.build(chunks, embed(load_embedder(), [c["text"] for c in chunks]),
                                     embedder_name=DEFAULT_EMBEDDER)
        store.save(target)
    texts = [q["question"] for q in questions]
    random.Random(0).shuffle(texts)
    return texts


def write(out: Path, report: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "rag_latency.json").write_text(json.dumps(report, indent=2))
    peak = report["matmul_gflops"]
    lines = ["# RAG latency through the endpoint", "",
             f"Generated by `{report['command']}` on {report['date']} ({report['machine']}, {report['cpus']} CPUs, "
             f"load average {report['load_at_start']:.2f} at start). App: `{report['config']}` args "
             f"(model `{report['model']}`), index of the SQuAD Notre Dame paragraphs, loopback Ray + Serve.", "",
             f"Machine limit: prefill GFLOP / best matmul GFLOP/s measured here (float32 {peak['float32']:.0f}, "
             f"bfloat16 {peak['bfloat16']:.0f}). llama.cpp: same GGUF, {report['threads']} threads, alone (before "
             "Ray starts) and with the cluster and app up (first deployment).", "",
             "## Time to first token, `/v1/chat/completions` (stream), p50 seconds", "",
             "| prompt tokens | " + " | ".join(f"prefix cache {d['prefix_cache_mb']:g} MiB" for d in report["runs"])
             + " | llama.cpp alone | llama.cpp cluster up | limit fp32 | limit bf16 | GFLOP |",
             "|---" * (6 + len(report["runs"])) + "|"]
    for i, length in enumerate(report["ttft_tokens"]):
        cells = [f"{d['ttft'][i]['ttft_p50_s']:.3f}" for d in report["runs"]]
        lc = [report["llama_cpp_alone"], report["runs"][0]["llama_cpp_cluster_up"] or {}]
        cells += [f"{x[str(length)]['p50_s']:.3f}" if str(length) in x else x.get("error", "-") for x in lc]
        gflop = report["gflop"][str(length)]
        cells += [f"{gflop / peak['float32']:.3f}", f"{gflop / peak['bfloat16']:.3f}", f"{gflop:.0f}"]
        lines.append(f"| {report['runs'][0]['ttft'][i]['prompt_tokens']} | " + " | ".join(cells) + " |")
    lines += ["", f"## `/v1/rag`, top_k 4, {report['rag_tokens']} answer tokens, one request at a time", "",
              "| prefix cache MiB | requests | prompt tokens p50 | p50 s | p99 s | engine TTFT p50 s |",
              "|---|---|---|---|---|---|"]
    for d in report["runs"]:
        r = d["rag"]
        lines.append(f"| {d['prefix_cache_mb']:g} | {r['requests']} | {r['prompt_tokens_p50']:.0f} | {r['p50_s']:.3f} | "
                     f"{r['p99_s']:.3f} | {r['engine_ttft_p50_s']:.3f} |")
    lines += ["", f"## Inter-token latency of 4 running streams, alone and while {report['long_tokens']}-token prompts "
              "arrive", "", "| prefix cache MiB | p50 alone s | p99 alone s | p50 loaded s | p99 loaded s | "
              "p99 loaded / p50 alone | long prompt TTFT p50 s |", "|---|---|---|---|---|---|---|"]
    for d in report["runs"]:
        s = d["streams"]
        lines.append(f"| {d['prefix_cache_mb']:g} | {s['itl_alone_p50_s']:.3f} | {s['itl_alone_p99_s']:.3f} | "
                     f"{s['itl_loaded_p50_s']:.3f} | {s['itl_loaded_p99_s']:.3f} | {s['p99_loaded_over_p50_alone']:.2f} | "
                     f"{s['long_ttft_p50_s']:.3f} |")
    (out / "rag_latency.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    args = parse_args()
    load_at_start = os.getloadavg()[0]
    from ops.model import load_tokenizer

    storage = Path(args.storage)
    apps = [app_args(args, mb) for mb in args.prefix_cache_mb]
    tokenizer = load_tokenizer(apps[0]["model"], storage=storage)
    questions = build_index(storage, args.squad)
    prompts = chat_prompts(tokenizer, args.ttft_tokens, args.requests)
    long_texts = chat_prompts(tokenizer, [args.long_tokens], args.long_prompts, seed=1)[args.long_tokens]
    templated = {str(n): [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                                        tokenize=False) for t in texts[:3]]
                 for n, texts in prompts.items()}
    from transformers import AutoConfig

    from ops.model import base_spec_of, resolve

    source = resolve(apps[0]["model"], storage)
    if source.kind == "adapter":
        source = resolve(base_spec_of(source.path), storage)
    cfg = AutoConfig.from_pretrained(source.path)  # the model's shapes, for the prefill GFLOP
    peak = matmul_peak(args.threads)
    llama_alone = llama_cpp_ttft(templated, args.threads)
    print(f"[bench.rag_latency] matmul {peak}; llama.cpp alone {llama_alone}", flush=True)
    runs = []
    for i, app in enumerate(apps):
        result = run_deployment(args, app, prompts, questions, long_texts, templated if i == 0 else None)
        runs.append({"prefix_cache_mb": app["prefix_cache_mb"], **result})
    report = {"command": "python bench/rag_latency.py " + " ".join(sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.machine(),
              "cpus": os.cpu_count(), "load_at_start": load_at_start, "config": str(args.config.relative_to(REPO)),
              "model": apps[0]["model"], "threads": args.threads, "ttft_tokens": args.ttft_tokens,
              "rag_tokens": args.rag_tokens, "long_tokens": args.long_tokens, "matmul_gflops": peak,
              "gflop": {str(n): prefill_gflop(cfg, n) for n in args.ttft_tokens},
              "llama_cpp_alone": llama_alone, "runs": runs}
    write(args.out, report)
    print(f"[bench.rag_latency] wrote {args.out / 'rag_latency.md'}", flush=True)


if __name__ == "__main__":
    main()
