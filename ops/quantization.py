"""Post-training quantization of causal LMs: one entry, :func:`quantize`, and one artifact format.

Methods (``method=``):

* ``dynamic_int8``: int8 weights; activations quantized to int8 at run time per token (or per
  tensor); int8 x int8 -> int32 matmul with ``torch._int_mm``.
* ``static_int8``: int8 weights; one activation scale per layer calibrated ahead of time on
  real text, optionally after SmoothQuant scaling (``smoothquant_alpha``); ``torch._int_mm``.
* ``weight_only_int8``: int8 per-channel weights, activations in float
  (``torch.ops.aten._weight_int8pack_mm``).
* ``weight_only_int4``: asymmetric int4 weights in groups of ``group_size`` along the input
  dimension, activations in float (``torch.ops.aten._weight_int4pack_mm_for_cpu``).

The two weight-only methods use those matrix-vector kernels for few rows (decode) and, from
:data:`GEMM_MIN_ROWS` rows on (prefill), dequantize the weight to the compute dtype and run one GEMM.
* ``bf16``: the whole model cast to bfloat16 (baseline).

Every kernel is a stock PyTorch op (no torchao, no ``torch.ao.quantization``, whose fbgemm
dynamic path quantizes activations per tensor in 7 bits and is being retired in favour of torchao).

On CUDA (:data:`CUDA_METHODS`): ``weight_only_int4`` runs torch's CUDA int4 kernel
(``_weight_int4pack_mm``, bfloat16, compute capability 8.0+), its packed layout rebuilt from the
portable nibbles when the module moves to the GPU; ``weight_only_int8`` keeps int8 weights and
dequantizes them to bfloat16 inside each matmul (cuBLAS); ``bf16`` is a plain model. The int8 x int8
methods stay on CPU: ``torch._int_mm`` on CUDA needs more than 16 rows, and decode has one per request.

Tied embeddings: when ``lm_head`` shares its weight with the input embedding (SmolLM2) and
``lm_head`` is quantized, the embedding becomes a :class:`TiedEmbedding` that reads its rows from
``lm_head``'s quantized weight; it owns no tensors, so the model stays tied and is stored once.

Artifact (:func:`save_quantized` / :func:`load_quantized`): ``quantization.json`` (method,
settings, base model, torch version), the base ``config.json``, ``model.safetensors`` with the
portable tensors (int4 as two nibbles per byte; the CPU-specific packed layout is rebuilt on load)
and, when given, the tokenizer.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import os
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ops.errors import UserError, first_validation_error

FORMAT_VERSION = 2  # 2: int4 scales/mins in float32 (1: bf16 scales_and_zeros, still loads)
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "quantization.json"
ComputeDtype = Literal["bfloat16", "float32"]
CUDA_METHODS = ("weight_only_int4", "weight_only_int8", "bf16")
HeadMode = Literal["quantize", "int8", "float"]
# Weight-only layers switch from torch's matrix-vector kernels to "dequantize the weight, one GEMM"
# at this many input rows (tokens). The layer sweep of bench/prefill.py (docs/benchmarks/prefill.md)
# on the embedded model's shapes: at 64 rows the packed kernels are still 1.3-1.7x cheaper per row
# (int8 and int4), at 128 the two are even, at 512 the GEMM is 1.6-2x cheaper. Serve's 64-token
# prefill chunks therefore stay on the kernels; a whole prompt takes the GEMM. Decode (one row per
# request) keeps the matrix-vector kernels.
# The dequantized weight is not cached: casting it is O(N K) against the GEMM's O(M N K), a few
# percent of a prefill's time from 128 rows on, while a cache would hold a bf16 copy of every layer
# (twice the int8 model, four times the int4 one) and undo the memory the method saves.
GEMM_MIN_ROWS = 128


# ----------------------------------------------------------------------------- settings

class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    skip: list[str] = Field(default_factory=list, description="fnmatch patterns of linear module names kept in "
                            "float, e.g. ['*.down_proj'] (lm_head is set by `lm_head`)")
    lm_head: HeadMode = Field("quantize", description="lm_head (and the embedding tied to it): 'quantize' like the "
                              "other linears, 'int8' weight-only int8 per channel, or 'float'")


class DynamicInt8Settings(_Settings):
    weight_granularity: Literal["per_channel", "per_tensor"] = Field("per_channel", description="int8 weight scales")
    activation_granularity: Literal["per_token", "per_tensor"] = Field(
        "per_token", description="run-time activation scale: one per token (row) or one per batch")


class StaticInt8Settings(_Settings):
    skip: list[str] = Field(default_factory=lambda: ["*.down_proj"], description="fnmatch patterns of linear "
                            "module names kept in float (down_proj inputs carry the largest outliers)")
    lm_head: HeadMode = Field("int8", description="lm_head (and the embedding tied to it): 'quantize' with a "
                              "static activation scale, 'int8' weight-only int8 per channel, or 'float'")
    weight_granularity: Literal["per_channel", "per_tensor"] = Field("per_channel", description="int8 weight scales")
    smoothquant_alpha: float | None = Field(0.5, description="SmoothQuant migration strength in [0, 1]; "
                                            "null = no smoothing")

    @field_validator("smoothquant_alpha")
    @classmethod
    def _alpha(cls, v: float | None) -> float | None:
        if v is not None and not 0.0 <= v <= 1.0:
            raise ValueError(f"smoothquant_alpha must be in [0, 1] or null, got {v}")
        return v


class WeightOnlyInt8Settings(_Settings):
    weight_granularity: Literal["per_channel", "per_tensor"] = Field("per_channel", description="int8 weight scales")
    compute_dtype: ComputeDtype = Field("bfloat16", description="activation dtype inside the kernel (torch's CPU "
                                        "kernel is vectorized for bfloat16 only; float32 is exact but slow)")


class WeightOnlyInt4Settings(_Settings):
    lm_head: HeadMode = Field("int8", description="lm_head (and the embedding tied to it): 'int8' weight-only int8 "
                              "per channel (SmolLM2's embedding is Q8_0 in its GGUF, so int4 costs quality), "
                              "'quantize' as int4, or 'float'")
    group_size: int = Field(32, description="weights per (scale, zero) group along the input dimension; "
                            "32 matches the GGUF Q4_1 blocks of the embedded model")
    compute_dtype: ComputeDtype = Field("bfloat16", description="activation/scale dtype inside the kernel (torch's "
                                        "CPU kernel is vectorized for bfloat16 only; float32 is exact but slow)")

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int) -> int:
        if v not in (32, 64, 128, 256):
            raise ValueError(f"group_size must be one of 32, 64, 128, 256 (the CPU int4 kernel's), got {v}")
        return v


class Bf16Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")


SETTINGS: dict[str, type[BaseModel]] = {
    "dynamic_int8": DynamicInt8Settings,
    "static_int8": StaticInt8Settings,
    "weight_only_int8": WeightOnlyInt8Settings,
    "weight_only_int4": WeightOnlyInt4Settings,
    "bf16": Bf16Settings,
}
METHODS = tuple(SETTINGS)


def check_method(method: str) -> str:
    if method not in SETTINGS:
        raise UserError(f"unknown quantization method {method!r}; valid: {', '.join(METHODS)}")
    return method


def parse_settings(method: str, settings: dict[str, Any]) -> BaseModel:
    """Validate ``settings`` for ``method``; bad keys and values become one-line :class:`UserError`."""
    check_method(method)
    try:
        return SETTINGS[method].model_validate(settings)
    except ValidationError as err:
        key, _, first = first_validation_error(err.errors())
        key = key or "settings"
        if first["type"] == "extra_forbidden":
            raise UserError(f"unknown setting '{key}' for {method}; valid: "
                            f"{', '.join(SETTINGS[method].model_fields)}") from None
        raise UserError(f"bad setting '{key}' for {method}: {first['msg']} (got {first.get('input')!r})") from None


# ----------------------------------------------------------------------------- quantizers

def cpu_gemm_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a CPU prefill GEMM over a dequantized weight runs in, for activations of ``dtype``.

    bfloat16 only where the CPU multiplies it natively (AVX512-BF16 or AMX): elsewhere oneDNN
    emulates it, several times slower than float32 (docs/benchmarks/cpu_gemm_dtype.md, from
    bench/cpu_gemm_dtype.py). float32 rounds less, so only speed differs.
    """
    if dtype == torch.bfloat16 and not _native_bf16():
        return torch.float32
    return dtype


