"""A client of ragtune's HTTP API (``serving.ingress``): the ``openai`` client with ragtune's extensions.

    client = RagtuneClient("http://127.0.0.1:8000", api_key=os.environ.get("RAGTUNE_API_KEY"))
    reply = client.chat([{"role": "user", "content": "How is an index version switched?"}], model="base",
                        retrieval=Retrieval(k=5, mode="hybrid"))
    print(reply.text, [c["doc_id"] for c in reply.citations])

OpenAI's routes go through the ``openai`` package (request building, SSE parsing, error types), and ragtune's
extensions ride on it: ``retrieval`` is sent in ``extra_body``; ``citations`` are read from the fields the openai
client keeps beside OpenAI's own (``model_extra``). ``/v1/search`` and ``/admin/reload`` are not OpenAI routes:
they are the openai client's plain ``post``. Every failure is a :class:`RagtuneError` (of the kind its HTTP status
says) whose message names the URL and the fix, the way ``ragtune ask`` prints it. No Ray is imported here: the CLI
and the compare job's measurements run it outside the cluster's processes.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal, TypedDict, cast

from configs.errors import Conflict, InvalidRequest, NotFound, RagtuneError, Unavailable

if TYPE_CHECKING:  # openai is imported where a client is made: a third of a second that `ragtune --help` skips
    import httpx2
    import openai

# The openai client refuses to start without a key; a server without keys gets none (see RagtuneClient.headers).
NO_KEY = "none"
FIX_SERVER = ("Fix: start the server with `ragtune serve -c configs/serve/<x>.yaml`, or pass --url, or --config to "
              "answer in this process")
FIX_KEY = "Fix: pass --api-key or set RAGTUNE_API_KEY"
# The error kind of each HTTP status the Ingress answers with (its STATUS, read backwards); others: RagtuneError.
KINDS: dict[int, type[RagtuneError]] = {400: InvalidRequest, 404: NotFound, 409: Conflict, 503: Unavailable}


class Citation(TypedDict):
    """A passage that was in the prompt, numbered ``n`` as the answer cites it: the JSON of the server's
    ``serving.schemas.Citation``, kept as the plain dict it arrives as (what ``ragtune ask --json`` prints)."""

    n: int | None
    rank: int
    score: float
    chunk_id: int
    doc_id: str | None
    title: str | None
    text: str | None
    metadata: dict[str, Any]
    truncated: bool


@dataclass(frozen=True)
class Retrieval:
    """ragtune's ``retrieval`` extension of a chat request; a field left None is the server's ``retrieval`` setting.

    Nothing is checked here: the server answers a bad value with a 400 that names it.
    """

    k: int | None = None
    filter: Mapping[str, Any] | None = None
    mode: Literal["auto", "dense", "lexical", "hybrid"] | None = None
    fusion: Mapping[str, Any] | None = None  # method, weight, rrf_k, depth

    def body(self) -> dict[str, Any]:
        return {name: value for name, value in asdict(self).items() if value is not None}


@dataclass(frozen=True)
class ChatReply:
    text: str
    citations: list[Citation]  # empty without retrieval
    finish_reason: str | None


@dataclass(frozen=True)
class ChatDelta:
    """One event of a streamed answer: new text, and in the first event the passages in the prompt."""

    text: str
    finish_reason: str | None = None
    citations: list[Citation] | None = None


@dataclass(frozen=True)
class ServedModel:
    id: str
    kind: str | None  # base, adapter or embedding


@dataclass(frozen=True)
class SearchResult:
    query: str
    k: int
    mode: str  # the mode the server searched in (auto resolved)
    version: str  # the index version that answered
    passages: list[dict[str, Any]]  # rank, score, chunk_id, doc_id, title, text, metadata


class RagtuneClient:
    """ragtune's HTTP API at ``url`` (the app's root: ``/v1/...`` and ``/admin/...`` are below it).

    Args:
        url: e.g. ``http://127.0.0.1:8000``, or with the app's route prefix.
        api_key: the server's key; None sends no ``Authorization`` header (a server without keys answers only on
            127.0.0.1).
        timeout: seconds for a whole request (connect, send, each read).
        max_retries: retries of a failed connection, a 429 or a 5xx, with the openai client's backoff. 0 where a
            latency is measured or a timeout must bound the whole wait; a 429 or 503 from ragtune's bounded
            queues says the server is full, and whether to wait is the caller's choice.
        http_client: the transport (tests pass ``httpx2.Client(transport=httpx2.MockTransport(...))``).
    """

    def __init__(self, url: str, *, api_key: str | None = None, timeout: float = 120.0, max_retries: int = 0,
                 http_client: httpx2.Client | None = None):
        import openai

        self.url = url.rstrip("/")
        # api_key is always given, so that the openai client never falls back on OPENAI_API_KEY: a key for
        # OpenAI must not be sent to this server
        self.openai = openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key or NO_KEY, timeout=timeout,
                                    max_retries=max_retries, http_client=http_client)
        # per request: OpenAI's organisation and project (from OPENAI_ORG_ID, OPENAI_PROJECT_ID) are not this
        # server's business, and without a key no Authorization header goes out at all
        self.headers: dict[str, str | openai.Omit] = {"OpenAI-Organization": openai.omit,
                                                      "OpenAI-Project": openai.omit}
        if not api_key:
            self.headers["Authorization"] = openai.omit

    def __enter__(self) -> RagtuneClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.openai.close()

    # --- OpenAI's routes ------------------------------------------------------------------------------------------

    def chat(self, messages: Sequence[Mapping[str, str]], *, model: str, retrieval: Retrieval | bool = True,
             max_tokens: int | None = None, temperature: float | None = None) -> ChatReply:
        """``POST /v1/chat/completions``: the answer and the passages it was given.

        Args:
            messages: the conversation, ``{"role", "content"}`` each.
            model: the base model's or an adapter's name (:meth:`models`).
            retrieval: True retrieves as the server is set to, False not at all (closed-book), a
                :class:`Retrieval` as it says.
            max_tokens: new tokens at most (None: the server's default).
            temperature: 0 is greedy (None: the server's default).
        """
        with self._errors("/v1/chat/completions"):
            r = self.openai.chat.completions.create(**self._chat_args(messages, model, retrieval, max_tokens,
                                                                      temperature))
        choice = r.choices[0]
        return ChatReply(choice.message.content or "", _citations(r) or [], choice.finish_reason)

    def chat_stream(self, messages: Sequence[Mapping[str, str]], *, model: str,
                    retrieval: Retrieval | bool = True, max_tokens: int | None = None,
                    temperature: float | None = None) -> Iterator[ChatDelta]:
        """``POST /v1/chat/completions`` with ``stream``: the answer as it is generated. A stream that the server
        ends with an error event raises, as a failed request does. Arguments as :meth:`chat`'s."""
        with self._errors("/v1/chat/completions"):
            stream = self.openai.chat.completions.create(
                **self._chat_args(messages, model, retrieval, max_tokens, temperature), stream=True)
            with stream:
                for chunk in stream:
                    finish = next((c.finish_reason for c in chunk.choices if c.finish_reason), None)
                    yield ChatDelta("".join(c.delta.content or "" for c in chunk.choices), finish, _citations(chunk))

    def models(self) -> list[ServedModel]:
        """``GET /v1/models``: the base model, each adapter, the embedding model."""
        with self._errors("/v1/models"):
            page = self.openai.models.list(extra_headers=self.headers)
        return [ServedModel(m.id, (m.model_extra or {}).get("kind")) for m in page.data]

    def base_model(self) -> str:
        """The name the base model is served as (the model of ``kind`` base)."""
        base = next((m.id for m in self.models() if m.kind == "base"), None)
        if base is None:
            raise RagtuneError(f"{self.url}/v1/models lists no model of kind 'base'. Fix: pass the model's name "
                               "(--model), or --url of a `ragtune serve`")
        return base

    # --- ragtune's routes -----------------------------------------------------------------------------------------

    def search(self, query: str, *, k: int | None = None, filter: Mapping[str, Any] | None = None,
               mode: str | None = None, fusion: Mapping[str, Any] | None = None) -> SearchResult:
        """``POST /v1/search``: the passages retrieval gives ``query``, best first (None: the server's setting)."""
        body = {"query": query, **{name: value for name, value in
                                   (("k", k), ("filter", filter), ("mode", mode), ("fusion", fusion))
                                   if value is not None}}
        with self._errors("/v1/search"):
            out = self.openai.post("/search", cast_to=dict, body=body, options={"headers": self.headers})
        return SearchResult(out["query"], out["k"], out["mode"], out["version"], out["data"])

    def reload(self, *, timeout: float | None = None) -> dict[str, Any]:
        """``POST /admin/reload``: switch to the index version LATEST names now; the server's account of it.

        Args:
            timeout: seconds to wait instead of the client's (every shard group loads the new version first).
        """
        options: dict[str, Any] = {"headers": self.headers, **({"timeout": timeout} if timeout is not None else {})}
        with self._errors("/admin/reload"):  # outside /v1: the absolute URL
            return self.openai.post(f"{self.url}/admin/reload", cast_to=dict, options=cast(Any, options))

    def health(self) -> dict[str, Any]:
        """``GET /healthz``: the server's readiness once every shard of the current version is loaded; before that
        the server answers 503, raised as :class:`Unavailable`."""
        with self._errors("/healthz"):  # outside /v1: the absolute URL
            return self.openai.get(f"{self.url}/healthz", cast_to=dict, options={"headers": self.headers})

    # --- plumbing -------------------------------------------------------------------------------------------------

    def _chat_args(self, messages: Sequence[Mapping[str, str]], model: str, retrieval: Retrieval | bool,
                   max_tokens: int | None, temperature: float | None) -> dict[str, Any]:
        extensions = {} if retrieval is True else {"retrieval": retrieval if retrieval is False else retrieval.body()}
        return {"model": model, "messages": [dict(m) for m in messages], "extra_body": extensions,
                "extra_headers": self.headers,
                **({"max_tokens": max_tokens} if max_tokens is not None else {}),
                **({"temperature": temperature} if temperature is not None else {})}

    @contextmanager
    def _errors(self, path: str) -> Iterator[None]:
        """openai's exceptions of a request to ``path`` as RagtuneErrors: the URL, what the server said, the fix."""
        import openai

        try:
            yield
        except openai.APIError as e:
            raise self._error(e, path) from None

    def _error(self, e: openai.APIError, path: str) -> RagtuneError:
        import openai

        if isinstance(e, openai.APIConnectionError):  # refused, unreachable, timed out (APITimeoutError)
            reason = e.__cause__ or e.message  # the socket's words, e.g. "[Errno 111] Connection refused"
            return RagtuneError(f"{self.url}: cannot connect ({reason}). {FIX_SERVER}")
        if isinstance(e, openai.APIStatusError):
            body = e.body  # OpenAI's error object, {"message", "type", "param", "code"}, when the body is one
            message = body.get("message") if isinstance(body, dict) else None
            fix = f" {FIX_KEY}" if e.status_code == 401 else ""
            kind = KINDS.get(e.status_code, RagtuneError)
            return kind(f"{self.url}{path}: HTTP {e.status_code}: {message or e.response.reason_phrase}.{fix}",
                        param=e.param, code=e.code)
        if isinstance(e, openai.APIResponseValidationError):
            return RagtuneError(f"{self.url}{path}: the answer is not in OpenAI's shape ({e.message}). Fix: pass "
                                "--url of a `ragtune serve`")
        # an error event: the server had answered 200 and then failed, so it ended the stream with OpenAI's error
        return RagtuneError(f"the server ended the stream: {e.message}", param=e.param, code=e.code)


def _citations(response: Any) -> list[Citation] | None:
    """ragtune's ``citations`` beside OpenAI's fields (in a stream: the first event's); None when absent."""
    return cast("list[Citation] | None", (response.model_extra or {}).get("citations"))
