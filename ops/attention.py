"""Attention backend choices: the HF model's `attn_implementation`, and the engine's own CUDA decode.

- `choose_attention`: FlashAttention-2 on CUDA fp16/bf16 when installed, else SDPA, else eager; a
  Hugging Face `attn_implementation` value, passed to `from_pretrained` (training, the HF forward).
- `choose_decode_attention`: what the engine's Llama-family forward runs over its static KV cache
  on a CUDA device: flash-attn's `flash_attn_with_kvcache` when importable, else torch SDPA.
- `prefill_sdpa_backends`: the SDPA kernels allowed for causal prefill (the flash kernel alone
  where its constraints hold).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

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


# ---------------------------------------------------------------------------------------------
# The engine's own decode over its static KV cache


DECODE_ATTENTION = ("flash_attn_with_kvcache", "sdpa_efficient", "sdpa")
# Every rows' cache is one static (B, n_kv, T_max, hs) tensor so that a decode step has fixed shapes
# (CUDA graphs); rows hold different lengths, so attention needs per-row lengths or a mask.
_SDPA_MASK_NOTE = ("torch's SDPA flash kernel takes no attention mask, which rows of different lengths in the "
                   "static (graph-captured) cache need")


def flash_attn_version() -> str:
    """The installed flash-attn version, or "" when it is not installed."""
    try:
        return importlib.metadata.version("flash-attn")
    except importlib.metadata.PackageNotFoundError:
        return "" if not flash_attn_installed() else "unknown version"


def sdpa_flash_blocker(device: torch.device | str, dtype: torch.dtype, head_dim: int) -> str:
    """Why torch SDPA's flash kernel (and flash-attn) cannot run these inputs, or "" when it can.

    Args:
        device: where attention runs.
        dtype: query/key/value dtype.
        head_dim: size of one attention head.
    """
    device = torch.device(device)
    if not _cuda_device(device):
        return f"it needs a CUDA device, got device {str(device)!r}"
    if dtype not in FLASH_DTYPES:
        return f"it needs float16 or bfloat16, got {dtype}"
    if head_dim % 8 or head_dim > 256:
        return f"it needs a head size that is a multiple of 8 up to 256, got {head_dim}"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"it needs compute capability 8.0 or newer (Ampere), got {major}.{minor}"
    return ""


def prefill_sdpa_backends(device: torch.device | str, dtype: torch.dtype, head_dim: int) -> list[SDPBackend]:
    """SDPA kernels for the engine's causal prefill: flash alone where it can run, else any.

    Forcing flash (rather than letting torch choose) makes "prefill runs FlashAttention" a checked
    fact: an input it cannot take raises instead of silently running another kernel.
    """
    if not sdpa_flash_blocker(device, dtype, head_dim):
        return [SDPBackend.FLASH_ATTENTION]
    return [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def choose_decode_attention(device: torch.device | str, dtype: torch.dtype, head_dim: int) -> AttentionChoice:
    """Picks the attention of the engine's decode step over its static KV cache, and logs it.

    - "flash_attn_with_kvcache": flash-attn installed and its constraints hold (CUDA sm80+, fp16/bf16,
      head size multiple of 8 up to 256): one kernel appends the new key/value at each row's
      length and attends over that row's filled part.
    - "sdpa_efficient": CUDA without flash-attn: torch SDPA's memory-efficient kernel over the whole
      cache with a per-row length mask (the flash kernel takes no mask).
    - "sdpa": anything else (CPU, float32 inputs, ...): torch SDPA picks its kernel.

    Args:
        device: where the model runs.
        dtype: the KV cache dtype.
        head_dim: size of one attention head.

    Returns:
        The choice and its reason, which also says what prefill runs.
    """
    device = torch.device(device)
    blocker = sdpa_flash_blocker(device, dtype, head_dim)
    if device.type != "cuda":
        choice = AttentionChoice("sdpa", f"torch SDPA over the KV cache on {device.type}")
    elif blocker:
        choice = AttentionChoice("sdpa", f"torch SDPA (kernel chosen by torch) for decode and prefill: FlashAttention "
                                 f"cannot run because {blocker}")
    elif flash_attn_installed():
        choice = AttentionChoice("flash_attn_with_kvcache", f"flash-attn {flash_attn_version()}: decode appends to "
                                 "and attends over each row's KV cache in one kernel; prefill: torch SDPA flash kernel")
    else:
        choice = AttentionChoice("sdpa_efficient", "flash-attn is not installed (pip install --no-build-isolation "
                                 f"'.[gpu]'), and {_SDPA_MASK_NOTE}: decode runs SDPA's memory-efficient kernel "
                                 "with a length mask; prefill: torch SDPA flash kernel")
    log.info("decode attention: %s (%s)", choice.name, choice.reason)
    return choice
