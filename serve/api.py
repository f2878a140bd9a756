"""The FastAPI routes of the ingress, built on each replica around its :class:`serve.app.Ingress`.

Every refusal is ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status (503/504
for capacity and time); a bad request never produces a 5xx.
"""

from __future__ import annotations

import hmac
import time
import uuid
from typing import TYPE_CHECKING, Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ops.rag_prompt import cited_passages
from serve import schemas
from serve.app import ApiError, _sse, registered_adapters

if TYPE_CHECKING:
    from serve.app import Ingress

# Paths a load balancer or a browser may read without the API key.
OPEN_PATHS = ("/healthz", "/docs", "/openapi.json", "/redoc")
ERROR_TYPES = {401: "authentication_error", 404: "not_found_error", 413: "request_too_large",
               422: "invalid_request_error", 503: "overloaded_error", 504: "timeout_error"}


def _error(status: int, message: str, param: str | None = None, retry_after: int | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": status}}
    headers = {"Retry-After": str(retry_after)} if retry_after else None
    if status == 401:
        headers = {**(headers or {}), "WWW-Authenticate": "Bearer"}
    return JSONResponse(body, status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return f"request body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})", None
    field = ".".join(loc) or "body"
    return f"{field}: {first.get('msg')}", field


def make_api(ingress: Ingress) -> FastAPI:
    """Build the app: middleware (size, auth), error handlers, routes."""
    args = ingress.args
    app = FastAPI(title="raylm RAG", version="1.0",
                  description="Retrieval-augmented generation on Ray Serve with an OpenAI-compatible API.")

    @app.middleware("http")
    async def guard(request: Request, call_next: Any):
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > args.max_body_bytes:
            return _error(413, f"request body of {length} bytes exceeds max_body_bytes={args.max_body_bytes}")
        if args.api_key and request.url.path not in OPEN_PATHS:
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), args.api_key.encode()):
                return _error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, field = _validation_message(exc)
        return _error(422, message, field)

    @app.exception_handler(ApiError)
    async def _refused(_: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.param, exc.retry_after)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    responses: dict[int | str, dict[str, Any]] = {
        code: {"model": schemas.ErrorResponse} for code in (401, 404, 413, 422, 503, 504)}

    @app.get("/healthz", response_model=schemas.Health)
    async def healthz() -> dict:
        """Liveness plus what runs: attention backend, op path (compiled or reference), engine."""
        return await ingress.health()

    @app.get("/v1/models", response_model=schemas.ModelList, responses=responses)
    async def models() -> dict:
        """The base model and every registered LoRA adapter (pass one as `model`)."""
        data = [{"id": args.model_id, "created": ingress.created, "owned_by": "raylm"}]
        data += [{"id": name, "created": ingress.created, "owned_by": "raylm", "parent": args.model_id}
                 for name in registered_adapters(args.storage, args.model)]
        return {"object": "list", "data": data}

    @app.post("/v1/rag", response_model=schemas.RagResponse, responses=responses)
    async def rag(body: schemas.RagRequest):
        """Retrieve `top_k` passages for `question` and answer from them (SSE when `stream`)."""
        t0 = time.monotonic()
        deadline = t0 + args.request_timeout_s
        adapter = ingress.resolve_model(body.adapter)
        sources = await ingress.retrieve(body.question, body.top_k, deadline)
        retrieve_s = time.monotonic() - t0
        payload = {"rag": {"question": body.question, "sources": sources}, "max_tokens": body.max_tokens,
                   "temperature": body.temperature, "top_p": body.top_p, "seed": body.seed}
        model = body.adapter or args.model_id
        public = [{k: s[k] for k in ("id", "doc_id", "score", "text")} for s in sources]

        def finish(completion: dict) -> dict:
            return {"answer": completion["text"], "sources": public, "model": model,
                    "citations": cited_passages(completion["text"], [s["text"] for s in sources]),
                    "finish_reason": completion["finish_reason"], "usage": _usage(completion),
                    "timings": {"retrieve_s": retrieve_s, "generate_s": time.monotonic() - t0 - retrieve_s,
                                "total_s": time.monotonic() - t0,
                                "time_to_first_token_s": completion["time_to_first_token_s"]}}

        if not body.stream:
            return finish(await ingress.generate(adapter, payload, deadline))
        events = await ingress.stream(adapter, payload, deadline)

        async def sse() -> AsyncIterator[str]:
            yield _sse({"sources": public, "model": model})
            async for event in events:
                if "error" in event:
                    yield _sse({"error": event["error"]})
                    break
                if event["text"]:
                    yield _sse({"text": event["text"]})
                if "completion" in event:
                    yield _sse(finish(event["completion"]))
            yield _sse("[DONE]")

        return StreamingResponse(sse(), media_type="text/event-stream")

    async def _openai(body: schemas.OpenAIParams, payload: dict, kind: str):
        t0 = time.monotonic()
        deadline = t0 + args.request_timeout_s
        adapter = ingress.resolve_model(body.model)
        model = adapter or args.model_id
        sources = None
        if body.rag is not None:
            question = payload["messages"][-1]["content"] if kind == "chat" else payload["prompt"]
            sources = await ingress.retrieve(question, body.rag.top_k, deadline)
            context = "\n\n".join(f"[{i + 1}] {s['text']}" for i, s in enumerate(sources))
            if kind == "chat":
                payload["messages"] = [{"role": "system", "content": f"{args.system_prompt}\n\nContext:\n{context}"},
                                       *payload["messages"]]
            else:
                payload["prompt"] = f"Context:\n{context}\n\n{payload['prompt']}"
        payload.update(max_tokens=body.token_budget(args.default_max_tokens), temperature=body.temperature,
                       top_p=body.top_p, seed=body.seed, stop=body.stop)
        public = [{k: s[k] for k in ("id", "doc_id", "score", "text")} for s in sources] if sources else None
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())

        def choice(text: str, finish: str | None, first: bool = False) -> dict:
            if kind == "chat":
                delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
                return {"index": 0, "delta": delta, "finish_reason": finish}
            return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}

        obj = "chat.completion" if kind == "chat" else "text_completion"
        if not body.stream:
            completion = await ingress.generate(adapter, payload, deadline)
            ch = {"index": 0, "message": {"role": "assistant", "content": completion["text"]},
                  "finish_reason": completion["finish_reason"]} if kind == "chat" else \
                {"index": 0, "text": completion["text"], "finish_reason": completion["finish_reason"], "logprobs": None}
            return {"id": rid, "object": obj, "created": created, "model": model, "choices": [ch],
                    "usage": _usage(completion), "sources": public}
        events = await ingress.stream(adapter, payload, deadline)
        chunk_obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        async def sse() -> AsyncIterator[str]:
            head = {"id": rid, "object": chunk_obj, "created": created, "model": model}
            if kind == "chat":
                yield _sse({**head, "choices": [choice("", None, first=True)]})
            async for event in events:
                if "error" in event:
                    yield _sse({"error": event["error"]})
                    break
                if event["text"]:
                    yield _sse({**head, "choices": [choice(event["text"], None)]})
                if "completion" in event:
                    c = event["completion"]
                    yield _sse({**head, "choices": [choice("", c["finish_reason"])], "usage": _usage(c)})
            yield _sse("[DONE]")

        return StreamingResponse(sse(), media_type="text/event-stream")

    @app.post("/v1/chat/completions", response_model=schemas.ChatCompletionResponse, responses=responses)
    async def chat_completions(body: schemas.ChatCompletionRequest):
        """OpenAI-compatible chat; `model` = base id or adapter name; `rag: {top_k}` adds context."""
        return await _openai(body, {"messages": [m.model_dump() for m in body.messages]}, "chat")

    @app.post("/v1/completions", response_model=schemas.CompletionResponse, responses=responses)
    async def completions(body: schemas.CompletionRequest):
        """OpenAI-compatible text completion; same `model` and `rag` rules as chat."""
        return await _openai(body, {"prompt": body.prompt}, "text")

    return app


def _usage(completion: dict) -> dict:
    return {"prompt_tokens": completion["prompt_tokens"], "completion_tokens": completion["completion_tokens"],
            "total_tokens": completion["prompt_tokens"] + completion["completion_tokens"]}