def _native_bf16() -> bool:
    global _NATIVE_BF16
    if _NATIVE_BF16 is None:
        cpu = torch.cpu
        _NATIVE_BF16 = any(getattr(cpu, probe, lambda: False)() for probe in
                           ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return _NATIVE_BF16


_NATIVE_BF16: bool | None = None


def _dtype(name: str) -> torch.dtype:
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[name]


def quantize_int8_weight(w: torch.Tensor, granularity: str = "per_channel") -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 weights.

    Args:
        w: (N, K) float weight.
        granularity: ``per_channel`` (one scale per output row) or ``per_tensor``.

    Returns:
        ``(q, scales)``: (N, K) int8 in [-127, 127] and (N,) float32 scales; ``w ~ q * scales[:, None]``.
    """
    w = w.float()
    amax = w.abs().amax(dim=1) if granularity == "per_channel" else w.abs().amax().expand(w.shape[0])
    scales = (amax / 127).clamp(min=1e-10)
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales.contiguous()


def quantize_int4_groupwise(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min/max int4 in groups along the input dimension (GGUF Q4_1 style: ``w = d * q + m``).

    Args:
        w: (N, K) float weight, ``K % group_size == 0``.

    Returns:
        ``(q, scales, mins)``: (N, K) uint8 in [0, 15], (N, K // group_size) float32 ``d`` and ``m``.
    """
    n, k = w.shape
    g = w.float().reshape(n, k // group_size, group_size)
    lo, hi = g.amin(-1), g.amax(-1)
    scales = ((hi - lo) / 15).clamp(min=1e-10)
    q = torch.round((g - lo[..., None]) / scales[..., None]).clamp(0, 15).to(torch.uint8)
    return q.reshape(n, k), scales, lo


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(N, K) uint8 values in [0, 15] -> (N, K // 2) uint8, even k in the low nibble (portable layout)."""
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: (N, K // 2) uint8 -> (N, K) uint8."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


def int4_dot_operands(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The operands of ``raylm::int4_bf16_linear`` (native/csrc/bf16_dot.cpp) for an int4 CPU layer:
    ``packed`` (N / 16, K / 32, 256) uint8 and ``scale_min`` (N / 16, K / 32, 2, 16) float16.

    Built once per layer (until `Int4WeightOnlyLinear.repack`). None where that kernel would not
    compute what the module does, or cannot: not an
    `Int4WeightOnlyLinear` on CPU with bfloat16 compute (the kernel rounds activations to bfloat16,
    as torch's does), a bias, group size other than 32, N not a multiple of 16, scales or mins not
    exact in float16 (GGUF Q4_1 stores them so; a model quantized here from float weights does
    not), or a native build without the kernel.
    """
    if type(module) is not Int4WeightOnlyLinear:
        return None
    cached = getattr(module, "_dot_operands", None)  # built once; `repack` drops it
    if cached is None:
        cached = module._dot_operands = _int4_dot_operands(module) or ()
    return cached or None


def _int4_dot_operands(module: Int4WeightOnlyLinear) -> tuple[torch.Tensor, torch.Tensor] | None:
    if module.qweight.device.type != "cpu" or module.bias is not None or module.compute_dtype != "bfloat16" \
            or module.group_size != 32 or module.out_features % 16:
        return None
    d, m = module.scales.half(), module.mins.half()
    if not (torch.equal(d.float(), module.scales) and torch.equal(m.float(), module.mins)):
        return None
    from ops.native_build import backend

    if "cpu" not in backend().devices or not torch.ops.raylm.bf16_dot_supported():
        return None
    n, k = module.out_features, module.in_features
    q = unpack_nibbles(module.qweight).view(n // 16, 16, k // 32, 8, 2, 2)  # (tile, j, group, c, h, e)
    q = q.permute(0, 2, 3, 1, 5, 4)  # (tile, group, c, j, e, h): input 4c + 2h + e of column j
    packed = (q[..., 0] | (q[..., 1] << 4)).reshape(n // 16, k // 32, 256).contiguous()
    scale_min = torch.stack([t.view(n // 16, 16, k // 32).transpose(1, 2) for t in (d, m)], dim=2).contiguous()
    return packed, scale_min


def int8_dot_operands(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The operands of ``raylm::int8_bf16_linear`` for an int8 weight-only CPU layer (the int4 model's
    tied head): ``packed`` (N / 16, K / 2, 32) int8 and float32 ``scales`` (N,), built once per layer
    (again if its tensors are replaced). None where the kernel
    would not compute what the module does (not CPU bfloat16 compute, a bias, per-tensor scales,
    N not a multiple of 16 or K odd) or the native build lacks it."""
    if type(module) is not Int8WeightOnlyLinear:
        return None
    key = (module.weight.data_ptr(), module.weight.device, module.scales.data_ptr())  # rebuilt if they move
    cached = getattr(module, "_dot_operands", None)
    if cached is None or cached[0] != key:
        cached = module._dot_operands = (key, _int8_dot_operands(module))
    return cached[1]


def _int8_dot_operands(module: Int8WeightOnlyLinear) -> tuple[torch.Tensor, torch.Tensor] | None:
    if module.weight.device.type != "cpu" or module.bias is not None or module.compute_dtype != "bfloat16" \
            or module.out_features % 16 or module.in_features % 2 or module.scales.numel() != module.out_features:
        return None
    from ops.native_build import backend

    if "cpu" not in backend().devices or not torch.ops.raylm.bf16_dot_supported():
        return None
    n, k = module.out_features, module.in_features
    packed = module.weight.view(n // 16, 16, k // 2, 2).transpose(1, 2).contiguous().view(n // 16, k // 2, 32)
    return packed, module.scales.float().reshape(n).contiguous()


# ----------------------------------------------------------------------------- modules

class Int8WeightOnlyLinear(nn.Module):
    """``y = x @ (q * scales)^T + b`` with int8 weights and float activations (``_weight_int8pack_mm``)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 compute_dtype: str = "bfloat16") -> None:
        super().__init__()
        self.in_features, self.out_features, self.compute_dtype = in_features, out_features, compute_dtype
        cdt = _dtype(compute_dtype)
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(out_features, dtype=cdt))
        self.register_buffer("bias", torch.zeros(out_features, dtype=cdt) if bias else None)

    @classmethod
    def from_float(cls, linear: nn.Linear, granularity: str = "per_channel",
                   compute_dtype: str = "bfloat16") -> "Int8WeightOnlyLinear":
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, compute_dtype)
        q, scales = quantize_int8_weight(linear.weight.detach(), granularity)
        m.weight.copy_(q)
        m.scales.copy_(scales)
        if linear.bias is not None:
            m.bias.copy_(linear.bias.detach())
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., K) -> (..., N) in ``x``'s dtype."""
        rows = x.numel() // self.in_features
        if rows < GEMM_MIN_ROWS and not torch.compiler.is_compiling():
            dot = int8_dot_operands(self)  # our AVX512-BF16 kernel, float32 out (docs/benchmarks/ops.md)
            if dot is not None:
                y = torch.ops.raylm.int8_bf16_linear(x.reshape(rows, self.in_features).float(), *dot)
                return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        # int8 -> compute dtype is exact (|q| <= 127), then one GEMM; the per-channel scale applies to
        # the output columns. (No fast CUDA int8 weight-only kernel.) On CPU from GEMM_MIN_ROWS rows,
        # in a dtype this CPU multiplies natively.
        cdt = self.scales.dtype
        if self.weight.is_cuda or rows >= GEMM_MIN_ROWS:
            gemm = cdt if self.weight.is_cuda else cpu_gemm_dtype(cdt)
            y = F.linear(x.reshape(-1, self.in_features).to(gemm), self.weight.to(gemm)) * self.scales.to(gemm)
        else:
            y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, self.in_features).to(cdt), self.weight, self.scales)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def dequantize_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` of the float weight: (...,) -> (..., K) float32."""
        return self.weight[ids].float() * self.scales[ids].float().unsqueeze(-1)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, compute={self.compute_dtype}"


class Int4WeightOnlyLinear(nn.Module):
    """Group-wise asymmetric int4 weights, float activations (``_weight_int4pack_mm_for_cpu`` on CPU,
    ``_weight_int4pack_mm`` on CUDA).

    Persistent buffers, in GGUF Q4_1's convention ``w = scale * q + min`` per group of
    ``group_size`` inputs: ``qweight`` (N, K // 2) uint8 portable nibbles, ``scales`` and ``mins``
    (N, K // group_size) float32. Q4_1's fp16 ``d``/``m`` are exact in float32, so a model read from
    Q4_1 blocks (:meth:`from_q4_1_blocks`) holds exactly the GGUF's weights. The kernel's operands
    are derived from them (non-persistent, rebuilt on load): the CPU-specific ``packed`` layout and
    ``scales_and_zeros`` (K // group_size, N, 2) in ``compute_dtype`` with the kernel's convention
    ``w = (q - 8) * scale + zero``. With ``compute_dtype=bfloat16`` (torch's only vectorized CPU
    int4 kernel) scales, zeros and activations are rounded to bfloat16 inside the matmul;
    ``float32`` computes with the exact weights.
    The kernel operands follow the device: CPU and CUDA share the ``scales_and_zeros`` convention,
    and the device-specific ``packed`` layout is rebuilt whenever the module moves to another device.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, group_size: int = 32,
                 compute_dtype: str = "bfloat16") -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.group_size, self.compute_dtype = group_size, compute_dtype
        cdt = _dtype(compute_dtype)
        groups = in_features // group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales", torch.zeros(out_features, groups))
        self.register_buffer("mins", torch.zeros(out_features, groups))
        self.register_buffer("bias", torch.zeros(out_features, dtype=cdt) if bias else None)
        self.register_buffer("packed", torch.empty(0, dtype=torch.uint8), persistent=False)
        self.register_buffer("scales_and_zeros", torch.empty(0, dtype=cdt), persistent=False)
        self.repack()

    @classmethod
    def from_float(cls, linear: nn.Linear, group_size: int = 32,
                   compute_dtype: str = "bfloat16") -> "Int4WeightOnlyLinear":
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size, compute_dtype)
        q, scales, mins = quantize_int4_groupwise(linear.weight.detach(), group_size)
        m.qweight.copy_(pack_nibbles(q))
        m.scales.copy_(scales)
        m.mins.copy_(mins)
        if linear.bias is not None:
            m.bias.copy_(linear.bias.detach())
        m.repack()
        return m

    @torch.no_grad()
    def load_q4_1_blocks(self, blocks: torch.Tensor) -> None:
        """Takes the weights from GGUF Q4_1 blocks exactly (``group_size`` must be 32).

        Args:
            blocks: (N, K // 32, 20) uint8: per block fp16 ``d``, fp16 ``m``, then 16 bytes whose
                low nibbles are weights 0..15 and high nibbles weights 16..31; ``w = d * q + m``.
        """
        n, k = self.out_features, self.in_features
        if self.group_size != 32 or tuple(blocks.shape) != (n, k // 32, 20):
            raise ValueError(f"Q4_1 blocks of shape {tuple(blocks.shape)} do not fit a {n}x{k} int4 layer "
                             f"with group_size={self.group_size}; valid: ({n}, {k // 32}, 20) and group_size=32")
        blocks = blocks.contiguous()
        d = blocks[..., 0:2].contiguous().view(torch.float16)[..., 0]  # (N, K // 32)
        m = blocks[..., 2:4].contiguous().view(torch.float16)[..., 0]
        qs = blocks[..., 4:]  # (N, K // 32, 16)
        q = torch.cat([qs & 0xF, qs >> 4], dim=-1).reshape(n, k)
        self.qweight.copy_(pack_nibbles(q))
        self.scales.copy_(d.float())
        self.mins.copy_(m.float())
        self.repack()

    def repack(self) -> None:
        """Rebuild the kernel operands of ``qweight``'s device (packed nibbles, scales and zeros)."""
        if self.qweight.is_meta:
            return
        self._packed_for = self.qweight.device.type
        self._dot_operands = None  # int4_dot_operands builds them again from the new weights
        q = unpack_nibbles(self.qweight)  # (N, K) uint8 in [0, 15]
        if self.qweight.is_cuda:
            # The CUDA packer takes two values per byte with the even k in the HIGH nibble (the
            # portable layout has it in the low one) and tiles k by 16 * inner_k_tiles.
            k = self.in_features
            tiles = next((t for t in (8, 4, 2) if k % (16 * t) == 0), None)
            if tiles is None or self.out_features % 8:
                raise UserError(f"weight_only_int4 on CUDA needs in_features % 32 == 0 and out_features % 8 == 0, "
                                f"got {k} x {self.out_features}; valid on CUDA: weight_only_int8 or bf16 for this model")
            self.packed = torch.ops.aten._convert_weight_to_int4pack(((q[:, 0::2] << 4) | q[:, 1::2]).contiguous(),
                                                                     tiles)
        else:
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
        # The kernels centre q on 8: w = (q - 8) * d + (m + 8 d) = d * q + m.
        zeros = self.mins + 8 * self.scales
        sz = torch.stack([self.scales, zeros], dim=-1).transpose(0, 1)  # (G, N, 2)
        self.scales_and_zeros = sz.to(_dtype(self.compute_dtype)).contiguous()

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        legacy = state_dict.pop(prefix + "scales_and_zeros", None)
        if legacy is not None and prefix + "scales" not in state_dict:
            # format 1 stored (G, N, 2) scale/zero in the kernel's convention
            scales, zeros = legacy.float().transpose(0, 1).unbind(-1)
            state_dict[prefix + "scales"], state_dict[prefix + "mins"] = scales, zeros - 8 * scales
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.repack()

    def _apply(self, fn: Any, recurse: bool = True) -> "Int4WeightOnlyLinear":
        # `.to(device)` moves `packed` as bytes, but the CPU and CUDA layouts differ: rebuild it.
        super()._apply(fn, recurse)
        if self.qweight.device.type != getattr(self, "_packed_for", None):
            self.repack()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., K) -> (..., N) in ``x``'s dtype."""
        rows = x.numel() // self.in_features
        if rows < GEMM_MIN_ROWS and not torch.compiler.is_compiling():
            dot = int4_dot_operands(self)  # our AVX512-BF16 kernel: exact fp16 scales, float32 out (docs/benchmarks/ops.md)
            if dot is not None:
                y = torch.ops.raylm.int4_bf16_linear(x.reshape(rows, self.in_features).float(), *dot)
                return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        cdt = self.scales_and_zeros.dtype
        if not self.packed.is_cuda and rows >= GEMM_MIN_ROWS:  # in a dtype this CPU multiplies natively
            gemm = cpu_gemm_dtype(cdt)
            y = F.linear(x.reshape(-1, self.in_features).to(gemm), self.dequantize().to(gemm))
        elif self.packed.is_cuda:
            x2 = x.reshape(-1, self.in_features).to(cdt).contiguous()
            y = torch.ops.aten._weight_int4pack_mm(x2, self.packed, self.group_size, self.scales_and_zeros)
        else:
            x2 = x.reshape(-1, self.in_features).to(cdt)
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.scales_and_zeros)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def dequantize(self) -> torch.Tensor:
        """The whole float weight, ``scale * q + min`` in float32: (N, K)."""
        n, g = self.scales.shape
        q = unpack_nibbles(self.qweight).view(n, g, self.group_size).float()  # (N, G, group)
        return torch.addcmul(self.mins[..., None], q, self.scales[..., None]).view(n, self.in_features)

    def dequantize_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` of the float weight, ``scale * q + min`` in float32: (...,) -> (..., K)."""
        flat = ids.reshape(-1)
        q = unpack_nibbles(self.qweight[flat]).float()  # (n, K)
        scale = self.scales[flat].repeat_interleave(self.group_size, dim=1)  # (n, K)
        mins = self.mins[flat].repeat_interleave(self.group_size, dim=1)
        return (scale * q + mins).reshape(*ids.shape, self.in_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"compute={self.compute_dtype}")


class Int8DynamicLinear(nn.Module):
    """int8 weights x int8 activations quantized at run time (symmetric), int32 accumulation (``torch._int_mm``)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 activation_granularity: str = "per_token") -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.activation_granularity = activation_granularity
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_float(cls, linear: nn.Linear, granularity: str = "per_channel",
                   activation_granularity: str = "per_token") -> "Int8DynamicLinear":
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, activation_granularity)
        q, scales = quantize_int8_weight(linear.weight.detach(), granularity)
        m.weight.copy_(q)
        m.scales.copy_(scales)
        if linear.bias is not None:
            m.bias.copy_(linear.bias.detach())
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., K) -> (..., N) in ``x``'s dtype."""
        x2 = x.reshape(-1, self.in_features).float()  # (M, K)
        amax = x2.abs().amax(dim=1, keepdim=True) if self.activation_granularity == "per_token" else x2.abs().amax()
        x_scale = (amax / 127).clamp(min=1e-10)
        xq = torch.round(x2 / x_scale).clamp(-127, 127).to(torch.int8)
        y = torch._int_mm(xq, self.weight.t()).float() * x_scale * self.scales  # (M, N)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def dequantize_rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight[ids].float() * self.scales[ids].unsqueeze(-1)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"activations={self.activation_granularity}")


class Int8StaticLinear(nn.Module):
    """int8 weights x int8 activations with a calibrated per-tensor activation scale (``torch._int_mm``).

    With SmoothQuant, ``x @ W^T = (x / s) @ (W * s)^T``: the per-input-channel factor ``s`` moves
    activation outliers into the weights; ``inv_smooth = 1 / s`` is applied to ``x`` at run time.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(out_features))
        self.register_buffer("inv_smooth", torch.ones(in_features))
        self.register_buffer("act_scale", torch.ones(()))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_float(cls, linear: nn.Linear, act_absmax: torch.Tensor, alpha: float | None,
                   granularity: str = "per_channel") -> "Int8StaticLinear":
        """Quantize ``linear`` given the calibrated per-input-channel absmax of its input, (K,)."""
        m = cls(linear.in_features, linear.out_features, linear.bias is not None)
        w = linear.weight.detach().float()
        act_absmax = act_absmax.float().clamp(min=1e-5)
        if alpha is None:
            smooth = torch.ones_like(act_absmax)
        else:
            smooth = (act_absmax.pow(alpha) / w.abs().amax(dim=0).clamp(min=1e-5).pow(1 - alpha)).clamp(min=1e-5)
        q, scales = quantize_int8_weight(w * smooth, granularity)
        m.weight.copy_(q)
        m.scales.copy_(scales)
        m.inv_smooth.copy_(1 / smooth)
        m.act_scale.copy_((act_absmax / smooth).amax() / 127)
        if linear.bias is not None:
            m.bias.copy_(linear.bias.detach())
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., K) -> (..., N) in ``x``'s dtype."""
        x2 = x.reshape(-1, self.in_features).float() * self.inv_smooth  # (M, K)
        xq = torch.round(x2 / self.act_scale).clamp(-127, 127).to(torch.int8)
        y = torch._int_mm(xq, self.weight.t()).float() * (self.act_scale * self.scales)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def dequantize_rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight[ids].float() * self.scales[ids].unsqueeze(-1) * self.inv_smooth

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, act_scale={self.act_scale.item():.4g}"


class TiedEmbedding(nn.Module):
    """Input embedding that reads its rows from the quantized ``lm_head`` it is tied to (owns no tensors).

    The head is held outside the module tree so the state dict and ``model_size_bytes`` count it once.
    """

    def __init__(self, head: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self._head = (head,)
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, D)."""
        return self._head[0].dequantize_rows(ids).to(self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, tied to lm_head ({type(self._head[0]).__name__})"


QUANTIZED_LINEARS = (Int8WeightOnlyLinear, Int4WeightOnlyLinear, Int8DynamicLinear, Int8StaticLinear)


def fuse_weight_only(linears: list[nn.Module]) -> nn.Module | None:
    """One weight-only module whose output is the outputs of ``linears`` concatenated on the last dim.

    Every output row keeps its own scales (per channel for int8, per group along the input for int4),
    so concatenating along the output dimension reproduces each module's weights exactly; one
    matmul replaces several small ones (q/k/v, gate/up in decode).

    Returns:
        The fused module, or None unless all are :class:`Int4WeightOnlyLinear` (same input size,
        group size, compute dtype and bias presence) or all :class:`Int8WeightOnlyLinear` alike.
    """
    first = linears[0]
    if type(first) not in (Int4WeightOnlyLinear, Int8WeightOnlyLinear):
        return None
    if not all(type(m) is type(first) and m.in_features == first.in_features
               and m.compute_dtype == first.compute_dtype and (m.bias is None) == (first.bias is None)
               for m in linears):
        return None
    n = sum(m.out_features for m in linears)
    bias = first.bias is not None
    with torch.no_grad():
        if type(first) is Int8WeightOnlyLinear:
            fused = Int8WeightOnlyLinear(first.in_features, n, bias, first.compute_dtype)
            fused.weight.copy_(torch.cat([m.weight for m in linears]))
            fused.scales.copy_(torch.cat([m.scales for m in linears]))
        else:
            if any(m.group_size != first.group_size for m in linears):
                return None
            fused = Int4WeightOnlyLinear(first.in_features, n, bias, first.group_size, first.compute_dtype)
            fused.qweight.copy_(torch.cat([m.qweight for m in linears]))
            fused.scales.copy_(torch.cat([m.scales for m in linears]))
            fused.mins.copy_(torch.cat([m.mins for m in linears]))
            fused.repack()
        if bias:
            fused.bias.copy_(torch.cat([m.bias for m in linears]))
    return fused.to(next(first.buffers()).device)


# ----------------------------------------------------------------------------- model swap

def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _head_name(model: nn.Module) -> str | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in model.named_modules():
        if head is not None and module is head:
            return name
    return None


def _is_tied(model: nn.Module) -> bool:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return (isinstance(head, nn.Linear) and isinstance(emb, nn.Embedding)
            and head.weight.data_ptr() == emb.weight.data_ptr())


def _targets(model: nn.Module, settings: _Settings) -> dict[str, str]:
    """``{linear name: kind}`` with kind ``main`` (the method's module) or ``int8`` (weight-only head)."""
    head = _head_name(model)
    out: dict[str, str] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if name == head:
            if settings.lm_head != "float":
                out[name] = "main" if settings.lm_head == "quantize" else "int8"
        elif not any(fnmatch.fnmatchcase(name, p) for p in settings.skip):
            out[name] = "main"
    return out


def _check_shapes(model: nn.Module, targets: dict[str, str], method: str, settings: BaseModel) -> None:
    for name, kind in targets.items():
        k = model.get_submodule(name).in_features
        if kind == "main" and method == "weight_only_int4" and k % settings.group_size:
            raise UserError(f"group_size={settings.group_size} does not divide in_features={k} of layer '{name}'; "
                            f"valid: a divisor of every quantized layer's input size, or skip=['{name}']")


@torch.no_grad()
def calibrate(model: nn.Module, names: list[str], calibration: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-input-channel absmax of the inputs of the linears ``names`` over calibration text.

    Args:
        calibration: (S, T) token ids; each row is one forward pass.

    Returns:
        ``{name: (K,) float32 absmax}``.
    """
    stats: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def fn(_module: nn.Module, args: tuple) -> None:
            amax = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(dim=0).float()
            stats[name] = torch.maximum(stats[name], amax) if name in stats else amax
        return fn

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    device = next(model.parameters()).device
    try:
        for row in calibration:
            model(input_ids=row.reshape(1, -1).to(device))
    finally:
        for h in handles:
            h.remove()
    return stats


def _build(linear: nn.Linear, kind: str, method: str, s: BaseModel, stats: dict[str, torch.Tensor] | None,
           name: str) -> nn.Module:
    """The quantized replacement of ``linear`` (filled from its weights)."""
    if kind == "int8":
        return Int8WeightOnlyLinear.from_float(linear, "per_channel", getattr(s, "compute_dtype", "bfloat16"))
    if method == "dynamic_int8":
        return Int8DynamicLinear.from_float(linear, s.weight_granularity, s.activation_granularity)
    if method == "static_int8":
        return Int8StaticLinear.from_float(linear, stats[name], s.smoothquant_alpha, s.weight_granularity)
    if method == "weight_only_int8":
        return Int8WeightOnlyLinear.from_float(linear, s.weight_granularity, s.compute_dtype)
    return Int4WeightOnlyLinear.from_float(linear, s.group_size, s.compute_dtype)


def _empty(linear: nn.Linear, kind: str, method: str, s: BaseModel) -> nn.Module:
    """An unfilled module of the same type and shapes as :func:`_build` makes (for loading)."""
    bias = linear.bias is not None
    n, k = linear.out_features, linear.in_features
    if kind == "int8":
        return Int8WeightOnlyLinear(k, n, bias, getattr(s, "compute_dtype", "bfloat16"))
    if method == "dynamic_int8":
        return Int8DynamicLinear(k, n, bias, s.activation_granularity)
    if method == "static_int8":
        return Int8StaticLinear(k, n, bias)
    if method == "weight_only_int8":
        return Int8WeightOnlyLinear(k, n, bias, s.compute_dtype)
    return Int4WeightOnlyLinear(k, n, bias, s.group_size, s.compute_dtype)


def _swap(model: nn.Module, method: str, s: BaseModel, stats: dict[str, torch.Tensor] | None,
          fill: bool) -> nn.Module:
    tied = _is_tied(model)
    targets = _targets(model, s)
    _check_shapes(model, targets, method, s)
    head = _head_name(model)
    for name, kind in targets.items():
        linear = model.get_submodule(name)
        _set_module(model, name, _build(linear, kind, method, s, stats, name) if fill else
                    _empty(linear, kind, method, s))
    if tied and head in targets:
        emb = model.get_input_embeddings()
        model.set_input_embeddings(TiedEmbedding(model.get_submodule(head), emb.weight.dtype))
    if tied:
        # Stops transformers from re-tying lm_head.weight to the embedding on save/load/resize.
        model.config.tie_word_embeddings = head not in targets
    return model


def check(model: nn.Module, method: str, **settings: Any) -> None:
    """Validate ``method`` and ``settings`` against ``model``'s layers without quantizing anything.

    Raises:
        UserError: unknown method or setting, or a ``group_size`` that does not divide a layer.
    """
    s = parse_settings(method, settings)
    if method != "bf16":
        _check_shapes(model, _targets(model, s), method, s)


@torch.no_grad()
def quantize(model: nn.Module, method: str, *, calibration: torch.Tensor | None = None,
             **settings: Any) -> nn.Module:
    """Return a quantized copy of ``model`` (the input is left unchanged).

    Args:
        model: float causal LM (Hugging Face style: ``get_input/output_embeddings``).
        method: one of :data:`METHODS`.
        calibration: (S, T) token ids of real text; required by ``static_int8``.
        **settings: the method's settings (see ``SETTINGS[method]``).

    Raises:
        UserError: unknown method or setting, ``group_size`` not dividing a layer, missing calibration.
    """
    s = parse_settings(method, settings)
    if method == "static_int8" and (calibration is None or calibration.numel() == 0):
        raise UserError("static_int8 needs calibration text to set activation scales; pass calibration token ids "
                        "(jobs: calibration.data=<corpus>, calibration.samples=N)")
    model = copy.deepcopy(model).eval()
    if method == "bf16":
        # Parameters only: rotary tables stay float32, as when transformers loads with dtype=bfloat16.
        for p in model.parameters():
            p.data = p.data.to(torch.bfloat16)
        return model
    stats = None
    if method == "static_int8":
        names = [n for n, k in _targets(model, s).items() if k == "main"]
        stats = calibrate(model, names, calibration.reshape(-1, calibration.shape[-1]))
    return _swap(model, method, s, stats, fill=True)


def quantize_served_base(model: nn.Module, spec: str, method: str) -> tuple[nn.Module, str]:
    """``model`` (the float base ``spec`` loaded) quantized with ``method`` as Serve quantizes a base
    that adapters run on unmerged, and a line saying how.

    The embedded model's int4 is read from its GGUF's Q4_1 blocks (the weights it was converted
    from, bit for bit); other float models are quantized from their weights with the method's
    default settings.

    Raises:
        UserError: the method does not apply to the model (e.g. a layer width the group size does not divide).
    """
    from ops.model import EMBEDDED, embedded_gguf

    if method == "weight_only_int4" and spec in EMBEDDED:
        return int4_from_gguf(model, embedded_gguf(spec)), "weight_only_int4 from the embedded GGUF's Q4_1 weights"
    return quantize(model, method), f"{method} of the float weights"


# ----------------------------------------------------------------------------- artifact

def save_quantized(model: nn.Module, directory: str | os.PathLike, method: str, settings: dict[str, Any],
                   base_model: str, tokenizer: Any = None, extra: dict[str, Any] | None = None) -> Path:
    """Write a quantized model as a loadable artifact directory.

    Args:
        model: the output of :func:`quantize` for ``method`` / ``settings``.
        directory: created if missing.
        base_model: spec of the float model it came from (recorded; used to find a tokenizer).
        tokenizer: saved beside the weights when given.
        extra: more fields for ``quantization.json`` (e.g. the adapter merged in).
    """
    from safetensors.torch import save_file

    s = parse_settings(method, settings)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    if _is_tied(model):
        # A float head tied to the embedding is stored once, under the embedding's name.
        state.pop(f"{_head_name(model)}.weight", None)
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / WEIGHTS_FILE))
    model.config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    manifest = {
        "kind": "quantized", "format_version": FORMAT_VERSION, "method": method,
        "settings": s.model_dump(mode="json"), "base_model": base_model, "torch": torch.__version__,
        "tied_embedding": bool(getattr(model.config, "tie_word_embeddings", False))
        or isinstance(model.get_input_embeddings(), TiedEmbedding),
        "dtype": "bfloat16" if method == "bf16" else "float32", **(extra or {}),
    }
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    return directory


def load_quantized(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Load an artifact written by :func:`save_quantized` (``eval()`` mode).

    The base architecture is built from the artifact's ``config.json`` without initializing
    weights, the same module swap as :func:`quantize` is applied, and the state dict is loaded.

    On CUDA, float parameters become bfloat16 (:func:`place_quantized`).

    Raises:
        UserError: a missing/corrupt artifact or a device its kernels do not run on.
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers before 5.x kept it here
        from transformers.modeling_utils import no_init_weights

    path = Path(path)
    if not (path / MANIFEST_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise UserError(f"'{path}' is not a quantized artifact (needs {MANIFEST_FILE} and {WEIGHTS_FILE})")
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    method = check_method(manifest.get("method", ""))
    s = parse_settings(method, manifest.get("settings", {}))
    blocker = device_blocker(method, s, device)
    if blocker:
        raise UserError(f"quantized artifact '{path}' cannot run on {device}: {blocker}")
    config = AutoConfig.from_pretrained(path)
    dtype = torch.bfloat16 if method == "bf16" else torch.float32
    if method != "bf16" and manifest.get("tied_embedding") and not config.tie_word_embeddings:
        # Rebuild the tied float skeleton first so the swap sees the same tie as at quantize time.
        config.tie_word_embeddings = True
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if config.tie_word_embeddings:
        # Tie explicitly: building without weight init leaves the head its own tensor.
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    if method != "bf16":
        model = _swap(model, method, s, None, fill=False)
    state = load_file(str(path / WEIGHTS_FILE))
    result = model.load_state_dict(state, strict=False)
    allowed = {f"{_head_name(model)}.weight"} if _is_tied(model) else set()
    if result.unexpected_keys or set(result.missing_keys) - allowed:
        raise UserError(f"artifact '{path}' does not match its config: missing {result.missing_keys[:3]}, "
                        f"unexpected {result.unexpected_keys[:3]}")
    return place_quantized(model, device).eval()


# ----------------------------------------------------------------------------- GGUF Q4_1 base

# GGUF tensor names of a Llama block -> HF module names (transformers' GGUF loader maps them the same way)
GGUF_LLAMA_LINEARS = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                      "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                      "ffn_down": "mlp.down_proj"}


def _hf_row_order(rows: int, n_head: int) -> torch.Tensor:
    """GGUF row of every HF row of a q/k projection: llama.cpp interleaves the two RoPE halves of each
    head (its converter's ``permute``), which transformers' loader undoes; whole rows move, so Q4_1
    blocks (along the input dimension) move with them."""
    return torch.arange(rows).reshape(n_head, rows // n_head // 2, 2).transpose(1, 2).reshape(rows)


def q4_1_blocks(gguf_path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Q4_1 linear weights of a Llama GGUF, as blocks in HF row order.

    Returns:
        ``{HF module name (model.layers.<i>.<proj>): (N, K // 32, 20) uint8 blocks}``; tensors of
        other types are left out.
    """
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    fields = {f.name: f for f in reader.fields.values()}

    def meta(key: str) -> int:
        arch = bytes(fields["general.architecture"].parts[-1]).decode()
        return int(fields[f"{arch}.{key}"].parts[-1][0])

    heads, kv_heads = meta("attention.head_count"), meta("attention.head_count_kv")
    out: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        parts = tensor.name.split(".")
        if tensor.tensor_type != gguf.GGMLQuantizationType.Q4_1 or len(parts) != 4 or parts[0] != "blk" \
                or parts[2] not in GGUF_LLAMA_LINEARS:
            continue
        n, k = int(tensor.shape[1]), int(tensor.shape[0])
        blocks = torch.from_numpy(tensor.data.copy()).reshape(n, k // 32, 20)
        if parts[2] in ("attn_q", "attn_k"):
            blocks = blocks[_hf_row_order(n, heads if parts[2] == "attn_q" else kv_heads)]
        out[f"model.layers.{parts[1]}.{GGUF_LLAMA_LINEARS[parts[2]]}"] = blocks
    return out


@torch.no_grad()
def int4_from_gguf(model: nn.Module, gguf_path: str | os.PathLike, *, verify: bool = True,
                   **settings: Any) -> nn.Module:
    """``weight_only_int4`` copy of ``model`` whose int4 layers hold a GGUF's Q4_1 weights exactly.

    ``model`` is the float model transformers de-quantized from the same GGUF (e.g. the converted
    embedded model); its Q4_1 linears are taken block for block (group size 32, float32 scales and
    mins), the rest is quantized as :func:`quantize` does for the same settings. The result saves
    and loads with :func:`save_quantized` / :func:`load_quantized` like any int4 model.

    Args:
        verify: check that every de-quantized int4 weight equals ``model``'s float weight bit for
            bit (a GGUF that is not ``model``'s source, or a mapping error, fails here).
        **settings: :class:`WeightOnlyInt4Settings` (``group_size`` must stay 32).

    Raises:
        UserError: a group size other than 32, no Q4_1 tensors, or weights that do not match.
    """
    s = parse_settings("weight_only_int4", settings)
    if s.group_size != 32:
        raise UserError(f"GGUF Q4_1 blocks hold 32 weights; valid group_size: 32 (got {s.group_size})")
    blocks = q4_1_blocks(gguf_path)
    if not blocks:
        raise UserError(f"'{gguf_path}' has no Q4_1 Llama linear weights; valid: a Q4_1 GGUF of a Llama model")
    qmodel = quantize(model, "weight_only_int4", **s.model_dump())
    for name, b in blocks.items():
        layer = qmodel.get_submodule(name)
        if not isinstance(layer, Int4WeightOnlyLinear):
            continue  # kept in float by `skip`
        layer.load_q4_1_blocks(b)
        if verify:
            expected = model.get_submodule(name).weight.float()
            if not torch.equal(layer.dequantize_rows(torch.arange(layer.out_features)), expected):
                raise UserError(f"Q4_1 weights of '{name}' in '{gguf_path}' differ from the model's; valid: the "
                                f"GGUF the model was converted from")
    return qmodel


def device_blocker(method: str, settings: BaseModel | dict[str, Any], device: str | torch.device) -> str:
    """Why a model quantized with ``method`` cannot run on ``device``, or "" when it can.

    Args:
        method: one of :data:`METHODS`.
        settings: the method's settings (validated model or dict).
        device: the target device.
    """
    device = torch.device(device)
    if device.type == "cpu":
        return ""
    if device.type != "cuda":
        return f"quantized models run on cpu or cuda, got {device.type}"
    if method not in CUDA_METHODS:
        return (f"{method} has no CUDA kernels here (torch._int_mm on CUDA needs more than 16 rows); "
                f"valid on CUDA: {', '.join(CUDA_METHODS)}")
    s = parse_settings(method, settings) if isinstance(settings, dict) else settings
    if method == "weight_only_int4":
        if s.compute_dtype != "bfloat16":
            return (f"torch's CUDA int4 kernel computes in bfloat16, this artifact in {s.compute_dtype}; "
                    f"valid on CUDA: weight_only_int4 with compute_dtype=bfloat16, weight_only_int8, bf16")
        if torch.cuda.is_available() and torch.cuda.get_device_capability(device) < (8, 0):
            major, minor = torch.cuda.get_device_capability(device)
            return (f"torch's CUDA int4 kernel needs compute capability 8.0+, this GPU has {major}.{minor}; "
                    f"valid here: weight_only_int8, bf16")
    return ""


def place_quantized(model: nn.Module, device: str | torch.device) -> nn.Module:
    """Move a quantized model to ``device``; on CUDA its float parameters become bfloat16.

    The CUDA kernels compute in bfloat16, and so do the compiled norm ops and FlashAttention, which
    need the norm weights and activations in one dtype. Buffers (scales, rotary tables) keep theirs.

    Raises:
        UserError: an int4 layer whose shape the CUDA packing cannot take.
    """
    model = model.to(device)
    if torch.device(device).type == "cuda":
        for p in model.parameters():
            if p.is_floating_point():
                p.data = p.data.to(torch.bfloat16)
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if isinstance(emb, TiedEmbedding):
            emb.dtype = torch.bfloat16
    return model
