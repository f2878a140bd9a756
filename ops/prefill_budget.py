"""How many prompt tokens one engine step may prefill while other requests are decoding.

A step that prefills a chunk of S prompt tokens and then decodes the running rows delays each of
their streams by the chunk's time. A fixed S cannot bound that delay: a chunk's Linear layers cost
the same per token anywhere in the prompt, but its attention reads every earlier key, so the same
chunk costs more the deeper it is in the prompt.

:class:`PrefillBudget` sizes each chunk from a cost model fitted to the steps the engine has
measured: a chunk of S tokens starting at position p costs

    S * (1 + (p + S / 2) / P)  units,

where P (``keys_per_unit``) is the number of keys whose attention costs as many FLOPs as one
token's Linear layers (from the model's shape), and the milliseconds per unit, like the time of a
decode step, are running averages of measured steps. A step may prefill for ``(stall - 1)`` times a
decode step, so a running stream's token gap stays within about ``stall`` times its usual one
(Sarathi-Serve's stall-free batching, with the budget in time rather than in tokens).
"""

from __future__ import annotations

_ALPHA = 0.3  # weight of the newest measurement in the running averages (adapts within a few steps)


class PrefillBudget:
    """Chunk sizes for prefill while requests decode, from measured step times.

    Args:
        stall: Bound on a mixed step's time as a multiple of a decode step's (> 1).
        max_tokens: Largest chunk, whatever the budget (``EngineConfig.prefill_chunk_tokens``).
        keys_per_unit: P above: Linear FLOPs per token / attention FLOPs per key and token.
        min_tokens: Smallest chunk, so that a prompt always advances.
    """

    def __init__(self, stall: float, max_tokens: int, keys_per_unit: float, min_tokens: int = 8) -> None:
        if stall <= 1:
            raise ValueError(f"prefill stall must be > 1 (a mixed step takes longer than a decode step), got {stall}")
        if keys_per_unit <= 0:
            raise ValueError(f"keys_per_unit must be > 0, got {keys_per_unit}")
        self.stall, self.max_tokens, self.keys_per_unit = stall, max_tokens, keys_per_unit
        self.min_tokens = min(min_tokens, max_tokens)
        self.ms_per_unit: float | None = None
        self.decode_ms: float | None = None

    def units(self, start: int, tokens: int) -> float:
        """Cost units of prefilling `tokens` prompt tokens from position `start`."""
        return tokens * (1 + (start + tokens / 2) / self.keys_per_unit)

    def step_ms(self) -> float | None:
        """Milliseconds a step may spend prefilling while requests decode (None: nothing measured yet)."""
        if self.decode_ms is None:
            return None
        return (self.stall - 1) * self.decode_ms

    def tokens(self, start: int, budget_ms: float | None) -> int:
        """Chunk size for a prompt whose next token is at `start`, to fit in `budget_ms`.

        Without measurements (or budget) yet, the largest chunk; never fewer than `min_tokens`.
        """
        if budget_ms is None or self.ms_per_unit is None:
            return self.max_tokens
        lo, hi = self.min_tokens, self.max_tokens
        while lo < hi:  # the largest S whose predicted time fits (cost grows with S)
            mid = (lo + hi + 1) // 2
            if self.units(start, mid) * self.ms_per_unit <= budget_ms:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def observe_prefill(self, start: int, tokens: int, seconds: float) -> None:
        """Records a prefill of `tokens` tokens from position `start` that took `seconds`."""
        if tokens <= 0:
            return
        rate = 1000.0 * seconds / self.units(start, tokens)
        self.ms_per_unit = rate if self.ms_per_unit is None else (1 - _ALPHA) * self.ms_per_unit + _ALPHA * rate

    def observe_decode(self, seconds: float) -> None:
        """Records a decode step of the running requests that took `seconds`."""
        ms = 1000.0 * seconds
        self.decode_ms = ms if self.decode_ms is None else (1 - _ALPHA) * self.decode_ms + _ALPHA * ms


def keys_per_unit(hidden: int, intermediate: int, n_head: int, n_kv_head: int, head_dim: int) -> float:
    """P of a Llama-family layer: its Linear weights per token over the attention work per key.

    Per token, the q/k/v/o and SwiGLU projections take 2 FLOPs per weight; per key it attends,
    a token takes 4 * n_head * head_dim FLOPs (q.k and p.v of every head).
    """
    weights = hidden * (n_head + 2 * n_kv_head) * head_dim + n_head * head_dim * hidden + 3 * hidden * intermediate
    return 2 * weights / (4 * n_head * head_dim)
