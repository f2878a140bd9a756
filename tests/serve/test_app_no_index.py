"""The app built with ``index: null`` (no Retriever deployment) on a real Ray Serve at 127.0.0.1
(integration): /v1/rag refuses with a 4xx that says why, chat still answers. A second app on the
same Serve instance has a tiny ``request_timeout_s``, so a long generation gets a 504 over HTTP."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.serve.conftest import free_port, greedy_reference, wait_ready

pytestmark = pytest.mark.integration
HURRIED_TIMEOUT_S = 0.05
# 480 tokens take the tiny model ~0.4 s on one thread (8x HURRIED_TIMEOUT_S) before any Serve overhead.
LONG_TOKENS = 480


@pytest.fixture(scope="module")
def no_index_app(ray_local, tmp_path_factory, tiny_model_dir):
    """Two apps without an index: "plain" at / and "hurried" (request_timeout_s=0.05) at /hurried, on
    the shared in-process cluster. Yields their base URLs; Serve is always shut down."""
    from ray import serve

    from serve.app import build_app

    storage = tmp_path_factory.mktemp("no-index-storage")
    args = {"storage": str(storage), "model": str(tiny_model_dir), "model_id": "tiny", "index": None,
            "max_seq_len": 512, "num_threads": 1, "compile": False,
            "quantization": "none"}  # compiled decode: tested in tests/ops
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({**args, "request_timeout_s": 30}), name="plain", route_prefix="/", blocking=False)
        serve.run(build_app({**args, "request_timeout_s": HURRIED_TIMEOUT_S}), name="hurried",
                  route_prefix="/hurried", blocking=False)
        base = f"http://127.0.0.1:{port}"
        wait_ready(base)
        wait_routed(f"{base}/hurried/v1/models")  # its /healthz would itself time out
        yield base
    finally:
        serve.shutdown()


def wait_routed(url: str, deadline_s: float = 60.0) -> None:
    """Until the proxy routes ``url`` (200), not 404 for a route it does not know yet."""
    end = time.monotonic() + deadline_s
    while httpx.get(url, timeout=10).status_code != 200:
        assert time.monotonic() < end, f"{url} not routed after {deadline_s}s"
        time.sleep(0.5)  # poll interval


def test_rag_without_an_index_is_a_400_that_names_the_setting(no_index_app):
    r = httpx.post(f"{no_index_app}/v1/rag", json={"question": "Where is Notre Dame?", "max_tokens": 4}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"] == ("this app serves no index (args.index is null); use "
                                            "/v1/chat/completions")
    assert r.json()["error"]["param"] == "rag"
    # The chat endpoint's `rag` extension needs the index too.
    r = httpx.post(f"{no_index_app}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                   "rag": {"top_k": 2}, "max_tokens": 4}, timeout=60)
    assert r.status_code == 400 and "serves no index" in r.json()["error"]["message"]


def test_chat_and_health_work_without_an_index(no_index_app, tiny_model_dir):
    messages = [{"role": "user", "content": "The quick brown fox"}]
    r = httpx.post(f"{no_index_app}/v1/chat/completions", json={"messages": messages, "max_tokens": 6,
                                                                  "temperature": 0}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    want = greedy_reference(tiny_model_dir, 6, messages=messages)
    assert body["choices"][0]["message"]["content"] == want["text"] and body["sources"] is None
    assert body["usage"]["completion_tokens"] == want["completion_tokens"]
    health = httpx.get(f"{no_index_app}/healthz", timeout=30).json()
    assert health["status"] == "ok" and health["index"] is None and health["index_chunks"] is None


def test_a_generation_longer_than_request_timeout_s_is_a_504(no_index_app, tiny_model_dir):
    prompt = "The quick brown fox"
    # Without EOS the request must decode all LONG_TOKENS, which cannot fit in the timeout.
    assert greedy_reference(tiny_model_dir, LONG_TOKENS, prompt=prompt)["finish_reason"] == "length"
    r = httpx.post(f"{no_index_app}/hurried/v1/completions", json={"prompt": prompt, "max_tokens": LONG_TOKENS,
                   "temperature": 0}, timeout=60)
    assert r.status_code == 504, r.text
    assert r.json()["error"] == {"message": f"request took longer than request_timeout_s={HURRIED_TIMEOUT_S}",
                                 "type": "server_error", "param": None, "code": "timeout"}
