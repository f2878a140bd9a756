"""Request and response bodies of the RAG app (validated by FastAPI, shown in its OpenAPI schema).

The OpenAI-compatible bodies ignore fields they do not know (clients send extras); ``/v1/rag``
forbids them. Limits are hard bounds: a request beyond them gets a 422 naming the field.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_QUESTION_CHARS = 4_000
MAX_PROMPT_CHARS = 16_000
MAX_MESSAGES = 64
MAX_TOKENS_LIMIT = 1_024
TOP_K_LIMIT = 50
MAX_STOP = 4
# Registered artifact names only: a path (``../x``, ``/etc``) can never name an adapter.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


def _not_blank(v: str) -> str:
    if not v.strip():
        raise ValueError("must not be empty or only whitespace")
    return v


class RagOptions(BaseModel):
    """The ``rag`` extension of the OpenAI endpoints: retrieve context for the last user turn."""

    model_config = ConfigDict(extra="forbid")
    top_k: int = Field(4, ge=1, le=TOP_K_LIMIT, description="passages to retrieve")


class GenerationParams(BaseModel):
    max_tokens: int = Field(128, ge=1, le=MAX_TOKENS_LIMIT, description="tokens to generate at most")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass")
    seed: int | None = Field(None, description="seed of this request's sampler")
    stream: bool = Field(False, description="answer as server-sent events")


class RagRequest(GenerationParams):
    """``POST /v1/rag``."""

    model_config = ConfigDict(extra="forbid")
    question: str = Field(..., min_length=1, max_length=MAX_QUESTION_CHARS, description="the question")
    top_k: int = Field(4, ge=1, le=TOP_K_LIMIT, description="passages to retrieve")
    adapter: str | None = Field(None, pattern=NAME_PATTERN, description="registered LoRA adapter name")

    _q = field_validator("question")(_not_blank)


class Source(BaseModel):
    id: str = Field(..., description="chunk id (<document id>#<chunk>)")
    doc_id: str = Field(..., description="document the chunk came from")
    score: float = Field(..., description="ranking score: reciprocal-rank-fusion score (hybrid search), cosine "
                         "similarity (dense), BM25 score (bm25) or cross-encoder score (reranked)")
    text: str


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class RagResponse(BaseModel):
    answer: str
    sources: list[Source]
    citations: list[int] = Field(default_factory=list, description="indices into `sources` (0-based) of the passages "
                                 "that contain the answer (SQuAD-normalised, whole words)")
    usage: Usage
    timings: dict[str, float] = Field(..., description="retrieve_s, generate_s, total_s, time_to_first_token_s")
    model: str
    finish_reason: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str = Field(..., max_length=MAX_PROMPT_CHARS)


class OpenAIParams(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = Field(None, description="the base model id or a registered adapter name (see /v1/models)")
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1, description="only 1 choice is supported")
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    rag: RagOptions | None = Field(None, description="extension: retrieve passages and put them in the prompt")

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOP or any(not s or len(s) > 64 for s in stops):
            raise ValueError(f"at most {MAX_STOP} non-empty stop strings of <= 64 characters")
        return stops

    def token_budget(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default


class ChatCompletionRequest(OpenAIParams):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(..., min_length=1, max_length=MAX_MESSAGES)


class CompletionRequest(OpenAIParams):
    """``POST /v1/completions``."""

    prompt: str = Field(..., min_length=1, max_length=MAX_PROMPT_CHARS)

    _p = field_validator("prompt")(_not_blank)


class ChatChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatChoiceMessage
    finish_reason: str


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    sources: list[Source] | None = Field(None, description="present when the `rag` extension was used")


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    sources: list[Source] | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    parent: str | None = Field(None, description="the base model, for adapters")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"]
    model: str
    attention: str
    attention_reason: str
    op_path: str
    engine_backend: str
    engine_compiled: bool
    index: str | None
    index_chunks: int | None
    adapters_loaded: list[str]
    generator_pid: int


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorBody
