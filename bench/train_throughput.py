"""Ray Train overhead and LoRA vs full: tokens/s, step time, peak memory, checkpoint size.

    python bench/train_throughput.py [--steps 8] [--batch 4] [--block 64] [--threads 1]

For each method (lora, full) it runs, in this one invocation:
* a plain single-process PyTorch loop (same model, AdamW, batch, sequence length, thread count);
* ``jobs.train`` with 1 Ray Train worker (``cpus_per_worker = threads``) on the embedded corpus.
Throughput is the median over steps after the first (warm-up). The overhead ratio is
``jobs.train tokens/s / plain tokens/s`` (goal >= 0.9). Writes docs/benchmarks/train_throughput.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
OUT = REPO / "docs" / "benchmarks"


def plain_loop(method: str, steps: int, batch: int, block: int, threads: int, storage: str,
               queue: mp.Queue) -> None:
    """One process, no Ray: the reference loop (random token ids, which cost the same as text)."""
    import torch

    from ops.lora import add_lora
    from ops.model import load_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = load_model("smollm2-135m-instruct", storage=storage, dtype="float32")
    if method == "lora":
        model = add_lora(model, r=16, alpha=32, dropout=0.0)
    model.config.use_cache = False
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    times = []
    for _ in range(steps):
        ids = torch.randint(0, model.config.vocab_size, (batch, block))
        t0 = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times[1:])
    queue.put({"tokens_per_s": batch * block / step_s, "step_s": step_s,
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


def run_plain(method: str, args: argparse.Namespace, storage: str) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=plain_loop, args=(method, args.steps, args.batch, args.block, args.threads, storage,
                                                queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def run_ray(method: str, args: argparse.Namespace, storage: str) -> dict:
    """The training job through its entrypoint (a child process, as a user runs it)."""
    import subprocess

    name = f"bench-{method}"
    subprocess.run([sys.executable, "-m", "jobs.train",
                    f"method={method}", f"storage={storage}", f"name={name}", "num_workers=1",
                    f"cpus_per_worker={args.threads}", f"batch_size={args.batch}", f"block_size={args.block}",
                    f"max_steps={args.steps}", f"eval_every={args.steps}", "val_blocks=2", "max_tokens=20000",
                    "shuffle=false", "lora.r=16", "lora.alpha=32", "lora.dropout=0.0", "keep_checkpoints=1",
                    "max_failures=0", "lr=1e-4", "warmup_steps=0"],
                   cwd=REPO, check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    out = Path(storage) / ("adapters" if method == "lora" else "models") / name
    history = json.loads((out / "history.json").read_text())
    # The last step carries the validation pass and the checkpoint; the first is warm-up.
    steady = [h["tokens_per_s"] for h in history[1:-1]]
    weights = [p for p in out.iterdir() if p.suffix == ".safetensors"]
    tokens_per_s = statistics.median(steady)
    return {"tokens_per_s": tokens_per_s, "step_s": args.batch * args.block / tokens_per_s,
            "peak_rss_mb": max(h["peak_rss_mb"] for h in history),
            "checkpoint_mb": sum(p.stat().st_size for p in weights) / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--storage", default=str(REPO / ".cache" / "test-artifacts"),
                        help="artifact root holding (or receiving) the converted embedded model")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from cluster.runtime import init_ray
    from ops.model import ensure_embedded

    ensure_embedded("smollm2-135m-instruct", args.storage)
    init_ray(num_cpus=max(2, args.threads))
    rows = {}
    for method in ("lora", "full"):
        plain = run_plain(method, args, args.storage)
        ray_run = run_ray(method, args, args.storage)
        for kind in ("runs", "adapters", "models"):
            shutil.rmtree(Path(args.storage) / kind / f"bench-{method}", ignore_errors=True)
        rows[method] = {"plain": plain, "ray_train": ray_run,
                            "overhead_ratio": ray_run["tokens_per_s"] / plain["tokens_per_s"]}
        print(f"[bench] {method}: plain {plain['tokens_per_s']:.0f} tok/s, jobs.train "
              f"{ray_run['tokens_per_s']:.0f} tok/s, ratio {rows[method]['overhead_ratio']:.3f}", flush=True)
    report = {"model": "smollm2-135m-instruct", "steps": args.steps, "batch": args.batch, "block": args.block,
              "threads": args.threads, "machine": platform.machine(), "cpus": os.cpu_count(),
              "load_average": os.getloadavg()[0], "results": rows}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "train_throughput.json").write_text(json.dumps(report, indent=2))
    lines = [
        "# Training throughput: jobs.train (Ray Train, 1 worker) vs a plain PyTorch loop",
        "",
        f"Generated by `python bench/train_throughput.py --steps {args.steps} --batch {args.batch} "
        f"--block {args.block} --threads {args.threads}`; embedded SmolLM2-135M, fp32, CPU "
        f"({os.cpu_count()} cores shared with other jobs, 1-min load average {report['load_average']:.1f}). "
        "Median over steps after the first; a jobs.train step includes its Ray report.",
        "",
        "| method | plain tok/s | jobs.train tok/s | overhead ratio (goal >= 0.9) | plain step s | jobs.train step s "
        "| plain peak RSS MB | worker peak RSS MB | checkpoint MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method, r in rows.items():
        p, t = r["plain"], r["ray_train"]
        lines.append(f"| {method} | {p['tokens_per_s']:.0f} | {t['tokens_per_s']:.0f} | {r['overhead_ratio']:.3f} | "
                     f"{p['step_s']:.2f} | {t['step_s']:.2f} | {p['peak_rss_mb']:.0f} | {t['peak_rss_mb']:.0f} | "
                     f"{t['checkpoint_mb']:.1f} |")
    (OUT / "train_throughput.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
