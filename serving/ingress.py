"""The HTTP API (FastAPI behind Serve's proxy): OpenAI's routes with retrieval, search, health, metrics, reload.

    POST /v1/chat/completions   retrieval-augmented chat (``"retrieval": false`` turns it off), SSE with stream
    POST /v1/completions        raw completion of a prompt (no retrieval)
    POST /v1/embeddings         the index's embedding model
    GET  /v1/models             the base model, each adapter, the embedding model
    POST /v1/search             retrieval only: {query, k, filter, mode, fusion} -> ranked passages with scores
    POST /admin/reload          switch to the index version LATEST names now
    GET  /healthz               200 once every shard of the current version is loaded, else 503 (no key needed)
    GET  /metrics               Prometheus text: requests, latencies (embed / search / generate; search by mode),
                                batch sizes
    GET  /openapi.json          the OpenAPI document of these routes (no key needed: it holds no secret)
    GET  /docs                  Swagger UI over that document (behind the key, like the routes it shows)

Every error is OpenAI's body ``{"error": {"message", "type", "param", "code"}}``; bad input is a 4xx, never a
500. Requests are parsed here (not by FastAPI's signature binding), so that auth, the body's size and nesting
limits come before any parsing, and malformed JSON, wrong types and limits all get the same 400 shape. The routes
still declare their bodies and answers (:func:`_documented`), so the OpenAPI document says what they take.
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures at runtime, and Serve's
# ingress wrapper resolves string annotations where `Request` is not defined (it became a required query param).

import asyncio
import base64
import json
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any, Literal, TypeVar, cast

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema
from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.exceptions import HTTPException as StarletteHTTPException

from configs.errors import Conflict, InvalidRequest, NotFound, Overloaded, RagtuneError, Unavailable, user_error
from configs.schema.serve import GeneratorConfig, IndexSource, LimitsConfig, RetrievalConfig, is_loopback
from serving.auth import api_key_hashes, key_matches
from serving.deployments import (
    Bursts,
    call_retrying,
    give_back_in_background,
    replica_errors,
    replica_name,
)
from serving.fused import PUBLISH_WAIT_S, FusedIndex, IndexReplica, Local, follow_board
from serving.generation import SamplingParams
from serving.rag import sampling_params
from serving.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChatInput,
    CompletionChoice,
    CompletionChunk,
    CompletionInput,
    CompletionRequest,
    EmbedderInfo,
    Embedding,
    EmbeddingData,
    EmbeddingList,
    EmbeddingRequest,
    EmbeddingUsage,
    ErrorBody,
    ErrorDetail,
    FusionOptions,
    Generated,
    Health,
    ModelCard,
    ModelList,
    Passage,
    PromptInfo,
    Refused,
    Reloaded,
    SearchRequest,
    SearchResponse,
    SearchResult,
    Step,
    TextCompletion,
    Usage,
    check_chat,
    check_completion,
    check_embeddings,
    check_search,
    json_depth,
    lone_surrogate,
)
from serving.versions import VersionPointer, version_name
from sharding.filters import Filter
from sharding.manifest import IndexManifest

log = logging.getLogger("ragtune.serve")

API_VERSION = "1"  # of the HTTP API the OpenAPI document describes (OpenAI's /v1 routes and the extensions)
app = FastAPI(title="ragtune", version=API_VERSION, docs_url=None, redoc_url=None, openapi_url="/openapi.json",
              description="OpenAI-compatible chat, completions and embeddings with retrieval; search, health, "
                          "metrics. Every error is OpenAI's body {\"error\": {\"message\", \"type\", \"param\", "
                          "\"code\"}}. Limits (max_tokens, k, body size, nesting...) are the server's "
                          "`limits` config: a request over one gets a 400 (413 for the body) naming it.")

# The HTTP status of each kind of error the answering path raises (configs.errors). Any other exception, a
# RagtuneError of no kind included (a missing shard, a checksum mismatch), is a 500.
STATUS: dict[type[RagtuneError], int] = {InvalidRequest: 400, NotFound: 404, Conflict: 409, Overloaded: 429,
                                         Unavailable: 503}

T = TypeVar("T")
Req = TypeVar("Req", bound=BaseModel)


class ApiError(Exception):
    """An error answered with ``status`` and OpenAI's error body; the Ingress raises it, or makes it from an error
    of the answering path (:func:`api_error`)."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or {401: "authentication_error", 404: "invalid_request_error", 413: "invalid_request_error",
                             429: "rate_limit_error", 503: "server_error", 504: "timeout"}.get(
            status, "invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, object]:
        """The JSON body."""
        return _error_body(self.message, self.type, self.param, self.code).model_dump()


def _error_body(message: str, type: str, param: str | None, code: str | None) -> ErrorBody:
    return ErrorBody(error=ErrorDetail(message=message, type=type, param=param, code=code))


def api_error(e: BaseException) -> ApiError | None:
    """The HTTP error an exception is answered with: an ApiError raised here, or an error of the answering path
    of a kind in ``STATUS`` (also behind Ray's wrappers); None for anything else (a 500)."""
    cur: BaseException | None = e
    seen: set[int] = set()
    while cur is not None and id(cur) not in seen:  # an ApiError raised by this Ingress, possibly chained
        seen.add(id(cur))
        if isinstance(cur, ApiError):
            return cur
        cur = cur.__cause__ or cur.__context__
    err = user_error(e)
    status = next((code for kind, code in STATUS.items() if isinstance(err, kind)), None)
    if err is None or status is None:
        return None
    return ApiError(status, err.message, param=err.param, code=err.code)


async def abandoned_cancels(call: Awaitable[T]) -> T:
    """Await a call of another deployment; when this request gives it up (its timeout, its client gone), cancel
    the call there too, so that what it holds (a generation slot, a searcher call) is freed at once, not when it
    would have ended. A call in this process (the fused layout's ``Local``) is simply awaited."""
    try:
        return await call
    except asyncio.CancelledError:
        cancel = getattr(call, "cancel", None)  # a DeploymentResponse; Ray's own await does not cancel it
        if callable(cancel):
            cancel()
        raise


def _json(body: BaseModel, status: int = 200) -> JSONResponse:
    return JSONResponse(body.model_dump(), status_code=status)


RETRY_AFTER_S = 1  # what a 429 or 503 tells the client to wait (the Retry-After header)


@app.exception_handler(ApiError)
async def _api_error(request: Request, e: ApiError) -> JSONResponse:
    # overloaded or unavailable: come back soon (OpenAI's clients read Retry-After; theirs retry 429 and 5xx)
    headers = {"Retry-After": str(RETRY_AFTER_S)} if e.status in (429, 503) else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def overloaded(e: BaseException) -> ApiError | None:
    """A full queue of the answering path (Serve's BackPressureError, a deployment's ``max_queued_requests``) as a
    503 to retry shortly; None for any other error."""
    from ray.serve.exceptions import BackPressureError

    cur: BaseException | None = e
    while cur is not None:
        if isinstance(cur, BackPressureError):
            return ApiError(503, "the server is at capacity (its generation queue is full: "
                                 "limits.max_queued_generations); retry shortly", code="overloaded")
        cur = getattr(cur, "cause", None) or cur.__cause__
    return None


class _HeldStream(StreamingResponse):
    """A streamed response that releases its admission slot when it has ended: finished, failed, or its client
    gone, even before its first byte (when its event generator never starts, so its own ``finally`` never runs)."""

    def __init__(self, slot: "Slot", *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.slot = slot

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.slot.release()


QUEUED = 2.0  # a request this many times slower than its route's fastest recent one spent the difference queued
RECENT = 64  # the completions a route's fastest recent time is taken over
RATE_S = 1.0  # the time constant over which a route's busy time and completions are counted (decaying)
SATURATED = 0.9  # a route busy this share of its recent time is saturated: its completion rate is its capacity
MIN_DONE = 3.0  # completions (decayed) a rate is trusted from


class RouteLimit:
    """How many requests of one route an Ingress replica admits at a time, adapted to how long they take.

    A request that takes longer than ``target`` seconds (``limits.latency_target_share`` of the request timeout)
    and over ``QUEUED`` times the route's fastest of its last ``RECENT`` waited in a queue: the route then admits
    at most ``n x target / time taken``, ``n`` the requests in flight when it was admitted (Little's law: at
    saturation, time in the replica grows with the requests in it, so that many finish within the target; the
    queued requests that finish after it, admitted beside it, lower the limit no further); each request done
    within the target admits one more, up to ``ceiling``. A request slow by itself (a long generation: its
    fastest peers are slow too) or admitted alone (nothing of its route ahead of it: the time went elsewhere)
    lowers nothing, so a light load is never refused.

    That reacts once a queued request has finished late; a sudden surge would fill the queue before. So, ahead of
    it: while the route is saturated (busy ``SATURATED`` of its last ``RATE_S`` seconds or so, decaying), its
    completions per busy second are what it can do, and a request is refused when the ones in flight would keep it
    waiting longer than ``target`` (in flight / rate; Little's law again). Below saturation that rate is the
    arrival rate, not a capacity, and nothing is refused on it.
    """

    def __init__(self, ceiling: int, target: float, now: float = 0.0):
        self.ceiling, self.target = ceiling, target
        self.limit, self.in_flight = ceiling, 0
        self.recent: deque[float] = deque(maxlen=RECENT)
        self.slow = 0.0  # seconds the last request that lowered the limit took
        self.t, self.busy, self.finished = now, 0.0, 0.0  # decaying: busy seconds, completions (RATE_S)

    def tick(self, now: float) -> None:
        """Age the busy time and completions to ``now`` (before ``in_flight`` changes)."""
        if now > self.t:
            decay = math.exp(-(now - self.t) / RATE_S)
            self.finished *= decay
            self.busy = self.busy * decay + (RATE_S * (1 - decay) if self.in_flight else 0.0)
            self.t = now

    def wait(self) -> float | None:
        """Seconds a request admitted now would wait behind those in flight, when the route is saturated (its
        rate is then its capacity); None below saturation or before enough completions."""
        if self.busy < SATURATED * RATE_S or self.finished < MIN_DONE:
            return None
        return self.in_flight * self.busy / self.finished

    def done(self, seconds: float, admitted_with: int, now: float) -> None:
        """A request of this route, admitted with ``admitted_with`` in flight (itself included), finished after
        ``seconds`` (at ``now``; ``in_flight`` still counts it)."""
        self.tick(now)
        self.finished += 1
        self.recent.append(seconds)
        if seconds <= self.target:
            self.limit = min(self.ceiling, self.limit + 1)
        elif admitted_with > 1 and seconds > QUEUED * min(self.recent):
            self.limit = max(1, min(self.limit, int(admitted_with * self.target / seconds)))
            self.slow = seconds


class Admission:
    """Requests in flight in this Ingress replica: at most ``limit`` in all (``limits.max_concurrent_requests``),
    and per route at most what its :class:`RouteLimit` admits now (``target``: seconds a request should take,
    ``limits.latency_target_share`` x the request timeout; 0 = no per-route limit). One more is refused at once
    with a 429 (OpenAI's ``rate_limit_exceeded``, Retry-After) instead of waiting in a queue without bound, or
    until its deadline. A request holds its slot until its response ends (a stream until its last event)."""

    def __init__(self, limit: int, target: float = 0.0, clock: Callable[[], float] = time.monotonic,
                 after_burst: Callable[[], None] | None = None):
        self.limit, self.target, self.clock = limit, target, clock
        self.routes: dict[str, RouteLimit] = {}
        # the requests in flight; after_burst: once a burst of them is over, or every TRIM_EVERY_S of requests
        self.bursts = Bursts(after_burst, clock=clock)

    @property
    def in_flight(self) -> int:
        return self.bursts.in_flight

    def route(self, name: str) -> RouteLimit:
        if name not in self.routes:
            self.routes[name] = RouteLimit(self.limit, self.target or math.inf, self.clock())
        return self.routes[name]

    def take(self, route: str = "") -> "Slot":
        if self.in_flight >= self.limit:
            raise ApiError(429, f"this server is answering {self.in_flight} requests, its limit "
                                f"(limits.max_concurrent_requests); retry shortly", code="rate_limit_exceeded")
        r = self.route(route)
        if r.in_flight >= r.limit:
            raise ApiError(429, f"{route} requests wait in a queue here (the last slow one took "
                                f"{r.slow:.1f}s, over {r.target:g}s: limits.latency_target_share of "
                                f"limits.request_timeout_s), so this server answers {r.limit} at a time until they "
                                "speed up; retry shortly", code="rate_limit_exceeded")
        if self.target:
            r.tick(self.clock())
            if (wait := r.wait()) is not None and wait > r.target:
                raise ApiError(429, f"{route} requests queue here: {r.in_flight} in flight would keep a new one "
                                    f"waiting {wait:.1f}s, over {r.target:g}s (limits.latency_target_share of "
                                    "limits.request_timeout_s); retry shortly", code="rate_limit_exceeded")
        self.bursts.enter()
        r.in_flight += 1
        return Slot(self, r)  # counts itself in admitted_with

    def released(self) -> None:
        """One request fewer in flight."""
        self.bursts.leave()


class Slot:
    """One admitted request's place; ``release()`` once (more calls do nothing), which tells its route how long
    the request took from admission to its response's end. Also a context manager."""

    def __init__(self, admission: Admission, route: RouteLimit):
        self.admission: Admission | None = admission
        self.route, self.since, self.admitted_with = route, admission.clock(), route.in_flight

    def release(self) -> None:
        if self.admission is not None:
            if self.admission.target:
                now = self.admission.clock()
                self.route.done(now - self.since, self.admitted_with, now)
            self.route.in_flight -= 1
            self.admission.released()
            self.admission = None

    def hand_over(self) -> "Slot":
        """The same place, held by a new owner (a stream's response); this one releases nothing any more."""
        new = Slot.__new__(Slot)
        new.admission, new.route, new.since, new.admitted_with = self.admission, self.route, self.since, \
            self.admitted_with
        self.admission = None
        return new

    def __enter__(self) -> "Slot":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
    return _json(_error_body(f"{request.method} {request.url.path}: {e.detail}", "invalid_request_error", None, code),
                 e.status_code)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
    # FastAPI's own validation (parameters it binds), in OpenAI's shape rather than FastAPI's {"detail": [...]}
    errors = e.errors()
    err = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    where = ".".join(str(p) for p in err["loc"] if p not in ("body", "query", "path", "header")) or None
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return _json(_error_body(f"{where + ': ' if where else ''}{err['msg']}{more}", "invalid_request_error", where,
                             "invalid_request"), 400)


# --- the OpenAPI document -------------------------------------------------------------------------------------------
#
# The routes read their bodies themselves (``Ingress._read``: auth, size and nesting limits before parsing), so
# FastAPI cannot see the request models in their signatures: each route names them in ``_documented``, and
# ``_openapi`` adds their JSON schemas to the document's components.

REQUEST_MODELS: dict[str, type[BaseModel]] = {}  # component name -> request model, filled by _documented
ERRORS = {  # status -> when; each answered with OpenAI's error body
    400: "invalid request: not JSON, nested deeper than limits.max_json_depth, a wrong field, or over a limit",
    401: "missing or invalid API key (`Authorization: Bearer <key>`)",
    404: "the model named does not exist",
    409: "the index version cannot be switched to (its shards do not match the shard groups)",
    413: "the body is larger than limits.max_body_bytes",
    429: "this replica answers limits.max_concurrent_requests already: retry after Retry-After seconds",
    503: "not ready, or at capacity (the generation queue is full): retry after Retry-After seconds",
    504: "the request took longer than limits.request_timeout_s",
}
RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}}


