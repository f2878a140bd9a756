"""The engine on CUDA: greedy == `generate`, CUDA graphs captured, FlashAttention taken, int4/int8, a LoRA step."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend

from ops.engine import Engine, EngineConfig, Request
from tests.gpu.conftest import requires_cuda, small_llama

pytestmark = requires_cuda

PROMPTS = ["The quick brown fox", "To be, or not to be, that is the question.", "Python is", "A journey of a"]


def hf_greedy(model, tokenizer, prompt: str, n: int) -> list[int]:
    ids = tokenizer(prompt, return_tensors="pt").to("cuda")
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, ids.input_ids.shape[1]:].tolist()


def test_greedy_matches_generate_on_cuda_with_graphs(tokenizer) -> None:
    model = small_llama(len(tokenizer))
    want = [hf_greedy(model, tokenizer, p, 32) for p in PROMPTS]
    with Engine(model, tokenizer, EngineConfig(max_batch_size=4, max_seq_len=256)) as engine:
        engine.warmup()
        assert engine.compiled, engine.warmup_error
        assert sorted(engine.runner._graphs) == engine.runner.buckets == [1, 2, 4]
        single = engine.generate_sync([Request(prompt=PROMPTS[1], max_tokens=32, ignore_eos=True)])[0]
        # three of four rows finish at different times: the graphs of every bucket replay
        batched = engine.generate_sync([Request(prompt=p, max_tokens=8 + 8 * i, ignore_eos=True)
                                        for i, p in enumerate(PROMPTS)])
    assert single.token_ids == want[1]
    for i, (out, ref) in enumerate(zip(batched, want)):
        assert out.token_ids == ref[:8 + 8 * i]


def test_flash_attention_path_is_taken_in_bf16(tokenizer) -> None:
    from ops.attention import flash_attn_installed
    from ops.cuda_runner import CudaLlamaRunner

    model = small_llama(len(tokenizer), torch.bfloat16)
    runner = CudaLlamaRunner(model, 4, 256, fuse_qkv=True)
    expected = "flash_attn_with_kvcache" if flash_attn_installed() else "sdpa_efficient"
    assert runner.attention.name == expected, runner.attention.reason
    assert runner._prefill_backends == [SDPBackend.FLASH_ATTENTION]  # an input flash cannot take would raise
    runner.warmup()
    assert runner.attention.name == expected, runner.attention.reason  # the decode kernel took the inputs

    # Teacher-forced: the engine's prefill + decode logits against the HF forward over the same tokens.
    ids = torch.randint(0, len(tokenizer), (40,), device="cuda")
    with torch.inference_mode():
        want = model(input_ids=ids[None]).logits[0].float()  # (T, V)
        got = [runner.prefill(0, ids[:24])]
        for t in range(24, 40):
            got.append(runner.decode_one_token(ids[t:t + 1], torch.tensor([t], device="cuda"))[0].clone())
    got = torch.stack(got)  # (17, V): logits after positions 23..39
    scale = want.abs().max().item()
    torch.testing.assert_close(got, want[23:], atol=0.03 * scale, rtol=0.0)


def test_compiled_ops_serve_the_cuda_hot_path() -> None:
    from ops import kernels as K

    x = torch.randn(2, 192, device="cuda", dtype=torch.bfloat16)
    assert K.native_serves(x, x[0]), K.backend_reason()


@pytest.mark.parametrize("method", ["weight_only_int4", "weight_only_int8"])
def test_weight_only_on_cuda_matches_cpu_and_serves(tokenizer, tmp_path, method: str) -> None:
    from ops.quantization import load_quantized, quantize, save_quantized

    float_model = small_llama(len(tokenizer)).cpu()
    quantized = quantize(float_model, method)
    ids = torch.randint(0, len(tokenizer), (1, 32))
    with torch.inference_mode():
        want = quantized(input_ids=ids).logits.float()  # CPU kernels, bf16 compute
    save_quantized(quantized, tmp_path / "q", method, {}, "small")
    on_gpu = load_quantized(tmp_path / "q", device="cuda")  # repacked for the CUDA kernel on load
    with torch.inference_mode():
        got = on_gpu(input_ids=ids.cuda()).logits.float().cpu()
    torch.testing.assert_close(got, want, atol=0.05 * want.abs().max().item(), rtol=0.0)
    with Engine(on_gpu, tokenizer, EngineConfig(max_batch_size=2, max_seq_len=128)) as engine:
        engine.warmup()
        assert engine.compiled, engine.warmup_error
        outs = engine.generate_sync([Request(prompt=p, max_tokens=12, ignore_eos=True) for p in PROMPTS[:2]])
    assert all(o.completion_tokens == 12 for o in outs)


def test_one_lora_training_step_in_bf16_autocast(tokenizer) -> None:
    from ops.attention import choose_attention
    from ops.lora import add_lora
    from ops.model import autocast_dtype

    device = torch.device("cuda")
    amp = autocast_dtype("auto", device)
    assert amp is torch.bfloat16
    attention = choose_attention("auto", device, amp)
    model = small_llama(len(tokenizer))
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(attention.name)
    else:
        model.config._attn_implementation = attention.name
    model = add_lora(model, r=8, alpha=16, dropout=0.0)
    model.train()
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    before = [p.detach().clone() for p in lora_b]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(0, len(tokenizer), (4, 64), device=device)
    with torch.autocast("cuda", dtype=amp):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(p, b) for p, b in zip(lora_b, before))
