"""Ray-free corpus readers: a ``data=`` source -> documents ``[{"id", "text", "source", ...}]``.

Sources: ``stdlib`` (the embedded corpus, docstrings of the Python standard library), a
``.txt``/``.md`` file or a directory of them (one document per file), ``.jsonl`` (text in
``text_field``), ``.parquet`` (text in column ``text_field``), ``.json`` in SQuAD format (one
document per context paragraph). jobs/data.py turns documents into tokens and blocks with Ray Data.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from ops.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_CORPUS = "stdlib"
TEXT_SUFFIXES = (".txt", ".md", ".rst")


def detect_format(source: str, fmt: str = "auto") -> str:
    """Resolve ``auto`` to a concrete format from the path, checking the path exists."""
    if source == DEFAULT_CORPUS and fmt in ("auto", "stdlib"):
        return "stdlib"
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"data '{source}' does not exist; valid: 'stdlib' (embedded corpus) or an existing "
                        f"file/directory (.txt, .md, .jsonl, .parquet, SQuAD .json)")
    if fmt != "auto":
        return fmt
    if path.is_dir():
        return "text"
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        return "text"
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix == ".parquet":
        return "parquet"
    if suffix == ".json":
        return "squad"
    raise UserError(f"cannot tell the format of '{source}' from its suffix '{suffix}'; set data_format to one "
                    f"of text, jsonl, parquet, squad")


def read_documents(source: str, fmt: str = "auto", text_field: str = "text",
                   max_docs: int | None = None) -> list[dict[str, Any]]:
    """Read a corpus into ``[{"id", "text", "source"}]`` in source order, plus ``title`` where the
    source has one (SQuAD article titles, a JSONL ``title`` field, a Parquet ``title`` column).

    Raises:
        UserError: missing path, empty corpus, missing field/column, malformed file.
    """
    fmt = detect_format(source, fmt)
    if fmt == "stdlib":
        from ops.corpus import stdlib_documents

        docs = stdlib_documents(max_docs)
    elif fmt == "text":
        docs = _read_text(Path(source).expanduser())
    elif fmt == "jsonl":
        docs = _read_jsonl(Path(source).expanduser(), text_field)
    elif fmt == "parquet":
        docs = _read_parquet(Path(source).expanduser(), text_field)
    elif fmt == "squad":
        docs = read_squad(Path(source).expanduser())[0]
    else:
        raise UserError(f"unknown data_format '{fmt}'; valid: auto, text, jsonl, parquet, squad, stdlib")
    docs = [d for d in docs if d["text"].strip()]
    if not docs:
        raise UserError(f"data '{source}' holds no text")
    return docs[:max_docs] if max_docs else docs


def _read_text(path: Path) -> list[dict]:
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in TEXT_SUFFIXES) if path.is_dir() else [path]
    if not files:
        raise UserError(f"directory '{path}' has no {'/'.join(TEXT_SUFFIXES)} files")
    docs = []
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UserError(f"'{f}' is not UTF-8 text") from None
        docs.append({"id": str(f.relative_to(path)) if path.is_dir() else f.name, "text": text, "source": str(f)})
    return docs


def _read_jsonl(path: Path, field: str) -> list[dict]:
    docs = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"'{path}' line {lineno} is not valid JSON") from None
            if not isinstance(row, dict) or field not in row:
                keys = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise UserError(f"'{path}' line {lineno} has no field '{field}'; it has {keys} (set text_field)")
            doc = {"id": str(row.get("id", f"{path.name}:{lineno}")), "text": str(row[field]), "source": str(path)}
            if row.get("title"):
                doc["title"] = str(row["title"])
            docs.append(doc)
    return docs


def _read_parquet(path: Path, column: str) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise UserError(f"'{path}' is not a readable Parquet file ({type(exc).__name__})") from None
    if column not in schema.names:
        raise UserError(f"Parquet file '{path}' has no column '{column}'; columns: {schema.names} (set text_field)")
    cols = [column] + [c for c in ("id", "title") if c in schema.names and c != column]
    table = pq.read_table(path, columns=cols).to_pydict()
    ids = table.get("id") or [f"{path.name}:{i}" for i in range(len(table[column]))]
    titles = table.get("title") or [None] * len(ids)
    return [{"id": str(i), "text": str(t), "source": str(path), **({"title": str(h)} if h else {})}
            for i, t, h in zip(ids, table[column], titles) if t is not None]


def read_squad(path: Path) -> tuple[list[dict], list[dict]]:
    """Documents (one per context paragraph) and questions of a SQuAD v1.1-format file.

    Document id = ``<article title>:<paragraph index>``, ``title`` the article title with spaces
    (chunks are prefixed with it, see :func:`ops.retrieval.chunk_documents`); each question carries ``doc_id`` (its
    paragraph), ``answers`` (the distinct gold strings, sorted) and ``answer`` (the first annotated
    one, the training target).
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise UserError(f"'{path}' is not valid JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise UserError(f"'{path}' is not SQuAD format (expected a top-level 'data' list)")
    docs, questions = [], []
    for article in data["data"]:
        title = article.get("title", "untitled")
        for i, para in enumerate(article.get("paragraphs", [])):
            doc_id = f"{title}:{i}"
            docs.append({"id": doc_id, "text": para["context"], "source": str(path), "title": title.replace("_", " ")})
            for qa in para.get("qas", []):
                texts = [a["text"] for a in qa.get("answers", [])]
                questions.append({"id": qa.get("id"), "question": qa["question"], "doc_id": doc_id,
                                  "answers": sorted(set(texts)), "answer": texts[0] if texts else None})
    return docs, questions


def split_by_position(ids: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """First ``1 - val_fraction`` of the stream trains, the rest validates."""
    cut = int(round(len(ids) * (1.0 - val_fraction)))
    return ids[:cut], ids[cut:]


def split_paragraphs(docs: list[dict], val_fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """Paragraph ids for training and for validation: a seeded shuffle, ``val_fraction`` held out.

    Returns:
        ``(train_ids, val_ids)``, disjoint, each in source order; at least one of each when there
        are two or more paragraphs.
    """
    ids = [d["id"] for d in docs]
    if len(ids) < 2:
        raise UserError(f"task=rag_qa needs at least 2 paragraphs to split, got {len(ids)}")
    order = np.random.default_rng(seed).permutation(len(ids))
    n_val = min(len(ids) - 1, max(1, int(round(len(ids) * val_fraction))))
    val = set(order[:n_val].tolist())
    return [i for k, i in enumerate(ids) if k not in val], [i for k, i in enumerate(ids) if k in val]


def held_out_ids(docs: list[dict], tokenize: Any, val_fraction: float, max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """``(train tokens, the first max_tokens of the validation tokens)`` of a corpus cut by position.

    Args:
        docs: documents in source order.
        tokenize: ``docs -> 1-D token ids`` (``jobs.data.token_stream`` with its tokenizer).
        val_fraction: the tail share the training held out.
        max_tokens: validation tokens kept (0 = all).

    Raises:
        UserError: a validation split with fewer than 16 tokens, too few to measure.
    """
    train, val = split_by_position(tokenize(docs), val_fraction)
    if len(val) < 16:
        raise UserError(f"the held-out split has {len(val)} tokens; valid: more data or a larger val_fraction")
    return train, val[: max_tokens or None].copy()
