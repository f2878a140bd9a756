"""Quantization on a tiny random Llama: every method runs, stays close to float32, and reloads exactly."""

import pytest
import torch

from ops.errors import UserError
from ops import quantization
from ops.model import load_model, load_tokenizer, model_size_bytes, resolve
from ops.quantization import (GEMM_MIN_ROWS, Int4WeightOnlyLinear, Int8WeightOnlyLinear, TiedEmbedding, fuse_weight_only,
                              pack_nibbles, quantize, quantize_int4_groupwise, save_quantized, unpack_nibbles)

# The tiny model's MLP input is 144 wide, which no int4 kernel group size (32..256) divides.
INT4 = {"skip": ["*.down_proj"]}
# (method, settings, max |logit error| relative to the largest float32 logit)
CASES = [
    ("bf16", {}, 0.02),
    ("dynamic_int8", {}, 0.03),
    ("dynamic_int8", {"activation_granularity": "per_tensor", "weight_granularity": "per_tensor"}, 0.05),
    ("static_int8", {}, 0.03),
    ("static_int8", {"smoothquant_alpha": None, "skip": [], "lm_head": "quantize"}, 0.05),
    ("weight_only_int8", {}, 0.02),
    ("weight_only_int8", {"compute_dtype": "float32", "lm_head": "float"}, 0.02),
    ("weight_only_int4", INT4, 0.15),
    ("weight_only_int4", {**INT4, "compute_dtype": "float32", "lm_head": "quantize"}, 0.15),
]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    torch.set_grad_enabled(False)
    model = load_model(str(tiny_model_dir))
    tok = load_tokenizer(str(tiny_model_dir))
    ids = tok(["The quick brown fox jumps over the lazy dog. To be, or not to be, that is the question."] * 2,
              return_tensors="pt")["input_ids"]
    yield model, tok, ids
    torch.set_grad_enabled(True)


@pytest.mark.parametrize("method, settings, tol", CASES)
def test_method_runs_saves_reloads(tiny, tmp_path, method, settings, tol):
    model, tok, ids = tiny
    ref = model(input_ids=ids).logits
    q = quantize(model, method, calibration=ids, **settings)
    out = q(input_ids=ids).logits
    assert (out.float() - ref).abs().max() / ref.abs().max() < tol
    assert model(input_ids=ids).logits.equal(ref)  # the float model is left untouched
    save_quantized(q, tmp_path / "q", method, settings, "tiny", tok)
    assert resolve(str(tmp_path / "q")).kind == "quantized"
    reloaded = load_model(str(tmp_path / "q"))
    assert reloaded(input_ids=ids).logits.equal(out)
    assert load_tokenizer(str(tmp_path / "q")).vocab_size == tok.vocab_size
    # The reported size is what ships (runtime-only buffers such as the int4 CPU packing excluded).
    on_disk = sum(f.stat().st_size for f in (tmp_path / "q").glob("*.safetensors"))
    assert abs(model_size_bytes(q) - on_disk) < 0.02 * on_disk + 16384  # + safetensors JSON headers


def test_tied_head_is_stored_once(tiny, tmp_path):
    model, tok, _ = tiny
    q = quantize(model, "weight_only_int8")
    assert isinstance(q.lm_head, Int8WeightOnlyLinear)
    assert isinstance(q.model.embed_tokens, TiedEmbedding)
    assert not [k for k in q.state_dict() if k.startswith("model.embed_tokens")]
    # The embedding rows are the head's de-quantized rows.
    ids = torch.tensor([[1, 5, 7]])
    expected = q.lm_head.weight[ids].float() * q.lm_head.scales[ids].float().unsqueeze(-1)
    assert torch.equal(q.model.embed_tokens(ids), expected)


