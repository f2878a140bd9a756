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


def merge_adapter(model: torch.nn.Module) -> torch.nn.Module:
    """Fold the LoRA update into the base weights and return the plain base model (no PEFT wrapper)."""
    if not hasattr(model, "merge_and_unload"):
        raise UserError(f"merge_adapter needs a PEFT model, got {type(model).__name__}")
    return model.merge_and_unload()
