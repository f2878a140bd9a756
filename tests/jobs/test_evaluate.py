import pytest
import torch

from cluster.config import load_config
from jobs.evaluate import EvaluateConfig, evaluate
from ops.lora import add_lora
from ops.model import load_model


@pytest.mark.integration
def test_evaluate_applies_adapter(ray_local, tiny_model_dir, tiny_text_file, tmp_path):
    from peft import PeftModel

    torch.manual_seed(0)
    lora = add_lora(load_model(str(tiny_model_dir)), r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # B starts at zero; make the adapter change the logits
    lora.save_pretrained(tmp_path / "adapter")

    common = [f"model={tiny_model_dir}", f"data={tiny_text_file}", "window=32", "stride=32", "max_tokens=96",
              "latency.enabled=false", f"storage={tmp_path}"]
    base = evaluate(load_config(EvaluateConfig, None, common))
    adapted = evaluate(load_config(EvaluateConfig, None, [*common, f"adapter={tmp_path / 'adapter'}"]))
    assert adapted["adapter"] == str(tmp_path / "adapter")
    assert adapted["perplexity"] != pytest.approx(base["perplexity"], rel=1e-3)

    plain = PeftModel.from_pretrained(load_model(str(tiny_model_dir)), str(tmp_path / "adapter")).eval()
    assert adapted["parameters"] == sum(p.numel() for p in {p.data_ptr(): p for p in plain.parameters()}.values())
