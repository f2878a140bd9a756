"""The whole system on one command: fine-tune, evaluate, quantize, index, serve, ask.

    python -m cluster.submit -- python -m jobs.pipeline          # what `make demo` runs
    python -m jobs.pipeline name=demo rebuild=all                  # in-process, everything rebuilt

Steps, each a library call of the job that owns it:

1. **train**: LoRA fine-tune with Ray Train on ``train.num_workers`` workers (``jobs.train``);
2. **evaluate**: held-out perplexity (the corpus tail the training never saw), batch-1 decode
   latency and size of the base model and of base + adapter;
3. **quantize**: first the adapter unmerged on the base as Serve quantizes it (``weight_only_int4``
   by default, the embedded model's GGUF weights exactly): its perplexity through the engine's own
   decode path against the float base + adapter's; within ``quantize.max_ppl_increase`` that is
   what is served, nothing merged. Otherwise merge the adapter and quantize with the first of
   ``quantize.methods`` within the bar of the fine-tuned float model (``ops.quantization``); none
   passing means the float model is served, and the summary says so;
4. **index**: chunk and embed the corpus into a FAISS index (``jobs.index``);
5. **serve**: deploy the RAG app (``serve.app``) with the fine-tuned, quantized generator on
   ``http://<serve.host>:<serve.port>``, ask ``questions`` through HTTP and print each answer with
   its sources, then a summary table. The endpoint stays up (``make stop`` ends it).

With ``data=`` a SQuAD-format .json the pipeline fine-tunes for RAG (``jobs.train`` ``task=rag_qa``:
passages + question -> short answer, split by paragraph) and step 5 asks the held-out paragraphs'
questions through ``/v1/rag``, first with the base model, then with the fine-tuned one, and
reports exact match, F1, contains-gold and retrieval recall before and after.

A second run reuses the adapter, quantized model and index when their recorded config matches
(``rebuild=all`` or ``rebuild=[train,index]`` forces steps); evaluation and the questions always
run. Reads: the base model and corpus. Writes: ``<storage>/adapters/<name>/``,
``<storage>/quantized/<name>-<method>/``, ``<storage>/indexes/<index.name>/``,
``<storage>/reports/<name>/summary.{json,md}`` and ``config.yaml``.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import Field, create_model, field_validator, model_validator
from pydantic.fields import FieldInfo

from cluster.cli import run_job
from cluster.config import BaseConfig, save_config, storage_field
from cluster.runtime import init_ray
from cluster.storage import local_storage_root, validate_name
from jobs.data import CorpusSpec, qa_splits, token_stream
from jobs.index import IndexConfig
from jobs.train import TrainConfig
from ops.errors import UserError, first_validation_error
from ops import artifacts
from ops.datasets import DEFAULT_CORPUS, detect_format, held_out_ids, read_documents
from ops.evaluation import EvalSpec, describe, measure
from ops.qa_metrics import score_answers
from ops.model import DEFAULT_MODEL, load_model, load_tokenizer, model_size_bytes
from ops.quantization import METHODS, check_method
from ops.retrieval import read_manifest as read_index_manifest
from serve.security import API_KEY_ENV, require_key_off_loopback

DESCRIPTION = __doc__
STEPS = ("train", "quantize", "index")
APP_NAME = "rag"

# Keys the pipeline sets once for every step it runs.
OWNED = ("model", "data", "name", "storage")
# Sized for the embedded default on 2 CPU cores: the whole pipeline well inside 10 minutes.
DEFAULT_TRAIN: dict[str, Any] = {
    "num_workers": 2, "block_size": 128, "batch_size": 4, "max_steps": 24, "lr": 2e-3,
    "warmup_steps": 3, "eval_every": 12, "val_blocks": 16, "eval_batch_size": 8, "max_tokens": 200_000,
}
DEFAULT_INDEX: dict[str, Any] = {"name": "stdlib", "workers": 2}


def section_of(job_config: type[BaseConfig], drop: tuple[str, ...], defaults: dict[str, Any], title: str):
    """A config section with ``job_config``'s keys (minus ``drop``) and the pipeline's defaults.

    The job's own validators run when :meth:`PipelineConfig.train_config` / ``index_config``
    assemble the full job config, so every check of the job applies here too.
    """
    fields = {}
    for key, info in job_config.model_fields.items():
        if key in drop:
            continue
        if key in defaults:
            info = FieldInfo.merge_field_infos(info, default=defaults[key])
        fields[key] = (info.annotation, info)
    return create_model(title, __base__=BaseConfig, **fields)


# `task` follows the corpus: a SQuAD .json trains rag_qa, anything else lm.
TrainSection = section_of(TrainConfig, OWNED + ("method", "merge", "task"), DEFAULT_TRAIN, "TrainSection")
IndexSection = section_of(IndexConfig, ("data", "data_format", "text_field", "storage"), DEFAULT_INDEX,
                          "IndexSection")


class Question(BaseConfig):
    question: str = Field(..., min_length=1, description="asked through POST /v1/rag")
    expect: list[str] = Field(default_factory=list, description="document id prefixes that count as a retrieval "
                              "hit (e.g. 'json' matches json.dumps); empty = not scored")


DEFAULT_QUESTIONS = [
    {"question": "How do I convert a Python object to a JSON formatted string?", "expect": ["json"]},
    {"question": "How can I create a temporary directory that is removed automatically?", "expect": ["tempfile"]},
    {"question": "How do I parse command-line arguments in a script?", "expect": ["argparse"]},
]


class QuantizeSection(BaseConfig):
    unmerged: bool = Field(True, description="first try the adapter unmerged on the base as Serve quantizes it "
                           "(serve.app quantization, weight_only_int4 by default: the embedded model's GGUF weights "
                           "exactly): perplexity through the engine's decode path vs the float base + adapter; within "
                           "max_ppl_increase it is served as is and nothing is merged")
    methods: list[str] = Field(["weight_only_int4", "weight_only_int8"], description="candidates, best first: the "
                               "first within max_ppl_increase of the fine-tuned float model is served")
    max_ppl_increase: float = Field(0.02, ge=0, description="quality bar, relative to the fine-tuned float model")

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError(f"give at least one method; valid: {', '.join(METHODS)}")
        for m in v:
            check_method(m)
        return v


class ServeSection(BaseConfig):
    host: str = Field("127.0.0.1", description="HTTP host of the Serve proxy; any other than loopback needs an "
                      f"API key (serve.app.api_key or env {API_KEY_ENV})")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of the Serve proxy")
    top_k: int = Field(4, ge=1, le=50, description="passages retrieved per question")
    max_tokens: int = Field(96, ge=1, le=1024, description="answer tokens at most")
    request_timeout_s: float = Field(120.0, gt=0, description="per question")
    app: dict[str, Any] = Field(default_factory=dict, description="extra serve.app args (e.g. max_batch_size, "
                                "api_key; an api_key is never printed or saved)")

    def api_key(self) -> str | None:
        """The key the app will require: ``app.api_key``, else the environment's."""
        return str(self.app["api_key"]) if self.app.get("api_key") else os.environ.get(API_KEY_ENV) or None


