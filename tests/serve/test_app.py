"""The RAG app on a real Ray Serve at 127.0.0.1 with the tiny generator (integration)."""

from __future__ import annotations

import json
import os
import random
import signal
import time

import httpx
import pytest

from tests.serve.conftest import API_KEY, SQUAD, greedy_reference, rag_reference

pytestmark = pytest.mark.integration
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_SEQ_LEN = 512  # the rag_app fixture's max_seq_len


def post(base: str, path: str, body=None, headers=AUTH, **kwargs) -> httpx.Response:
    return httpx.post(f"{base}{path}", json=body, headers=headers, timeout=60, **kwargs)


def test_openai_client_chat_with_and_without_stream(rag_app, tiny_model_dir, serve_storage):
    from openai import OpenAI

    client = OpenAI(base_url=f"{rag_app}/v1", api_key=API_KEY)
    assert {m.id for m in client.models.list().data} == {"tiny", "tiny-lora"}
    messages = [{"role": "user", "content": "The quick brown fox"}]
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
    want = greedy_reference(tiny_model_dir, 8, messages=messages)
    assert reply.choices[0].message.content == want["text"]
    assert reply.choices[0].finish_reason == want["finish_reason"]
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (want["prompt_tokens"],
                                                                         want["completion_tokens"])
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0,
                                                 stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == reply.choices[0].message.content  # greedy: same text either way
    assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason
    adapted = client.chat.completions.create(model="tiny-lora", messages=messages, max_tokens=8, temperature=0)
    want_adapted = greedy_reference(tiny_model_dir, 8, messages=messages, adapter=serve_storage / "adapters" /
                                    "tiny-lora")
    assert want_adapted["text"] != want["text"]  # so the comparison below tells the adapter from the base
    assert adapted.model == "tiny-lora" and adapted.choices[0].message.content == want_adapted["text"]


def test_completions_with_and_without_stream_answer_what_transformers_does(rag_app, tiny_model_dir):
    from openai import OpenAI

    client = OpenAI(base_url=f"{rag_app}/v1", api_key=API_KEY)
    prompt = "To be, or not"
    want = greedy_reference(tiny_model_dir, 6, prompt=prompt)
    text = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0)
    assert text.object == "text_completion" and text.choices[0].text == want["text"]
    assert (text.usage.prompt_tokens, text.usage.completion_tokens) == (want["prompt_tokens"],
                                                                       want["completion_tokens"])
    chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    *text_chunks, usage_chunk = chunks  # OpenAI sends usage as one last chunk without choices, when asked
    assert all(c.object == "text_completion" and c.id == chunks[0].id for c in chunks)
    assert "".join(c.choices[0].text for c in text_chunks) == want["text"]
    assert [c.choices[0].finish_reason for c in text_chunks] == [None] * (len(text_chunks) - 1) + [want["finish_reason"]]
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == want["completion_tokens"]


def test_healthz_names_attention_and_op_path(rag_app):
    health = httpx.get(f"{rag_app}/healthz", timeout=30).json()
    assert health["status"] == "ok" and health["attention"] in ("sdpa", "eager", "flash_attention_2")
    assert health["op_path"] and health["engine_backend"] in ("llama", "hf") and health["index_chunks"] > 0
    assert health["engine_compiled"] is False  # the fixture turns compile off
    assert "/v1/rag" in httpx.get(f"{rag_app}/openapi.json", timeout=30).json()["paths"]


