"""Fine-tune a causal LM on many workers with Ray Train: full ("baseline") or LoRA.

    python -m jobs.train --config configs/train_lora.yaml model=smollm2-135m-instruct \\
        data=../shared/data/tinyshakespeare.txt num_workers=2 name=shakespeare

Reads: a base model spec (embedded name, HF id or directory), a corpus (``data=``).
Writes: ``<storage>/runs/<name>/`` (Ray Train checkpoints, ``metrics.jsonl``, ``workers.jsonl``),
then the best checkpoint by validation perplexity as ``<storage>/adapters/<name>/`` (LoRA, PEFT
format) or ``<storage>/models/<name>/`` (full, HF format), each with ``config.yaml``, ``manifest.json``,
``metrics.json``, ``history.json`` and ``curves.png``; ``merge=true`` adds
``<storage>/models/<name>-merged/``. Re-running with the same ``name=`` resumes the run.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import Field, model_validator

from cluster.cli import run_job
from cluster.config import BaseConfig, save_config, storage_field
from cluster.resources import require_free
from cluster.runtime import cluster_cpus, cluster_gpus, init_ray, report_interval_s
from cluster.storage import join, local_storage_root, ray_storage, resolve_storage, validate_name
from jobs.data import IGNORE_INDEX, DataConfig, QASection, Task, block_datasets, qa_datasets
from ops.errors import UserError
from ops.attention import choose_attention
from ops.lora import DEFAULT_TARGETS, add_lora, apply_adapter, check_target_modules, merge_adapter, trainable_parameters
from ops import artifacts
from ops.model import DEFAULT_MODEL, autocast_dtype, load_model, load_tokenizer, resolve

DESCRIPTION = __doc__
FAIL_AT_STEP_ENV = "RAYLM_FAIL_AT_STEP"
STATE_FILE = "train_state.pt"
HISTORY_FILE = "metrics.jsonl"
WORKERS_FILE = "workers.jsonl"
FAIL_MARKER = ".fail_injected"


class LoraSection(BaseConfig):
    r: int = Field(16, description="LoRA rank (>= 1)")
    alpha: float = Field(32.0, description="LoRA scale numerator: the update is scaled by alpha / r")
    dropout: float = Field(0.05, description="dropout on the LoRA input path, in [0, 1)")
    target_modules: list[str] = Field(default_factory=lambda: list(DEFAULT_TARGETS),
                                      description="names of the linear layers to adapt")


class TrainConfig(DataConfig):
    task: Task = Field("lm", description="lm: language modelling on the text; rag_qa: retrieval-augmented QA from a "
                       "SQuAD .json (passages + question -> short answer, loss on the answer only)")
    qa: QASection = Field(default_factory=QASection)
    method: Literal["full", "lora"] = Field("lora", description="full fine-tune (baseline) or LoRA")
    model: str = Field(DEFAULT_MODEL, description="base model spec: embedded name, HF id or local directory")
    name: str = Field("train", description="run name: <storage>/runs/<name>/, adapters|models/<name>/")
    storage: str = storage_field()
    num_workers: int = Field(2, description="Ray Train workers (DDP ranks)")
    cpus_per_worker: int = Field(1, ge=1, description="CPUs reserved per worker")
    use_gpu: bool | Literal["auto"] = Field("auto", description="one GPU per worker; auto = when the cluster has GPUs")
    block_size: int = Field(256, ge=2, description="tokens per training sequence (task=rag_qa: the longest example; "
                            "longer ones lose distractor passages until they fit)")
    batch_size: int = Field(8, ge=1, description="sequences per worker per micro-batch")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    max_steps: int = Field(200, ge=1, description="optimizer steps")
    lr: float = Field(1e-3, gt=0, description="peak learning rate (AdamW)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    warmup_steps: int = Field(10, ge=0, description="linear warmup steps before the cosine decay")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final learning rate as a fraction of lr")
    max_grad_norm: float = Field(1.0, ge=0, description="gradient clipping norm (0 = no clipping)")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="autocast dtype; auto = bf16 on a GPU that supports it, fp32 on CPU")
    attention: Literal["auto", "eager", "sdpa", "flash_attention_2"] = Field(
        "auto", description="attention implementation of the model (ops.attention.choose_attention for the worker's "
        "device and autocast dtype); auto = flash_attention_2 on a GPU with flash-attn, else sdpa")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward to save memory")
    seed: int = Field(0, description="seed of weights init (LoRA), shuffling and dropout")
    max_tokens: int = Field(0, ge=0, description="use only the first N tokens of the corpus (0 = all)")
    shuffle: bool = Field(True, description="shuffle training blocks once (seeded) before training")
    shard: Literal["split", "stride"] = Field(
        "split", description="split: Ray Data streaming_split of the train set; stride: every worker reads the "
        "set in order and takes its slice of each global batch (deterministic, = 1 worker with the global batch)")
    eval_every: int = Field(50, ge=1, description="validate and checkpoint every N steps (and at the end)")
    val_blocks: int = Field(32, ge=0, description="validate on the first N held-out blocks (0 = all)")
    eval_batch_size: int = Field(8, ge=1, description="sequences per validation forward pass")
    keep_checkpoints: int = Field(2, ge=1, description="checkpoints kept: the best N by validation perplexity")
    max_failures: int = Field(2, ge=0, description="worker-group restarts from the latest checkpoint after a failure")
    merge: bool = Field(False, description="LoRA: also write the merged model to models/<name>-merged/")
    lora: LoraSection = Field(default_factory=LoraSection)

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {self.num_workers}")
        if self.lora.r < 1:
            raise ValueError(f"lora.r must be >= 1, got {self.lora.r}")
        if not 0.0 <= self.lora.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.lora.dropout}")
        if self.merge and self.method != "lora":
            raise ValueError("merge=true needs method=lora (a full fine-tune is already a plain model)")
        validate_name(self.name)
        return self


# ---------------------------------------------------------------------------------------------
# The worker: owns the loop; Ray appears only at the points marked "Ray:".
# ---------------------------------------------------------------------------------------------

def lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak lr at ``step``: linear warmup, then cosine down to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_model(cfg: TrainConfig, storage: str, device: torch.device, resume_dir: str | None,
                attn_implementation: str | None = None) -> torch.nn.Module:
    """Base model (or the checkpointed full model) in fp32, with LoRA added or restored.

    Args:
        attn_implementation: HF attention implementation (``ops.attention.choose_attention``).
    """
    if cfg.method == "full":
        model = load_model(resume_dir or cfg.model, storage=storage, dtype="float32", device=str(device),
                           attn_implementation=attn_implementation)
    else:
        base = load_model(cfg.model, storage=storage, dtype="float32", device=str(device),
                          attn_implementation=attn_implementation)
        model = apply_adapter(base, resume_dir, trainable=True) if resume_dir else add_lora(
            base, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    return model


def answer_nll(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor,
               mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL of the labelled tokens of left-padded rows, and how many there are.

    Only the positions from the earliest label on get logits (``logits_to_keep``): the
    vocabulary projection of every prompt position would cost memory and time for no loss.

    Args:
        ids, labels, mask: (B, T); labels are ``IGNORE_INDEX`` except at the answer tokens,
            which end every row.
    """
    labelled = labels != IGNORE_INDEX  # (B, T)
    first = int(torch.where(labelled.any(dim=1), labelled.int().argmax(dim=1), ids.shape[1] - 1).min())
    keep = ids.shape[1] - first + 1
    logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits  # (B, keep, V)
    target = labels[:, -keep:][:, 1:]  # logits at position t predict the token at t + 1
    nll = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), target.flatten(), reduction="sum",
                          ignore_index=IGNORE_INDEX)
    return nll, (target != IGNORE_INDEX).sum()


