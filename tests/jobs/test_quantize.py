"""The quantize job through its real entrypoint on a tiny Llama, and a quantized artifact through evaluate."""

import json

import pytest

from tests.conftest import run_cli, run_module

SMALL = ["eval.max_tokens=256", "eval.window=64", "eval.stride=32", "calibration.samples=4", "calibration.seq_len=32",
         "eval.latency.repeats=1", "eval.latency.prompt_tokens=16", "eval.latency.new_tokens=4"]


@pytest.mark.subprocess
@pytest.mark.integration
def test_quantize_then_evaluate(ray_head, tiny_model_dir, tiny_text_file, tmp_path):
    storage = tmp_path / "st"
    proc = run_module("jobs.quantize", f"model={tiny_model_dir}", f"data={tiny_text_file}", "name=t",
                      f"storage={storage}", "methods=[static_int8,weight_only_int8]", *SMALL, head=ray_head)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((storage / "reports" / "t" / "report.json").read_text())
    rows = {r["method"]: r for r in report["rows"]}
    assert set(rows) == {"float32", "static_int8", "weight_only_int8"}
    for method in ("static_int8", "weight_only_int8"):
        assert rows[method]["reload_exact"] is True
        assert abs(rows[method]["perplexity_ratio"] - 1) < 0.02
        assert rows[method]["size_ratio"] < 0.5
        assert (storage / "quantized" / f"t-{method}" / "report.json").is_file()
    assert "| static_int8 |" in (storage / "reports" / "t" / "quantization.md").read_text()

    artifact = storage / "quantized" / "t-static_int8"
    proc = run_module("jobs.evaluate", f"model={artifact}", f"data={tiny_text_file}", "name=e", f"storage={storage}",
                      "eval.max_tokens=256", "eval.window=64", "eval.stride=32", "eval.latency.enabled=false",
                      head=ray_head)
    assert proc.returncode == 0, proc.stderr[-3000:]
    evaluated = json.loads((storage / "reports" / "e" / "report.json").read_text())
    assert evaluated["perplexity"] == pytest.approx(rows["static_int8"]["perplexity"], rel=1e-6)


@pytest.mark.parametrize("args, fragment", [
    (["methods=[int3]"], "unknown method 'int3'"),
    (["methods=[weight_only_int4]", "weight_only_int4.group_size=64"], "group_size=64 does not divide"),
    (["methods=[static_int8]", "calibration.data=/nonexistent/calib.txt"], "data '/nonexistent/calib.txt' does not exist"),
])
def test_bad_input_is_one_error_line(tiny_model_dir, tiny_text_file, tmp_path, args, fragment):
    proc = run_cli("jobs.quantize", f"model={tiny_model_dir}", f"data={tiny_text_file}",
                   f"storage={tmp_path}", *args)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and fragment in errors[0], proc.stderr[-2000:]
