"""A storage with a small index and a LoRA adapter, and one real Serve app on 127.0.0.1 per module."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import SHARED_DATA, TINY_TEXT

API_KEY = "test-key"
# LoRA slots of the test app's generator: few, so that a test can make it evict.
MAX_ADAPTERS = 2
SQUAD = SHARED_DATA / "squad_notre_dame.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_documents() -> list[dict]:
    return [{"id": f"tiny:{i}", "text": line, "source": "tiny"} for i, line in enumerate(TINY_TEXT.splitlines()[:4])]


def build_test_index(storage: Path, name: str) -> None:
    """The SQuAD Notre Dame paragraphs when ../shared/data has them, else a few sentences."""
    from jobs.data import read_squad
    from ops.retrieval import DEFAULT_EMBEDDER, RetrievalStore, chunk_documents, embed, load_embedder

    docs = read_squad(SQUAD)[0] if SQUAD.is_file() else tiny_documents()
    chunks = chunk_documents(docs, 1000, 100)
    embedder = load_embedder()
    store = RetrievalStore.build(chunks, embed(embedder, [c["text"] for c in chunks]), embedder_name=DEFAULT_EMBEDDER)
    store.save(storage / "indexes" / name)


def save_tiny_adapter(model_dir: Path, out: Path) -> None:
    """A PEFT LoRA adapter on the tiny model, registered like the training job registers one."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
    peft_model.save_pretrained(out)
    (out / "manifest.json").write_text(json.dumps({"kind": "adapter", "base_model": str(model_dir)}))


@pytest.fixture(scope="session")
def serve_storage(tmp_path_factory, tiny_model_dir) -> Path:
    storage = tmp_path_factory.mktemp("serve-storage")
    build_test_index(storage, "test")
    save_tiny_adapter(tiny_model_dir, storage / "adapters" / "tiny-lora")
    return storage


def wait_ready(base_url: str, deadline_s: float = 180.0) -> None:
    end = time.monotonic() + deadline_s
    while True:
        try:
            if httpx.get(f"{base_url}/healthz", timeout=10).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > end:
            raise TimeoutError(f"{base_url}/healthz not ready after {deadline_s}s")
        time.sleep(1)


@pytest.fixture(scope="module")
def rag_app(ray_local, serve_storage, tiny_model_dir):
    """The app with the tiny generator and an API key on the shared in-process cluster; yields its
    base URL. Serve is always shut down (the cluster stays for the next Ray test)."""
    from ray import serve

    from serve.app import build_app

    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_app({"storage": str(serve_storage), "model": str(tiny_model_dir), "model_id": "tiny",
                         "index": "test", "api_key": API_KEY, "max_seq_len": 512, "request_timeout_s": 30,
                         "num_threads": 1, "max_adapters": MAX_ADAPTERS,
                         # Compiling costs a minute on 2 CPUs; the compiled decode is tested in tests/ops.
                         "compile": False})
        serve.run(app, name="rag", route_prefix="/", blocking=False)
        base_url = f"http://127.0.0.1:{port}"
        wait_ready(base_url)
        yield base_url
    finally:
        serve.shutdown()