class QAEvalSection(BaseConfig):
    questions: int = Field(0, ge=0, description="SQuAD data: held-out questions asked through /v1/rag before and "
                           "after fine-tuning (0 = all of the held-out paragraphs' questions)")
    before: bool = Field(True, description="SQuAD data: also serve the base model and ask it first (the 'before' "
                         "row)")


class PipelineConfig(BaseConfig):
    model: str = Field(DEFAULT_MODEL, description="base model: embedded name, HF id or local directory")
    data: CorpusSpec = Field(DEFAULT_CORPUS, description="corpus for training, evaluation and the index")
    name: str = Field("pipeline", description="run name: adapters/<name>/, quantized/<name>-<method>/, "
                      "reports/<name>/")
    storage: str = storage_field()
    rebuild: list[str] = Field(default_factory=list, description="steps to redo even when their artifact "
                               f"matches: 'all' or a list of {', '.join(STEPS)}")
    train: TrainSection = Field(default_factory=TrainSection)
    index: IndexSection = Field(default_factory=IndexSection)
    eval: EvalSpec = Field(default_factory=lambda: EvalSpec(max_tokens=4096, window=512, stride=256),
                           description="base, fine-tuned and quantized models on the held-out tail; eval.num_threads "
                           "0 = every core of the node the pipeline's driver runs on")
    quantize: QuantizeSection = Field(default_factory=QuantizeSection)
    serve: ServeSection = Field(default_factory=ServeSection)
    qa_eval: QAEvalSection = Field(default_factory=QAEvalSection)
    questions: list[Question] = Field(default_factory=lambda: [dict(q) for q in DEFAULT_QUESTIONS],
                                      validate_default=True, description="asked through the endpoint at the end "
                                      "(list of {question, expect}; empty = none)")

    @field_validator("rebuild", mode="before")
    @classmethod
    def _rebuild(cls, v: Any) -> list[str]:
        if v in ("all", True, "true"):
            return list(STEPS)
        chosen = [v] if isinstance(v, str) else list(v or [])
        bad = [s for s in chosen if s not in STEPS]
        if bad:
            raise ValueError(f"unknown step {bad[0]!r}; valid: all or a list of {', '.join(STEPS)}")
        return chosen

    @model_validator(mode="after")
    def _check(self) -> "PipelineConfig":
        validate_name(self.name)
        if self.rag_qa and [q.model_dump() for q in self.questions] == DEFAULT_QUESTIONS:
            self.questions = []  # the stdlib demo questions mean nothing to a SQuAD corpus
        self.train_config()  # errors in the train/index sections surface at parse time, one line each
        self.index_config()
        return self

    @property
    def rag_qa(self) -> bool:
        """Whether ``data`` is a SQuAD file, which switches training to ``task=rag_qa``."""
        try:
            return detect_format(self.data, self.train.data_format) == "squad"
        except UserError:
            return False

    def train_config(self) -> TrainConfig:
        """The LoRA training job this pipeline runs."""
        return _validated(TrainConfig, {**self.train.model_dump(), "method": "lora", "model": self.model,
                                        "data": self.data, "name": self.name, "storage": self.storage,
                                        "task": "rag_qa" if self.rag_qa else "lm"}, "train")

    def index_config(self) -> IndexConfig:
        """The index job this pipeline runs (same corpus as the training)."""
        return _validated(IndexConfig, {**self.index.model_dump(), "data": self.data,
                                        "data_format": self.train.data_format, "text_field": self.train.text_field,
                                        "storage": self.storage}, "index")