@torch.no_grad()
def validation_nll(model: torch.nn.Module, blocks: torch.Tensor, rank: int, world: int, batch_size: int,
                   amp: torch.dtype | None, labels: torch.Tensor | None = None,
                   mask: torch.Tensor | None = None) -> float:
    """Mean next-token NLL over ``blocks`` (N, T); each rank scores rows ``rank::world``.

    With ``labels`` and ``mask`` (N, T), rows are left-padded QA examples and only the answer
    tokens count (:func:`answer_nll`).
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # (nll_sum, tokens)
    mine = list(range(rank, len(blocks), world))
    for i in range(0, len(mine), batch_size):
        idx = mine[i:i + batch_size]
        ids, target, attn = _trimmed(blocks[idx], None if labels is None else labels[idx],
                                     None if mask is None else mask[idx], device)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            if target is None:
                logits = model(input_ids=ids).logits  # (B, T, V)
                nll = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
                counted = torch.tensor(ids[:, 1:].numel())
            else:
                nll, counted = answer_nll(model, ids, target, attn)
        sums += torch.stack([nll.double(), counted.double().to(device)])
    if world > 1:
        dist.all_reduce(sums)
    model.train(was_training)
    return (sums[0] / sums[1].clamp(min=1)).item()


def _trimmed(ids: torch.Tensor, labels: torch.Tensor | None, mask: torch.Tensor | None,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Move a batch to ``device``; left-padded rows (``mask``) lose the padding columns all rows share."""
    if mask is not None:
        n = int(mask.sum(dim=1).max())
        ids, labels, mask = ids[:, -n:], labels[:, -n:] if labels is not None else None, mask[:, -n:]
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return to(ids), to(labels), to(mask)


