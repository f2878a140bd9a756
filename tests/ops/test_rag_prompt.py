"""ops/rag_prompt.py: the prompt shared by RAG fine-tuning and serving, and computed citations."""

from __future__ import annotations

import pytest

from ops.rag_prompt import RAG_SYSTEM_PROMPT, cited_passages, rag_messages, rag_user_message


def test_prompt_asks_the_question_before_and_after_the_numbered_passages():
    user = rag_user_message("Who won?", ["Alpha text.", "Beta text."])
    assert user.startswith("Question: Who won?\n\nPassages:\n[1] Alpha text.\n\n[2] Beta text.\n\nQuestion: Who won?\n")
    assert "shortest phrase" in user
    assert rag_user_message("Who won?", []).startswith("Question: Who won?")
    messages = rag_messages("Who won?", ["Alpha text."])
    assert messages[0] == {"role": "system", "content": RAG_SYSTEM_PROMPT} and messages[1]["role"] == "user"


def test_budget_trims_passages():
    count = lambda messages: sum(len(m["content"]) for m in messages) // 4  # noqa: E731
    messages = rag_messages("why?", ["x" * 4000, "y" * 4000], "sys", count, budget=500)
    assert count(messages) <= 500 and "[2] y" in messages[1]["content"]


def test_budget_holds_when_the_fixed_part_is_most_of_it():
    # A char-level count: system prompt + question twice take ~80% of the budget, the passages the rest.
    count = lambda messages: sum(len(m["content"]) for m in messages)  # noqa: E731
    question = "Which of the five passages names the person who founded the university, and in which year? " * 2
    fixed = count(rag_messages(question, ["", "", ""], RAG_SYSTEM_PROMPT))
    budget = fixed + 120
    messages = rag_messages(question, ["a b " * 300, "c d " * 300, "e f " * 300], RAG_SYSTEM_PROMPT, count, budget)
    assert count(messages) <= budget
    assert "[3] e f" in messages[1]["content"]  # every passage kept, each trimmed


def test_budget_drops_passages_when_not_even_their_numbers_fit():
    count = lambda messages: sum(len(m["content"]) for m in messages)  # noqa: E731
    bare = count(rag_messages("q?", [], "sys"))
    messages = rag_messages("q?", ["long passage " * 50] * 5, "sys", count, budget=bare + 5)
    assert count(messages) <= bare + 5 and "Passages" not in messages[1]["content"]


def test_citations_are_the_passages_holding_the_answer():
    passages = ["The game was broadcast by CBS in the U.S.", "CBSN streamed it.", "Fox had the year before."]
    assert cited_passages("the CBS.", passages) == [0]
    assert cited_passages("Fox", passages) == [2]
    assert cited_passages("NBC", passages) == []
    assert cited_passages("  ", passages) == []


def test_passages_trained_on_reads_a_rag_qa_training_config(tmp_path):
    from ops.rag_prompt import passages_trained_on

    assert passages_trained_on(None) is None and passages_trained_on(tmp_path) is None  # no config saved
    config = tmp_path / "config.yaml"
    config.write_text("task: rag_qa\nqa:\n  passages: 3\n  questions: 8\n")
    assert passages_trained_on(tmp_path) == 3
    config.write_text("task: lm\nqa:\n  passages: 3\n")  # trained on plain text: the qa section means nothing
    assert passages_trained_on(tmp_path) is None
    config.write_text("task: rag_qa\nqa:\n  passages: zero\n")
    with pytest.raises(ValueError, match="qa.passages must be a positive integer"):
        passages_trained_on(tmp_path)
