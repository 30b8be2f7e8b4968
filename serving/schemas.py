"""The bodies of the HTTP API and the values that cross deployments.

Requests and responses have OpenAI's shapes, so the ``openai`` client works unchanged; the request limits raise an
``InvalidRequest`` that names the limit; every error carries OpenAI's body (:class:`ErrorBody`). Unknown request
fields are ignored, as OpenAI-compatible servers do; fields that would change the answer and are not supported
(``n > 1``, ``logprobs``, ``tools``, token-id inputs) are refused with a 400 instead. Extensions: ``retrieval`` in
chat requests (false, or ``{k, filter, mode, fusion}``), ``citations`` in chat responses; ``/v1/search`` takes the
same ``mode`` and ``fusion``.

Between deployments (through Serve handles, so every value here pickles): the Embedder answers
:class:`Embedding` and :class:`EmbedderInfo`, a ShardSearcher :class:`ShardsLoaded`, the Retriever
:class:`SearchResult` (of :class:`Passage`), :class:`Reloaded` and :class:`Health`, the Generator takes a
:class:`ChatInput` or :class:`CompletionInput` and answers :class:`PromptInfo`, then one :class:`Step` per decode
step (streamed), or :class:`Generated` at once.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from configs.errors import InvalidRequest, RagtuneError
from configs.schema.serve import LimitsConfig
from serving.generation import SamplingParams
from sharding.filters import Scalar

_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')  # a JSON string literal, escapes included


def json_depth(body: bytes | bytearray) -> int:
    """How deeply the arrays and objects of a JSON body nest, counted before parsing (C speed: strings are cut
    out with a regex, then the brackets are summed with numpy), so that a body of thousands of ``[`` is refused
    with a 400 instead of reaching the parser's recursion limit. Brackets inside strings do not count."""
    bare = np.frombuffer(_JSON_STRING.sub(b'""', bytes(body)), dtype=np.uint8)
    step = np.zeros(len(bare), dtype=np.int32)
    step[(bare == ord("[")) | (bare == ord("{"))] = 1
    step[(bare == ord("]")) | (bare == ord("}"))] = -1
    return int(np.cumsum(step).max(initial=0))


_ESCAPED_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")  # a JSON escape of a UTF-16 surrogate, paired or not


def lone_surrogate(body: bytes | bytearray, data: Any) -> str | None:
    """Where (a dotted path, ``messages.0.content``) the parsed JSON ``data`` holds a string or key with a lone
    UTF-16 surrogate (``"\\ud800"`` without its pair: JSON allows the escape, but it is no text: tokenizers and
    encoders fail on it); None when there is none. Only walked when ``body`` has such an escape at all."""
    if not _ESCAPED_SURROGATE.search(body):
        return None
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:  # the path may hold one too (a key): written as its escape, to be sendable
                return where.encode("utf-8", "backslashreplace").decode() or None
        elif isinstance(value, dict):
            for key, item in value.items():
                path = f"{where}.{key}" if where else str(key)
                stack.append((path, key))
                stack.append((path, item))
        elif isinstance(value, list):
            stack.extend((f"{where}.{i}" if where else str(i), item) for i, item in enumerate(value))
    return None


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


# --- chat -----------------------------------------------------------------------------------------------------------

class ContentPart(_Request):
    type: str = Field(json_schema_extra={"const": "text"})  # other parts (images, audio) are refused
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

    def overrides(self) -> dict[str, str | float]:
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


class ResponseFormat(_Request):
    """OpenAI's ``response_format``: only ``text`` is honoured; JSON modes are refused, not silently ignored."""

    type: Literal["text", "json_object", "json_schema"] = Field(json_schema_extra={"enum": ["text"]})  # the JSON
    # modes parse (so that their 400 says why) but are refused

    @model_validator(mode="after")
    def _text_only(self):
        if self.type != "text":
            raise ValueError(f"{self.type!r} is not supported: this server generates free text, without "
                             "constrained decoding. Fix: leave response_format out (or type text) and ask for "
                             "the format in the prompt")
        return self


class _Sampling(_Request):
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)  # OpenAI's int64 (the sampler's generator takes no more)
    # what the document says is what is honoured (n 1, no logprobs); other values get the validators' 400s
    n: int = Field(1, ge=1, json_schema_extra={"maximum": 1})
    logprobs: bool | int | None = Field(None, json_schema_extra={"enum": [False, 0, None]})
    response_format: ResponseFormat | None = None

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
    tools: list[Any] | None = Field(None, json_schema_extra={"maxItems": 0})  # refused (no tool calling)

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
    prompt: str | list[str] = Field(json_schema_extra={"minLength": 1, "minItems": 1, "maxItems": 1})  # one
    echo: bool = Field(False, json_schema_extra={"const": False})  # refused

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
    input: str | list[str] = Field(description="a text or a list of texts (token ids are not supported)",
                                   json_schema_extra={"minLength": 1, "minItems": 1})
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


