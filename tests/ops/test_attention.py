"""choose_attention with the packages really present here, and with flash-attn/CUDA simulated."""

from __future__ import annotations

import logging

import pytest
import torch

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
