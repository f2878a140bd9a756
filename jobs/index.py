"""Build a retrieval index: corpus -> chunks -> embeddings (Ray Data actor pool) -> FAISS.

    python -m jobs.index                                  # embedded stdlib docstrings -> indexes/stdlib
    python -m jobs.index data=../shared/data/squad_notre_dame.json name=notre_dame index.type=hnsw

Chunks are cut in characters (``chunk.size``, ``chunk.overlap``), at whitespace where possible.
Reads: a corpus (``stdlib``, text file/directory, .jsonl, .parquet, SQuAD .json).
Writes: ``<storage>/indexes/<name>/`` = index.faiss, documents.parquet, manifest.json, config.yaml.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from cluster.cli import run_job
from cluster.config import BaseConfig, save_config
from cluster.resources import free_units
from cluster.runtime import init_ray
from cluster.storage import local_storage_root, validate_name, writable_artifact
from jobs.data import CorpusConfig, read_documents
from ops.retrieval import (DEFAULT_EMBEDDER, RetrievalStore, chunk_documents, embed, embedding_dimension, load_embedder,
                           resolve_embedder)

log = logging.getLogger(__name__)
DESCRIPTION = __doc__


class ChunkConfig(BaseConfig):
    size: int = Field(1000, ge=16, description="chunk length in characters")
    overlap: int = Field(100, ge=0, description="characters shared by consecutive chunks (< chunk.size)")


class IndexTypeConfig(BaseConfig):
    type: Literal["flat", "hnsw", "ivf"] = Field("flat", description="FAISS index: flat (exact), hnsw or ivf "
                                                 "(approximate); inner product on normalised vectors")
    hnsw_m: int = Field(32, ge=4, description="HNSW neighbours per node")
    ivf_nlist: int = Field(0, ge=0, description="IVF clusters (0 = about sqrt(number of chunks))")


class IndexConfig(CorpusConfig):
    max_docs: int = Field(0, ge=0, description="index the first N documents only (0 = all)")
    name: str = Field("stdlib", description="index name: writes <storage>/indexes/<name>/")
    storage: str = Field("./artifacts", description="artifact root: local path or URI")
    embedder: str = Field(DEFAULT_EMBEDDER, description="sentence-transformers model: 'all-minilm-l6-v2' (embedded) "
                          "or a local path / hub id")
    batch_size: int = Field(64, ge=1, description="chunks per map_batches call")
    workers: int = Field(1, ge=1, description="embedding actors in the Ray Data pool (1 CPU each)")
    chunk: ChunkConfig = Field(default_factory=ChunkConfig)
    index: IndexTypeConfig = Field(default_factory=IndexTypeConfig)

    @model_validator(mode="after")
    def _check(self) -> "IndexConfig":
        if self.chunk.overlap >= self.chunk.size:
            raise ValueError(f"chunk.overlap ({self.chunk.overlap}) must be smaller than chunk.size "
                             f"({self.chunk.size})")
        validate_name(self.name)
        return self


class _Embed:
    """``map_batches`` callable: loads the embedder once per actor."""

    def __init__(self, embedder_path: str, batch_size: int):
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(embedder_path, device="cpu")
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        return {"order": batch["order"], "vector": embed(self.model, list(batch["text"]), self.batch_size)}


def embed_chunks(texts: list[str], embedder: str, batch_size: int, workers: int) -> np.ndarray:
    """Embed texts with Ray Data ``map_batches`` on an actor pool.

    Returns:
        (N, D) float32 normalised vectors in the order of ``texts``.
    """
    import ray

    ds = ray.data.from_items([{"order": i, "text": t} for i, t in enumerate(texts)])
    ds = ds.map_batches(_Embed, fn_constructor_args=(resolve_embedder(embedder), batch_size),
                        batch_size=batch_size, compute=ray.data.ActorPoolStrategy(min_size=1, max_size=workers),
                        num_cpus=1)
    rows = sorted(ds.take_all(), key=lambda r: r["order"])
    return np.stack([np.asarray(r["vector"], dtype=np.float32) for r in rows])


def main(cfg: IndexConfig) -> RetrievalStore:
    t_start = time.perf_counter()
    # Load first so a bad embedder fails before Ray starts; the dimension checks the actors' output.
    dimension = embedding_dimension(load_embedder(cfg.embedder))
    docs = read_documents(cfg.data, cfg.data_format, cfg.text_field, max_docs=cfg.max_docs or None)
    chunks = chunk_documents(docs, cfg.chunk.size, cfg.chunk.overlap)
    print(f"[index] {len(docs)} documents -> {len(chunks)} chunks (size={cfg.chunk.size}, "
          f"overlap={cfg.chunk.overlap} characters)", flush=True)
    init_ray()
    # A Ray Data actor that finds no free CPU waits forever: embed with the actors that fit now (the
    # vectors do not depend on how many there are), or stop naming what holds the CPUs.
    workers = free_units({"CPU": 1}, cfg.workers, "jobs.index", f"embedding actors, workers={cfg.workers} x 1 CPU")
    if workers < cfg.workers:
        print(f"[index] {workers} CPU(s) free: embedding with {workers} of workers={cfg.workers} actors", flush=True)
    t0 = time.perf_counter()
    vectors = embed_chunks([c["text"] for c in chunks], cfg.embedder, cfg.batch_size, workers)
    embed_s = time.perf_counter() - t0
    if vectors.shape != (len(chunks), dimension):
        raise RuntimeError(f"embedding actors returned {vectors.shape}, expected {(len(chunks), dimension)}")
    store = RetrievalStore.build(chunks, vectors, embedder_name=cfg.embedder, index_type=cfg.index.type,
                                 hnsw_m=cfg.index.hnsw_m, ivf_nlist=cfg.index.ivf_nlist)
    store.manifest.update(data=cfg.data, chunk_unit="characters", chunk_size=cfg.chunk.size,
                          chunk_overlap=cfg.chunk.overlap, embed_s=round(embed_s, 3),
                          chunks_per_s=round(len(chunks) / max(embed_s, 1e-9), 1),
                          build_s=round(time.perf_counter() - t_start, 3),
                          created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    with writable_artifact(cfg.storage, "indexes", cfg.name) as out:
        store.save(out)
        save_config(cfg, out)
    print(f"[index] embedded {len(chunks)} chunks in {embed_s:.1f}s ({store.manifest['chunks_per_s']} chunks/s); "
          f"{cfg.index.type} index of {dimension}-d vectors", flush=True)
    print(f"[index] manifest: {json.dumps(store.manifest)}", flush=True)
    print(f"[index] wrote {local_storage_root(cfg.storage)}/indexes/{cfg.name}/", flush=True)
    return store


if __name__ == "__main__":
    run_job(main, IndexConfig, prog="jobs.index", description=DESCRIPTION)
