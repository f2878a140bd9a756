"""The OpenAI surface of the real app (tests/serve/conftest.py's `rag_app`) through the official
`openai` client, and what an operator sees of that traffic: request ids in the headers and the
logs, and every raylm_* series on Ray's metrics endpoint. One app serves the whole module."""

from __future__ import annotations

import re
import shutil
import time
import uuid

import httpx
import openai
import pytest

from tests.serve.conftest import API_KEY, MAX_ADAPTERS

pytestmark = pytest.mark.integration
USER = [{"role": "user", "content": "The quick brown fox"}]
GREEDY = {"model": "tiny", "max_tokens": 6, "temperature": 0}


@pytest.fixture(scope="module")
def client(rag_app) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{rag_app}/v1", api_key=API_KEY, max_retries=0, timeout=60)


def test_chat_with_and_without_stream_and_usage_chunk(client):
    reply = client.chat.completions.create(messages=USER, **GREEDY)
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens >= 1
    plain = list(client.chat.completions.create(messages=USER, stream=True, **GREEDY))
    assert all(c.usage is None for c in plain) and all(c.choices for c in plain)
    assert "".join(c.choices[0].delta.content or "" for c in plain) == reply.choices[0].message.content
    assert plain[-1].choices[0].finish_reason == reply.choices[0].finish_reason
    counted = list(client.chat.completions.create(messages=USER, stream=True,
                                                  stream_options={"include_usage": True}, **GREEDY))
    assert counted[-1].choices == [] and counted[-1].usage.model_dump() == reply.usage.model_dump()
    assert all(c.usage is None for c in counted[:-1])


