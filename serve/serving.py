"""What the routes of :mod:`serve.api` do: ``/v1/rag`` and the OpenAI-compatible completions.

Each function takes the ingress replica (:class:`serve.app.Ingress`, for its handles and args) and
a validated body, and returns a response dict or a ``StreamingResponse`` of server-sent events.
Responses follow OpenAI's shapes: ``finish_reason`` is ``stop`` or ``length``; a stream that fails
after it started sends ``data: {"error": {...}}`` (the body of :class:`serve.errors.ApiError`) and
then ``data: [DONE]``.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, AsyncIterator, Literal, Protocol

from fastapi.responses import StreamingResponse

from ops.rag_prompt import cited_passages
from serve import schemas
from serve.errors import ApiError, sse


class Ingress(Protocol):
    """What the routes use of the ingress replica (``serve.app.Ingress`` is the one implementation;
    a protocol here keeps serve.app -> serve.api -> serve.serving one-way)."""

    args: Any
    metrics: Any

    def resolve_model(self, model: str | None, param: str = "model") -> str: ...

    def model_cards(self) -> list[dict]: ...

    def passages_read(self, adapter: str) -> int | None: ...

    async def retrieve(self, question: str, top_k: int, deadline: float) -> list[dict]: ...

    async def generate(self, adapter: str, payload: dict, deadline: float) -> dict: ...

    def stream(self, adapter: str, payload: dict, deadline: float) -> AsyncIterator[dict]: ...

    async def health(self) -> dict: ...

Kind = Literal["chat", "text"]


def usage(completion: dict) -> dict:
    return {"prompt_tokens": completion["prompt_tokens"], "completion_tokens": completion["completion_tokens"],
            "total_tokens": completion["prompt_tokens"] + completion["completion_tokens"]}


def public_sources(sources: list[dict] | None) -> list[dict] | None:
    """The fields of retrieved passages a client sees."""
    return [{k: s[k] for k in ("id", "doc_id", "score", "text")} for s in sources] if sources else None


def _error_event(event: dict) -> str:
    return sse(ApiError.from_dict(event["error"]).body())


async def rag(ingress: Ingress, body: schemas.RagRequest) -> dict | StreamingResponse:
    """Retrieve ``top_k`` passages for the question and answer from the first ``read_k`` of them."""
    args = ingress.args
    t0 = time.monotonic()
    deadline = t0 + args.request_timeout_s
    adapter = ingress.resolve_model(body.adapter, param="adapter")
    sources = await ingress.retrieve(body.question, body.top_k, deadline)
    retrieve_s = time.monotonic() - t0
    read_k = body.read_k or min(len(sources), ingress.passages_read(adapter) or len(sources))
    read = sources[:read_k]
    payload = {"rag": {"question": body.question, "sources": read, "extractive": body.extractive},
               "max_tokens": body.max_tokens,
               "temperature": body.temperature, "top_p": body.top_p, "seed": body.seed, "beams": body.beams,
               "support_weight": body.support_weight}
    model = body.adapter or args.model_id
    public = public_sources(sources) or []

    def finish(completion: dict) -> dict:
        return {"answer": completion["text"], "sources": public, "model": model,
                "citations": cited_passages(completion["text"], [s["text"] for s in read]),
                "finish_reason": completion["finish_reason"], "beams": completion.get("beams", 1),
                "support_weight": completion.get("support_weight", 0.0),
                "read_k": len(read),
                "usage": usage(completion),
                "timings": {"retrieve_s": retrieve_s, "generate_s": time.monotonic() - t0 - retrieve_s,
                            "total_s": time.monotonic() - t0,
                            "time_to_first_token_s": completion["time_to_first_token_s"]}}

    if not body.stream:
        return finish(await ingress.generate(adapter, payload, deadline))
    events = await ingress.stream(adapter, payload, deadline)

    async def stream() -> AsyncIterator[str]:
        yield sse({"sources": public, "model": model})
        async for event in events:
            if "error" in event:
                yield _error_event(event)
                break
            if event["text"]:
                yield sse({"text": event["text"]})
            if "completion" in event:
                yield sse(finish(event["completion"]))
        yield sse("[DONE]")

    return StreamingResponse(stream(), media_type="text/event-stream")


async def openai_completion(ingress: Ingress, body: schemas.ChatCompletionRequest | schemas.CompletionRequest,
                            kind: Kind) -> dict | StreamingResponse:
    """``/v1/chat/completions`` (``kind="chat"``) or ``/v1/completions`` (``"text"``).

    Raises:
        ApiError: 400 naming a parameter this server cannot honour (``n>1``, ``tools``, ...), 404 for
            an unknown ``model``, or what the generator refuses (queue full, too long, timeout).
    """
    refused = body.unsupported()
    if refused:
        param, message, code = refused
        raise ApiError(400, message, param, code=code)
    args = ingress.args
    deadline = time.monotonic() + args.request_timeout_s
    adapter = ingress.resolve_model(body.model)
    payload: dict[str, Any] = ({"messages": [m.for_engine() for m in body.messages]} if kind == "chat"
                               else {"prompt": body.prompt})
    sources = None
    if body.rag is not None:
        sources = await ingress.retrieve(body.rag_question(), body.rag.top_k, deadline)
        context = "\n\n".join(f"[{i + 1}] {s['text']}" for i, s in enumerate(sources))
        if kind == "chat":
            payload["messages"] = [{"role": "system", "content": f"{args.system_prompt}\n\nContext:\n{context}"},
                                   *payload["messages"]]
        else:
            payload["prompt"] = f"Context:\n{context}\n\n{payload['prompt']}"
    payload.update(max_tokens=body.token_budget(args.default_max_tokens), temperature=body.temperature,
                   top_p=body.top_p, seed=body.seed, stop=body.stop)
    head = {"id": f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
            "model": adapter or args.model_id}
    if not body.stream:
        completion = await ingress.generate(adapter, payload, deadline)
        return {**head, "object": "chat.completion" if kind == "chat" else "text_completion",
                "choices": [_choice(kind, completion["text"], completion["finish_reason"])],
                "usage": usage(completion), "sources": public_sources(sources)}
    events = await ingress.stream(adapter, payload, deadline)
    return StreamingResponse(_chunks(kind, head, events, body.include_usage()), media_type="text/event-stream")


def _choice(kind: Kind, text: str, finish: str) -> dict:
    if kind == "chat":
        return {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
    return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}


def _delta(kind: Kind, text: str, finish: str | None, first: bool = False) -> dict:
    if kind == "chat":
        delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
        return {"index": 0, "delta": delta, "finish_reason": finish}
    return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}


async def _chunks(kind: Kind, head: dict, events: AsyncIterator[dict], include_usage: bool) -> AsyncIterator[str]:
    """OpenAI's chunk stream: text deltas, a chunk holding ``finish_reason``, and with
    ``include_usage`` a last chunk with empty ``choices`` and the ``usage`` (every other chunk then
    carries ``"usage": null``, as OpenAI's do)."""
    head = {**head, "object": "chat.completion.chunk" if kind == "chat" else "text_completion"}
    if include_usage:
        head["usage"] = None
    if kind == "chat":
        yield sse({**head, "choices": [_delta(kind, "", None, first=True)]})
    async for event in events:
        if "error" in event:
            yield _error_event(event)
            break
        if event["text"]:
            yield sse({**head, "choices": [_delta(kind, event["text"], None)]})
        if "completion" in event:
            completion = event["completion"]
            yield sse({**head, "choices": [_delta(kind, "", completion["finish_reason"])]})
            if include_usage:
                yield sse({**head, "choices": [], "usage": usage(completion)})
    yield sse("[DONE]")