def _global_mean(value: float, device: torch.device, world: int, flag: bool = False) -> tuple[float, bool]:
    """The mean of ``value`` over ranks, and whether rank 0 raised ``flag`` (one all-reduce)."""
    if world == 1:
        return value, flag
    t = torch.tensor([value, float(flag)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t[0].item() / world, t[1].item() > 0


def _maybe_fail(step: int, rank: int, run_dir: Path) -> None:
    """Test hook: with RAYLM_FAIL_AT_STEP=k, rank 1 dies at step k, once per run directory."""
    fail_at = os.environ.get(FAIL_AT_STEP_ENV)
    if not fail_at or int(fail_at) != step or rank != 1:
        return
    marker = run_dir / FAIL_MARKER
    if marker.exists():
        return
    marker.write_text(f"rank 1 exited at step {step}\n")
    print(f"[train] {FAIL_AT_STEP_ENV}={step}: rank 1 exits now", flush=True)
    os._exit(1)


def _restore(cfg: TrainConfig, storage: str, device: torch.device, attention: str,
             rank: int) -> tuple[torch.nn.Module, dict | None]:
    """The model, from Ray Train's checkpoint when this run has one, and the saved loop state (or None)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()  # Ray: resume point after a failure or a re-run
    with contextlib.ExitStack() as stack:
        resume_dir = stack.enter_context(checkpoint.as_directory()) if checkpoint else None
        model = build_model(cfg, storage, device, resume_dir, attention)
        saved = torch.load(Path(resume_dir) / STATE_FILE, map_location="cpu", weights_only=False) \
            if resume_dir else None
    if rank == 0:
        trainable, total = trainable_parameters(model)
        print(f"[train] {cfg.method}: trainable parameters {trainable:,} of {total:,} "
              f"({100 * trainable / total:.3f}%)", flush=True)
    return model, saved


def _log_start(run_dir: Path, rank: int, world: int, step: int) -> None:
    """Where every rank of every attempt ran: one line each, appended (a single small write, so
    concurrent ranks on a shared filesystem do not interleave)."""
    import ray

    placement = {"event": "worker", "rank": rank, "world": world,
                 "node_id": ray.get_runtime_context().get_node_id(),  # Ray: this worker's node
                 "hostname": socket.gethostname(), "pid": os.getpid(), "step": step}
    with (run_dir / WORKERS_FILE).open("a") as fh:
        fh.write(json.dumps(placement) + "\n")
    if rank == 0:
        # Every attempt marks where it starts, so readers of the raw log can drop rolled-back steps.
        with (run_dir / HISTORY_FILE).open("a") as fh:
            fh.write(json.dumps({"event": "start", "step": step}) + "\n")


def _micro_batches(shard: Any, cfg: TrainConfig, rank: int, world: int, state: dict[str, Any]):
    """Endless micro-batches ``{"input_ids": (B, T), ...}``, continuing the epoch where the checkpoint left it."""
    stride = cfg.shard == "stride"
    fetch = cfg.batch_size * world if stride else cfg.batch_size
    while True:
        batches = shard.iter_torch_batches(batch_size=fetch, drop_last=True, dtypes=torch.long)
        for i, batch in enumerate(batches):
            if i < state["batch_in_epoch"]:
                continue
            state["batch_in_epoch"] = i + 1
            yield {k: v[rank * cfg.batch_size:(rank + 1) * cfg.batch_size] if stride else v
                   for k, v in batch.items()}
        state["epoch"] += 1
        state["batch_in_epoch"] = 0


def _accumulate(model: torch.nn.Module, stream: Any, cfg: TrainConfig, device: torch.device,
                amp: torch.dtype | None) -> tuple[float, int]:
    """Forward + backward of one step's ``grad_accum`` micro-batches; returns (summed loss, tokens)."""
    loss_sum, step_tokens = 0.0, 0
    for micro in range(cfg.grad_accum):
        batch = next(stream)
        ids, labels, mask = _trimmed(batch["input_ids"], batch.get("labels"), batch.get("attention_mask"),
                                     device)  # (B, T)
        step_tokens += ids.numel() if mask is None else int(mask.sum())
        # DDP all-reduces gradients only on the last micro-batch of a step.
        sync = micro == cfg.grad_accum - 1 or not hasattr(model, "no_sync")
        with contextlib.nullcontext() if sync else model.no_sync():
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                if labels is None:
                    loss = model(input_ids=ids, labels=ids).loss
                else:
                    nll, count = answer_nll(model, ids, labels, mask)
                    loss = nll / count.clamp(min=1)
                loss = loss / cfg.grad_accum
            loss.backward()
        loss_sum += loss.item()
    return loss_sum, step_tokens


def _report_checkpoint(metrics: dict[str, Any], raw_model: torch.nn.Module, optimizer: Any, scheduler: Any,
                       state: dict[str, Any], rank: int) -> None:
    """Report ``metrics`` with a checkpoint (rank 0 writes it; Ray Train persists it to the storage path)."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="raylm-ckpt-") as tmp:
        if rank == 0:
            raw_model.save_pretrained(tmp, safe_serialization=True)
            torch.save({**state, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "rng": torch.get_rng_state()}, Path(tmp) / STATE_FILE)
        ckpt = ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"step_{metrics['step']:06d}")  # Ray: checkpoint


def _optimizer(cfg: TrainConfig, model: torch.nn.Module, saved: dict | None, state: dict[str, Any],
               rank: int) -> tuple[Any, Any]:
    """AdamW over the trainable parameters and the warmup + cosine schedule, restored from ``saved``
    (which also restores ``state`` and the RNG) when resuming."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio))
    if saved:
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["rng"])
        state.update({k: saved[k] for k in state})
        if rank == 0:
            print(f"[train] resumed from step {state['step']}", flush=True)
    return optimizer, scheduler


def _validation(cfg: TrainConfig, model: torch.nn.Module, rank: int, world: int, amp: torch.dtype | None,
                state: dict[str, Any]) -> Any:
    """A function that returns the validation perplexity of ``model`` on the held-out set (read once);
    measures the untrained model first (``state["initial_val_perplexity"]``) unless resuming."""
    import ray.train

    val_batches = list(ray.train.get_dataset_shard("val").iter_torch_batches(  # Ray: held-out
        batch_size=cfg.eval_batch_size, dtypes=torch.long))
    blocks = torch.cat([b["input_ids"] for b in val_batches])  # (N_val, T)
    # task=rag_qa rows carry labels (answer tokens only) and an attention mask (padding).
    labels = torch.cat([b["labels"] for b in val_batches]) if "labels" in val_batches[0] else None
    mask = torch.cat([b["attention_mask"] for b in val_batches]) if "attention_mask" in val_batches[0] else None
    def val_perplexity() -> float:
        return math.exp(validation_nll(model, blocks, rank, world, cfg.eval_batch_size, amp, labels, mask))

    if state["initial_val_perplexity"] is None:
        state["initial_val_perplexity"] = val_perplexity()
        if rank == 0:
            print(f"[train] step 0 val_perplexity={state['initial_val_perplexity']:.4f}", flush=True)
    return val_perplexity


def _log_step(metrics: dict[str, Any], max_steps: int, run_dir: Path) -> None:
    """Print a step's line and append its metrics to the run's history file (rank 0)."""
    extra = f" val_perplexity={metrics['val_perplexity']:.4f}" if "val_perplexity" in metrics else ""
    print(f"[train] step {metrics['step']}/{max_steps} loss={metrics['loss']:.4f} lr={metrics['lr']:.2e} "
          f"grad_norm={metrics['grad_norm']:.3f} tokens/s={metrics['tokens_per_s']:.0f}{extra}", flush=True)
    with (run_dir / HISTORY_FILE).open("a") as fh:
        fh.write(json.dumps(metrics) + "\n")


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The training loop of one Ray Train worker (DDP rank).

    Args:
        config: every :class:`TrainConfig` key plus ``run_dir`` (local directory of the history file)
            and ``storage_root`` (the artifact root, path or URI, that model specs resolve against).
    """
    import ray
    import ray.train
    import ray.train.torch

    cfg = TrainConfig.model_validate({k: v for k, v in config.items() if k in TrainConfig.model_fields})
    run_dir = Path(config["run_dir"])
    ctx = ray.train.get_context()  # Ray: who am I
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()  # Ray: this worker's device
    torch.manual_seed(cfg.seed)
    amp = autocast_dtype(cfg.precision, device)
    # Attention for the dtype the model computes in (the autocast one): flash-attn takes bf16, not fp32.
    attention = choose_attention(cfg.attention, device, amp or torch.float32)
    if rank == 0:
        print(f"[train] device {device.type}, autocast {amp or 'off (fp32)'}, attention {attention.name} "
              f"({attention.reason}), DDP backend {'nccl' if device.type == 'cuda' else 'gloo'}", flush=True)

    state: dict[str, Any] = {"step": 0, "tokens": 0, "epoch": 0, "batch_in_epoch": 0, "train_time_s": 0.0,
                             "history": [], "initial_val_perplexity": None}
    raw_model, saved = _restore(cfg, config["storage_root"], device, attention.name, rank)
    model = ray.train.torch.prepare_model(raw_model)  # Ray: DDP (gloo on CPU, NCCL on GPU)
    optimizer, scheduler = _optimizer(cfg, raw_model, saved, state, rank)
    _log_start(run_dir, rank, world, state["step"])
    val_perplexity = _validation(cfg, raw_model, rank, world, amp, state)


    train_shard = ray.train.get_dataset_shard("train")  # Ray: this worker's data
    stream = _micro_batches(train_shard, cfg, rank, world, state)
    model.train()
    # A step's time runs from the end of the previous step's compute, so the Ray report and any
    # validation/checkpoint in between count against throughput.
    t_prev = time.perf_counter()
    # Every step is printed and logged to metrics.jsonl; Ray Train gets a step's metrics unless the
    # last report is younger than the controller's poll interval (a report then would block the
    # step until the controller collects the previous one). Validation steps are always reported.
    gap_s, t_reported = report_interval_s(), -math.inf
    while state["step"] < cfg.max_steps:
        loss_sum, step_tokens = _accumulate(model, stream, cfg, device, amp)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            [p for p in raw_model.parameters() if p.requires_grad], cfg.max_grad_norm or float("inf"))
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        step = state["step"]
        _maybe_fail(step, rank, run_dir)
        # Rank 0 decides whether this step goes to Ray Train, so that all ranks report together.
        loss_value, report_now = _global_mean(loss_sum, device, world,
                                              rank == 0 and time.perf_counter() - t_reported >= gap_s)
        now = time.perf_counter()
        elapsed, t_prev = now - t_prev, now
        tokens_per_step = step_tokens * world
        state["tokens"] += tokens_per_step
        state["train_time_s"] += elapsed
        metrics = {"step": step, "loss": loss_value, "lr": lr, "grad_norm": float(grad_norm),
                   "tokens_per_s": tokens_per_step / elapsed, "tokens": state["tokens"], "epoch": state["epoch"],
                   "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        evaluate = step % cfg.eval_every == 0 or step == cfg.max_steps
        if evaluate:
            metrics["val_perplexity"] = val_perplexity()
        state["history"].append(metrics)
        if rank == 0:
            _log_step(metrics, cfg.max_steps, run_dir)
        if not evaluate:
            if report_now:
                ray.train.report(metrics)  # Ray: per-step metrics
                t_reported = time.perf_counter()
            continue
        # The next step reports regardless: its report waits until the controller has taken this
        # checkpoint, so a worker lost right after it still resumes from it.
        t_reported = -math.inf
        _report_checkpoint(metrics, raw_model, optimizer, scheduler, state, rank)


# ---------------------------------------------------------------------------------------------
# The driver: validate, build the data, fit, export.
# ---------------------------------------------------------------------------------------------

def check_resources(cfg: TrainConfig) -> bool:
    """Whether workers get GPUs; fails fast when the cluster cannot place the workers at all."""
    cpus, gpus = cluster_cpus(), cluster_gpus()
    need = cfg.num_workers * cfg.cpus_per_worker
    if need > cpus:
        raise UserError(f"num_workers={cfg.num_workers} x cpus_per_worker={cfg.cpus_per_worker} needs {need} CPUs "
                        f"but the Ray cluster has {cpus}; valid: num_workers * cpus_per_worker <= {cpus}")
    use_gpu = gpus > 0 if cfg.use_gpu == "auto" else cfg.use_gpu
    if use_gpu and cfg.num_workers > gpus:
        raise UserError(f"use_gpu needs {cfg.num_workers} GPUs (one per worker) but the cluster has {gpus}; "
                        f"valid: num_workers <= {gpus} or use_gpu=false")
    return bool(use_gpu)


def check_lora_targets(cfg: TrainConfig, storage: str) -> None:
    """Match ``lora.target_modules`` against the base model's layers without loading weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    source = resolve(cfg.model, storage)
    if source.kind != "hf":
        raise UserError(f"model '{cfg.model}' is a {source.kind} artifact; valid: a base model (embedded name, "
                        f"HF id or HF directory) to train from")
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source.path))
    check_target_modules(meta, cfg.lora.target_modules)


