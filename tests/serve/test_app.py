"""The RAG app on a real Ray Serve at 127.0.0.1 with the tiny generator (integration): its routes
through httpx and the official `openai` client, request ids and metrics. One app serves the module."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import time
import uuid

import httpx
import openai
import pytest
import yaml

from serve.schemas import DEFAULT_RAG_BEAMS, DEFAULT_SUPPORT_WEIGHT
from tests.serve.conftest import API_KEY, MAX_ADAPTERS, SQUAD, greedy_reference, rag_reference

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
    assert health["engine_compiled"] is False and health["engine_compiling"] is False  # the fixture: compile off
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


def test_rag_answer_is_copied_from_its_sources_unless_extractive_is_off(rag_app, tiny_model_dir):
    from ops.extractive import normalize

    question = "Where is the Grotto?"
    answers = {}
    # extractive by default with a beam of DEFAULT_RAG_BEAMS ranking its answers by their support
    # (support_weight 0: by likelihood); beams=1 is greedy; free generation is greedy
    for extractive, beams, weight in ((True, None, None), (True, None, 0.0), (True, 1, None), (False, None, None)):
        r = post(rag_app, "/v1/rag", {"question": question, "max_tokens": 6, "extractive": extractive,
                                      **({"beams": beams} if beams else {}),
                                      **({"support_weight": weight} if weight is not None else {})})
        assert r.status_code == 200, r.text
        body = answers[extractive, beams, weight] = r.json()
        want = rag_reference(tiny_model_dir, question, body["sources"], 6, MAX_SEQ_LEN, extractive=extractive,
                             beams=beams, support_weight=weight)
        assert body["answer"] == want["text"] and body["usage"]["completion_tokens"] == want["completion_tokens"]
        assert body["beams"] == (beams or (DEFAULT_RAG_BEAMS if extractive else 1))
        ranked = extractive and beams is None and weight is None
        assert body["support_weight"] == (DEFAULT_SUPPORT_WEIGHT if ranked else 0.0)
    for key in ((True, None, None), (True, 1, None)):
        copied = normalize(answers[key]["answer"]).strip()
        assert copied and any(f" {copied}" in f" {normalize(s['text'])}" for s in answers[key]["sources"]), copied
    assert answers[True, None, None]["answer"] != answers[False, None, None]["answer"]  # the random tiny model strays when free


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
    assert body["read_k"] == len(body["sources"]) == 4  # not fine-tuned for RAG: reads all it is given


def test_rag_tuned_adapter_reads_as_many_passages_as_in_training(rag_app, tiny_model_dir, serve_storage):
    """An adapter whose saved jobs.train config is task=rag_qa, qa.passages 2 answers from the first 2 of
    the 4 retrieved passages (all 4 are returned as sources), unless the request says read_k."""
    adapter = serve_storage / "adapters" / "tiny-rag-lora"
    shutil.copytree(serve_storage / "adapters" / "tiny-lora", adapter)
    try:
        (adapter / "config.yaml").write_text(yaml.safe_dump({"task": "rag_qa", "qa": {"passages": 2}}))
        question = "Who jumps over the lazy dog?"
        for extra, read in (({}, 2), ({"read_k": 3}, 3)):
            r = post(rag_app, "/v1/rag", {"question": question, "max_tokens": 6, "adapter": "tiny-rag-lora", **extra})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["read_k"] == read and len(body["sources"]) == 4
            want = rag_reference(tiny_model_dir, question, body["sources"][:read], 6, MAX_SEQ_LEN, adapter=adapter)
            assert body["answer"] == want["text"] and body["usage"]["prompt_tokens"] == want["prompt_tokens"]
            assert all(i < read for i in body["citations"])
    finally:
        shutil.rmtree(adapter)


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
    ("/v1/rag", {"question": "q", "beams": 0}, AUTH, 422),
    ("/v1/rag", {"question": "q", "beams": 9}, AUTH, 422),
    ("/v1/rag", {"question": "q", "beams": 2, "temperature": 0.7}, AUTH, 422),  # a beam search is greedy
    ("/v1/rag", {"question": "q", "support_weight": -1}, AUTH, 422),
    ("/v1/rag", {"question": "q", "support_weight": 101}, AUTH, 422),
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


# The OpenAI surface through the official `openai` client, and what an operator sees of that
# traffic: request ids in the headers and the logs, every raylm_* series on Ray's metrics endpoint.

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


# Last: it kills the generator replica the tests above share.
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
