"""Sweep LoRA ranks and quantization settings with Ray Tune; report the Pareto front; export a winner.

    ray job submit -- python -m jobs.tune --config configs/tune_lora_quant.yaml

Each trial fine-tunes with the training job's worker function (a Ray Train ``TorchTrainer`` inside
the trial, ``train.num_workers`` workers), then builds what its recipe serves (the adapter merged
and the result quantized, or, for an ``unmerged`` recipe such as ``served_int4``, the adapter kept
unmerged on the base as Serve quantizes it) and measures it through the serving engine, as a
replica runs it: held-out perplexity, batch-1 decode latency (``bench/decode.py``'s method) and
size. Validation perplexity
during training reaches Tune, so an ASHA scheduler stops bad trials early. A trial that fails is
recorded as failed and the sweep goes on; re-running with the same ``name=`` resumes an
interrupted sweep (``Tuner.restore``) without redoing finished trials.

Reads: a base model spec and a corpus (``train.*``).
Writes: ``<storage>/runs/<name>/`` (Tune state, trial runs), ``<storage>/adapters/<name>-<trial>/``
(each trial's adapter), ``<storage>/reports/<name>/`` (trials.parquet, trials.json, trials.md,
pareto.png, summary.json, eval_tokens.json, config.yaml) and the winner: ``<storage>/adapters/<name>-best/`` (the
adapter + its quantization recipe; an unmerged winner is served as it is, ``model=adapters/<name>-best``)
and, for a merged recipe, ``<storage>/quantized/<name>-best/`` (merged + quantized, servable by
``model=quantized/<name>-best``).
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from cluster.cli import run_job
from cluster.config import BaseConfig, save_config, storage_field
from cluster.resources import require_free
from cluster.runtime import cluster_cpus, init_ray
from cluster.storage import join, ray_storage, resolve_storage, validate_name
from jobs.data import token_stream
from jobs.train import TrainConfig, train
from ops import artifacts
from ops.datasets import held_out_ids, read_documents
from ops.errors import UserError
from ops.evaluation import EngineEvalSpec, engine_measure
from ops.model import load_model, load_tokenizer

DESCRIPTION = __doc__
NO_QUANT = "none"
# The metric search=optuna minimizes. Tune checks that every report of a trial carries the
# searcher's metric, and the reports during training (for ASHA) come before the quantized model
# exists: they carry the validation perplexity so far, the final report the quantized perplexity.
OBJECTIVE = "objective"
# Recipes a search space can name: method + settings of ops.quantization.quantize.
DEFAULT_RECIPES: dict[str, dict[str, Any]] = {
    NO_QUANT: {"method": NO_QUANT},
    "bf16": {"method": "bf16"},
    "wo_int8": {"method": "weight_only_int8"},
    "wo_int4_g32": {"method": "weight_only_int4", "group_size": 32},
    "wo_int4_g64": {"method": "weight_only_int4", "group_size": 64},
    "wo_int4_g128": {"method": "weight_only_int4", "group_size": 128},
    "static_int8": {"method": "static_int8"},
    "dynamic_int8": {"method": "dynamic_int8"},
    # The adapter unmerged on the base as Serve quantizes it (the embedded model's int4 is its GGUF's
    # exact Q4_1 weights): what a replica serves given the adapter as `model`.
    "served_int4": {"method": "weight_only_int4", "unmerged": True},
}
# Methods Serve quantizes a float base with (serve.app.AppArgs.quantization).
SERVED_METHODS = ("weight_only_int4", "weight_only_int8", NO_QUANT)


class SearchSpace(BaseConfig):
    """Values each trial draws from (grid: all combinations; random/optuna: sampled)."""

    lora_r: list[int] = Field(default_factory=lambda: [4, 8, 16, 32], description="LoRA ranks")
    lora_alpha_ratio: list[float] = Field(default_factory=lambda: [2.0],
                                          description="LoRA alpha as a multiple of r")
    lr: list[float] = Field(default_factory=list, description="peak learning rates (empty = train.lr only)")
    target_modules: list[list[str]] = Field(
        default_factory=lambda: [["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]],
        description="LoRA target module sets")
    quant: list[str] = Field(default_factory=lambda: ["none", "wo_int8", "wo_int4_g32", "served_int4"],
                             description="quantization recipes (names of `recipes`)")


class CalibrationSection(BaseConfig):
    samples: int = Field(8, ge=1, description="static_int8: calibration sequences (train.block_size tokens each) "
                         "from the train split")


class TuneJobConfig(BaseConfig):
    name: str = Field("sweep", description="sweep name: runs/<name>/, reports/<name>/, <name>-best exports")
    storage: str = storage_field()
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(num_workers=1),
                               description="base training config of every trial")
    space: SearchSpace = Field(default_factory=SearchSpace)
    recipes: dict[str, dict[str, Any]] = Field(default_factory=lambda: dict(DEFAULT_RECIPES),
                                               description="quantization recipes by name")
    search: Literal["grid", "random", "optuna"] = Field("grid", description="search algorithm")
    num_samples: int = Field(1, ge=1, description="grid: repeats of the grid; random/optuna: trials")
    scheduler: Literal["asha", "fifo"] = Field("asha", description="asha stops bad trials early on val perplexity")
    grace_steps: int = Field(0, ge=0, description="ASHA: steps before a trial may be stopped (0 = train.eval_every)")
    max_concurrent_trials: int = Field(0, ge=0, description="0 = as many as the cluster's CPUs fit (each trial "
                                       "reserves trial_cpus + its train workers)")
    trial_cpus: float = Field(1.0, gt=0, description="CPUs reserved by each trial's driver (quantize + measure; Tune needs > 0)")
    max_ppl_increase: float = Field(0.02, ge=0, description="winner: lowest latency within this of the best ppl")
    eval: EngineEvalSpec = Field(default_factory=EngineEvalSpec,
                                 description="how every trial's final model is measured: through the serving "
                                 "engine, as a replica runs it (bench/decode.py's method for latency)")
    calibration: CalibrationSection = Field(default_factory=CalibrationSection)
    fresh: bool = Field(False, description="start over instead of resuming an earlier sweep of the same name "
                        "(its Tune run and its trials' runs/ and adapters/ directories are deleted)")

    @model_validator(mode="after")
    def _check(self) -> "TuneJobConfig":
        validate_name(self.name)
        unknown = [q for q in self.space.quant if q not in self.recipes]
        if unknown:
            raise ValueError(f"space.quant names unknown recipes {unknown}; valid: {sorted(self.recipes)}")
        for name, recipe in self.recipes.items():
            if recipe.get("unmerged") and set(recipe) - {"method", "unmerged"}:
                raise ValueError(f"recipe {name!r} is unmerged: the base is quantized as Serve quantizes it, so it "
                                 f"takes only 'method' (one of {list(SERVED_METHODS)}), not "
                                 f"{sorted(set(recipe) - {'method', 'unmerged'})}")
            if recipe.get("unmerged") and recipe.get("method") not in SERVED_METHODS:
                raise ValueError(f"recipe {name!r} is unmerged but Serve quantizes a base only with "
                                 f"{list(SERVED_METHODS)}, got method {recipe.get('method')!r}")
        if not self.eval.new_tokens:
            raise ValueError("eval.new_tokens must be >= 1: the winner is the fastest trial within max_ppl_increase")
        if any(r < 1 for r in self.space.lora_r):
            raise ValueError(f"space.lora_r must be >= 1, got {self.space.lora_r}")
        return self


# ---------------------------------------------------------------------------------------------
# One trial (runs in a Tune trial actor)
# ---------------------------------------------------------------------------------------------

def trial_train_config(params: dict[str, Any], trial_id: str) -> TrainConfig:
    """The training config of one trial: the base config with the trial's sampled values."""
    base = dict(params["train"])
    r = int(params["lora_r"])
    base.update(method="lora", name=f"{params['sweep']}-{trial_id}", lr=float(params["lr"]), storage=params["storage"],
                lora={**base.get("lora", {}), "r": r, "alpha": float(params["lora_alpha_ratio"]) * r,
                      "target_modules": list(params["target_modules"])})
    return TrainConfig.model_validate(base)