# --- responses --------------------------------------------------------------------------------------------------------
#
# Dumped with ``model_dump()`` and written by ``json.dumps`` (FastAPI's JSONResponse, the SSE events), keys in field
# order. A field declared with ``exclude_if=_absent`` is left out of the JSON when None (OpenAI's shapes omit it
# rather than send null: a chunk's ``usage`` before the last one); any other None is written as null.

def _absent(value: object) -> bool:
    return value is None


class _Response(BaseModel):
    model_config = ConfigDict(protected_namespaces=())


class ErrorDetail(_Response):
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None


class ErrorBody(_Response):
    """OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorDetail


class Passage(_Response):
    """A retrieved chunk, ranked: an item of ``/v1/search``'s data, and what the Retriever hands the Generator."""

    rank: int  # 1..k after the filter
    score: float  # the merged (or fused) score
    chunk_id: int
    doc_id: str | None
    title: str | None
    text: str
    metadata: dict[str, Any]


class Citation(_Response):
    """A passage as the prompt holds it (a chat response's ``citations``): numbered ``n`` as the answer cites it,
    ``truncated`` when its text was cut to fit the model's context; the other fields are the :class:`Passage`'s."""

    n: int
    rank: int
    score: float
    chunk_id: int
    doc_id: str | None
    title: str | None
    text: str
    metadata: dict[str, Any] = Field(default_factory=dict)
    truncated: bool = False


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class AssistantMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(_Response):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None


class ChatCompletion(_Response):
    """``POST /v1/chat/completions``."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    usage: Usage
    choices: list[ChatChoice]
    citations: list[Citation]


class ChatDelta(_Response):
    """New text of a streamed chat answer: ``{"role": "assistant", "content": ""}`` first, then ``{"content"}``,
    or ``{}`` for a step that only finishes."""

    role: Literal["assistant"] | None = Field(None, exclude_if=_absent)
    content: str | None = Field(None, exclude_if=_absent)


class ChatChunkChoice(_Response):
    index: int = 0
    delta: ChatDelta
    finish_reason: str | None = None


class ChatCompletionChunk(_Response):
    """One server-sent event of a streamed chat answer: the first carries ``citations``; with
    ``stream_options.include_usage`` the last has no choices and carries ``usage``."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    citations: list[Citation] | None = Field(None, exclude_if=_absent)
    usage: Usage | None = Field(None, exclude_if=_absent)


class CompletionChoice(_Response):
    index: int = 0
    text: str
    finish_reason: str | None
    logprobs: None = None  # not supported (a request that asks for them is refused); OpenAI's shape has the key


class TextCompletion(_Response):
    """``POST /v1/completions``."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    usage: Usage
    choices: list[CompletionChoice]


class CompletionChunk(_Response):
    """One server-sent event of a streamed completion; with ``stream_options.include_usage`` the last has no
    choices and carries ``usage``."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = Field(None, exclude_if=_absent)


class EmbeddingData(_Response):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # floats, or base64 of little-endian float32 (encoding_format)


class EmbeddingUsage(_Response):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(_Response):
    """``POST /v1/embeddings``."""

    object: Literal["list"] = "list"
    model: str
    data: list[EmbeddingData]
    usage: EmbeddingUsage


class SearchResponse(_Response):
    """``POST /v1/search``: ``mode`` as resolved (auto becomes hybrid or dense), the index version answered from."""

    object: Literal["search.result"] = "search.result"
    query: str
    k: int
    mode: str
    version: str
    data: list[Passage]


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "ragtune"
    kind: Literal["base", "adapter", "embedding"]


