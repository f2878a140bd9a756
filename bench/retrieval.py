"""Retrieval benchmark: quality on SQuAD Notre Dame + WikiText-2 distractors, and FAISS scale.

    python bench/retrieval.py [--squad ../shared/data/squad_notre_dame.json] \
        [--wikitext ../shared/data/wikitext2_valid.txt] [--sizes 10000 100000]

Quality: every SQuAD paragraph and every WikiText-2 paragraph (split on blank lines and
`= heading =` lines, >= 200 characters) is a document, chunked like `jobs.index` (token chunks,
titles prefixed) and embedded with the embedded all-MiniLM-L6-v2 in float32 (the baseline) and in
bfloat16; each question's relevant document is its paragraph. Reports recall@1, recall@5 and
MRR@10 for flat, HNSW and hybrid (flat + BM25), and each dtype's embedding throughput.
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
from ops.retrieval import (RetrievalStore, build_index, chunk_documents, embed, embedder_dtype,  # noqa: E402
                           embedder_token_limit, load_embedder)

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
    """Recall of flat / HNSW / hybrid on jobs.index's chunks, with the embedder in float32 (the
    baseline) and in bfloat16, each embedding timed in this process (torch's default threads)."""
    import torch

    docs, questions = read_squad(squad)
    distractors = wikitext_paragraphs(wikitext)
    gold = [q["doc_id"] for q in questions]
    queries = [q["question"] for q in questions]
    result = {"documents": len(docs) + len(distractors), "squad_paragraphs": len(docs),
              "wikitext_distractors": len(distractors), "questions": len(questions),
              "threads": torch.get_num_threads(), "auto_dtype": embedder_dtype("auto"), "dtypes": {}}
    vectors_of = {}
    for dtype in ("float32", "bfloat16"):
        model = load_embedder(dtype=dtype)
        # what jobs.index builds: token chunks of the embedder's limit, 32 overlap, titles prefixed
        chunks = chunk_documents(docs + distractors, embedder_token_limit(model), 32, tokenizer=model.tokenizer)
        texts = [c["text"] for c in chunks]
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))  # longest first, as jobs.index batches
        t0 = time.perf_counter()
        ordered = embed(model, [texts[i] for i in order])
        embed_s = time.perf_counter() - t0
        vectors = np.empty_like(ordered)
        vectors[order] = ordered
        vectors_of[dtype] = vectors
        row = {"chunks": len(chunks), "embed_s": embed_s, "embed_chunks_per_s": len(chunks) / embed_s}
        for label, index_type, mode in (("flat", "flat", "dense"), ("hnsw", "hnsw", "dense"),
                                        ("hybrid", "flat", "hybrid")):
            store = RetrievalStore.build(chunks, vectors, embedder_name="all-minilm-l6-v2", index_type=index_type,
                                         embedder=model, bm25=mode == "hybrid")
            row[label] = rank_metrics([doc_ranking(h) for h in store.search_text(queries, 30, mode=mode)], gold)
        result["dtypes"][dtype] = row
        print(f"[bench.retrieval] {dtype}: {json.dumps(row)}", flush=True)
    a, b = vectors_of["float32"], vectors_of["bfloat16"]
    result["min_cosine_bf16_vs_fp32"] = float(((a * b).sum(1) / np.linalg.norm(b, axis=1)).min())
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
             f"normalised vectors).", ""]
    if q:
        rows = q["dtypes"]
        lines += ["## Quality and embedding speed: SQuAD Notre Dame + WikiText-2 distractors", "",
                  f"{q['squad_paragraphs']} SQuAD paragraphs + {q['wikitext_distractors']} WikiText-2 paragraphs "
                  f"= {q['documents']} documents, chunked as `jobs.index` does (token chunks of the embedder's "
                  f"limit, 32 overlap, titles prefixed: {rows['float32']['chunks']} chunks); {q['questions']} "
                  f"questions, relevant document = the question's paragraph. The embedder in float32 (the "
                  f"baseline) and in bfloat16, each embedding every chunk in this process on {q['threads']} "
                  f"threads; `embed_dtype: auto` resolves to **{q['auto_dtype']}** on this machine.", "",
                  "| embedder dtype | chunks/s | flat recall@1 | flat recall@5 | flat MRR@10 | hnsw recall@5 | "
                  "hybrid recall@1 | hybrid recall@5 | hybrid MRR@10 |", "|---|---|---|---|---|---|---|---|---|"]
        for dtype, r in rows.items():
            lines.append(f"| {dtype} | {r['embed_chunks_per_s']:.1f} | {r['flat']['recall@1']:.3f} | "
                         f"{r['flat']['recall@5']:.3f} | {r['flat']['mrr@10']:.3f} | {r['hnsw']['recall@5']:.3f} | "
                         f"{r['hybrid']['recall@1']:.3f} | {r['hybrid']['recall@5']:.3f} | "
                         f"{r['hybrid']['mrr@10']:.3f} |")
        speedup = rows["bfloat16"]["embed_chunks_per_s"] / rows["float32"]["embed_chunks_per_s"]
        lines += ["", f"bfloat16 embeds {speedup:.2f}x the chunks/s of float32; the two vector sets agree to a "
                  f"cosine of at least {q['min_cosine_bf16_vs_fp32']:.5f}.", ""]
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
