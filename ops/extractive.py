"""Extractive decoding: keep a generated answer a span of the given passages.

A RAG answer to a factual question is a phrase of the retrieved passages. A small model asked to
copy one still drifts off the text on the tokens it is least sure of: it starts a name right and
finishes it wrong ("Dragon Blue and Gold Rush" where the passage says "Navy Blue and Gold
Rush"), or writes a date range that is in no passage. At each step the constraint looks at the
model's most likely next tokens, best first, and keeps those with which the answer so far is
still a run of whole and partial words of some passage, starting at a word (compared as SQuAD
compares answers: case, punctuation, articles and spacing aside, so "a wind tunnel" may come
from "an early wind tunnel" and the model is not forced onto another span by its first word);
EOS is allowed where a word of the passage ends. Layout is no answer: before its first word an
answer has at most one opening character (a quote, bracket or currency sign), and no run of three
equal punctuation characters ("+-----+ | Python object", a row of a table in documentation, is
text of the passage). The model still chooses the span; the
constraint only rules out what the passages do not say. It is what the answer's citations rely
on too: an answer copied from a passage cites it exactly.

Among the answers a beam search finishes, the model's likeliest is often a salient span of the wrong
sentence ("Albert Zahm" for who sent the first wireless message, from the sentence about a wind
tunnel). A reading-comprehension question is written about one sentence and mostly in its words, so
:meth:`SpanConstraint.rank` adds ``support_weight`` x :func:`question_support` (the share of the
question's content words in the sentence the answer was copied from) to a final answer's
log-probability; the engine's beam ranks its final answers so and searches until no open hypothesis
could outrank the best.

This is a string check on a few candidates per step (the decoded answer, at most ``candidates``
of them), not a trie over the vocabulary: answers are short and the tokenizer's merges make a
token-level index of the passages miss spans that start mid-token.
"""

from __future__ import annotations

import re
import string
import threading
from typing import Any, Iterable, Sequence

import torch

from ops.qa_metrics import normalize_answer

DEFAULT_CANDIDATES = 32
# Searched only when none of the first `candidates` tokens may follow (a few steps of an answer, if any).
WIDE_CANDIDATES = 1024
_LEADING_ARTICLES = re.compile(r"^(?:(?:a|an|the)(?: |$))+")
# Text before an answer's first word: at most one of these (a quote, bracket, currency sign, a flag's
# or path's first character). Passages copied from documentation carry table borders ("+-----+ |")
# and rules that are text of the passage but no answer.
_OPENERS = frozenset("\"'([{$\u00a3\u20ac\u00a5#@-./~<\u201c\u2018\u00ab")
_BEFORE_WORD = re.compile(r"\W*")
_LAYOUT_RUN = re.compile(r"([^\w\s])\1\1")  # "---", "===", "+++": borders and rules, not words


def _spaced(text: str) -> str:
    """Lower case, whitespace runs as one space, a trailing space kept."""
    core = " ".join(text.lower().split())
    return core + " " if core and text[-1:].isspace() else core


def normalize(text: str) -> str:
    """SQuAD's answer normalisation (case, ASCII punctuation, articles and spacing aside); a
    trailing space is kept: the next word has not started yet, which only the passages' spaces allow."""
    core = normalize_answer(text)
    if core and text[-1:].isspace():
        core += " "
    return core


def _with_articles(text: str) -> str:
    """:func:`normalize` keeping articles after the first word ("Congregatio a Sancta"), so an
    article is checked against the passages while the answer's own leading article is not."""
    core = " ".join("".join(c for c in text.lower() if c not in string.punctuation).split())
    core = _LEADING_ARTICLES.sub("", core)
    return core + " " if core and text[-1:].isspace() else core


def _opens_an_answer(text: str) -> bool:
    """Whether what comes before ``text``'s first word is at most one opening character (spaces
    aside; the bytes of a character not decoded yet are judged once it is)."""
    prefix = "".join(_BEFORE_WORD.match(text).group(0).split()).replace("\ufffd", "")
    return not prefix or (len(prefix) == 1 and prefix in _OPENERS)


