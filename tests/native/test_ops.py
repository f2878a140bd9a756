"""The compiled raylm ops against their pure-PyTorch references: opcheck, dtypes, odd and strided shapes."""

from __future__ import annotations

import pytest
import torch

from ops import kernels as K


@pytest.fixture(autouse=True)
def _native(native_ops) -> None:
    """Every test here runs the compiled ops (built once per session; required where buildable)."""

SHAPES = [(1, 576), (3, 577), (2, 5, 4097), (512, 64)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# The kernels round where HF rounds, so the only differences are fp32 summation order and
# the exp approximation; a half type may flip one rounding step (1 ulp is 2**-8 relative in
# bf16, 2**-11 in fp16).
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=1.6e-2),
       torch.float16: dict(atol=2e-3, rtol=2e-3)}


def _strided(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A non-contiguous (..., H) view: every other column of a (..., 2H) tensor."""
    base = torch.randn(*shape[:-1], 2 * shape[-1], dtype=dtype)
    x = base[..., ::2]
    assert not x.is_contiguous()
    return x


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def test_opcheck_every_op() -> None:
    x = torch.randn(3, 577)
    w = torch.randn(577)
    torch.library.opcheck(torch.ops.raylm.rms_norm.default, (torch.empty_like(x), x, w, 1e-6))
    torch.library.opcheck(torch.ops.raylm.fused_add_rms_norm.default, (x.clone(), torch.randn(3, 577), w, 1e-6))
    x2 = torch.randn(2, 3, 2 * 577)
    torch.library.opcheck(torch.ops.raylm.silu_and_mul.default, (torch.empty(2, 3, 577), x2))
    torch.library.opcheck(torch.ops.raylm.silu_mul.default, (torch.empty(3, 577), torch.randn(3, 577), x))
    xg = torch.randn(4, 33, requires_grad=True)
    torch.library.opcheck(torch.ops.raylm.clamped_relu.default, (xg, 0.1, 0.7))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("strided", [False, True])
def test_rms_norm(shape: tuple[int, ...], dtype: torch.dtype, strided: bool) -> None:
    x = _strided(shape, dtype) if strided else torch.randn(*shape, dtype=dtype)
    w = torch.randn(shape[-1], dtype=dtype)
    out = torch.empty(shape, dtype=dtype)[..., :] if not strided else _strided(shape, dtype)
    torch.ops.raylm.rms_norm(out, x, w, 1e-5)
    torch.testing.assert_close(out, K.rms_norm_reference(x, w, 1e-5), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("strided", [False, True])
def test_fused_add_rms_norm(shape: tuple[int, ...], dtype: torch.dtype, strided: bool) -> None:
    x = _strided(shape, dtype) if strided else torch.randn(*shape, dtype=dtype)
    r = _strided(shape, dtype) if strided else torch.randn(*shape, dtype=dtype)
    w = torch.randn(shape[-1], dtype=dtype)
    x_ref, r_ref = x.clone(), r.clone()
    torch.ops.raylm.fused_add_rms_norm(x, r, w, 1e-6)
    K.fused_add_rms_norm_reference_(x_ref, r_ref, w, 1e-6)
    torch.testing.assert_close(r, r_ref, atol=0, rtol=0)
    torch.testing.assert_close(x, x_ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("strided", [False, True])
def test_silu_and_mul(shape: tuple[int, ...], dtype: torch.dtype, strided: bool) -> None:
    full = (*shape[:-1], 2 * shape[-1])
    x = 4 * (_strided(full, dtype) if strided else torch.randn(*full, dtype=dtype))
    out = _strided(shape, dtype) if strided else torch.empty(shape, dtype=dtype)
    torch.ops.raylm.silu_and_mul(out, x)
    torch.testing.assert_close(out, K.silu_and_mul_reference(x), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("strided", [False, True])
def test_silu_mul(shape: tuple[int, ...], dtype: torch.dtype, strided: bool) -> None:
    make = (lambda: _strided(shape, dtype)) if strided else (lambda: torch.randn(*shape, dtype=dtype))
    gate, up = 4 * make(), make()
    torch.testing.assert_close(K.silu_mul(gate, up), K.silu_mul_reference(gate, up), **TOL[dtype])


def test_silu_extremes_match_torch() -> None:
    g = torch.tensor([-200.0, -90.0, -20.0, -1e-3, 0.0, 1e-3, 20.0, 90.0, 200.0])
    torch.testing.assert_close(K.silu_mul(g, torch.ones_like(g)), torch.nn.functional.silu(g), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("strided", [False, True])
def test_clamped_relu(shape: tuple[int, ...], dtype: torch.dtype, strided: bool) -> None:
    x = _strided(shape, dtype) if strided else torch.randn(*shape, dtype=dtype)
    torch.testing.assert_close(K.clamped_relu(x, 0.25, 1.5), K.clamped_relu_reference(x, 0.25, 1.5), atol=0, rtol=0)


def test_clamped_relu_nan_and_bounds() -> None:
    x = torch.tensor([float("nan"), -1.0, 0.0, 0.5, 3.0])
    torch.testing.assert_close(K.clamped_relu(x, 0.0, 1.0), K.clamped_relu_reference(x, 0.0, 1.0), equal_nan=True)
    with pytest.raises(ValueError, match="0 <= lo <= hi"):
        K.clamped_relu(x, -0.5, 1.0)
    with pytest.raises(RuntimeError, match="0 <= lo <= hi"):
        torch.ops.raylm.clamped_relu(x, 2.0, 1.0)


@pytest.mark.parametrize("lo", [0.0, 0.2])
def test_clamped_relu_grad_matches_reference(lo: float) -> None:
    x = torch.tensor([-1.0, 0.0, 0.1, 0.2, 0.5, 1.0, 1.5], requires_grad=True)
    xr = x.detach().clone().requires_grad_(True)
    K.clamped_relu(x, lo, 1.0).sum().backward()
    K.clamped_relu_reference(xr, lo, 1.0).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_and_silu_mul_grads_match_reference(dtype: torch.dtype) -> None:
    x = torch.randn(4, 577, dtype=dtype, requires_grad=True)
    w = torch.randn(577, dtype=dtype, requires_grad=True)
    gate = torch.randn(4, 577, dtype=dtype, requires_grad=True)
    up = torch.randn(4, 577, dtype=dtype, requires_grad=True)
    leaves = (x, w, gate, up)
    refs = tuple(t.detach().clone().requires_grad_(True) for t in leaves)
    grad_out = torch.randn(4, 577, dtype=dtype)
    (K.silu_mul(gate, up) * K.rms_norm(x, w, 1e-6) * grad_out).sum().backward()
    xr, wr, gr, ur = refs
    (K.silu_mul_reference(gr, ur) * K.rms_norm_reference(xr, wr, 1e-6) * grad_out).sum().backward()
    for got, want in zip(leaves, refs):
        torch.testing.assert_close(got.grad, want.grad, **(TOL[dtype] if dtype != torch.float32 else dict(atol=1e-4, rtol=1e-4)))


def test_silu_and_mul_grad_matches_reference() -> None:
    x = torch.randn(3, 2 * 577, requires_grad=True)
    xr = x.detach().clone().requires_grad_(True)
    K.silu_and_mul(x).sum().backward()
    K.silu_and_mul_reference(xr).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)


def test_fused_add_rms_norm_refuses_autograd() -> None:
    x = torch.randn(2, 8, requires_grad=True)
    with pytest.raises(ValueError, match="inference-only"):
        K.fused_add_rms_norm_(x, torch.randn(2, 8), torch.ones(8), 1e-6)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def test_decode_attention_matches_rope_cache_write_and_sdpa() -> None:
    """Each row at its own position (0, inside, the cache's last) with grouped-query heads: the
    rotated k and v land at that position only, and each query head attends over 0..position."""
    import torch.nn.functional as F

    rows, n_head, n_kv, hs, t_max = 3, 6, 2, 16, 40
    qkv = torch.randn(rows, (n_head + 2 * n_kv) * hs)
    positions = torch.tensor([5, 0, t_max - 1])
    angle = torch.randn(rows, hs // 2)
    cos, sin = torch.cat([angle, angle], -1).cos(), torch.cat([angle, angle], -1).sin()
    k_cache, v_cache = torch.randn(4, n_kv, t_max, hs), torch.randn(4, n_kv, t_max, hs)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    out = torch.empty(rows, n_head * hs)
    torch.ops.raylm.decode_attention(out, qkv, cos, sin, k_cache, v_cache, positions, n_head, 0.3)

    q, k, v = qkv.split([n_head * hs, n_kv * hs, n_kv * hs], -1)
    q, k, v = q.view(rows, n_head, hs), k.view(rows, n_kv, hs), v.view(rows, n_kv, hs)
    q = q * cos[:, None] + _rotate_half(q) * sin[:, None]
    k = k * cos[:, None] + _rotate_half(k) * sin[:, None]
    for b, p in enumerate(positions.tolist()):
        want_k[b, :, p], want_v[b, :, p] = k[b], v[b]
        y = F.scaled_dot_product_attention(q[b].view(n_kv, n_head // n_kv, hs), want_k[b, :, : p + 1],
                                           want_v[b, :, : p + 1], scale=0.3)
        torch.testing.assert_close(out[b], y.reshape(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k_cache, want_k, rtol=1e-6, atol=1e-6)
    assert torch.equal(v_cache, want_v)


def test_decode_attention_refuses_a_position_outside_the_cache() -> None:
    cache = torch.zeros(1, 1, 8, 4)
    with pytest.raises(RuntimeError, match="outside the cache"):
        torch.ops.raylm.decode_attention(torch.empty(1, 4), torch.randn(1, 12), torch.ones(1, 4), torch.zeros(1, 4),
                                         cache, cache.clone(), torch.tensor([8]), 1, 1.0)


@pytest.mark.parametrize("compute_dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("rows", [1, 5])
def test_int4_linear_equals_the_int4_module(compute_dtype: str, rows: int) -> None:
    from ops.quantization import Int4WeightOnlyLinear

    layer = Int4WeightOnlyLinear.from_float(torch.nn.Linear(128, 96, bias=False), 32, compute_dtype)
    x = torch.randn(rows, 128)
    got = torch.ops.raylm.int4_linear(x, layer.packed, layer.group_size, layer.scales_and_zeros)
    assert got.dtype == torch.float32
    assert torch.equal(got, layer(x))


def _gguf_like_int4(n: int, k: int, compute_dtype: str = "bfloat16"):
    """An int4 layer with random nibbles and fp16-exact scales and mins, as read from GGUF Q4_1."""
    from ops.quantization import Int4WeightOnlyLinear

    layer = Int4WeightOnlyLinear(k, n, group_size=32, compute_dtype=compute_dtype)
    with torch.no_grad():
        layer.qweight.copy_(torch.randint(0, 256, layer.qweight.shape, dtype=torch.uint8))
        layer.scales.copy_((torch.rand(n, k // 32) * 0.02 + 1e-3).half().float())
        layer.mins.copy_((-torch.rand(n, k // 32) * 0.1).half().float())
    layer.repack()
    return layer


def _int4_bf16_kernel() -> None:
    if not torch.ops.raylm.bf16_dot_supported():
        pytest.skip("this CPU has no AVX512-BF16: raylm::int4_bf16_linear is not built (torch's int4 kernel serves)")


@pytest.mark.parametrize("rows", [1, 3, 8, 13])
@pytest.mark.parametrize("n,k", [(96, 128), (48, 1536)])
def test_int4_bf16_linear_is_the_exact_int4_weights_times_bfloat16_rows(rows: int, n: int, k: int) -> None:
    """Every row count the kernel unrolls (1..8, then blocks of 8), against float64 arithmetic on the
    layer's exact weights and the rows rounded to bfloat16; torch's kernel, with its bfloat16 scales,
    is ~1e-3 off the same reference."""
    from ops.quantization import int4_dot_operands

    _int4_bf16_kernel()
    layer = _gguf_like_int4(n, k)
    x = torch.randn(rows, k) * 3
    want = x.to(torch.bfloat16).double() @ layer.dequantize().double().T
    got = torch.ops.raylm.int4_bf16_linear(x, *int4_dot_operands(layer))
    assert got.shape == (rows, n) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-6 * want.abs().max().item())


def test_int4_dot_operands_only_where_the_kernel_computes_what_the_layer_does() -> None:
    from ops.quantization import int4_dot_operands

    _int4_bf16_kernel()
    assert int4_dot_operands(_gguf_like_int4(32, 64)) is not None
    assert int4_dot_operands(_gguf_like_int4(32, 64, compute_dtype="float32")) is None  # rows not rounded there
    assert int4_dot_operands(torch.nn.Linear(64, 32)) is None
    layer = _gguf_like_int4(32, 64)
    layer.scales.mul_(1 + 1e-6)  # not exact in fp16 (a layer quantized here from float weights)
    assert int4_dot_operands(layer) is None
    with pytest.raises(RuntimeError, match="inputs"):
        torch.ops.raylm.int4_bf16_linear(torch.randn(1, 32), *int4_dot_operands(_gguf_like_int4(32, 64)))


@pytest.mark.parametrize("rows", [1, 8, 13])
def test_int8_bf16_linear_is_the_int8_weights_times_bfloat16_rows(rows: int) -> None:
    from ops.quantization import Int8WeightOnlyLinear, int8_dot_operands

    _int4_bf16_kernel()
    layer = Int8WeightOnlyLinear.from_float(torch.nn.Linear(96, 64, bias=False))
    assert layer.compute_dtype == "bfloat16"
    x = torch.randn(rows, 96) * 3
    want = x.to(torch.bfloat16).double() @ (layer.weight.double() * layer.scales.double()[:, None]).T
    got = torch.ops.raylm.int8_bf16_linear(x, *int8_dot_operands(layer))
    assert got.shape == (rows, 64) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-6 * want.abs().max().item())
    assert torch.equal(layer(x), got)  # the module's few-row forward is this kernel


def test_the_int4_module_runs_the_bf16_kernel_for_few_rows_only() -> None:
    from ops.quantization import GEMM_MIN_ROWS, int4_dot_operands

    _int4_bf16_kernel()
    layer = _gguf_like_int4(32, 64)
    few, many = torch.randn(2, 3, 64), torch.randn(GEMM_MIN_ROWS, 64)
    assert torch.equal(layer(few), torch.ops.raylm.int4_bf16_linear(few.reshape(6, 64), *int4_dot_operands(layer))
                       .reshape(2, 3, 32))
    assert torch.equal(layer(many), torch.nn.functional.linear(many.bfloat16(), layer.dequantize().bfloat16()).float())
