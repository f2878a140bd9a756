"""jobs/cloze.py: cloze questions from a paragraph's own sentences."""

from __future__ import annotations

import numpy as np

from jobs.cloze import cloze_questions

TEXT = ("The university was founded in 1842 by Father Edward Sorin. Its library holds over 3,000 books and "
        "maps. Today the college, housed in Bond Hall, teaches architecture to students. Short one here. "
        "the students all read quietly in the shade of old trees at noon.")


def test_each_question_is_its_sentence_with_the_answer_turned_into_question_words():
    rng = np.random.default_rng(0)
    qs = cloze_questions(TEXT, 10, rng)
    sentences = {s.rstrip(".") for s in TEXT.split(". ")}
    assert 1 <= len(qs) <= 3  # the sentence under 6 words and the one without a span make none
    for q in qs:
        assert q["question"].endswith("?") and q["answer"] and q["answer"] not in q["question"]
        words = next(w for w in ("what year", "how many", "what") if w in q["question"])
        # Putting the answer back where the question words are gives the sentence again.
        assert q["question"][:-1].replace(words, q["answer"], 1) in sentences
    answers = {q["answer"] for q in qs}
    assert answers & {"1842", "Father Edward Sorin", "Edward Sorin", "3,000", "Bond Hall"}


def test_spans_are_years_numbers_and_names_not_the_opening_word():
    seen: dict[str, str] = {}
    for seed in range(40):
        for q in cloze_questions(TEXT, 3, np.random.default_rng(seed)):
            seen[q["answer"]] = q["question"]
    assert "in what year by" in seen["1842"]
    assert "over how many books" in seen["3,000"]
    assert seen["Bond Hall"].startswith("Today the college, housed in what,")
    assert not {"The", "Its", "Today"} & set(seen)


def test_none_asked_for_none_given_and_seeded():
    assert cloze_questions(TEXT, 0, np.random.default_rng(0)) == []
    assert cloze_questions("No spans in here at all, just words and more words.", 3, np.random.default_rng(0)) == []
    assert cloze_questions(TEXT, 3, np.random.default_rng(5)) == cloze_questions(TEXT, 3, np.random.default_rng(5))
