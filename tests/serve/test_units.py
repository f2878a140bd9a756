"""serve/ pieces that need no Ray: app args, adapter names, prompt fitting, schemas."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from cluster.config import ConfigError
from serve import schemas
from serve.app import ApiError, adapter_dir, build_app, parse_app_args, rag_messages


def test_app_args_unknown_key_and_bad_value_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'modle'"):
        parse_app_args({"modle": "x"})
    with pytest.raises(ConfigError, match="max_queue"):
        parse_app_args({"max_queue": 0})
    with pytest.raises(ConfigError, match="jobs.index"):
        build_app({"storage": str(tmp_path), "index": "missing"})


def test_api_key_from_env_and_model_id_default(monkeypatch, tmp_path):
    monkeypatch.setenv("RAYLM_API_KEY", "secret")
    args = parse_app_args({"storage": str(tmp_path), "model": "/some/dir/my-model/"})
    assert args.api_key.get_secret_value() == "secret" and args.model_id == "my-model"


@pytest.mark.parametrize("name, status", [("../../etc/passwd", 422), ("/etc", 422), (".hidden", 422),
                                          ("a..b", 422), ("not-registered", 404)])
def test_adapter_names_are_registry_names_only(tmp_path, name, status):
    (tmp_path / "adapters" / "real").mkdir(parents=True)
    (tmp_path / "adapters" / "real" / "adapter_config.json").write_text("{}")
    with pytest.raises(ApiError) as err:
        adapter_dir(str(tmp_path), name)
    assert err.value.status == status
    assert adapter_dir(str(tmp_path), "real").name == "real"


def test_rag_messages_trim_passages_to_the_budget():
    sources = [{"text": "x" * 4000}, {"text": "y" * 4000}]
    count = lambda messages: sum(len(m["content"]) for m in messages) // 4  # noqa: E731
    messages = rag_messages("why?", sources, "sys", count, budget=500)
    assert count(messages) <= 500 and "[1]" in messages[1]["content"] and "Question: why?\n" in messages[1]["content"]


def test_schemas_bounds():
    with pytest.raises(ValidationError, match="question"):
        schemas.RagRequest(question="   ")
    with pytest.raises(ValidationError, match="max_tokens"):
        schemas.RagRequest(question="q", max_tokens=10**6)
    with pytest.raises(ValidationError, match="unknown\n  Extra inputs are not permitted"):
        schemas.RagRequest(question="q", unknown=1)
    req = schemas.ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], stop="END", extra_field=1)
    assert req.stop == ["END"] and req.token_budget(7) == 7


def test_timeout_is_504_and_cancels_the_call():
    import asyncio
    import time

    from serve.app import AppArgs, Ingress

    ingress = Ingress.func_or_class.__new__(Ingress.func_or_class)
    ingress.args = AppArgs(request_timeout_s=0.05)
    cancelled: list[bool] = []
    with pytest.raises(ApiError) as err:
        asyncio.run(ingress._call(lambda: asyncio.sleep(5), time.monotonic() + 0.05, lambda: cancelled.append(True)))
    assert err.value.status == 504 and cancelled == [True]


def test_full_engine_queue_is_503_with_retry_after(tiny_model_dir, tmp_path):
    """The Generator class without Ray: a second waiting request over max_queue=1 is refused."""
    import asyncio

    from serve.app import Generator

    gen = Generator.func_or_class({"storage": str(tmp_path), "model": str(tiny_model_dir), "max_batch_size": 1,
                                   "max_queue": 1, "max_seq_len": 256, "index": None, "compile": False})
    payload = {"prompt": "The quick brown fox", "max_tokens": 200, "temperature": 0.0}

    async def flood() -> list[dict]:
        return await asyncio.gather(*(gen.generate(dict(payload)) for _ in range(4)))

    try:
        results = asyncio.run(flood())
    finally:
        gen.engine.close()
    refused = [r["error"] for r in results if "error" in r]
    assert refused and all(e["status"] == 503 and e["retry_after"] == 1 for e in refused)
    assert any("completion" in r for r in results)


@pytest.mark.slow  # builds the tiny model's decode graphs
def test_compiling_generator_answers_before_its_graphs_are_built(tiny_model_dir, tmp_path):
    """compile=true: the replica is constructed without waiting for the build, answers eagerly, then
    reports the compiled step in /healthz's fields."""
    import asyncio

    from serve.app import Generator

    gen = Generator.func_or_class({"storage": str(tmp_path), "model": str(tiny_model_dir), "max_batch_size": 2,
                                   "max_seq_len": 128, "index": None, "compile": True, "max_adapters": 0})
    payload = {"prompt": "The quick brown fox", "max_tokens": 8, "temperature": 0.0}
    try:
        first = asyncio.run(gen.generate(dict(payload)))
        assert gen.engine.wait_compiled(timeout=600), gen.engine.warmup_error
        info = gen.info()
        again = asyncio.run(gen.generate(dict(payload)))
    finally:
        gen.engine.close()
    assert info["engine_compiled"] is True and info["engine_compiling"] is False
    assert first["completion"]["text"] == again["completion"]["text"]