def export(cfg: TrainConfig, result, storage: str, wall_s: float, tokenizer) -> Path:
    """Publish the best checkpoint with config, manifest, metrics, history and curves."""
    best_ckpt, best_metrics = min(result.best_checkpoints, key=lambda cm: cm[1]["val_perplexity"])
    with result.checkpoint.as_directory() as latest:
        final = torch.load(Path(latest) / STATE_FILE, map_location="cpu", weights_only=False)
    history = final["history"]
    last_eval = [h for h in history if "val_perplexity" in h][-1]
    initial = final["initial_val_perplexity"]
    metrics = {
        "method": cfg.method, "base_model": cfg.model, "num_workers": cfg.num_workers,
        "initial_val_perplexity": initial, "final_val_perplexity": last_eval["val_perplexity"],
        "best_val_perplexity": best_metrics["val_perplexity"], "best_step": best_metrics["step"],
        "val_perplexity_reduction": 1.0 - best_metrics["val_perplexity"] / initial,
        "steps": final["step"], "tokens": final["tokens"], "train_time_s": final["train_time_s"],
        "wall_time_s": wall_s, "tokens_per_s": final["tokens"] / max(final["train_time_s"], 1e-9),
    }
    kind = artifacts.Kind.ADAPTERS if cfg.method == "lora" else artifacts.Kind.MODELS
    with artifacts.publish(cfg.storage, kind, cfg.name) as out, best_ckpt.as_directory() as best:
        for f in Path(best).iterdir():
            if f.name != STATE_FILE and f.is_file():
                shutil.copy2(f, out / f.name)
        if cfg.method == "full":
            tokenizer.save_pretrained(out)
        save_config(cfg, out)
        manifest = artifacts.AdapterManifest if cfg.method == "lora" else artifacts.ModelManifest
        artifacts.write_manifest(out, manifest(
            base_model=cfg.model, method=cfg.method, name=cfg.name, run=artifacts.uri(cfg.storage, "runs", cfg.name),
            step=best_metrics["step"], val_perplexity=best_metrics["val_perplexity"]))
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        (out / "history.json").write_text(json.dumps(history))
        plot_curves(history, initial, out / "curves.png")
    published = artifacts.require(cfg.storage, kind, cfg.name)
    if cfg.merge:
        base = load_model(cfg.model, storage=cfg.storage, dtype="float32")
        merged = merge_adapter(apply_adapter(base, published))
        with artifacts.publish(cfg.storage, artifacts.Kind.MODELS, f"{cfg.name}-merged") as out:
            merged.save_pretrained(out, safe_serialization=True)
            tokenizer.save_pretrained(out)
            artifacts.write_manifest(out, artifacts.ModelManifest(
                name=f"{cfg.name}-merged", base_model=cfg.model, merged=True,
                adapter=artifacts.uri(cfg.storage, kind, cfg.name)))
        print(f"[train] merged model: {artifacts.uri(cfg.storage, 'models', cfg.name + '-merged')}", flush=True)
    print(f"[train] val perplexity {initial:.4f} -> best {metrics['best_val_perplexity']:.4f} at step "
          f"{metrics['best_step']} ({100 * metrics['val_perplexity_reduction']:.1f}% lower); {metrics['steps']} steps, "
          f"{metrics['tokens']:,} tokens, {metrics['tokens_per_s']:.0f} tokens/s", flush=True)
    print(f"[train] exported: {artifacts.uri(cfg.storage, kind, cfg.name)}", flush=True)
    return published


