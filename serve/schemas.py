"""Request and response bodies of the RAG app (validated by FastAPI, shown in its OpenAPI schema).

The OpenAI-compatible bodies ignore fields they do not know (clients send extras); ``/v1/rag``
forbids them. Limits are hard bounds: a request beyond them gets a 422 naming the field.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

MAX_QUESTION_CHARS = 4_000
MAX_PROMPT_CHARS = 16_000
MAX_MESSAGES = 64
MAX_TOKENS_LIMIT = 1_024
TOP_K_LIMIT = 50
MAX_STOP = 4
MAX_BEAMS = 8
# Extractive answers: a beam of 4 found better spans than greedy on held-out questions
# (docs/benchmarks/rag_decoding.md); each hypothesis takes a row of the generator's batch.
DEFAULT_RAG_BEAMS = 4
# A beam's extractive answers are ranked by log-probability + this x ops.extractive.question_support (0..1):
# on held-out questions every weight measured (1, 2, 3, 5) did better than likelihood alone, 5 the most
# (docs/benchmarks/rag_decoding.md); full support is then worth a likelihood ratio of e^5.
DEFAULT_SUPPORT_WEIGHT = 5.0
MAX_SUPPORT_WEIGHT = 100.0
# Registered artifact names only: a path (``../x``, ``/etc``) can never name an adapter.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


def _not_blank(v: str) -> str:
    if not v.strip():
        raise ValueError("must not be empty or only whitespace")
    return v


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = Field(False, description="send a last chunk with empty `choices` and the `usage`")


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
    read_k: int | None = Field(None, ge=1, le=TOP_K_LIMIT, description="of the `top_k` passages, how many the model "
                               "reads (best first; at most `top_k`); default: all of them, or for a model fine-tuned "
                               "with `jobs.train task=rag_qa` at most the `qa.passages` it read in training")
    adapter: str | None = Field(None, pattern=NAME_PATTERN, description="registered LoRA adapter name")
    extractive: bool = Field(True, description="copy the answer from the passages: every generated token keeps it a "
                             "run of words of one passage (case, punctuation and articles aside); "
                             "false: free generation")
    beams: int | None = Field(None, ge=1, le=MAX_BEAMS, description="beam width: the answer is the most likely "
                              "sequence found among this many hypotheses (sent whole when it finishes; needs "
                              f"temperature 0); default {DEFAULT_RAG_BEAMS} for extractive answers at temperature 0 "
                              "(at most the generator's max_batch_size; 1 where the model runs through the HF "
                              "fallback), else 1: greedy or sampled, streamed token by token")
    support_weight: float | None = Field(None, ge=0.0, le=MAX_SUPPORT_WEIGHT, description="a beam search's "
                                         "extractive answers are ranked by log-probability + this x the fraction of "
                                         "the question's content words in the passage sentence the answer was copied "
                                         f"from; default {DEFAULT_SUPPORT_WEIGHT:g}; 0: the most likely answer. Only "
                                         "with beams > 1")

    _q = field_validator("question")(_not_blank)

    @field_validator("read_k")
    @classmethod
    def _read_what_is_retrieved(cls, v: int | None, info: ValidationInfo) -> int | None:
        top_k = info.data.get("top_k")  # validated before read_k (declared first); absent if it failed
        if v is not None and top_k is not None and v > top_k:
            raise ValueError(f"read_k={v} is more than the top_k={top_k} passages retrieved")
        return v


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
    finish_reason: Literal["stop", "length"]
    beams: int = Field(1, description="beam width the answer was decoded with (1: greedy or sampled)")
    support_weight: float = Field(0.0, description="`support_weight` the answer was ranked with (0: by likelihood "
                                  "only, as every greedy, sampled or free answer is)")
    read_k: int = Field(..., description="how many of `sources` (the first ones) the model read")


class ContentPart(BaseModel):
    """One element of an OpenAI content-part array; only ``{"type": "text", "text": ...}`` is served."""

    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"] = Field(
        ..., description="'developer' (OpenAI's newer name for the system role) is treated as 'system'")
    content: str | list[ContentPart] = Field(..., description="text, or an array of text content parts")

    @field_validator("content")
    @classmethod
    def _length(cls, v: str | list[ContentPart]) -> str | list[ContentPart]:
        n = len(v) if isinstance(v, str) else sum(len(p.text or "") for p in v)
        if n > MAX_PROMPT_CHARS:
            raise ValueError(f"at most {MAX_PROMPT_CHARS} characters, got {n}")
        return v

    def text(self) -> str:
        """The content as one string (text parts joined by newlines, as OpenAI-compatible servers do)."""
        return self.content if isinstance(self.content, str) else "\n".join(p.text or "" for p in self.content)

    def for_engine(self) -> dict:
        """``{"role", "content"}`` for the chat template; the developer role becomes system."""
        return {"role": "system" if self.role == "developer" else self.role, "content": self.text()}


class OpenAIParams(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = Field(None, description="the base model id or a registered adapter name (see /v1/models)")
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, description="choices per request; only 1 is supported (more: 400)")
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = Field(None, description="with `stream`: include_usage adds a final "
                                                 "chunk holding `usage`")
    rag: RagOptions | None = Field(None, description="extension: retrieve passages and put them in the prompt")
    # Declared so that a request using them is refused by name (400) rather than silently ignored.
    logprobs: Any = Field(None, description="not supported (400 when set)")
    presence_penalty: Any = Field(None, description="not supported (400 when non-zero)")
    frequency_penalty: Any = Field(None, description="not supported (400 when non-zero)")
    logit_bias: Any = Field(None, description="not supported (400 when non-empty)")

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOP or any(not s or len(s) > 64 for s in stops):
            raise ValueError(f"at most {MAX_STOP} non-empty stop strings of <= 64 characters")
        return stops

    def token_budget(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def unsupported(self) -> tuple[str, str, str] | None:
        """``(parameter, message, code)`` of the first parameter this server cannot honour, else None."""
        if self.stream_options is not None and not self.stream:
            return "stream_options", "'stream_options' is only allowed when 'stream' is true", "invalid_value"
        for name, (in_use, reason) in self._UNSUPPORTED.items():
            if in_use(getattr(self, name)):
                return name, f"unsupported parameter '{name}': {reason}", "unsupported_parameter"
        return None

    _UNSUPPORTED: ClassVar[dict[str, tuple[Callable[[Any], bool], str]]] = {
        "n": (lambda v: v > 1, "only one choice per request is generated (n=1)"),
        "logprobs": (lambda v: v is not None and v is not False, "log probabilities are not returned"),
        "presence_penalty": (lambda v: bool(v), "repetition penalties are not implemented"),
        "frequency_penalty": (lambda v: bool(v), "repetition penalties are not implemented"),
        "logit_bias": (lambda v: bool(v), "logit biases are not implemented"),
    }


class ChatCompletionRequest(OpenAIParams):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(..., min_length=1, max_length=MAX_MESSAGES)
    tools: Any = Field(None, description="not supported (400 when non-empty): the model calls no tools")
    tool_choice: Any = Field(None, description="not supported (400 unless 'none')")
    functions: Any = Field(None, description="not supported (400 when non-empty)")
    function_call: Any = Field(None, description="not supported (400 unless 'none')")
    response_format: Any = Field(None, description="only {'type': 'text'} (other formats: 400)")
    top_logprobs: Any = Field(None, description="not supported (400 when set)")

    _UNSUPPORTED: ClassVar[dict[str, tuple[Callable[[Any], bool], str]]] = {
        **OpenAIParams._UNSUPPORTED,
        "tools": (lambda v: bool(v), "this server does not call tools"),
        "tool_choice": (lambda v: v not in (None, "none"), "this server does not call tools"),
        "functions": (lambda v: bool(v), "this server does not call functions"),
        "function_call": (lambda v: v not in (None, "none"), "this server does not call functions"),
        "response_format": (lambda v: v is not None and not (isinstance(v, dict) and v.get("type") == "text"),
                            "only plain text is generated ({'type': 'text'})"),
        "top_logprobs": (lambda v: v is not None and v != 0, "log probabilities are not returned"),
    }

    def unsupported(self) -> tuple[str, str, str] | None:
        """Also refuses content parts other than text (images, audio, files)."""
        for i, m in enumerate(self.messages):
            if not isinstance(m.content, str):
                for j, part in enumerate(m.content):
                    if part.type != "text":
                        return (f"messages.{i}.content.{j}.type",
                                f"unsupported content part type '{part.type}': only 'text' parts are served",
                                "unsupported_value")
        return super().unsupported()

    def rag_question(self) -> str:
        """The text retrieval searches for: the last user message (or the last message)."""
        return next((m for m in reversed(self.messages) if m.role == "user"), self.messages[-1]).text()


class CompletionRequest(OpenAIParams):
    """``POST /v1/completions``."""

    prompt: str = Field(..., min_length=1, max_length=MAX_PROMPT_CHARS)
    echo: Any = Field(None, description="not supported (400 when true)")
    best_of: Any = Field(None, description="not supported (400 when > 1)")
    suffix: Any = Field(None, description="not supported (400 when non-empty)")

    _p = field_validator("prompt")(_not_blank)
    _UNSUPPORTED: ClassVar[dict[str, tuple[Callable[[Any], bool], str]]] = {
        **OpenAIParams._UNSUPPORTED,
        "echo": (lambda v: bool(v), "the prompt is not echoed"),
        "best_of": (lambda v: v is not None and v > 1, "only one candidate is generated (best_of=1)"),
        "suffix": (lambda v: bool(v), "insertion after a suffix is not implemented"),
    }

    def rag_question(self) -> str:
        return self.prompt


class ChatChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatChoiceMessage
    finish_reason: Literal["stop", "length"]


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
    finish_reason: Literal["stop", "length"]
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
    engine_compiled: bool = Field(description="decode steps run compiled graphs (or will from the next step)")
    engine_compiling: bool = Field(False, description="the decode graphs are being built in the background; "
                                   "until then the replica decodes with the eager step")
    device: str | None = Field(None, description="where the generator runs, e.g. 'cuda (NVIDIA H200)' or 'cpu'")
    format: str | None = Field(None, description="what runs (dtype or quantization method) and why")
    index: str | None
    index_chunks: int | None
    adapters_loaded: list[str]
    prefix_cache: dict[str, int] = Field(default_factory=dict, description="the engine's prefix cache counters "
                                         "(ops.prefix_cache.PrefixCacheStats); empty when it is off")
    generator_pid: int


class ErrorBody(BaseModel):
    message: str
    type: str = Field(..., description="invalid_request_error (the client's mistake) or server_error")
    param: str | None = None
    code: str = Field(..., description="machine-readable reason, e.g. invalid_api_key, model_not_found, "
                      "unsupported_parameter, overloaded, timeout")


class ErrorResponse(BaseModel):
    error: ErrorBody
