"""ops.prefill_budget: chunk sizes from measured step times (the engine side is in test_engine.py)."""

import pytest

from ops.prefill_budget import PrefillBudget, keys_per_unit


def test_without_measurements_the_chunk_is_the_largest():
    budget = PrefillBudget(stall=2.0, max_tokens=64, keys_per_unit=1000)
    assert budget.step_ms() is None
    assert budget.tokens(0, None) == 64
    budget.observe_decode(0.020)
    assert budget.step_ms() == pytest.approx(20.0)
    assert budget.tokens(0, 20.0) == 64  # no prefill measured yet


def test_the_chunk_is_the_largest_that_fits_and_shrinks_deeper_in_the_prompt():
    budget = PrefillBudget(stall=3.0, max_tokens=256, keys_per_unit=1000)
    budget.observe_decode(0.010)  # 10 ms decode step: 20 ms of prefill per step
    budget.observe_prefill(0, 10, 0.010 * (1 + 5 / 1000))  # 1 ms per unit
    assert budget.ms_per_unit == pytest.approx(1.0)
    for start in (0, 500, 1000):
        n = budget.tokens(start, budget.step_ms())
        assert budget.units(start, n) * budget.ms_per_unit <= 20.0 < budget.units(start, n + 1) * budget.ms_per_unit
    assert budget.tokens(0, 20.0) == 19 and budget.tokens(1000, 20.0) == 9 and budget.tokens(2000, 20.0) == 8
    assert budget.tokens(2000, 0.5) == 8  # never below the floor: the prompt always advances


def test_running_averages_follow_the_newest_measurements():
    budget = PrefillBudget(stall=2.0, max_tokens=64, keys_per_unit=1e9)
    budget.observe_prefill(0, 10, 0.010)
    for _ in range(30):
        budget.observe_prefill(0, 10, 0.030)  # the machine got 3x slower (load)
    assert budget.ms_per_unit == pytest.approx(3.0, rel=1e-3)
    budget.observe_prefill(0, 0, 1.0)  # nothing prefilled: nothing learned
    assert budget.ms_per_unit == pytest.approx(3.0, rel=1e-3)


@pytest.mark.parametrize("stall", [1.0, 0.5])
def test_a_stall_of_one_or_less_is_refused(stall):
    with pytest.raises(ValueError, match="prefill stall must be > 1"):
        PrefillBudget(stall=stall, max_tokens=64, keys_per_unit=1000)


def test_keys_per_unit_of_smollm2_135m():
    # hidden 576, intermediate 1536, 9 heads of 64, 3 kv heads: 3,538,944 Linear weights per layer,
    # 2 FLOPs each per token, against 4 * 9 * 64 FLOPs per attended key
    assert keys_per_unit(576, 1536, 9, 3, 64) == pytest.approx(2 * 3_538_944 / (4 * 9 * 64))