def test_adapters_are_registered_only_for_the_base_model_they_were_trained_on(tmp_path):
    import json

    from serve.app import registered_adapters

    for name, base in [("on-base", "base-model"), ("on-other", "other-model"), ("plain-peft", None)]:
        (tmp_path / "adapters" / name).mkdir(parents=True)
        (tmp_path / "adapters" / name / "adapter_config.json").write_text(
            json.dumps({"base_model_name_or_path": "base-model" if base is None else "ignored"}))
        if base:
            (tmp_path / "adapters" / name / "manifest.json").write_text(json.dumps({"base_model": base}))
    storage = str(tmp_path)
    assert registered_adapters(storage) == ["on-base", "on-other", "plain-peft"]
    assert registered_adapters(storage, "base-model") == ["on-base", "plain-peft"]
    # A quantized artifact already holds its merged adapter: nothing is stacked on it.
    assert registered_adapters(storage, "quantized/sweep-best") == []
    assert adapter_dir(storage, "on-base", "base-model").name == "on-base"
    with pytest.raises(ApiError, match="trained on 'other-model', not on the served model 'base-model'") as err:
        adapter_dir(storage, "on-other", "base-model")
    assert err.value.status == 422


def test_a_cancelled_generation_is_a_503_never_a_finish_reason():
    """The engine ends a request as "cancelled" only when it shuts down under a listening client."""
    from ops.engine import Completion
    from serve.app import Generator
    from serve.metrics import GeneratorMetrics
    from tests.serve.test_metrics import Recorder

    gen = object.__new__(Generator.func_or_class)
    gen.model_id = "tiny"
    gen.metrics = GeneratorMetrics(ttft=Recorder(), time_per_token=Recorder(), tokens=Recorder())
    done = dict(text="hi", token_ids=[5, 6], prompt_tokens=3, completion_tokens=2, time_to_first_token_s=0.1,
                latency_s=0.2, tokens_per_s=10.0)
    refused = gen._finished(Completion(finish_reason="cancelled", **done))
    assert refused == {"error": {"status": 503, "code": "cancelled", "param": None, "retry_after": 1, "message":
                                 "generation was cut off: its engine shut down (adapter evicted or replica stopping); "
                                 "retry"}}
    assert gen.metrics.tokens.calls == []
    finished = gen._finished(Completion(finish_reason="length", **done))
    assert finished["completion"]["finish_reason"] == "length" and "token_ids" not in finished["completion"]
    assert gen.metrics.tokens.calls == [("inc", 2, {"model": "tiny"})]