def trial_model(cfg: TrainConfig, adapter_dir: Path, recipe: dict[str, Any],
                calibration_ids: list[list[int]]) -> tuple[torch.nn.Module, Path | None]:
    """The model a trial's recipe serves, and the adapter it runs unmerged (None when merged)."""
    from ops.lora import merge_adapter
    from ops.quantization import quantize, quantize_served_base

    recipe = dict(recipe)
    method, unmerged = recipe.pop("method"), recipe.pop("unmerged", False)
    if unmerged:
        base = load_model(cfg.model, storage=cfg.storage)
        return (base if method == NO_QUANT else quantize_served_base(base, cfg.model, method)[0]), adapter_dir
    model = merge_adapter(load_model(cfg.model, storage=cfg.storage, adapter=str(adapter_dir)))
    if method != NO_QUANT:
        calibration = torch.tensor(calibration_ids, dtype=torch.long) if method == "static_int8" else None
        model = quantize(model, method, calibration=calibration, **recipe)
    return model, None


def run_trial(params: dict[str, Any], val_ids: list[int], calibration_ids: list[list[int]]) -> None:
    """Tune function trainable: train (Ray Train), build the recipe's model, measure it, report.

    Args:
        params: the trial's config (sampled values + the sweep's constants).
        val_ids: held-out tokens every trial is measured on.
        calibration_ids: (S, block) training sequences for static_int8 calibration.
    """
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    class EvalReports(TuneReportCallback):
        """Forward only the steps that carry a validation perplexity, the metric ASHA compares."""

        def after_report(self, run_context, metrics, checkpoint):
            if "val_perplexity" in metrics[0]:
                metrics = [{**metrics[0], OBJECTIVE: metrics[0]["val_perplexity"]}, *metrics[1:]]
                super().after_report(run_context, metrics, checkpoint)

    trial_id = ray.tune.get_context().get_trial_id()
    cfg = trial_train_config(params, trial_id)
    spec = EngineEvalSpec.model_validate(params["eval"])
    t0 = time.perf_counter()
    adapter_dir = train(cfg, callbacks=[EvalReports()])
    trained = json.loads((adapter_dir / "metrics.json").read_text())
    model, unmerged = trial_model(cfg, adapter_dir, params["recipes"][params["quant"]], calibration_ids)
    spec.apply_threads()
    measured = engine_measure(model, load_tokenizer(cfg.model, storage=cfg.storage),
                              torch.tensor(val_ids, dtype=torch.long), adapter=unmerged,
                              new_tokens=spec.new_tokens, rows=spec.rows)
    ray.tune.report({
        "step": trained["steps"], "val_perplexity": trained["best_val_perplexity"],
        "initial_val_perplexity": trained["initial_val_perplexity"], "quant_perplexity": measured["perplexity"],
        OBJECTIVE: measured["perplexity"], "decode_ms_per_token": measured["decode_ms_per_token"],
        "tokens_per_s": measured["tokens_per_s"], "size_mb": measured["size_mb"], "unmerged": unmerged is not None,
        "adapter": artifacts.uri(cfg.storage, artifacts.Kind.ADAPTERS, cfg.name), "adapter_name": cfg.name,
        "trial_wall_s": time.perf_counter() - t0,
    })


