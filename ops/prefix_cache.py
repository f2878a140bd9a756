"""Prefix cache of the engine: the KV of prompt prefixes seen before, reused by later requests.

A prompt is cut into blocks of `block_tokens` tokens; block i is keyed by a hash chained over the
tokens of blocks 0..i, so a key names a whole prefix, not a block alone, and by a namespace (the
model and the LoRA adapter, whose keys and values differ for the same tokens). A hit copies the
blocks' keys and values into the request's KV cache row and the prompt is prefilled from there on.
Blocks are evicted least recently used first once their bytes exceed `max_bytes`.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Hashable, Sequence

import torch


@dataclass
class PrefixCacheStats:
    """Counters of a `PrefixCache` (since creation)."""

    lookups: int = 0  # requests looked up
    hit_tokens: int = 0  # prompt tokens whose KV came from the cache
    lookup_tokens: int = 0  # prompt tokens of the requests looked up
    inserted_blocks: int = 0
    evicted_blocks: int = 0
    blocks: int = 0  # resident now
    bytes: int = 0  # resident now
    max_bytes: int = 0


class PrefixCache:
    """Block-wise KV of prompt prefixes, LRU-evicted under a byte bound.

    Args:
        block_tokens: tokens per block; only whole blocks are cached and reused.
        max_bytes: resident bytes at most (keys + values of all layers).
    """

    def __init__(self, block_tokens: int, max_bytes: int):
        if block_tokens < 1 or max_bytes < 0:
            raise ValueError(f"block_tokens must be >= 1 and max_bytes >= 0, got {block_tokens} and {max_bytes}")
        self.block_tokens = block_tokens
        self.max_bytes = max_bytes
        self._blocks: OrderedDict[tuple[Hashable, bytes], torch.Tensor] = OrderedDict()  # oldest first
        self.stats = PrefixCacheStats(max_bytes=max_bytes)

    def keys(self, namespace: Hashable, token_ids: Sequence[int]) -> list[tuple[Hashable, bytes]]:
        """Key of every whole block of `token_ids`: block i's digest covers blocks 0..i."""
        out, digest = [], b""
        n = len(token_ids) // self.block_tokens
        for i in range(n):
            block = token_ids[i * self.block_tokens : (i + 1) * self.block_tokens]
            digest = hashlib.blake2b(digest + torch.tensor(block, dtype=torch.int64).numpy().tobytes(),
                                     digest_size=16).digest()
            out.append((namespace, digest))
        return out

    def match(self, namespace: Hashable, token_ids: Sequence[int], limit: int) -> list[torch.Tensor]:
        """KV blocks of the longest cached prefix of `token_ids`, at most `limit` tokens.

        Returns:
            One (L, 2, n_kv, block_tokens, hs) tensor per matched block, in prompt order; the
            matched blocks become the most recently used.
        """
        self.stats.lookups += 1
        self.stats.lookup_tokens += len(token_ids)
        found = []
        for key in self.keys(namespace, token_ids[: limit - limit % self.block_tokens]):
            kv = self._blocks.get(key)
            if kv is None:
                break
            self._blocks.move_to_end(key)
            found.append(kv)
        self.stats.hit_tokens += len(found) * self.block_tokens
        return found

    def insert(self, key: tuple[Hashable, bytes], kv: torch.Tensor) -> None:
        """Caches one block's KV (L, 2, n_kv, block_tokens, hs), evicting the least recently used beyond `max_bytes`."""
        size = kv.numel() * kv.element_size()
        if key in self._blocks or size > self.max_bytes:
            return
        self._blocks[key] = kv
        self.stats.inserted_blocks += 1
        self.stats.bytes += size
        while self.stats.bytes > self.max_bytes:
            _, old = self._blocks.popitem(last=False)
            self.stats.bytes -= old.numel() * old.element_size()
            self.stats.evicted_blocks += 1
        self.stats.blocks = len(self._blocks)

    def __contains__(self, key: tuple[Hashable, bytes]) -> bool:
        return key in self._blocks

    def drop(self, namespace: Hashable) -> None:
        """Forgets every block of `namespace` (an adapter registered again under the same name)."""
        for key in [k for k in self._blocks if k[0] == namespace]:
            kv = self._blocks.pop(key)
            self.stats.bytes -= kv.numel() * kv.element_size()
        self.stats.blocks = len(self._blocks)
