"""GPU decode benchmark: the engine against transformers `generate` on one GPU, and one LoRA training step.

Builds the SmolLM2-135M architecture from its config with random weights (no download, no Ray:
only `ops/` runs here) and a word-level tokenizer over its 49152 ids, then measures, in bfloat16:

- batch-1 new tokens/s, end to end per request: `generate` (static cache, eager; also compiled
  when the time budget allows) and the engine (CUDA graphs, compiled ops, FlashAttention path);
- aggregate new tokens/s of the engine with 32 concurrent requests;
- one LoRA training step (bf16 autocast, the attention backend `ops.attention` picks).

Writes docs/benchmarks/gpu.md and gpu.json. Exits 1 when a target is missed: engine batch 1 >= 2x
eager `generate` batch 1, engine with 32 concurrent requests >= 10x engine batch 1.

    python bench/gpu_decode.py [--new-tokens 128] [--prompt-tokens 64] [--time-budget 240] [--checks TEXT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

VOCAB = 49152
TARGET_BATCH1 = 2.0  # engine batch 1 / eager generate batch 1
TARGET_CONCURRENT = 10.0  # engine 32 concurrent (aggregate) / engine batch 1


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--new-tokens", type=int, default=128, help="new tokens per request (EOS ignored)")
    p.add_argument("--prompt-tokens", type=int, default=64, help="prompt length in tokens")
    p.add_argument("--prompts", type=int, default=4, help="batch-1 requests timed per setting")
    p.add_argument("--concurrency", type=int, default=32, help="concurrent requests of the batched run")
    p.add_argument("--time-budget", type=float, default=240.0, help="seconds; the compiled generate baseline is "
                   "skipped when less than --compile-needs is left after the required runs")
    p.add_argument("--compile-needs", type=float, default=120.0, help="seconds the compiled baseline may take")
    p.add_argument("--checks", default="", help="text of the check steps run before (gpu_check.sh), for the report")
    p.add_argument("--out", default=str(REPO / "docs" / "benchmarks"), help="folder for gpu.md / gpu.json")
    return p.parse_args()


def smollm2_config():
    """SmolLM2-135M's architecture (its config.json values), random weights."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                       rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, hidden_act="silu",
                       bos_token_id=1, eos_token_id=2, pad_token_id=0)


