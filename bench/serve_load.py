"""Load benchmark of the RAG endpoint: Ray Serve over loopback vs the same work in-process.

    python bench/serve_load.py [--requests 200] [--concurrency 1 4 8] [--max-tokens 16] [--model tiny]

Both sides run the same retrieval (embedded all-MiniLM-L6-v2 + flat FAISS over the SQuAD Notre
Dame paragraphs, top_k=2) and the same generation (the project's engine, greedy, `max_tokens`):
* serve: `POST /v1/rag` from an httpx client on 127.0.0.1 to the app of `serve.app.build_app`
  (1 replica each: Ingress, Retriever, Generator);
* in-process: `RetrievalStore.search_text` + `Engine.generate` called from asyncio in this process.
The difference is what Serve adds (HTTP, proxy, handle calls, batching waits).
Generator: `--model tiny` (default) is a 2-layer random Llama (64-d) so the measurement is not
dominated by decoding; any model spec works (e.g. smollm2-135m-instruct), with fewer requests.
Writes docs/benchmarks/serve_load.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from ops.datasets import read_squad  # noqa: E402
from ops.retrieval import DEFAULT_EMBEDDER, RetrievalStore, chunk_documents, embed, load_embedder  # noqa: E402

OUT = REPO / "docs" / "benchmarks"
TOP_K = 2


def prepare(storage: Path, squad: Path, model: str) -> tuple[str, list[str]]:
    """Index the SQuAD paragraphs into ``storage``; return the model spec and the questions."""
    docs, questions = read_squad(squad)
    chunks = chunk_documents(docs, 1000, 100)
    store = RetrievalStore.build(chunks, embed(load_embedder(), [c["text"] for c in chunks]),
                                 embedder_name=DEFAULT_EMBEDDER)
    store.save(storage / "indexes" / "bench")
    if model == "tiny":
        from tests.conftest import build_tiny_llama

        model_dir = storage / "tiny-llama"
        model_dir.mkdir()
        build_tiny_llama(model_dir)
        model = str(model_dir)
    return model, [q["question"] for q in questions]


def summarize(latencies: list[float], errors: int, wall_s: float) -> dict:
    lat = np.array(latencies) if latencies else np.array([float("nan")])
    return {"requests": len(latencies) + errors, "errors": errors, "wall_s": wall_s,
            "throughput_rps": len(latencies) / wall_s, "p50_ms": 1e3 * float(np.percentile(lat, 50)),
            "p99_ms": 1e3 * float(np.percentile(lat, 99))}


async def drive(call, questions: list[str], n: int, concurrency: int) -> dict:
    """Run ``n`` calls with at most ``concurrency`` in flight; ``call`` returns True on success."""
    sem = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    errors = 0

    async def one(i: int) -> None:
        nonlocal errors
        async with sem:
            t = time.perf_counter()
            ok = await call(questions[i % len(questions)])
            if ok:
                latencies.append(time.perf_counter() - t)
            else:
                errors += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    return summarize(latencies, errors, time.perf_counter() - t0)


def bench_in_process(storage: Path, model: str, questions: list[str], args) -> list[dict]:
    from ops.engine import Engine, EngineConfig, Request
    from ops.model import load_model, load_tokenizer
    from serve.app import DEFAULT_SYSTEM_PROMPT, rag_messages

    store = RetrievalStore.load(storage / "indexes" / "bench")
    tokenizer = load_tokenizer(model, storage=storage)
    engine = Engine(load_model(model, storage=storage), tokenizer,
                    EngineConfig(max_batch_size=8, max_queue=256, max_seq_len=args.max_seq_len, num_threads=1))
    budget = engine.config.max_seq_len - args.max_tokens
    count = lambda m: len(engine.encode(Request(messages=m, max_tokens=1)))  # noqa: E731

    async def call(question: str) -> bool:
        hits = (await asyncio.to_thread(store.search_text, [question], TOP_K))[0]
        messages = rag_messages(question, [h.to_dict() for h in hits], DEFAULT_SYSTEM_PROMPT, count, budget)
        await engine.generate(Request(messages=messages, max_tokens=args.max_tokens))
        return True

    rows = []
    try:
        for c in args.concurrency:
            rows.append({"mode": "in-process", "concurrency": c,
                         **asyncio.run(drive(call, questions, args.requests, c))})
            print(f"[bench.serve_load] {rows[-1]}", flush=True)
    finally:
        engine.close()
    return rows


def bench_serve(storage: Path, model: str, questions: list[str], args) -> list[dict]:
    import httpx
    import ray
    from ray import serve

    from cluster.runtime import init_ray
    from serve.app import build_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    rows = []
    init_ray(num_cpus=2)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"storage": str(storage), "model": model, "index": "bench", "max_seq_len": args.max_seq_len,
                             "num_threads": 1, "max_queue": 256, "request_timeout_s": 120}),
                  name="rag", route_prefix="/")
        first_errors: list[str] = []

        async def run(c: int) -> dict:
            limits = httpx.Limits(max_connections=c, max_keepalive_connections=c)
            async with httpx.AsyncClient(base_url=url, timeout=180, limits=limits) as client:
                async def call(question: str) -> bool:
                    try:
                        r = await client.post("/v1/rag", json={"question": question, "top_k": TOP_K,
                                                               "max_tokens": args.max_tokens, "temperature": 0})
                    except httpx.HTTPError as exc:
                        first_errors.append(repr(exc))
                        return False
                    if r.status_code != 200:
                        first_errors.append(f"{r.status_code} {r.text[:200]}")
                    return r.status_code == 200

                await call(questions[0])  # warm-up: first request pays lazy initialisation
                return await drive(call, questions, args.requests, c)

        for c in args.concurrency:
            rows.append({"mode": "serve", "concurrency": c, **asyncio.run(run(c))})
            print(f"[bench.serve_load] {rows[-1]}", flush=True)
        if first_errors:
            print(f"[bench.serve_load] first errors: {first_errors[:3]}", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    return rows


def write(report: dict) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "serve_load.json").write_text(json.dumps(report, indent=2))
    a = report["args"]
    lines = ["# Serve load benchmark", "",
             f"Generated by `python bench/serve_load.py` on {report['machine']} ({report['cpus']} CPUs shared with "
             f"other jobs), {report['date']}.", "",
             f"`POST /v1/rag` from an async httpx client on 127.0.0.1: {a['requests']} requests per concurrency level, "
             f"top_k={TOP_K}, max_tokens={a['max_tokens']}, greedy. Generator: {report['generator']}. Retrieval: "
             f"embedded all-MiniLM-L6-v2 + flat FAISS over the SQuAD Notre Dame paragraphs. Baseline: the same "
             f"retrieval and engine called in-process from asyncio, without Serve.", "",
             "| mode | concurrency | requests | errors | throughput req/s | p50 ms | p99 ms |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(report["rows"], key=lambda r: (r["concurrency"], r["mode"])):
        lines.append(f"| {r['mode']} | {r['concurrency']} | {r['requests']} | {r['errors']} | "
                     f"{r['throughput_rps']:.1f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} |")
    lines += ["", "Serve overhead (p50 serve - p50 in-process):"]
    by = {(r["mode"], r["concurrency"]): r for r in report["rows"]}
    for c in a["concurrency"]:
        if ("serve", c) in by and ("in-process", c) in by:
            lines.append(f"- concurrency {c}: {by[('serve', c)]['p50_ms'] - by[('in-process', c)]['p50_ms']:+.0f} ms "
                         f"per request, throughput x{by[('serve', c)]['throughput_rps'] / by[('in-process', c)]['throughput_rps']:.2f}")
    if report.get("note"):
        lines += ["", report["note"]]
    (OUT / "serve_load.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--squad", type=Path, default=REPO.parent / "shared" / "data" / "squad_notre_dame.json")
    parser.add_argument("--model", default="tiny", help="'tiny' (random 2-layer Llama) or any model spec")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--note", default="", help="a line added to the report (e.g. why requests were reduced)")
    args = parser.parse_args()
    if not args.squad.is_file():
        raise SystemExit(f"{args.squad} is absent; pass --squad PATH to a SQuAD-format file")
    with tempfile.TemporaryDirectory(prefix="raylm-bench-") as tmp:
        storage = Path(tmp)
        model, questions = prepare(storage, args.squad, args.model)
        random.Random(0).shuffle(questions)
        rows = bench_in_process(storage, model, questions, args) + bench_serve(storage, model, questions, args)
    report = {"machine": platform.machine(), "cpus": os.cpu_count(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "generator": "tiny random 2-layer Llama (64-d, test fixture)" if args.model == "tiny" else args.model,
              "args": {"requests": args.requests, "concurrency": args.concurrency, "max_tokens": args.max_tokens,
                       "max_seq_len": args.max_seq_len}, "rows": rows, "note": args.note}
    write(report)
    errors = sum(r["errors"] for r in rows)
    print(f"[bench.serve_load] wrote {OUT / 'serve_load.md'}; total errors: {errors}", flush=True)


if __name__ == "__main__":
    main()