def plot_curves(history: list[dict], initial_ppl: float, path: Path) -> None:
    """Training loss and validation perplexity against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot([h["step"] for h in history], [h["loss"] for h in history])
    ax1.set(xlabel="step", ylabel="training loss", title="loss")
    evals = [(0, initial_ppl)] + [(h["step"], h["val_perplexity"]) for h in history if "val_perplexity" in h]
    ax2.plot(*zip(*evals), marker="o")
    ax2.set(xlabel="step", ylabel="validation perplexity", title="held-out perplexity")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def build_trainer(cfg: TrainConfig, callbacks: Sequence[Any] = ()) -> tuple[Any, Any, str]:
    """Validate ``cfg`` against the cluster, build the datasets and the ``TorchTrainer``.

    Args:
        cfg: the training config.
        callbacks: Ray Train run callbacks (e.g. Tune's report callback when a trial trains).

    Returns:
        ``(trainer, tokenizer, local storage root)``; ``trainer.fit()`` runs the training.
    """
    import ray.data
    import ray.train
    from ray.data import ExecutionOptions
    from ray.train.torch import TorchConfig, TorchTrainer

    storage = local_storage_root(cfg.storage)
    if cfg.method == "lora":
        check_lora_targets(cfg, cfg.storage)
    init_ray()
    # Per-step progress lines are the job's log; Ray Data's progress bars would drown them.
    ray.data.DataContext.get_current().enable_progress_bars = False
    use_gpu = check_resources(cfg)
    tokenizer = load_tokenizer(cfg.model, storage=cfg.storage)
    if cfg.task == "rag_qa":
        train_ds, val_ds = qa_datasets(cfg, cfg.qa, tokenizer, cfg.block_size, cfg.seed)
    else:
        train_ds, val_ds = block_datasets(cfg, tokenizer, cfg.block_size, cfg.max_tokens or None)
    if cfg.val_blocks:
        val_ds = val_ds.limit(cfg.val_blocks)
    if cfg.shuffle:
        train_ds = train_ds.random_shuffle(seed=cfg.seed)
    train_ds, val_ds = train_ds.materialize(), val_ds.materialize()
    if train_ds.count() < cfg.batch_size * cfg.num_workers:
        raise UserError(f"{train_ds.count()} training rows of {cfg.block_size} tokens make no global batch of "
                        f"batch_size={cfg.batch_size} x num_workers={cfg.num_workers}; valid: a smaller batch_size, "
                        f"num_workers or block_size, or more data (max_tokens={cfg.max_tokens})")
    run_dir = Path(storage) / "runs" / cfg.name
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={**cfg.model_dump(), "run_dir": str(run_dir), "storage_root": resolve_storage(cfg.storage)},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu,
                                               resources_per_worker={"CPU": cfg.cpus_per_worker}),
        # NCCL all-reduces GPU tensors in place; gloo is the CPU collective library.
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=cfg.name, **ray_storage(join(resolve_storage(cfg.storage), "runs")),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints,
                                                         checkpoint_score_attribute="val_perplexity",
                                                         checkpoint_score_order="min"),
            callbacks=list(callbacks)),
        datasets={"train": train_ds, "val": val_ds},
        # The validation set is read whole by every worker; "stride" reads the train set whole too.
        dataset_config=ray.train.DataConfig(
            datasets_to_split=["train"] if cfg.shard == "split" else [],
            execution_options=ExecutionOptions(preserve_order=True) if cfg.shard == "stride" else None),
    )
    return trainer, tokenizer, storage


def main(cfg: TrainConfig) -> Path:
    t0 = time.perf_counter()
    init_ray()
    # Ray Train waits without end for workers it cannot place: fail now if they do not fit what is free.
    # (Not in build_trainer: a Tune trial shares the cluster with the other trials Tune schedules.)
    gpus = cfg.num_workers if check_resources(cfg) else 0
    require_free({"CPU": cfg.num_workers * cfg.cpus_per_worker, "GPU": gpus}, "jobs.train",
                 f"num_workers={cfg.num_workers} x cpus_per_worker={cfg.cpus_per_worker}"
                 + (" + 1 GPU each" if gpus else ""))
    return train(cfg, t0=t0)


def train(cfg: TrainConfig, callbacks: Sequence[Any] = (), t0: float | None = None) -> Path:
    """Train and publish; returns the local directory of the published adapter (or model).

    The entry for a caller that has placed the work itself (a Tune trial, with ``callbacks``
    forwarding its reports): no check of free resources.
    """
    t0 = time.perf_counter() if t0 is None else t0
    trainer, tokenizer, storage = build_trainer(cfg, callbacks)
    result = trainer.fit()
    return export(cfg, result, storage, time.perf_counter() - t0, tokenizer)


if __name__ == "__main__":
    run_job(main, TrainConfig, prog="jobs.train", description=DESCRIPTION)
