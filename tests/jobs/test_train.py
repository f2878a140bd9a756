"""jobs.train: config errors, schedule, and (integration) distributed equivalence, lost-worker
resume, export loading with plain PEFT, the smoke config through the entrypoint and `ray job submit`."""

import json
import subprocess
from pathlib import Path

import pytest
import torch

from jobs.train import FAIL_MARKER, HISTORY_FILE, TrainConfig, lr_lambda
from tests.conftest import REPO, run_cli, run_module

TINY_OVERRIDES = ("block_size=16", "batch_size=2", "max_steps=4", "eval_every=2", "val_blocks=4",
                  "eval_batch_size=4", "warmup_steps=1", "lora.r=4", "lora.alpha=8", "lora.dropout=0.0")


def _single_error_line(proc: subprocess.CompletedProcess, fragment: str) -> None:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and fragment in errors[0], proc.stderr[-2000:]


@pytest.mark.parametrize("override, fragment", [
    ("method=foo", "bad value for 'method'"),
    ("num_workers=0", "num_workers must be >= 1, got 0"),
    ("lora.r=0", "lora.r must be >= 1, got 0"),
])
def test_bad_input_is_one_line(tiny_model_dir, tiny_text_file, tmp_path, override, fragment):
    proc = run_cli("jobs.train", f"model={tiny_model_dir}", f"data={tiny_text_file}", f"storage={tmp_path}",
                   override)
    _single_error_line(proc, fragment)


@pytest.mark.subprocess  # the target modules are checked against the model where it loads, after Ray starts
def test_unknown_lora_target_is_one_line(ray_head, tiny_model_dir, tiny_text_file, tmp_path):
    proc = run_module("jobs.train", f"model={tiny_model_dir}", f"data={tiny_text_file}", f"storage={tmp_path}",
                      "lora.target_modules=[qkv_proj]", timeout=120, head=ray_head)
    _single_error_line(proc, "['qkv_proj'] match no linear layer of the model; valid:")


@pytest.mark.subprocess
@pytest.mark.integration
@pytest.mark.parametrize("override, fragment", [
    ("num_workers=64", "num_workers=64 x cpus_per_worker=1 needs 64 CPUs"),
    ("batch_size=100000", "make no global batch of batch_size=100000 x num_workers=2"),
])
def test_cluster_and_data_limits_are_one_line(ray_head, tiny_model_dir, tiny_text_file, tmp_path, override,
                                              fragment):
    proc = run_module("jobs.train", f"model={tiny_model_dir}", f"data={tiny_text_file}", f"storage={tmp_path}",
                      "block_size=16", override, timeout=180, head=ray_head)
    _single_error_line(proc, fragment)


def test_warmup_then_cosine():
    values = [lr_lambda(s, warmup=4, total=20, min_ratio=0.1) for s in range(21)]
    assert values[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert values[4] == pytest.approx(1.0) and values[20] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values[4:], values[5:]))


def test_config_defaults_target_attention_and_mlp():
    cfg = TrainConfig()
    assert cfg.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert {"train_lora.yaml", "train_full.yaml", "train_lora_smoke.yaml", "train_full_smoke.yaml"} <= {
        p.name for p in (REPO / "configs").iterdir()}


def dedup_by_resumption(lines: list[dict]) -> list[int]:
    """Steps of a raw metrics log after dropping what a resume rolled back."""
    steps: list[int] = []
    for row in lines:
        if row.get("event") == "start":
            steps = [s for s in steps if s <= row["step"]]
        else:
            steps.append(row["step"])
    return steps


