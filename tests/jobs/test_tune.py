"""jobs.tune: sweeps through the real entrypoint (a child process attached to the session's Ray
head) on the tiny model, and the report's rules and config checks in-process."""

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from ray.tune.schedulers import ASHAScheduler

from cluster.config import ConfigError, load_config
from jobs.tune import TuneJobConfig, choose_winner, pareto_front
from tests.conftest import REPO, RayHead


def _config(tmp_path, tiny_model_dir, tiny_text_file, name):
    cfg = {
        # ASHA may stop a trial only at the last step: the trials train alike (the recipes differ after
        # training), so at an earlier rung float noise alone decided whether the failing recipe was
        # stopped before it could fail (STOPPED instead of ERROR, once in six full runs).
        "name": name, "search": "grid", "scheduler": "asha", "grace_steps": 4, "trial_cpus": 1,
        "train": {"model": str(tiny_model_dir), "data": str(tiny_text_file), "num_workers": 1, "block_size": 32,
                  "batch_size": 4, "max_steps": 4, "eval_every": 2, "val_blocks": 2, "eval_batch_size": 2,
                  "warmup_steps": 1, "lr": 2e-3, "shuffle": False,
                  "lora": {"dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}},
        # 7 does not divide the tiny model's layers: that recipe's trials fail after training.
        "recipes": {"none": {"method": "none"}, "wo_int8": {"method": "weight_only_int8"}, "bf16": {"method": "bf16"},
                    "bad_int4": {"method": "weight_only_int4", "group_size": 7},
                    "served_int8": {"method": "weight_only_int8", "unmerged": True}},
        "space": {"lora_r": [2], "quant": ["none", "wo_int8", "bad_int4"],
                  "target_modules": [["q_proj", "v_proj"]]},
        "eval": {"max_tokens": 128, "rows": 4, "new_tokens": 4},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _tune_config_on_disk(run_dir: Path):
    """The TuneConfig Tune itself saved for the sweep (tuner.pkl): the scheduler and searcher it ran."""
    return pickle.loads((run_dir / "tuner.pkl").read_bytes())["_tune_config"]


def _experiment_trials(run_dir: Path) -> dict[str, dict]:
    """Tune's own record of each trial (status, last result) from the newest experiment_state-*.json,
    which Tune rewrites every ~10 s while a sweep runs and which `Tuner.restore` resumes from."""
    states = sorted(run_dir.glob("experiment_state-*.json"), key=lambda p: p.stat().st_mtime)
    if not states:
        return {}
    try:
        data = json.loads(states[-1].read_text())
    except ValueError:  # read while Tune was writing it
        return {}
    trials = {}
    for trial_json, metadata_json in data["trial_data"]:
        trial, metadata = json.loads(trial_json), json.loads(metadata_json)
        trials[trial["trial_id"]] = {"status": trial["status"], "last_result": metadata["last_result"]}
    return trials


def _final_results(run_dir: Path) -> dict[str, dict]:
    """Each finished trial's final result as Tune wrote it to the trial's result.json."""
    finals = {}
    for path in run_dir.glob("*/result.json"):
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        finals.update({r["trial_id"]: r for r in lines if "quant_perplexity" in r})
    return finals


def _tune_env(head: RayHead) -> dict[str, str]:
    # The driver attaches to the session's Ray head: the real entrypoint and a real cluster,
    # without a Ray start per sweep.
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": head.address}


def _run(head: RayHead, config, storage, *extra, timeout=900):
    return subprocess.run([sys.executable, "-m", "jobs.tune", "--config", str(config), f"storage={storage}", *extra],
                          cwd=REPO, env=_tune_env(head), capture_output=True, text=True, timeout=timeout)


def _wait_until_released(head: RayHead, timeout_s: float = 120) -> None:
    """Wait until the killed driver's trials have given their placement groups back: the GCS
    removes a dead job's actors and groups on its own, and the resumed sweep needs the CPUs."""
    from ray.util.state import list_placement_groups

    deadline = time.monotonic() + timeout_s
    while list_placement_groups(address=head.dashboard, filters=[("state", "=", "CREATED")],
                                raise_on_missing_output=False):
        assert time.monotonic() < deadline, f"the killed sweep's placement groups still exist after {timeout_s} s"
        time.sleep(0.5)  # poll interval


@pytest.mark.subprocess
def test_interrupted_sweep_resumes_reports_exports_a_servable_winner_and_fresh_starts_over(
        ray_head, tmp_path, tiny_model_dir, tiny_text_file, capsys):
    config = _config(tmp_path, tiny_model_dir, tiny_text_file, "sweep")
    proc = subprocess.Popen([sys.executable, "-m", "jobs.tune", "--config", str(config), f"storage={tmp_path}"],
                            cwd=REPO, env=_tune_env(ray_head), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    run_dir = tmp_path / "runs" / "sweep"
    try:
        # Interrupt once Tune's saved state records a finished trial: what a restore starts from.
        deadline = time.monotonic() + 600
        while not [t for t in _experiment_trials(run_dir).values() if t["status"] == "TERMINATED"]:
            assert proc.poll() is None, f"the sweep exited with {proc.returncode} before a trial finished"
            assert time.monotonic() < deadline, "no finished trial in Tune's experiment state within 600 s"
            time.sleep(1)  # poll interval
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver dies; the cluster removes its job's trials
        proc.wait()
    saved = _experiment_trials(run_dir)
    done_before = {tid: t["last_result"]["adapter"] for tid, t in saved.items() if t["status"] == "TERMINATED"}
    # At most two of the three trials run at once (2 CPUs each on the head's 4) and the sweep was
    # killed as soon as one was recorded: the resumed sweep has trials left to run.
    assert done_before and sum(t["status"] in ("TERMINATED", "ERROR") for t in saved.values()) < 3, saved
    mtimes = {adapter: os.path.getmtime(adapter) for adapter in done_before.values()}
    _wait_until_released(ray_head)

    again = _run(ray_head, config, tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resuming sweep sweep" in again.stdout
    report = tmp_path / "reports" / "sweep"
    rows = json.loads((report / "trials.json").read_text())
    assert {r["trial_id"] for r in rows} >= set(done_before)  # the same trials, not a new sweep
    for trial_id, adapter in done_before.items():
        assert os.path.getmtime(adapter) == mtimes[adapter], f"{trial_id} was trained again"
        assert [r["adapter"] for r in rows if r["trial_id"] == trial_id] == [adapter]

    table = pd.read_parquet(report / "trials.parquet")
    summary = json.loads((report / "summary.json").read_text())
    assert len(rows) == len(table) == summary["trials"] == 3
    assert sorted(table["trial_id"]) == sorted(r["trial_id"] for r in rows)
    assert sorted(r["quant"] for r in rows) == ["bad_int4", "none", "wo_int8"]
    assert isinstance(_tune_config_on_disk(run_dir).scheduler, ASHAScheduler)
    failed = [r for r in rows if r["status"] == "ERROR"]
    assert len(failed) == summary["failed"] == 1 and failed[0]["quant"] == "bad_int4"
    assert all("group_size" in r["error"] for r in failed)
    finished = [r for r in rows if r["status"] == "TERMINATED"]
    assert summary["finished"] == len(finished) == 2
    assert {p.name for p in (tmp_path / "adapters").glob("sweep-*")} == {
        f"sweep-{r['trial_id']}" for r in rows} | {"sweep-best"}
    # The report against Tune's own results: same numbers; front and winner recomputed here by a
    # sweep over perplexity order (the rule itself is checked on hand values below).
    tune_results = _final_results(run_dir)
    assert set(tune_results) == {r["trial_id"] for r in finished}
    for r in finished:
        for key in ("quant_perplexity", "decode_ms_per_token", "size_mb", "adapter"):
            assert r[key] == tune_results[r["trial_id"]][key], key
    front, fastest = set(), float("inf")
    for r in sorted(tune_results.values(), key=lambda r: (r["quant_perplexity"], r["decode_ms_per_token"])):
        if r["decode_ms_per_token"] < fastest:
            front.add(r["trial_id"])
            fastest = r["decode_ms_per_token"]
    assert set(summary["pareto"]) == front
    best = min(r["quant_perplexity"] for r in tune_results.values())
    eligible = [r for r in tune_results.values() if r["quant_perplexity"] <= best * 1.02]
    assert summary["winner"]["trial_id"] == min(eligible, key=lambda r: r["decode_ms_per_token"])["trial_id"]
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
    assert recipe["quantization"] == yaml.safe_load(config.read_text())["recipes"][summary["winner"]["quant"]]

    # fresh=true starts over: the sweep's Tuner is built anew, and the earlier sweep's state and its
    # trials' run/adapter directories are gone (in this process: building the Tuner is the part of
    # jobs.tune that fresh changes; the entrypoint runs a sweep above).
    from ray import tune

    from jobs.tune import tuner

    earlier = [p for kind in ("runs", "adapters") for r in rows for p in [tmp_path / kind / f"sweep-{r['trial_id']}"]
               if p.is_dir()]
    cfg = load_config(TuneJobConfig, str(config), [f"storage={tmp_path}", "fresh=true"])
    assert tune.Tuner.can_restore(str(run_dir))
    new = tuner(cfg, lambda config: None, 1)
    assert f"fresh: removed the earlier sweep and its {len(earlier)} trial run/adapter directories" in capsys.readouterr().out
    # a new experiment in the same place: none of the earlier one's trials or state is left
    assert isinstance(new, tune.Tuner) and not _experiment_trials(run_dir) and not list(run_dir.glob("*/result.json"))
    assert earlier and not any(p.exists() for p in earlier)
    assert not any(Path(r["adapter"]).exists() for r in finished)
    assert {p.name for p in (tmp_path / "adapters").glob("sweep-*")} == {"sweep-best"}  # the exported winner stays


@pytest.mark.subprocess
def test_optuna_search_with_fifo_scheduler_over_unmerged_trials(ray_head, tmp_path, tiny_model_dir, tiny_text_file):
    config = _config(tmp_path, tiny_model_dir, tiny_text_file, "opt")
    proc = _run(ray_head, config, tmp_path, "search=optuna", "scheduler=fifo", "num_samples=2", "space.lora_r=[2,4]",
                "space.quant=[served_int8]")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = json.loads((tmp_path / "reports" / "opt" / "trials.json").read_text())
    assert len(rows) == 2 and all(r["status"] == "TERMINATED" and r["unmerged"] for r in rows), rows
    run_dir = tmp_path / "runs" / "opt"
    from ray.tune.schedulers import FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

    tune_config = _tune_config_on_disk(run_dir)
    assert type(tune_config.scheduler) is FIFOScheduler and isinstance(tune_config.search_alg, OptunaSearch)
    # Optuna's own study proposed both trials and was told each one's perplexity.
    (searcher_state,) = run_dir.glob("searcher-state-*.pkl")
    study = pickle.loads(searcher_state.read_bytes())["_ot_study"]
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    assert sorted((t.params["lora_r"], t.value) for t in study.trials) == sorted(
        (r["lora_r"], r["quant_perplexity"]) for r in rows)

    # The unmerged winner is exported as its adapter, nothing merged, and its reported perplexity is
    # what the served path gives: the adapter unmerged on the base Serve quantizes, in the engine.
    summary = json.loads((tmp_path / "reports" / "opt" / "summary.json").read_text())
    assert summary["exported"]["serve"] == {"model": "adapters/opt-best", "quantization": "weight_only_int8"}
    assert "quantized" not in summary["exported"] and not (tmp_path / "quantized" / "opt-best").exists()
    from ops.evaluation import engine_measure
    from ops.model import load_model, load_tokenizer
    from serve.app import serving_quantization

    val_ids = json.loads((tmp_path / "reports" / "opt" / "eval_tokens.json").read_text())  # what trials scored
    assert len(val_ids) == 128  # eval.max_tokens
    served, how = serving_quantization(load_model(str(tiny_model_dir)), str(tiny_model_dir), "hf", "weight_only_int8",
                                       "cpu")
    assert how == "weight_only_int8 of the float weights"
    measured = engine_measure(served, load_tokenizer(str(tiny_model_dir)), torch.tensor(val_ids),
                              adapter=tmp_path / "adapters" / "opt-best", new_tokens=None, rows=4)
    assert measured["perplexity"] == pytest.approx(summary["winner"]["quant_perplexity"], rel=1e-5)


@pytest.mark.integration
def test_random_search_draws_num_samples_trials_from_the_space(ray_local, tmp_path, tiny_model_dir, tiny_text_file):
    # The sweep's own Tuner (jobs.tune.tuner), run on the in-process cluster with a trainable that
    # only reports the point it was given: what search=random changes is which points Tune runs, and
    # the entrypoint's full trials run in the two sweeps above.
    from ray import tune

    from jobs.tune import tuner

    config = _config(tmp_path, tiny_model_dir, tiny_text_file, "rnd")
    # fifo: ASHA could stop a trial early, and this test counts finished trials.
    cfg = load_config(TuneJobConfig, str(config), [f"storage={tmp_path}", "search=random", "scheduler=fifo",
                                                   "num_samples=2", "space.lora_r=[2,4]", "space.quant=[none,wo_int8]"])

    def trainable(config):
        tune.report({"lora_r": config["lora_r"], "quant": config["quant"], "val_perplexity": 1.0, "step": 1})

    results = tuner(cfg, trainable, 1).fit()
    rows = [r.metrics for r in results]
    # A grid over this space would be 4 trials (8 with num_samples=2): random draws 2 points.
    assert len(rows) == 2 and not results.errors, (rows, results.errors)
    assert all(r["lora_r"] in (2, 4) and r["quant"] in ("none", "wo_int8") for r in rows), rows
    tune_config = _tune_config_on_disk(tmp_path / "runs" / "rnd")
    assert tune_config.search_alg is None and tune_config.num_samples == 2  # Tune's random variant generator
    assert type(tune_config.scheduler).__name__ == "FIFOScheduler"


@pytest.mark.parametrize("override, fragment", [
    (["space.quant=[nope]"], "unknown recipes ['nope']"),
    (["space.lora_r=[0]"], "space.lora_r must be >= 1"),
    (["search=bayes"], "bad value for 'search'"),
    (["trial_cpus=0"], "bad value for 'trial_cpus': Input should be greater than 0"),
    (["eval.new_tokens=0"], "eval.new_tokens must be >= 1"),
    (["recipes={u: {method: weight_only_int4, unmerged: true, group_size: 64}}", "space.quant=[u]"],
     "recipe 'u' is unmerged: the base is quantized as Serve quantizes it, so it takes only 'method'"),
    (["recipes={u: {method: static_int8, unmerged: true}}", "space.quant=[u]"], "recipe 'u' is unmerged but Serve quantizes a base only with"),
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


def _row(trial_id, ppl, ms):
    return {"trial_id": trial_id, "quant_perplexity": ppl, "decode_ms_per_token": ms}


def test_pareto_front_and_winner_on_hand_checked_trials():
    rows = [_row("a", 10.0, 5.0),   # best perplexity
            _row("b", 10.1, 3.0),   # 1% worse, fastest: on the front
            _row("c", 11.0, 4.0),   # b is better on both: dominated
            _row("d", 12.0, 3.0),   # ties b on latency, worse perplexity: dominated
            _row("e", None, None)]  # failed trial: never on the front
    assert sorted(pareto_front(rows)) == ["a", "b"]
    assert choose_winner(rows, 0.02)["trial_id"] == "b"   # 10.1 <= 10.0 * 1.02, and faster
    assert choose_winner(rows, 0.005)["trial_id"] == "a"  # 10.1 > 10.05: only a qualifies
    assert choose_winner([_row("e", None, None)], 0.02) is None


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
