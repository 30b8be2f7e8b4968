"""Request and response bodies of the HTTP API (OpenAI's shapes, so the ``openai`` client works unchanged),
the request limits (an ``InvalidRequest`` that names the limit), and the body every error carries (OpenAI's
format).

Unknown request fields are ignored, as OpenAI-compatible servers do; fields that would change the answer and
are not supported (``n > 1``, ``logprobs``, ``tools``, token-id inputs) are refused with a 400 instead.
Extensions: ``retrieval`` in chat requests (false, or ``{k, filter, mode, fusion}``), ``citations`` in chat
responses; ``/v1/search`` takes the same ``mode`` and ``fusion``.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from configs.errors import InvalidRequest
from configs.schema.serve import LimitsConfig
from sharding.filters import Scalar


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


# --- chat -----------------------------------------------------------------------------------------------------------

class ContentPart(_Request):
    type: str
    text: str | None = None


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None

    @field_validator("content")
    @classmethod
    def _text_only(cls, v: str | list[ContentPart] | None) -> str | list[ContentPart] | None:
        if isinstance(v, list) and any(p.type != "text" or p.text is None for p in v):
            raise ValueError("only text content parts are supported")
        return v

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text or "" for p in self.content)
        return self.content or ""

    def plain(self) -> dict[str, str]:
        """{"role", "content"} as chat templates take it (``developer`` is the newer name of ``system``)."""
        return {"role": "system" if self.role == "developer" else self.role, "content": self.text()}


Mode = Literal["auto", "dense", "lexical", "hybrid"]


class FusionOptions(_Request):
    """Extension: a request's overrides of ``retrieval.fusion`` (hybrid mode); what it leaves out is the server's."""

    model_config = ConfigDict(extra="forbid")  # a misspelt knob would be ignored silently otherwise

    method: Literal["weighted", "rrf"] | None = None
    weight: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    rrf_k: float | None = Field(None, gt=0, allow_inf_nan=False)
    depth: int | None = Field(None, ge=1)

    def overrides(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class RetrievalOptions(_Request):
    """Extension: how a chat request retrieves (``"retrieval": false`` turns it off)."""

    enabled: bool = True
    k: int | None = Field(None, ge=1)
    filter: dict[str, Scalar | list[Scalar]] | None = None
    mode: Mode | None = None  # None: the server's retrieval.mode
    fusion: FusionOptions | None = None


class StreamOptions(_Request):
    include_usage: bool = False


class _Sampling(_Request):
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    n: int = Field(1, ge=1)
    logprobs: bool | int | None = None

    @model_validator(mode="after")
    def _supported(self):
        if self.n != 1:
            raise ValueError("n > 1 is not supported: send one request per completion")
        if self.logprobs:
            raise ValueError("logprobs are not supported")
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number")
        return self

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    retrieval: RetrievalOptions | None = None  # also true / false (see _retrieval_flag)
    tools: list[Any] | None = None

    @field_validator("retrieval", mode="before")
    @classmethod
    def _retrieval_flag(cls, v: Any) -> Any:
        """``"retrieval": false`` (or true) is shorthand for ``{"enabled": false}``. Not a ``bool | ...`` union,
        so that an error inside the options names its field (``retrieval.mode``), not a union member."""
        return {"enabled": v} if isinstance(v, bool) else v

    @model_validator(mode="after")
    def _chat(self):
        if self.tools:
            raise ValueError("tools are not supported")
        if self.messages[-1].role != "user":
            raise ValueError("the last message must be from the user")
        return self

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def retrieval_options(self) -> RetrievalOptions:
        return self.retrieval or RetrievalOptions()


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    echo: bool = False

    @model_validator(mode="after")
    def _completion(self):
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            raise ValueError("one prompt per request: send one request per prompt")
        if self.echo:
            raise ValueError("echo is not supported")
        return self

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


# --- embeddings and search ------------------------------------------------------------------------------------------

class EmbeddingRequest(_Request):
    model: str = Field(min_length=1)
    input: str | list[str] = Field(description="a text or a list of texts (token ids are not supported)")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class SearchRequest(_Request):
    """``POST /v1/search``: retrieval only."""

    query: str = Field(min_length=1)
    k: int = Field(10, ge=1)
    filter: dict[str, Scalar | list[Scalar]] | None = None
    mode: Mode | None = None  # None: the server's retrieval.mode
    fusion: FusionOptions | None = None


# --- limits -----------------------------------------------------------------------------------------------------------

def _too_big(what: str, value: int, limit: int, param: str, field: str) -> InvalidRequest:
    return InvalidRequest(f"{what} ({value}) exceeds this server's limit of {limit} (limits.{field}).",
                          param=param, code="limit_exceeded")


def check_chat(req: ChatCompletionRequest, limits: LimitsConfig) -> None:
    """Refuse a chat request over the configured limits (400 with the limit named)."""
    if len(req.messages) > limits.max_messages:
        raise _too_big("messages", len(req.messages), limits.max_messages, "messages", "max_messages")
    chars = sum(len(m.text()) for m in req.messages)
    if chars > limits.max_input_chars:
        raise _too_big("characters in messages", chars, limits.max_input_chars, "messages", "max_input_chars")
    if not req.messages[-1].text().strip():
        raise InvalidRequest("the last user message is empty.", param="messages")
    _check_sampling(req, req.max_new_tokens(), limits)
    opts = req.retrieval_options()
    if opts.k is not None and opts.k > limits.max_k:
        raise _too_big("retrieval.k", opts.k, limits.max_k, "retrieval.k", "max_k")
    _check_fusion(opts.fusion, limits, "retrieval.fusion.depth")


def check_completion(req: CompletionRequest, limits: LimitsConfig) -> None:
    if len(req.text()) > limits.max_input_chars:
        raise _too_big("characters in prompt", len(req.text()), limits.max_input_chars, "prompt", "max_input_chars")
    if not req.text():
        raise InvalidRequest("the prompt is empty.", param="prompt")
    _check_sampling(req, req.max_tokens, limits)


def _check_sampling(req: _Sampling, max_tokens: int | None, limits: LimitsConfig) -> None:
    if max_tokens is not None and max_tokens > limits.max_tokens:
        raise _too_big("max_tokens", max_tokens, limits.max_tokens, "max_tokens", "max_tokens")
    stops = req.stops()
    if len(stops) > limits.max_stop:
        raise _too_big("stop sequences", len(stops), limits.max_stop, "stop", "max_stop")
    if any(not s for s in stops):
        raise InvalidRequest("stop sequences must not be empty.", param="stop")


def check_embeddings(req: EmbeddingRequest, limits: LimitsConfig) -> None:
    texts = req.texts()
    if not texts:
        raise InvalidRequest("input is empty.", param="input")
    if len(texts) > limits.max_embedding_inputs:
        raise _too_big("inputs", len(texts), limits.max_embedding_inputs, "input", "max_embedding_inputs")
    longest = max(len(t) for t in texts)
    if longest > limits.max_input_chars:
        raise _too_big("characters in an input", longest, limits.max_input_chars, "input", "max_input_chars")
    if any(not t for t in texts):
        raise InvalidRequest("inputs must not be empty strings.", param="input")


def _check_fusion(fusion: FusionOptions | None, limits: LimitsConfig, param: str) -> None:
    if fusion is not None and fusion.depth is not None and fusion.depth > limits.max_depth:
        raise _too_big(param, fusion.depth, limits.max_depth, param, "max_depth")


def check_search(req: SearchRequest, limits: LimitsConfig) -> None:
    if req.k > limits.max_k:
        raise _too_big("k", req.k, limits.max_k, "k", "max_k")
    _check_fusion(req.fusion, limits, "fusion.depth")
    if len(req.query) > limits.max_input_chars:
        raise _too_big("characters in query", len(req.query), limits.max_input_chars, "query", "max_input_chars")
