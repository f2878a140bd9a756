"""Next-token sampling of one request: greedy, temperature, top-k, top-p, seeded per request."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ops.engine import Request


def sample(logits: torch.Tensor, request: Request, generator: torch.Generator | None) -> int:
    """Picks the next token of one request.

    Args:
        logits: (V,) float32 next-token logits.
        request: Sampling parameters.
        generator: The request's seeded generator (unused for greedy).

    Returns:
        The token id.
    """
    if request.temperature == 0:
        return int(logits.argmax())
    logits = logits / request.temperature
    if request.top_k:
        kth = torch.topk(logits, min(request.top_k, logits.shape[-1])).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if request.top_p < 1:
        sorted_logits, order = logits.sort(descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > request.top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))
