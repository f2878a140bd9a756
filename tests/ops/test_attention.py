"""choose_attention with the packages really present here, and with flash-attn/CUDA simulated."""

from __future__ import annotations

import logging

import pytest
import torch
from torch.nn.attention import SDPBackend

from ops import attention
from ops.attention import AttentionChoice, choose_attention


@pytest.fixture
def gpu_with_flash(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attention, "flash_attn_installed", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def test_real_packages_here_pick_sdpa_on_cpu(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="ops.attention"):
        choice = choose_attention("auto", "cpu", torch.float32)
    assert choice.name == "sdpa"
    assert "attention: sdpa" in caplog.text
    if not attention.flash_attn_installed():
        assert "not installed" in choice.reason


def test_none_means_auto() -> None:
    assert choose_attention(None).name == choose_attention("auto").name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_auto_picks_flash_on_cuda_half(gpu_with_flash, dtype: torch.dtype) -> None:
    assert choose_attention("auto", "cuda", dtype).name == "flash_attention_2"


@pytest.mark.parametrize(
    ("device", "dtype", "why"),
    [("cuda", torch.float32, "float16 or bfloat16"), ("cpu", torch.bfloat16, "CUDA device")],
)
def test_auto_falls_back_to_sdpa(gpu_with_flash, device: str, dtype: torch.dtype, why: str) -> None:
    choice = choose_attention("auto", device, dtype)
    assert choice.name == "sdpa"
    assert why in choice.reason


def test_auto_without_flash_on_cuda_is_sdpa(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attention, "flash_attn_installed", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert choose_attention("auto", "cuda", torch.bfloat16) == AttentionChoice(
        "sdpa", "auto: not flash_attention_2 because the flash-attn package is not installed (pip install '.[gpu]')"
    )


def test_auto_without_sdpa_is_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attention, "sdpa_available", lambda: False)
    assert choose_attention("auto", "cpu").name == "eager"


def test_forced_flash_on_cpu_is_a_one_line_error(gpu_with_flash) -> None:
    with pytest.raises(ValueError, match="needs a CUDA device") as e:
        choose_attention("flash_attention_2", "cpu", torch.bfloat16)
    assert "\n" not in str(e.value)


def test_forced_flash_when_not_installed_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attention, "flash_attn_installed", lambda: False)
    with pytest.raises(ValueError, match="not installed"):
        choose_attention("flash_attention_2", "cuda", torch.float16)


def test_forced_backends_that_can_run() -> None:
    assert choose_attention("eager", "cpu").name == "eager"
    assert choose_attention("SDPA", "cpu").name == "sdpa"


def test_forced_sdpa_without_sdpa_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attention, "sdpa_available", lambda: False)
    with pytest.raises(ValueError, match="scaled_dot_product_attention"):
        choose_attention("sdpa")


def test_unknown_name_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match="flash_attention_2, sdpa, eager"):
        choose_attention("flash3")


# --------------------------------------------------------------------------- the engine's decode attention


@pytest.fixture
def h100(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))


def test_decode_on_cpu_is_sdpa() -> None:
    choice = attention.choose_decode_attention("cpu", torch.float32, 64)
    assert choice.name == "sdpa" and "cpu" in choice.reason


def test_decode_with_flash_attn_uses_its_kv_cache_kernel(h100, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attention, "flash_attn_installed", lambda: True)
    monkeypatch.setattr(attention, "flash_attn_version", lambda: "2.8.3")
    choice = attention.choose_decode_attention("cuda", torch.bfloat16, 64)
    assert choice.name == "flash_attn_with_kvcache"
    assert "flash-attn 2.8.3" in choice.reason and "prefill: torch SDPA flash kernel" in choice.reason


def test_decode_without_flash_attn_says_why_sdpa_flash_is_not_used(h100, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attention, "flash_attn_installed", lambda: False)
    choice = attention.choose_decode_attention("cuda", torch.bfloat16, 64)
    assert choice.name == "sdpa_efficient"
    assert "not installed" in choice.reason and "takes no attention mask" in choice.reason
    assert attention.prefill_sdpa_backends("cuda", torch.bfloat16, 64) == [SDPBackend.FLASH_ATTENTION]


@pytest.mark.parametrize(("dtype", "head_dim", "capability", "why"), [
    (torch.float32, 64, (9, 0), "float16 or bfloat16"),
    (torch.bfloat16, 12, (9, 0), "multiple of 8 up to 256"),
    (torch.bfloat16, 320, (9, 0), "multiple of 8 up to 256"),
    (torch.bfloat16, 64, (7, 5), "compute capability 8.0"),
])
def test_decode_where_flash_cannot_run_is_plain_sdpa(monkeypatch: pytest.MonkeyPatch, dtype, head_dim, capability,
                                                     why) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(attention, "flash_attn_installed", lambda: True)
    choice = attention.choose_decode_attention("cuda", dtype, head_dim)
    assert choice.name == "sdpa" and why in choice.reason
    assert SDPBackend.MATH in attention.prefill_sdpa_backends("cuda", dtype, head_dim)