# ---------------------------------------------------------------------------------------------
# The sweep driver
# ---------------------------------------------------------------------------------------------

def clear_trial_artifacts(storage: str, sweep: str) -> int:
    """Delete ``runs/`` and ``adapters/`` artifacts of earlier trials of ``sweep`` (named
    ``<sweep>-<tune trial id>``, e.g. ``demo-702f4_00003``); the ``<sweep>-best`` export and any
    other name are kept. Returns how many were removed."""
    pattern = re.compile(rf"{re.escape(sweep)}-[0-9a-f]{{5}}_\d{{5}}")
    removed = 0
    for kind in (artifacts.Kind.RUNS, artifacts.Kind.ADAPTERS):
        for name in artifacts.names(storage, kind):
            if pattern.fullmatch(name) and artifacts.remove(storage, kind, name):
                removed += 1
    return removed


def param_space(cfg: TuneJobConfig) -> dict[str, Any]:
    from ray import tune

    space = cfg.space
    values = {"lora_r": space.lora_r, "lora_alpha_ratio": space.lora_alpha_ratio, "lr": space.lr or [cfg.train.lr],
              "target_modules": space.target_modules, "quant": space.quant}
    pick = tune.grid_search if cfg.search == "grid" else tune.choice
    sampled = {k: pick(v) if len(v) > 1 or cfg.search != "grid" else v[0] for k, v in values.items()}
    return {**sampled, "sweep": cfg.name, "storage": resolve_storage(cfg.storage),
            "train": cfg.train.model_dump(mode="json"), "recipes": cfg.recipes,
            "eval": cfg.eval.model_dump()}


