"""The ingress router without Ray: the real FastAPI app around a stand-in for the deployments,
called through the official `openai` client (its typed errors are what a user's code sees)."""

from __future__ import annotations

import json
from typing import Any, AsyncIterator

import openai
import pytest
from fastapi.testclient import TestClient

from serve.api import make_api
from serve.app import AppArgs
from serve.errors import ApiError

KEY = "unit-key"
COMPLETION = {"text": " world", "finish_reason": "length", "prompt_tokens": 5, "completion_tokens": 2,
              "time_to_first_token_s": 0.01, "latency_s": 0.02, "tokens_per_s": 100.0}


class Recorder:
    """Stands in for a ray.serve.metrics object: keeps what was recorded."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, dict]] = []

    def inc(self, value: float = 1.0, tags: dict | None = None) -> None:
        self.calls.append((value, dict(tags or {})))

    observe = inc


class FakeIngress:
    """The part of serve.app.Ingress the router calls; generation answers from a script of events."""

    def __init__(self, events: list[dict] | None = None, passages_read: int | None = None):
        self.args = AppArgs(model_id="tiny", index=None, api_key=KEY)
        self.trained_passages = passages_read
        self.created = 0
        self.metrics = type("M", (), {"requests": Recorder(), "retrieval": Recorder()})()
        self.events = events or [{"text": " wor"}, {"text": "ld", "completion": COMPLETION}]
        self.payloads: list[dict] = []

    def resolve_model(self, model: str | None, param: str = "model") -> str:
        if model in (None, "tiny"):
            return ""
        raise ApiError(404, f"model '{model}' is not registered", param, code="model_not_found")

    def model_cards(self) -> list[dict]:
        return [{"id": "tiny", "created": 0, "owned_by": "raylm"}]

    def passages_read(self, adapter: str) -> int | None:
        return self.trained_passages

    async def retrieve(self, question: str, top_k: int, deadline: float) -> list[dict]:
        return [{"id": f"d{i}#0", "doc_id": f"d{i}", "score": 1 / (i + 1), "text": f"passage {i} about {question}",
                 "source": "s"} for i in range(top_k)]

    async def generate(self, adapter: str, payload: dict, deadline: float) -> dict:
        self.payloads.append(payload)
        return COMPLETION

    async def stream(self, adapter: str, payload: dict, deadline: float) -> AsyncIterator[dict]:
        self.payloads.append(payload)

        async def events() -> AsyncIterator[dict]:
            for event in self.events:
                yield event

        return events()


def client_for(ingress: FakeIngress, key: str = KEY) -> openai.OpenAI:
    http = TestClient(make_api(ingress), raise_server_exceptions=False)  # type: ignore[arg-type]
    return openai.OpenAI(base_url="http://testserver/v1", api_key=key, http_client=http, max_retries=0)


USER = [{"role": "user", "content": "hello"}]


def test_wrong_key_is_openai_authentication_error():
    with pytest.raises(openai.AuthenticationError) as err:
        client_for(FakeIngress(), key="wrong").chat.completions.create(model="tiny", messages=USER)
    assert err.value.status_code == 401
    assert err.value.body == {"message": "missing or wrong API key: send 'Authorization: Bearer <key>'",
                              "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}


UNSUPPORTED = [
    ({"n": 2}, "n"), ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"tool_choice": "auto"}, "tool_choice"), ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"logprobs": True}, "logprobs"), ({"top_logprobs": 3}, "top_logprobs"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
]


@pytest.mark.parametrize("extra, param", UNSUPPORTED, ids=[p for _, p in UNSUPPORTED])
def test_unsupported_chat_parameter_is_400_naming_it(extra, param):
    ingress = FakeIngress()
    with pytest.raises(openai.BadRequestError) as err:
        client_for(ingress).chat.completions.create(model="tiny", messages=USER, **extra)
    assert err.value.body["param"] == param and err.value.body["code"] == "unsupported_parameter"
    assert err.value.body["message"].startswith(f"unsupported parameter '{param}'")
    assert ingress.payloads == []  # refused before anything was generated


def test_accepted_neutral_values_of_unsupported_parameters():
    reply = client_for(FakeIngress()).chat.completions.create(
        model="tiny", messages=USER, n=1, tool_choice="none", response_format={"type": "text"}, logprobs=False,
        presence_penalty=0, frequency_penalty=0)
    assert reply.choices[0].message.content == " world" and reply.choices[0].finish_reason == "length"


def test_unsupported_completion_parameters_and_image_part():
    client = client_for(FakeIngress())
    with pytest.raises(openai.BadRequestError, match="unsupported parameter 'echo'"):
        client.completions.create(model="tiny", prompt="x", echo=True)
    with pytest.raises(openai.BadRequestError, match="unsupported parameter 'logprobs'") as err:
        client.completions.create(model="tiny", prompt="x", logprobs=2)
    assert err.value.body["param"] == "logprobs"
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=image)
    assert err.value.body["param"] == "messages.0.content.0.type" and err.value.body["code"] == "unsupported_value"


def test_developer_role_and_text_parts_reach_the_engine_as_system_and_text():
    ingress = FakeIngress()
    client_for(ingress).chat.completions.create(model="tiny", messages=[
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]}])
    assert ingress.payloads[0]["messages"] == [{"role": "system", "content": "be brief"},
                                               {"role": "user", "content": "first\nsecond"}]


def test_stream_usage_chunk_only_with_include_usage():
    client = client_for(FakeIngress())
    plain = list(client.chat.completions.create(model="tiny", messages=USER, stream=True))
    assert [c.usage for c in plain] == [None] * len(plain) and plain[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].delta.content or "" for c in plain) == " world"
    counted = list(client.chat.completions.create(model="tiny", messages=USER, stream=True,
                                                  stream_options={"include_usage": True}))
    assert counted[-1].choices == [] and counted[-1].usage.total_tokens == 7
    assert counted[-2].choices[0].finish_reason == "length" and counted[-2].usage is None
    text = list(client.completions.create(model="tiny", prompt="hello", stream=True,
                                          stream_options={"include_usage": True}))
    assert text[-1].choices == [] and text[-1].usage.completion_tokens == 2
    assert "".join(c.choices[0].text for c in text if c.choices) == " world"


def test_stream_options_without_stream_is_400():
    with pytest.raises(openai.BadRequestError, match="only allowed when 'stream' is true"):
        client_for(FakeIngress()).chat.completions.create(model="tiny", messages=USER,
                                                          stream_options={"include_usage": True})


def test_error_mid_stream_is_an_openai_error_event():
    failure = ApiError(503, "generation was cut off", retry_after=1, code="cancelled").to_dict()
    ingress = FakeIngress(events=[{"text": " wor"}, {"error": failure}])
    chunks = []
    with pytest.raises(openai.APIError, match="generation was cut off") as err:
        for chunk in client_for(ingress).chat.completions.create(model="tiny", messages=USER, stream=True):
            chunks.append(chunk)
    assert err.value.body == {"message": "generation was cut off", "type": "server_error", "param": None,
                              "code": "cancelled"}
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == " wor"


def test_rag_stream_error_event_has_the_same_shape():
    failure = ApiError(504, "request took longer than request_timeout_s=60").to_dict()
    http = TestClient(make_api(FakeIngress(events=[{"error": failure}])))  # type: ignore[arg-type]
    with http.stream("POST", "/v1/rag", json={"question": "q", "stream": True},
                     headers={"Authorization": f"Bearer {KEY}"}) as r:
        events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert json.loads(events[1]) == {"error": {"message": "request took longer than request_timeout_s=60",
                                               "type": "server_error", "param": None, "code": "timeout"}}
    assert events[-1] == "[DONE]"


def test_unknown_model_is_not_found_and_missing_field_names_it():
    client = client_for(FakeIngress())
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-9", messages=USER)
    assert err.value.body["code"] == "model_not_found" and err.value.body["param"] == "model"
    missing = TestClient(make_api(FakeIngress())).post(  # type: ignore[arg-type]
        "/v1/chat/completions", json={"model": "tiny"}, headers={"Authorization": f"Bearer {KEY}"})
    assert missing.status_code == 422
    assert missing.json()["error"] == {"message": "messages: Field required", "type": "invalid_request_error",
                                       "param": "messages", "code": "missing_required_parameter"}


def test_unexpected_failure_is_a_500_server_error_body():
    class Broken(FakeIngress):
        async def generate(self, adapter: str, payload: dict, deadline: float) -> dict:
            raise KeyError("boom")

    with pytest.raises(openai.InternalServerError) as err:
        client_for(Broken()).chat.completions.create(model="tiny", messages=USER)
    assert err.value.body["type"] == "server_error" and err.value.body["code"] == "internal_error"


def test_requests_are_counted_by_route_and_status():
    ingress = FakeIngress()
    http = TestClient(make_api(ingress))  # type: ignore[arg-type]
    auth = {"Authorization": f"Bearer {KEY}"}
    http.post("/v1/chat/completions", json={"messages": USER}, headers=auth)
    http.post("/v1/chat/completions", json={"messages": USER})
    http.get("/healthz/../../etc/passwd")
    http.post("/v1/rag", json={"question": "q"}, headers=auth)
    assert [tags for _, tags in ingress.metrics.requests.calls] == [
        {"route": "/v1/chat/completions", "status": "200"}, {"route": "/v1/chat/completions", "status": "401"},
        {"route": "other", "status": "401"}, {"route": "/v1/rag", "status": "200"}]


def test_rag_extension_without_an_index_is_400():
    class NoIndex(FakeIngress):
        async def retrieve(self, question: str, top_k: int, deadline: float) -> list[dict[str, Any]]:
            raise ApiError(400, "this app serves no index (args.index is null); use /v1/chat/completions", "rag")

    with pytest.raises(openai.BadRequestError, match="serves no index"):
        client_for(NoIndex()).chat.completions.create(model="tiny", messages=USER, extra_body={"rag": {"top_k": 2}})


def test_rag_names_the_adapter_field_of_an_unknown_adapter():
    http = TestClient(make_api(FakeIngress()))  # type: ignore[arg-type]
    r = http.post("/v1/rag", json={"question": "q", "adapter": "nope"}, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "adapter"
    assert r.json()["error"]["code"] == "model_not_found"


@pytest.mark.parametrize("trained, body, read", [
    (None, {}, 4),                        # a model not fine-tuned for RAG reads every retrieved passage
    (3, {}, 3),                           # a RAG-tuned one as many as it read in training
    (3, {"top_k": 2}, 2),                 # never more than were retrieved
    (3, {"read_k": 4}, 4),                # the request decides when it says
    (None, {"top_k": 5, "read_k": 1}, 1),
])
def test_rag_reads_the_first_read_k_of_the_retrieved_passages(trained, body, read):
    ingress = FakeIngress(passages_read=trained)
    http = TestClient(make_api(ingress), raise_server_exceptions=False)  # type: ignore[arg-type]
    r = http.post("/v1/rag", json={"question": "q", **body}, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["read_k"] == read and len(out["sources"]) == body.get("top_k", 4)
    sent = ingress.payloads[-1]["rag"]["sources"]
    assert [s["id"] for s in sent] == [s["id"] for s in out["sources"][:read]]


def test_rag_read_k_above_top_k_is_422():
    ingress = FakeIngress()
    http = TestClient(make_api(ingress), raise_server_exceptions=False)  # type: ignore[arg-type]
    r = http.post("/v1/rag", json={"question": "q", "top_k": 2, "read_k": 3}, headers={"Authorization": f"Bearer {KEY}"})
    error = r.json()["error"]
    assert r.status_code == 422 and error["param"] == "read_k" and "read_k=3 is more than the top_k=2" in error["message"]
    assert ingress.payloads == []
