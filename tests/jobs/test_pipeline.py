"""jobs.pipeline: config checks and the summary in-process; the whole pipeline through `ray job submit`."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import httpx
import pytest

from cluster.config import ConfigError, parse_args
from jobs.pipeline import PipelineConfig, retrieval_hit, summary_markdown
from tests.conftest import _free_port


def parse(*argv: str) -> PipelineConfig:
    return parse_args(PipelineConfig, list(argv), prog="jobs.pipeline", description="")


def test_defaults_assemble_a_lora_training_and_an_index_of_the_same_corpus():
    cfg = parse("data=notes.txt", "name=demo", "train.max_steps=3", "train.lora.r=4", "index.workers=1")
    train, index = cfg.train_config(), cfg.index_config()
    assert (train.method, train.data, train.name, train.max_steps, train.lora.r, train.num_workers) == \
        ("lora", "notes.txt", "demo", 3, 4, 2)
    assert (index.data, index.workers, index.name) == ("notes.txt", 1, "stdlib")
    assert parse("rebuild=all").rebuild == ["train", "quantize", "index"]


@pytest.mark.parametrize("argv, fragment", [
    (["rebuild=[train,foo]"], "unknown step 'foo'"),
    (["train.method=full"], "unknown config key 'train.method'"),  # the pipeline always trains LoRA
    (["train.name=x"], "unknown config key 'train.name'"),  # the pipeline's own name= names everything
    (["train.num_workers=0"], "train: num_workers must be >= 1"),
    (["train.lora.r=0"], "train: lora.r must be >= 1"),
    (["index.chunk.size=200", "index.chunk.overlap=5000"], "index: chunk.overlap (5000) must be smaller than chunk.size"),
    (["quantize.methods=[int3]"], "unknown quantization method 'int3'"),
    (["quantize.methods=[]"], "give at least one method"),
    (["eval.window=64", "eval.stride=65"], "stride=65 must be between 1 and window (64)"),
    (["name=../x"], "bad artifact name '../x'"),
    (["questions=[{question: hi, expected: [json]}]"], "expected"),
])
def test_bad_configs_are_one_line_errors(argv, fragment):
    with pytest.raises(ConfigError) as err:
        parse(*argv)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_serving_beyond_loopback_without_a_key_fails_before_any_step(monkeypatch):
    """The check runs first in main(): no Ray, no training, one line through the entrypoint."""
    from tests.conftest import run_module

    monkeypatch.delenv("RAYLM_API_KEY", raising=False)
    done = run_module("jobs.pipeline", "serve.host=0.0.0.0", "serve.app={api_key: null}", timeout=120,
                      env={"RAYLM_API_KEY": ""})
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == (
        "error: serve.host is '0.0.0.0', which other machines can reach, and no API key is set; set the app's "
        "`api_key` arg or the RAYLM_API_KEY environment variable, or bind 127.0.0.1")
    assert "step 1/5" not in done.stdout


def test_resolved_config_never_shows_the_api_key():
    from cluster.config import dump_config

    cfg = parse("serve.host=0.0.0.0", "serve.app={api_key: s3cret-value, max_batch_size: 4}")
    assert cfg.serve.api_key() == "s3cret-value"
    dumped = dump_config(cfg)
    assert "s3cret-value" not in dumped and "api_key: <redacted>" in dumped and "max_batch_size: 4" in dumped


def test_retrieval_hit_matches_a_module_and_what_lies_under_it():
    assert retrieval_hit(["json.decoder.JSONDecoder", "os"], ["json"]) is True
    assert retrieval_hit(["jsonschema.validate"], ["json"]) is False
    assert retrieval_hit(["tempfile"], ["json", "tempfile"]) is True
    assert retrieval_hit(["json"], []) is None


def test_summary_markdown_has_one_row_per_model_and_question():
    row = {"perplexity": 10.0, "tokens": 100, "decode_ms_per_token": 5.0, "size_mb": 1.0}
    summary = {
        "name": "n", "model": "m", "data": "d", "threads": 2,
        "base": {**row, "model": "base (float32)"}, "tuned": {**row, "model": "fine-tuned (float32)",
                                                              "perplexity": 9.0},
        "quantized": [{**row, "model": "fine-tuned + weight_only_int8", "perplexity": 9.1}],
        "train": {"steps": 2, "tokens": 10, "tokens_per_s": 1.0, "num_workers": 2, "initial_val_perplexity": 12.0,
                  "best_val_perplexity": 9.5},
        "served": {"model": "quantized/n-weight_only_int8"},
        "answers": [{"question": "q?", "hit": True, "sources": [{"doc_id": "json"}],
                     "usage": {"completion_tokens": 3}, "client_s": 0.5, "timings": {"time_to_first_token_s": 0.1}}],
        "retrieval_hits": "1/1", "built": [], "wall_s": 12.0,
    }
    text = summary_markdown(summary)
    assert "| fine-tuned (float32) | 9.0000 | 0.900 |" in text
    assert "| q? | yes | json | 3 | 0.50 | 0.10 |" in text
    assert "Retrieval hits: 1/1" in text


@pytest.mark.subprocess
@pytest.mark.integration
def test_pipeline_via_job_submit_serves_its_model_and_reuses_artifacts_on_rerun(ray_head, tmp_path, tiny_model_dir,
                                                                                tiny_text_file):
    port = _free_port()
    config = tmp_path / "pipeline.yaml"
    config.write_text("questions:\n  - question: Who jumps over the lazy dog?\n"
                      "  - question: What is Python?\n    expect: [tiny]\n")
    args = ["python", "-m", "jobs.pipeline", "--config", str(config), f"model={tiny_model_dir}", f"data={tiny_text_file}", "name=pipe",
            f"storage={tmp_path}", f"serve.port={port}", "serve.max_tokens=8",
            "train.max_steps=2", "train.eval_every=1", "train.block_size=32", "train.batch_size=2",
            "train.val_blocks=2", "train.max_tokens=0", "train.val_fraction=0.2",
            "index.name=tiny", "index.workers=1", "index.chunk.size=200", "index.chunk.overlap=20",
            "eval.max_tokens=256", "eval.window=64", "eval.stride=32", "eval.latency.new_tokens=2",
            "eval.latency.repeats=1", "quantize.methods=[weight_only_int8]",
            # Compiling the decode step costs a minute on 2 CPUs; tests/ops covers the compiled path.
            # Float serving: the merge-and-quantize path runs here; the default (the adapter unmerged
            # on Serve's int4 base) is the slow test below, on the embedded model it is exact for.
            "serve.app={compile: false, quantization: none}"]
    try:
        first = ray_head.submit(*args, timeout=900)
        assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-2000:]
        summary = json.loads((tmp_path / "reports" / "pipe" / "summary.json").read_text())
        assert summary["built"] == ["train", "quantize", "index"]
        assert summary["train"]["steps"] == 2 and summary["train"]["num_workers"] == 2
        assert (tmp_path / "adapters" / "pipe" / "adapter_model.safetensors").is_file()
        assert summary["unmerged"] is None  # Serve would not quantize: nothing to serve unmerged
        [qrow] = summary["quantized"]
        expected_model = qrow["artifact"] if qrow["passes"] else "adapters/pipe"
        assert summary["served"]["model"] == expected_model
        assert len(summary["answers"]) == 2 and all(a["sources"] for a in summary["answers"])
        assert "| fine-tuned + weight_only_int8 |" in (tmp_path / "reports" / "pipe" / "summary.md").read_text()
        assert f"curl -s http://127.0.0.1:{port}/v1/rag" in first.stdout and "make stop" in first.stdout

        # The endpoint outlives the job that deployed it.
        health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=30)
        assert health.status_code == 200 and health.json()["model"] == "pipe"
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/rag", json={"question": "What is Python?",
                                                                      "max_tokens": 4}, timeout=60)
        assert answer.status_code == 200 and answer.json()["sources"]

        # A second run reuses the adapter, the quantized model and the index.
        second = ray_head.submit(*args, timeout=900)
        assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-2000:]
        again = json.loads((tmp_path / "reports" / "pipe" / "summary.json").read_text())
        assert again["built"] == []
        assert "train: reusing" in second.stdout and "index: reusing" in second.stdout
        assert again["tuned"]["perplexity"] == pytest.approx(summary["tuned"]["perplexity"], rel=1e-6)
    finally:
        subprocess.run([str(Path(ray_head.ray).with_name("serve")), "shutdown", "--address", ray_head.dashboard,
                        "-y"], env=ray_head.env, capture_output=True, timeout=120)


def _summary_for_markdown() -> dict:
    row = {"perplexity": 10.0, "tokens": 100, "decode_ms_per_token": 5.0, "size_mb": 1.0}
    qa_row = {"exact_match": 0.25, "f1": 0.5, "contains_gold": 0.4, "recall@1": 0.8, "recall@5": 1.0, "p50_s": 1.5}
    summary = {
        "name": "n", "model": "m", "data": "d", "threads": 2, "base": {**row, "model": "base"},
        "tuned": {**row, "model": "tuned"}, "quantized": [],
        "train": {"steps": 2, "tokens": 10, "tokens_per_s": 1.0, "num_workers": 2, "initial_val_perplexity": 12.0,
                  "best_val_perplexity": 9.5},
        "served": {"model": "x"}, "answers": [], "retrieval_hits": "0/0", "built": [], "wall_s": 1.0,
        "qa": {"questions": 4, "train_paragraphs": 9, "val_paragraphs": 3, "top_k": 5, "max_tokens": 24, "beams": [4],
               "support_weight": [5.0], "rows": {"base": {**qa_row, "f1": 0.1, "read_k": [5]}, "fine-tuned": {**qa_row, "read_k": [3]}}},
    }
    return summary


def test_squad_data_switches_to_rag_qa_and_the_summary_reports_em_f1(tmp_path):
    from tests.jobs.test_qa_data import write_squad

    squad = write_squad(tmp_path / "s.json")
    cfg = PipelineConfig.model_validate({"data": str(squad), "storage": str(tmp_path)})
    assert cfg.rag_qa and cfg.train_config().task == "rag_qa" and cfg.questions == []
    plain = PipelineConfig.model_validate({"storage": str(tmp_path)})
    assert not plain.rag_qa and plain.train_config().task == "lm" and len(plain.questions) == 3

    summary = _summary_for_markdown()
    text = summary_markdown(summary)
    assert "| fine-tuned | 3 | 0.250 | 0.500 | 0.400 | 0.800 | 1.000 | 1.50 |" in text
    assert "| base | 5 | 0.250 | 0.100 |" in text and "| question |" not in text
    assert "extractive, beam width 4, answers ranked with support weight 5." in text


@pytest.mark.slow
def test_an_adapter_unmerged_on_the_embedded_int4_base_scores_as_on_the_float_base(tmp_path, embedded_storage):
    """The embedded model's int4 is its GGUF's weights exactly, so the adapter on it is the trained
    model: the engine-path perplexity matches the float base + adapter's, and the pipeline serves it."""
    import torch
    from peft import LoraConfig, get_peft_model

    from jobs.pipeline import step_unmerged
    from ops.model import DEFAULT_MODEL, load_model, load_tokenizer

    torch.manual_seed(0)
    peft = get_peft_model(load_model(DEFAULT_MODEL, storage=embedded_storage), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                                init_lora_weights=False))
    adapter = tmp_path / "adapters" / "unm"
    peft.save_pretrained(adapter)
    tokenizer = load_tokenizer(DEFAULT_MODEL, storage=embedded_storage)
    ids = torch.tensor(tokenizer("The University of Notre Dame is a private research university in Indiana. "
                                 "Its main building has a golden dome topped by a statue of the Virgin Mary. " * 18,
                                 add_special_tokens=False)["input_ids"][:384])
    cfg = parse("name=unm", f"storage={embedded_storage}", "eval.latency.enabled=false")
    row = step_unmerged(cfg, adapter, ids, tokenizer)
    assert row["method"] == "weight_only_int4" and "GGUF" in row["how"] and row["artifact"] == "adapters/unm"
    assert (row["rows"], row["row_tokens"]) == (16, 24)
    # bf16 activations in the int4 kernels against float32: close, within the pipeline's 2% bar
    assert row["ppl_ratio"] == pytest.approx(1.0, abs=0.02) and row["passes"]
    assert "decode_ms_per_token" not in row  # latency off
    # the int4 base + the adapter file, against 513 MB of float32 weights
    assert 60 < row["size_mb"] < 140
    md = summary_markdown({**_summary_for_markdown(), "unmerged": row})
    assert f"| {row['model']} | {row['served_perplexity']:.4f} | {row['ppl_ratio']:.4f} | - | - |" in md
    assert parse("quantize.unmerged=false", "serve.app={quantization: none}").quantize.unmerged is False
    none = parse("name=unm", f"storage={embedded_storage}", "serve.app={quantization: none}")
    assert step_unmerged(none, adapter, ids, tokenizer) is None  # Serve would not quantize: nothing to measure