def search_algorithm(cfg: TuneJobConfig):
    if cfg.search != "optuna":
        return None
    try:
        from ray.tune.search.optuna import OptunaSearch
    except ImportError:
        raise UserError("search=optuna needs the optuna package (pip install optuna); valid: grid, random") from None
    return OptunaSearch(metric=OBJECTIVE, mode="min", seed=cfg.train.seed)


def trial_data(cfg: TuneJobConfig, storage: str) -> tuple[list[int], list[list[int]]]:
    """Tokens every trial is measured on (start of the validation split) and calibration sequences."""
    tokenizer = load_tokenizer(cfg.train.model, storage=storage)
    docs = read_documents(cfg.train.data, cfg.train.data_format, cfg.train.text_field)
    train_ids, val = held_out_ids(docs, lambda d: token_stream(d, tokenizer, cfg.train.max_tokens or None),
                                  cfg.train.val_fraction, cfg.eval.max_tokens)
    block = cfg.train.block_size
    calibration = [train_ids[i * block:(i + 1) * block].tolist()
                   for i in range(min(cfg.calibration.samples, len(train_ids) // block))]
    return val.tolist(), calibration


def trial_rows(results) -> list[dict[str, Any]]:
    """One row per trial: status, error, sampled values and final metrics."""
    rows = []
    for res in results:
        m = res.metrics or {}
        cfg = res.config or {}
        done = "quant_perplexity" in m
        status = "ERROR" if res.error else ("TERMINATED" if done else "STOPPED")
        rows.append({
            "trial_id": m.get("trial_id") or Path(res.path).name, "status": status,
            # Ray wraps the trial's exception; its last line is the exception itself.
            "error": str(res.error).strip().splitlines()[-1][:300] if res.error else None,
            "lora_r": cfg.get("lora_r"), "lora_alpha_ratio": cfg.get("lora_alpha_ratio"), "lr": cfg.get("lr"),
            "target_modules": ",".join(cfg.get("target_modules") or []), "quant": cfg.get("quant"),
            "steps": m.get("step"), "val_perplexity": m.get("val_perplexity"),
            "quant_perplexity": m.get("quant_perplexity") if done else None,
            "decode_ms_per_token": m.get("decode_ms_per_token") if done else None,
            "tokens_per_s": m.get("tokens_per_s") if done else None,
            "unmerged": m.get("unmerged") if done else None,
            "size_mb": m.get("size_mb") if done else None, "adapter": m.get("adapter") if done else None,
            "adapter_name": m.get("adapter_name") if done else None,
        })
    return sorted(rows, key=lambda r: r["trial_id"])


def pareto_front(rows: list[dict[str, Any]]) -> list[str]:
    """Trials no other finished trial beats on both perplexity and decode latency."""
    done = [r for r in rows if r["quant_perplexity"] is not None]
    front = []
    for r in done:
        dominated = any(o is not r and o["quant_perplexity"] <= r["quant_perplexity"]
                        and o["decode_ms_per_token"] <= r["decode_ms_per_token"]
                        and (o["quant_perplexity"] < r["quant_perplexity"]
                             or o["decode_ms_per_token"] < r["decode_ms_per_token"]) for o in done)
        if not dominated:
            front.append(r["trial_id"])
    return front


def choose_winner(rows: list[dict[str, Any]], max_ppl_increase: float) -> dict[str, Any] | None:
    """Lowest decode latency among trials within ``max_ppl_increase`` of the best perplexity."""
    done = [r for r in rows if r["quant_perplexity"] is not None]
    if not done:
        return None
    best = min(r["quant_perplexity"] for r in done)
    ok = [r for r in done if r["quant_perplexity"] <= best * (1 + max_ppl_increase)]
    return min(ok, key=lambda r: (r["decode_ms_per_token"], r["quant_perplexity"]))


def markdown(rows: list[dict[str, Any]], front: list[str], winner: dict[str, Any] | None,
             cfg: TuneJobConfig) -> str:
    cols = ["trial_id", "status", "lora_r", "lr", "quant", "steps", "val_perplexity", "quant_perplexity",
            "decode_ms_per_token", "size_mb"]
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))  # noqa: E731
    ev, t = cfg.eval, cfg.train
    # Two perplexities from different measurements: the page says which is which.
    lines = [f"`val_perplexity`: Ray Train's validation of the float adapter (up to {t.val_blocks or 'all'} held-out "
             f"blocks of {t.block_size} tokens, {'answer tokens only' if t.task == 'rag_qa' else 'every token'}); "
             f"`quant_perplexity`: the trial's served model (merged and quantized, or the adapter unmerged on the "
             f"base as Serve quantizes it) through the serving engine on the first {ev.max_tokens} held-out tokens "
             f"in {ev.rows} rows, the objective. They differ in data and context, so only rows compare, not the two "
             f"columns. `decode_ms_per_token`: batch 1 through the engine, {ev.new_tokens} new tokens per "
             f"bench/decode.py prompt.", "",
             "| " + " | ".join(cols + ["pareto", "winner"]) + " |", "|" + "---|" * (len(cols) + 2)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r[c]) for c in cols) + f" | {'*' if r['trial_id'] in front else ''} | "
                     f"{'**winner**' if winner and r['trial_id'] == winner['trial_id'] else ''} |")
    errors = [f"- `{r['trial_id']}`: {r['error']}" for r in rows if r["error"]]
    return "\n".join(lines) + ("\n\nFailed trials:\n" + "\n".join(errors) if errors else "") + "\n"


