"""The evaluation job: in-process on the tiny model, and its bad-input answers via the real CLI."""

import json
import math

import pytest
import torch

from cluster.config import load_config
from jobs.evaluate import EvaluateConfig, evaluate, main
from ops.lora import add_lora
from ops.model import load_model, load_tokenizer
from tests.conftest import run_cli, run_module

REPORT_KEYS = {"perplexity", "tokens", "window", "stride", "prefill_ms_per_token", "decode_ms_per_token",
               "size_mb", "model"}


@pytest.mark.integration
def test_report_matches_direct_transformers_loss(ray_local, tiny_model_dir, tiny_text_file, tmp_path):
    cfg = load_config(EvaluateConfig, overrides=[
        f"model={tiny_model_dir}", f"data={tiny_text_file}", f"storage={tmp_path}", "name=t", "eval.window=256",
        "eval.stride=256", "eval.max_tokens=256", "eval.latency.new_tokens=2", "eval.latency.repeats=1"])
    report = main(cfg)
    saved = json.loads((tmp_path / "reports" / "t" / "report.json").read_text())
    assert REPORT_KEYS <= saved.keys() and saved["perplexity"] == report["perplexity"]
    assert (tmp_path / "reports" / "t" / "config.yaml").is_file()
    tok = load_tokenizer(str(tiny_model_dir))
    ids = tok(tiny_text_file.read_text(), add_special_tokens=False, return_tensors="pt")["input_ids"][:, :256]
    with torch.no_grad():
        loss = load_model(str(tiny_model_dir))(input_ids=ids, labels=ids).loss.item()
    assert saved["tokens"] == 256
    assert saved["perplexity"] == pytest.approx(math.exp(loss), rel=1e-4)


def test_help_lists_keys():
    proc = run_cli("jobs.evaluate", "--help")
    assert proc.returncode == 0
    for key in ("model", "data", "eval.window", "eval.stride", "eval.max_tokens", "eval.latency.new_tokens",
                "eval.num_threads", "storage"):
        assert f"  {key} " in proc.stdout


def _one_line_error(proc, fragment):
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and fragment in errors[0], proc.stderr


@pytest.mark.parametrize("args, fragment", [
    (["model=/nonexistent/model"], "model path '/nonexistent/model' does not exist"),
    (["model=nobody/no-such-model-xyz"], "unknown model 'nobody/no-such-model-xyz'"),
    (["colour=red"], "unknown config key 'colour'"),
    (["eval.stride=abc"], "bad value for 'eval.stride'"),
    (["eval.window=128", "eval.stride=256"], "stride=256 must be between 1 and window (128)"),
    (["data=/nonexistent.txt"], "data '/nonexistent.txt' does not exist"),
])
def test_bad_input_is_one_line(args, fragment, tiny_model_dir, tmp_path):
    base = [f"model={tiny_model_dir}", f"storage={tmp_path}"]
    proc = run_cli("jobs.evaluate", *base, *args)
    _one_line_error(proc, fragment)


@pytest.mark.subprocess
def test_empty_data_file(tiny_model_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    proc = run_module("jobs.evaluate", f"model={tiny_model_dir}", f"data={empty}", f"storage={tmp_path}")
    _one_line_error(proc, "holds no text")


@pytest.mark.subprocess
def test_parquet_without_column(tiny_model_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"body": ["x"]}), path)
    proc = run_module("jobs.evaluate", f"model={tiny_model_dir}", f"data={path}", f"storage={tmp_path}",
                      "text_field=content")
    _one_line_error(proc, "has no column 'content'")


@pytest.mark.integration
def test_evaluate_applies_adapter(ray_local, tiny_model_dir, tiny_text_file, tmp_path):
    from peft import PeftModel

    torch.manual_seed(0)
    lora = add_lora(load_model(str(tiny_model_dir)), r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # B starts at zero; make the adapter change the logits
    lora.save_pretrained(tmp_path / "adapter")

    common = [f"model={tiny_model_dir}", f"data={tiny_text_file}", "eval.window=32", "eval.stride=32", "eval.max_tokens=96",
              "eval.latency.enabled=false", f"storage={tmp_path}"]
    base = evaluate(load_config(EvaluateConfig, None, common))
    adapted = evaluate(load_config(EvaluateConfig, None, [*common, f"adapter={tmp_path / 'adapter'}"]))
    assert adapted["adapter"] == str(tmp_path / "adapter")
    assert adapted["perplexity"] != pytest.approx(base["perplexity"], rel=1e-3)

    plain = PeftModel.from_pretrained(load_model(str(tiny_model_dir)), str(tmp_path / "adapter")).eval()
    assert adapted["parameters"] == sum(p.numel() for p in {p.data_ptr(): p for p in plain.parameters()}.values())
