"""Refusals of the RAG app in OpenAI's error shape, shared by the ingress routes and the deployments.

Every refusal is ``{"error": {"message", "type", "param", "code"}}``, the body OpenAI's API sends
(``type`` and a string ``code`` as OpenAI names them), so the ``openai`` client raises its typed
error (``BadRequestError``, ``AuthenticationError``, ``NotFoundError``, ...) with our message. The
same body is sent as an SSE event when a stream fails after it started.
"""

from __future__ import annotations

import json
from typing import Any

# OpenAI answers every client mistake, a bad key and an unknown model included, with type
# "invalid_request_error" (told apart by `code`); its own failures are "server_error".
CLIENT_ERROR, SERVER_ERROR = "invalid_request_error", "server_error"
# `code` when the refusal does not name a more precise one.
DEFAULT_CODES = {400: "invalid_value", 401: "invalid_api_key", 404: "not_found", 413: "request_too_large",
                 422: "invalid_value", 500: "internal_error", 503: "overloaded",
                 504: "timeout"}


class ApiError(Exception):
    """A request the app refuses: becomes ``{"error": {...}}`` with HTTP ``status``.

    Args:
        status: HTTP status (4xx for the client's mistakes, 503/504 for capacity and time).
        message: What was wrong and what would be valid; shown to the client.
        param: The request field at fault, if one is.
        retry_after: Seconds for a ``Retry-After`` header (503).
        code: OpenAI-style machine-readable reason; default by status (:data:`DEFAULT_CODES`).
    """

    def __init__(self, status: int, message: str, param: str | None = None, retry_after: int | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.retry_after = status, message, param, retry_after
        self.code = code or DEFAULT_CODES.get(status, "error")

    def to_dict(self) -> dict:
        """A plain dict that crosses a deployment handle (the Generator's error events)."""
        return {"status": self.status, "message": self.message, "param": self.param, "retry_after": self.retry_after,
                "code": self.code}

    @classmethod
    def from_dict(cls, d: dict) -> ApiError:
        return cls(d["status"], d["message"], d.get("param"), d.get("retry_after"), d.get("code"))

    def body(self) -> dict:
        """The OpenAI error body: ``{"error": {"message", "type", "param", "code"}}``."""
        return {"error": {"message": self.message, "type": CLIENT_ERROR if self.status < 500 else SERVER_ERROR,
                          "param": self.param, "code": self.code}}


def sse(data: Any) -> str:
    """One server-sent event: ``data: <json or literal>``."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"
