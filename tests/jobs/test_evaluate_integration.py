"""`ray job submit` of the evaluation job on the embedded default against a loopback cluster."""

import json
import math
import uuid

import pytest
import torch

from ops.model import DEFAULT_MODEL, load_model, load_tokenizer
from tests.conftest import REPO, run_module, shared_file

# `ray job submit` to a loopback head: a child process and a Ray cluster.
pytestmark = [pytest.mark.integration, pytest.mark.subprocess]
SLICE = ["eval.max_tokens=512", "eval.window=256", "eval.stride=128", "eval.latency.new_tokens=4", "eval.latency.repeats=1"]


def _report(storage, name):
    return json.loads((storage / "reports" / name / "report.json").read_text())


@pytest.mark.slow
def test_job_submit_matches_local_run_and_transformers(ray_head, embedded_storage):
    data = shared_file("wikitext2_valid.txt")
    name = f"submit-{uuid.uuid4().hex[:6]}"
    args = ["python", "-m", "jobs.evaluate", f"model={DEFAULT_MODEL}", f"data={data}",
            f"storage={embedded_storage}", f"name={name}", *SLICE]
    proc = ray_head.submit(*args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "perplexity=" in proc.stdout and "SUCCEEDED" in proc.stdout
    submitted = _report(embedded_storage, name)

    # The same job run directly (a driver of its own, attached to the same cluster).
    local = run_module("jobs.evaluate", *args[3:-1], f"name={name}-local", "eval.latency.enabled=false", head=ray_head)
    assert local.returncode == 0, local.stderr[-3000:]
    assert _report(embedded_storage, f"{name}-local")["perplexity"] == pytest.approx(submitted["perplexity"],
                                                                                    rel=1e-6)
    # Direct transformers computation on the same tokens, window by window (stride 128 of 256).
    tok = load_tokenizer(DEFAULT_MODEL, storage=embedded_storage)
    ids = tok(data.read_text()[:8000], add_special_tokens=False, return_tensors="pt")["input_ids"][0, :512]
    model = load_model(DEFAULT_MODEL, storage=embedded_storage)
    nll, count, prev_end = 0.0, 0, 0
    with torch.no_grad():
        for begin in range(0, 512, 128):
            end = min(begin + 256, 512)
            labels = ids[begin:end].clone()
            labels[: max(prev_end - begin, 0)] = -100
            out = model(input_ids=ids[None, begin:end], labels=labels[None])
            n = int((labels[1:] != -100).sum())
            nll += out.loss.item() * n
            count += n
            prev_end = end
            if end == 512:
                break
    assert submitted["tokens"] == 512 and submitted["predicted_tokens"] == count
    assert submitted["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-4)


def test_raw_job_submit_with_relative_storage_lands_in_launch_dir(ray_head, tiny_model_dir, tmp_path):
    """`ray job submit --working-dir .` runs in a temporary copy; relative storage must not vanish there."""
    name = f"raw-{uuid.uuid4().hex[:6]}"
    entry = ["python", "-m", "jobs.evaluate", f"model={tiny_model_dir}", "data=stdlib", "storage=./artifacts",
             f"name={name}", "eval.max_tokens=256", "eval.window=128", "eval.stride=128", "eval.latency.enabled=false"]
    refused = ray_head.submit(*entry, raw=True)
    assert refused.returncode != 0
    assert "is relative, but this job runs in a temporary copy" in refused.stdout + refused.stderr
    env_json = json.dumps({"env_vars": {"RAYLM_LAUNCH_DIR": str(tmp_path)}})
    ok = ray_head.submit(*entry, raw=True, extra=("--runtime-env-json", env_json))
    assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr[-3000:]
    assert (tmp_path / "artifacts" / "reports" / name / "report.json").is_file()
    assert not (REPO / "artifacts" / "reports" / name).exists()