def _validated(model: type[BaseConfig], values: dict[str, Any], section: str):
    """``model(values)``; a failing check becomes one line naming the section."""
    from pydantic import ValidationError

    try:
        return model.model_validate(values)
    except ValidationError as err:
        where, message, _ = first_validation_error(err.errors())
        raise ValueError(f"{section}{'.' + where if where else ''}: {message}") from None


def log(msg: str) -> None:
    print(f"[pipeline] {msg}", flush=True)


def _recorded_config(directory: Path) -> dict | None:
    path = directory / "config.yaml"
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def _same(recorded: dict | None, cfg: BaseConfig) -> bool:
    return recorded is not None and recorded == json.loads(cfg.model_dump_json())


# ---------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------

def step_train(cfg: PipelineConfig, storage: str) -> tuple[Path, dict, bool]:
    """The adapter: reused when ``adapters/<name>/config.yaml`` matches, else trained (2 workers)."""
    from jobs import train

    tcfg = cfg.train_config()
    adapter = artifacts.local(cfg.storage, artifacts.Kind.ADAPTERS, cfg.name)
    wanted = json.loads(tcfg.model_dump_json())
    if "train" not in cfg.rebuild and adapter is not None and _same(_recorded_config(adapter), tcfg) \
            and (adapter / "metrics.json").is_file():
        log(f"train: reusing {artifacts.uri(cfg.storage, artifacts.Kind.ADAPTERS, cfg.name)} (same config; "
            f"rebuild=train to redo)")
        return adapter, json.loads((adapter / "metrics.json").read_text()), False
    # A run left by another config would be resumed by Ray Train: start it afresh. The record of
    # which config the run belongs to is node-local; without it the run is cleared too.
    run_config = Path(storage) / "runs" / f".{cfg.name}-pipeline-train.json"
    if "train" in cfg.rebuild or not run_config.is_file() or json.loads(run_config.read_text()) != wanted:
        if artifacts.remove(cfg.storage, artifacts.Kind.RUNS, cfg.name):
            log(f"train: cleared run {cfg.name} (other config or rebuild)")
    run_config.parent.mkdir(parents=True, exist_ok=True)
    run_config.write_text(json.dumps(wanted))
    log(f"train: LoRA r={tcfg.lora.r} on {tcfg.num_workers} Ray Train workers, {tcfg.max_steps} steps of "
        f"{tcfg.num_workers}x{tcfg.batch_size}x{tcfg.block_size} tokens")
    adapter = train.main(tcfg)
    return adapter, json.loads((adapter / "metrics.json").read_text()), True


