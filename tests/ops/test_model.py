import shutil

import pytest
import torch

from ops.errors import UserError
from ops import model as model_module
from ops.model import (DEFAULT_MODEL, load_model, load_tokenizer, model_size_bytes, parameter_count, resolve)


def test_load_local_dir(tiny_model_dir):
    model = load_model(str(tiny_model_dir))
    tok = load_tokenizer(str(tiny_model_dir))
    assert not model.training
    ids = tok("hello world", return_tensors="pt")["input_ids"]
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], model.config.vocab_size)


def test_dtype_argument(tiny_model_dir):
    assert load_model(str(tiny_model_dir), dtype="bfloat16").dtype == torch.bfloat16
    with pytest.raises(UserError, match="unknown dtype 'int3'"):
        load_model(str(tiny_model_dir), dtype="int3")


def test_size_counts_tied_weights_once(tiny_model_dir):
    model = load_model(str(tiny_model_dir))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    n = parameter_count(model)
    assert n == sum(p.numel() for p in model.parameters())  # .parameters() already dedups tied params
    persistent = {name for name, _ in model.named_buffers()} & set(model.state_dict())
    assert model_size_bytes(model) == 4 * n + sum(b.numel() * b.element_size() for name, b in
                                                  model.named_buffers() if name in persistent)


@pytest.mark.parametrize("spec, fragment", [
    ("/nonexistent/model", "does not exist"),
    ("./no/such/dir", "does not exist"),
    ("", "empty model spec"),
])
def test_bad_paths(spec, fragment):
    with pytest.raises(UserError, match=fragment):
        resolve(spec)


def test_unknown_hub_id_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="unknown model 'nobody/no-such-model-xyz': offline"):
        load_model("nobody/no-such-model-xyz")


def test_directory_without_model(tmp_path):
    with pytest.raises(UserError, match="holds no config.json"):
        resolve(str(tmp_path))


class Converted(Exception):
    """Raised by a stand-in for the GGUF lookup: reaching it means the cache was not used."""


def refuse_conversion(monkeypatch) -> None:
    def convert(name):
        raise Converted(name)

    monkeypatch.setattr(model_module, "embedded_gguf", convert)


def test_embedded_name_loads_from_a_complete_cache_without_converting(tiny_model_dir, tmp_path, monkeypatch):
    cache = tmp_path / "models" / DEFAULT_MODEL
    shutil.copytree(tiny_model_dir, cache)
    weights = cache / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    refuse_conversion(monkeypatch)
    model = load_model(DEFAULT_MODEL, storage=tmp_path)
    assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 2  # the cached tiny model
    assert load_tokenizer(DEFAULT_MODEL, storage=tmp_path).eos_token == "<|im_end|>"
    assert weights.stat().st_mtime_ns == mtime


def test_an_incomplete_cache_is_converted_again(tiny_model_dir, tmp_path, monkeypatch):
    cache = tmp_path / "models" / DEFAULT_MODEL
    cache.mkdir(parents=True)
    shutil.copy(tiny_model_dir / "config.json", cache)  # an interrupted copy: no weights
    refuse_conversion(monkeypatch)
    with pytest.raises(Converted, match=DEFAULT_MODEL):
        load_model(DEFAULT_MODEL, storage=tmp_path)


@pytest.mark.slow
def test_embedded_default_loads_from_its_converted_cache(embedded_storage, monkeypatch):
    weights = embedded_storage / "models" / DEFAULT_MODEL / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    refuse_conversion(monkeypatch)
    model = load_model(DEFAULT_MODEL, storage=embedded_storage)
    assert weights.stat().st_mtime_ns == mtime
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.vocab_size) == (576, 30, 9, 3, 49152)
    assert 134e6 < parameter_count(model) < 135e6
    tok = load_tokenizer(DEFAULT_MODEL, storage=embedded_storage)
    assert "<|im_start|>assistant" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                             add_generation_prompt=True)


def test_artifacts_resolve_by_name_under_storage(tiny_model_dir, tmp_path):
    import shutil

    shutil.copytree(tiny_model_dir, tmp_path / "models" / "tiny")
    source = resolve("models/tiny", storage=tmp_path)
    assert source.kind == "hf" and source.path == str((tmp_path / "models" / "tiny").resolve())
    with pytest.raises(UserError, match="does not exist"):
        resolve("./models/absent/x", storage=tmp_path)
