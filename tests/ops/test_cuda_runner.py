"""ops/cuda_runner.py's static decode step, run eagerly on CPU: same tokens as `generate`.

The CUDA-only parts (graph capture, flash-attn, the CUDA kernels) are in tests/gpu/.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ops.cuda_runner import CudaLlamaRunner, batch_buckets
from ops.engine import Engine, EngineConfig, Request
from tests.conftest import build_tiny_tokenizer

PROMPTS = ["The quick brown fox", "To be, or not to be, that is the question.", "Python is", "A journey of a"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def tiny_llama(tokenizer, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, rms_norm_eps=1e-5, eos_token_id=tokenizer.eos_token_id)
    return LlamaForCausalLM(config).eval()


def hf_greedy(model, tokenizer, prompt: str, n: int) -> list[int]:
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, ids.input_ids.shape[1]:].tolist()


def static_engine(model, tokenizer, max_batch_size: int = 4) -> Engine:
    """An engine whose runner is the CUDA runner (eager on CPU), swapped in before the thread starts."""
    engine = Engine(model, tokenizer, EngineConfig(max_batch_size=max_batch_size, max_seq_len=200))
    engine.runner = CudaLlamaRunner(model, max_batch_size, 200, fuse_qkv=True, cuda_graphs=True)
    return engine


def test_batch_buckets() -> None:
    assert batch_buckets(1) == [1]
    assert batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(12) == [1, 2, 4, 8, 12]
    assert batch_buckets(32) == [1, 2, 4, 8, 16, 32]


def test_static_step_matches_generate_with_padding_and_uneven_lengths(tokenizer) -> None:
    model = tiny_llama(tokenizer)
    want = [hf_greedy(model, tokenizer, p, 24) for p in PROMPTS[:3]]
    with static_engine(model, tokenizer) as engine:
        runner = engine.runner
        assert not runner.compiled  # graphs are CUDA-only
        assert runner.attention.name == "sdpa" and runner.k_cache[0].shape[2] == 256  # rounded up to 64
        # three requests run in the bucket of 4: one padding row every step
        outs = engine.generate_sync([Request(prompt=p, max_tokens=24, ignore_eos=True) for p in PROMPTS[:3]])
    assert [o.token_ids for o in outs] == want
    # the fused projections share the model's storage: the model itself still computes the same
    q = model.model.layers[0].self_attn.q_proj.weight
    fused = runner.qkv[0].weight
    assert fused.untyped_storage().data_ptr() == q.untyped_storage().data_ptr()
    assert hf_greedy(model, tokenizer, PROMPTS[0], 24) == want[0]


def test_static_step_runs_the_compiled_ops_when_patched(tokenizer) -> None:
    from ops.patch import patch_model

    model = tiny_llama(tokenizer, seed=1)
    want = [hf_greedy(model, tokenizer, p, 16) for p in PROMPTS]
    report = patch_model(model)
    with static_engine(model, tokenizer) as engine:
        assert all(g is not None for g in engine.runner.gate_up), "a patched SwiGLU MLP is still fused"
        outs = engine.generate_sync([Request(prompt=p, max_tokens=16, ignore_eos=True) for p in PROMPTS])
    assert [o.token_ids for o in outs] == want, report


def test_static_step_with_weight_only_int4(tokenizer) -> None:
    from ops.quantization import quantize

    model = quantize(tiny_llama(tokenizer, seed=2), "weight_only_int4")
    with Engine(model, tokenizer, EngineConfig(max_batch_size=4, max_seq_len=200)) as reference:
        want = [o.token_ids for o in reference.generate_sync(
            [Request(prompt=p, max_tokens=16, ignore_eos=True) for p in PROMPTS])]
    with static_engine(model, tokenizer) as engine:
        got = [o.token_ids for o in engine.generate_sync(
            [Request(prompt=p, max_tokens=16, ignore_eos=True) for p in PROMPTS])]
    assert got == want
