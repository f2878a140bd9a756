"""ops.model.choose_placement: device and format for serving, with CUDA simulated where needed."""

from __future__ import annotations

import pytest
import torch

from ops.model import Placement, choose_placement


@pytest.fixture
def cuda_visible(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)


def test_float_model_is_bf16_on_gpu_and_fp32_on_cpu(cuda_visible, tiny_model_dir) -> None:
    on_gpu = choose_placement(str(tiny_model_dir), dtype="auto", use_gpu=True)
    assert (on_gpu.device, on_gpu.dtype, on_gpu.format) == ("cuda", "bfloat16", "bfloat16")
    on_cpu = choose_placement(str(tiny_model_dir), dtype="auto", use_gpu=False)
    assert (on_cpu.device, on_cpu.dtype, on_cpu.format) == ("cpu", "float32", "float32")
    assert choose_placement(str(tiny_model_dir), dtype="float16", use_gpu=True).dtype == "float16"


def test_use_gpu_without_a_visible_gpu_says_why(tiny_model_dir, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    placement = choose_placement(str(tiny_model_dir), use_gpu=True)
    assert placement.device == "cpu" and placement.dtype == "float32" and "num_gpus" in placement.reason


def _quantized(tiny_model_dir, path, method: str, **settings) -> str:
    from ops.model import load_model
    from ops.quantization import quantize, save_quantized

    model = load_model(str(tiny_model_dir))
    calibration = torch.randint(0, 100, (2, 16)) if method == "static_int8" else None
    save_quantized(quantize(model, method, calibration=calibration, **settings), path, method, settings, "tiny")
    return str(path)


def test_quantized_without_cuda_kernels_runs_on_cpu_and_says_so(cuda_visible, tiny_model_dir, tmp_path) -> None:
    spec = _quantized(tiny_model_dir, tmp_path / "dyn", "dynamic_int8")
    placement = choose_placement(spec, use_gpu=True)
    assert placement == Placement("cpu", "float32", "dynamic_int8", placement.reason)
    assert "valid on CUDA: weight_only_int4, weight_only_int8, bf16" in placement.reason


def test_weight_only_int8_runs_on_gpu(cuda_visible, tiny_model_dir, tmp_path) -> None:
    spec = _quantized(tiny_model_dir, tmp_path / "w8", "weight_only_int8")
    assert choose_placement(spec, use_gpu=True).device == "cuda"