def _documented(ok: type[BaseModel] | None, *, body: type[BaseModel] | None = None, errors: tuple[int, ...] = (),
                stream: bool = False, auth: bool = True, ok_media: str | None = None) -> dict[str, Any]:
    """The OpenAPI arguments of a route: its request ``body`` (read by ``_read``, not bound by FastAPI), its 200
    answer (``ok``; ``stream``: or server-sent events; ``ok_media``: another media type), its error statuses (with
    401 when ``auth``), each with OpenAI's error body."""
    responses: dict[int | str, dict[str, Any]] = {}
    if ok is not None:
        responses[200] = {"model": ok}
        if stream:
            responses[200]["content"] = {"text/event-stream": {"schema": {  # one event
                "type": "object", "required": ["data"], "properties": {"data": {"type": "string", "description": (
                    "with stream: true, each event's data is a chunk's JSON; an error in OpenAI's format if the "
                    "stream fails; then [DONE]")}}}}}
    elif ok_media is not None:
        responses[200] = {"content": {ok_media: {"schema": {"type": "string"}}}, "description": "Successful Response"}
    for status in sorted({*errors, *((401,) if auth else ())}):
        responses[status] = {"model": ErrorBody, "description": ERRORS[status]}
        if status in (429, 503):
            responses[status]["headers"] = RETRY_AFTER
    extra: dict[str, Any] = {}
    if auth:
        extra["security"] = [{"bearer": []}]
    if body is not None:
        REQUEST_MODELS[body.__name__] = body
        extra["requestBody"] = {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{body.__name__}"}}}}
    return {"responses": responses, "openapi_extra": extra, "response_model": None}


def _openapi() -> dict[str, Any]:
    """FastAPI's document of the routes, plus the request models the routes name and the bearer scheme."""
    if app.openapi_schema is None:
        doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes,
                          servers=app.servers or None)
        components = doc.setdefault("components", {})
        schemas = components.setdefault("schemas", {})
        _, defs = models_json_schema([(m, "validation") for m in REQUEST_MODELS.values()],
                                     ref_template="#/components/schemas/{model}")
        for name, schema in defs.get("$defs", {}).items():
            if name in schemas and schemas[name] != schema:  # a response model of the same name, another shape
                raise ValueError(f"the OpenAPI component {name!r} is both a request and a response model")
            schemas[name] = schema
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer", "description": (
            "an API key of the server's auth.api_keys (or its environment variable); a server with none answers "
            "only on 127.0.0.1, without a key")}}
        app.openapi_schema = doc
    return app.openapi_schema


