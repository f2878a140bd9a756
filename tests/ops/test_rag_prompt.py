"""ops/rag_prompt.py: the prompt shared by RAG fine-tuning and serving, and computed citations."""

from __future__ import annotations

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


def test_citations_are_the_passages_holding_the_answer():
    passages = ["The game was broadcast by CBS in the U.S.", "CBSN streamed it.", "Fox had the year before."]
    assert cited_passages("the CBS.", passages) == [0]
    assert cited_passages("Fox", passages) == [2]
    assert cited_passages("NBC", passages) == []
    assert cited_passages("  ", passages) == []