def word_tokenizer():
    """A word-level tokenizer whose words are the model's ids ("w0".."w49151"): every id decodes."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", pad_token="w0", eos_token="w2")


def sync_time() -> float:
    torch.cuda.synchronize()
    return time.perf_counter()


def bench_generate(model, prompt_ids: list[torch.Tensor], new_tokens: int, compiled: bool) -> dict:
    """Batch-1 `generate` with a static cache; returns tokens/s and the warm-up (compile) time."""
    kwargs = dict(max_new_tokens=new_tokens, do_sample=False, cache_implementation="static",
                  disable_compile=not compiled, eos_token_id=None, pad_token_id=0)
    t0 = sync_time()
    with torch.inference_mode():
        model.generate(prompt_ids[0][None], attention_mask=torch.ones_like(prompt_ids[0][None]), **kwargs)
    warmup_s = sync_time() - t0
    total, elapsed = 0, 0.0
    for ids in prompt_ids:
        t0 = sync_time()
        with torch.inference_mode():
            out = model.generate(ids[None], attention_mask=torch.ones_like(ids[None]), **kwargs)
        elapsed += sync_time() - t0
        total += out.shape[1] - ids.shape[0]
    return {"tokens_per_s": total / elapsed, "warmup_s": warmup_s, "new_tokens": total}


def bench_engine(model, tokenizer, prompts: list[str], new_tokens: int, concurrency: int, max_seq_len: int) -> dict:
    """The engine at batch 1 (one request at a time) and with `concurrency` requests at once."""
    from ops.engine import Engine, EngineConfig, Request

    t0 = time.perf_counter()
    engine = Engine(model, tokenizer, EngineConfig(max_batch_size=concurrency, max_queue=2 * concurrency,
                                                   max_seq_len=max_seq_len))
    engine.warmup()
    warmup_s = time.perf_counter() - t0
    request = lambda p: Request(prompt=p, max_tokens=new_tokens, ignore_eos=True)  # noqa: E731
    try:
        engine.generate_sync([request(prompts[0])])  # first prefill and sampling path
        total, elapsed = 0, 0.0
        for prompt in prompts:
            t0 = sync_time()
            (out,) = engine.generate_sync([request(prompt)])
            elapsed += sync_time() - t0
            total += out.completion_tokens
        batch1 = total / elapsed
        t0 = sync_time()
        outs = engine.generate_sync([request(prompts[i % len(prompts)]) for i in range(concurrency)])
        wall = sync_time() - t0
        concurrent = sum(o.completion_tokens for o in outs) / wall
        attention = engine.attention
        return {"batch1_tokens_per_s": batch1, "concurrent_tokens_per_s": concurrent,
                "concurrent_p50_latency_s": sorted(o.latency_s for o in outs)[len(outs) // 2],
                "warmup_s": warmup_s, "cuda_graphs": engine.compiled, "backend": engine.backend,
                "attention": attention.name if attention else None,
                "attention_reason": attention.reason if attention else None}
    finally:
        engine.close()


def bench_lora_step(batch: int = 8, block: int = 256) -> dict:
    """One LoRA step (bf16 autocast) of the SmolLM2 architecture, timed after one warm-up step."""
    from transformers import LlamaForCausalLM

    from ops.attention import choose_attention
    from ops.lora import add_lora
    from ops.model import autocast_dtype

    device = torch.device("cuda")
    amp = autocast_dtype("auto", device)
    attention = choose_attention("auto", device, amp or torch.float32)
    config = smollm2_config()
    config._attn_implementation = attention.name
    torch.manual_seed(0)
    model = add_lora(LlamaForCausalLM(config).to(device), r=16, alpha=32, dropout=0.0)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, VOCAB, (batch, block), device=device)
    times, losses = [], []
    for _ in range(2):
        t0 = sync_time()
        with torch.autocast("cuda", dtype=amp or torch.float32, enabled=amp is not None):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(sync_time() - t0)
        losses.append(loss.item())
    return {"step_s": times[-1], "tokens_per_s": batch * block / times[-1], "loss": losses[-1],
            "autocast": str(amp), "attention": attention.name, "attention_reason": attention.reason,
            "batch": batch, "block": block, "finite": all(map(lambda v: v == v and abs(v) != float("inf"), losses))}


def versions() -> dict:
    import transformers

    from ops import kernels as K
    from ops.attention import flash_attn_version

    return {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": transformers.__version__, "flash_attn": flash_attn_version() or "not installed",
            "python": platform.python_version(), "ops_backend": K.active_backend(), "ops_reason": K.backend_reason()}


def write_report(out: Path, result: dict, checks: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(result, indent=2))
    v, hf, eng, lora = result["versions"], result["generate"], result["engine"], result["lora_step"]
    compiled = result.get("generate_compiled", {})
    rows = [("`generate`, static cache, bf16, eager", f"{hf['tokens_per_s']:.1f}", "1.00x", "")]
    if "tokens_per_s" in compiled:
        rows.append(("`generate`, static cache, bf16, compiled (reduce-overhead)", f"{compiled['tokens_per_s']:.1f}",
                     f"{compiled['tokens_per_s'] / hf['tokens_per_s']:.2f}x", f"compile {compiled['warmup_s']:.0f} s"))
    rows.append((f"engine, bf16, CUDA graphs, {eng['attention']}", f"{eng['batch1_tokens_per_s']:.1f}",
                 f"{result['ratios']['batch1_vs_generate']:.2f}x", f"warm-up {eng['warmup_s']:.1f} s"))
    rows.append((f"engine, {result['concurrency']} concurrent (aggregate)", f"{eng['concurrent_tokens_per_s']:.1f}",
                 f"{eng['concurrent_tokens_per_s'] / hf['tokens_per_s']:.2f}x",
                 f"{result['ratios']['concurrent_vs_batch1']:.2f}x engine batch 1"))
    lines = [
        "# GPU decode benchmark",
        "",
        f"Written by `bench/gpu_decode.py` (run by `bash bench/gpu_check.sh`) on {v['gpu']}: torch {v['torch']} "
        f"(CUDA {v['cuda']}), transformers {v['transformers']}, flash-attn {v['flash_attn']}, Python {v['python']}.",
        f"Model: the SmolLM2-135M architecture with random weights, bfloat16; prompts of "
        f"{result['prompt_tokens']} tokens, {result['new_tokens']} new tokens per request (EOS ignored), "
        "end to end per request (prefill included).",
        "",
        "| setting | new tokens/s | vs eager `generate` batch 1 | note |",
        "|---|---|---|---|",
        *[f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows],
        "",
        f"Targets: engine batch 1 >= {TARGET_BATCH1:.0f}x eager `generate`: "
        f"**{'met' if result['targets']['batch1'] else 'MISSED'}** ({result['ratios']['batch1_vs_generate']:.2f}x); "
        f"{result['concurrency']} concurrent >= {TARGET_CONCURRENT:.0f}x engine batch 1: "
        f"**{'met' if result['targets']['concurrent'] else 'MISSED'}** "
        f"({result['ratios']['concurrent_vs_batch1']:.2f}x).",
        "",
        f"Engine: decode attention `{eng['attention']}` ({eng['attention_reason']}); decode in CUDA graphs: "
        f"{eng['cuda_graphs']}; compiled ops: {v['ops_backend']} ({v['ops_reason']}); "
        f"patched modules: {result['patch']}.",
    ]
    if compiled and "tokens_per_s" not in compiled:
        lines += ["", f"Compiled `generate`: {compiled.get('skipped') or compiled.get('error')}."]
    lines += [
        "",
        "## One LoRA training step",
        "",
        f"r=16 on every projection, batch {lora['batch']} x {lora['block']} tokens, autocast {lora['autocast']}, "
        f"attention `{lora['attention']}` ({lora['attention_reason']}): {lora['step_s'] * 1000:.0f} ms per step "
        f"({lora['tokens_per_s']:.0f} tokens/s), loss {lora['loss']:.3f}.",
    ]
    if checks:
        lines += ["", "## Checks run before", "", "```", checks.strip(), "```"]
    (out / "gpu.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    args = parse_args()
    started = time.perf_counter()
    if not torch.cuda.is_available():
        print("gpu_decode: no CUDA device", file=sys.stderr)
        return 2
    from transformers import LlamaForCausalLM

    from ops.patch import patch_model

    tokenizer = word_tokenizer()
    gen = torch.Generator().manual_seed(0)
    sampled = [torch.randint(3, VOCAB, (args.prompt_tokens,), generator=gen) for _ in range(args.prompts)]
    prompts = [" ".join(f"w{i}" for i in ids.tolist()) for ids in sampled]
    # generate and the engine must see the same ids: take them from the tokenizer the engine uses
    # (tokenizers versions differ in special tokens), and say so when they are not the sampled ones.
    prompt_ids = [torch.tensor(tokenizer(p)["input_ids"]) for p in prompts]
    if prompt_ids[0].tolist() != sampled[0].tolist():
        print(f"note: the tokenizer gives {len(prompt_ids[0])} ids {prompt_ids[0][:6].tolist()}... for "
              f"{len(sampled[0])} sampled ids {sampled[0][:6].tolist()}...", file=sys.stderr)
    torch.manual_seed(0)
    model = LlamaForCausalLM(smollm2_config()).to("cuda", torch.bfloat16).eval()
    cuda_ids = [ids.cuda() for ids in prompt_ids]

    result: dict = {"versions": versions(), "prompt_tokens": "-".join(map(str, sorted({min(map(len, prompt_ids)), max(map(len, prompt_ids))}))), "new_tokens": args.new_tokens,
                    "concurrency": args.concurrency}
    result["generate"] = bench_generate(model, cuda_ids, args.new_tokens, compiled=False)
    print(f"generate eager batch 1: {result['generate']['tokens_per_s']:.1f} tokens/s", flush=True)
    # The engine patches the model's modules in place: every `generate` run comes first.
    left = args.time_budget - (time.perf_counter() - started)
    required = 60.0  # the engine and the LoRA step on this model take well under this
    if left - required >= args.compile_needs:
        try:
            result["generate_compiled"] = bench_generate(model, cuda_ids, args.new_tokens, compiled=True)
            print(f"generate compiled batch 1: {result['generate_compiled']['tokens_per_s']:.1f} tokens/s", flush=True)
        except Exception as exc:  # noqa: BLE001 - a baseline that cannot compile is reported, not fatal
            result["generate_compiled"] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    else:
        result["generate_compiled"] = {"skipped": f"skipped: {left:.0f} s of the time budget left, compiling needs "
                                                  f"about {args.compile_needs:.0f} s"}
    torch._dynamo.reset()
    result["patch"] = str(patch_model(model))
    result["engine"] = bench_engine(model, tokenizer, prompts, args.new_tokens, args.concurrency,
                                    max(len(ids) for ids in prompt_ids) + args.new_tokens + 8)
    print(f"engine batch 1: {result['engine']['batch1_tokens_per_s']:.1f} tokens/s, {args.concurrency} concurrent: "
          f"{result['engine']['concurrent_tokens_per_s']:.1f} tokens/s ({result['engine']['attention']})", flush=True)
    del model
    torch.cuda.empty_cache()
    result["lora_step"] = bench_lora_step()
    print(f"LoRA step: {result['lora_step']['step_s'] * 1000:.0f} ms, loss {result['lora_step']['loss']:.3f}",
          flush=True)
    eng, hf = result["engine"], result["generate"]
    result["ratios"] = {"batch1_vs_generate": eng["batch1_tokens_per_s"] / hf["tokens_per_s"],
                        "concurrent_vs_batch1": eng["concurrent_tokens_per_s"] / eng["batch1_tokens_per_s"]}
    result["targets"] = {"batch1": result["ratios"]["batch1_vs_generate"] >= TARGET_BATCH1,
                         "concurrent": result["ratios"]["concurrent_vs_batch1"] >= TARGET_CONCURRENT}
    result["wall_s"] = time.perf_counter() - started
    assert "ray" not in sys.modules, "the GPU benchmark imported ray; ops/ must stay free of it"
    write_report(Path(args.out), result, args.checks)
    print(f"wrote {Path(args.out) / 'gpu.md'}; targets: {result['targets']}", flush=True)
    ok = all(result["targets"].values()) and result["lora_step"]["finite"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
