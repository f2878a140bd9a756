"""Typed wrappers of the raylm compiled ops, their fakes, autograd, and pure-PyTorch references.

Each op has three faces:
- `<op>_reference`: plain PyTorch, the fallback and the test oracle (computes exactly what the
  Hugging Face modules compute).
- the compiled kernel `torch.ops.raylm.<op>` from `native/` (CPU and CUDA), used when
  `ops.native_build.backend()` serves the tensor's device.
- `<op>`: the wrapper that picks between the two and carries autograd for training.

`active_backend()` says which path is active.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ops.native_build import active_backend, backend, backend_reason, on_load

__all__ = [
    "active_backend",
    "backend_reason",
    "clamped_relu",
    "clamped_relu_reference",
    "fused_add_rms_norm_",
    "fused_add_rms_norm_reference_",
    "native_serves",
    "rms_norm",
    "rms_norm_reference",
    "silu_and_mul",
    "silu_and_mul_reference",
    "silu_mul",
    "silu_mul_reference",
]


# ---------------------------------------------------------------------------------------------
# References


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm exactly as HF LlamaRMSNorm: fp32 statistics, then `weight * x.to(input_dtype)`.

    Args:
        x: (..., H) activations.
        weight: (H,) scale.
        eps: added to the mean square.

    Returns:
        (..., H) in the promoted dtype of `weight` and `x`.
    """
    input_dtype = x.dtype
    xf = x.to(torch.float32)
    variance = xf.pow(2).mean(-1, keepdim=True)
    return weight * (xf * torch.rsqrt(variance + eps)).to(input_dtype)