def plot_pareto(rows: list[dict[str, Any]], front: list[str], winner: dict[str, Any] | None, path: Path) -> None:
    """Perplexity vs decode latency; marker area ~ model size; Pareto front highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["quant_perplexity"] is not None]
    fig, ax = plt.subplots(figsize=(7, 5))
    if done:
        biggest = max(r["size_mb"] for r in done)
        for r in done:
            on_front = r["trial_id"] in front
            ax.scatter(r["decode_ms_per_token"], r["quant_perplexity"], s=40 + 400 * r["size_mb"] / biggest,
                       alpha=0.8 if on_front else 0.35, color="tab:red" if on_front else "tab:blue",
                       edgecolors="black" if winner and r["trial_id"] == winner["trial_id"] else "none")
            ax.annotate(f"r={r['lora_r']} {r['quant']}", (r["decode_ms_per_token"], r["quant_perplexity"]),
                        fontsize=7, xytext=(4, 4), textcoords="offset points")
        pts = sorted((r["decode_ms_per_token"], r["quant_perplexity"]) for r in done if r["trial_id"] in front)
        ax.plot(*zip(*pts), color="tab:red", lw=1, label="Pareto front")
        ax.legend()
    ax.set(xlabel="decode latency (ms/token, batch 1)", ylabel="validation perplexity",
           title="LoRA rank x quantization (marker size = model size)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def export_winner(cfg: TuneJobConfig, winner: dict[str, Any], storage: str, calibration: list[list[int]]) -> dict:
    """Register the winner: its adapter + recipe under adapters/ and, for a merged recipe, the merged
    + quantized model under quantized/ (an unmerged recipe's served form is the adapter itself on the
    base as Serve quantizes it: nothing to merge)."""
    from ops.lora import merge_adapter
    from ops.quantization import quantize, save_quantized

    recipe = dict(cfg.recipes[winner["quant"]])
    best = f"{cfg.name}-best"
    src = artifacts.require(cfg.storage, artifacts.Kind.ADAPTERS, winner["adapter_name"])
    with artifacts.publish(cfg.storage, artifacts.Kind.ADAPTERS, best) as out:
        for f in src.iterdir():
            if f.is_file() and not f.name.startswith("."):
                shutil.copy2(f, out / f.name)
        manifest = artifacts.read_manifest(src).model_copy(update={
            "name": best, "sweep": cfg.name, "trial_id": winner["trial_id"], "quantization": recipe})
        artifacts.write_manifest(out, manifest)
        (out / "recipe.json").write_text(json.dumps({"adapter": best, "quantization": recipe,
                                                     "metrics": winner}, indent=2, default=str))
    method, unmerged = recipe.pop("method"), recipe.pop("unmerged", False)
    exported = {"adapter": artifacts.uri(cfg.storage, artifacts.Kind.ADAPTERS, best)}
    if unmerged:
        exported["serve"] = {"model": f"{artifacts.Kind.ADAPTERS.value}/{best}", "quantization": method}
    elif method != NO_QUANT:
        model = merge_adapter(load_model(cfg.train.model, storage=storage,
                                         adapter=str(artifacts.require(cfg.storage, artifacts.Kind.ADAPTERS, best))))
        calib = torch.tensor(calibration, dtype=torch.long) if method == "static_int8" else None
        model = quantize(model, method, calibration=calib, **recipe)
        tokenizer = load_tokenizer(cfg.train.model, storage=storage)
        with artifacts.publish(cfg.storage, artifacts.Kind.QUANTIZED, best) as out:
            save_quantized(model, out, method, recipe, base_model=cfg.train.model, tokenizer=tokenizer)
        exported["quantized"] = artifacts.uri(cfg.storage, artifacts.Kind.QUANTIZED, best)
    return exported


def tuner(cfg: TuneJobConfig, trainable: Any, concurrent: int) -> Any:
    """A new ``Tuner`` for the sweep, or the earlier one of the same name restored (``fresh=false``)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    runs = ray_storage(join(resolve_storage(cfg.storage), artifacts.Kind.RUNS.value))
    experiment = f"{runs['storage_path']}/{cfg.name}"  # a path inside storage_filesystem when there is one
    fs = runs.get("storage_filesystem")
    if not cfg.fresh and tune.Tuner.can_restore(experiment, storage_filesystem=fs):
        print(f"[tune] resuming sweep {cfg.name} from {artifacts.uri(cfg.storage, 'runs', cfg.name)}", flush=True)
        return tune.Tuner.restore(experiment, trainable=trainable, resume_errored=False, restart_errored=False,
                                  param_space=param_space(cfg), storage_filesystem=fs)
    if cfg.fresh and artifacts.remove(cfg.storage, artifacts.Kind.RUNS, cfg.name):
        removed = clear_trial_artifacts(cfg.storage, cfg.name)
        print(f"[tune] fresh: removed the earlier sweep and its {removed} trial run/adapter directories", flush=True)
    # stop_last_trials=False: a trial that reaches max_steps still gets quantized and measured.
    scheduler = (ASHAScheduler(time_attr="step", metric="val_perplexity", mode="min",
                               max_t=cfg.train.max_steps, grace_period=cfg.grace_steps or cfg.train.eval_every,
                               stop_last_trials=False)
                 if cfg.scheduler == "asha" else FIFOScheduler())
    return tune.Tuner(
        trainable, param_space=param_space(cfg),
        tune_config=tune.TuneConfig(num_samples=cfg.num_samples, scheduler=scheduler,
                                    search_alg=search_algorithm(cfg), max_concurrent_trials=concurrent),
        run_config=tune.RunConfig(name=cfg.name, **runs,
                                  failure_config=tune.FailureConfig(max_failures=0, fail_fast=False)),
    )