def test_completions_with_and_without_stream_and_usage_chunk(client):
    reply = client.completions.create(prompt="To be, or not", **GREEDY)
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.prompt_tokens > 0
    chunks = list(client.completions.create(prompt="To be, or not", stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == reply.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == reply.usage.model_dump()
    assert chunks[-2].choices[0].finish_reason == reply.choices[0].finish_reason


def test_text_content_parts_and_developer_role_mean_the_same_as_plain_text_and_system(client):
    def answer(messages: list[dict]) -> str:
        return client.chat.completions.create(messages=messages, **GREEDY).choices[0].message.content

    plain = answer([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The quick\nbrown fox"}])
    parts = answer([{"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
                    {"role": "user", "content": [{"type": "text", "text": "The quick"},
                                                 {"type": "text", "text": "brown fox"}]}])
    assert parts == plain  # greedy: the same prompt gives the same tokens


CHAT_UNSUPPORTED = [
    ({"n": 2}, "n"), ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"), ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"logprobs": True}, "logprobs"), ({"logprobs": True, "top_logprobs": 2}, "logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
]


@pytest.mark.parametrize("extra, param", CHAT_UNSUPPORTED, ids=[str(e) for e, _ in CHAT_UNSUPPORTED])
def test_unsupported_chat_parameters_are_400_naming_them(client, extra, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(messages=USER, **GREEDY, **extra)
    assert err.value.status_code == 400 and err.value.param == param and err.value.code == "unsupported_parameter"
    assert f"unsupported parameter '{param}'" in err.value.message


@pytest.mark.parametrize("extra, param", [({"n": 3}, "n"), ({"logprobs": 1}, "logprobs"), ({"echo": True}, "echo")])
def test_unsupported_completion_parameters_are_400_naming_them(client, extra, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(prompt="x", **GREEDY, **extra)
    assert err.value.param == param and f"unsupported parameter '{param}'" in err.value.message


def test_wrong_key_is_authentication_error_and_unknown_model_not_found(rag_app, client):
    bad = openai.OpenAI(base_url=f"{rag_app}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        bad.chat.completions.create(messages=USER, **GREEDY)
    assert err.value.code == "invalid_api_key" and err.value.type == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(messages=USER, **{**GREEDY, "model": "gpt-9"})
    assert err.value.code == "model_not_found" and err.value.param == "model" and "gpt-9" in err.value.message


def test_request_id_is_echoed_or_made_and_tags_the_log_lines(rag_app, client, capfd):
    rid = f"test-{uuid.uuid4().hex}"
    raw = client.chat.completions.with_raw_response.create(messages=USER, extra_headers={"X-Request-Id": rid},
                                                           **GREEDY)
    assert raw.headers.get_list("x-request-id") == [rid] and raw.parse()._request_id == rid
    made = client.chat.completions.with_raw_response.create(messages=USER, **GREEDY)
    assert len(made.headers.get_list("x-request-id")) == 1 and made.headers["x-request-id"] not in ("", rid)
    refused = httpx.post(f"{rag_app}/v1/chat/completions", json={"model": "gpt-9", "messages": USER},
                         headers={"Authorization": f"Bearer {API_KEY}", "X-Request-Id": rid}, timeout=30)
    assert refused.status_code == 404 and refused.headers["x-request-id"] == rid
    # The replicas' log lines reach this driver (init_ray sets log_to_driver) a moment later.
    seen, deadline = "", time.monotonic() + 60
    while True:
        seen += capfd.readouterr().err
        lines = [line for line in seen.splitlines() if rid in line]
        if (any("refused POST /v1/chat/completions: 404 model_not_found" in line for line in lines)
                and any("rag_Generator" in line for line in lines)):  # the id follows the call to the Generator
            break
        assert time.monotonic() < deadline, f"no refusal and Generator line logged under {rid}: {lines}"
        time.sleep(1)


def _scrape(port: int) -> str:
    return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text


def test_every_raylm_series_is_exported_after_traffic(rag_app, client, serve_storage):
    """Traffic that touches every metric, then poll Ray's metrics endpoint until each series shows."""
    import ray

    # More adapters than a replica keeps, so that loading the last one evicts the first.
    extra = [f"tiny-lora-{i}" for i in range(MAX_ADAPTERS)]
    for name in extra:
        shutil.copytree(serve_storage / "adapters" / "tiny-lora", serve_storage / "adapters" / name)
    try:
        for model in ["tiny-lora", *extra]:
            client.chat.completions.create(messages=USER, **{**GREEDY, "model": model})
        # /v1/rag trims the passages to the tiny model's 512-token context; the OpenAI `rag` extension does not.
        rag = httpx.post(f"{rag_app}/v1/rag", json={"question": "Where is Notre Dame?", "max_tokens": 2},
                         headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
        assert rag.status_code == 200, rag.text
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(messages=USER, n=2, **GREEDY)
    finally:
        for name in extra:  # the storage is shared by the session: leave it as it was
            shutil.rmtree(serve_storage / "adapters" / name)
    port = ray.nodes()[0]["MetricsExportPort"]
    wanted = [
        r'ray_raylm_requests_total\{[^}]*route="/v1/chat/completions"[^}]*status="200"[^}]*\} [1-9]',
        r'ray_raylm_requests_total\{[^}]*route="/v1/chat/completions"[^}]*status="400"[^}]*\} [1-9]',
        r'ray_raylm_retrieval_latency_seconds_count\{[^}]*\} [1-9]',
        r'ray_raylm_time_to_first_token_seconds_count\{[^}]*model="tiny"[^}]*\} [1-9]',
        r'ray_raylm_time_per_output_token_seconds_count\{[^}]*model="tiny-lora"[^}]*\} [1-9]',
        r'ray_raylm_generated_tokens_total\{[^}]*model="tiny"[^}]*\} [1-9]',
        r'ray_raylm_queue_depth\{[^}]*model="tiny"[^}]*\} 0',
        r'ray_raylm_running_batch_size\{[^}]*model="tiny"[^}]*\} 0',
        r'ray_raylm_adapter_loads_total\{[^}]*adapter="tiny-lora"[^}]*\} [1-9]',
        r'ray_raylm_adapter_evictions_total\{[^}]*adapter="tiny-lora"[^}]*\} [1-9]',
    ]
    deadline = time.monotonic() + 60
    while True:
        text = _scrape(port)
        missing = [w for w in wanted if not re.search(w, text)]
        if not missing:
            break
        shown = "\n".join(line for line in text.splitlines() if "raylm" in line and not line.startswith("#"))
        assert time.monotonic() < deadline, f"missing after 60 s: {missing}\nraylm lines:\n{shown}"
        time.sleep(1)
    assert re.search(r'ray_raylm_requests_total\{[^}]*deployment="Ingress"', text)  # Serve's own tags
