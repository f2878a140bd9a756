"""Extractive-QA answer metrics with the official SQuAD v1.1 normalisation.

``normalize_answer``, ``exact_match`` and ``f1`` follow ``evaluate-v1.1.py`` of the SQuAD release
(lower case, drop punctuation, drop the articles a/an/the, collapse whitespace; F1 over the bag of
normalised tokens), and a question's score is the maximum over its gold answers, as there.
``contains_gold`` is the looser "the answer contains a gold answer" used for RAG answers that
wrap the span in a sentence.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Iterable, Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, remove punctuation, articles and extra whitespace (SQuAD v1.1)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    """1.0 when the normalised strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction: str, gold: str) -> float:
    """Token-overlap F1 between the normalised prediction and gold answer."""
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    common = Counter(pred_tokens) & Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def contains_gold(prediction: str, gold: str) -> float:
    """1.0 when the normalised gold answer occurs in the normalised prediction as whole words."""
    p, g = f" {normalize_answer(prediction)} ", f" {normalize_answer(gold)} "
    return float(g.strip() != "" and g in p)


def best_over_golds(metric, prediction: str, golds: Iterable[str]) -> float:
    """``max(metric(prediction, g) for g in golds)``; 0.0 for no gold answers."""
    return max((metric(prediction, g) for g in golds), default=0.0)


def score_answers(predictions: Sequence[str], golds: Sequence[Sequence[str]]) -> dict[str, float]:
    """Mean exact match, F1 and contains-gold of ``predictions[i]`` against ``golds[i]``.

    Returns:
        ``{"exact_match", "f1", "contains_gold", "questions"}``; means in [0, 1].
    """
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions but {len(golds)} gold answer lists")
    n = max(1, len(predictions))
    return {
        "exact_match": sum(best_over_golds(exact_match, p, g) for p, g in zip(predictions, golds)) / n,
        "f1": sum(best_over_golds(f1, p, g) for p, g in zip(predictions, golds)) / n,
        "contains_gold": sum(best_over_golds(contains_gold, p, g) for p, g in zip(predictions, golds)) / n,
        "questions": len(predictions),
    }
