"""ops/retrieval.py, hybrid part: token-aware chunks, BM25, reciprocal rank fusion, reranking,
index format 2 on disk and loading format-1 (dense-only) indexes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ops.errors import UserError
from ops.retrieval import (BM25_DIR, INDEX_FORMAT, MANIFEST_FILE, BM25Index, RetrievalStore, chunk_documents,
                           chunk_text_tokens, embed, embedder_token_limit, load_embedder, reciprocal_rank_fusion)


@pytest.fixture(scope="module")
def embedder():
    return load_embedder()


def rows(texts: list[str]) -> list[dict]:
    return [{"id": f"d{i}#0", "text": t, "source": "s", "metadata": {"doc_id": f"d{i}"}} for i, t in enumerate(texts)]


def test_token_chunks_never_exceed_the_embedder_limit(embedder):
    tok = embedder.tokenizer
    limit = embedder_token_limit(embedder)
    assert limit == embedder.max_seq_length - 2 == 254  # MiniLM: 256 positions less [CLS] and [SEP]
    # Long words that split into many word pieces, digits and punctuation: worst cases for a cut.
    text = " ".join(f"Antidisestablishmentarianism{i}, électroencéphalographie; x{i * 7919}!" for i in range(300))
    chunks = chunk_text_tokens(text, tok, limit, 32)
    counts = [len(tok(c, add_special_tokens=False)["input_ids"]) for _, c in chunks]
    assert len(chunks) > 5 and max(counts) <= limit
    # The full-length encoding with special tokens fits the model: nothing is truncated.
    assert max(len(tok(c)["input_ids"]) for _, c in chunks) <= embedder.max_seq_length
    for (s1, c1), (s2, _) in zip(chunks, chunks[1:]):
        assert s1 < s2 <= s1 + len(c1)  # windows overlap, never skip text
    assert chunks[-1][1].endswith(text.strip()[-10:])


def test_token_chunks_cut_at_words_and_short_text_is_one_chunk(embedder):
    tok = embedder.tokenizer
    text = " ".join(f"word{i}" for i in range(500))
    chunks = chunk_text_tokens(text, tok, 40, 8)
    assert all(c.split()[0] in text.split() and c.split()[-1] in text.split() for _, c in chunks)
    assert chunk_text_tokens("A short text.", tok, 40, 8) == [(0, "A short text.")]
    with pytest.raises(UserError, match="overlap"):
        chunk_text_tokens("abc", tok, 10, 10)
    docs = chunk_documents([{"id": "a", "text": text, "source": "f"}], 40, 8, tokenizer=tok)
    assert docs[1]["id"] == "a#1" and docs[1]["metadata"]["start"] == text.index(docs[1]["text"])


def test_titled_chunks_carry_the_title_within_the_limit(embedder):
    tok = embedder.tokenizer
    text = " ".join(f"word{i}" for i in range(500))
    rows = chunk_documents([{"id": "a", "text": text, "source": "f", "title": "Some Article"}], 40, 8, tokenizer=tok)
    assert len(rows) > 3 and all(r["text"].startswith("Some Article: word") for r in rows)
    assert max(len(tok(r["text"], add_special_tokens=False)["input_ids"]) for r in rows) <= 40
    assert rows[0]["metadata"]["title"] == "Some Article" and rows[1]["metadata"]["start"] == text.index(
        rows[1]["text"].removeprefix("Some Article: "))
    # A title that would take most of a chunk stays in the metadata only.
    long = chunk_documents([{"id": "b", "text": text, "source": "f", "title": "x " * 30}], 40, 8, tokenizer=tok)
    assert long[0]["text"].startswith("word0") and long[0]["metadata"]["title"] == "x " * 30


def test_rrf_sums_reciprocal_ranks():
    fused = reciprocal_rank_fusion([[3, 1, 2], [1, 4]], k=60)
    assert [r for r, _ in fused] == [1, 3, 4, 2]
    assert dict(fused)[1] == pytest.approx(1 / 62 + 1 / 61)
    assert dict(fused)[4] == pytest.approx(1 / 62)


def test_bm25_stems_and_skips_unknown_words():
    bm25 = BM25Index.build(["The dogs were running in the park.", "Cats sleep all day.", "A park bench."])
    hits = bm25.search(["running dog", "zzzyzx the", "park"], k=5)
    assert hits[0][0][0] == 0 and len(hits[0]) == 1  # stemmed: running -> run, dogs -> dog
    assert hits[1] == []  # a stop word and a word no document has
    assert {r for r, _ in hits[2]} == {0, 2}


RARE_TERM_DOCS = [
    "Valve maintenance: the pressure valve on the cooling loop regulates coolant flow and must be checked monthly.",
    "The valve that regulates water pressure in the heating system should be inspected every year.",
    "Pressure regulators keep the flow of gas steady; a faulty regulator causes pressure to spike.",
    "Component QX-7741 is listed in the spare parts catalogue under section twelve.",
    "Flow control valves adjust the rate of fluid moving through a pipe by changing the opening.",
]


def test_hybrid_finds_a_rare_exact_term_that_dense_misses(embedder):
    store = RetrievalStore.build(rows(RARE_TERM_DOCS), embed(embedder, RARE_TERM_DOCS), embedder_name="x",
                                 embedder=embedder)
    query = ["Which valve regulates pressure, QX-7741?"]
    dense = [h.id for h in store.search_text(query, 3, mode="dense")[0]]
    assert "d3#0" not in dense  # the embedding follows "valve regulates pressure", not the part number
    assert store.search_text(query, 1, mode="bm25")[0][0].id == "d3#0"
    hybrid = [h.id for h in store.search_text(query, 3, mode="hybrid")[0]]
    assert "d3#0" in hybrid and store.default_mode == "hybrid"
    with pytest.raises(UserError, match="hybrid, dense, bm25"):
        store.search_text(query, 3, mode="sparse")


def test_format_2_roundtrip_and_format_1_loads_dense_only(tmp_path, embedder, caplog):
    store = RetrievalStore.build(rows(RARE_TERM_DOCS[:3]), embed(embedder, RARE_TERM_DOCS[:3]), embedder_name="x")
    extra = rows(RARE_TERM_DOCS)[3:]
    store.add(extra, embed(embedder, [d["text"] for d in extra]))
    store.save(tmp_path / "idx")
    manifest = json.loads((tmp_path / "idx" / MANIFEST_FILE).read_text())
    assert manifest["format"] == INDEX_FORMAT and manifest["retrieval"] == "hybrid"
    loaded = RetrievalStore.load(tmp_path / "idx", embedder=False)
    assert loaded.bm25 is not None and loaded.bm25.search(["QX-7741"], 1)[0][0][0] == 3

    # An index written before format 2: no bm25/ directory and no "format" key.
    import shutil

    shutil.rmtree(tmp_path / "idx" / BM25_DIR)
    del manifest["format"], manifest["retrieval"]
    (tmp_path / "idx" / MANIFEST_FILE).write_text(json.dumps(manifest))
    old = RetrievalStore.load(tmp_path / "idx", embedder=False)
    assert old.bm25 is None and old.default_mode == "dense" and old.manifest["retrieval"] == "dense"
    assert "no BM25 part" in caplog.text
    old.embedder = embedder
    assert old.search_text(["spare parts catalogue"], 1, mode="hybrid")[0][0].id == "d3#0"  # falls back to dense
    with pytest.raises(UserError, match="rebuild"):
        old.search_text(["x"], 1, mode="bm25")


def test_cross_encoder_reranks_candidates(tmp_path, embedder):
    """A tiny random cross-encoder: the returned order must be its score order, not the fused one."""
    import torch
    from sentence_transformers import CrossEncoder
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=embedder.tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=64, num_labels=1)
    BertForSequenceClassification(config).save_pretrained(tmp_path / "ce")
    embedder.tokenizer.save_pretrained(tmp_path / "ce")
    store = RetrievalStore.build(rows(RARE_TERM_DOCS), embed(embedder, RARE_TERM_DOCS),
                                 embedder_name="all-minilm-l6-v2")
    store.save(tmp_path / "idx")
    reranked = RetrievalStore.load(tmp_path / "idx", reranker=str(tmp_path / "ce"))
    query = "Which valve regulates pressure?"
    hits = reranked.search_text([query], 3)[0]
    scores = CrossEncoder(str(tmp_path / "ce")).predict([(query, t) for t in RARE_TERM_DOCS])
    assert [h.id for h in hits] == [f"d{i}#0" for i in np.argsort(-scores)[:3]]
    assert hits[0].score == pytest.approx(float(scores.max()), abs=1e-5)
    with pytest.raises(UserError, match="reranker"):
        RetrievalStore.load(tmp_path / "idx", embedder=False, reranker=str(tmp_path / "missing"))