class SpanConstraint:
    """Restricts a sequence's tokens to those that keep its text a run of words of one of ``sources``.

    Args:
        sources: the texts an answer may copy from (the passages of the prompt).
        tokenizer: decodes token ids to text (a Hugging Face tokenizer).
        eos_ids: token ids that end generation.
        candidates: the most likely tokens checked per step; when none of them continues a span
            the answer ends (EOS) where a word of the passages ends, and otherwise (before any
            text, or inside a word) goes on with the most likely token of the first
            ``WIDE_CANDIDATES`` that may, else of the passages' own tokens.
        question: what the answer answers; with ``support_weight`` it ranks a beam search's final
            answers (:meth:`rank`).
        support_weight: weight of :func:`question_support` in :meth:`rank`; 0 ranks by likelihood only.
    """

    def __init__(self, sources: Sequence[str], tokenizer: Any, eos_ids: Iterable[int],
                 candidates: int = DEFAULT_CANDIDATES, question: str | None = None, support_weight: float = 0.0):
        if candidates < 1:
            raise ValueError(f"candidates must be >= 1, got {candidates}")
        if support_weight < 0 or (support_weight and not (question or "").strip()):
            raise ValueError(f"support_weight must be >= 0 and needs a question, got {support_weight} "
                             f"with question {question!r}")
        self.question, self.support_weight = question, float(support_weight)
        self.texts = [s for s in sources if s.strip()]
        # padded: a span starts at a word
        self.sources = [f" {normalize(s)} " for s in self.texts]
        self.literal = [_spaced(s) for s in self.texts]
        self.with_articles = [f" {_with_articles(s)} " for s in self.texts]
        self._starts: list[int] | None = None
        if not self.sources:
            raise ValueError("extractive decoding needs at least one non-empty passage")
        self.tokenizer = tokenizer
        self.eos_ids = sorted(set(eos_ids))
        self.candidates = candidates

    def _passage_tokens(self) -> list[int]:
        if self._starts is None:
            encoded = self.tokenizer(self.texts, add_special_tokens=False)["input_ids"]
            self._starts = sorted({t for ids in encoded for t in ids})
        return self._starts

    def _text(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def allows(self, token_ids: Sequence[int], token: int, text: str | None = None) -> bool:
        """Whether ``token`` may follow ``token_ids`` (whose decoded text is ``text``, if known)."""
        before = self._text(token_ids) if text is None else text
        if token in self.eos_ids:  # at the end of a word of the passages ("Dor" of "Dorm" is no answer)
            done = normalize(before).rstrip()
            return bool(done) and any(f" {done} " in s for s in self.sources)
        after = self._text([*token_ids, token])
        if len(after) <= len(before):  # special tokens and pieces that add no text
            return False
        added = after[len(before):] if after.startswith(before) else after
        if not added.strip() and (not normalize(before) or before[-1:].isspace()):
            return False  # whitespace only between words
        if _LAYOUT_RUN.search(after) or not _opens_an_answer(after):
            return False
        head = after.rstrip("\ufffd")
        if len(head) < len(after):  # bytes of a character not complete yet: one must follow the rest
            return len(after) - len(head) < 4 and self._before_non_ascii(normalize(head))
        candidate = normalize(after)
        starts_a_word = any(f" {candidate}" in s for s in self.sources)
        if any(_spaced(after) in s for s in self.literal):  # copied as it stands
            return not candidate or starts_a_word
        # Otherwise compared as SQuAD compares answers, for tokens that add to a word (punctuation and
        # articles only as a passage has them: a stream of "?" normalises to nothing, "Dor an the A A"
        # to "dor")
        if not (candidate and starts_a_word and any(c.isalnum() for c in added)):
            return False
        if candidate.rstrip() == normalize(before).rstrip():  # an article: only where a passage has it
            return any(f" {_with_articles(after)}" in s for s in self.with_articles)
        return True

    @property
    def max_bonus(self) -> float:
        """The most :meth:`rank` adds to a log-probability: how far below the best final answer's rank an
        open hypothesis must be before a search may stop (its later tokens only lower its likelihood)."""
        return self.support_weight

    def rank(self, logprob: float, token_ids: Sequence[int]) -> float:
        """A final answer's rank: ``logprob`` (its tokens', EOS included) + ``support_weight`` x
        :func:`question_support` of its text (``token_ids`` decoded)."""
        if not self.support_weight:
            return logprob
        return logprob + self.support_weight * question_support(self.question or "", self._text(token_ids), self.texts,
                                                                 _stemmer())

    def _before_non_ascii(self, text: str) -> bool:
        """Whether some passage has ``text`` followed by a non-ASCII character."""
        text = f" {text}" if text else ""
        for s in self.sources:
            at = s.find(text)
            while at >= 0:
                end = at + len(text)
                if end < len(s) and ord(s[end]) > 127:
                    return True
                at = s.find(text, at + 1)
        return False

    def mask(self, logits: torch.Tensor, token_ids: Sequence[int], text: str | None = None,
             first_only: bool = False) -> torch.Tensor:
        """``logits`` (V,) with every token the constraint rules out at -inf.

        Args:
            logits: next-token logits of the sequence.
            token_ids: tokens generated so far (not the prompt).
            text: their decoded text, if the caller has it.
            first_only: keep only the most likely allowed token (greedy decoding needs no more).
        """
        before = self._text(token_ids) if text is None else text
        top = torch.topk(logits, min(self.candidates, logits.shape[-1])).indices.tolist()

        def scan(tokens: Sequence[int]) -> list[int]:
            keep = []
            for token in tokens:
                if self.allows(token_ids, token, before):
                    keep.append(token)
                    if first_only:
                        break
            return keep

        keep = scan(top)
        if not keep and self.eos_ids and normalize(before) and self.allows(token_ids, self.eos_ids[0], before):
            keep = self.eos_ids  # nothing likely continues the span, and it ends at a word: the answer ends
        if not keep:
            # none of the likely tokens starts a span, or the answer stops inside a word ("Dor" of
            # "Dorm"): the best-ranked token further down that does, else the passages' own tokens
            wide = torch.topk(logits, min(WIDE_CANDIDATES, logits.shape[-1])).indices.tolist()
            keep = scan(wide[len(top):]) or [t for t in self._passage_tokens() if self.allows(token_ids, t, before)]
        if not keep:
            if not self.eos_ids:
                return logits
            keep = self.eos_ids
        masked = torch.full_like(logits, float("-inf"))
        index = torch.tensor(keep, device=logits.device)
        masked[index] = logits[index]
        return masked


# Words a question shares with any sentence: no evidence of where its answer is. bm25s's English list
# (what BM25 ignores) plus the question words it keeps.
_QUESTION_WORDS = frozenset("what which who whom whose when where why how whats did does do many much".split())
_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+")


_local = threading.local()


def _stemmer() -> Any:
    """This thread's stemmer (a PyStemmer object is not safe to share between threads): BM25's
    (ops.retrieval.BM25_LANGUAGE), so "founded" meets "founding"."""
    if not hasattr(_local, "stemmer"):
        import Stemmer

        _local.stemmer = Stemmer.Stemmer("english")
    return _local.stemmer


def _content_words(text: str, stem: Any) -> set[str]:
    from bm25s.stopwords import STOPWORDS_EN

    words = [w for w in normalize_answer(text).split() if w not in STOPWORDS_EN and w not in _QUESTION_WORDS]
    return set(stem.stemWords(words)) if stem is not None else set(words)


def question_support(question: str, answer: str, passages: Sequence[str], stem: Any = None) -> float:
    """How much of ``question`` the passage sentence ``answer`` was copied from repeats: the fraction of
    the question's content words (stop and question words aside, and the answer's own words) found in
    it, the best sentence holding the answer counted; 0.0 when no sentence holds it.

    A reading-comprehension question is written about one sentence, and mostly in its words (the
    sliding-window baseline of MCTest and SQuAD); a span the model likes from a sentence about
    something else is the small reader's commonest wrong answer."""
    span = normalize_answer(answer)
    asked = _content_words(question, stem) - _content_words(answer, stem)
    if not span or not asked:
        return 0.0
    best = 0.0
    for passage in passages:
        for sentence in _SENTENCE_END.split(passage):
            if f" {span} " in f" {normalize_answer(sentence)} ":
                best = max(best, len(asked & _content_words(sentence, stem)) / len(asked))
    return best
