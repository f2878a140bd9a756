"""Chaos run of the RAG app under load: SIGKILL the Generator replica while streams run, then the
Retriever replica while RAG requests run; count what every client saw and time the recovery.

    python bench/chaos.py [--streams 8] [--max-tokens 96] [--rag-clients 4] [--model smollm2-135m-instruct]

The app is `serve.app.build_app` with serve/config.yaml's defaults on a loopback
Ray cluster of this process (token auth on), the embedded model and a small index of standard
library docstrings. Outcomes per client: `error_event` (the stream ends with an OpenAI error event),
`http_503` / `http_504`, `completed` (finished before the kill), and anything else by name (`http_500`,
`hang`: no answer within --client-timeout). Recovery: seconds from the kill to the first successful
request. The storage's files are hashed before and after: nothing may change or go missing.
Writes docs/benchmarks/chaos.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import importlib
import inspect
import json
import os
import platform
import signal
import socket
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "token")
OUT = REPO / "docs" / "benchmarks"
STDLIB = ("json", "csv", "pathlib", "argparse", "asyncio", "collections", "functools", "itertools", "logging",
          "subprocess", "tempfile", "shutil", "socket", "sqlite3", "threading", "unittest", "urllib.request",
          "zipfile", "tarfile", "hashlib", "datetime", "decimal", "fractions", "statistics", "random", "re")
QUESTION = "Which module creates temporary directories that are removed automatically?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (what must survive the run unchanged)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and "inductor" not in p.parts}


def prepare(storage: Path, model: str) -> None:
    """The embedded model converted under ``storage`` and an index of stdlib docstrings."""
    from ops.model import EMBEDDED, ensure_embedded
    from ops.retrieval import DEFAULT_EMBEDDER, RetrievalStore, chunk_documents, embed, load_embedder

    if model in EMBEDDED:
        ensure_embedded(model, storage)
    from ops import artifacts

    if artifacts.local(str(storage), "indexes", "chaos") is not None:
        return
    docs = [{"id": f"stdlib:{m}", "text": inspect.getdoc(importlib.import_module(m)) or m, "source": m}
            for m in STDLIB]
    chunks = chunk_documents(docs, 1000, 100)
    embedder = load_embedder()
    store = RetrievalStore.build(chunks, embed(embedder, [c["text"] for c in chunks]), embedder_name=DEFAULT_EMBEDDER)
    store.save(storage / "indexes" / "chaos")


async def stream_until_killed(client: httpx.AsyncClient, url: str, body: dict, first_token: asyncio.Event,
                              timeout: float) -> str:
    """One streaming chat request; its outcome as a word (see the module docstring)."""

    async def read() -> str:
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                return f"http_{r.status_code}"
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[len("data: "):])
                if "error" in event:
                    return "error_event"
                choice = (event.get("choices") or [{}])[0]
                if choice.get("delta", {}).get("content"):
                    first_token.set()
                if choice.get("finish_reason"):
                    return "completed"
            return "stream_ended_without_finish"

    try:
        return await asyncio.wait_for(read(), timeout)
    except asyncio.TimeoutError:
        return "hang"
    except httpx.HTTPError as exc:
        return f"connection_{type(exc).__name__}"
    finally:
        first_token.set()  # a client that failed early must not hold the kill back


async def recover(client: httpx.AsyncClient, url: str, body: dict, since: float, limit: float) -> float | None:
    """Seconds from ``since`` until ``url`` answers 200 (polled every 0.25 s), or None after ``limit``."""
    while time.monotonic() - since < limit:
        try:
            if (await client.post(url, json=body, timeout=30)).status_code == 200:
                return time.monotonic() - since
        except httpx.HTTPError:
            pass
        await asyncio.sleep(0.25)
    return None


def replica_pid(deployment: str) -> int:
    """PID of the one live replica of ``deployment``, asked of the replica actor itself (the state API
    looks the cluster up by address, which an in-process cluster with its own temp dir does not publish)."""
    import ray

    names = [a for a in ray.util.list_named_actors(all_namespaces=True)
             if f"SERVE_REPLICA::rag#{deployment}" in a["name"]]
    if len(names) != 1:
        raise RuntimeError(f"expected one {deployment} replica, found {len(names)}")
    actor = ray.get_actor(names[0]["name"], namespace=names[0]["namespace"])
    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=60)


async def kill_generator(base: str, headers: dict, args) -> dict:
    """Start the streams, wait for a generated token on each, SIGKILL the Generator, count outcomes."""
    body = {"model": "default", "messages": [{"role": "user", "content": "Write a long story about a lighthouse."}],
            "max_tokens": args.max_tokens, "temperature": 0, "stream": True}
    async with httpx.AsyncClient(headers=headers, timeout=None) as client:
        model = (await client.get(f"{base}/v1/models")).json()["data"][0]["id"]
        body["model"] = model
        firsts = [asyncio.Event() for _ in range(args.streams)]
        tasks = [asyncio.create_task(stream_until_killed(client, f"{base}/v1/chat/completions", body, e,
                                                         args.client_timeout)) for e in firsts]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in firsts)), args.client_timeout)
        pid = replica_pid("Generator")
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        outcomes = Counter(await asyncio.gather(*tasks))
        again = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0}
        recovery = await recover(client, f"{base}/v1/chat/completions", again, killed_at, args.recovery_limit)
    return {"killed": "Generator", "pid": pid, "clients": args.streams, "outcomes": dict(outcomes),
            "recovery_s": recovery}


async def kill_retriever(base: str, headers: dict, args) -> dict:
    """RAG clients in a loop; SIGKILL the Retriever once they run; count every answer's status."""
    body = {"question": QUESTION, "top_k": 2, "max_tokens": 4, "temperature": 0}
    statuses: Counter[str] = Counter()
    stop = asyncio.Event()

    async def loop(client: httpx.AsyncClient) -> None:
        while not stop.is_set():
            try:
                r = await client.post(f"{base}/v1/rag", json=body, timeout=args.client_timeout)
                statuses[f"http_{r.status_code}"] += 1
            except httpx.TimeoutException:
                statuses["hang"] += 1
            except httpx.HTTPError as exc:
                statuses[f"connection_{type(exc).__name__}"] += 1

    async with httpx.AsyncClient(headers=headers) as client:
        workers = [asyncio.create_task(loop(client)) for _ in range(args.rag_clients)]
        while sum(statuses.values()) < args.rag_clients:  # every client has had an answer: load is on
            await asyncio.sleep(0.05)
        pid = replica_pid("Retriever")
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        recovery = await recover(client, f"{base}/v1/rag", body, killed_at, args.recovery_limit)
        stop.set()
        await asyncio.gather(*workers)
    return {"killed": "Retriever", "pid": pid, "clients": args.rag_clients, "outcomes": dict(statuses),
            "recovery_s": recovery}


