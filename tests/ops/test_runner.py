"""The engine's model runner: its decode step on the raylm ops against the same step in torch ops."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ops.multi_lora import MultiLora
from ops.runner import LlamaRunner

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(config).eval()


def _runner(model, native: bool, lora: bool = True) -> LlamaRunner:
    slots = None
    if lora:
        slots = MultiLora(model, TARGETS, 2, 8)
        gen = torch.Generator().manual_seed(1)
        for t in (*slots.A.values(), *slots.B.values()):
            t[1:].copy_(torch.randn(t[1:].shape, generator=gen) * 0.1)
        slots.scale[1:] = 2.0
    runner = LlamaRunner(model, max_batch_size=4, max_seq_len=64, fuse_qkv=True, lora=slots)
    if not native:
        runner._native_checked = True  # the torch-op step (`_native_plan` stays None)
    return runner


def _steps(runner: LlamaRunner, slots: torch.Tensor | None) -> torch.Tensor:
    """Three rows prefilled to different lengths, then 4 decode steps: the logits of every step."""
    prompts = [torch.arange(1, 9), torch.arange(20, 23), torch.arange(40, 54)]
    for row, ids in enumerate(prompts):
        runner.prefill(row, ids, slot=int(slots[row]) if slots is not None else 0)
    positions = torch.tensor([len(p) for p in prompts])
    tokens = torch.tensor([7, 8, 9])
    out = []
    for step in range(4):
        logits = runner.decode_one_token(tokens, positions + step, slots)
        tokens = logits.argmax(-1)
        out.append(logits)
    return torch.stack(out)


@pytest.mark.parametrize("slots", [None, [1, 0, 2], [2, 2, 2]], ids=["base", "mixed", "one-adapter"])
def test_native_decode_step_equals_the_torch_step(model, native_ops, slots):
    """Rows at different positions (no mask on the native path), adapters mixed with base rows,
    and one adapter on every row: the same logits as the step written in torch ops."""
    arg = torch.tensor(slots) if slots is not None else None
    native = _runner(model, native=True)
    got = _steps(native, arg)
    # float gate/up are two matmuls: the Python loop over the raylm ops, not raylm.DecodeLayers
    assert native._native_plan is not None and native._native_layers is None
    want = _steps(_runner(model, native=False), arg)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def int4_model(model):
    from ops.quantization import quantize

    return quantize(model, "weight_only_int4", group_size=32, compute_dtype="float32")


@pytest.mark.parametrize("slots", [None, [1, 0, 2], [2, 2, 2]], ids=["base", "mixed", "one-adapter"])
def test_native_decode_step_equals_the_torch_step_on_int4_weights(int4_model, native_ops, slots):
    """Int4 projections with gate/up fused: the whole layer loop in C++ (raylm.DecodeLayers)."""
    arg = torch.tensor(slots) if slots is not None else None
    native = _runner(int4_model, native=True)
    got = _steps(native, arg)
    assert native._native_layers is not None
    want = _steps(_runner(int4_model, native=False), arg)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def gguf_int4_model(model):
    """bfloat16-compute int4 layers whose scales and mins are exact in float16, as `int4_from_gguf`
    builds them: where raylm::int4_bf16_linear serves."""
    from ops.quantization import Int4WeightOnlyLinear, quantize

    # a float head: an int8 one rounds the logits to bfloat16, where any summation-order difference shows
    qmodel = quantize(model, "weight_only_int4", group_size=32, compute_dtype="bfloat16", lm_head="float")
    for m in qmodel.modules():
        if isinstance(m, Int4WeightOnlyLinear):
            m.scales.copy_(m.scales.half().float())
            m.mins.copy_(m.mins.half().float())
            m.repack()
    return qmodel


@pytest.mark.parametrize("which", ["int4_model", "gguf_int4_model"], ids=["int4-torch-kernel", "int4-bf16-kernel"])
def test_decode_layers_in_cpp_equal_the_python_loop_over_the_same_ops(which, request, native_ops):
    """The same kernels in the same order: bit-identical logits, adapters mixed with base rows."""
    qmodel = request.getfixturevalue(which)
    arg = torch.tensor([1, 0, 2])
    cpp = _runner(qmodel, native=True)
    got = _steps(cpp, arg)
    loop = _runner(qmodel, native=True)
    loop._native_plan, loop._native_checked = loop._build_native_plan(), True
    loop._native_layers = None
    assert cpp._native_layers is not None
    torch.testing.assert_close(got, _steps(loop, arg), rtol=0, atol=0)


def test_decode_layers_reject_a_bad_layer_spec(native_ops):
    layers = torch.classes.raylm.DecodeLayers(4)
    cache = torch.zeros(1, 2, 4, 8)
    w = torch.zeros(8, 8)
    with pytest.raises(RuntimeError, match="kind 0"):
        layers.add_layer(cache, cache, [0, 0, 0, 3], [w] * 8, [0] * 4, w[0], 1e-6, w[0], 1e-6, 1.0)
    with pytest.raises(RuntimeError, match="four projections"):
        layers.add_layer(cache, cache, [0, 0, 0], [w] * 6, [0] * 3, w[0], 1e-6, w[0], 1e-6, 1.0)


def test_a_model_the_native_step_does_not_serve_keeps_the_torch_step(model, native_ops):
    runner = LlamaRunner(model.to(torch.bfloat16), max_batch_size=2, max_seq_len=16, fuse_qkv=True)
    try:
        runner.prefill(0, torch.arange(1, 4))
        logits = runner.decode_one_token(torch.tensor([5]), torch.tensor([3]))
        assert runner._native_checked and runner._native_plan is None
        assert logits.shape == (1, 320)
    finally:
        model.to(torch.float32)


class _RowsInBf16(torch.nn.Module):
    """A float layer that rounds its input rows to bfloat16 first: int4_bf16_linear's arithmetic in
    torch ops, on the int4 layer's exact weights."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = weight
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x.to(torch.bfloat16).float(), self.weight)


def test_int4_layers_on_the_bf16_dot_kernel_equal_their_arithmetic_in_torch_ops(gguf_int4_model, native_ops):
    """bfloat16-compute int4 layers (what `int4_from_gguf` serves) run on raylm::int4_bf16_linear in
    the C++ layer loop: the same logits as the torch step on the exact weights with the rows rounded
    to bfloat16 (torch's int4 kernel also rounds its scales and outputs to bfloat16)."""
    import copy

    from ops.quantization import Int4WeightOnlyLinear, int4_dot_operands

    if not torch.ops.raylm.bf16_dot_supported():
        pytest.skip("this CPU has no AVX512-BF16: the C++ loop keeps torch's int4 kernel")
    qmodel = gguf_int4_model
    reference = copy.deepcopy(qmodel)
    for layer in reference.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, Int4WeightOnlyLinear):
                    setattr(parent, name, _RowsInBf16(child.dequantize()))
    arg = torch.tensor([1, 0, 2])
    native = _runner(qmodel, native=True)
    got = _steps(native, arg)
    assert native._native_layers is not None and int4_dot_operands(native.qkv[0]) is not None
    want = _steps(_runner(reference, native=False), arg)
    # a summation-order difference can flip one activation's bfloat16 rounding (2**-8 relative) in the
    # next layer: a few 1e-3 on these logits (a wrong weight layout would be off by O(1))
    torch.testing.assert_close(got, want, rtol=1e-3, atol=5e-3)
