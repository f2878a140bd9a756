"""ops/retrieval.py: chunking, flat/hnsw/ivf build + search, add, save/load roundtrip."""

from __future__ import annotations

import numpy as np
import pytest

from ops.errors import UserError
from ops.retrieval import RetrievalStore, build_index, chunk_documents, chunk_text, embed, load_embedder


def unit_vectors(n: int, d: int = 32, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def docs(n: int) -> list[dict]:
    return [{"id": f"d{i}#0", "text": f"text {i}", "source": "s", "metadata": {"doc_id": f"d{i}"}} for i in range(n)]


def test_chunk_text_respects_size_and_overlap():
    text = " ".join(f"word{i}" for i in range(400))
    chunks = chunk_text(text, 100, 20)
    assert all(len(c) <= 100 for _, c in chunks)
    assert chunks[0][0] == 0 and "".join(c for _, c in chunks).count("word399") >= 1
    for (s1, c1), (s2, _) in zip(chunks, chunks[1:]):
        assert s1 < s2 <= s1 + len(c1)  # consecutive windows overlap or touch, never skip text
    assert chunk_text("short", 100, 10) == [(0, "short")]


def test_chunk_rejects_overlap_not_below_size():
    with pytest.raises(UserError, match="overlap"):
        chunk_text("abc", 10, 10)


def test_chunk_documents_ids_and_metadata():
    rows = chunk_documents([{"id": "a", "text": "x " * 300, "source": "f"}], 200, 20)
    assert [r["id"] for r in rows][:2] == ["a#0", "a#1"]
    assert rows[1]["metadata"]["doc_id"] == "a" and rows[1]["metadata"]["chunk"] == 1


@pytest.mark.parametrize("index_type", ["flat", "hnsw", "ivf"])
def test_each_index_type_finds_the_query_vector_itself(index_type):
    vectors = unit_vectors(500)
    store = RetrievalStore.build(docs(500), vectors, embedder_name="x", index_type=index_type)
    hits = store.search(vectors[[3, 250, 499]], k=5)
    assert [h[0].id for h in hits] == ["d3#0", "d250#0", "d499#0"]
    assert hits[0][0].score == pytest.approx(1.0, abs=1e-4)
    assert hits[0][0].doc_id == "d3"
    assert all(len(h) == 5 for h in hits) and hits[0][0].score >= hits[0][1].score


def test_unknown_index_type_names_valid_ones():
    with pytest.raises(UserError, match="flat, hnsw, ivf"):
        build_index(unit_vectors(4), "lsh")


@pytest.mark.parametrize("index_type", ["flat", "hnsw", "ivf"])
def test_add_then_save_load_roundtrip(tmp_path, index_type):
    vectors = unit_vectors(300)
    store = RetrievalStore.build(docs(200), vectors[:200], embedder_name="x", index_type=index_type)
    store.add(docs(300)[200:], vectors[200:])
    assert len(store) == 300 and store.manifest["num_chunks"] == 300
    store.save(tmp_path / "idx")
    loaded = RetrievalStore.load(tmp_path / "idx", embedder=False)
    assert loaded.manifest["index_type"] == index_type and loaded.documents[250]["metadata"] == {"doc_id": "d250"}
    assert [h[0].id for h in loaded.search(vectors[[10, 280]], 3)] == ["d10#0", "d280#0"]


def test_k_larger_than_store_and_dimension_mismatch():
    store = RetrievalStore.build(docs(3), unit_vectors(3), embedder_name="x")
    assert len(store.search(unit_vectors(1), 10)[0]) == 3
    with pytest.raises(UserError, match="dimension"):
        store.search(unit_vectors(1, d=8), 2)
    with pytest.raises(UserError, match="k must be"):
        store.search(unit_vectors(1), 0)


def test_load_missing_directory_says_how_to_build(tmp_path):
    with pytest.raises(UserError, match="jobs.index"):
        RetrievalStore.load(tmp_path / "nope")


def test_embedded_embedder_text_search(tmp_path):
    model = load_embedder()
    texts = ["The cat sat on the mat.", "Paris is the capital of France.", "Python lists are mutable sequences."]
    rows = [{"id": f"t{i}", "text": t, "source": "s", "metadata": {}} for i, t in enumerate(texts)]
    store = RetrievalStore.build(rows, embed(model, texts), embedder_name="all-minilm-l6-v2", embedder=model)
    assert store.dimension == 384
    assert store.search_text(["What is France's capital city?"], 1)[0][0].id == "t1"
    store.add_text([{"id": "t3", "text": "Mount Everest is the highest mountain.", "source": "s", "metadata": {}}])
    assert store.search_text(["highest mountain on earth"], 1)[0][0].id == "t3"


def test_embedder_dtype_auto_is_bfloat16_only_with_native_bf16(monkeypatch):
    import torch

    from ops.errors import UserError
    from ops.retrieval import embedder_dtype

    for avx512_bf16, amx, expected in ((True, False, "bfloat16"), (False, True, "bfloat16"), (False, False, "float32")):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert embedder_dtype("auto") == expected
        assert embedder_dtype("auto", device="cuda") == "float32"
        assert embedder_dtype("float32") == "float32" and embedder_dtype("bfloat16") == "bfloat16"
    with pytest.raises(UserError, match="unknown embedder dtype 'fp8'; valid: auto, float32, bfloat16"):
        embedder_dtype("fp8")


def test_bfloat16_embedder_matches_float32_vectors_and_ranking():
    import torch

    texts = ["The cat sat on the mat.", "Paris is the capital of France.", "Python lists are mutable sequences.",
             "Photosynthesis turns light into chemical energy."]
    fp32, bf16 = load_embedder(dtype="float32"), load_embedder(dtype="bfloat16")
    assert next(bf16.parameters()).dtype == torch.bfloat16 and next(fp32.parameters()).dtype == torch.float32
    a, b = embed(fp32, texts), embed(bf16, texts)
    assert b.dtype == np.float32 and np.allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-3)
    assert ((a * b).sum(1) > 0.999).all()
    q = embed(bf16, ["Which city is France's capital?", "how do plants use light"])
    assert list((q @ b.T).argmax(1)) == list((q @ a.T).argmax(1)) == [1, 3]
