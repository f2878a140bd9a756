"""jobs/index.py through the real entrypoint: a small corpus end to end, and bad input."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli, run_module

ENV = {"OMP_NUM_THREADS": "1"}


@pytest.mark.subprocess
@pytest.mark.integration
def test_index_job_builds_a_searchable_index(ray_head, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    rows = [{"id": f"r{i}", "text": t} for i, t in enumerate([
        "The Eiffel Tower is a wrought-iron lattice tower in Paris. " * 3,
        "Photosynthesis converts light energy into chemical energy in plants. " * 3,
        "A binary search halves the search interval at every step. " * 3])]
    corpus.write_text("\n".join(json.dumps(r) for r in rows))
    proc = run_module("jobs.index", f"data={corpus}", "name=small", f"storage={tmp_path}", "chunk.size=24",
                      "chunk.overlap=4", "index.type=hnsw", env=ENV, timeout=400, head=ray_head)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = tmp_path / "indexes" / "small"
    assert {p.name for p in out.iterdir()} == {"index.faiss", "bm25", "documents.parquet", "manifest.json",
                                               "config.yaml"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["embedder"] == "all-minilm-l6-v2" and manifest["dimension"] == 384
    assert manifest["metric"] == "inner_product" and manifest["index_type"] == "hnsw"
    assert manifest["num_documents"] == 3 and manifest["num_chunks"] > 3 and manifest["build_s"] > 0
    assert manifest["format"] == 2 and manifest["retrieval"] == "hybrid" and manifest["chunk_unit"] == "tokens"
    assert manifest["chunk_size"] == 24 and manifest["chunk_max_tokens"] <= 24 + 2 and manifest["chunks_per_s"] > 0
    assert "| chunks/s |" in proc.stdout
    from ops.retrieval import embedder_dtype

    assert manifest["embed_dtype"] == embedder_dtype("auto")  # this CPU decides (bfloat16 needs native bf16)

    from ops.retrieval import RetrievalStore

    store = RetrievalStore.load(out)
    assert store.search_text(["how do plants make energy from light"], 1)[0][0].doc_id == "r1"
    assert store.search_text(["wrought-iron lattice"], 1, mode="bm25")[0][0].doc_id == "r0"


@pytest.mark.parametrize("args, message", [
    (["index.type=lsh"], "index.type"),
    (["chunk.size=100", "chunk.overlap=100"], "chunk.overlap"),
    (["data=/nonexistent/corpus.jsonl"], "does not exist"),
    (["chunk.sizee=10"], "unknown config key"),
    (["chunk.size=300"], "more than embedder 'all-minilm-l6-v2' reads (254)"),
])
def test_index_job_bad_input_is_one_line_exit_2(tmp_path, args, message):
    proc = run_cli("jobs.index", f"storage={tmp_path}", *args)
    assert proc.returncode == 2, proc.stderr[-1000:]
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and message in error_lines[0] and "Traceback" not in proc.stderr


def test_index_job_help_lists_every_key():
    proc = run_cli("jobs.index", "--help")
    assert proc.returncode == 0
    for key in ("chunk.size", "chunk.overlap", "index.type", "embedder", "data", "name", "storage", "bm25",
                "cpus_per_worker"):
        assert key in proc.stdout