@pytest.mark.subprocess
@pytest.mark.integration
def test_smoke_survives_lost_worker_and_resumes_by_name(ray_head, tiny_model_dir, tiny_text_file, tmp_path):
    args = ("--config", "configs/train_lora_smoke.yaml", f"model={tiny_model_dir}", f"data={tiny_text_file}",
            f"storage={tmp_path}", "name=lost", "max_tokens=0", *TINY_OVERRIDES, "max_steps=6")
    # Ray Train's controller takes one report per worker per health-check interval (2 s by
    # default); these steps are faster, so a shorter interval keeps checkpoints registered promptly.
    env = {"RAYLM_FAIL_AT_STEP": "4", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}
    proc = run_module("jobs.train", *args, env=env, timeout=300, head=ray_head)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "lost"
    assert (run / FAIL_MARKER).is_file()  # rank 1 really died at step 4
    raw = [json.loads(line) for line in (run / HISTORY_FILE).read_text().splitlines()]
    assert [r["step"] for r in raw if "event" in r] == [0, 2]  # resumed from the step-2 checkpoint
    assert [r["step"] for r in raw if "event" not in r] == [1, 2, 3, 3, 4, 5, 6]
    assert dedup_by_resumption(raw) == [1, 2, 3, 4, 5, 6]
    out = tmp_path / "adapters" / "lost"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 6 and metrics["tokens"] == 6 * 2 * 2 * 16
    assert [h["step"] for h in json.loads((out / "history.json").read_text())] == [1, 2, 3, 4, 5, 6]
    assert json.loads((out / "manifest.json").read_text())["kind"] == "adapter"
    assert (out / "curves.png").stat().st_size > 0 and (out / "config.yaml").is_file()

    again = run_module("jobs.train", *args, timeout=300, head=ray_head)  # same name: resumes at the end, no new steps
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from step 6" in again.stdout + again.stderr
    assert json.loads((out / "metrics.json").read_text())["steps"] == 6


def _run_in_process(tiny_model_dir, tiny_text_file, storage: Path, name: str, *overrides: str) -> Path:
    from cluster.config import load_config
    from jobs.train import main

    cfg = load_config(TrainConfig, "configs/train_lora_smoke.yaml", [
        f"model={tiny_model_dir}", f"data={tiny_text_file}", f"storage={storage}", f"name={name}", "max_tokens=0",
        "shard=stride", "shuffle=false", "lr=1e-2", *TINY_OVERRIDES, *overrides])
    return main(cfg)


@pytest.mark.integration
def test_two_workers_match_one_worker_with_double_batch(ray_local, tiny_model_dir, tiny_text_file, tmp_path):
    """shard=stride: every worker reads the same ordered stream and takes its slice of each global
    batch, so 2 workers x b see exactly the rows of 1 worker x 2b; DDP averages the gradients."""
    one = _run_in_process(tiny_model_dir, tiny_text_file, tmp_path, "one", "num_workers=1", "batch_size=4")
    two = _run_in_process(tiny_model_dir, tiny_text_file, tmp_path, "two", "num_workers=2", "batch_size=2",
                          "merge=true")
    h1 = json.loads((one / "history.json").read_text())
    h2 = json.loads((two / "history.json").read_text())
    assert [h["step"] for h in h1] == [h["step"] for h in h2] == [1, 2, 3, 4]
    for a, b in zip(h1, h2):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3)
    assert h2[-1]["val_perplexity"] == pytest.approx(h1[-1]["val_perplexity"], rel=1e-4)
    assert h1[-1]["loss"] < h1[0]["loss"]

    from peft import PeftModel

    from ops.model import load_model

    ids = torch.arange(1, 33).reshape(2, 16)
    with torch.no_grad():
        plain = PeftModel.from_pretrained(load_model(str(tiny_model_dir)), str(two)).eval()
        ours = load_model(str(two), storage=tmp_path)  # dispatches through manifest/adapter_config
        merged = load_model(str(tmp_path / "models" / "two-merged"))
        expected = ours(input_ids=ids).logits
        torch.testing.assert_close(plain(input_ids=ids).logits, expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=0, atol=1e-4)
    metrics = json.loads((two / "metrics.json").read_text())
    assert metrics["best_val_perplexity"] <= metrics["initial_val_perplexity"]


@pytest.mark.subprocess
@pytest.mark.integration
def test_smoke_through_ray_job_submit(ray_head, tiny_model_dir, tiny_text_file, tmp_path):
    # The head runs `python` from this virtualenv (tests/conftest.py RayHead puts it first on PATH).
    proc = run_module("cluster.submit", "--address", ray_head.dashboard, "--", "python", "-m", "jobs.train",
                      "--config", "configs/train_full_smoke.yaml", f"model={tiny_model_dir}",
                      f"data={tiny_text_file}", f"storage={tmp_path}", "name=submitted", "max_tokens=0",
                      *[o for o in TINY_OVERRIDES if not o.startswith("lora.")], timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "[train] step 4/4" in proc.stdout
    out = tmp_path / "models" / "submitted"
    assert json.loads((out / "manifest.json").read_text())["kind"] == "model"
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