def test_adapter_loads_and_evictions_are_counted_once_per_event():
    """The gauge thread turns the engine registry's running totals into counter increments."""
    from collections import Counter

    from serve.app import Generator
    from serve.metrics import GeneratorMetrics
    from tests.serve.test_metrics import Recorder

    class Registry:
        loads_by_name, evictions_by_name = Counter(), Counter()

    class Engine:
        adapters, num_waiting, num_running = Registry(), 3, 2

        def prefix_cache_stats(self) -> dict:
            return {}

    gen = object.__new__(Generator.func_or_class)
    gen.model_id, gen.engine, gen._adapter_counts = "tiny", Engine(), {}
    gen.metrics = GeneratorMetrics(queue=Recorder(), batch=Recorder(), adapter_loads=Recorder(),
                                   adapter_evictions=Recorder())
    Registry.loads_by_name.update({"a": 2, "b": 1})
    Registry.evictions_by_name.update({"a": 1})
    gen.sample_engines()
    gen.sample_engines()  # nothing new happened: nothing more is counted
    Registry.loads_by_name.update({"b": 1})
    gen.sample_engines()
    assert sorted(gen.metrics.adapter_loads.calls, key=str) == [
        ("inc", 1, {"adapter": "b"}), ("inc", 1, {"adapter": "b"}), ("inc", 2, {"adapter": "a"})]
    assert gen.metrics.adapter_evictions.calls == [("inc", 1, {"adapter": "a"})]
    assert gen.metrics.queue.calls[-1] == ("set", 3, {"model": "tiny"})
    assert gen.metrics.batch.calls[-1] == ("set", 2, {"model": "tiny"})



def _tiny_llama(intermediate: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=intermediate,
                                        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)).eval()


def test_serving_quantization_quantizes_float_models_on_cpu_only():
    import torch

    from ops.quantization import Int4WeightOnlyLinear
    from serve.app import serving_quantization

    model = _tiny_llama(128)
    ids = torch.tensor([[1, 5, 9, 33]])
    with torch.no_grad():
        want = model(ids).logits
    quantized, why = serving_quantization(model, "/some/dir", "hf", "weight_only_int4", "cpu")
    assert isinstance(quantized.model.layers[0].self_attn.q_proj, Int4WeightOnlyLinear), why
    assert why == "weight_only_int4 of the float weights"
    with torch.no_grad():
        got = quantized(ids).logits
    assert torch.allclose(got, want, atol=0.05) and not torch.equal(got, want)  # int4 of the same weights
    for kind, method, device, note in [("hf", "none", "cpu", "as loaded (none)"),
                                       ("quantized", "weight_only_int4", "cpu", "as loaded (a quantized artifact)"),
                                       ("hf", "weight_only_int4", "cuda", "as loaded (on cuda)")]:
        same, why = serving_quantization(model, "/some/dir", kind, method, device)
        assert same is model and why == note


def test_serving_quantization_falls_back_to_float_weights_it_cannot_group():
    from serve.app import serving_quantization

    model = _tiny_llama(144)  # down_proj's input 144 is no multiple of the group size 32
    same, why = serving_quantization(model, "/some/dir", "hf", "weight_only_int4", "cpu")
    assert same is model and why.startswith("as loaded (weight_only_int4 does not apply:") and "144" in why
def test_prefix_cache_hits_are_counted_once():
    """The gauge thread turns the prefix cache's running totals into counter increments."""
    from serve.app import Generator
    from serve.metrics import GeneratorMetrics
    from tests.serve.test_metrics import Recorder

    class Engine:
        adapters, num_waiting, num_running = None, 0, 1
        stats = {"hit_tokens": 64, "lookup_tokens": 100}

        def prefix_cache_stats(self) -> dict:
            return dict(self.stats)

    gen = object.__new__(Generator.func_or_class)
    gen.model_id, gen.engine, gen._adapter_counts, gen._prefix_counts = "tiny", Engine(), {}, (0, 0)
    gen.metrics = GeneratorMetrics(queue=Recorder(), batch=Recorder(), prefix_hits=Recorder(),
                                   prefix_lookups=Recorder())
    gen.sample_engines()
    gen.sample_engines()  # nothing new: nothing more counted
    Engine.stats = {"hit_tokens": 96, "lookup_tokens": 150}
    gen.sample_engines()
    assert gen.metrics.prefix_hits.calls == [("inc", 64, {"model": "tiny"}), ("inc", 32, {"model": "tiny"})]
    assert gen.metrics.prefix_lookups.calls == [("inc", 100, {"model": "tiny"}), ("inc", 50, {"model": "tiny"})]



def test_generator_threads_default_to_the_cpus_the_process_may_use():
    import os

    from serve.app import generator_threads

    assert generator_threads(None) == len(os.sched_getaffinity(0))
    assert generator_threads(3) == 3
