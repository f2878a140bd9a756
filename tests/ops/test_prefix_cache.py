"""Prefix cache: LRU under a byte bound (unit), and invisible in the engine's greedy output."""

import pytest
import torch

from ops.engine import Engine, EngineConfig, Request
from ops.prefix_cache import PrefixCache
from tests.ops.test_engine import hf_greedy, tiny_model, tokenizer  # noqa: F401 - fixtures

SHARED = ("You answer questions from the passages below. Passage 1: The mill on the river was built in 1821 "
          "and ground wheat for the town until the flood. Passage 2: ")
QUESTIONS = ["The bridge is made of stone. Question: when was the mill built?",
             "The school opened in 1900. Question: what did the mill grind?",
             "The flood came in spring. Question: what ended the mill?"]


def kv(value: float, block: int = 4) -> torch.Tensor:
    return torch.full((2, 2, 1, block, 8), float(value))  # (L, 2, n_kv, block, hs): 512 bytes in float32


def test_lru_eviction_under_the_byte_bound():
    cache = PrefixCache(block_tokens=4, max_bytes=2 * 512)
    prompts = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]
    keys = [cache.keys("m", p)[0] for p in prompts]
    cache.insert(keys[0], kv(0))
    cache.insert(keys[1], kv(1))
    assert cache.match("m", prompts[0] + [0], limit=5)[0].equal(kv(0))  # block 0 is now the most recent
    cache.insert(keys[2], kv(2))  # over the bound: the least recently used (block 1) goes
    assert keys[0] in cache and keys[2] in cache and keys[1] not in cache
    assert cache.stats.evicted_blocks == 1 and cache.stats.bytes == 2 * 512 and cache.stats.blocks == 2


def test_keys_chain_over_the_prefix_and_the_namespace():
    cache = PrefixCache(block_tokens=2, max_bytes=1 << 20)
    a, b = cache.keys("m", [1, 2, 3, 4]), cache.keys("m", [9, 9, 3, 4])
    assert len(a) == 2 and a[0] != b[0] and a[1] != b[1]  # same second block, other prefix: other key
    assert cache.keys("m", [1, 2, 3]) == a[:1]  # only whole blocks
    assert cache.keys(("m", "adapter"), [1, 2]) != a[:1]
    cache.insert(a[0], kv(0, 2))
    assert cache.match("m", [1, 2, 3, 4], limit=4)[0].equal(kv(0, 2))
    assert cache.match("m", [1, 2, 3, 4], limit=1) == []  # never the prompt's last token
    assert cache.match("other", [1, 2, 3, 4], limit=4) == []


@pytest.mark.parametrize("chunk", [256, 8])
def test_greedy_output_with_prefix_cache_matches_hf_generate(tiny_model, tokenizer, chunk):  # noqa: F811
    prompts = [SHARED + q for q in QUESTIONS]
    cfg = EngineConfig(max_batch_size=2, max_seq_len=512, prefix_cache_mb=4, prefix_block_tokens=16,
                       prefill_chunk_tokens=chunk)
    with Engine(tiny_model, tokenizer, cfg) as eng:
        first = eng.generate_sync([Request(prompt=prompts[0], max_tokens=16, ignore_eos=True)])
        rest = eng.generate_sync([Request(prompt=p, max_tokens=16, ignore_eos=True) for p in prompts])
        stats = eng.prefix_cache_stats()
    shared_blocks = len(tokenizer(SHARED)["input_ids"]) // 16
    assert shared_blocks >= 2
    assert stats["hit_tokens"] >= 3 * shared_blocks * 16  # every later request reused the shared blocks
    for prompt, out in zip(prompts, rest):
        assert out.token_ids == hf_greedy(tiny_model, tokenizer, prompt, 16)
    assert first[0].token_ids == rest[0].token_ids


def test_eviction_under_a_small_bound_keeps_outputs(tiny_model, tokenizer):  # noqa: F811
    prompts = [SHARED + q for q in QUESTIONS]
    block_bytes = 2 * 2 * 2 * 16 * 16 * 4  # layers x (k, v) x kv heads x block x head dim x float32
    cfg = EngineConfig(max_batch_size=1, max_seq_len=512, prefix_cache_mb=3 * block_bytes / 2**20,
                       prefix_block_tokens=16)
    with Engine(tiny_model, tokenizer, cfg) as eng:
        outs = eng.generate_sync([Request(prompt=p, max_tokens=8, ignore_eos=True) for p in prompts * 2])
        stats = eng.prefix_cache_stats()
    assert stats["evicted_blocks"] > 0 and stats["bytes"] <= 3 * block_bytes and stats["blocks"] <= 3
    for prompt, out in zip(prompts * 2, outs):
        assert out.token_ids == hf_greedy(tiny_model, tokenizer, prompt, 8)
