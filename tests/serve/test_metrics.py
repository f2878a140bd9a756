"""serve/metrics.py without Ray: names, tags and buckets of every metric, what a finished request
records, and the docs table (the scrape of a live app is in tests/serve/test_app.py)."""

from __future__ import annotations

import pytest

from serve import metrics
from tests.conftest import REPO


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, float, dict]] = []

    def inc(self, value: float = 1.0, tags: dict | None = None) -> None:
        self.calls.append(("inc", value, tags or {}))

    def observe(self, value: float, tags: dict | None = None) -> None:
        self.calls.append(("observe", value, tags or {}))

    def set(self, value: float, tags: dict | None = None) -> None:
        self.calls.append(("set", value, tags or {}))


EXPECTED = {
    "raylm_requests_total": ("Counter", ("route", "status")),
    "raylm_retrieval_latency_seconds": ("Histogram", ()),
    "raylm_time_to_first_token_seconds": ("Histogram", ("model",)),
    "raylm_time_per_output_token_seconds": ("Histogram", ("model",)),
    "raylm_generated_tokens_total": ("Counter", ("model",)),
    "raylm_queue_depth": ("Gauge", ("model",)),
    "raylm_running_batch_size": ("Gauge", ("model",)),
    "raylm_adapter_loads_total": ("Counter", ("adapter",)),
    "raylm_adapter_evictions_total": ("Counter", ("adapter",)),
    "raylm_prefix_cache_hit_tokens_total": ("Counter", ("model",)),
    "raylm_prefix_cache_lookup_tokens_total": ("Counter", ("model",)),
}


@pytest.mark.parametrize("spec", metrics.SPECS, ids=[s.name for s in metrics.SPECS])
def test_each_metric_is_created_with_its_name_and_tags(spec):
    created = spec.create()  # outside a replica Serve adds no deployment/replica tags
    kind, tags = EXPECTED[spec.name]
    assert type(created).__name__ == kind and type(created).__module__ == "ray.serve.metrics"
    assert created.info["name"] == spec.name and created.info["tag_keys"] == tags
    if kind == "Histogram":
        assert created.info["boundaries"] == list(spec.boundaries) and list(spec.boundaries) == sorted(spec.boundaries)
    assert [s.name for s in metrics.SPECS] == list(EXPECTED)


def test_the_two_groups_create_every_metric_once():
    ingress, generator = metrics.IngressMetrics(), metrics.GeneratorMetrics()
    names = [m.info["name"] for group in (ingress, generator) for m in vars(group).values()]
    assert sorted(names) == sorted(EXPECTED)


def test_a_finished_request_records_ttft_time_per_token_and_tokens():
    m = metrics.GeneratorMetrics(ttft=Recorder(), time_per_token=Recorder(), tokens=Recorder())
    m.completed("tiny-lora", {"time_to_first_token_s": 0.2, "tokens_per_s": 50.0, "completion_tokens": 11})
    assert m.ttft.calls == [("observe", 0.2, {"model": "tiny-lora"})]
    assert m.time_per_token.calls == [("observe", pytest.approx(0.02), {"model": "tiny-lora"})]
    assert m.tokens.calls == [("inc", 11, {"model": "tiny-lora"})]
    m.completed("tiny", {"time_to_first_token_s": 0.1, "tokens_per_s": 0.0, "completion_tokens": 1})
    assert len(m.time_per_token.calls) == 1  # one token: no decode step to time


def test_engine_load_sets_both_gauges():
    m = metrics.GeneratorMetrics(queue=Recorder(), batch=Recorder())
    m.engine_load("tiny", waiting=3, running=8)
    assert m.queue.calls == [("set", 3, {"model": "tiny"})] and m.batch.calls == [("set", 8, {"model": "tiny"})]


def test_docs_list_every_metric():
    page = (REPO / "docs" / "serve.md").read_text()
    assert metrics.markdown_table() in page, (
        "docs/serve.md's metrics table is stale; regenerate it with "
        "python -c 'from serve.metrics import markdown_table; print(markdown_table())'")
