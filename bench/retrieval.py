"""Retrieval benchmark: quality on SQuAD Notre Dame + WikiText-2 distractors, and FAISS scale.

    python bench/retrieval.py [--squad ../shared/data/squad_notre_dame.json] \
        [--wikitext ../shared/data/wikitext2_valid.txt] [--sizes 10000 100000]

Quality: every SQuAD paragraph and every WikiText-2 paragraph (split on blank lines and
`= heading =` lines, >= 200 characters) is a document, chunked like `jobs.index` (1000/100
characters) and embedded with the embedded all-MiniLM-L6-v2; each question's relevant document is
its paragraph. Reports recall@1, recall@5 and MRR@10 for flat and HNSW, and embedding throughput.
Scale: synthetic random unit vectors (384-d, like MiniLM) - build throughput and single-query
search latency p50/p99 of flat vs HNSW, plus HNSW recall@10 against flat (exact).
Writes docs/benchmarks/retrieval.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ops.datasets import read_squad  # noqa: E402
from ops.retrieval import RetrievalStore, build_index, chunk_documents, embed, load_embedder  # noqa: E402

OUT = REPO / "docs" / "benchmarks"


def wikitext_paragraphs(path: Path, min_chars: int = 200) -> list[dict]:
    """WikiText-2 paragraphs: blocks between blank lines, headings (`= x =`) dropped."""
    paras = []
    for block in re.split(r"\n\s*\n", path.read_text(encoding="utf-8")):
        text = " ".join(line.strip() for line in block.splitlines() if not re.match(r"^\s*=.*=\s*$", line)).strip()
        if len(text) >= min_chars:
            paras.append({"id": f"wikitext:{len(paras)}", "text": text, "source": str(path)})
    return paras


def rank_metrics(ranked: list[list[str]], gold: list[str]) -> dict:
    ranks = [r.index(g) + 1 if g in r else None for r, g in zip(ranked, gold)]
    return {"recall@1": float(np.mean([r == 1 for r in ranks])),
            "recall@5": float(np.mean([r is not None and r <= 5 for r in ranks])),
            "mrr@10": float(np.mean([1.0 / r if r is not None and r <= 10 else 0.0 for r in ranks]))}


def doc_ranking(hits: list, k: int = 10) -> list[str]:
    """Distinct document ids in hit order (several chunks of one document count once)."""
    seen: list[str] = []
    for h in hits:
        if h.doc_id not in seen:
            seen.append(h.doc_id)
    return seen[:k]


def quality(squad: Path, wikitext: Path) -> dict:
    docs, questions = read_squad(squad)
    distractors = wikitext_paragraphs(wikitext)
    chunks = chunk_documents(docs + distractors, 1000, 100)
    model = load_embedder()
    t0 = time.perf_counter()
    vectors = embed(model, [c["text"] for c in chunks])
    embed_s = time.perf_counter() - t0
    qvec = embed(model, [q["question"] for q in questions])
    gold = [q["doc_id"] for q in questions]
    result = {"documents": len(docs) + len(distractors), "squad_paragraphs": len(docs),
              "wikitext_distractors": len(distractors), "chunks": len(chunks), "questions": len(questions),
              "embed_s": embed_s, "embed_chunks_per_s": len(chunks) / embed_s,
              "embed_docs_per_s": (len(docs) + len(distractors)) / embed_s}
    for index_type in ("flat", "hnsw"):
        store = RetrievalStore.build(chunks, vectors, embedder_name="all-minilm-l6-v2", index_type=index_type)
        hits = store.search(qvec, 30)
        result[index_type] = rank_metrics([doc_ranking(h) for h in hits], gold)
    return result


def scale(sizes: list[int], dim: int = 384, queries: int = 300) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for n in sizes:
        base = rng.standard_normal((n, dim)).astype(np.float32)
        base /= np.linalg.norm(base, axis=1, keepdims=True)
        q = rng.standard_normal((queries, dim)).astype(np.float32)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        exact = None
        for index_type in ("flat", "hnsw"):
            t0 = time.perf_counter()
            index = build_index(base, index_type)
            build_s = time.perf_counter() - t0
            lat = []
            found = []
            for i in range(queries):
                t = time.perf_counter()
                _, ids = index.search(q[i:i + 1], 10)
                lat.append(time.perf_counter() - t)
                found.append(ids[0])
            found = np.array(found)
            if index_type == "flat":
                exact = found
            recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, exact)]))
            rows.append({"vectors": n, "index": index_type, "build_s": build_s, "build_vectors_per_s": n / build_s,
                         "search_p50_ms": 1e3 * float(np.percentile(lat, 50)),
                         "search_p99_ms": 1e3 * float(np.percentile(lat, 99)), "recall@10_vs_flat": recall})
            print(f"[bench.retrieval] {rows[-1]}", flush=True)
    return rows


def write(report: dict) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "retrieval.json").write_text(json.dumps(report, indent=2))
    q = report.get("quality")
    lines = ["# Retrieval benchmark", "", f"Generated by `python bench/retrieval.py` on {report['machine']}, "
             f"{report['date']}. Embedder: embedded all-MiniLM-L6-v2 (384-d), cosine (inner product on "
             f"normalised vectors), chunks of 1000 characters with 100 overlap.", ""]
    if q:
        lines += ["## Quality: SQuAD Notre Dame + WikiText-2 distractors", "",
                  f"{q['squad_paragraphs']} SQuAD paragraphs + {q['wikitext_distractors']} WikiText-2 paragraphs "
                  f"= {q['documents']} documents ({q['chunks']} chunks); {q['questions']} questions, relevant "
                  f"document = the question's paragraph (goal: recall@5 >= 0.9).", "",
                  "| index | recall@1 | recall@5 | MRR@10 |", "|---|---|---|---|"]
        for t in ("flat", "hnsw"):
            lines.append(f"| {t} | {q[t]['recall@1']:.3f} | {q[t]['recall@5']:.3f} | {q[t]['mrr@10']:.3f} |")
        lines += ["", f"Embedding throughput (in-process, 1 process): {q['embed_docs_per_s']:.1f} docs/s, "
                  f"{q['embed_chunks_per_s']:.1f} chunks/s ({q['chunks']} chunks in {q['embed_s']:.1f} s).", ""]
    else:
        lines += ["Quality part skipped: shared data files absent.", ""]
    lines += ["## Scale: flat vs HNSW on synthetic vectors", "",
              "Synthetic random unit vectors (384-d), not real embeddings; 300 single-vector queries, k=10. "
              "HNSW: M=32, efSearch=64. Recall@10 is measured against flat (exact) search; random vectors are the "
              "hardest case for HNSW, real embeddings cluster and score higher.", "",
              "| vectors | index | build s | build vectors/s | search p50 ms | search p99 ms | recall@10 vs flat |",
              "|---|---|---|---|---|---|---|"]
    for r in report["scale"]:
        lines.append(f"| {r['vectors']} | {r['index']} | {r['build_s']:.2f} | {r['build_vectors_per_s']:.0f} | "
                     f"{r['search_p50_ms']:.3f} | {r['search_p99_ms']:.3f} | {r['recall@10_vs_flat']:.3f} |")
    lines += ["", f"Machine: {report['machine']}, {report['cpus']} CPUs shared with other jobs, so absolute times "
              "are noisy; compare rows within this file.", ""]
    (OUT / "retrieval.md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--squad", type=Path, default=REPO.parent / "shared" / "data" / "squad_notre_dame.json")
    parser.add_argument("--wikitext", type=Path, default=REPO.parent / "shared" / "data" / "wikitext2_valid.txt")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    args = parser.parse_args()
    import os

    report = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "cpus": os.cpu_count(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if args.squad.is_file() and args.wikitext.is_file():
        report["quality"] = quality(args.squad, args.wikitext)
        print(f"[bench.retrieval] quality: {json.dumps(report['quality'])}", flush=True)
    else:
        print(f"[bench.retrieval] {args.squad} or {args.wikitext} absent: quality part skipped", flush=True)
    report["scale"] = scale(args.sizes)
    write(report)
    print(f"[bench.retrieval] wrote {OUT / 'retrieval.md'}", flush=True)


if __name__ == "__main__":
    main()