def test_int4_kernel_matches_reference_dequantization():
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 48, bias=False)
    m = Int4WeightOnlyLinear.from_float(linear, group_size=32, compute_dtype="float32")
    w = m.dequantize_rows(torch.arange(48))  # (N, K) from the portable buffers
    x = torch.randn(3, 128)
    torch.testing.assert_close(m(x), x @ w.t(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kind", ["int4", "int8"])
@pytest.mark.parametrize("compute_dtype", ["bfloat16", "float32"])
def test_fused_weight_only_equals_separate_modules(kind, compute_dtype):
    torch.manual_seed(0)
    sizes = (96, 32, 32)  # q/k/v-like: unequal output sizes
    linears = [torch.nn.Linear(128, n, bias=True) for n in sizes]
    if kind == "int4":
        mods = [Int4WeightOnlyLinear.from_float(lin, group_size=32, compute_dtype=compute_dtype) for lin in linears]
    else:
        mods = [Int8WeightOnlyLinear.from_float(lin, compute_dtype=compute_dtype) for lin in linears]
    fused = fuse_weight_only(mods)
    x = torch.randn(2, 5, 128)
    torch.testing.assert_close(fused(x), torch.cat([m(x) for m in mods], dim=-1), rtol=1e-2, atol=1e-2)
    ids = torch.arange(sum(sizes))
    torch.testing.assert_close(fused.dequantize_rows(ids), torch.cat([m.dequantize_rows(torch.arange(n))
                                                                      for m, n in zip(mods, sizes)]))


def _weight_only(kind: str, compute_dtype: str, linear: torch.nn.Linear) -> torch.nn.Module:
    if kind == "int4":
        return Int4WeightOnlyLinear.from_float(linear, group_size=32, compute_dtype=compute_dtype)
    return Int8WeightOnlyLinear.from_float(linear, compute_dtype=compute_dtype)


@pytest.mark.parametrize("kind", ["int4", "int8"])
@pytest.mark.parametrize("compute_dtype", ["bfloat16", "float32"])
def test_gemm_path_agrees_with_matrix_vector_path(kind, compute_dtype):
    """Many rows (prefill) run one GEMM over the dequantized weight; a row at a time runs the packed kernel."""
    torch.manual_seed(0)
    layer = _weight_only(kind, compute_dtype, torch.nn.Linear(128, 96, bias=True))
    x = torch.randn(GEMM_MIN_ROWS + 5, 128)
    gemm = layer(x)
    matvec = torch.cat([layer(row[None]) for row in x])
    assert (gemm - matvec).abs().max() / matvec.abs().max() < 1e-2
    # the GEMM path is the dequantized weight's matmul (exactly, in the dtype this CPU multiplies natively)
    cdt = quantization.cpu_gemm_dtype(torch.bfloat16 if compute_dtype == "bfloat16" else torch.float32)
    w = layer.dequantize_rows(torch.arange(96))
    if kind == "int8":
        expected = torch.nn.functional.linear(x.to(cdt), layer.weight.to(cdt)) * layer.scales + layer.bias
    else:
        torch.testing.assert_close(layer.dequantize(), w)
        expected = torch.nn.functional.linear(x.to(cdt), layer.dequantize().to(cdt)) + layer.bias
    assert torch.equal(gemm, expected.float())
    torch.testing.assert_close(gemm, x @ w.t() + layer.bias.float(), rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("native", [True, False])
def test_prefill_gemm_runs_bfloat16_only_where_the_cpu_multiplies_it(monkeypatch, native):
    monkeypatch.setattr(quantization, "_NATIVE_BF16", native)
    assert quantization.cpu_gemm_dtype(torch.bfloat16) == (torch.bfloat16 if native else torch.float32)
    assert quantization.cpu_gemm_dtype(torch.float32) == torch.float32
    torch.manual_seed(0)
    layer = _weight_only("int4", "bfloat16", torch.nn.Linear(128, 96, bias=False))
    x = torch.randn(GEMM_MIN_ROWS, 128)
    gemm = torch.bfloat16 if native else torch.float32
    assert torch.equal(layer(x), torch.nn.functional.linear(x.to(gemm), layer.dequantize().to(gemm)).float())


@pytest.mark.parametrize("method, settings", [("weight_only_int8", {}), ("weight_only_int4", INT4)])
def test_prefill_gemm_logits_and_perplexity_match_matrix_vector(tiny, monkeypatch, method, settings):
    """The whole quantized model: logits within 1e-2 relative and perplexity within 0.5% of the decode kernels."""
    model, _, ids = tiny
    q = quantize(model, method, **settings)
    monkeypatch.setattr(quantization, "GEMM_MIN_ROWS", 1)  # every forward of the model on the GEMM path
    gemm = q(input_ids=ids).logits
    monkeypatch.setattr(quantization, "GEMM_MIN_ROWS", 1 << 30)
    matvec = q(input_ids=ids).logits
    assert (gemm - matvec).abs().max() / matvec.abs().max() < 1e-2

    def ppl(logits: torch.Tensor) -> float:
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).exp().item()

    assert abs(ppl(gemm) / ppl(matvec) - 1) < 0.005


def test_fuse_weight_only_refuses_mixed_modules():
    linear = torch.nn.Linear(64, 32)
    assert fuse_weight_only([Int4WeightOnlyLinear.from_float(linear), Int8WeightOnlyLinear.from_float(linear)]) is None
    assert fuse_weight_only([linear, linear]) is None
    assert fuse_weight_only([Int4WeightOnlyLinear.from_float(linear, group_size=32),
                             Int4WeightOnlyLinear.from_float(linear, group_size=64)]) is None


def test_int4_reproduces_q4_1_weights_exactly():
    """A weight already on a Q4_1 grid (w = d * q + m per 32-block, both extremes used) comes back unchanged."""
    torch.manual_seed(0)
    q = torch.randint(0, 16, (8, 64), dtype=torch.uint8)
    q[:, ::32], q[:, 1::32] = 0, 15
    d = torch.rand(8, 2, 1) * 0.01 + 1e-3
    mn = torch.randn(8, 2, 1) * 0.01
    w = (q.reshape(8, 2, 32).float() * d + mn).reshape(8, 64)
    q2, d2, m2 = quantize_int4_groupwise(w, 32)
    torch.testing.assert_close((q2.reshape(8, 2, 32).float() * d2[..., None] + m2[..., None]).reshape(8, 64), w,
                               rtol=0, atol=1e-6)
    assert torch.equal(unpack_nibbles(pack_nibbles(q2)), q2)


def q4_1_blocks_of(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """GGUF Q4_1 bytes of (N, K) values q in [0, 15] with (N, K // 32) fp16 d and m: (N, K // 32, 20) uint8."""
    n, k = q.shape
    qb = q.reshape(n, k // 32, 32)
    qs = qb[..., :16] | (qb[..., 16:] << 4)
    dm = torch.stack([d, m], dim=-1).to(torch.float16).contiguous().view(torch.uint8)  # (N, G, 4)
    return torch.cat([dm, qs], dim=-1)


def test_int4_from_q4_1_blocks_is_exact_in_float32():
    """Weights read from Q4_1 blocks de-quantize to exactly d * q + m (as GGUF readers compute it), and the
    float32 kernel and the bfloat16 one both run from them; a state dict round trip keeps them."""
    torch.manual_seed(0)
    n, k = 48, 128
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    d = (torch.rand(n, k // 32) * 0.01 + 1e-3).half()
    m = (torch.randn(n, k // 32) * 0.01).half()
    w = (d.float().repeat_interleave(32, 1) * q.float() + m.float().repeat_interleave(32, 1))
    layer = Int4WeightOnlyLinear(k, n, group_size=32, compute_dtype="float32")
    layer.load_q4_1_blocks(q4_1_blocks_of(q, d, m))
    assert torch.equal(layer.dequantize_rows(torch.arange(n)), w)
    assert layer.scales.dtype == torch.float32 and layer.mins.dtype == torch.float32
    x = torch.randn(3, k)
    torch.testing.assert_close(layer(x), x @ w.t(), rtol=1e-5, atol=1e-5)
    fast = Int4WeightOnlyLinear(k, n, group_size=32, compute_dtype="bfloat16")
    fast.load_state_dict(layer.state_dict())
    assert torch.equal(fast.dequantize_rows(torch.arange(n)), w)
    torch.testing.assert_close(fast(x), x @ w.t(), rtol=2e-2, atol=2e-2)
    with pytest.raises(ValueError, match="do not fit"):
        layer.load_q4_1_blocks(torch.zeros(n, k // 64, 20, dtype=torch.uint8))


def test_int4_loads_format_1_scales_and_zeros():
    """Artifacts written before float32 scales (bf16 (G, N, 2) scale/zero, kernel convention) still load."""
    torch.manual_seed(0)
    m = Int4WeightOnlyLinear.from_float(torch.nn.Linear(64, 16, bias=False), group_size=32)
    sz = torch.stack([m.scales, m.mins + 8 * m.scales], dim=-1).transpose(0, 1).bfloat16()
    legacy = {"qweight": m.qweight, "scales_and_zeros": sz}
    loaded = Int4WeightOnlyLinear(64, 16, group_size=32)
    loaded.load_state_dict(legacy)
    torch.testing.assert_close(loaded.scales, m.scales, rtol=1e-2, atol=1e-4)
    torch.testing.assert_close(loaded.mins, m.mins, rtol=2e-2, atol=1e-3)


@pytest.mark.slow
def test_int4_from_embedded_gguf_equals_converted_weights(embedded_storage):
    """Every Q4_1 linear of the embedded GGUF becomes an int4 layer equal to the converted float weight."""
    from ops.model import DEFAULT_MODEL, embedded_gguf
    from ops.quantization import int4_from_gguf

    model = load_model(DEFAULT_MODEL, storage=embedded_storage)
    qmodel = int4_from_gguf(model, embedded_gguf(DEFAULT_MODEL), verify=True)
    assert sum(isinstance(mod, Int4WeightOnlyLinear) for mod in qmodel.modules()) == 7 * len(model.model.layers)


@pytest.mark.parametrize("method, settings, calibration, fragment", [
    ("int3", {}, None, "unknown quantization method 'int3'"),
    ("weight_only_int4", {"group_size": 64}, None, "group_size=64 does not divide in_features=144"),
    ("weight_only_int4", {"group_size": 48}, None, "group_size must be one of 32, 64, 128, 256"),
    ("static_int8", {}, None, "static_int8 needs calibration"),
    ("dynamic_int8", {"group_size": 32}, None, "unknown setting 'group_size' for dynamic_int8"),
    ("static_int8", {"smoothquant_alpha": 2}, "ids", "smoothquant_alpha must be in"),
])
def test_bad_input_is_one_line_user_error(tiny, method, settings, calibration, fragment):
    model, _, ids = tiny
    with pytest.raises(UserError, match=fragment) as info:
        quantize(model, method, calibration=ids if calibration else None, **settings)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("method, settings, fragment", [
    ("dynamic_int8", {}, "valid on CUDA: weight_only_int4, weight_only_int8, bf16"),
    ("static_int8", {}, "valid on CUDA: weight_only_int4, weight_only_int8, bf16"),
    ("weight_only_int4", {"compute_dtype": "float32"}, "computes in bfloat16"),
])
def test_cuda_refusals_name_what_runs_there(tiny, tmp_path, method, settings, fragment):
    from ops.quantization import device_blocker, load_quantized

    assert device_blocker(method, settings, "cpu") == ""
    assert fragment in device_blocker(method, settings, "cuda")
    model, tok, ids = tiny
    calibration = ids if method == "static_int8" else None
    path = save_quantized(quantize(model, method, calibration=calibration, **{**INT4, **settings}), tmp_path / "q",
                          method, {**INT4, **settings}, "tiny")
    with pytest.raises(UserError, match=fragment):  # refused before anything touches a GPU
        load_quantized(path, device="cuda")


def test_cuda_methods_have_no_refusal_here():
    from ops.quantization import CUDA_METHODS, device_blocker

    assert all(device_blocker(m, {}, "cuda") == "" for m in CUDA_METHODS)


def test_moving_an_int4_layer_on_its_device_keeps_the_packing():
    layer = Int4WeightOnlyLinear.from_float(torch.nn.Linear(64, 16), group_size=32)
    packed = layer.packed
    layer.to("cpu")
    assert layer.packed is packed  # repacked only when the device type changes
