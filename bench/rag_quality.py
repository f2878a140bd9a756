"""RAG quality benchmark: retrieval (dense vs BM25 vs hybrid) and answers (base vs RAG-tuned) through /v1/rag.

    python bench/rag_quality.py --tuned artifacts/quantized/rag-weight_only_int8 \
        [--squad ../shared/data/squad_notre_dame.json] [--wikitext ../shared/data/wikitext2_valid.txt]

Corpus: every SQuAD paragraph + 500 WikiText-2 paragraphs as distractors. Questions: those of the
held-out paragraphs of the same paragraph split ``task=rag_qa`` trains with (``val_fraction``,
seed 0), so a model fine-tuned by ``configs/rag_lora.yaml`` on this file never saw them.

Retrieval (in-process, the Serve Retriever's code): recall@1, recall@5, MRR@10 by document for
the earlier baseline (dense on 1000-character chunks, some longer than MiniLM reads) and for
token-aware chunks, without and with the document title prefixed (what ``jobs.index`` builds),
searched dense, BM25 and hybrid; embedding throughput of each chunking.
Answers (through ``/v1/rag`` of a local Serve app, top_k 5, max_tokens 24, temperature 0): exact
match, F1, contains-gold (SQuAD normalisation), recall@5 of the sources and p50 latency, for the
base model and the tuned one (``--tuned``: a quantized/adapter artifact or model dir), with the
endpoint's default decoding (extractive, ``ops.extractive``, beam search; the model reads as many of
the 5 passages as it was fine-tuned on, and ranks its answers by their support, ``support_weight``)
and, for the tuned model, extractive greedy (``beams: 1``), the beam's most likely answer
(``support_weight: 0``), the beam reading all 5 (``read_k: 5``) and free generation.
Writes docs/benchmarks/rag_quality.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.retrieval import doc_ranking, rank_metrics, wikitext_paragraphs  # noqa: E402
from ops.datasets import read_squad, split_paragraphs  # noqa: E402
from ops.qa_metrics import score_answers  # noqa: E402
from ops.retrieval import (RetrievalStore, chunk_documents, embed, embedder_token_limit,  # noqa: E402
                           load_embedder)
from serve.schemas import DEFAULT_RAG_BEAMS  # noqa: E402

OUT = REPO / "docs" / "benchmarks"
TOP_K, MAX_TOKENS = 5, 24


CACHE: Path | None = None


def embed_timed(model, texts: list[str]) -> tuple[np.ndarray, float]:
    """Vectors and chunks/s; with ``--cache``, vectors and rate of identical texts are reused."""
    import hashlib

    key = hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:16]
    if CACHE is not None and (CACHE / f"{key}.npz").is_file():
        hit = np.load(CACHE / f"{key}.npz")
        return hit["vectors"], float(hit["rate"])
    t0 = time.perf_counter()
    vectors = embed(model, texts)
    rate = len(texts) / (time.perf_counter() - t0)
    if CACHE is not None:
        CACHE.mkdir(parents=True, exist_ok=True)
        np.savez(CACHE / f"{key}.npz", vectors=vectors, rate=rate)
    return vectors, rate


def retrieval(docs: list[dict], questions: list[dict], model) -> tuple[dict, dict, list[dict], np.ndarray]:
    """Rank metrics of the baseline and of dense/BM25/hybrid on token chunks."""
    result: dict = {}
    gold = [q["doc_id"] for q in questions]
    queries = [q["question"] for q in questions]
    limit = embedder_token_limit(model)

    untitled = [{k: v for k, v in d.items() if k != "title"} for d in docs]
    char_chunks = chunk_documents(untitled, 1000, 100)
    lengths = [len(model.tokenizer(c["text"], verbose=False)["input_ids"]) for c in char_chunks]
    vectors, rate = embed_timed(model, [c["text"] for c in char_chunks])
    base = RetrievalStore.build(char_chunks, vectors, embedder_name="all-minilm-l6-v2", embedder=model, bm25=False)
    result["baseline dense, 1000-char chunks"] = {
        **rank_metrics([doc_ranking(h) for h in base.search_text(queries, 30, mode="dense")], gold),
        "chunks": len(char_chunks), "truncated_chunks": sum(n > model.max_seq_length for n in lengths),
        "chunks_per_s": rate}
    print(f"[bench.rag_quality] baseline: {result['baseline dense, 1000-char chunks']}", flush=True)

    # Token chunks without and with the title prefix (what jobs.index builds), to show each step.
    for with_title in (False, True):
        token_chunks = chunk_documents(docs if with_title else untitled, limit, 32, tokenizer=model.tokenizer)
        vectors, rate = embed_timed(model, [c["text"] for c in token_chunks])
        store = RetrievalStore.build(token_chunks, vectors, embedder_name="all-minilm-l6-v2", embedder=model)
        for mode in ("dense", "bm25", "hybrid"):
            t0 = time.perf_counter()
            hits = store.search_text(queries, 30, mode=mode)
            label = f"{mode}, {limit}-token chunks{', titled' if with_title else ''}"
            result[label] = {**rank_metrics([doc_ranking(h) for h in hits], gold), "chunks": len(token_chunks),
                             "truncated_chunks": 0, "chunks_per_s": rate,
                             "search_ms_per_query": 1e3 * (time.perf_counter() - t0) / len(queries)}
            print(f"[bench.rag_quality] {label}: {result[label]}", flush=True)
    return result, store.manifest, token_chunks, vectors


def ask_all(url: str, questions: list[dict], extractive: bool, beams: int | None = None,
            read_k: int | None = None, support_weight: float | None = None) -> dict:
    answers, latencies, found, found_read, read, weights = [], [], 0, 0, set(), set()
    for q in questions:
        body = json.dumps({"question": q["question"], "top_k": TOP_K, "max_tokens": MAX_TOKENS,
                           "temperature": 0.0, "extractive": extractive,
                           **({"beams": beams} if beams is not None else {}),
                           **({"read_k": read_k} if read_k is not None else {}),
                           **({"support_weight": support_weight} if support_weight is not None else {})}).encode()
        request = urllib.request.Request(f"{url}/v1/rag", data=body, headers={"Content-Type": "application/json"})
        t0 = time.perf_counter()
        with urllib.request.urlopen(request, timeout=300) as resp:
            out = json.loads(resp.read())
        latencies.append(time.perf_counter() - t0)
        answers.append(out["answer"].strip())
        docs = [s["doc_id"] for s in out["sources"]]
        found += q["doc_id"] in docs
        found_read += q["doc_id"] in docs[:out["read_k"]]
        read.add(out["read_k"])
        weights.add(out["support_weight"])
    scores = score_answers(answers, [q["answers"] for q in questions])
    return {**scores, "recall@5": found / len(questions), "p50_s": float(np.percentile(latencies, 50)),
            "read_k": sorted(read), "recall_read": found_read / len(questions), "support_weight": sorted(weights),
            "answers": [{"question": q["question"], "gold": q["answers"], "answer": a}
                        for q, a in zip(questions, answers)]}


def answers(storage: Path, models: dict[str, str], questions: list[dict], port: int) -> dict:
    """Deploy the RAG app once per model on the index in ``storage`` and ask every question, with
    the default decoding (extractive, beam search) and, for the tuned model, also extractive greedy
    and free generation."""
    import ray
    from ray import serve

    from serve.app import build_app

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    rows = {}
    try:
        for label, model in models.items():
            serve.run(build_app({"storage": str(storage), "model": model, "index": "bench", "model_id": "m"}),
                      name="rag", route_prefix="/")
            variants = {"extractive, beam search (default)": (True, None, None, None)}
            if label != "base":  # read_k None: as many passages as the model was fine-tuned to read
                variants = {"free generation": (False, None, None, None),
                            "extractive, greedy (beams 1)": (True, 1, None, None),
                            "extractive, beam search, the most likely answer (support_weight 0)": (True, None, None, 0.0),
                            f"extractive, beam search, reading all {TOP_K} passages (read_k {TOP_K})":
                                (True, None, TOP_K, None), **variants}
            for name, (extractive, beams, read_k, weight) in variants.items():
                row = f"{label}, {name}"
                rows[row] = ask_all(f"http://127.0.0.1:{port}", questions, extractive, beams, read_k, weight)
                print(f"[bench.rag_quality] {row}: " + json.dumps({k: v for k, v in rows[row].items()
                                                                  if k != "answers"}), flush=True)
            serve.delete("rag")
    finally:
        serve.shutdown()
        ray.shutdown()
    return rows


def write(report: dict) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "rag_quality.json").write_text(json.dumps(report, indent=2))
    r = report
    lines = ["# RAG quality benchmark", "",
             f"Generated by `python bench/rag_quality.py {r['args']}` on {r['machine']} ({r['cpus']} CPUs shared "
             f"with other jobs), {r['date']}.", "",
             f"Corpus: {r['squad_paragraphs']} SQuAD paragraphs ({r['squad']}) + {r['distractors']} WikiText-2 "
             f"paragraphs as distractors. Questions: the {r['questions']} questions of the {r['val_paragraphs']} "
             f"held-out paragraphs (paragraph split of `task=rag_qa`, val_fraction {r['val_fraction']}, seed 0); "
             f"a question is a retrieval hit when its paragraph is among the retrieved documents.", "",
             "## Retrieval", "",
             "| method | chunks | chunks longer than the embedder reads | embed chunks/s | recall@1 | recall@5 | MRR@10 |",
             "|---|---|---|---|---|---|---|"]
    for label, m in r["retrieval"].items():
        lines.append(f"| {label} | {m['chunks']} | {m['truncated_chunks']} | {m['chunks_per_s']:.1f} | "
                     f"{m['recall@1']:.3f} | {m['recall@5']:.3f} | {m['mrr@10']:.3f} |")
    lines += ["", "Embedding rates are one process's, measured when each chunking was first embedded (`--cache` "
              "reuses vectors and rate); on a shared machine they vary with its load and compare only within a run."]
    if r.get("answers"):
        lines += ["", f"## Answers through `/v1/rag` (hybrid retrieval, top_k {TOP_K}, max_tokens {MAX_TOKENS}, "
                  f"temperature 0; the default decoding is extractive with a beam of {DEFAULT_RAG_BEAMS})", "",
                  "| model | passages read | support weight | exact match | F1 | contains gold | recall@5 | "
                  "gold in passages read | p50 latency s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for label, m in r["answers"].items():
            read = ", ".join(map(str, m.get("read_k", []))) or "-"
            weight = ", ".join(f"{w:g}" for w in m.get("support_weight", [])) or "-"
            lines.append(f"| {label} | {read} | {weight} | {m['exact_match']:.3f} | {m['f1']:.3f} | "
                         f"{m['contains_gold']:.3f} | {m['recall@5']:.3f} | {m.get('recall_read', float('nan')):.3f} | "
                         f"{m['p50_s']:.2f} |")
        lines += ["", "Models: " + "; ".join(f"{k} = `{v}`" for k, v in r["models"].items()) + ".", "",
                  "Passages read: of the 5 sources a response returns, the model answers from the first `read_k`; "
                  "by default all of them, and for a model fine-tuned with `task=rag_qa` the `qa.passages` it was "
                  "trained on (docs/serve.md). The `read_k 5` row is the same tuned model given all 5. \"Gold in "
                  "passages read\" counts the questions whose paragraph is among the passages the model read.", "",
                  "Support weight: a beam search's final answers are ranked by log-probability + this x the share of "
                  "the question's content words in the passage sentence the answer was copied from "
                  "(`ops.extractive.question_support`); the default ranks so, the `support_weight 0` row is the "
                  "same model's most likely answer. Greedy and free answers have one candidate (0)."]
    lines.append("")
    (OUT / "rag_quality.md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--squad", type=Path, default=REPO.parent / "shared" / "data" / "squad_notre_dame.json")
    parser.add_argument("--wikitext", type=Path, default=REPO.parent / "shared" / "data" / "wikitext2_valid.txt")
    parser.add_argument("--distractors", type=int, default=500)
    parser.add_argument("--val-fraction", type=float, default=0.2, help="as in configs/rag_lora.yaml")
    parser.add_argument("--base", default="smollm2-135m-instruct", help="base model spec")
    parser.add_argument("--tuned", default=None, help="RAG-tuned model: quantized/adapter artifact or model dir")
    parser.add_argument("--storage", type=Path, default=REPO / "artifacts", help="holds the converted base model")
    parser.add_argument("--port", type=int, default=8472)
    parser.add_argument("--no-answers", action="store_true", help="retrieval only")
    parser.add_argument("--cache", type=Path, default=None, help="reuse embeddings of a previous run (the reported "
                        "chunks/s is then that run's)")
    args = parser.parse_args()
    global CACHE
    CACHE = args.cache

    docs, questions = read_squad(args.squad)
    _, val_ids = split_paragraphs(docs, args.val_fraction, 0)
    held_out = [q for q in questions if q["doc_id"] in set(val_ids)]
    distractors = wikitext_paragraphs(args.wikitext)[: args.distractors]
    model = load_embedder()
    report = {"args": " ".join(sys.argv[1:]), "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
              "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "squad": args.squad.name, "squad_paragraphs": len(docs), "distractors": len(distractors),
              "val_fraction": args.val_fraction, "val_paragraphs": len(val_ids), "questions": len(held_out)}
    report["retrieval"], manifest, chunks, vectors = retrieval(docs + distractors, held_out, model)
    if not args.no_answers:
        models = {"base": args.base, **({"RAG-tuned": args.tuned} if args.tuned else {})}
        with tempfile.TemporaryDirectory(prefix="rag-bench-") as tmp:
            storage = Path(tmp)
            (storage / "models").symlink_to((args.storage / "models").resolve(), target_is_directory=True)
            store = RetrievalStore.build(chunks, vectors, embedder_name="all-minilm-l6-v2")  # titled, hybrid
            store.save(storage / "indexes" / "bench")
            resolved = {k: str(Path(v).resolve()) if Path(v).exists() else v for k, v in models.items()}
            report["answers"] = answers(storage, resolved, held_out, args.port)
            report["models"] = models
    write(report)
    print(f"[bench.rag_quality] wrote {OUT / 'rag_quality.md'}", flush=True)


if __name__ == "__main__":
    main()
