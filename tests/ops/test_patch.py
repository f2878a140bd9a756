"""patch_model on a tiny random Llama: same logits, same greedy tokens, same gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ops import kernels as K
from ops import native_build
from ops.patch import PatchReport, patch_model

needs_native = pytest.mark.usefixtures("native_ops")


def _tiny_llama(hidden: int, intermediate: int, heads: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=101,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=1,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config).eval()
    # Random norm weights, so that a norm that ignored its weight would show in the logits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture(params=[(64, 128, 4), (54, 97, 3)], ids=["h64", "h54-i97-odd"])
def models(request: pytest.FixtureRequest) -> tuple[LlamaForCausalLM, LlamaForCausalLM, PatchReport]:
    base = _tiny_llama(*request.param)
    patched = copy.deepcopy(base)
    return base, patched, patch_model(patched)


@needs_native
def test_report_counts(models) -> None:
    _, _, report = models
    assert report == PatchReport(backend=native_build.active_backend(), device="cpu", rms_norms=5, mlps=2, fused_layers=2)


@needs_native
@pytest.mark.parametrize("grad", [False, True], ids=["inference-fused", "autograd"])
def test_logits_match_unpatched(models, grad: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    base, patched, _ = models
    fused_calls = []
    real = K.fused_add_rms_norm_
    monkeypatch.setattr(K, "fused_add_rms_norm_", lambda *a: fused_calls.append(1) or real(*a))
    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.set_grad_enabled(grad):
        want = base(ids).logits
        got = patched(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert len(fused_calls) == (0 if grad else 2)


@needs_native
def test_greedy_generation_with_kv_cache_matches(models) -> None:
    base, patched, _ = models
    ids = torch.randint(0, 101, (1, 5), generator=torch.Generator().manual_seed(2))
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        assert torch.equal(patched.generate(ids, **kwargs), base.generate(ids, **kwargs))


@needs_native
def test_training_step_gradients_match(models) -> None:
    base, patched, _ = models
    base.train()
    patched.train()
    ids = torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(3))
    losses = []
    for model in (base, patched):
        loss = model(ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], atol=1e-6, rtol=0)
    for (name, p_base), (_, p_patched) in zip(base.named_parameters(), patched.named_parameters()):
        torch.testing.assert_close(p_patched.grad, p_base.grad, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_reference_backend_patches_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native_build, "_backend", native_build.Backend("reference", "RAYLM_OPS=reference", frozenset()))
    report = patch_model(_tiny_llama(64, 128, 4))
    assert report.patched == 0
    assert "reference" in report.reason
