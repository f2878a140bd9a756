"""ops.evaluation's engine-path measures: perplexity through the engine's own decode steps equals a
full-context transformers forward of the same pieces, with and without an unmerged adapter."""

import math

import pytest
import torch

from ops.evaluation import engine_decode_rate, engine_perplexity
from tests.ops.test_multi_lora import adapters, base, engine_for, tokenizer  # noqa: F401 (fixtures)


def hf_perplexity(model, pieces: torch.Tensor) -> float:
    """Each row scored by one causal forward over its whole length (token t predicted from 0..t-1)."""
    with torch.inference_mode():
        logits = model(input_ids=pieces).logits.float()  # (rows, T, V)
    nll = -torch.log_softmax(logits[:, :-1], -1).gather(2, pieces[:, 1:, None]).sum().item()
    return math.exp(nll / (pieces.shape[0] * (pieces.shape[1] - 1)))


@pytest.mark.parametrize("adapter", [None, "b"])
def test_engine_perplexity_equals_a_full_forward_of_the_same_rows(base, tokenizer, adapters, adapter):
    ids = torch.randint(0, 49152, (4 * 24 + 3,), generator=torch.Generator().manual_seed(0))
    with engine_for(base, tokenizer, adapters) as eng:
        got = engine_perplexity(eng, ids, adapter=adapter)
        assert eng.adapter_stats()["resident"] == ([adapter] if adapter else [])
    assert (got["rows"], got["row_tokens"], got["predicted_tokens"]) == (4, 24, 4 * 23)  # the 3 left over are cut
    reference = adapters[adapter][1] if adapter else base
    assert got["perplexity"] == pytest.approx(hf_perplexity(reference, ids[:96].reshape(4, 24)), rel=1e-4)
    if adapter:  # the adapter is really applied: the base scores the same rows differently
        assert got["perplexity"] != pytest.approx(hf_perplexity(base, ids[:96].reshape(4, 24)), rel=1e-3)


def test_engine_perplexity_rows_follow_the_argument_and_unknown_adapters_fail(base, tokenizer, adapters):
    ids = torch.arange(1, 41)
    with engine_for(base, tokenizer, adapters) as eng:
        assert engine_perplexity(eng, ids, rows=2)["row_tokens"] == 20
        with pytest.raises(KeyError):
            engine_perplexity(eng, ids, adapter="nope")
    with engine_for(base, tokenizer, {}, max_adapters=0) as eng, pytest.raises(ValueError, match="no LoRA slots"):
        engine_perplexity(eng, ids, adapter="a")


def test_engine_decode_rate_decodes_new_tokens_per_prompt(base, tokenizer, adapters):
    with engine_for(base, tokenizer, adapters) as eng:
        rate = engine_decode_rate(eng, tokenizer, adapter="a", new_tokens=5, questions=["Hi", "Why?"])
        assert eng.adapter_stats()["loads"] == 1
    assert rate["tokens_per_s"] > 0 and rate["decode_ms_per_token"] == pytest.approx(1000 / rate["decode_tokens_per_s"])


def test_engine_perplexity_frees_the_callers_openmp_team(base, tokenizer, adapters, monkeypatch):
    """Its steps run on the calling thread; the idle OpenMP team that leaves there must be freed, or
    the engine's own decode thread slows down after it (the pipeline's and Tune's latency rows)."""
    import ops.openmp

    released = []
    monkeypatch.setattr(ops.openmp, "release_openmp_workers", lambda: released.append(True) or True)
    with engine_for(base, tokenizer, adapters) as eng:
        engine_perplexity(eng, torch.arange(1, 41))
    assert released == [True]