def fused_add_rms_norm_reference_(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> None:
    """In place: `residual <- x + residual`, then `x <- rms_norm(residual) * weight`.

    Args:
        x: (..., H) sub-layer output; overwritten with the normalised sum.
        residual: (..., H) residual stream; overwritten with the sum.
        weight: (H,) scale.
        eps: added to the mean square.
    """
    residual.add_(x)
    x.copy_(rms_norm_reference(residual, weight, eps))


def silu_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU from separate halves: `silu(gate) * up` (HF LlamaMLP's `act_fn(gate) * up`).

    Args:
        gate: (..., D).
        up: (..., D).

    Returns:
        (..., D).
    """
    return F.silu(gate) * up


def silu_and_mul_reference(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU from one tensor: `silu(x[..., :D]) * x[..., D:]`.

    Args:
        x: (..., 2D).

    Returns:
        (..., D).
    """
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]


def clamped_relu_reference(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """`clamp(relu(x), lo, hi)`, which equals `min(max(x, lo), hi)` because `0 <= lo <= hi`.

    Args:
        x: any shape.
        lo: lower bound, >= 0.
        hi: upper bound, >= lo.

    Returns:
        Same shape and dtype as `x`.
    """
    _check_clamp_bounds(lo, hi)
    return torch.clamp(F.relu(x), lo, hi)


def _check_clamp_bounds(lo: float, hi: float) -> None:
    if not 0.0 <= lo <= hi:
        raise ValueError(f"clamped_relu needs 0 <= lo <= hi, got lo={lo}, hi={hi}")


# ---------------------------------------------------------------------------------------------
# Dispatch between native and reference


_NATIVE_DTYPES = frozenset({torch.float32, torch.bfloat16, torch.float16})


def native_serves(*tensors: torch.Tensor) -> bool:
    """Whether the compiled ops serve these tensors (a served device, one float dtype).

    Args:
        *tensors: the op's tensor arguments.
    """
    first = tensors[0]
    # Runs once per op call in decode, so it stays a few attribute reads (no torch.device
    # objects); tensors on mixed devices reach the kernel, whose check names them.
    device = "cpu" if first.is_cpu else "cuda" if first.is_cuda else ""
    if device not in backend().devices or first.dtype not in _NATIVE_DTYPES:
        return False
    return all(t.dtype is first.dtype for t in tensors[1:])


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


class _RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        torch.ops.raylm.rms_norm(out, x, weight, eps)
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        xf = x.float()
        inv = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + ctx.eps)  # (..., 1)
        n = xf * inv  # (..., H)
        g = grad.float()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            gn = g * weight.float()
            grad_x = (inv * (gn - n * (gn * n).mean(-1, keepdim=True))).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = (g * n.to(x.dtype).float()).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        return grad_x, grad_w, None


class _SiluMulFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(gate, memory_format=torch.contiguous_format)
        torch.ops.raylm.silu_mul(out, gate, up)
        ctx.save_for_backward(gate, up)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        g = gate.float()
        sig = torch.sigmoid(g)
        grad_f = grad.float()
        grad_gate = grad_up = None
        if ctx.needs_input_grad[0]:
            grad_gate = (grad_f * up.float() * sig * (1 + g * (1 - sig))).to(gate.dtype)
        if ctx.needs_input_grad[1]:
            grad_up = (grad_f * (g * sig).to(gate.dtype).float()).to(up.dtype)
        return grad_gate, grad_up


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm (HF LlamaRMSNorm semantics) on the compiled op where served; differentiable.

    Args:
        x: (..., H) activations.
        weight: (H,) scale, same dtype as `x` for the compiled path.
        eps: added to the mean square.

    Returns:
        (..., H).
    """
    if not native_serves(x, weight):
        return rms_norm_reference(x, weight, eps)
    if _needs_grad(x, weight):
        return _RMSNormFn.apply(x, weight, eps)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    torch.ops.raylm.rms_norm(out, x, weight, eps)
    return out


def fused_add_rms_norm_(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    """In place (inference only): `residual <- x + residual; x <- rms_norm(residual) * weight`.

    Args:
        x: (..., H) sub-layer output; overwritten with the normalised sum.
        residual: (..., H) residual stream; overwritten with the sum.
        weight: (H,) scale.
        eps: added to the mean square.

    Raises:
        ValueError: called where autograd would have to track the in-place update.
    """
    if _needs_grad(x, residual, weight):
        raise ValueError("fused_add_rms_norm_ is inference-only; call it under torch.no_grad()")
    if native_serves(x, residual, weight):
        torch.ops.raylm.fused_add_rms_norm(x, residual, weight, eps)
    else:
        fused_add_rms_norm_reference_(x, residual, weight, eps)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` on the compiled op where served; differentiable.

    Args:
        gate: (..., D).
        up: (..., D).

    Returns:
        (..., D).
    """
    if not native_serves(gate, up) or gate.shape != up.shape:
        return silu_mul_reference(gate, up)
    if _needs_grad(gate, up):
        return _SiluMulFn.apply(gate, up)
    out = torch.empty_like(gate, memory_format=torch.contiguous_format)
    torch.ops.raylm.silu_mul(out, gate, up)
    return out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """`silu(x[..., :D]) * x[..., D:]` on the compiled op where served; differentiable.

    Args:
        x: (..., 2D).

    Returns:
        (..., D).
    """
    if x.shape[-1] % 2:
        raise ValueError(f"silu_and_mul needs an even last dimension, got shape {tuple(x.shape)}")
    if not native_serves(x):
        return silu_and_mul_reference(x)
    if _needs_grad(x):
        d = x.shape[-1] // 2
        return _SiluMulFn.apply(x[..., :d], x[..., d:])
    out = x.new_empty((*x.shape[:-1], x.shape[-1] // 2))
    torch.ops.raylm.silu_and_mul(out, x)
    return out


def clamped_relu(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """`min(max(x, lo), hi)` for `0 <= lo <= hi` (= clamp(relu(x), lo, hi)); differentiable.

    The gradient is 1 where `lo <= x <= hi` and `x > 0` (torch.clamp after relu), else 0.

    Args:
        x: any shape.
        lo: lower bound, >= 0.
        hi: upper bound, >= lo.

    Returns:
        Same shape and dtype as `x`.
    """
    _check_clamp_bounds(lo, hi)
    if not native_serves(x):
        return clamped_relu_reference(x, lo, hi)
    return torch.ops.raylm.clamped_relu(x, lo, hi)


# ---------------------------------------------------------------------------------------------
# torch.compile fakes and autograd of the functional op, registered once the library is loaded


def _register_meta() -> None:
    @torch.library.register_fake("raylm::rms_norm")
    def _rms_norm_fake(out, x, weight, eps) -> None:
        return None

    @torch.library.register_fake("raylm::fused_add_rms_norm")
    def _fused_add_rms_norm_fake(x, residual, weight, eps) -> None:
        return None

    @torch.library.register_fake("raylm::silu_and_mul")
    def _silu_and_mul_fake(out, x) -> None:
        return None

    @torch.library.register_fake("raylm::silu_mul")
    def _silu_mul_fake(out, gate, up) -> None:
        return None

    @torch.library.register_fake("raylm::clamped_relu")
    def _clamped_relu_fake(x, lo, hi):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    def _clamped_relu_setup(ctx, inputs, output) -> None:
        x, lo, hi = inputs
        ctx.save_for_backward(x)
        ctx.lo, ctx.hi = lo, hi

    def _clamped_relu_backward(ctx, grad):
        (x,) = ctx.saved_tensors
        mask = (x >= ctx.lo) & (x <= ctx.hi) & (x > 0)
        return grad * mask, None, None

    torch.library.register_autograd("raylm::clamped_relu", _clamped_relu_backward, setup_context=_clamped_relu_setup)


on_load(_register_meta)
