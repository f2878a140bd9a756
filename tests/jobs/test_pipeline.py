"""jobs.pipeline: config checks and the summary, in-process."""

from __future__ import annotations

import pytest

from cluster.config import ConfigError, parse_args
from jobs.pipeline import PipelineConfig, retrieval_hit, summary_markdown


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
    (["index.chunk.overlap=5000"], "index: chunk.overlap (5000) must be smaller than chunk.size"),
    (["quantize.methods=[int3]"], "unknown quantization method 'int3'"),
    (["quantize.methods=[]"], "give at least one method"),
    (["eval.window=64", "eval.stride=65"], "stride=65 must be between 1 and window (64)"),
    (["name=../x"], "name"),
    (["questions=[{question: hi, expected: [json]}]"], "expected"),
])
def test_bad_configs_are_one_line_errors(argv, fragment):
    with pytest.raises((ConfigError, ValueError)) as err:
        parse(*argv)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


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