def evaluation_ids(cfg: PipelineConfig, tokenizer: Any) -> torch.Tensor:
    """The first ``eval.max_tokens`` of the validation split the training held out."""
    tcfg = cfg.train_config()
    docs = read_documents(cfg.data, tcfg.data_format, tcfg.text_field)
    _, val = held_out_ids(docs, lambda d: token_stream(d, tokenizer, tcfg.max_tokens or None), tcfg.val_fraction,
                          cfg.eval.max_tokens)
    return torch.from_numpy(val)


def measure_model(model: torch.nn.Module, ids: torch.Tensor, cfg: PipelineConfig, label: str) -> dict[str, Any]:
    """:func:`ops.evaluation.measure` of ``model`` on the held-out ids, logged."""
    row = {"model": label, **measure(model, ids, cfg.eval)}
    log(f"evaluate: {label}: {describe(row)}, {row['size_mb']:.1f} MB")
    return row


def step_quantize(cfg: PipelineConfig, storage: str, tuned: torch.nn.Module, tuned_row: dict, ids: torch.Tensor,
                  adapter: Path, retrained: bool, tokenizer: Any) -> tuple[str | None, list[dict], bool]:
    """Quantize the merged model with the first candidate method that keeps quality.

    Returns:
        ``(served model dir or None for the float adapter, rows of the methods tried, whether any
        artifact was built rather than reused)``.
    """
    from ops.quantization import load_quantized, quantize, save_quantized

    rows, built = [], False
    bar = tuned_row["perplexity"] * (1 + cfg.quantize.max_ppl_increase)
    adapter_uri = artifacts.uri(cfg.storage, artifacts.Kind.ADAPTERS, cfg.name)
    for method in cfg.quantize.methods:
        name = f"{cfg.name}-{method}"
        source = {"adapter": adapter_uri, "adapter_step": artifacts.read_manifest(adapter).step,
                  "base_model": cfg.model}
        out_dir = artifacts.local(cfg.storage, artifacts.Kind.QUANTIZED, name)
        recorded = out_dir / "pipeline-source.json" if out_dir is not None else None
        reuse = ("quantize" not in cfg.rebuild and not retrained and recorded is not None and recorded.is_file()
                 and json.loads(recorded.read_text()) == source)
        if reuse:
            log(f"quantize: reusing {artifacts.uri(cfg.storage, artifacts.Kind.QUANTIZED, name)}")
            qmodel = load_quantized(out_dir)
        else:
            t0 = time.perf_counter()
            built = True
            qmodel = quantize(tuned, method)
            with artifacts.publish(cfg.storage, artifacts.Kind.QUANTIZED, name) as out:
                save_quantized(qmodel, out, method, {}, cfg.model, tokenizer,
                               extra={"adapter": adapter_uri, "base_description": f"{cfg.model} + adapter {cfg.name}"})
                (out / "pipeline-source.json").write_text(json.dumps(source))
            out_dir = artifacts.require(cfg.storage, artifacts.Kind.QUANTIZED, name)
            log(f"quantize: {method} in {time.perf_counter() - t0:.1f}s -> "
                f"{artifacts.uri(cfg.storage, artifacts.Kind.QUANTIZED, name)}")
        row = measure_model(qmodel, ids, cfg, f"fine-tuned + {method}")
        # The spec the Serve app resolves on its own node (fetched from a URI storage there).
        row.update(method=method, artifact=f"{artifacts.Kind.QUANTIZED.value}/{name}", size_mb=sum(
            p.stat().st_size for p in out_dir.glob("*.safetensors")) / 2**20,
            passes=row["perplexity"] <= bar)
        rows.append(row)
        del qmodel
        if row["passes"]:
            log(f"quantize: {method} keeps perplexity within {100 * cfg.quantize.max_ppl_increase:.1f}% "
                f"({row['perplexity']:.4f} <= {bar:.4f}): serving it")
            return row["artifact"], rows, built
        log(f"quantize: {method} misses the quality bar ({row['perplexity']:.4f} > {bar:.4f})")
    log("quantize: no method kept quality; serving the float base + adapter")
    return None, rows, built


