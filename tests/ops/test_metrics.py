import math

import pytest
import torch
import torch.nn.functional as F

from ops.errors import UserError
from ops.metrics import measure_latency, sliding_window_perplexity
from ops.model import load_model


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_model(str(tiny_model_dir))


def _ids(n, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g)


def test_single_window_equals_hf_loss(model):
    ids = _ids(100, model.config.vocab_size)
    ppl = sliding_window_perplexity(model, ids, window=100, stride=100)
    with torch.no_grad():
        loss = model(input_ids=ids[None], labels=ids[None]).loss
    assert ppl.predicted == 99
    assert ppl.perplexity == pytest.approx(math.exp(loss.item()), rel=1e-5)


def test_sliding_window_scores_each_token_once_with_context(model):
    ids = _ids(70, model.config.vocab_size, seed=1)
    window, stride = 32, 16
    ppl = sliding_window_perplexity(model, ids, window=window, stride=stride)
    # Reference: every token t >= 1 is scored by the window that first covers it.
    nll, count, prev_end = 0.0, 0, 0
    with torch.no_grad():
        for begin in range(0, len(ids), stride):
            end = min(begin + window, len(ids))
            logits = model(input_ids=ids[None, begin:end]).logits[0]
            for t in range(max(prev_end, begin + 1), end):
                nll += F.cross_entropy(logits[t - begin - 1][None], ids[t][None]).item()
                count += 1
            prev_end = end
            if end == len(ids):
                break
    assert ppl.predicted == count == len(ids) - 1
    assert ppl.perplexity == pytest.approx(math.exp(nll / count), rel=1e-5)


@pytest.mark.parametrize("window, stride, fragment", [
    (16, 0, r"stride=0 must be between 1 and window \(16\)"),
    (16, 17, r"stride=17 must be between 1 and window \(16\)"),
    (1, 1, r"window=1 is too small; valid: an integer >= 2"),
])
def test_bad_window(model, window, stride, fragment):
    with pytest.raises(UserError, match=fragment):
        sliding_window_perplexity(model, _ids(40, 10), window, stride)


def test_latency_is_positive(model):
    lat = measure_latency(model, _ids(8, model.config.vocab_size), new_tokens=4, repeats=1)
    assert lat.prefill_ms_per_token > 0 and lat.decode_ms_per_token > 0 and lat.new_tokens == 4
