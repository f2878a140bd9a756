"""Build a retrieval index: corpus -> chunks -> embeddings (Ray Data actor pool) -> FAISS + BM25.

    python -m jobs.index                                  # embedded stdlib docstrings -> indexes/stdlib
    python -m jobs.index data=../shared/data/squad_notre_dame.json name=notre_dame index.type=hnsw

Chunks are cut in tokens of the embedder's own tokenizer (``chunk.size``, ``chunk.overlap``), at
word boundaries where possible, and never longer than the embedder reads (so nothing is truncated).
Reads: a corpus (``stdlib``, text file/directory, .jsonl, .parquet, SQuAD .json).
Writes: ``<storage>/indexes/<name>/`` = index.faiss, bm25/, documents.parquet, manifest.json, config.yaml.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from cluster.cli import run_job
from cluster.config import BaseConfig, save_config, storage_field
from cluster.resources import free_units
from cluster.runtime import init_ray
from cluster.storage import validate_name
from ops import artifacts
from jobs.data import CorpusConfig, read_documents
from ops.errors import UserError
from ops.retrieval import (DEFAULT_EMBEDDER, RetrievalStore, chunk_documents, embed, embedder_token_limit,
                           embedder_dtype, embedding_dimension, load_embedder, resolve_embedder)

log = logging.getLogger(__name__)
DESCRIPTION = __doc__


class ChunkConfig(BaseConfig):
    size: int = Field(0, ge=0, description="chunk length in tokens of the embedder's tokenizer; 0 = the most the "
                      "embedder reads (its max sequence length less special tokens: 254 for all-MiniLM-L6-v2)")
    overlap: int = Field(32, ge=0, description="tokens shared by consecutive chunks (< chunk.size)")


class IndexTypeConfig(BaseConfig):
    type: Literal["flat", "hnsw", "ivf"] = Field("flat", description="FAISS index: flat (exact), hnsw or ivf "
                                                 "(approximate); inner product on normalised vectors")
    hnsw_m: int = Field(32, ge=4, description="HNSW neighbours per node")
    ivf_nlist: int = Field(0, ge=0, description="IVF clusters (0 = about sqrt(number of chunks))")


class IndexConfig(CorpusConfig):
    max_docs: int = Field(0, ge=0, description="index the first N documents only (0 = all)")
    name: str = Field("stdlib", description="index name: writes <storage>/indexes/<name>/")
    storage: str = storage_field()
    embedder: str = Field(DEFAULT_EMBEDDER, description="sentence-transformers model: 'all-minilm-l6-v2' (embedded) "
                          "or a local path / hub id")
    embed_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="dtype the embedder runs in; auto = bfloat16 on a CPU with native bf16 dot products "
        "(AVX512-BF16 or AMX; docs/benchmarks/retrieval.md), else float32")
    batch_size: int = Field(64, ge=1, description="chunks per map_batches call (chunks are sorted by length first, "
                            "so a batch pads little)")
    workers: int = Field(1, ge=1, description="embedding actors in the Ray Data pool")
    cpus_per_worker: int = Field(1, ge=1, description="CPUs (= torch threads) per embedding actor")
    bm25: bool = Field(True, description="also build the BM25 index (hybrid search in the Serve Retriever)")
    chunk: ChunkConfig = Field(default_factory=ChunkConfig)
    index: IndexTypeConfig = Field(default_factory=IndexTypeConfig)

    @model_validator(mode="after")
    def _check(self) -> "IndexConfig":
        if self.chunk.size and self.chunk.overlap >= self.chunk.size:
            raise ValueError(f"chunk.overlap ({self.chunk.overlap}) must be smaller than chunk.size "
                             f"({self.chunk.size})")
        validate_name(self.name)
        return self


class _Embed:
    """``map_batches`` callable: loads the embedder once per actor."""

    def __init__(self, embedder_path: str, batch_size: int, threads: int, dtype: str = "auto"):
        import torch

        # Ray sets OMP_NUM_THREADS=1 in actors; use the CPUs this actor reserved.
        torch.set_num_threads(threads)
        self.model = load_embedder(embedder_path, dtype=dtype)
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        return {"order": batch["order"], "vector": embed(self.model, list(batch["text"]), self.batch_size)}


def embed_chunks(texts: list[str], embedder: str, batch_size: int, workers: int,
                 cpus_per_worker: int = 1, dtype: str = "auto") -> np.ndarray:
    """Embed texts with Ray Data ``map_batches`` on an actor pool.

    Texts go to the pool longest first, so each batch holds texts of similar length and pads
    little (attention and matmuls run over the padded length).

    Returns:
        (N, D) float32 normalised vectors in the order of ``texts``.
    """
    import ray

    by_length = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    ds = ray.data.from_items([{"order": i, "text": texts[i]} for i in by_length])
    ds = ds.map_batches(_Embed, fn_constructor_args=(resolve_embedder(embedder), batch_size, cpus_per_worker, dtype),
                        batch_size=batch_size, compute=ray.data.ActorPoolStrategy(min_size=1, max_size=workers),
                        num_cpus=cpus_per_worker)
    rows = sorted(ds.take_all(), key=lambda r: r["order"])
    return np.stack([np.asarray(r["vector"], dtype=np.float32) for r in rows])


def chunk_size(cfg: IndexConfig, model) -> int:
    """``chunk.size`` resolved against the embedder: 0 is its limit; more than the limit is refused."""
    limit = embedder_token_limit(model)
    size = cfg.chunk.size or limit
    if size > limit:
        raise UserError(f"chunk.size={size} tokens is more than embedder '{cfg.embedder}' reads ({limit}); the rest "
                        f"would be truncated; valid: 1..{limit}, or 0 for {limit}")
    if cfg.chunk.overlap >= size:
        raise UserError(f"chunk.overlap ({cfg.chunk.overlap}) must be smaller than chunk.size ({size})")
    return size


def main(cfg: IndexConfig) -> RetrievalStore:
    t_start = time.perf_counter()
    # Load first so a bad embedder fails before Ray starts; the dimension checks the actors' output,
    # and its tokenizer cuts the chunks.
    model = load_embedder(cfg.embedder)
    dimension = embedding_dimension(model)
    size = chunk_size(cfg, model)
    docs = read_documents(cfg.data, cfg.data_format, cfg.text_field, max_docs=cfg.max_docs or None)
    t0 = time.perf_counter()
    chunks = chunk_documents(docs, size, cfg.chunk.overlap, tokenizer=model.tokenizer)
    chunk_s = time.perf_counter() - t0
    longest = max((len(model.tokenizer(c["text"], verbose=False)["input_ids"]) for c in chunks), default=0)
    del model
    print(f"[index] {len(docs)} documents -> {len(chunks)} chunks (size={size}, overlap={cfg.chunk.overlap} "
          f"tokens; longest {longest} tokens with special tokens) in {chunk_s:.1f}s", flush=True)
    init_ray()
    # A Ray Data actor that finds no free CPU waits forever: embed with the actors that fit now (the
    # vectors do not depend on how many there are), or stop naming what holds the CPUs.
    workers = free_units({"CPU": cfg.cpus_per_worker}, cfg.workers, "jobs.index",
                         f"embedding actors, workers={cfg.workers} x {cfg.cpus_per_worker} CPU")
    if workers < cfg.workers:
        print(f"[index] {workers} CPU(s) free: embedding with {workers} of workers={cfg.workers} actors", flush=True)
    t0 = time.perf_counter()
    # Resolved here, on the driver's CPU: the manifest says what the vectors were made with.
    dtype = embedder_dtype(cfg.embed_dtype)
    vectors = embed_chunks([c["text"] for c in chunks], cfg.embedder, cfg.batch_size, workers,
                           cfg.cpus_per_worker, dtype)
    embed_s = time.perf_counter() - t0
    if vectors.shape != (len(chunks), dimension):
        raise RuntimeError(f"embedding actors returned {vectors.shape}, expected {(len(chunks), dimension)}")
    store = RetrievalStore.build(chunks, vectors, embedder_name=cfg.embedder, index_type=cfg.index.type,
                                 hnsw_m=cfg.index.hnsw_m, ivf_nlist=cfg.index.ivf_nlist, bm25=cfg.bm25)
    store.manifest.update(data=cfg.data, chunk_unit="tokens", chunk_size=size, chunk_overlap=cfg.chunk.overlap,
                          chunk_max_tokens=longest, chunk_s=round(chunk_s, 3), embed_s=round(embed_s, 3),
                          chunks_per_s=round(len(chunks) / max(embed_s, 1e-9), 1),
                          embed_workers=cfg.workers, embed_cpus_per_worker=cfg.cpus_per_worker, embed_dtype=dtype,
                          build_s=round(time.perf_counter() - t_start, 3),
                          created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    with artifacts.publish(cfg.storage, artifacts.Kind.INDEXES, cfg.name) as out:
        store.save(out)
        save_config(cfg, out)
    m = store.manifest
    print("\n| documents | chunks | longest chunk (tokens) | embed s | chunks/s | embedder dtype | workers x CPUs | "
          "BM25 build s | index |\n|---|---|---|---|---|---|---|---|---|\n"
          f"| {m['num_documents']} | {m['num_chunks']} | {longest} | {embed_s:.1f} | {m['chunks_per_s']} | {dtype} | "
          f"{cfg.workers} x {cfg.cpus_per_worker} | {m['bm25_build_s'] if cfg.bm25 else '-'} | "
          f"{cfg.index.type} + {'BM25' if cfg.bm25 else 'no BM25'} |\n", flush=True)
    print(f"[index] embedded {len(chunks)} chunks in {embed_s:.1f}s ({m['chunks_per_s']} chunks/s, including actor "
          f"start); {cfg.index.type} index of {dimension}-d vectors", flush=True)
    print(f"[index] manifest: {json.dumps(m)}", flush=True)
    print(f"[index] wrote {artifacts.uri(cfg.storage, artifacts.Kind.INDEXES, cfg.name)}/", flush=True)
    return store


if __name__ == "__main__":
    run_job(main, IndexConfig, prog="jobs.index", description=DESCRIPTION)
