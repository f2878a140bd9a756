"""The sweep through its real entrypoint on a loopback cluster, on the tiny model (integration)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from cluster.config import ConfigError, load_config
from jobs.tune import TuneJobConfig, choose_winner, pareto_front
from tests.conftest import REPO

pytestmark = pytest.mark.integration


def _config(tmp_path, tiny_model_dir, tiny_text_file, name):
    cfg = {
        "name": name, "search": "grid", "scheduler": "asha", "trial_cpus": 1,
        "train": {"model": str(tiny_model_dir), "data": str(tiny_text_file), "num_workers": 1, "block_size": 32,
                  "batch_size": 4, "max_steps": 4, "eval_every": 2, "val_blocks": 2, "eval_batch_size": 2,
                  "warmup_steps": 1, "lr": 2e-3, "shuffle": False,
                  "lora": {"dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}},
        # 7 does not divide the tiny model's layers: that recipe's trials fail after training.
        "recipes": {"none": {"method": "none"}, "wo_int8": {"method": "weight_only_int8"}, "bf16": {"method": "bf16"},
                    "bad_int4": {"method": "weight_only_int4", "group_size": 7}},
        "space": {"lora_r": [2], "quant": ["none", "wo_int8", "bad_int4"],
                  "target_modules": [["q_proj", "v_proj"]]},
        "eval": {"max_tokens": 128, "window": 64, "stride": 64, "prompt_tokens": 8, "new_tokens": 4, "repeats": 1},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(config, storage, *extra, timeout=900):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": ""}
    return subprocess.run([sys.executable, "-m", "jobs.tune", "--config", str(config), f"storage={storage}", *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_sweep_reports_failed_trials_and_exports_a_servable_winner(tmp_path, tiny_model_dir, tiny_text_file):
    config = _config(tmp_path, tiny_model_dir, tiny_text_file, "sweep")
    proc = _run(config, tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = tmp_path / "reports" / "sweep"
    rows = json.loads((report / "trials.json").read_text())
    table = pd.read_parquet(report / "trials.parquet")
    summary = json.loads((report / "summary.json").read_text())
    assert len(rows) == len(table) == summary["trials"] == 3
    assert sorted(table["trial_id"]) == sorted(r["trial_id"] for r in rows)
    failed = [r for r in rows if r["status"] == "ERROR"]
    assert len(failed) == summary["failed"] == 1 and failed[0]["quant"] == "bad_int4"
    assert all("group_size" in r["error"] for r in failed)
    finished = [r for r in rows if r["status"] == "TERMINATED"]
    assert summary["finished"] == len(finished) == 2
    assert set(summary["pareto"]) == set(pareto_front(rows))
    assert summary["winner"]["trial_id"] == choose_winner(rows, 0.02)["trial_id"]
    md = (report / "trials.md").read_text()
    assert all(r["trial_id"] in md for r in rows) and "**winner**" in md
    assert (report / "pareto.png").stat().st_size > 1000

    # The winner is registered by name and loads in the generator.
    from ops.engine import Engine, EngineConfig, Request
    from ops.model import load_model, load_tokenizer

    spec = "quantized/sweep-best" if summary["winner"]["quant"] != "none" else "adapters/sweep-best"
    model = load_model(spec, storage=tmp_path)
    tok = load_tokenizer(spec, storage=tmp_path)
    with Engine(model, tok, EngineConfig(max_batch_size=1, max_seq_len=128)) as engine:
        out = engine.generate_sync([Request(prompt="The quick brown fox", max_tokens=4, ignore_eos=True)])[0]
    assert out.completion_tokens == 4
    recipe = json.loads((tmp_path / "adapters" / "sweep-best" / "recipe.json").read_text())
    assert recipe["quantization"]["method"] in ("none", "weight_only_int8")

    # Re-running the same name resumes: nothing finished is trained again.
    mtimes = {r["trial_id"]: os.path.getmtime(r["adapter"]) for r in finished}
    again = _run(config, tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resuming sweep sweep" in again.stdout
    assert all(os.path.getmtime(r["adapter"]) == mtimes[r["trial_id"]] for r in finished)

    # fresh=true starts over and leaves no trial directories of the earlier sweep behind.
    fresh = _run(config, tmp_path, "fresh=true")
    assert fresh.returncode == 0, fresh.stdout[-3000:] + fresh.stderr[-3000:]
    assert "fresh: removed the earlier sweep" in fresh.stdout
    new_rows = json.loads((report / "trials.json").read_text())
    assert not {r["trial_id"] for r in new_rows} & {r["trial_id"] for r in rows}
    assert not any(Path(r["adapter"]).exists() for r in finished)
    left = {p.name for p in (tmp_path / "adapters").glob("sweep-*")} - {"sweep-best"}
    assert left and all(name.removeprefix("sweep-") in {r["trial_id"] for r in new_rows} for name in left)


def test_interrupted_sweep_restores_and_finishes_only_the_rest(tmp_path, tiny_model_dir, tiny_text_file):
    config = _config(tmp_path, tiny_model_dir, tiny_text_file, "cut")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": ""}
    proc = subprocess.Popen([sys.executable, "-m", "jobs.tune", "--config", str(config), f"storage={tmp_path}",
                             "space.quant=[none,wo_int8,bf16]"], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    adapters = tmp_path / "adapters"

    def finished_trials() -> dict[str, float]:
        """Adapters (and their mtimes) of trials whose final, measured result Tune has recorded."""
        done = {}
        for result in (tmp_path / "runs" / "cut").glob("*/result.json"):
            lines = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
            for r in lines:
                if "quant_perplexity" in r:
                    done[r["adapter"]] = os.path.getmtime(r["adapter"])
        return done

    try:
        deadline = time.time() + 600
        while time.time() < deadline and not finished_trials():
            time.sleep(2)
        time.sleep(12)  # Tune saves its experiment state every few seconds
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()  # the driver's local Ray cluster was in its process group and is gone too
    done_before = finished_trials()
    assert 1 <= len(done_before) < 3
    again = _run(config, tmp_path, "space.quant=[none,wo_int8,bf16]")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resuming sweep cut" in again.stdout
    rows = json.loads((tmp_path / "reports" / "cut" / "trials.json").read_text())
    assert len(rows) == 3 and all(r["status"] == "TERMINATED" for r in rows)
    for adapter, mtime in done_before.items():
        assert os.path.getmtime(adapter) == mtime, f"{adapter} was trained again"
    assert len(list(adapters.glob("cut-*"))) == 3 + 1  # three trials and the exported winner


@pytest.mark.parametrize("override, fragment", [
    (["space.quant=[nope]"], "unknown recipes ['nope']"),
    (["space.lora_r=[0]"], "space.lora_r must be >= 1"),
    (["search=bayes"], "bad value for 'search'"),
])
def test_bad_sweep_configs(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        load_config(TuneJobConfig, overrides=override)


def test_the_training_learning_rate_applies_unless_the_space_sweeps_it():
    from cluster.config import load_config
    from jobs.tune import TuneJobConfig, param_space

    assert param_space(load_config(TuneJobConfig, None, ["train.lr=2e-3"]))["lr"] == 2e-3
    swept = param_space(load_config(TuneJobConfig, None, ["train.lr=2e-3", "space.lr=[1e-3,3e-3]"]))["lr"]
    assert swept == {"grid_search": [1e-3, 3e-3]}


def test_a_fresh_sweep_clears_only_the_earlier_trials_artifacts(tmp_path):
    from jobs.tune import clear_trial_artifacts

    names = ["demo-702f4_00003", "demo-best", "demo", "demo-extra-702f4_00001", "other-702f4_00003"]
    for kind in ("runs", "adapters"):
        for name in names:
            (tmp_path / kind / name).mkdir(parents=True)
    assert clear_trial_artifacts(str(tmp_path), "demo") == 2
    for kind in ("runs", "adapters"):
        assert sorted(p.name for p in (tmp_path / kind).iterdir()) == sorted(names[1:])
    assert clear_trial_artifacts(str(tmp_path / "empty"), "demo") == 0
