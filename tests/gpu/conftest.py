"""GPU tests: every test here is marked `gpu` and skips without a CUDA device.

They run on the GPU machine through `bash bench/gpu_check.sh`, which has no Ray: nothing on
this path may import it.
"""

from __future__ import annotations

import sys

import pytest
import torch

requires_cuda = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


@pytest.fixture(scope="module", autouse=True)
def _no_ray_on_the_gpu_path():
    """Fails a module whose tests imported ray (the GPU machine has none; ops/ must not need it)."""
    before = "ray" in sys.modules
    yield
    assert before or "ray" not in sys.modules, "the GPU path imported ray; ops/ must stay free of it"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from tests.conftest import build_tiny_tokenizer

    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def small_llama(vocab_size: int, dtype: torch.dtype = torch.float32, seed: int = 0, layers: int = 2):
    """A random Llama with SmolLM2's head layout (head size 64, 3 query heads per KV head) on CUDA."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=192, intermediate_size=512, num_hidden_layers=layers,
                         num_attention_heads=3, num_key_value_heads=1, max_position_embeddings=512,
                         tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=100000.0)
    return LlamaForCausalLM(config).to("cuda", dtype).eval()
