"""LoRA through PEFT. PEFT is imported nowhere else in the project.

Adapters are saved in standard PEFT format (``adapter_config.json`` + ``adapter_model.safetensors``)
so plain ``PeftModel.from_pretrained(base, path)`` loads them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from ops.errors import UserError

log = logging.getLogger(__name__)


def apply_adapter(model: torch.nn.Module, adapter_dir: str | os.PathLike, trainable: bool = False) -> torch.nn.Module:
    """Wrap ``model`` with the LoRA adapter saved in ``adapter_dir`` (a PEFT directory)."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise UserError(f"adapter '{adapter_dir}' has no adapter_config.json; valid: a PEFT adapter directory")
    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)


# Attention and MLP projections of Llama-style models (SmolLM2, Llama, Mistral, Qwen).
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _matching_modules(model: torch.nn.Module, targets: list[str]) -> list[str]:
    return [name for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets]


def check_target_modules(model: torch.nn.Module, targets: list[str]) -> None:
    """Fail fast when some of ``targets`` match no ``nn.Linear`` of ``model`` (meta models work too).

    Raises:
        UserError: names the targets that match nothing and the linear layer names that exist.
    """
    linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    missing = [t for t in targets if not _matching_modules(model, [t])]
    if not targets or missing:
        raise UserError(f"lora.target_modules {missing or targets} match no linear layer of the model; "
                        f"valid: {', '.join(linear)}")


def add_lora(model: torch.nn.Module, r: int, alpha: float, dropout: float,
             target_modules: list[str] | tuple[str, ...] = DEFAULT_TARGETS) -> torch.nn.Module:
    """Wrap ``model`` in a trainable PEFT LoRA model; only the LoRA matrices require grad.

    Args:
        r: rank of the update ``B @ A`` (>= 1).
        alpha: scale numerator; the update is scaled by ``alpha / r``.
        dropout: dropout on the LoRA input path (0 for deterministic runs).
        target_modules: names of the ``nn.Linear`` leaves to adapt.

    Raises:
        UserError: ``r < 1``, ``dropout`` outside [0, 1) or targets that match nothing.
    """
    from peft import LoraConfig, get_peft_model

    if r < 1:
        raise UserError(f"lora.r={r} must be an integer >= 1")
    if not 0.0 <= dropout < 1.0:
        raise UserError(f"lora.dropout={dropout} must be in [0, 1)")
    targets = list(target_modules)
    check_target_modules(model, targets)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none",
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def trainable_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts, tied weights counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def merge_adapter(model: torch.nn.Module) -> torch.nn.Module:
    """Fold the LoRA update into the base weights and return the plain base model (no PEFT wrapper)."""
    if not hasattr(model, "merge_and_unload"):
        raise UserError(f"merge_adapter needs a PEFT model, got {type(model).__name__}")
    return model.merge_and_unload()
