"""The one data path: sources -> documents -> tokens (Ray Data ``map_batches``) -> blocks.

Sources (``data=``):

* ``stdlib``: the embedded default corpus, docstrings of the Python standard library;
* a ``.txt``/``.md`` file or a directory of them (one document per file);
* ``.jsonl`` (one JSON object per line, text in ``text_field``);
* ``.parquet`` (text in column ``text_field``);
* ``.json`` in SQuAD format (one document per context paragraph).

Tasks (``task=``):

* ``lm``: language modelling. The token stream (documents in source order, separated by the
  tokenizer's EOS token) is cut by position: the first ``1 - val_fraction`` of tokens train, the
  last ``val_fraction`` validate. Deterministic, and no validation text leaks into training.
* ``rag_qa``: retrieval-augmented QA from a SQuAD-format file. Paragraphs are split (seeded)
  into training and validation paragraphs; each question becomes a chat example whose user turn
  holds numbered passages (its own paragraph plus distractor paragraphs of the same split, half
  of them the BM25-closest ones, in shuffled positions) and whose assistant turn is the short
  gold answer; the loss covers the answer tokens only. The prompt is ``ops.rag_prompt``'s, the
  one the Serve app asks with. No validation paragraph appears in any training example.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import AfterValidator, Field, field_validator

from cluster.config import BaseConfig
from cluster.storage import launch_path
from ops.datasets import (DEFAULT_CORPUS, detect_format, read_documents, read_squad, split_by_position,
                          split_paragraphs)
from ops.errors import UserError

log = logging.getLogger(__name__)

# Text is tokenized in pieces of about this many characters so Ray Data can spread the work.
CHUNK_CHARS = 64_000
Format = Literal["auto", "text", "jsonl", "parquet", "squad", "stdlib"]
Task = Literal["lm", "rag_qa"]
# Label of tokens that carry no loss (prompt and padding), as in Hugging Face models.
IGNORE_INDEX = -100


# A corpus given on the command line: relative paths resolve against the launch directory.
CorpusSpec = Annotated[str, AfterValidator(lambda v: v if v == DEFAULT_CORPUS else launch_path(v))]


class CorpusConfig(BaseConfig):
    """Where text comes from (shared by every job that reads a corpus)."""

    data: CorpusSpec = Field(DEFAULT_CORPUS, description="corpus: 'stdlib' (embedded stdlib docstrings), a text file or "
                      "directory, .jsonl, .parquet or SQuAD .json")
    data_format: Format = Field("auto", description="how to read `data`; auto = by suffix")
    text_field: str = Field("text", description="JSONL field / Parquet column holding the text")


class QASection(BaseConfig):
    """How ``task=rag_qa`` turns SQuAD questions into chat examples."""

    passages: int = Field(5, ge=1, le=20, description="most passages per example: the question's paragraph plus "
                          "distractors; each example draws 1..passages, and /v1/rag answers with the adapter read "
                          "at most this many of the retrieved passages")
    hard_negatives: float = Field(0.5, ge=0.0, le=1.0, description="fraction of distractors that are the BM25-closest "
                                  "other paragraphs of the split (the rest are random ones)")
    copies: int = Field(1, ge=1, le=16, description="examples per question, each with its own distractors and order")
    questions: int = Field(8, ge=1, le=32, description="most questions of one paragraph per example, asked one after "
                           "another in one chat over the same passages, every answer carrying loss: the passages "
                           "are most of an example's tokens, so each question after the first costs a few tokens "
                           "instead of a whole example")
    cloze: int = Field(0, ge=0, le=32, description="training only: cloze questions per example made from its "
                       "paragraph's own sentences (a number, year or name turned into a question word: "
                       "jobs/cloze.py), asked after the real ones; validation keeps the real questions only")


class DataConfig(CorpusConfig):
    """Where text comes from and how it is split for training and evaluation."""

    val_fraction: float = Field(0.1, description="held out for validation: the last fraction of the token stream "
                                "(lm), or that fraction of the paragraphs (rag_qa)")

    @field_validator("val_fraction")
    @classmethod
    def _fraction(cls, v: float) -> float:
        if not 0.0 < v < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {v}")
        return v


def text_pieces(docs: list[dict], separator: str) -> list[str]:
    """Join documents with ``separator`` and cut the result into ~CHUNK_CHARS pieces at line ends.

    Cutting only after a newline keeps tokenization of the pieces equal to tokenizing the whole
    text for byte-level BPE tokenizers, whose pre-tokenizer never merges across a newline.
    """
    pieces: list[str] = []
    current: list[str] = []
    size = 0
    for i, doc in enumerate(docs):
        text = doc["text"] + (separator if i < len(docs) - 1 else "")
        for line in text.splitlines(keepends=True):
            current.append(line)
            size += len(line)
            if size >= CHUNK_CHARS and line.endswith("\n"):
                pieces.append("".join(current))
                current, size = [], 0
    if current:
        pieces.append("".join(current))
    return pieces


class _Tokenize:
    """``map_batches`` callable: loads the tokenizer once per worker."""

    def __init__(self, tokenizer_path: str):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        encoded = self.tokenizer(list(batch["text"]), add_special_tokens=False)["input_ids"]
        return {"order": batch["order"], "ids": [np.asarray(e, dtype=np.int64) for e in encoded]}


def tokenizer_dir(tokenizer) -> str:
    """A directory the tokenizer can be re-loaded from on any worker of this node."""
    path = getattr(tokenizer, "name_or_path", "")
    if not Path(path).is_dir():
        raise UserError(f"tokenizer '{path}' is not a local directory; load it with ops.model.load_tokenizer")
    return path


def token_stream(docs: list[dict], tokenizer, max_tokens: int | None = None) -> np.ndarray:
    """Tokenize documents in order with Ray Data ``map_batches`` and concatenate the ids.

    Args:
        docs: documents from :func:`read_documents`.
        tokenizer: a HF tokenizer loaded from a local directory.
        max_tokens: keep only the first ``max_tokens`` tokens (None or 0: all).

    Returns:
        (N,) int64 token ids; documents separated by the EOS token.
    """
    import ray

    separator = tokenizer.eos_token or "\n\n"
    pieces = text_pieces(docs, separator)
    if max_tokens:
        # ~1 token per 2 characters at worst: stop reading pieces well past what is needed.
        budget, kept = 0, []
        for p in pieces:
            kept.append(p)
            budget += len(p)
            if budget > 8 * max_tokens:
                break
        pieces = kept
    ds = ray.data.from_items([{"order": i, "text": p} for i, p in enumerate(pieces)])
    ds = ds.map_batches(_Tokenize, fn_constructor_args=(tokenizer_dir(tokenizer),), batch_size=4,
                        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=2), num_cpus=1)
    rows = sorted(ds.take_all(), key=lambda r: r["order"])
    ids = np.concatenate([np.asarray(r["ids"], dtype=np.int64) for r in rows]) if rows else np.zeros(0, np.int64)
    if max_tokens:
        ids = ids[:max_tokens]
    log.info("tokenized %d documents into %d tokens (%d pieces)", len(docs), ids.size, len(pieces))
    return ids


def pack_blocks(ids: np.ndarray, block_size: int) -> np.ndarray:
    """Cut a token stream into (N, block_size) blocks, dropping the tail shorter than a block."""
    n = len(ids) // block_size
    if n == 0:
        raise UserError(f"{len(ids)} tokens make no block of block_size={block_size}; use more data or a "
                        f"smaller block_size")
    return ids[: n * block_size].reshape(n, block_size)


def block_datasets(cfg: DataConfig, tokenizer, block_size: int, max_tokens: int | None = None):
    """Ray Datasets of ``{"input_ids": (block_size,)}`` rows for training and validation."""
    import ray

    ids = token_stream(read_documents(cfg.data, cfg.data_format, cfg.text_field), tokenizer, max_tokens)
    train_ids, val_ids = split_by_position(ids, cfg.val_fraction)
    train, val = pack_blocks(train_ids, block_size), pack_blocks(val_ids, block_size)
    log.info("data: %d train blocks, %d validation blocks of %d tokens", len(train), len(val), block_size)
    to_ds = lambda blocks: ray.data.from_items([{"input_ids": b} for b in blocks])  # noqa: E731
    return to_ds(train), to_ds(val)


# ---------------------------------------------------------------------------------------------
# task=rag_qa: SQuAD questions -> chat examples with retrieved-style passages
# ---------------------------------------------------------------------------------------------

def passage_text(doc: dict) -> str:
    """A paragraph as the index stores and serves it: prefixed with its title when it has one."""
    from ops.retrieval import titled

    return titled(doc.get("title"), doc["text"])


def qa_examples(docs: list[dict], questions: list[dict], doc_ids: list[str], qa: QASection,
                seed: int = 0, cloze: bool = True) -> list[dict]:
    """Chat examples for the questions of paragraphs ``doc_ids``; distractors come from ``doc_ids`` only.

    A paragraph's questions are shuffled and grouped by up to ``qa.questions``; each group makes
    ``qa.copies`` examples with their own distractors and passage order. The first question of an
    example is asked exactly as serving asks it; the others follow in the same chat, then (with
    ``cloze``) ``qa.cloze`` cloze questions of the paragraph, drawn anew for every example.

    Returns:
        ``[{"messages": [system, user], "answer", "question", "turns", "doc_id", "passages", "passage_ids"}]``
        where ``question``/``answer`` are the first turn's and ``turns`` is every
        ``{"question", "answer"}`` of the example, first included.
    """
    from jobs.cloze import cloze_questions
    from ops.rag_prompt import RAG_SYSTEM_PROMPT, rag_user_message
    from ops.retrieval import BM25Index

    rng = np.random.default_rng(seed)
    split = [d for d in docs if d["id"] in set(doc_ids)]
    position = {d["id"]: i for i, d in enumerate(split)}
    bm25 = BM25Index.build([d["text"] for d in split]) if len(split) > 1 else None
    by_paragraph: dict[str, list[dict]] = {}
    for q in questions:
        if q["doc_id"] in position and q.get("answer"):
            by_paragraph.setdefault(q["doc_id"], []).append(q)
    groups = []
    for doc_id, qs in by_paragraph.items():
        if qa.questions > 1:
            qs = [qs[i] for i in rng.permutation(len(qs))]
        groups += [qs[i:i + qa.questions] for i in range(0, len(qs), qa.questions)]
    examples = []
    for group in groups:
        gold = position[group[0]["doc_id"]]
        others = [i for i in range(len(split)) if i != gold]
        query = " ".join(q["question"] for q in group)
        close = [r for r, _ in bm25.search([query], qa.passages + 1)[0] if r != gold] if bm25 else []
        for _ in range(qa.copies):
            n = min(int(rng.integers(1, qa.passages + 1)) - 1, len(others))
            n_hard = min(int(round(n * qa.hard_negatives)), len(close))
            chosen = close[:n_hard]
            rest = [i for i in others if i not in chosen]
            chosen += rng.choice(rest, size=n - n_hard, replace=False).tolist() if n > n_hard else []
            rows = [gold] + chosen
            rng.shuffle(rows)
            passages = [passage_text(split[i]) for i in rows]
            first = group[0]
            turns = [{"question": q["question"], "answer": q["answer"]} for q in group]
            if cloze:
                turns += cloze_questions(split[gold]["text"], qa.cloze, rng)
            examples.append({"messages": [{"role": "system", "content": RAG_SYSTEM_PROMPT},
                                          {"role": "user", "content": rag_user_message(first["question"], passages)}],
                             "answer": first["answer"], "question": first["question"],
                             "turns": turns,
                             "doc_id": first["doc_id"], "passages": passages,
                             "passage_ids": [split[i]["id"] for i in rows]})
    return examples


def _chat_tokens(example: dict, messages: list[dict], tokenizer) -> tuple[list[int], list[int]]:
    """Token ids of the example's chat and, per token, the label (``IGNORE_INDEX`` except answer tokens).

    Each follow-up turn is what the chat template renders after the previous answer; a template
    whose rendering of a longer chat does not extend the shorter one's tokens stops at that turn.
    """
    from ops.rag_prompt import rag_follow_up

    eos = tokenizer.eos_token or ""
    chat = [dict(m) for m in messages]
    ids: list[int] = []
    labels: list[int] = []
    for k, turn in enumerate(example.get("turns") or [{"question": example["question"], "answer": example["answer"]}]):
        if k:
            chat += [{"role": "assistant", "content": example["turns"][k - 1]["answer"]},
                     {"role": "user", "content": rag_follow_up(turn["question"])}]
        prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if prompt_ids[:len(ids)] != ids:
            break
        answer_ids = tokenizer(turn["answer"] + eos, add_special_tokens=False)["input_ids"]
        new = prompt_ids[len(ids):]
        ids += new + answer_ids
        labels += [IGNORE_INDEX] * len(new) + answer_ids
    return ids, labels


def encode_qa(example: dict, tokenizer, block_size: int) -> dict[str, np.ndarray] | None:
    """Token ids and labels of one chat example, left-padded to ``block_size``; loss on the answer only.

    Left padding puts every row's answers at its end, so training computes logits for the
    positions from the first answer on only (the vocabulary projection of a whole 1k-token row is a fifth of the
    forward pass and most of its memory). RoPE attention depends on relative positions only, so
    the shift does not change what the model computes for the real tokens.

    The prompt is rendered as the serving engine renders it (chat template with the generation
    prompt, then tokenized without special tokens), so training sees the served token sequence.
    With several ``turns``, each question after the first follows the previous answer in the same
    chat and every answer carries loss. Distractor passages are dropped from the end until the
    example fits, then its last questions; None when not even the first fits.

    Returns:
        ``{"input_ids", "labels", "attention_mask"}``, each (block_size,) int64.
    """
    from ops.rag_prompt import rag_user_message

    messages = [dict(m) for m in example["messages"]]
    passages = list(zip(example["passage_ids"], example["passages"]))
    turns = list(example.get("turns") or [])
    while True:
        ids, labels = _chat_tokens({**example, "turns": turns}, messages, tokenizer)
        if len(ids) <= block_size:
            break
        if len(passages) <= 1:
            if len(turns) <= 1:
                return None
            turns = turns[:-1]  # the question's own paragraph alone is too long for all its questions
            continue
        # Drop the last distractor (never the question's own paragraph).
        drop = max(i for i, (pid, _) in enumerate(passages) if pid != example["doc_id"])
        passages = passages[:drop] + passages[drop + 1:]
        messages[-1]["content"] = rag_user_message(example["question"], [t for _, t in passages])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    start = block_size - len(ids)
    out = {"input_ids": np.full(block_size, pad, np.int64), "labels": np.full(block_size, IGNORE_INDEX, np.int64),
           "attention_mask": np.zeros(block_size, np.int64)}
    out["input_ids"][start:] = ids
    out["labels"][start:] = labels
    out["attention_mask"][start:] = 1
    return out


def qa_splits(cfg: DataConfig, seed: int = 0) -> tuple[list[dict], list[dict], list[dict], list[str], list[str]]:
    """Documents, training and validation questions and paragraph ids of a ``task=rag_qa`` corpus."""
    if detect_format(cfg.data, cfg.data_format) != "squad":
        raise UserError(f"task=rag_qa reads a SQuAD-format .json (data_format=squad); '{cfg.data}' is not one")
    docs, questions = read_squad(Path(cfg.data).expanduser())
    train_ids, val_ids = split_paragraphs(docs, cfg.val_fraction, seed)
    train_set, val_set = set(train_ids), set(val_ids)
    return (docs, [q for q in questions if q["doc_id"] in train_set], [q for q in questions if q["doc_id"] in val_set],
            train_ids, val_ids)


def qa_datasets(cfg: DataConfig, qa: QASection, tokenizer, block_size: int, seed: int = 0):
    """Ray Datasets of ``{"input_ids", "labels", "attention_mask"}`` rows for training and validation."""
    import ray

    docs, train_q, val_q, train_ids, val_ids = qa_splits(cfg, seed)
    sets = []
    for name, qs, ids, s in (("train", train_q, train_ids, seed), ("validation", val_q, val_ids, seed + 1)):
        examples = qa_examples(docs, qs, ids, qa, seed=s, cloze=name == "train")
        rows = [r for r in (encode_qa(e, tokenizer, block_size) for e in examples) if r is not None]
        if not rows:
            raise UserError(f"no {name} QA example fits block_size={block_size} tokens; raise block_size")
        log.info("rag_qa %s: %d paragraphs, %d questions, %d examples (%d longer than block_size dropped)",
                 name, len(ids), len(qs), len(rows), len(examples) - len(rows))
        sets.append(ray.data.from_items(rows))
    return sets[0], sets[1]
