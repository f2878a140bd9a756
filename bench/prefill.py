"""Prefill benchmark of the weight-only quantized layers: matrix-vector kernels against dequantize + GEMM.

Writes docs/benchmarks/prefill.md and prefill.json:
- per layer shape of the embedded model, microseconds per row of torch's packed weight-only kernel
  and of the GEMM path at several row counts (where `ops.quantization.GEMM_MIN_ROWS` comes from);
- prefill ms/token of the engine's own forward (`LlamaRunner.prefill`) for float32,
  weight_only_int8 and weight_only_int4, with the GEMM path off (the kernels at every row count)
  and on;
- with --ppl-data, perplexity of each quantized model through both paths;
- prefill ms/token of a --chunk-prompt-token prompt in chunks of --chunks tokens (the engine's
  `prefill_chunk_tokens`), weight_only_int8.

    python bench/prefill.py [--threads 2] [--tokens 512] [--ppl-data ../shared/data/wikitext2_valid.txt]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from ops import quantization  # noqa: E402
from ops.metrics import sliding_window_perplexity  # noqa: E402
from ops.model import DEFAULT_MODEL, load_model, load_tokenizer  # noqa: E402
from ops.runner import LlamaRunner  # noqa: E402

OFF = 1 << 30  # GEMM_MIN_ROWS that keeps every forward on the matrix-vector kernels
METHODS = ("weight_only_int8", "weight_only_int4")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--tokens", type=int, default=512, help="prompt length of the model prefill")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per figure (the minimum is kept: the "
                   "machine is shared, and interference only ever adds time)")
    p.add_argument("--rows", default="1,8,16,32,64,128,512", help="row counts of the layer sweep")
    p.add_argument("--chunks", default="64,128,256,512,1024", help="chunk sizes of the chunked-prefill sweep")
    p.add_argument("--chunk-prompt-tokens", type=int, default=1024, help="prompt length of the chunk sweep")
    p.add_argument("--ppl-data", default=None, help="text file for the perplexity check")
    p.add_argument("--ppl-tokens", type=int, default=2048, help="tokens of --ppl-data scored")
    p.add_argument("--storage", default="./artifacts", help="artifact root holding the converted embedded model")
    p.add_argument("--out", default="docs/benchmarks", help="folder for prefill.md / prefill.json")
    return p.parse_args()


def best_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1000


def layer_sweep(model, rows: list[int], repeats: int) -> list[dict]:
    """us/row of each weight-only module kind on the model's (fused) layer shapes, kernel vs GEMM."""
    cfg = model.config
    hs = cfg.hidden_size // cfg.num_attention_heads
    shapes = {"qkv": ((cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * hs, cfg.hidden_size),
              "o": (cfg.hidden_size, cfg.hidden_size), "gate_up": (2 * cfg.intermediate_size, cfg.hidden_size),
              "down": (cfg.hidden_size, cfg.intermediate_size)}
    out = []
    for method in METHODS:
        for name, (n, k) in shapes.items():
            linear = torch.nn.Linear(k, n, bias=False)
            layer = (quantization.Int8WeightOnlyLinear.from_float(linear) if method == "weight_only_int8"
                     else quantization.Int4WeightOnlyLinear.from_float(linear))
            for m in rows:
                x = torch.randn(m, k)
                timings = {}
                for path, threshold in (("kernel", OFF), ("gemm", 1)):
                    quantization.GEMM_MIN_ROWS = threshold
                    with torch.inference_mode():
                        timings[path] = best_ms(lambda: layer(x), repeats) * 1000 / m
                out.append({"method": method, "layer": name, "shape": [n, k], "rows": m,
                            "kernel_us_per_row": timings["kernel"], "gemm_us_per_row": timings["gemm"]})
                print(out[-1], flush=True)
    return out


def prefill_ms_per_token(model, ids: torch.Tensor, repeats: int) -> float:
    runner = LlamaRunner(model, 1, ids.shape[0] + 1, fuse_qkv=True)
    return best_ms(lambda: runner.prefill(0, ids), repeats) / ids.shape[0]


def chunk_sweep(model, ids: torch.Tensor, chunks: list[int], repeats: int) -> list[dict]:
    """Prefill ms/token of `ids` fed in chunks (`LlamaRunner.prefill(start=...)`), weight_only_int8."""
    runner = LlamaRunner(quantization.quantize(model, "weight_only_int8"), 1, ids.shape[0] + 1, fuse_qkv=True)
    out = []
    for chunk in chunks:
        def run() -> None:
            for start in range(0, ids.shape[0], chunk):
                runner.prefill(0, ids[start : start + chunk], start=start)
        out.append({"chunk": chunk, "ms_per_token": best_ms(run, repeats) / ids.shape[0]})
        print(out[-1], flush=True)
    return out


def perplexity(model, ids: torch.Tensor) -> float:
    with torch.inference_mode():
        return sliding_window_perplexity(model, ids, window=1024, stride=512).perplexity


def measure_models(model, ids: torch.Tensor, ppl_ids: torch.Tensor | None, default: int, repeats: int) -> list[dict]:
    rows = []
    for method in ("float32", *METHODS):
        m = model if method == "float32" else quantization.quantize(model, method)
        row = {"method": method}
        for path, threshold in (("kernel", OFF), ("gemm", default)):
            quantization.GEMM_MIN_ROWS = threshold
            row[f"{path}_ms_per_token"] = prefill_ms_per_token(m, ids, repeats)
            row[f"{path}_perplexity"] = perplexity(m, ppl_ids) if ppl_ids is not None and method != "float32" else None
        print(row, flush=True)
        rows.append(row)
    quantization.GEMM_MIN_ROWS = default
    return rows


def write(out_dir: Path, result: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "prefill.json").write_text(json.dumps(result, indent=2))
    f32 = result["models"][0]["gemm_ms_per_token"]
    lines = [
        "# Prefill of weight-only quantized models: matrix-vector kernels vs dequantize + GEMM", "",
        f"Generated by `{result['command']}` on {result['date']} (torch {result['torch']}, {result['machine']}, "
        f"{result['threads']} threads, load average {result['load_at_start']:.2f} at start; minimum of "
        f"{result['repeats']} runs per figure).", "",
        f"## Model prefill ({result['tokens']} tokens, `LlamaRunner.prefill`, GEMM_MIN_ROWS={result['gemm_min_rows']})",
        "", "| method | kernels ms/token | GEMM path ms/token | speed-up | x float32 | ppl kernels | ppl GEMM | ppl ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["models"]:
        ratio = (f"{r['gemm_perplexity'] / r['kernel_perplexity']:.4f}" if r["kernel_perplexity"] else "-")
        ppl = [f"{r[k]:.4f}" if r[k] else "-" for k in ("kernel_perplexity", "gemm_perplexity")]
        lines.append(f"| {r['method']} | {r['kernel_ms_per_token']:.2f} | {r['gemm_ms_per_token']:.2f} | "
                     f"{r['kernel_ms_per_token'] / r['gemm_ms_per_token']:.2f}x | "
                     f"{r['gemm_ms_per_token'] / f32:.2f} | {ppl[0]} | {ppl[1]} | {ratio} |")
    lines += ["", f"## Chunked prefill ({result['chunk_prompt_tokens']}-token prompt, weight_only_int8)", "",
              "| chunk tokens | ms/token |", "|---|---|"]
    lines += [f"| {r['chunk']} | {r['ms_per_token']:.2f} |" for r in result["chunks"]]
    lines += ["", "## Layer sweep (us per row; the GEMM path includes dequantizing the weight each call)", "",
              "| method | layer | N x K | rows | kernel | GEMM |", "|---|---|---|---|---|---|"]
    for r in result["layers"]:
        lines.append(f"| {r['method']} | {r['layer']} | {r['shape'][0]} x {r['shape'][1]} | {r['rows']} | "
                     f"{r['kernel_us_per_row']:.1f} | {r['gemm_us_per_row']:.1f} |")
    (out_dir / "prefill.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    args = parse_args()
    load_at_start = os.getloadavg()[0]
    torch.set_num_threads(args.threads)
    default = quantization.GEMM_MIN_ROWS
    tokenizer = load_tokenizer(DEFAULT_MODEL, storage=args.storage)
    model = load_model(DEFAULT_MODEL, storage=args.storage)
    text = Path(args.ppl_data).read_text() if args.ppl_data else "The quick brown fox jumps over the lazy dog. " * 200
    all_ids = torch.tensor(tokenizer(text)["input_ids"])
    if all_ids.numel() < args.tokens:
        raise SystemExit(f"--tokens {args.tokens}: the text has only {all_ids.numel()} tokens")
    ppl_ids = all_ids[: args.ppl_tokens] if args.ppl_data else None
    layers = layer_sweep(model, [int(r) for r in args.rows.split(",")], args.repeats)
    models = measure_models(model, all_ids[: args.tokens], ppl_ids, default, args.repeats)
    if all_ids.numel() < args.chunk_prompt_tokens:
        raise SystemExit(f"--chunk-prompt-tokens {args.chunk_prompt_tokens}: the text has only {all_ids.numel()} tokens")
    chunks = chunk_sweep(model, all_ids[: args.chunk_prompt_tokens], [int(c) for c in args.chunks.split(",")],
                         args.repeats)
    result = {
        "command": "python bench/prefill.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
        "machine": platform.machine(), "threads": args.threads, "load_at_start": load_at_start,
        "repeats": args.repeats, "tokens": args.tokens, "gemm_min_rows": default,
        "ppl_data": args.ppl_data, "ppl_tokens": args.ppl_tokens if args.ppl_data else None,
        "models": models, "layers": layers, "chunks": chunks, "chunk_prompt_tokens": args.chunk_prompt_tokens,
        "median_gemm_speedup_at_max_rows": statistics.median(
            r["kernel_us_per_row"] / r["gemm_us_per_row"] for r in layers if r["rows"] == max(
                int(x) for x in args.rows.split(","))),
    }
    write(Path(args.out), result)
    print(f"wrote {args.out}/prefill.md", flush=True)


if __name__ == "__main__":
    main()