def step_unmerged(cfg: PipelineConfig, adapter: Path, ids: torch.Tensor, tokenizer: Any) -> dict | None:
    """The adapter unmerged on the base quantized as Serve quantizes it, measured through the engine.

    Both the float base + adapter and the quantized base + adapter are scored by
    :func:`ops.evaluation.engine_measure` (the served decode path, LoRA gather included) on the
    held-out ids; the served one's batch-1 decode rate too (``bench/decode.py``'s prompts and 128
    new tokens). None when Serve would not quantize.
    """
    from ops.evaluation import engine_measure
    from ops.model import resolve
    from serve.app import AppArgs, serving_quantization

    method = cfg.serve.app.get("quantization", AppArgs.model_fields["quantization"].default)
    if method == "none":
        return None
    row: dict[str, Any] = {"method": method, "artifact": f"{artifacts.Kind.ADAPTERS.value}/{cfg.name}"}
    for label in ("float", "served"):
        model = load_model(cfg.model, storage=cfg.storage)
        if label == "served":
            model, row["how"] = serving_quantization(model, cfg.model, resolve(cfg.model, cfg.storage).kind,
                                                     method, "cpu")
        measured = engine_measure(model, tokenizer, ids, adapter,
                                  new_tokens=128 if label == "served" and cfg.eval.latency.enabled else None)
        row[f"{label}_perplexity"] = measured.pop("perplexity")
        row.update({k: measured[k] for k in ("rows", "row_tokens")})
        if label == "served":
            row.update({k: v for k, v in measured.items() if k in ("size_mb", "tokens_per_s", "decode_tokens_per_s",
                                                                    "decode_ms_per_token")})
        del model
    row["model"] = f"fine-tuned, adapter unmerged on the {method} base ({row['how']})"
    row["ppl_ratio"] = row["served_perplexity"] / row["float_perplexity"]
    row["passes"] = row["ppl_ratio"] <= 1 + cfg.quantize.max_ppl_increase
    rate = f", {row['tokens_per_s']:.1f} tokens/s at batch 1" if "tokens_per_s" in row else ""
    log(f"quantize: adapter unmerged on the {method} base: engine-path perplexity {row['served_perplexity']:.4f} vs "
        f"{row['float_perplexity']:.4f} on the float base (x{row['ppl_ratio']:.4f}){rate}")
    return row


def step_index(cfg: PipelineConfig, storage: str) -> tuple[str, dict, bool]:
    from jobs import index

    icfg = cfg.index_config()
    out = artifacts.local(cfg.storage, artifacts.Kind.INDEXES, icfg.name)
    if "index" not in cfg.rebuild and out is not None and _same(_recorded_config(out), icfg):
        log(f"index: reusing {artifacts.uri(cfg.storage, artifacts.Kind.INDEXES, icfg.name)}")
        built = False
    else:
        index.main(icfg)
        built = True
    return icfg.name, read_index_manifest(artifacts.require(cfg.storage, artifacts.Kind.INDEXES, icfg.name)), built


def deploy(cfg: PipelineConfig, storage: str, model: str, index_name: str, model_id: str | None = None) -> str:
    from ray import serve

    from serve.app import build_app

    args = {**cfg.serve.app, "storage": cfg.storage, "model": model, "model_id": model_id or cfg.name,
            "index": index_name}
    # Serve first, so build_app checks the host its proxy really binds (an earlier instance's, if any).
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    app = build_app(args)
    t0 = time.perf_counter()
    serve.run(app, name=APP_NAME, route_prefix="/")
    url = f"http://{cfg.serve.host}:{cfg.serve.port}"
    log(f"serve: app '{APP_NAME}' running at {url} in {time.perf_counter() - t0:.1f}s (model {model})")
    return url


def ask(url: str, question: Question, cfg: PipelineConfig) -> dict[str, Any]:
    body = json.dumps({"question": question.question, "top_k": cfg.serve.top_k,
                       "max_tokens": cfg.serve.max_tokens, "temperature": 0.0}).encode()
    headers = {"Content-Type": "application/json"}
    if cfg.serve.api_key():
        headers["Authorization"] = f"Bearer {cfg.serve.api_key()}"
    request = urllib.request.Request(f"{url}/v1/rag", data=body, headers=headers)
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=cfg.serve.request_timeout_s) as resp:
            answer = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"POST {url}/v1/rag answered {exc.code}: {exc.read().decode()[:500]}") from None
    answer["client_s"] = time.perf_counter() - t0
    answer["hit"] = retrieval_hit([s["doc_id"] for s in answer["sources"]], question.expect)
    return answer


