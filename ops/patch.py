"""Swap the compiled raylm ops into a loaded Llama-family model (HF Llama / Mistral / Qwen2 layouts).

`patch_model` rebinds `forward` on three kinds of module, keeping every parameter in place
(so LoRA wrappers, state dicts and optimisers are untouched):

- RMSNorm modules (`weight` + `variance_epsilon`): `rms_norm`, differentiable.
- SwiGLU MLPs (`gate_proj`, `up_proj`, `down_proj`, SiLU `act_fn`): `silu_mul` on the two
  projections, differentiable; no concatenated weight, so gate/up stay separate parameters.
- Decoder layers of the known layout: under no_grad/inference, the residual add after attention
  and `post_attention_layernorm` become one `fused_add_rms_norm`; with autograd on they run the
  original two steps (on the patched norm).
"""

from __future__ import annotations

import logging
import types
from dataclasses import dataclass, field

import torch
from torch import nn

from ops import kernels as K

log = logging.getLogger(__name__)

# Decoder layers whose forward is exactly: norm -> attn -> add -> norm -> mlp -> add
# (checked against transformers 5.x sources of these classes).
FUSABLE_DECODER_LAYERS = frozenset({"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer"})


@dataclass(frozen=True)
class PatchReport:
    """What `patch_model` changed.

    Attributes:
        backend: `ops.kernels.active_backend()` at patch time.
        device: device type of the model's parameters.
        rms_norms: RMSNorm modules now on `rms_norm`.
        mlps: SwiGLU MLPs now on `silu_mul`.
        fused_layers: decoder layers using `fused_add_rms_norm` at inference.
        reason: why nothing was patched, empty when something was.
    """

    backend: str
    device: str
    rms_norms: int = 0
    mlps: int = 0
    fused_layers: int = 0
    reason: str = field(default="")

    @property
    def patched(self) -> int:
        """Number of modules whose forward now calls a compiled op."""
        return self.rms_norms + self.mlps + self.fused_layers


def _rms_norm_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    return K.rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(K.silu_mul(self.gate_proj(x), self.up_proj(x)))


def _decoder_layer_forward(self: nn.Module, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
    residual = hidden_states
    hidden_states = self.input_layernorm(hidden_states)
    attn_out, _ = self.self_attn(hidden_states=hidden_states, **kwargs)
    norm = self.post_attention_layernorm
    if torch.is_grad_enabled() or not K.native_serves(attn_out, residual, norm.weight):
        hidden_states = residual + attn_out
        residual = hidden_states
        hidden_states = norm(hidden_states)
    else:
        # The layer input may be held elsewhere (recorded hidden states, the caller's embeddings),
        # so it is copied rather than overwritten; attn_out is this layer's own fresh tensor and
        # becomes the new residual stream.
        hidden_states = residual.clone()
        K.fused_add_rms_norm_(hidden_states, attn_out, norm.weight, norm.variance_epsilon)
        residual = attn_out
    hidden_states = self.mlp(hidden_states)
    return residual + hidden_states


def _is_rms_norm(m: nn.Module) -> bool:
    weight = getattr(m, "weight", None)
    return (
        type(m).__name__.endswith("RMSNorm")
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 1
        and isinstance(getattr(m, "variance_epsilon", None), float)
    )


def _is_swiglu_mlp(m: nn.Module) -> bool:
    act = getattr(m, "act_fn", None)
    is_silu = isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"
    return is_silu and all(isinstance(getattr(m, n, None), nn.Module) for n in ("gate_proj", "up_proj", "down_proj"))


def _is_fusable_layer(m: nn.Module) -> bool:
    return type(m).__name__ in FUSABLE_DECODER_LAYERS and all(
        hasattr(m, n) for n in ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
    ) and _is_rms_norm(m.post_attention_layernorm)


def patch_model(model: nn.Module) -> PatchReport:
    """Rebinds RMSNorm, SwiGLU MLP and decoder-layer forwards of `model` to the compiled ops.

    Logits are unchanged up to float rounding (within 1e-5 in fp32). Patching is in place and
    idempotent; there is no unpatch. Nothing is patched when the compiled ops do not serve the
    model's device (reference backend, or a CUDA model with a CPU-only build).

    Args:
        model: a loaded HF causal LM of the Llama family (or its PEFT wrapper).

    Returns:
        A `PatchReport` with the counts of patched modules, or the reason nothing was patched.
    """
    param = next(model.parameters(), None)
    device = param.device.type if param is not None else "cpu"
    backend = K.backend()
    if device not in backend.devices:
        reason = f"compiled ops do not serve device {device!r} (backend {backend.name}: {backend.reason})"
        log.info("patch_model: nothing patched, %s", reason)
        return PatchReport(backend=backend.name, device=device, reason=reason)
    counts = {"rms_norms": 0, "mlps": 0, "fused_layers": 0}
    for module in model.modules():
        if _is_rms_norm(module):
            module.forward = types.MethodType(_rms_norm_forward, module)
            counts["rms_norms"] += 1
        elif _is_swiglu_mlp(module):
            module.forward = types.MethodType(_mlp_forward, module)
            counts["mlps"] += 1
        elif _is_fusable_layer(module):
            module.forward = types.MethodType(_decoder_layer_forward, module)
            counts["fused_layers"] += 1
    report = PatchReport(backend=backend.name, device=device, **counts)
    if report.patched == 0:
        report = PatchReport(backend=backend.name, device=device, reason="no Llama-family RMSNorm, SwiGLU MLP or decoder layer found")
    log.info("patch_model: %s", report)
    return report
