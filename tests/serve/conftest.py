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
    from ops.datasets import read_squad
    from ops.retrieval import DEFAULT_EMBEDDER, RetrievalStore, chunk_documents, embed, load_embedder

    docs = read_squad(SQUAD)[0] if SQUAD.is_file() else tiny_documents()
    chunks = chunk_documents(docs, 1000, 100)
    embedder = load_embedder()
    store = RetrievalStore.build(chunks, embed(embedder, [c["text"] for c in chunks]), embedder_name=DEFAULT_EMBEDDER)
    store.save(storage / "indexes" / name)


def save_tiny_adapter(model_dir: Path, out: Path) -> None:
    """A PEFT LoRA adapter on the tiny model, registered like the training job registers one."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    # Seeded and scaled up (alpha = 8 r): this adapter changes the tiny model's greedy answers, so
    # tests can tell it from the base.
    torch.manual_seed(1)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
    peft_model.save_pretrained(out)
    (out / "manifest.json").write_text(json.dumps({"kind": "adapter", "base_model": str(model_dir)}))


@pytest.fixture(scope="session")
def serve_storage(tmp_path_factory, tiny_model_dir) -> Path:
    storage = tmp_path_factory.mktemp("serve-storage")
    build_test_index(storage, "test")
    save_tiny_adapter(tiny_model_dir, storage / "adapters" / "tiny-lora")
    return storage


def greedy_reference(model_dir: Path, max_tokens: int, *, prompt: str | None = None,
                     messages: list[dict] | None = None, adapter: Path | None = None,
                     extract_from: list[str] | None = None, beams: int = 1, question: str | None = None,
                     support_weight: float = 0.0) -> dict:
    """What the app must answer at temperature 0, computed with plain transformers (the oracle of
    the HTTP tests): ``text``, ``prompt_tokens``, ``completion_tokens`` and ``finish_reason``.
    ``extract_from``: the answer is kept a span of these passages by ``ops.extractive``, applied
    as a transformers logits processor. ``beams`` > 1: beam search (`tests.references.beam_search`)
    instead of greedy decoding, its final answers ranked with ``support_weight`` x their support by
    ``question`` (``SpanConstraint.rank``)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessorList

    from ops.extractive import SpanConstraint

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter)).eval()
    if messages is not None:
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    else:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
    processors = LogitsProcessorList()
    eos: set[int] = set()
    for source in (model.generation_config, model.config, tok):  # as ops.engine.Engine._eos_ids
        e = getattr(source, "eos_token_id", None)
        eos.update([] if e is None else [e] if isinstance(e, int) else e)
    constraint = (SpanConstraint(extract_from, tok, eos, question=question, support_weight=support_weight)
                  if extract_from is not None else None)
    if beams > 1:
        from tests.references import beam_search

        tokens = beam_search(model, ids[0].tolist(), beams, max_tokens, eos, constraint)
    else:
        tokens = _greedy_tokens(model, tok, ids, max_tokens, constraint, processors)
    stopped = tokens[-1] in eos
    return {"text": tok.decode(tokens[:-1] if stopped else tokens, skip_special_tokens=True),
            "prompt_tokens": ids.shape[1], "completion_tokens": len(tokens),
            "finish_reason": "stop" if stopped else "length"}


def _greedy_tokens(model, tok, ids, max_tokens: int, constraint, processors) -> list[int]:
    """transformers' greedy tokens after ``ids``, up to and including the first EOS."""
    import torch

    if constraint is not None:

        def extractive(input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            scores[0] = constraint.mask(scores[0], input_ids[0, ids.shape[1]:].tolist(), first_only=True)
            return scores

        processors.append(extractive)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                             do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id,
                             logits_processor=processors)
    tokens = out[0, ids.shape[1]:].tolist()
    if tok.eos_token_id in tokens:
        tokens = tokens[: tokens.index(tok.eos_token_id) + 1]
    return tokens


def rag_reference(model_dir: Path, question: str, sources: list[dict], max_tokens: int, max_seq_len: int,
                  adapter: Path | None = None, extractive: bool = True, beams: int | None = None,
                  support_weight: float | None = None) -> dict:
    """:func:`greedy_reference` for a /v1/rag answer: the app's prompt from ``question`` and the
    ``sources`` it returned, trimmed to the same token budget; ``extractive``, ``beams`` and
    ``support_weight`` as the request's (None: the endpoint's defaults, a beam for extractive answers
    that ranks its answers by their support)."""
    from transformers import AutoTokenizer

    from serve.app import DEFAULT_SYSTEM_PROMPT, rag_messages
    from serve.schemas import DEFAULT_RAG_BEAMS, DEFAULT_SUPPORT_WEIGHT

    tok = AutoTokenizer.from_pretrained(model_dir)

    def count(messages: list[dict]) -> int:
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return len(tok(text, add_special_tokens=False)["input_ids"])

    messages = rag_messages(question, sources, DEFAULT_SYSTEM_PROMPT, count, max_seq_len - max_tokens)
    if beams is None:
        beams = DEFAULT_RAG_BEAMS if extractive else 1
    if not extractive or beams == 1:
        support_weight = 0.0  # the app ranks only a beam's extractive answers
    elif support_weight is None:
        support_weight = DEFAULT_SUPPORT_WEIGHT
    return greedy_reference(model_dir, max_tokens, messages=messages, adapter=adapter,
                            extract_from=[s["text"] for s in sources] if extractive else None, beams=beams,
                            question=question, support_weight=support_weight)


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
                         # Float weights: answers are compared with transformers' on the same weights
                         # (serving quantization: tests/serve/test_units.py).
                         "compile": False, "quantization": "none"})
        serve.run(app, name="rag", route_prefix="/", blocking=False)
        base_url = f"http://127.0.0.1:{port}"
        wait_ready(base_url)
        yield base_url
    finally:
        serve.shutdown()
