import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from jobs.data import (block_datasets, DataConfig, pack_blocks, read_documents, read_squad, split_by_position,
                       text_pieces, token_stream)
from ops.errors import UserError
from ops.model import load_tokenizer
from tests.conftest import shared_file


def test_formats(tmp_path):
    (tmp_path / "a.txt").write_text("alpha text")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.md").write_text("doc x")
    (tmp_path / "d" / "y.txt").write_text("doc y")
    (tmp_path / "r.jsonl").write_text(json.dumps({"body": "one"}) + "\n\n" + json.dumps({"body": "two"}) + "\n")
    pq.write_table(pa.table({"content": ["p1", "p2", None]}), tmp_path / "t.parquet")
    assert [d["text"] for d in read_documents(str(tmp_path / "a.txt"))] == ["alpha text"]
    assert [d["id"] for d in read_documents(str(tmp_path / "d"))] == ["x.md", "y.txt"]
    assert [d["text"] for d in read_documents(str(tmp_path / "r.jsonl"), text_field="body")] == ["one", "two"]
    assert [d["text"] for d in read_documents(str(tmp_path / "t.parquet"), text_field="content")] == ["p1", "p2"]


def test_stdlib_corpus_is_deterministic():
    a = read_documents("stdlib", max_docs=50)
    assert a == read_documents("stdlib", max_docs=50)
    assert len(a) == 50 and all(d["text"] and d["id"] for d in a)


@pytest.mark.parametrize("setup, fragment", [
    (lambda p: str(p / "missing.txt"), "does not exist"),
    (lambda p: (p / "empty.txt").write_text("  \n") and str(p / "empty.txt"), "holds no text"),
    (lambda p: (p / "bad.jsonl").write_text('{"x": 1}\n') and str(p / "bad.jsonl"), "has no field 'text'"),
    (lambda p: (pq.write_table(pa.table({"body": ["a"]}), p / "b.parquet"), str(p / "b.parquet"))[1],
     "has no column 'text'; columns: ['body']"),
    (lambda p: (p / "x.csv").write_text("a,b") and str(p / "x.csv"), "cannot tell the format"),
])
def test_bad_sources(tmp_path, setup, fragment):
    with pytest.raises(UserError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        read_documents(setup(tmp_path))


def test_val_fraction_validated():
    with pytest.raises(ValidationError, match=r"val_fraction must be in \(0, 1\), got 1.5"):
        DataConfig(val_fraction=1.5)


def test_split_and_pack():
    ids = np.arange(100)
    train, val = split_by_position(ids, 0.1)
    assert train.tolist() == list(range(90)) and val.tolist() == list(range(90, 100))
    blocks = pack_blocks(train, 16)
    assert blocks.shape == (5, 16) and blocks[1, 0] == 16
    with pytest.raises(UserError, match="make no block"):
        pack_blocks(val, 16)


def test_pieces_cut_at_line_ends_and_keep_all_text():
    docs = [{"text": "line %d\n" % i * 3} for i in range(5000)]
    pieces = text_pieces(docs, "<eos>")
    assert len(pieces) > 1 and all(p.endswith("\n") for p in pieces[:-1])
    assert "".join(pieces) == "<eos>".join(d["text"] for d in docs)


@pytest.mark.integration
def test_token_stream_through_ray_data_equals_direct_tokenization(ray_local, tiny_model_dir, tiny_text_file):
    tok = load_tokenizer(str(tiny_model_dir))
    docs = read_documents(str(tiny_text_file)) * 3
    ids = token_stream(docs, tok)
    direct = tok(tok.eos_token.join(d["text"] for d in docs), add_special_tokens=False)["input_ids"]
    assert ids.tolist() == direct
    assert token_stream(docs, tok, max_tokens=50).tolist() == direct[:50]


@pytest.mark.integration
def test_block_datasets(ray_local, tiny_model_dir, tiny_text_file):
    tok = load_tokenizer(str(tiny_model_dir))
    train, val = block_datasets(DataConfig(data=str(tiny_text_file)), tok, block_size=32)
    rows = train.take_all()
    assert rows and all(np.asarray(r["input_ids"]).shape == (32,) for r in rows)
    assert val.count() >= 1


def test_squad_reader():
    docs, questions = read_squad(shared_file("squad_notre_dame.json"))
    assert len(docs) == 55 and len(questions) == 269
    assert docs[0]["id"] == "University_of_Notre_Dame:0" and docs[0]["title"] == "University of Notre Dame"
    assert all(q["answers"] for q in questions)
