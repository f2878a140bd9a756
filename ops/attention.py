"""Attention backend choice: FlashAttention-2 on CUDA fp16/bf16 when installed, else SDPA, else eager.

The chosen name is a Hugging Face `attn_implementation` value, passed to `from_pretrained`.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ops.errors import UserError

log = logging.getLogger(__name__)

ATTENTION_BACKENDS = ("flash_attention_2", "sdpa", "eager")
FLASH_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class AttentionChoice:
    """An attention implementation and why it was chosen.

    Attributes:
        name: "flash_attention_2", "sdpa" or "eager" (HF `attn_implementation`).
        reason: one line on why.
    """

    name: str
    reason: str


def flash_attn_installed() -> bool:
    """Whether the `flash_attn` package is importable."""
    return importlib.util.find_spec("flash_attn") is not None


def sdpa_available() -> bool:
    """Whether this torch has `scaled_dot_product_attention`."""
    return hasattr(F, "scaled_dot_product_attention")


def _cuda_device(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_available()


def _flash_blocker(device: torch.device, dtype: torch.dtype) -> str:
    """Why FlashAttention-2 cannot run here, or "" when it can."""
    if not flash_attn_installed():
        return "the flash-attn package is not installed (pip install '.[gpu]')"
    if not _cuda_device(device):
        return f"it needs a CUDA device, got device {str(device)!r}"
    if dtype not in FLASH_DTYPES:
        return f"it needs float16 or bfloat16, got {dtype}"
    return ""


def choose_attention(
    requested: str | None = "auto",
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> AttentionChoice:
    """Picks the attention implementation for a model on `device` in `dtype`, and logs it.

    "auto" (or None) prefers flash_attention_2 (flash-attn installed, CUDA device, fp16/bf16),
    then sdpa (torch has scaled_dot_product_attention), then eager. A named backend is checked
    and used as is.

    Args:
        requested: "auto", None, or one of ATTENTION_BACKENDS.
        device: where the model runs.
        dtype: the model's compute dtype; None means float32.

    Returns:
        The choice and its reason.

    Raises:
        UserError: an unknown name, or a named backend that cannot run here.
    """
    device = torch.device(device)
    dtype = dtype or torch.float32
    name = (requested or "auto").strip().lower()
    if name == "auto":
        blocker = _flash_blocker(device, dtype)
        if not blocker:
            choice = AttentionChoice("flash_attention_2", f"auto: flash-attn installed, {device.type}, {dtype}")
        elif sdpa_available():
            choice = AttentionChoice("sdpa", f"auto: not flash_attention_2 because {blocker}")
        else:
            choice = AttentionChoice("eager", "auto: torch has no scaled_dot_product_attention")
    elif name == "flash_attention_2":
        blocker = _flash_blocker(device, dtype)
        if blocker:
            raise UserError(f"attention='flash_attention_2' cannot run here: {blocker}; use 'auto', 'sdpa' or 'eager'")
        choice = AttentionChoice(name, "requested")
    elif name == "sdpa":
        if not sdpa_available():
            raise UserError("attention='sdpa' needs torch.nn.functional.scaled_dot_product_attention (torch>=2.0); use 'eager' or 'auto'")
        choice = AttentionChoice(name, "requested")
    elif name == "eager":
        choice = AttentionChoice(name, "requested")
    else:
        raise UserError(f"attention={requested!r} is not valid; use one of auto, {', '.join(ATTENTION_BACKENDS)}")
    log.info("attention: %s (%s)", choice.name, choice.reason)
    return choice
