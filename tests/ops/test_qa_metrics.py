"""ops/qa_metrics.py against the official SQuAD v1.1 evaluation script's behaviour."""

from __future__ import annotations

import pytest

from ops.qa_metrics import contains_gold, exact_match, f1, normalize_answer, score_answers


def test_normalisation_drops_case_punctuation_articles_and_spaces():
    assert normalize_answer("  The  Eiffel-Tower, (Paris)! ") == "eiffeltower paris"
    assert normalize_answer("An apple a day") == "apple day"
    assert normalize_answer("theatre") == "theatre"  # articles only as whole words


def test_exact_match_and_f1_values():
    assert exact_match("the CBS.", "CBS") == 1.0
    assert exact_match("CBS network", "CBS") == 0.0
    # prediction tokens {cbs, network}, gold {cbs}: precision 1/2, recall 1 -> F1 2/3
    assert f1("CBS network", "CBS") == pytest.approx(2 / 3)
    assert f1("Denver Broncos", "Carolina Panthers") == 0.0
    assert f1("a the", "the") == 0.0  # both normalise to nothing
    # bags of tokens: repeated tokens count once per occurrence on both sides
    assert f1("new new york", "new york") == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))


def test_contains_gold_is_whole_word():
    assert contains_gold("The network was CBS.", "CBS") == 1.0
    assert contains_gold("CBSN", "CBS") == 0.0
    assert contains_gold("anything", "the") == 0.0  # gold empty after normalisation


def test_score_answers_takes_the_best_gold():
    s = score_answers(["Broncos", "in 1842", "no idea"], [["Denver Broncos", "Broncos"], ["1842"], ["1900"]])
    assert s["exact_match"] == pytest.approx(1 / 3)
    assert s["f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert s["contains_gold"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        score_answers(["a"], [])