app.openapi = _openapi  # type: ignore[method-assign]


def _sse(data: BaseModel | dict[str, object] | str) -> bytes:
    if isinstance(data, BaseModel):
        data = data.model_dump()
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


class Metrics:
    """Prometheus metrics of this Ingress replica (one registry per replica)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("ragtune_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.latency = Histogram("ragtune_request_seconds", "request latency by route (whole stream)", ["route"],
                                 registry=r, buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
        stage_buckets = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30)
        self.stage = Histogram("ragtune_stage_seconds", "latency of each stage: embed, search, generate",
                               ["stage"], registry=r, buckets=stage_buckets)
        self.search = Histogram("ragtune_search_seconds", "latency of the search stage by mode: dense, lexical, "
                                "hybrid (fan-out, merge, fusion, docstore)", ["mode"], registry=r,
                                buckets=stage_buckets)
        self.batch = Histogram("ragtune_batch_size", "size of the batch a request was served in", ["deployment"],
                               registry=r, buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.tokens = Counter("ragtune_tokens", "tokens by kind: prompt, completion", ["kind"], registry=r)
        self.version = Gauge("ragtune_index_version_info", "the index version answered from", ["version"],
                             registry=r)
        self.in_flight = Gauge("ragtune_requests_in_flight", "requests this replica is answering (streams until "
                               "their last event)", registry=r)
        self.rejected = Counter("ragtune_requests_rejected", "requests refused at once with a 429: "
                                "limits.max_concurrent_requests in flight", registry=r)


Kind = Literal["chat", "completion"]


@serve.deployment(name="Ingress")
@serve.ingress(app)
class Ingress:
    """The HTTP API over the other deployments' handles. ``generator`` gives the model names and the sampling
    defaults, ``retrieval`` the chat's default ``k``; only the API keys' sha256 (``key_hashes``) travel here, plus
    the environment variable the replica reads more keys from (``auth.api_keys_env``).

    Split layout: ``embedder`` is the Embedder, ``retriever`` the Retriever (which holds the index version).
    Fused layout (``fused`` given): this replica holds the whole index itself (``serving.fused.IndexReplica``,
    called through ``Local``, so a search crosses no process) and a version pointer
    (``serving.versions.VersionPointer``: polling ``index.poll_interval_s``, ``/admin/reload``), kept in step with
    the other replicas' through the ``board`` (``serving.fused.VersionBoard``). Fused with the index apart
    (``shards.fused_in_ingress: false``: ``index`` given, not ``fused``): ``embedder`` and ``retriever`` are both
    the IndexReplica deployment, called with retries (a replica that died mid-call is retried on another), and
    this one Ingress holds the version pointer.
    """

    def __init__(self, embedder: DeploymentHandle | None, retriever: DeploymentHandle | None,
                 generator: DeploymentHandle, *, generation: GeneratorConfig, retrieval: RetrievalConfig,
                 limits: LimitsConfig, key_hashes: list[str], api_keys_env: str | None,
                 index: IndexSource | None = None, fused: FusedIndex | None = None,
                 board: DeploymentHandle | None = None):
        self.generator = generator
        self.pointer: VersionPointer | None = None
        self.index_replica: IndexReplica | None = None
        self.board, self.synced = board, asyncio.Event()
        self.follower: asyncio.Task[None] | None = None
        if fused is not None:
            if index is None:
                raise ValueError("the fused layout needs the index")
            self.index_replica = IndexReplica(index, fused.embedder, retrieval, fused.resources,
                                              trim_after_bursts=False)
            embedder = retriever = cast(DeploymentHandle, Local(self.index_replica))  # called the same way
        if index is not None:  # fused: the version pointer is here (the index in this replica, or behind it)
            in_here = fused is not None and board is not None  # replicas that switch, in step by the board
            self.pointer = VersionPointer(index, retrieval.mode, on_switch=self._publish if in_here else None)
        if embedder is None or retriever is None:
            raise ValueError("the split layout needs the Embedder's and the Retriever's handles")
        self.embedder, self.retriever = embedder, retriever
        self.generation, self.retrieval, self.limits = generation, retrieval, limits
        self.keys = set(key_hashes) | api_key_hashes([], api_keys_env)
        if not self.keys:
            log.warning("NO API KEYS: this server answers without authentication, and only to 127.0.0.1 (set "
                        "%s to require keys)", api_keys_env or "auth.api_keys")
        self.models = [generation.name, *generation.adapters]
        self.embedder_info: EmbedderInfo | None = None  # model name and dimension: fixed for the deployment
        self.metrics = Metrics()
        self.admission = Admission(limits.max_concurrent_requests,
                                   limits.latency_target_share * limits.request_timeout_s,
                                   after_burst=give_back_in_background)
        self.metrics.in_flight.set_function(lambda: self.admission.in_flight)
        self.created = int(time.time())
        self.retry_errors = replica_errors()

    def _index_call(self, handle: DeploymentHandle, method: str, *args: Any, retry_s: float | None = None) -> Any:
        """A call of the deployment that embeds or searches, retried on another replica while one is replaced, for
        ``retry_s`` (default ``retrieval.retries_s``; the request's own timeout bounds it anyway)."""
        deadline = time.monotonic() + (self.retrieval.retries_s if retry_s is None else retry_s)
        return call_retrying(handle, method, deadline, self.retry_errors, *args)

    def check_health(self) -> None:
        """Serve's health check: in the fused layout, whether this replica's index is loaded."""
        if self.index_replica is not None:
            self.index_replica.check_health()

    # --- plumbing -----------------------------------------------------------------------------------------------------

    def _auth(self, request: Request) -> None:
        if not self.keys:
            host = request.client.host if request.client else None
            if host and not is_loopback(host):  # no client address: a local transport
                raise ApiError(401, "this server has no API keys configured and answers only on 127.0.0.1",
                               code="invalid_api_key")
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "missing API key: send the header `Authorization: Bearer <key>`",
                           code="invalid_api_key")
        if not key_matches(token, self.keys):
            raise ApiError(401, "invalid API key", code="invalid_api_key")

    async def _read(self, request: Request, model: type[Req]) -> Req:
        """Auth, body size, JSON and schema -> the request object, or a 4xx."""
        self._auth(request)
        limit = self.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"request body of {declared} bytes exceeds this server's limit of {limit} bytes "
                                "(limits.max_body_bytes)", code="request_too_large")
        body = bytearray()
        async for chunk in request.stream():  # chunked bodies carry no length: count while reading
            body += chunk
            if len(body) > limit:
                raise ApiError(413, f"request body exceeds this server's limit of {limit} bytes "
                                    "(limits.max_body_bytes)", code="request_too_large")
        openers = body.count(b"[") + body.count(b"{")  # the depth is at most this: most bodies stop here
        if openers > self.limits.max_json_depth and (depth := json_depth(body)) > self.limits.max_json_depth:
            raise ApiError(400, f"the body nests {depth} levels deep, over this server's limit of "
                                f"{self.limits.max_json_depth} (limits.max_json_depth)", code="invalid_json")
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise ApiError(400, f"the body is not valid JSON ({e})", code="invalid_json") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the body must be a JSON object", code="invalid_json")
        if (where := lone_surrogate(body, data)) is not None:
            raise ApiError(400, f"{where}: holds a lone UTF-16 surrogate (an escape \\ud800-\\udfff without its "
                                "pair), which is not text; send valid Unicode", param=where, code="invalid_request")
        try:
            return model.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or None
            raise ApiError(400, f"{where + ': ' if where else ''}{err['msg']}"
                                + (f" (and {len(e.errors()) - 1} more problems)" if len(e.errors()) > 1 else ""),
                           param=where, code="invalid_request") from None

    def _admit(self, route: str) -> Slot:
        """A place for one request on ``route``, or a 429 at once (counted in the metrics) when the replica has
        ``limits.max_concurrent_requests`` in flight."""
        try:
            return self.admission.take(route)
        except ApiError:
            self.metrics.requests.labels(route, "429").inc()
            self.metrics.rejected.inc()
            raise

    async def _timed(self, route: str, work: Awaitable[T], deadline: float | None = None) -> T:
        """Run a route's work with the request timeout, or until the request's ``deadline`` (``perf_counter``
        time: a request done in steps has one deadline for all of them); count and time it; any failure in
        OpenAI's format."""
        t0 = time.perf_counter()
        status = 200
        timeout = self.limits.request_timeout_s if deadline is None else max(0.0, deadline - t0)
        try:
            return await asyncio.wait_for(work, timeout)
        except TimeoutError:
            status = 504
            raise ApiError(504, f"the request took longer than {self.limits.request_timeout_s:g}s "
                                "(limits.request_timeout_s)", code="timeout") from None
        except Exception as e:
            api = api_error(e) or overloaded(e)
            status = api.status if api else 500
            if api is None:
                log.exception("%s failed", route)
                raise ApiError(500, f"internal error ({type(e).__name__})", code="internal_error") from None
            raise api from None
        finally:
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - t0)

    def _generator_for(self, model: str) -> DeploymentHandle:
        if model not in self.models:
            raise ApiError(404, f"model {model!r} does not exist; models served: {', '.join(self.models)}",
                           param="model", code="model_not_found")
        if model == self.generation.name:
            return self.generator
        return self.generator.options(multiplexed_model_id=model)

    def _params(self, req: ChatCompletionRequest | CompletionRequest, max_tokens: int | None) -> SamplingParams:
        return sampling_params(self.generation.defaults, max_tokens=max_tokens, temperature=req.temperature,
                               top_p=req.top_p, stop=req.stops(), seed=req.seed)

    async def _embedder_info(self) -> EmbedderInfo:
        if self.embedder_info is None:
            self.embedder_info = await self._index_call(self.embedder, "info")
        return self.embedder_info

    async def _retrieve(self, query: str, k: int, filter: Filter | None, mode: str | None,
                        fusion: FusionOptions | None, param: str = "mode") -> SearchResult:
        overrides = fusion.overrides() if fusion else None
        if self.pointer is None:
            out: SearchResult = await abandoned_cancels(
                self.retriever.search.remote(query, k, filter, mode, overrides, param))
        else:  # fused: this replica's own index, the version it serves (in step with the other replicas)
            await self._follow(wait=True)
            out = await self._index_call(self.retriever, "search", self.pointer.version, query, k, filter, mode,
                                         overrides, param)
        if out.mode != "lexical":  # lexical searches embed nothing
            self.metrics.stage.labels("embed").observe(out.timings.embed_s)
            self.metrics.batch.labels("embedder").observe(out.embed_batch)
        self.metrics.stage.labels("search").observe(out.timings.search_s)
        self.metrics.search.labels(out.mode).observe(out.timings.search_s)
        self.metrics.version.clear()
        self.metrics.version.labels(version_name(out.version)).set(1)
        return out

    async def _prepare(self, version: str, manifest: IndexManifest) -> None:
        """Fused: load a new version (shards and docstore) in this replica before switching to it; apart, in one
        IndexReplica, then in every other one (they follow the board) before switching."""
        await self._index_call(self.retriever, "prepare", version, retry_s=max(self.retrieval.retries_s, 60))
        if self.index_replica is None and self.board is not None:
            behind = await self.board.publish.remote(version)
            if behind:
                log.warning("index version %s: IndexReplica replicas %s have not loaded it after %.0fs; they load "
                            "it at their first search of it", version, ", ".join(behind), PUBLISH_WAIT_S)

    async def _follow(self, wait: bool = False) -> None:
        """Fused: start following the board (and polling LATEST) once, from the first request that needs the
        version; ``wait``: until the board has answered once, so that a new replica never answers a search from
        another version than the others'."""
        if self.pointer is None:
            return
        self.pointer.poll(self._prepare)
        if self.index_replica is None:  # apart: the IndexReplica replicas follow the board, not this Ingress
            return
        if self.follower is None and self.board is not None:
            self.follower = asyncio.get_running_loop().create_task(
                follow_board(self.board, self.pointer, replica_name(), self._prepare, self.synced))
        if wait and self.board is not None and not self.synced.is_set():
            await self.synced.wait()

    async def _publish(self, version: str) -> None:
        """Fused: after this replica switched, have every other replica switch before the switch is answered."""
        behind = await self.board.publish.remote(version) if self.board is not None else []
        if behind:
            log.warning("index version %s: replicas %s have not switched to it after %.0fs; they answer from the "
                        "version before until they do", version, ", ".join(behind), PUBLISH_WAIT_S)

    # --- routes -------------------------------------------------------------------------------------------------------

    @app.get("/healthz", response_model=None, responses={200: {"model": Health}, 503: {
        "model": Health, "description": "not every shard of the version is loaded (or the retriever does not answer)"}})
    async def healthz(self) -> JSONResponse:
        try:
            await self._follow()
            ready = (self.retriever.ready.remote() if self.pointer is None else
                     self.retriever.ready.remote(self.pointer.version))
            state: Health = await asyncio.wait_for(ready, 10)
        except Exception as e:
            state = Health(ready=False, reason=f"retriever not answering ({type(e).__name__})")
        return _json(state, 200 if state.ready else 503)

    @app.get("/docs", include_in_schema=False)
    async def docs(self, request: Request) -> HTMLResponse:
        """Swagger UI over /openapi.json, behind the key like the routes it calls (without keys: on 127.0.0.1)."""
        self._auth(request)
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(openapi_url=f"{root}{app.openapi_url}", title=f"{app.title} API")

    @app.get("/metrics", **_documented(None, ok_media="text/plain"))
    async def prometheus(self, request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        self._auth(request)
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", **_documented(ModelList, errors=(503, 504)))
    async def list_models(self, request: Request) -> JSONResponse:
        self._auth(request)
        embedding_model = (await self._embedder_info()).model
        data = [ModelCard(id=m, created=self.created, kind="base" if m == self.generation.name else "adapter")
                for m in self.models]
        data.append(ModelCard(id=embedding_model, created=self.created, kind="embedding"))
        return _json(ModelList(data=data))

    @app.post("/admin/reload", **_documented(Reloaded, errors=(400, 404, 409, 503, 504)))
    async def reload(self, request: Request) -> JSONResponse:
        self._auth(request)
        await self._follow(wait=True)
        reloaded: Reloaded = await self._timed("reload", self.retriever.reload.remote() if self.pointer is None else
                                               self.pointer.reload(self._prepare))
        return _json(reloaded)

    @app.post("/v1/search", **_documented(SearchResponse, body=SearchRequest,
                                          errors=(400, 413, 429, 503, 504)))
    async def search(self, request: Request) -> JSONResponse:
        async def work() -> SearchResponse:
            req = await self._read(request, SearchRequest)
            check_search(req, self.limits)
            out = await self._retrieve(req.query, req.k, req.filter, req.mode, req.fusion)
            return SearchResponse(query=req.query, k=req.k, mode=out.mode, version=version_name(out.version),
                                  data=out.passages)

        with self._admit("search"):
            return _json(await self._timed("search", work()))

    @app.post("/v1/embeddings", **_documented(EmbeddingList, body=EmbeddingRequest,
                                              errors=(400, 404, 413, 429, 503, 504)))
    async def embeddings(self, request: Request) -> JSONResponse:
        async def work() -> EmbeddingList:
            req = await self._read(request, EmbeddingRequest)
            check_embeddings(req, self.limits)
            info = await self._embedder_info()
            if req.model != info.model:
                raise ApiError(404, f"embedding model {req.model!r} does not exist; this server embeds with "
                                    f"{info.model!r}", param="model", code="model_not_found")
            if req.dimensions is not None and req.dimensions != info.dim:
                raise ApiError(400, f"dimensions = {req.dimensions}: {info.model} gives {info.dim} only",
                               param="dimensions")
            t0 = time.perf_counter()
            out: list[Embedding] = await self._index_call(self.embedder, "embed_many", req.texts())
            self.metrics.stage.labels("embed").observe(time.perf_counter() - t0)
            data = []
            for i, e in enumerate(out):
                self.metrics.batch.labels("embedder").observe(e.batch)
                vector: list[float] | str = (base64.b64encode(np.asarray(e.vector, "<f4").tobytes()).decode()
                                             if req.encoding_format == "base64" else
                                             np.asarray(e.vector, np.float32).tolist())
                data.append(EmbeddingData(index=i, embedding=vector))
            tokens = sum(e.tokens for e in out)
            return EmbeddingList(model=info.model, data=data,
                                 usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens))

        with self._admit("embeddings"):
            return _json(await self._timed("embeddings", work()))

    @app.post("/v1/chat/completions", **_documented(ChatCompletion, body=ChatCompletionRequest, stream=True,
                                                    errors=(400, 404, 413, 429, 503, 504)))
    async def chat(self, request: Request) -> Response:
        async def start() -> tuple[ChatCompletionRequest, DeploymentHandle, ChatInput]:
            req = await self._read(request, ChatCompletionRequest)
            check_chat(req, self.limits)
            handle = self._generator_for(req.model)
            opts = req.retrieval_options()
            passages: list[Passage] = []
            if opts.enabled:
                k = opts.k or self.retrieval.k
                passages = (await self._retrieve(req.messages[-1].text(), k, opts.filter, opts.mode,
                                                 opts.fusion, "retrieval.mode")).passages
            return req, handle, ChatInput(messages=[m.plain() for m in req.messages], passages=passages,
                                          params=self._params(req, req.max_new_tokens()))

        with self._admit("chat") as slot:  # a stream takes the slot over, to its last event
            deadline = time.perf_counter() + self.limits.request_timeout_s  # one for retrieval and generation
            req, handle, payload = await self._timed("chat.prepare", start(), deadline)
            payload = replace(payload, deadline=time.time() + deadline - time.perf_counter())  # the engine's too
            if req.stream:
                return await self._stream("chat", req, handle, payload, slot, deadline)
            return _json(await self._timed("chat", self._complete("chat", req, handle, payload), deadline))

    @app.post("/v1/completions", **_documented(TextCompletion, body=CompletionRequest, stream=True,
                                               errors=(400, 404, 413, 429, 503, 504)))
    async def completions(self, request: Request) -> Response:
        async def start() -> tuple[CompletionRequest, DeploymentHandle, CompletionInput]:
            req = await self._read(request, CompletionRequest)
            check_completion(req, self.limits)
            handle = self._generator_for(req.model)
            return req, handle, CompletionInput(prompt=req.text(), params=self._params(req, req.max_tokens))

        with self._admit("completions") as slot:
            deadline = time.perf_counter() + self.limits.request_timeout_s  # one for retrieval and generation
            req, handle, payload = await self._timed("completions.prepare", start(), deadline)
            payload = replace(payload, deadline=time.time() + deadline - time.perf_counter())  # the engine's too
            if req.stream:
                return await self._stream("completion", req, handle, payload, slot, deadline)
            return _json(await self._timed("completions", self._complete("completion", req, handle, payload), deadline))

    # --- generation ---------------------------------------------------------------------------------------------------

    def _record(self, prompt_tokens: int, completion_tokens: int, batch: int, seconds: float) -> None:
        self.metrics.stage.labels("generate").observe(seconds)
        self.metrics.batch.labels("generator").observe(batch or 1)
        self.metrics.tokens.labels("prompt").inc(prompt_tokens)
        self.metrics.tokens.labels("completion").inc(completion_tokens)

    async def _complete(self, kind: Kind, req: ChatCompletionRequest | CompletionRequest, handle: DeploymentHandle,
                        payload: ChatInput | CompletionInput) -> ChatCompletion | TextCompletion:
        t0 = time.perf_counter()
        out: Generated | Refused = await abandoned_cancels(handle.complete.remote(payload))
        if isinstance(out, Refused):
            raise out.error
        self._record(out.prompt.prompt_tokens, out.completion_tokens, out.batch, time.perf_counter() - t0)
        usage = Usage.of(out.prompt.prompt_tokens, out.completion_tokens)
        if kind == "chat":
            return ChatCompletion(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=req.model,
                                  usage=usage, citations=out.prompt.citations,
                                  choices=[ChatChoice(message=AssistantMessage(content=out.text),
                                                      finish_reason=out.finish_reason)])
        return TextCompletion(id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), model=req.model, usage=usage,
                              choices=[CompletionChoice(text=out.text, finish_reason=out.finish_reason)])

    async def _stream(self, kind: Kind, req: ChatCompletionRequest | CompletionRequest, handle: DeploymentHandle,
                      payload: ChatInput | CompletionInput, slot: Slot, deadline: float) -> Response:
        """Server-sent events. The first event (the prompt) is awaited before answering 200, so that a prompt
        that does not fit is still a 400; later failures end the stream with an error event. The response holds
        the request's admission ``slot`` until it has ended, however it ends, and ends by the request's
        ``deadline`` (set when it was admitted: retrieval's time counts)."""
        t0 = time.perf_counter()
        gen = handle.options(stream=True).stream.remote(payload)
        assert isinstance(gen, DeploymentResponseGenerator)
        async def first() -> PromptInfo:
            event: PromptInfo | Refused = await gen.__anext__()
            if isinstance(event, Refused):
                raise event.error
            return event

        try:
            prompt = await self._timed(f"{kind}.stream", first(), deadline)
        except BaseException:  # timed out or refused before its first event: nothing runs on for it
            gen.cancel()
            raise
        created, rid = int(time.time()), f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(text: str, finish: str | None) -> ChatCompletionChunk | CompletionChunk:
            if kind == "chat":
                return ChatCompletionChunk(id=rid, created=created, model=req.model, choices=[
                    ChatChunkChoice(delta=ChatDelta(content=text or None), finish_reason=finish)])
            return CompletionChunk(id=rid, created=created, model=req.model,
                                   choices=[CompletionChoice(text=text, finish_reason=finish)])

        def usage_chunk(usage: Usage) -> ChatCompletionChunk | CompletionChunk:
            if kind == "chat":
                return ChatCompletionChunk(id=rid, created=created, model=req.model, choices=[], usage=usage)
            return CompletionChunk(id=rid, created=created, model=req.model, choices=[], usage=usage)

        async def events() -> AsyncIterator[bytes]:
            status, completion_tokens, batch, ended = 200, 0, 1, False
            try:
                if kind == "chat":
                    yield _sse(ChatCompletionChunk(id=rid, created=created, model=req.model, choices=[
                        ChatChunkChoice(delta=ChatDelta(role="assistant", content=""))], citations=prompt.citations))
                while True:
                    remaining = deadline - time.perf_counter()
                    if remaining <= 0:
                        raise TimeoutError
                    try:
                        step: Step = await asyncio.wait_for(gen.__anext__(), remaining)
                    except StopAsyncIteration:
                        ended = True
                        break
                    completion_tokens = step.completion_tokens
                    batch = max(batch, step.batch)
                    if step.text or step.finish_reason:
                        yield _sse(chunk(step.text, step.finish_reason))
                if include_usage:
                    yield _sse(usage_chunk(Usage.of(prompt.prompt_tokens, completion_tokens)))
            except Exception as e:  # the status line is sent: report in the stream, as OpenAI does
                api = api_error(e)
                if isinstance(e, TimeoutError):
                    api = ApiError(504, f"the stream took longer than {self.limits.request_timeout_s:g}s "
                                        "(limits.request_timeout_s)", code="timeout")
                elif api is None:
                    log.exception("stream failed")
                    api = ApiError(500, f"internal error ({type(e).__name__})", code="internal_error")
                status = api.status
                yield _sse(api.body())
            finally:
                if not ended:  # timed out, failed, or its client gone (the stream cancelled here): free its slot
                    gen.cancel()
                    if status == 200:
                        status = 499  # the client closed the connection (nginx's code)
                self._record(prompt.prompt_tokens, completion_tokens, batch, time.perf_counter() - t0)
                self.metrics.requests.labels(f"{kind}.stream", str(status)).inc()
                self.metrics.latency.labels(f"{kind}.stream").observe(time.perf_counter() - t0)
            yield _sse("[DONE]")

        return _HeldStream(slot.hand_over(), events(), media_type="text/event-stream",
                           headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