def write(report: dict) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "chaos.json").write_text(json.dumps(report, indent=2))
    lines = ["# Chaos run: replicas SIGKILLed under load", "",
             f"`python bench/chaos.py {' '.join(report['argv'])}` on {report['machine']}; model "
             f"`{report['model']}`, compile={report['compile']}, {report['date']}.", "",
             "| killed | clients | outcomes | 5xx other than 503/504 | recovery (s) |", "|---|---|---|---|---|"]
    for run in report["runs"]:
        bad = sum(n for k, n in run["outcomes"].items() if k.startswith("http_5") and k not in ("http_503", "http_504"))
        outcomes = ", ".join(f"{k} {n}" for k, n in sorted(run["outcomes"].items()))
        recovery = f"{run['recovery_s']:.1f}" if run["recovery_s"] is not None else "not within the limit"
        lines.append(f"| {run['killed']} | {run['clients']} | {outcomes} | {bad} | {recovery} |")
    lines += ["", f"Files under the storage before and after: {report['files']} hashed, "
              f"{report['files_changed']} changed or missing.", ""]
    (OUT / "chaos.md").write_text("\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--storage", type=Path, default=REPO / ".cache" / "bench-chaos")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--rag-clients", type=int, default=4)
    parser.add_argument("--client-timeout", type=float, default=180.0)
    parser.add_argument("--recovery-limit", type=float, default=600.0)
    args = parser.parse_args()

    import ray
    from ray import serve

    from cluster.runtime import init_ray
    from serve.app import AppArgs, build_app

    args.storage.mkdir(parents=True, exist_ok=True)
    prepare(args.storage, args.model)
    before = snapshot(args.storage)
    port = free_port()
    init_ray(num_cpus=2)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"storage": str(args.storage), "model": args.model, "index": "chaos", "api_key": "chaos"}),
                  name="rag", route_prefix="/", blocking=False)
        base, headers = f"http://127.0.0.1:{port}", {"Authorization": "Bearer chaos"}
        deadline = time.monotonic() + args.recovery_limit
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{base}/healthz", timeout=10).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        runs = [asyncio.run(kill_generator(base, headers, args)), asyncio.run(kill_retriever(base, headers, args))]
    finally:
        serve.shutdown()
        ray.shutdown()
    after = snapshot(args.storage)
    changed = sum(1 for k, v in before.items() if after.get(k) != v)
    write({"argv": sys.argv[1:], "machine": f"{platform.machine()} x{os.cpu_count()}", "model": args.model,
           "compile": AppArgs().compile, "date": time.strftime("%Y-%m-%d %H:%M"), "runs": runs,
           "files": len(before), "files_changed": changed})


if __name__ == "__main__":
    main()