class ModelList(_Response):
    """``GET /v1/models``: the base model, each adapter, the embedding model."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(_Response):
    """``GET /healthz`` (200 when ``ready``, else 503), as the Retriever reports it: ``status`` follows ``ready``;
    ``shards`` and ``loaded`` (the shard numbers some replica has loaded) once every group answered, else
    ``reason``."""

    status: Literal["ok", "loading"] = "loading"
    ready: bool
    version: str | None = Field(None, exclude_if=_absent)
    reason: str | None = Field(None, exclude_if=_absent)
    shards: int | None = Field(None, exclude_if=_absent)
    loaded: list[int] | None = Field(None, exclude_if=_absent)

    @model_validator(mode="after")
    def _status(self) -> Health:
        self.status = "ok" if self.ready else "loading"
        return self


class Reloaded(_Response):
    """``POST /admin/reload``: the version now answered from, the one before, whether it changed."""

    version: str
    previous: str
    changed: bool


# --- between deployments ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Embedding:
    """One text as the Embedder embedded it."""

    vector: np.ndarray  # (d,) float32
    tokens: int  # tokens of the text (the API's usage)
    batch: int  # texts in the forward pass it was embedded in


@dataclass(frozen=True)
class EmbedderInfo:
    model: str  # the index's embedding model, as /v1/models and /v1/embeddings name it
    dim: int
    batching: bool


@dataclass(frozen=True)
class ShardsLoaded:
    """What a ShardSearcher replica holds: its shard numbers and the versions it has loaded (oldest first)."""

    shards: list[int]
    versions: list[str]
    ntotal: dict[str, int]  # vectors in its shards, per version


@dataclass(frozen=True)
class SearchTimings:
    embed_s: float  # 0 for lexical: nothing is embedded
    search_s: float  # fan-out, merge, fusion, docstore


@dataclass(frozen=True)
class SearchResult:
    """The Retriever's answer: ``mode`` as resolved for ``version``; ``embed_batch`` is the size of the Embedder's
    batch the query went in (0 for lexical)."""

    passages: list[Passage]
    version: str
    mode: str
    timings: SearchTimings
    embed_batch: int


@dataclass(frozen=True)
class RetrieverInfo:
    version: str
    shards: int
    ntotal: int
    factory: str
    model: str | None  # the embedding model the version was built with
    lexical: bool  # whether the version has BM25 shards
    mode: str  # retrieval.mode as resolved for the version


@dataclass(frozen=True)
class ChatInput:
    """A chat turn for the Generator: the conversation (``{"role", "content"}`` as chat templates take it), the
    passages retrieved for its last message, the sampling."""

    messages: list[dict[str, str]]
    passages: list[Passage]
    params: SamplingParams
    deadline: float | None = None  # when the Ingress stops waiting (time.time()): the engine refuses what cannot


@dataclass(frozen=True)
class CompletionInput:
    """A raw prompt for the Generator (no retrieval, no chat template)."""

    prompt: str
    params: SamplingParams
    deadline: float | None = None  # as ChatInput's


@dataclass(frozen=True)
class PromptInfo:
    """The Generator's first answer to a request, before any token: the prompt's size and the passages it holds
    (none for a completion), and what was left out to fit the context."""

    prompt_tokens: int
    citations: list[Citation]
    dropped_passages: int = 0
    dropped_turns: int = 0


@dataclass(frozen=True)
class Step:
    """The text of one decode step that is now certain; ``finish_reason`` (stop | length) on the last one."""

    text: str
    finish_reason: str | None
    completion_tokens: int  # generated so far
    batch: int  # requests decoded together in this step


@dataclass(frozen=True)
class Generated:
    """A whole answer (``Generator.complete``): its prompt, text and the largest batch it was decoded in."""

    prompt: PromptInfo
    text: str
    finish_reason: str | None
    completion_tokens: int
    batch: int


@dataclass(frozen=True)
class Refused:
    """A request the Generator refused before any token (its engine's queue or the request's deadline, a prompt
    that does not fit, an adapter not served): returned (``complete``) or yielded first (``stream``) instead of
    raised, so that Serve does not log a traceback for what is the client's 4xx or a 429 under load; the Ingress
    raises ``error`` for it."""

    error: RagtuneError


@dataclass(frozen=True)
class GeneratorInfo:
    base: str
    adapters: list[str]  # served
    loaded: list[str]  # loaded in this replica now
    context: int
    device: str


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