def main(cfg: TuneJobConfig) -> dict[str, Any]:
    import ray
    from ray import tune

    storage = resolve_storage(cfg.storage)
    init_ray()
    ray.data.DataContext.get_current().enable_progress_bars = False
    need = cfg.trial_cpus + cfg.train.num_workers * cfg.train.cpus_per_worker
    if need > cluster_cpus():
        raise UserError(f"one trial needs {need:g} CPUs (trial_cpus + train.num_workers x train.cpus_per_worker) "
                        f"but the cluster has {cluster_cpus()}; valid: lower trial_cpus or train.num_workers")
    # Trials must not hold all CPUs with their drivers while their train workers wait for one; and
    # with no room for one trial now, Tune would wait without end: run as many as the free CPUs fit.
    require_free({"CPU": need}, "jobs.tune", "one trial: trial_cpus + train.num_workers x train.cpus_per_worker")
    concurrent = cfg.max_concurrent_trials or max(1, int(ray.available_resources().get("CPU", 0) // need))
    val_ids, calibration = trial_data(cfg, storage)
    trainable = tune.with_resources(tune.with_parameters(run_trial, val_ids=val_ids, calibration_ids=calibration),
                                    {"cpu": cfg.trial_cpus})
    t0 = time.perf_counter()
    results = tuner(cfg, trainable, concurrent).fit()
    wall = time.perf_counter() - t0
    rows = trial_rows(results)
    front = pareto_front(rows)
    winner = choose_winner(rows, cfg.max_ppl_increase)
    exported = export_winner(cfg, winner, storage, calibration) if winner else {}
    summary = {"name": cfg.name, "trials": len(rows), "finished": sum(r["status"] == "TERMINATED" for r in rows),
               "failed": sum(r["status"] == "ERROR" for r in rows),
               "stopped_early": sum(r["status"] == "STOPPED" for r in rows), "wall_s": wall,
               "pareto": front, "winner": winner, "exported": exported, "max_ppl_increase": cfg.max_ppl_increase}
    import pandas as pd

    with artifacts.publish(cfg.storage, artifacts.Kind.REPORTS, cfg.name) as out:
        pd.DataFrame(rows).to_parquet(out / "trials.parquet", index=False)
        (out / "trials.json").write_text(json.dumps(rows, indent=2, default=str))
        (out / "trials.md").write_text(markdown(rows, front, winner, cfg))
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        # the held-out tokens every trial was scored on: a trial's perplexity can be checked against them
        (out / "eval_tokens.json").write_text(json.dumps(val_ids))
        plot_pareto(rows, front, winner, out / "pareto.png")
        save_config(cfg, out)
    print(markdown(rows, front, winner, cfg), flush=True)
    print(f"[tune] {summary['trials']} trials ({summary['finished']} finished, {summary['stopped_early']} stopped "
          f"early, {summary['failed']} failed) in {wall:.0f}s", flush=True)
    if winner:
        print(f"[tune] winner {winner['trial_id']}: r={winner['lora_r']} quant={winner['quant']} perplexity "
              f"{winner['quant_perplexity']:.4f}, decode {winner['decode_ms_per_token']:.2f} ms/token, "
              f"{winner['size_mb']:.1f} MB -> {exported}", flush=True)
    print(f"[tune] report: {artifacts.uri(cfg.storage, artifacts.Kind.REPORTS, cfg.name)}", flush=True)
    return summary


if __name__ == "__main__":
    run_job(main, TuneJobConfig, prog="jobs.tune", description=DESCRIPTION)
