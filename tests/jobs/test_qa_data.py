"""jobs/data.py task=rag_qa: SQuAD -> chat examples split by paragraph, loss on the answer only;
and a tiny rag_qa training through jobs.train."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from jobs.data import (IGNORE_INDEX, DataConfig, QASection, encode_qa, qa_examples, qa_splits, read_squad,
                       split_paragraphs)
from ops.errors import UserError
from ops.model import load_tokenizer
from ops.rag_prompt import RAG_SYSTEM_PROMPT

TOPICS = ["fox", "dog", "Python", "question", "journey", "gold", "step", "systems", "language", "miles", "quick",
          "lazy"]


def write_squad(path: Path, paragraphs: int = 12) -> Path:
    """A SQuAD v1.1-format file: paragraph i is about TOPICS[i] and has two questions."""
    paras = []
    for i in range(paragraphs):
        topic = TOPICS[i % len(TOPICS)]
        context = f"The {topic} number {i} lives in a house. The {topic} likes gold and the colour {i}."
        paras.append({"context": context, "qas": [
            {"id": f"q{i}a", "question": f"Where does the {topic} number {i} live?",
             "answers": [{"text": "in a house", "answer_start": context.index("in a house")}]},
            {"id": f"q{i}b", "question": f"Which colour does the {topic} {i} like?",
             "answers": [{"text": f"colour {i}", "answer_start": context.index(f"colour {i}")},
                         {"text": f"the colour {i}", "answer_start": context.index(f"the colour {i}")}]}]})
    path.write_text(json.dumps({"data": [{"title": "Tiny", "paragraphs": paras}]}))
    return path


@pytest.fixture()
def squad(tmp_path) -> Path:
    return write_squad(tmp_path / "tiny_squad.json")


def test_split_by_paragraph_keeps_validation_paragraphs_out_of_training(squad):
    cfg = DataConfig(data=str(squad), val_fraction=0.25)
    qa = QASection(passages=4, copies=3, questions=1)
    docs, train_q, val_q, train_ids, val_ids = qa_splits(cfg, seed=0)
    assert len(val_ids) == 3 and len(train_ids) == 9 and not set(train_ids) & set(val_ids)
    assert {q["doc_id"] for q in val_q} == set(val_ids) and {q["doc_id"] for q in train_q} == set(train_ids)
    examples = qa_examples(docs, train_q, train_ids, qa, seed=0)
    assert len(examples) == 3 * len(train_q)
    val_texts = {d["text"] for d in docs if d["id"] in set(val_ids)}
    for e in examples:
        # Neither as the gold passage nor as a distractor does a validation paragraph reach training.
        assert set(e["passage_ids"]) <= set(train_ids) and e["doc_id"] in e["passage_ids"]
        assert not any(t in e["messages"][1]["content"] for t in val_texts)
        assert 1 <= len(e["passages"]) <= 4 and len(set(e["passage_ids"])) == len(e["passage_ids"])
        assert e["messages"][0]["content"] == RAG_SYSTEM_PROMPT
    # The gold passage moves around: its position is shuffled.
    assert len({e["passage_ids"].index(e["doc_id"]) for e in examples}) > 1
    # Seeded: the same split and examples every time; another seed splits differently.
    assert split_paragraphs(docs, 0.25, 0) == (train_ids, val_ids)
    assert split_paragraphs(docs, 0.25, 1) != (train_ids, val_ids)
    assert qa_examples(docs, train_q, train_ids, qa, seed=0) == examples


def test_training_target_is_the_first_annotated_answer(squad):
    _, questions = read_squad(squad)
    q = next(q for q in questions if q["id"] == "q3b")
    assert q["answer"] == "colour 3" and q["answers"] == ["colour 3", "the colour 3"]


def test_encode_puts_loss_on_the_answer_tokens_only(squad, tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    docs, questions = read_squad(squad)
    ids = [d["id"] for d in docs]
    example = qa_examples(docs, questions[:1], ids, QASection(passages=3, hard_negatives=1.0), seed=3)[0]
    row = encode_qa(example, tok, 512)
    n = int(row["attention_mask"].sum())
    answer = row["labels"][row["labels"] != IGNORE_INDEX]
    # Left-padded: the answer ends the row, the prompt before it carries no loss.
    assert tok.decode(answer) == example["answer"] + tok.eos_token
    assert (row["labels"][-len(answer):] == answer).all() and (row["labels"][:-len(answer)] == IGNORE_INDEX).all()
    assert (row["attention_mask"][:512 - n] == 0).all() and (row["attention_mask"][512 - n:] == 1).all()
    prompt = tok.apply_chat_template(example["messages"], add_generation_prompt=True, tokenize=False)
    assert tok.decode(row["input_ids"][512 - n:-len(answer)]) == prompt  # what the serving engine feeds the model
    # Too long for block_size: distractors go first, the question's paragraph stays.
    full = n
    short = encode_qa(example, tok, full - 1)
    if len(example["passages"]) > 1:
        kept = tok.decode(short["input_ids"][short["attention_mask"] == 1])
        assert next(d["text"] for d in docs if d["id"] == example["doc_id"]) in kept
    assert encode_qa(example, tok, 8) is None


def test_answer_nll_equals_full_logits_loss(tiny_model_dir, squad):
    """Logits for the answer positions only give the same loss as the full forward."""
    import torch
    import torch.nn.functional as F

    from jobs.train import answer_nll
    from ops.model import load_model

    tok = load_tokenizer(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir), dtype="float32")
    docs, questions = read_squad(squad)
    examples = qa_examples(docs, questions[:3], [d["id"] for d in docs], QASection(passages=2), seed=0)
    rows = [encode_qa(e, tok, 400) for e in examples]
    ids, labels, mask = (torch.from_numpy(np.stack([r[k] for r in rows])) for k in ("input_ids", "labels",
                                                                                   "attention_mask"))
    with torch.no_grad():
        nll, count = answer_nll(model, ids, labels, mask)
        logits = model(input_ids=ids, attention_mask=mask).logits
        full = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="sum",
                               ignore_index=IGNORE_INDEX)
    assert int(count) == int((labels != IGNORE_INDEX).sum()) and float(nll) == pytest.approx(float(full), rel=1e-5)


def test_rag_qa_needs_a_squad_file(tiny_text_file):
    with pytest.raises(UserError, match="SQuAD"):
        qa_splits(DataConfig(data=str(tiny_text_file)))


@pytest.mark.integration
def test_rag_qa_training_lowers_answer_loss(ray_local, squad, tiny_model_dir, tmp_path):
    from cluster.config import load_config
    from jobs.train import TrainConfig, main

    cfg = load_config(TrainConfig, "configs/train_lora_smoke.yaml", [
        f"model={tiny_model_dir}", f"data={squad}", f"storage={tmp_path}", "name=qa", "task=rag_qa",
        "val_fraction=0.25", "block_size=400", "qa.passages=2", "batch_size=4", "num_workers=1", "max_steps=8",
        "eval_every=4",
        "lr=1e-2", "lora.target_modules=[q_proj,v_proj]", "max_tokens=0"])
    out = main(cfg)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["best_val_perplexity"] < metrics["initial_val_perplexity"]
    history = json.loads((out / "history.json").read_text())
    # Real tokens (padding excluded) are counted: far fewer than batch x block_size per step.
    assert all(0 < h["tokens"] / h["step"] < 4 * 400 for h in history)
    assert np.isfinite([h["loss"] for h in history]).all()


def test_several_questions_of_a_paragraph_share_one_example(squad, tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    docs, questions = read_squad(squad)
    ids = [d["id"] for d in docs]
    examples = qa_examples(docs, questions, ids, QASection(passages=3, questions=4, copies=2), seed=0)
    # Two questions per paragraph: one example per paragraph and copy, every question in each copy.
    assert len(examples) == 2 * len(docs)
    asked = sorted(t["question"] for e in examples for t in e["turns"])
    assert asked == sorted(2 * [q["question"] for q in questions])
    by_question = {q["question"]: q for q in questions}
    for e in examples:
        assert {by_question[t["question"]]["doc_id"] for t in e["turns"]} == {e["doc_id"]}
        assert (e["question"], e["answer"]) == (e["turns"][0]["question"], e["turns"][0]["answer"])
    example = examples[0]
    row = encode_qa(example, tok, 512)
    real = row["attention_mask"] == 1
    labels = row["labels"][real]
    # Every answer carries loss, each closed by EOS; nothing else does.
    answers = tok.decode(labels[labels != IGNORE_INDEX])
    assert answers == "".join(t["answer"] + tok.eos_token for t in example["turns"])
    # The first question is asked exactly as serving asks it: that prompt starts the row.
    served = tok.apply_chat_template(example["messages"], add_generation_prompt=True, tokenize=False)
    assert tok.decode(row["input_ids"][real]).startswith(served + example["turns"][0]["answer"])
    assert "Question: " + example["turns"][1]["question"] in tok.decode(row["input_ids"][real])


def test_a_long_example_loses_distractors_then_its_last_questions(squad, tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    docs, questions = read_squad(squad)
    examples = qa_examples(docs, questions, [d["id"] for d in docs], QASection(passages=3, questions=2), seed=1)
    example = next(e for e in examples if len(e["passages"]) > 1)
    full = int(encode_qa(example, tok, 1024)["attention_mask"].sum())
    alone = {**example, "passages": [p for p, i in zip(example["passages"], example["passage_ids"])
                                     if i == example["doc_id"]], "passage_ids": [example["doc_id"]]}
    from ops.rag_prompt import rag_user_message

    alone["messages"] = [example["messages"][0], {"role": "user", "content": rag_user_message(
        example["question"], alone["passages"])}]
    both_alone = int(encode_qa(alone, tok, 1024)["attention_mask"].sum())
    assert both_alone < full
    # Room for the paragraph alone with both questions: distractors go, both answers stay.
    row = encode_qa(example, tok, both_alone)
    kept = row["labels"][row["labels"] != IGNORE_INDEX]
    assert tok.decode(kept).count(tok.eos_token) == 2
    # One token less: the last question goes too, the first stays.
    row = encode_qa(example, tok, both_alone - 1)
    assert tok.decode(row["labels"][row["labels"] != IGNORE_INDEX]).count(tok.eos_token) == 1


def test_cloze_turns_follow_the_real_questions_in_training_only(squad):
    cfg = DataConfig(data=str(squad), val_fraction=0.25)
    qa = QASection(passages=2, questions=4, cloze=2)
    docs, train_q, val_q, train_ids, val_ids = qa_splits(cfg, seed=0)
    text = {d["id"]: d["text"] for d in docs}
    real = {q["question"] for q in train_q}
    for e in qa_examples(docs, train_q, train_ids, qa, seed=0):
        asked = [t["question"] for t in e["turns"]]
        n_real = sum(a in real for a in asked)
        assert n_real == 2 and set(asked[:n_real]) <= real and len(asked) > n_real
        for t in e["turns"][n_real:]:  # cloze: the paragraph's own sentence, its answer taken out
            assert t["question"].endswith("?") and t["answer"] in text[e["doc_id"]]
    for e in qa_examples(docs, val_q, val_ids, qa, seed=1, cloze=False):
        assert {t["question"] for t in e["turns"]} <= {q["question"] for q in val_q}
