"""The app's Prometheus metrics (``raylm_*``), recorded with ``ray.serve.metrics``.

Ray exports them on every node's metrics endpoint (``ray.init(_metrics_export_port=...)`` /
``ray start --metrics-export-port``) with its ``ray_`` prefix, e.g. ``ray_raylm_requests_total``;
inside a replica Serve adds the ``deployment``, ``replica`` and ``application`` tags. Values reach
the endpoint every ``RAY_metrics_report_interval_ms`` (Ray's default 10 s).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from ray.serve import metrics as serve_metrics

# Seconds; a RAG prompt's prefill on a CPU takes tenths of a second to seconds.
TTFT_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
TOKEN_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64]
RETRIEVAL_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]


@dataclass(frozen=True)
class MetricSpec:
    """One metric: its kind, ``raylm_*`` name, meaning, tag keys and (histograms) bucket bounds."""

    kind: Literal["counter", "histogram", "gauge"]
    name: str
    description: str
    tag_keys: tuple[str, ...] = ()
    boundaries: tuple[float, ...] = ()
    recorded_by: str = "Generator"

    def create(self) -> Any:
        """The ``ray.serve.metrics`` object (works outside a replica too, without Serve's tags)."""
        if self.kind == "counter":
            return serve_metrics.Counter(self.name, description=self.description, tag_keys=self.tag_keys)
        if self.kind == "gauge":
            return serve_metrics.Gauge(self.name, description=self.description, tag_keys=self.tag_keys)
        return serve_metrics.Histogram(self.name, description=self.description, boundaries=list(self.boundaries),
                                       tag_keys=self.tag_keys)


REQUESTS = MetricSpec("counter", "raylm_requests_total", "HTTP requests answered, by route and status code "
                      "(a stream counts with the status it started with)", ("route", "status"), recorded_by="Ingress")
RETRIEVAL = MetricSpec("histogram", "raylm_retrieval_latency_seconds", "retrieval of passages for one request "
                       "(embedding + index search, as the ingress waits for it)", (), tuple(RETRIEVAL_BUCKETS),
                       recorded_by="Ingress")
TTFT = MetricSpec("histogram", "raylm_time_to_first_token_seconds", "from the engine accepting a request to its "
                  "first generated token (queueing + prefill)", ("model",), tuple(TTFT_BUCKETS))
TPOT = MetricSpec("histogram", "raylm_time_per_output_token_seconds", "decode time per generated token after the "
                  "first, per request", ("model",), tuple(TOKEN_BUCKETS))
TOKENS = MetricSpec("counter", "raylm_generated_tokens_total", "tokens generated", ("model",))
QUEUE = MetricSpec("gauge", "raylm_queue_depth", "requests waiting for a batch row in an engine", ("model",))
BATCH = MetricSpec("gauge", "raylm_running_batch_size", "requests decoding together in an engine", ("model",))
ADAPTER_LOADS = MetricSpec("counter", "raylm_adapter_loads_total", "LoRA adapters loaded into a Generator "
                           "replica's slots (first use, or again after an eviction)", ("adapter",))
ADAPTER_EVICTIONS = MetricSpec("counter", "raylm_adapter_evictions_total", "LoRA adapters evicted from a slot "
                               "(least recently used idle one, when a request needs an adapter and every slot "
                               "is taken)", ("adapter",))
PREFIX_HITS = MetricSpec("counter", "raylm_prefix_cache_hit_tokens_total", "prompt tokens whose keys and values "
                         "came from the engine's prefix cache instead of a prefill", ("model",))
PREFIX_LOOKUPS = MetricSpec("counter", "raylm_prefix_cache_lookup_tokens_total", "prompt tokens looked up in the "
                            "engine's prefix cache (hit rate: hit tokens / these)", ("model",))
SPECS = (REQUESTS, RETRIEVAL, TTFT, TPOT, TOKENS, QUEUE, BATCH, ADAPTER_LOADS, ADAPTER_EVICTIONS, PREFIX_HITS,
         PREFIX_LOOKUPS)


@dataclass
class IngressMetrics:
    """What the HTTP front records."""

    requests: Any = dataclasses.field(default_factory=REQUESTS.create)
    retrieval: Any = dataclasses.field(default_factory=RETRIEVAL.create)


@dataclass
class GeneratorMetrics:
    """What a Generator replica records, per model (the base model id or an adapter name)."""

    ttft: Any = dataclasses.field(default_factory=TTFT.create)
    time_per_token: Any = dataclasses.field(default_factory=TPOT.create)
    tokens: Any = dataclasses.field(default_factory=TOKENS.create)
    queue: Any = dataclasses.field(default_factory=QUEUE.create)
    batch: Any = dataclasses.field(default_factory=BATCH.create)
    adapter_loads: Any = dataclasses.field(default_factory=ADAPTER_LOADS.create)
    adapter_evictions: Any = dataclasses.field(default_factory=ADAPTER_EVICTIONS.create)
    prefix_hits: Any = dataclasses.field(default_factory=PREFIX_HITS.create)
    prefix_lookups: Any = dataclasses.field(default_factory=PREFIX_LOOKUPS.create)

    def completed(self, model: str, completion: dict) -> None:
        """Record one finished request (an :class:`ops.engine.Completion` as a dict)."""
        tags = {"model": model}
        self.ttft.observe(completion["time_to_first_token_s"], tags=tags)
        if completion["completion_tokens"] > 1 and completion["tokens_per_s"] > 0:
            self.time_per_token.observe(1.0 / completion["tokens_per_s"], tags=tags)
        self.tokens.inc(completion["completion_tokens"], tags=tags)

    def engine_load(self, model: str, waiting: int, running: int) -> None:
        """Set the queue-depth and batch-size gauges of one engine."""
        self.queue.set(waiting, tags={"model": model})
        self.batch.set(running, tags={"model": model})


def markdown_table() -> str:
    """The metrics table of docs/serve.md (a test keeps the page in step with :data:`SPECS`)."""
    rows = ["| metric (Prometheus name: `ray_` + this) | type | tags | recorded by | meaning |",
            "|---|---|---|---|---|"]
    for s in SPECS:
        rows.append(f"| `{s.name}` | {s.kind} | {', '.join(f'`{t}`' for t in s.tag_keys) or '-'} | {s.recorded_by} | "
                    f"{s.description} |")
    return "\n".join(rows)
