"""Model quality and speed figures: sliding-window perplexity, prefill/decode latency, size."""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ops.errors import UserError


@dataclass
class Perplexity:
    """Result of :func:`sliding_window_perplexity`."""

    perplexity: float
    nll_sum: float
    tokens: int  # tokens in the evaluated stream
    predicted: int  # tokens whose negative log-likelihood was counted
    window: int
    stride: int

    def as_dict(self) -> dict:
        return asdict(self)


def check_window(window: int, stride: int) -> None:
    if window < 2:
        raise UserError(f"window={window} is too small; valid: an integer >= 2")
    if stride < 1 or stride > window:
        raise UserError(f"stride={stride} must be between 1 and window ({window})")


@torch.inference_mode()
def sliding_window_perplexity(model: torch.nn.Module, ids: torch.Tensor, window: int, stride: int,
                              progress: Callable[[int, int], None] | None = None) -> Perplexity:
    """Perplexity of a fixed-length model over a long token stream (HF's sliding-window method).

    Each window of ``window`` tokens starts ``stride`` after the previous one; only the tokens
    not already scored by an earlier window count, each conditioned on up to ``window - 1``
    tokens of context. With ``stride == window`` windows are disjoint.

    Args:
        model: causal LM returning ``.logits`` of shape (1, T, V).
        ids: (N,) token ids.
        window: tokens per forward pass (at most the model's context).
        stride: step between window starts, ``1 <= stride <= window``.
        progress: called with ``(done_tokens, total_tokens)`` after each window.
    """
    check_window(window, stride)
    ids = ids.reshape(-1)
    n = ids.numel()
    if n < 2:
        raise UserError(f"need at least 2 tokens to compute perplexity, got {n}")
    device = next(model.parameters()).device
    nll_sum = 0.0
    predicted = 0
    prev_end = 0
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        chunk = ids[begin:end].to(device).unsqueeze(0)  # (1, T)
        logits = model(input_ids=chunk).logits.float()  # (1, T, V)
        # Position t predicts token t+1; score only targets past what earlier windows scored.
        first_target = max(prev_end, begin + 1)
        lo = first_target - begin - 1
        targets = chunk[0, first_target - begin:]
        if targets.numel():
            nll_sum += F.cross_entropy(logits[0, lo:lo + targets.numel()], targets, reduction="sum").item()
            predicted += targets.numel()
        prev_end = end
        if progress:
            progress(end, n)
        if end == n:
            break
    return Perplexity(math.exp(nll_sum / predicted), nll_sum, n, predicted, window, stride)


@dataclass
class Latency:
    """Batch-1 greedy latency, medians over ``repeats`` runs."""

    prefill_ms_per_token: float
    decode_ms_per_token: float
    prompt_tokens: int
    new_tokens: int
    repeats: int

    def as_dict(self) -> dict:
        return asdict(self)


@torch.inference_mode()
def measure_latency(model: torch.nn.Module, prompt_ids: torch.Tensor, new_tokens: int = 32,
                    repeats: int = 3, warmup: int = 1) -> Latency:
    """Time prefill of ``prompt_ids`` and greedy decode of ``new_tokens`` with the HF KV cache.

    Args:
        prompt_ids: (P,) prompt token ids.
    """
    if new_tokens < 1:
        raise UserError(f"new_tokens={new_tokens} must be >= 1")
    device = next(model.parameters()).device
    prompt = prompt_ids.reshape(1, -1).to(device)
    prefill, decode = [], []
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        out = model(input_ids=prompt, use_cache=True)
        t1 = time.perf_counter()
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(new_tokens):
            out = model(input_ids=token, cache=out.cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
        t2 = time.perf_counter()
        if i >= warmup:
            prefill.append((t1 - t0) * 1000 / prompt.shape[1])
            decode.append((t2 - t1) * 1000 / new_tokens)
    return Latency(statistics.median(prefill), statistics.median(decode), prompt.shape[1], new_tokens, repeats)
