"""storage=s3://<bucket>/<prefix> against a real S3 protocol server on loopback (tests/s3.py).

Every read here starts from an emptied node-local cache, so what a job or the app reads can only
have come from the bucket."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.conftest import _free_port, run_module
from tests.jobs.test_train import TINY_OVERRIDES
from tests.s3 import CACHE, empty_cache, keys

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def test_publish_fetch_list_remove_round_trip(bucket):
    from ops import artifacts

    with artifacts.publish(bucket, "reports", "r") as out:
        (out / "a.json").write_text("1")
        (out / "sub").mkdir()
        (out / "sub" / "b.txt").write_text("b")
    assert keys(bucket) == ["reports/r/a.json", "reports/r/sub/b.txt"]
    empty_cache()
    got = artifacts.local(bucket, "reports", "r")
    assert got is not None and got.is_relative_to(CACHE) and (got / "sub" / "b.txt").read_text() == "b"
    # Republished elsewhere (another node): the next read here sees the new content, not the cache.
    with artifacts.publish(bucket, "reports", "r") as out:
        (out / "a.json").write_text("2")
    empty_cache()
    assert (artifacts.local(bucket, "reports", "r") / "a.json").read_text() == "2"
    assert keys(bucket) == ["reports/r/a.json"]  # the old object of the earlier copy is gone
    assert artifacts.names(bucket, "reports") == ["r"] and artifacts.local(bucket, "reports", "nope") is None
    assert artifacts.remove(bucket, "reports", "r") and keys(bucket) == []


def test_train_lora_two_workers_resumes_from_the_bucket(ray_local, bucket, tiny_model_dir, tiny_text_file):
    from cluster.config import load_config
    from jobs.train import HISTORY_FILE, TrainConfig, main
    from ops import artifacts

    def run(steps: int):
        cfg = load_config(TrainConfig, "configs/train_lora_smoke.yaml", [
            f"model={tiny_model_dir}", f"data={tiny_text_file}", f"storage={bucket}", "name=s3run", "max_tokens=0",
            "num_workers=2", *TINY_OVERRIDES, f"max_steps={steps}"])
        return main(cfg)

    run(2)
    stored = keys(bucket)
    assert any(k.startswith("runs/s3run/") and k.endswith("adapter_model.safetensors") for k in stored), stored
    assert {"adapters/s3run/adapter_model.safetensors", "adapters/s3run/manifest.json"} <= set(stored)
    # The second run has nothing local: it resumes from the checkpoint in the bucket.
    empty_cache()
    out = run(4)
    history = [json.loads(line) for line in (artifacts.local_root(bucket) / "runs" / "s3run" / HISTORY_FILE)
               .read_text().splitlines()]
    assert history[0] == {"event": "start", "step": 2}, history[:2]
    assert [h["step"] for h in history[1:]] == [3, 4]
    manifest = artifacts.read_manifest(out)
    assert manifest.kind == "adapter" and manifest.run == f"{bucket}/runs/s3run" and manifest.step in (2, 4)
    assert json.loads((out / "metrics.json").read_text())["steps"] == 4


def test_index_and_serve_read_adapter_and_index_from_the_bucket(ray_local, bucket, tiny_model_dir, tmp_path):
    from ray import serve

    from cluster.config import load_config
    from jobs import index
    from ops import artifacts
    from serve.app import build_app
    from tests.serve.conftest import save_tiny_adapter, tiny_documents, wait_ready

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"id": d["id"], "text": d["text"]}) for d in tiny_documents()))
    index.main(load_config(index.IndexConfig, None, [f"data={corpus}", "name=tiny", f"storage={bucket}", "workers=1",
                                                     "chunk.size=200", "chunk.overlap=20"]))
    save_tiny_adapter(tiny_model_dir, tmp_path / "lora")
    with artifacts.publish(bucket, "adapters", "tiny-lora") as out:
        for f in (tmp_path / "lora").iterdir():
            (out / f.name).write_bytes(f.read_bytes())
    assert {"indexes/tiny/index.faiss", "indexes/tiny/manifest.json",
            "adapters/tiny-lora/adapter_config.json"} <= set(keys(bucket))
    empty_cache()

    port = _free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_app({"storage": bucket, "model": str(tiny_model_dir), "model_id": "tiny", "index": "tiny",
                         "max_seq_len": 512, "num_threads": 1, "request_timeout_s": 60, "compile": False})
        serve.run(app, name="rag", route_prefix="/", blocking=False)
        url = f"http://127.0.0.1:{port}"
        wait_ready(url)
        models = httpx.get(f"{url}/v1/models", timeout=30)
        assert models.status_code == 200, models.text
        assert {m["id"] for m in models.json()["data"]} == {"tiny", "tiny-lora"}
        r = httpx.post(f"{url}/v1/rag", json={"question": "Who jumps over the lazy dog?", "max_tokens": 4,
                                             "adapter": "tiny-lora"}, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "tiny-lora" and r.json()["sources"]
    finally:
        serve.shutdown()
    # The replicas read both from the bucket into this node's (emptied) cache.
    mirror = artifacts.local_root(bucket)
    assert (mirror / "indexes" / "tiny" / "index.faiss").is_file()
    assert (mirror / "adapters" / "tiny-lora" / "adapter_config.json").is_file()


def test_quantize_writes_artifact_and_report_to_the_bucket(bucket, tiny_model_dir, tiny_text_file):
    proc = run_module("jobs.quantize", f"model={tiny_model_dir}", f"data={tiny_text_file}", "name=q",
                      f"storage={bucket}", "methods=[weight_only_int8]", "eval.max_tokens=128", "eval.window=64",
                      "eval.stride=64", "eval.latency.enabled=false", timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stored = set(keys(bucket))
    assert {"quantized/q-weight_only_int8/quantization.json", "quantized/q-weight_only_int8/report.json",
            "reports/q/report.json", "reports/q/quantization.md"} <= stored, stored
    empty_cache()
    from ops import artifacts
    from ops.model import load_model

    model = load_model("quantized/q-weight_only_int8", storage=bucket)  # fetched from the bucket
    assert model is not None and (artifacts.local_root(bucket) / "quantized" / "q-weight_only_int8").is_dir()


def test_tune_smoke_sweeps_on_the_bucket(ray_local, bucket, tiny_model_dir, tiny_text_file, tmp_path):
    import yaml

    from cluster.config import load_config
    from jobs.tune import TuneJobConfig, main

    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({
        "name": "s3sweep", "search": "grid", "scheduler": "fifo", "trial_cpus": 1,
        "train": {"model": str(tiny_model_dir), "data": str(tiny_text_file), "num_workers": 1, "block_size": 32,
                  "batch_size": 4, "max_steps": 2, "eval_every": 2, "val_blocks": 2, "eval_batch_size": 2,
                  "warmup_steps": 1, "shuffle": False, "lora": {"dropout": 0.0, "target_modules": ["q_proj"]}},
        "space": {"lora_r": [2], "quant": ["wo_int8"], "target_modules": [["q_proj"]]},
        "eval": {"max_tokens": 64, "rows": 4, "new_tokens": 2}}))
    main(load_config(TuneJobConfig, str(config), [f"storage={bucket}"]))  # on the shared in-process cluster
    stored = set(keys(bucket))
    summary_key = "reports/s3sweep/summary.json"
    assert {summary_key, "reports/s3sweep/trials.md", "adapters/s3sweep-best/adapter_model.safetensors",
            "quantized/s3sweep-best/quantization.json"} <= stored, sorted(stored)
    assert any(k.startswith("runs/s3sweep/") and k.endswith("tuner.pkl") for k in stored)
    empty_cache()
    from ops import artifacts

    summary = json.loads((artifacts.require(bucket, "reports", "s3sweep") / "summary.json").read_text())
    assert summary["finished"] == 1 and summary["exported"]["quantized"] == f"{bucket}/quantized/s3sweep-best"
