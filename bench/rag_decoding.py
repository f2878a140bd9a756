"""Extractive decoding: greedy vs beam search over spans (what /v1/rag serves), same model, same passages.

    python bench/rag_decoding.py --report artifacts/reports/<name> [--beams 4] [--length-penalty 1] \
        [--support-weights 0,5]

Takes a RAG pipeline run's report (``configs/rag_lora.yaml``: its held-out questions, gold answers
and the answers ``/v1/rag`` served), its index (the passages each question retrieved, looked up
again with the Retriever's code and checked to be the same documents) and its adapter on the
float32 base model (transformers, not the engine). Each question is decoded with the endpoint's
prompt and the passages its model read under ``ops.extractive``'s span constraint, greedily and
by beam search (the ``--beams`` most likely allowed tokens per step; an answer's score is the sum of
its tokens' log-probabilities including EOS, no length penalty: the most likely span), one beam row
per ``--support-weights`` weight: final answers ranked by score + weight x how much of the question
the passage sentence each was copied from repeats (``ops.extractive.question_support``; 0: the most
likely span). The row with the endpoint's defaults reproduces the served answers (the table counts
how many match), so the rows differ only by the search.

Why: of the wrong answers of an extractive run, most had the right passage first; greedy commits to
its first token ("D" -> "Dor" where the span is "Navy Blue and Gold Rush"), a beam keeps the spans
whose later tokens are likelier. The search is the engine's (``Request.beams``, the ``/v1/rag``
default since this measurement), here on the float32 weights. Writes docs/benchmarks/rag_decoding.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ops.extractive import SpanConstraint  # noqa: E402
from ops.qa_metrics import score_answers  # noqa: E402


def load(report: Path, storage: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ops.retrieval import RetrievalStore

    summary = json.loads((report / "summary.json").read_text())
    answers = summary["qa"]["rows"]["fine-tuned"]["answers"]
    served = summary["served"]
    store = RetrievalStore.load(storage / "indexes" / served["index"])
    hits = store.search_text([a["question"] for a in answers], summary["qa"]["top_k"])
    rows = []
    for a, found in zip(answers, hits):
        if [h.doc_id for h in found] != a["retrieved"]:
            raise SystemExit(f"the index no longer returns what was served for {a['question']!r}")
        rows.append({**a, "passages": [h.text for h in found]})
    base = storage / "models" / summary["model"]
    adapter = storage / "adapters" / Path(served["model"]).name
    tok = AutoTokenizer.from_pretrained(base)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(adapter)).eval()
    return summary, rows, tok, model, adapter


class Decoder:
    def __init__(self, model, tok, max_tokens: int):
        from ops.engine import Engine

        self.model, self.tok, self.max_tokens = model, tok, max_tokens
        self.eos = Engine._eos_ids(model, tok)  # what ends an answer in the engine

    @torch.inference_mode()
    def step(self, cache, ids):
        out = self.model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True)
        return out.past_key_values, torch.log_softmax(out.logits[0, -1].float(), -1)

    def greedy(self, prompt, constraint):
        cache, lp = self.step(None, prompt)
        toks = []
        for _ in range(self.max_tokens):
            t = int(torch.argmax(constraint.mask(lp, toks, first_only=True)))
            if t in self.eos:
                break
            toks.append(t)
            cache, lp = self.step(cache, [t])
        return toks

    def beam(self, prompt, constraint, width: int, length_penalty: float = 0.0):
        """Beam search over spans. ``length_penalty`` 0: the engine's (``Request.beams``; tests/references.py
        has it over full forwards): the most likely span, stopping once a final hypothesis beats every open
        one (adding tokens only lowers a score). > 0: transformers' scoring: a final hypothesis scores
        sum / length ** length_penalty, the best ``width`` final ones are kept, and the search stops once
        the worst of them beats the best open one's sum / its length ** length_penalty
        (``early_stopping=False``)."""
        import copy

        alpha = length_penalty
        cache, lp = self.step(None, prompt)
        beams, done = [(0.0, [], cache, lp)], []
        while True:
            grown = []
            for score, toks, c, l in beams:
                masked = constraint.mask(l, toks)
                values, tokens = torch.topk(masked, min(width, int(torch.isfinite(masked).sum())))
                grown += [(score + v, toks, t, c) for v, t in zip(values.tolist(), tokens.tolist())]
            grown.sort(key=lambda g: -g[0])
            beams = []
            for score, toks, t, c in grown:
                if t in self.eos:  # ranked as the engine ranks (SpanConstraint.rank: + support_weight x support)
                    done.append((constraint.rank(score, toks) / (len(toks) + 1) ** alpha, toks))
                elif len(beams) < width:
                    if len(toks) + 1 >= self.max_tokens:  # final at max_tokens
                        done.append((constraint.rank(score, toks + [t]) / (len(toks) + 1) ** alpha, toks + [t]))
                    else:
                        beams.append((score, toks, t, c))
            done = sorted(done, key=lambda d: -d[0])[:width]
            if not beams:
                return done[0][1]
            if alpha:
                stop = len(done) >= width and done[-1][0] >= beams[0][0] / (len(beams[0][1]) + 1) ** alpha
            else:
                stop = bool(done) and done[0][0] >= beams[0][0] + constraint.max_bonus
            if stop:
                return done[0][1]
            beams = [(s, toks + [t], *self.step(copy.deepcopy(c), [t])) for s, toks, t, c in beams]

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--report", type=Path, required=True, help="a RAG pipeline report directory (summary.json)")
    ap.add_argument("--storage", type=Path, default=REPO / "artifacts", help="the pipeline's storage root")
    ap.add_argument("--beams", type=int, default=4, help="beam width (default 4)")
    ap.add_argument("--length-penalty", type=float, default=0.0, help="0 (default): the engine's search, the most "
                    "likely span; > 0: transformers' length-normalised scoring, sum / length ** this")
    ap.add_argument("--support-weights", default=None, help="comma-separated support weights, one beam row each "
                    "(final answers ranked by log-probability + weight x ops.extractive.question_support); default "
                    "0 and the endpoint's default")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks")
    args = ap.parse_args()
    if args.beams < 2:
        ap.error("--beams must be >= 2 (1 is greedy, which is always measured)")
    if not (args.report / "summary.json").is_file():
        ap.error(f"{args.report}/summary.json not found: run the pipeline with configs/rag_lora.yaml first")
    from serve.app import DEFAULT_SYSTEM_PROMPT, AppArgs, rag_messages
    from serve.schemas import DEFAULT_SUPPORT_WEIGHT

    try:
        weights = [float(w) for w in (args.support_weights or f"0,{DEFAULT_SUPPORT_WEIGHT:g}").split(",")]
    except ValueError:
        ap.error(f"--support-weights takes comma-separated numbers, got {args.support_weights!r}")
    if any(w < 0 for w in weights):
        ap.error("--support-weights must be >= 0")

    summary, rows, tok, model, adapter = load(args.report, args.storage)
    max_tokens = summary["qa"]["max_tokens"]
    dec = Decoder(model, tok, max_tokens)

    def count(messages):
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return len(tok(text, add_special_tokens=False)["input_ids"])

    penalty = f", length penalty {args.length_penalty:g}" if args.length_penalty else ""
    beam_keys = {f"beam {args.beams}{penalty}, support weight {w:g}": w for w in weights}
    results: dict[str, list[str]] = {"greedy": [], **{k: [] for k in beam_keys}}
    seconds = {k: 0.0 for k in results}
    for i, r in enumerate(rows, 1):
        # the passages the endpoint read (read_k), trimmed to the token budget the Generator gives a
        # prompt (the app's default max_seq_len)
        passages = r["passages"][: r.get("read_k") or len(r["passages"])]
        messages = rag_messages(r["question"], [{"text": p} for p in passages], DEFAULT_SYSTEM_PROMPT, count,
                                AppArgs.model_fields["max_seq_len"].default - max_tokens)
        prompt = tok(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                     add_special_tokens=False)["input_ids"]
        for key in results:
            constraint = SpanConstraint(passages, tok, dec.eos, question=r["question"],
                                        support_weight=beam_keys.get(key, 0.0))
            t0 = time.perf_counter()
            toks = (dec.greedy(prompt, constraint) if key == "greedy"
                    else dec.beam(prompt, constraint, args.beams, args.length_penalty))
            seconds[key] += time.perf_counter() - t0
            results[key].append(tok.decode(toks, skip_special_tokens=True).strip())
        print(f"[{i}/{len(rows)}] {r['question'][:60]!r}: " + ", ".join(f"{k} {v[-1]!r}" for k, v in results.items())
              + f", gold {r['gold'][:2]}", flush=True)

    write_report(args, summary, rows, adapter, results, seconds, weights, max_tokens)


def write_report(args, summary: dict, rows: list[dict], adapter: Path, results: dict[str, list[str]],
                 seconds: dict[str, float], weights: list[float], max_tokens: int) -> None:
    """Scores every decoding against the gold answers and the served ones; writes the JSON and the table."""
    golds = [r["gold"] for r in rows]
    served = [r["answer"] for r in rows]
    table = {"served by /v1/rag (the pipeline run)": {**score_answers(served, golds), "s_per_question": None}}
    for key, answers in results.items():
        table[f"{key} (transformers, float32 base + adapter)"] = {
            **score_answers(answers, golds), "s_per_question": seconds[key] / len(rows),
            "same_as_served": sum(a == s for a, s in zip(answers, served))}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    meta = {"report": str(args.report), "adapter": str(adapter), "questions": len(rows), "top_k": summary["qa"]["top_k"],
            "max_tokens": max_tokens, "beams": args.beams, "length_penalty": args.length_penalty,
            "support_weights": weights, "commit": commit, "machine": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads()}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "rag_decoding" + (f"_length_penalty_{args.length_penalty:g}" if args.length_penalty else "")
    (args.out / f"{stem}.json").write_text(json.dumps(
        {"meta": meta, "rows": table, "answers": {"served": served, **results, "gold": golds,
                                                   "question": [r["question"] for r in rows]}}, indent=1))
    lines = ["# Extractive decoding: greedy vs beam search", "",
             f"Generated by `python bench/rag_decoding.py --report {args.report} --beams {args.beams}"
             + (f" --length-penalty {args.length_penalty:g}" if args.length_penalty else "")
             + f" --support-weights {','.join(f'{w:g}' for w in weights)}` at `{commit}`; "
             f"{len(rows)} held-out questions of the pipeline run's report, the passages it served and its model read "
             f"(top_k {meta['top_k']}, the first read_k of them), max_tokens {max_tokens}, {meta['threads']} threads. "
             "Beam score: sum of token log-probabilities including EOS"
             + (f" divided by length ** {args.length_penalty:g}" if args.length_penalty else ", no length penalty")
             + "; a final answer is ranked by its score + support weight x `ops.extractive.question_support` (the "
             "share of the question's content words in the passage sentence it was copied from), and the search "
             "runs until no open hypothesis plus the weight could outrank the best final one, as the engine's "
             "does. Support weight 0: the most likely answer.", "",
             "| decoding | exact match | F1 | contains gold | same answer as served | s / question |",
             "|---|---|---|---|---|---|"]
    for key, row in table.items():
        same = row.get("same_as_served")
        sec = row["s_per_question"]
        lines.append(f"| {key} | {row['exact_match']:.3f} | {row['f1']:.3f} | {row['contains_gold']:.3f} | "
                     f"{'-' if same is None else f'{same}/{len(rows)}'} | {'-' if sec is None else f'{sec:.2f}'} |")
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