def test_rag_stream_sends_sources_then_text_then_done(rag_app, tiny_model_dir):
    question = "What is the university's patron saint?"
    with httpx.stream("POST", f"{rag_app}/v1/rag", json={"question": question, "max_tokens": 6, "stream": True},
                      headers=AUTH, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    first, *texts, last = [json.loads(e) for e in events[:-1]]
    assert len(first["sources"]) == 4 and all(set(t) == {"text"} for t in texts)
    want = rag_reference(tiny_model_dir, question, first["sources"], 6, MAX_SEQ_LEN)
    assert last["answer"] == "".join(t["text"] for t in texts) == want["text"]
    assert last["finish_reason"] == want["finish_reason"]
    assert last["usage"]["completion_tokens"] == want["completion_tokens"]
    assert last["sources"] == first["sources"] and last["model"] == "tiny"


def test_rag_with_an_adapter_answers_with_the_adapter(rag_app, tiny_model_dir, serve_storage):
    question = "Who jumps over the lazy dog?"
    r = post(rag_app, "/v1/rag", {"question": question, "max_tokens": 6, "adapter": "tiny-lora"})
    assert r.status_code == 200, r.text
    body = r.json()
    adapter = serve_storage / "adapters" / "tiny-lora"
    want = rag_reference(tiny_model_dir, question, body["sources"], 6, MAX_SEQ_LEN, adapter=adapter)
    base = rag_reference(tiny_model_dir, question, body["sources"], 6, MAX_SEQ_LEN)
    assert want["text"] != base["text"]  # so the comparison below tells the adapter from the base
    assert body["model"] == "tiny-lora" and body["answer"] == want["text"]
    assert body["usage"]["completion_tokens"] == want["completion_tokens"]
    assert "tiny-lora" in httpx.get(f"{rag_app}/healthz", timeout=30).json()["adapters_loaded"]


def test_rag_recall_at_5_on_squad_notre_dame(rag_app):
    if not SQUAD.is_file():
        pytest.skip(f"{SQUAD} is absent (shared data only exists beside the checkout)")
    from ops.datasets import read_squad

    questions = random.Random(0).sample(read_squad(SQUAD)[1], 30)
    found = 0
    for q in questions:
        r = post(rag_app, "/v1/rag", {"question": q["question"], "top_k": 5, "max_tokens": 1})
        assert r.status_code == 200, r.text
        found += q["doc_id"] in {s["doc_id"] for s in r.json()["sources"]}
    assert found / len(questions) >= 0.8, f"recall@5 = {found}/{len(questions)}"


BAD_INPUTS = [
    ("/v1/rag", {"question": ""}, AUTH, 422),
    ("/v1/rag", {"question": "   "}, AUTH, 422),
    ("/v1/rag", {"question": "x" * 1_000_000}, AUTH, 413),
    ("/v1/rag", {"question": 5}, AUTH, 422),
    ("/v1/rag", {"question": "q", "top_k": "five"}, AUTH, 422),
    ("/v1/rag", {"question": ["q"]}, AUTH, 422),
    ("/v1/rag", {"question": "q", "stream": {"a": 1}}, AUTH, 422),
    ("/v1/rag", {"question": "q", "adapter": "nope"}, AUTH, 404),
    ("/v1/rag", {"question": "q", "adapter": "../../etc/passwd"}, AUTH, 422),
    ("/v1/rag", {"question": "q", "max_tokens": -1}, AUTH, 422),
    ("/v1/rag", {"question": "q", "max_tokens": 10**9}, AUTH, 422),
    ("/v1/rag", {"question": "q", "top_k": 0}, AUTH, 422),
    ("/v1/rag", {"question": "q", "top_k": 10000}, AUTH, 422),
    ("/v1/rag", {"question": "q", "temperature": -1}, AUTH, 422),
    ("/v1/rag", {"question": "q", "nonsense": 1}, AUTH, 422),
    ("/v1/rag", None, AUTH, 422),
    ("/v1/rag", {"question": "q"}, {}, 401),
    ("/v1/rag", {"question": "q"}, {"Authorization": "Bearer wrong"}, 401),
    ("/v1/rag", {"question": "q"}, {"Authorization": API_KEY}, 401),
    ("/v1/chat/completions", {"messages": []}, AUTH, 422),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, AUTH, 422),
    ("/v1/chat/completions", {"model": "../../etc/passwd", "messages": [{"role": "user", "content": "x"}]}, AUTH, 422),
    ("/v1/chat/completions", {"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}, AUTH, 404),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, AUTH, 422),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 3}, AUTH, 400),  # unsupported
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "rag": {"top_k": 10000}}, AUTH, 422),
    # Longer than the tiny model's 512-token context: the engine refuses it, the app answers 422.
    ("/v1/completions", {"prompt": "word " * 3000, "max_tokens": 8}, AUTH, 422),
    ("/v1/completions", {"prompt": "x", "stop": [""]}, AUTH, 422),
]


@pytest.mark.parametrize("path, body, headers, status", BAD_INPUTS,
                         ids=[f"{i}-{p.rsplit('/', 1)[-1]}-{s}" for i, (p, _, _, s) in enumerate(BAD_INPUTS)])
def test_bad_input_gets_a_4xx_with_a_message(rag_app, path, body, headers, status):
    r = post(rag_app, path, body, headers=headers)
    assert r.status_code == status, r.text
    assert r.json()["error"]["message"]


def test_invalid_json_is_422_and_app_keeps_serving(rag_app):
    r = httpx.post(f"{rag_app}/v1/rag", content=b'{"question": "q",', headers={**AUTH, "Content-Type":
                   "application/json"}, timeout=30)
    assert r.status_code == 422 and "JSON" in r.json()["error"]["message"]
    good = post(rag_app, "/v1/rag", {"question": "Where is Notre Dame?", "max_tokens": 4})
    assert good.status_code == 200 and good.json()["sources"]


def test_killed_generator_replica_is_replaced(rag_app, tiny_model_dir):
    """SIGKILL the generator's process while a request streams from it: that request ends with a
    503 error event (never a 500), Serve starts a new replica and requests succeed again."""
    pid = httpx.get(f"{rag_app}/healthz", timeout=30).json()["generator_pid"]
    messages = [{"role": "user", "content": "hi"}]
    # The tiny model never says EOS here, so the request is still decoding when the kill lands.
    assert greedy_reference(tiny_model_dir, 480, messages=messages)["finish_reason"] == "length"
    body = {"messages": messages, "max_tokens": 480, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{rag_app}/v1/chat/completions", json=body, headers=AUTH, timeout=120) as r:
        assert r.status_code == 200
        events = (json.loads(line[len("data: "):]) for line in r.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]")
        for event in events:
            if event["choices"][0]["delta"].get("content"):
                break  # a generated token arrived: the request is in flight on that replica
        os.kill(pid, signal.SIGKILL)
        rest = list(events)
    assert rest and rest[-1]["error"]["code"] == "overloaded", rest[-3:]
    assert rest[-1]["error"]["type"] == "server_error"
    assert rest[-1]["error"]["message"].startswith("replica unavailable")
    assert not any(e.get("choices", [{}])[0].get("finish_reason") for e in rest[:-1])  # it did not finish
    deadline = time.monotonic() + 180
    while True:
        r = post(rag_app, "/v1/chat/completions", {"messages": messages, "max_tokens": 4, "temperature": 0})
        if r.status_code == 200:
            break
        assert r.status_code == 503, r.text
        assert time.monotonic() < deadline, "generator was not replaced within 180 s"
        time.sleep(1)  # poll interval while Serve starts the replacement
    assert r.json()["choices"][0]["message"]["content"] == greedy_reference(tiny_model_dir, 4,
                                                                            messages=messages)["text"]
    assert httpx.get(f"{rag_app}/healthz", timeout=30).json()["generator_pid"] != pid
