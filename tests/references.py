"""Plain reference implementations the engine's decoding is checked against."""

from __future__ import annotations

from typing import Any, Iterable

import torch


def beam_search(model: Any, prompt_ids: list[int], width: int, max_tokens: int, eos: Iterable[int],
                constraint: Any = None, ignore_eos: bool = False) -> list[int]:
    """Beam search as `ops.engine.Request.beams` documents it, over full HF forwards (no KV cache).

    Each step extends every open hypothesis by its ``width`` most likely tokens (those ``constraint``
    allows); an extension ending in EOS, or reaching ``max_tokens``, is final; the ``width`` best
    others stay open. It ends once no open hypothesis scores above the best final one (scores are
    sums of log-probabilities, which only fall) and returns the best final token ids, EOS included.
    With a ``constraint`` that ranks answers (``support_weight``), finals are ranked by its ``rank``
    and the search goes on while an open hypothesis plus its ``max_bonus`` could still beat them.
    """
    eos = set(eos)
    ranked = constraint is not None and getattr(constraint, "support_weight", 0)
    bonus = constraint.max_bonus if ranked else 0.0
    open_: list[tuple[float, list[int]]] = [(0.0, [])]
    finished: list[tuple[float, list[int]]] = []  # (rank, token ids)

    def final(score: float, toks: list[int], text_ids: list[int]) -> None:
        finished.append((constraint.rank(score, text_ids) if ranked else score, toks))

    while True:
        candidates = []
        for score, toks in open_:
            with torch.inference_mode():
                logits = model(torch.tensor([prompt_ids + toks])).logits[0, -1]
            logprobs = torch.log_softmax(logits.float(), -1)
            allowed = constraint.mask(logprobs, toks) if constraint is not None else logprobs
            values, tokens = torch.topk(allowed, min(width, int(torch.isfinite(allowed).sum())))
            candidates += [(score + v, toks, t) for v, t in zip(values.tolist(), tokens.tolist())]
        candidates.sort(key=lambda c: -c[0])
        survivors: list[tuple[float, list[int]]] = []
        for score, toks, t in candidates:
            if t in eos and not ignore_eos:
                final(score, toks + [t], toks)
            elif len(survivors) < width:
                if len(toks) + 1 >= max_tokens:
                    final(score, toks + [t], toks + [t])
                else:
                    survivors.append((score, toks + [t]))
        if not survivors or (finished and max(f[0] for f in finished) >= survivors[0][0] + bonus):
            return max(finished, key=lambda f: f[0])[1]
        open_ = survivors
