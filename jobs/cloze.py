"""Questions made from a paragraph's own sentences, for ``task=rag_qa`` training.

A user's SQuAD file has a few questions per paragraph; a 135M model learns to pick an answer span
from a few hundred of them slowly. Cloze questions (Lewis et al. 2019, "Unsupervised Question
Answering by Cloze Translation"; Dhingra et al. 2018) add many more, for free and from the very
passages the model reads: a sentence with one span turned into a question word, answered by that
span. They are easier than real questions (the sentence is quoted), so they train finding the
sentence and copying the span, not paraphrase; the real questions stay the first turn of every
example and the whole of validation.

Spans are what SQuAD answers mostly are and what a rule finds without a tagger: numbers and years
("in 1879" -> "in what year"), and capitalised names not opening the sentence.
"""

from __future__ import annotations

import re

import numpy as np

_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
_YEAR = re.compile(r"\b(1[0-9]{3}|20[0-9]{2})\b")
_NUMBER = re.compile(r"(?<![\w$])\$?\d[\d,]*(?:\.\d+)?(?:\s?(?:%|percent|million|billion|thousand))?(?![\w])")
# A run of capitalised words, possibly joined by short lower-case ones ("Basilica of the Sacred Heart").
_NAME = re.compile(r"\b[A-Z][\w'\-.]*(?:\s+(?:(?:of|the|de|and|for|du|van|von)\s+)*[A-Z][\w'\-.]*)*")


def _spans(sentence: str) -> list[tuple[int, int, str]]:
    """(start, end, question words) of the answer spans a rule finds in ``sentence``."""
    found = [(m.start(), m.end(), "what year") for m in _YEAR.finditer(sentence)]
    taken = [(s, e) for s, e, _ in found]
    for m in _NUMBER.finditer(sentence):
        if not any(s < m.end() and m.start() < e for s, e in taken):
            found.append((m.start(), m.end(), "how much" if m.group().startswith("$") else "how many"))
            taken.append((m.start(), m.end()))
    for m in _NAME.finditer(sentence):
        start, end = m.start(), m.end()
        text = m.group().rstrip(".")
        end = start + len(text)
        if start == 0 or any(s < end and start < e for s, e in taken):
            continue  # the opening word is capitalised anyway; overlaps are taken
        if len(text) < 3 or text.isupper() and len(text) < 4:
            continue
        found.append((start, end, "what"))
    return found


def cloze_questions(text: str, count: int, rng: np.random.Generator) -> list[dict]:
    """Up to ``count`` ``{"question", "answer"}`` pairs from the sentences of ``text``, one per sentence.

    Sentences of 6 to 45 words are used; in each, one span (chosen by ``rng``) becomes the question
    words and the sentence, ending in "?", the question.
    """
    if count <= 0:
        return []
    sentences = [s.strip() for s in _SENTENCE.split(text) if 6 <= len(s.split()) <= 45]
    out = []
    for i in rng.permutation(len(sentences)):
        sentence = sentences[i].rstrip(" .!?;:")
        spans = _spans(sentence)
        if not spans:
            continue
        start, end, words = spans[int(rng.integers(len(spans)))]
        question = f"{sentence[:start]}{words}{sentence[end:]}".strip() + "?"
        out.append({"question": question, "answer": sentence[start:end]})
        if len(out) == count:
            break
    return out
