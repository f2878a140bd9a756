import pytest
import torch

from ops.errors import UserError
from ops.lora import add_lora, apply_adapter, check_target_modules, merge_adapter, trainable_parameters
from ops.model import load_model


def _trained_lora(tiny_model_dir, steps: int = 3):
    torch.manual_seed(0)
    model = add_lora(load_model(str(tiny_model_dir)), r=4, alpha=8, dropout=0.0)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval(), ids


def test_only_lora_matrices_train(tiny_model_dir):
    model = add_lora(load_model(str(tiny_model_dir)), r=4, alpha=8, dropout=0.0)
    trainable, total = trainable_parameters(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert 0 < trainable < 0.2 * total


def test_saved_adapter_loads_with_plain_peft_and_merges(tiny_model_dir, tmp_path):
    from peft import PeftModel

    model, ids = _trained_lora(tiny_model_dir)
    model.save_pretrained(tmp_path / "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (tmp_path / "adapter").iterdir()}
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        plain = PeftModel.from_pretrained(load_model(str(tiny_model_dir)), str(tmp_path / "adapter")).eval()
        ours = apply_adapter(load_model(str(tiny_model_dir)), tmp_path / "adapter").eval()
        base_logits = load_model(str(tiny_model_dir))(input_ids=ids).logits
        torch.testing.assert_close(plain(input_ids=ids).logits, expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(ours(input_ids=ids).logits, expected, rtol=0, atol=1e-5)
        assert (expected - base_logits).abs().max() > 1e-3  # the adapter changed something
        merged = merge_adapter(plain)
        assert not hasattr(merged, "peft_config")
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(r=0, alpha=8, dropout=0.0), "lora.r=0 must be an integer >= 1"),
    (dict(r=4, alpha=8, dropout=1.5), "lora.dropout=1.5"),
    (dict(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "qkv"]), "['qkv'] match no linear layer"),
])
def test_bad_lora_settings(tiny_model_dir, kwargs, fragment):
    with pytest.raises(UserError) as err:
        add_lora(load_model(str(tiny_model_dir)), **kwargs)
    assert fragment in str(err.value)


def test_check_targets_lists_valid_names_on_meta_model(tiny_model_dir):
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_model_dir))
    check_target_modules(meta, ["q_proj", "down_proj"])
    with pytest.raises(UserError, match="valid: .*gate_proj.*q_proj"):
        check_target_modules(meta, ["nothing"])


def test_merge_needs_peft_model(tiny_model_dir):
    with pytest.raises(UserError, match="needs a PEFT model"):
        merge_adapter(load_model(str(tiny_model_dir)))