def ask_squad(url: str, cfg: PipelineConfig, questions: list[dict]) -> dict[str, Any]:
    """Ask SQuAD questions through ``/v1/rag``; exact match, F1, contains-gold, recall and latency."""
    answers = []
    for q in questions:
        a = ask(url, Question(question=q["question"]), cfg)
        answers.append({"question": q["question"], "gold": q["answers"], "answer": a["answer"].strip(),
                        "citations": a.get("citations", []), "retrieved": [s["doc_id"] for s in a["sources"]],
                        "doc_id": q["doc_id"], "client_s": a["client_s"], "beams": a.get("beams", 1),
                        "support_weight": a.get("support_weight", 0.0),
                        "read_k": a["read_k"]})
    scores = score_answers([a["answer"] for a in answers], [a["gold"] for a in answers])
    latencies = sorted(a["client_s"] for a in answers)
    return {**scores, f"recall@{cfg.serve.top_k}": sum(a["doc_id"] in a["retrieved"] for a in answers) /
            max(1, len(answers)), "recall@1": sum(a["retrieved"][:1] == [a["doc_id"]] for a in answers) /
            max(1, len(answers)), "p50_s": latencies[len(latencies) // 2] if latencies else None,
            "read_k": sorted({a["read_k"] for a in answers}), "answers": answers}


def retrieval_hit(doc_ids: list[str], expect: list[str]) -> bool | None:
    """Whether a retrieved document id is, or lies under, an expected one (``json`` covers
    ``json.dumps`` but not ``jsonschema``); None when nothing is expected."""
    if not expect:
        return None
    return any(d == p or d.startswith(p + ".") for d in doc_ids for p in expect)


def summary_markdown(s: dict[str, Any]) -> str:
    def f(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    base, tuned, served = s["base"], s["tuned"], s["served"]
    lines = [f"# Pipeline `{s['name']}`: {s['model']} on `{s['data']}`", "",
             f"Held-out perplexity on {base['tokens']} tokens the training never saw; decode latency at batch 1 "
             f"(HF forward + KV cache, {s['threads']} threads); size of the weights.", "",
             "| model | held-out perplexity | ppl x base | decode ms/token | size MB |", "|---|---|---|---|---|"]
    for row in [base, tuned] + s["quantized"]:
        lines.append(f"| {row['model']} | {row['perplexity']:.4f} | {row['perplexity'] / base['perplexity']:.3f} "
                     f"| {row['decode_ms_per_token']:.1f} | {row['size_mb']:.1f} |")
    u = s.get("unmerged")
    if u:
        lines += ["", f"Through the engine (what Serve runs): teacher-forced perplexity of the same held-out tokens in "
                  f"{u['rows']} rows of {u['row_tokens']} tokens, one decode step per token; batch-1 decode as "
                  "`bench/decode.py` measures it (its 4 chat prompts, 128 new tokens).", "",
                  "| model | engine perplexity | x float base + adapter | decode tokens/s | decode ms/token | size MB "
                  "| passes |", "|---|---|---|---|---|---|---|",
                  f"| fine-tuned, float32 base + adapter | {u['float_perplexity']:.4f} | 1.000 | - | - | - | - |",
                  f"| {u['model']} | {u['served_perplexity']:.4f} | {u['ppl_ratio']:.4f} | "
                  f"{f(u.get('decode_tokens_per_s'), '.1f')} | {f(u.get('decode_ms_per_token'), '.1f')} | "
                  f"{u['size_mb']:.1f} | {'yes' if u['passes'] else 'no'} |"]
    t = s["train"]
    lines += ["", f"Training: {t['steps']} steps, {t['tokens']:,} tokens, {t['tokens_per_s']:.0f} tokens/s on "
              f"{t['num_workers']} workers; its own validation perplexity {t['initial_val_perplexity']:.3f} -> "
              f"{t['best_val_perplexity']:.3f}. Served: `{served['model']}`."]
    if s["answers"]:
        lines += ["", "| question | retrieval hit | top source | answer tokens | latency s | time to first token s |",
                  "|---|---|---|---|---|---|"]
    for a in s["answers"]:
        top = a["sources"][0]["doc_id"] if a["sources"] else "-"
        hit = "-" if a["hit"] is None else ("yes" if a["hit"] else "no")
        lines.append(f"| {a['question']} | {hit} | {top} | {a['usage']['completion_tokens']} | {a['client_s']:.2f} "
                     f"| {f(a['timings'].get('time_to_first_token_s'), '.2f')} |")
    if s.get("qa"):
        qa = s["qa"]
        lines += ["", f"RAG QA through `/v1/rag` on {qa['questions']} questions of the {qa['val_paragraphs']} held-out "
                  f"paragraphs (training saw the other {qa['train_paragraphs']}); top_k {qa['top_k']}, max_tokens "
                  f"{qa['max_tokens']}, the endpoint's default decoding: extractive, beam width "
                  f"{'/'.join(map(str, qa.get('beams') or [1]))}, answers ranked with support weight "
                  f"{'/'.join(f'{w:g}' for w in qa.get('support_weight') or [0])}.", "",
                  "| model | passages read | exact match | F1 | contains gold | recall@1 | recall@k | p50 s |",
                  "|---|---|---|---|---|---|---|---|"]
        recall_k = f"recall@{qa['top_k']}"
        for label, row in qa["rows"].items():
            read = "/".join(map(str, row.get("read_k") or [])) or "-"
            lines.append(f"| {label} | {read} | {row['exact_match']:.3f} | {row['f1']:.3f} | {row['contains_gold']:.3f} | "
                         f"{row['recall@1']:.3f} | {row[recall_k]:.3f} | {f(row['p50_s'], '.2f')} |")
    lines += ["", f"Retrieval hits: {s['retrieval_hits']}; steps built this run: {', '.join(s['built']) or 'none'}; "
              f"wall time {s['wall_s']:.0f} s."]
    return "\n".join(lines) + "\n"


def evaluate_rag_qa(cfg: PipelineConfig, storage: str, model_spec: str, index_name: str) -> tuple[dict, str]:
    """SQuAD data: held-out questions through /v1/rag with the base model, then the fine-tuned one.

    Returns:
        ``(qa summary, url of the app left running with the fine-tuned model)``.
    """
    tcfg = cfg.train_config()
    _, _, val_q, train_ids, val_ids = qa_splits(tcfg, tcfg.seed)
    questions = val_q[: cfg.qa_eval.questions or None]
    rows = {}
    if cfg.qa_eval.before:
        url = deploy(cfg, storage, cfg.model, index_name, model_id="base")
        rows["base"] = ask_squad(url, cfg, questions)
        log(f"qa: base: {_qa_line(rows['base'])}")
    url = deploy(cfg, storage, model_spec, index_name)
    rows["fine-tuned"] = ask_squad(url, cfg, questions)
    log(f"qa: fine-tuned: {_qa_line(rows['fine-tuned'])}")
    beams = sorted({a["beams"] for row in rows.values() for a in row["answers"]})  # what the endpoint decoded with
    weights = sorted({a["support_weight"] for row in rows.values() for a in row["answers"]})
    return {"questions": len(questions), "train_paragraphs": len(train_ids), "val_paragraphs": len(val_ids),
            "top_k": cfg.serve.top_k, "max_tokens": cfg.serve.max_tokens, "beams": beams, "support_weight": weights,
            "rows": rows}, url


def _qa_line(row: dict) -> str:
    return (f"exact match {row['exact_match']:.3f}, F1 {row['f1']:.3f}, contains gold {row['contains_gold']:.3f}, "
            f"recall@1 {row['recall@1']:.3f} on {row['questions']} held-out questions")


def stop_running_app() -> None:
    """Training, the embedding pool and Ray Data tokenizing all need CPUs a running app holds (on a
    small cluster, every one): the app goes down now and is redeployed at the end."""
    from ray import serve

    try:
        if APP_NAME in serve.status().applications:
            log(f"serve: deleting the running app '{APP_NAME}' to free its CPUs; it is redeployed at the end")
            serve.delete(APP_NAME)
    except Exception as exc:  # noqa: BLE001 - no Serve instance yet is the usual case
        log(f"serve: no running app to stop ({type(exc).__name__})")


def ask_all(url: str, cfg: PipelineConfig) -> list[dict[str, Any]]:
    """Ask every configured question through /v1/rag and print each answer with its sources."""
    answers = []
    for i, q in enumerate(cfg.questions, 1):
        a = ask(url, q, cfg)
        answers.append({"question": q.question, **a})
        print(f"\n[{i}] Q: {q.question}\n    A: {a['answer'].strip()}", flush=True)
        for src in a["sources"]:
            print(f"       source {src['doc_id']} (score {src['score']:.2f})", flush=True)
        print(f"    {a['usage']['completion_tokens']} tokens in {a['client_s']:.2f}s"
              + (f"; retrieval {'hit' if a['hit'] else 'MISS'} (expected {', '.join(q.expect)})"
                 if a["hit"] is not None else ""), flush=True)
    return answers


def main(cfg: PipelineConfig) -> dict[str, Any]:
    t_start = time.perf_counter()
    # Before any step: an endpoint that would open to the network without a key fails now, not after training.
    require_key_off_loopback(cfg.serve.host, cfg.serve.api_key(), "serve.host")
    storage = local_storage_root(cfg.storage)
    init_ray()
    stop_running_app()
    built = []

    log("step 1/5 train")
    adapter, train_metrics, retrained = step_train(cfg, storage)
    built += ["train"] if retrained else []

    log("step 2/5 evaluate before/after")
    # A job's driver inherits OMP_NUM_THREADS=1 from Ray; measuring uses the node's cores (nothing
    # else runs now: training has finished and the app is deployed only at the end).
    torch.set_num_threads(cfg.eval.num_threads or os.cpu_count() or 1)
    tokenizer = load_tokenizer(cfg.model, storage=cfg.storage)
    ids = evaluation_ids(cfg, tokenizer)
    base_model = load_model(cfg.model, storage=cfg.storage)
    base_row = measure_model(base_model, ids, cfg, "base (float32)")
    del base_model
    from ops.lora import merge_adapter

    tuned = merge_adapter(load_model(cfg.model, storage=cfg.storage, adapter=str(adapter)))
    tuned_row = measure_model(tuned, ids, cfg, "fine-tuned (float32)")

    log("step 3/5 quantize")
    unmerged = step_unmerged(cfg, adapter, ids, tokenizer) if cfg.quantize.unmerged else None
    if unmerged is not None and unmerged["passes"]:
        log(f"quantize: serving the adapter unmerged on the {unmerged['method']} base: its perplexity is within "
            f"{100 * cfg.quantize.max_ppl_increase:.1f}% of the float base + adapter; nothing to merge")
        served_model, qrows = unmerged["artifact"], []
    else:
        served_model, qrows, quantized = step_quantize(cfg, storage, tuned, tuned_row, ids, adapter, retrained,
                                                       tokenizer)
        built += ["quantize"] if quantized else []
    del tuned

    log("step 4/5 index")
    index_name, index_manifest, indexed = step_index(cfg, storage)
    built += ["index"] if indexed else []

    log("step 5/5 serve and ask")
    model_spec = served_model or f"{artifacts.Kind.ADAPTERS.value}/{cfg.name}"
    qa = None
    if cfg.rag_qa:
        qa, url = evaluate_rag_qa(cfg, storage, model_spec, index_name)
    else:
        url = deploy(cfg, storage, model_spec, index_name)
    answers = ask_all(url, cfg)
    scored = [a for a in answers if a["hit"] is not None]
    summary = {
        "name": cfg.name, "model": cfg.model, "data": cfg.data, "threads": torch.get_num_threads(),
        "train": {k: train_metrics[k] for k in ("steps", "tokens", "tokens_per_s", "num_workers",
                                                 "initial_val_perplexity", "best_val_perplexity", "wall_time_s")},
        "base": base_row, "tuned": tuned_row, "quantized": qrows, "unmerged": unmerged,
        "served": {"model": model_spec, "url": url, "index": index_name,
                   "index_chunks": index_manifest.get("num_chunks")},
        "answers": answers, "retrieval_hits": f"{sum(a['hit'] for a in scored)}/{len(scored)}", "qa": qa,
        "built": built, "wall_s": time.perf_counter() - t_start,
    }
    table = summary_markdown(summary)
    with artifacts.publish(cfg.storage, artifacts.Kind.REPORTS, cfg.name) as out:
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        (out / "summary.md").write_text(table)
        save_config(cfg, out)
    print("\n" + table, flush=True)
    example = json.dumps({"question": "How do I read a CSV file?", "max_tokens": 64})
    auth = f" -H \"Authorization: Bearer ${API_KEY_ENV}\"" if cfg.serve.api_key() else ""  # the key is never printed
    print(f"The endpoint stays up. Try:\n  curl -s {url}/v1/rag -H 'Content-Type: application/json'{auth} "
          f"-d '{example}'\nStop Serve and Ray with: make stop   (or: serve shutdown -y && ray stop)", flush=True)
    log(f"summary: {artifacts.uri(cfg.storage, artifacts.Kind.REPORTS, cfg.name)}/summary.md; wall time "
        f"{summary['wall_s']:.0f}s")
    return summary


if __name__ == "__main__":
    run_job(main, PipelineConfig, prog="jobs.pipeline", description=DESCRIPTION)
