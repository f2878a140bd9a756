"""The compiled raylm ops on CUDA against their pure-PyTorch references: opcheck, dtypes, odd and strided shapes."""

from __future__ import annotations

import pytest
import torch

from ops import kernels as K
from tests.gpu.conftest import requires_cuda

pytestmark = requires_cuda

SHAPES = [(1, 576), (3, 577), (2, 5, 4097), (512, 64), (32, 1, 576)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=1.6e-2),
       torch.float16: dict(atol=2e-3, rtol=2e-3)}


@pytest.fixture(scope="module", autouse=True)
def _native_cuda() -> None:
    assert "cuda" in K.backend().devices, f"the native ops were not built with CUDA: {K.backend_reason()}"


def _make(shape, dtype, strided: bool) -> torch.Tensor:
    if not strided:
        return torch.randn(*shape, dtype=dtype, device="cuda")
    return torch.randn(*shape[:-1], 2 * shape[-1], dtype=dtype, device="cuda")[..., ::2]


def test_opcheck_every_op_on_cuda() -> None:
    x = torch.randn(3, 577, device="cuda")
    w = torch.randn(577, device="cuda")
    torch.library.opcheck(torch.ops.raylm.rms_norm.default, (torch.empty_like(x), x, w, 1e-6))
    torch.library.opcheck(torch.ops.raylm.fused_add_rms_norm.default, (x.clone(), torch.randn_like(x), w, 1e-6))
    x2 = torch.randn(2, 3, 2 * 577, device="cuda")
    torch.library.opcheck(torch.ops.raylm.silu_and_mul.default, (torch.empty(2, 3, 577, device="cuda"), x2))
    torch.library.opcheck(torch.ops.raylm.silu_mul.default, (torch.empty_like(x), torch.randn_like(x), x))
    torch.library.opcheck(torch.ops.raylm.clamped_relu.default, (torch.randn(4, 33, device="cuda",
                                                                             requires_grad=True), 0.1, 0.7))


@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_norms_match_reference(shape, dtype, strided: bool) -> None:
    torch.manual_seed(0)
    x, r = _make(shape, dtype, strided), _make(shape, dtype, strided)
    w = torch.randn(shape[-1], dtype=dtype, device="cuda")
    torch.testing.assert_close(K.rms_norm(x, w, 1e-5), K.rms_norm_reference(x, w, 1e-5), **TOL[dtype])
    x_ref, r_ref = x.clone(), r.clone()
    K.fused_add_rms_norm_(x, r, w, 1e-6)
    K.fused_add_rms_norm_reference_(x_ref, r_ref, w, 1e-6)
    torch.testing.assert_close(r, r_ref, atol=0, rtol=0)
    torch.testing.assert_close(x, x_ref, **TOL[dtype])


@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_swiglu_matches_reference(shape, dtype, strided: bool) -> None:
    torch.manual_seed(0)
    x = 4 * _make((*shape[:-1], 2 * shape[-1]), dtype, strided)
    torch.testing.assert_close(K.silu_and_mul(x), K.silu_and_mul_reference(x), **TOL[dtype])
    gate, up = 4 * _make(shape, dtype, strided), _make(shape, dtype, strided)
    torch.testing.assert_close(K.silu_mul(gate, up), K.silu_mul_reference(gate, up), **TOL[dtype])


def test_fused_op_replays_in_a_cuda_graph() -> None:
    """What the engine's captured decode step relies on: the op records on the capture stream."""
    x0 = torch.randn(4, 576, device="cuda", dtype=torch.bfloat16)
    r0 = torch.randn_like(x0)
    w = torch.randn(576, device="cuda", dtype=torch.bfloat16)
    x, r = x0.clone(), r0.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        K.fused_add_rms_norm_(x, r, w, 1e-5)
    x.copy_(x0)
    r.copy_(r0)
    graph.replay()
    want_x, want_r = x0.clone(), r0.clone()
    K.fused_add_rms_norm_reference_(want_x, want_r, w, 1e-5)
    torch.testing.assert_close(r, want_r, atol=0, rtol=0)
    torch.testing.assert_close(x, want_x, **TOL[torch.bfloat16])
