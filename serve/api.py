"""The FastAPI router of the ingress, built on each replica around its :class:`serve.app.Ingress`.

Thin on purpose: a middleware for body size, API key and the request counter, error handlers that
turn every refusal into OpenAI's ``{"error": {"message", "type", "param", "code"}}`` (4xx for the
client's mistakes, 503/504 for capacity and time, a bad request never yields a 5xx), and routes
that call :mod:`serve.serving`. Serve's proxy accepts an ``X-Request-Id`` (or makes one), echoes
it on the response and tags the replicas' log lines of that request with it.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ops.errors import first_validation_error
from serve import schemas, serving
from serve.errors import ApiError
from serve.security import key_matches

from serve.serving import Ingress

log = logging.getLogger("ray.serve")

# Paths a load balancer or a browser may read without the API key.
OPEN_PATHS = ("/healthz", "/docs", "/openapi.json", "/redoc")
# The `route` tag of raylm_requests_total: these paths, anything else counts as "other" (a scan of
# random paths must not create a metric series per path).
ROUTES = ("/v1/rag", "/v1/chat/completions", "/v1/completions", "/v1/models", "/healthz")
# pydantic's error type -> OpenAI's `code`.
VALIDATION_CODES = {"missing": "missing_required_parameter", "extra_forbidden": "unknown_parameter",
                    "json_invalid": "invalid_json"}


def error_response(err: ApiError) -> JSONResponse:
    headers = {"Retry-After": str(err.retry_after)} if err.retry_after else {}
    if err.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(err.body(), status_code=err.status, headers=headers or None)


def validation_error(exc: RequestValidationError) -> ApiError:
    """422 naming the first bad field, with OpenAI's code for a missing or unknown one."""
    field, msg, first = first_validation_error(exc.errors(), skip=("body",))
    code = VALIDATION_CODES.get(first.get("type", ""), "invalid_value")
    if first.get("type") == "json_invalid":
        return ApiError(422, f"request body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})",
                        code=code)
    field = field or "body"
    return ApiError(422, f"{field}: {msg}", field, code=code)


def _refused(request: Request, err: ApiError) -> JSONResponse:
    # Serve's log formatter adds the request id to this line.
    (log.warning if err.status >= 500 else log.info)("refused %s %s: %d %s: %s", request.method, request.url.path,
                                                     err.status, err.code, err.message)
    return error_response(err)


def make_api(ingress: Ingress) -> FastAPI:
    """Build the app: middleware (size, auth, request counter), error handlers, routes."""
    args = ingress.args
    app = FastAPI(title="raylm RAG", version="1.0",
                  description="Retrieval-augmented generation on Ray Serve with an OpenAI-compatible API.")

    @app.middleware("http")
    async def guard(request: Request, call_next: Any):
        route = request.url.path if request.url.path in ROUTES else "other"
        status = 500  # what an exception escaping the app becomes
        try:
            length = request.headers.get("content-length")
            if length and length.isdigit() and int(length) > args.max_body_bytes:
                response = _refused(request, ApiError(
                    413, f"request body of {length} bytes exceeds max_body_bytes={args.max_body_bytes}"))
            elif args.api_key and request.url.path not in OPEN_PATHS and not key_matches(
                    request.headers.get("authorization", ""), args.api_key.get_secret_value()):
                response = _refused(request, ApiError(
                    401, "missing or wrong API key: send 'Authorization: Bearer <key>'"))
            else:
                response = await call_next(request)
            status = response.status_code
            return response
        finally:
            ingress.metrics.requests.inc(tags={"route": route, "status": str(status)})

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _refused(request, validation_error(exc))

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _refused(request, exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _refused(request, ApiError(exc.status_code, str(exc.detail)))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("request %s %s failed", request.method, request.url.path)
        return error_response(ApiError(500, f"internal error ({type(exc).__name__}); see the ingress log"))

    responses: dict[int | str, dict[str, Any]] = {
        code: {"model": schemas.ErrorResponse} for code in (400, 401, 404, 413, 422, 503, 504)}

    @app.get("/healthz", response_model=schemas.Health)
    async def healthz() -> dict:
        """Liveness plus what runs: attention backend, op path (compiled or reference), engine."""
        return await ingress.health()

    @app.get("/v1/models", response_model=schemas.ModelList, responses=responses)
    async def models() -> dict:
        """The base model and every registered LoRA adapter (pass one as `model`)."""
        return {"object": "list", "data": ingress.model_cards()}

    @app.post("/v1/rag", response_model=schemas.RagResponse, responses=responses)
    async def rag(body: schemas.RagRequest):
        """Retrieve `top_k` passages for `question` and answer from them (SSE when `stream`)."""
        return await serving.rag(ingress, body)

    @app.post("/v1/chat/completions", response_model=schemas.ChatCompletionResponse, responses=responses)
    async def chat_completions(body: schemas.ChatCompletionRequest):
        """OpenAI-compatible chat; `model` = base id or adapter name; `rag: {top_k}` adds context."""
        return await serving.openai_completion(ingress, body, "chat")

    @app.post("/v1/completions", response_model=schemas.CompletionResponse, responses=responses)
    async def completions(body: schemas.CompletionRequest):
        """OpenAI-compatible text completion; same `model` and `rag` rules as chat."""
        return await serving.openai_completion(ingress, body, "text")

    return app
