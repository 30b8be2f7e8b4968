"""serving.client against a stub of ragtune's HTTP API (httpx2's MockTransport, which the openai client takes as
its http_client): the extensions it sends, the citations it reads, streaming, the routes beside OpenAI's, and the
errors as the CLI prints them."""

import json

import httpx2
import pytest

from configs.errors import InvalidRequest, NotFound, RagtuneError, Unavailable
from serving.client import RagtuneClient, Retrieval

URL = "http://127.0.0.1:8000/ragtune"  # an app behind a route prefix: /v1 and /admin are below it
CITATIONS = [{"n": 1, "rank": 1, "score": 0.91, "chunk_id": 11, "doc_id": "d1", "title": "Paris", "text": "Capital.",
              "metadata": {"lang": "en"}, "truncated": False},
             {"n": 2, "rank": 2, "score": 0.52, "chunk_id": 12, "doc_id": "d2", "title": None, "text": "Other.",
              "metadata": {}, "truncated": True}]


class Stub:
    """ragtune's routes, answered by ``routes[(method, path)](request)``; every request is kept."""

    def __init__(self, routes=None):
        self.routes = {"GET /ragtune/v1/models": lambda r: httpx2.Response(200, json=MODELS),
                       "POST /ragtune/v1/chat/completions": lambda r: httpx2.Response(200, json=completion()),
                       **(routes or {})}
        self.requests: list[httpx2.Request] = []

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        self.requests.append(request)
        return self.routes[f"{request.method} {request.url.path}"](request)

    def body(self, i: int = -1) -> dict:
        return json.loads(self.requests[i].content)

    def client(self, **kw) -> RagtuneClient:
        return RagtuneClient(URL, http_client=httpx2.Client(transport=httpx2.MockTransport(self)), **kw)


MODELS = {"object": "list", "data": [
    {"id": "lora", "object": "model", "created": 1, "owned_by": "ragtune", "kind": "adapter"},
    {"id": "tiny", "object": "model", "created": 1, "owned_by": "ragtune", "kind": "base"},
    {"id": "all-MiniLM-L6-v2", "object": "model", "created": 1, "owned_by": "ragtune", "kind": "embedding"}]}


def completion(text="Paris.", citations=CITATIONS):
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "tiny",
            "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11},
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "citations": citations}


def chunk(delta, finish=None, **extra):
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "tiny",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}


def sse(*events):
    body = "".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events)
    return httpx2.Response(200, content=body.encode(), headers={"content-type": "text/event-stream"})


def error(status, message, code=None, param=None):
    return lambda r: httpx2.Response(status, json={"error": {"message": message, "type": "invalid_request_error",
                                                             "param": param, "code": code}})


def test_chat_sends_the_retrieval_extension_and_reads_the_citations():
    stub = Stub()
    client = stub.client()
    q = [{"role": "user", "content": "What is the capital?"}]
    reply = client.chat(q, model="tiny", retrieval=Retrieval(k=2, filter={"lang": "en"}, mode="hybrid",
                                                             fusion={"method": "rrf"}),
                        max_tokens=4, temperature=0.0)
    assert (reply.text, reply.citations, reply.finish_reason) == ("Paris.", CITATIONS, "stop")
    assert stub.requests[-1].url == f"{URL}/v1/chat/completions"
    assert stub.body() == {"model": "tiny", "messages": q, "max_tokens": 4, "temperature": 0.0,
                           "retrieval": {"k": 2, "filter": {"lang": "en"}, "mode": "hybrid",
                                         "fusion": {"method": "rrf"}}}
    client.chat(q, model="lora", retrieval=False)  # closed-book
    assert stub.body() == {"model": "lora", "messages": q, "retrieval": False}
    client.chat(q, model="tiny")  # the server's retrieval settings: nothing sent, nothing it would not default to
    assert stub.body() == {"model": "tiny", "messages": q}
    client.chat(q, model="tiny", retrieval=Retrieval(mode="lexical"))
    assert stub.body()["retrieval"] == {"mode": "lexical"}

    stub.routes["POST /ragtune/v1/chat/completions"] = lambda r: httpx2.Response(200, json=completion(
        citations=[]))
    assert client.chat(q, model="tiny", retrieval=False).citations == []


def test_the_key_is_a_bearer_token_and_no_openai_credential_is_ever_sent(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-secret")
    monkeypatch.setenv("OPENAI_ORG_ID", "org-secret")
    monkeypatch.setenv("OPENAI_PROJECT_ID", "proj-secret")
    stub = Stub({"POST /ragtune/v1/search": lambda r: httpx2.Response(200, json={
        "object": "search.result", "query": "q", "k": 10, "mode": "dense", "version": "v-00001", "data": []})})
    q = [{"role": "user", "content": "q"}]
    stub.client(api_key="ragtune-key").chat(q, model="tiny")
    stub.client().chat(q, model="tiny")  # no key: no Authorization header (a keyed server then says which one)
    stub.client().search("q")  # the plain post too
    with_key, *without = [{k.lower(): v for k, v in r.headers.items()} for r in stub.requests]
    assert with_key["authorization"] == "Bearer ragtune-key"
    for h in [with_key, *without]:
        assert not any("secret" in v for v in h.values()), h
    assert all("authorization" not in h for h in without)


def test_a_streamed_answer_arrives_in_pieces_with_the_citations_first():
    stub = Stub({"POST /ragtune/v1/chat/completions": lambda r: sse(
        chunk({"role": "assistant", "content": ""}, citations=CITATIONS), chunk({"content": "Par"}),
        chunk({"content": "is."}), chunk({}, "length"), "[DONE]")})
    deltas = list(stub.client().chat_stream([{"role": "user", "content": "q"}], model="tiny",
                                            retrieval=Retrieval(k=2), max_tokens=2))
    assert stub.body()["stream"] is True and stub.body()["retrieval"] == {"k": 2}
    assert deltas[0].citations == CITATIONS and all(d.citations is None for d in deltas[1:])
    assert "".join(d.text for d in deltas) == "Paris." and [d.finish_reason for d in deltas][-1] == "length"


def test_a_stream_the_server_ends_with_an_error_event_raises():
    stub = Stub({"POST /ragtune/v1/chat/completions": lambda r: sse(
        chunk({"role": "assistant", "content": ""}, citations=[]), chunk({"content": "Pa"}),
        {"error": {"message": "internal error (RuntimeError)", "type": "server_error", "param": None,
                   "code": "internal_error"}}, "[DONE]")})
    got = []
    with pytest.raises(RagtuneError, match=r"^the server ended the stream: internal error \(RuntimeError\)$") as e:
        for d in stub.client().chat_stream([{"role": "user", "content": "q"}], model="tiny"):
            got.append(d.text)
    assert got == ["", "Pa"] and e.value.code == "internal_error"


@pytest.mark.parametrize(("status", "kind", "message", "fix"), [
    (401, RagtuneError, "invalid API key", " Fix: pass --api-key or set RAGTUNE_API_KEY"),
    (400, InvalidRequest, "retrieval.k: Input should be greater than or equal to 1", ""),
    (404, NotFound, "model 'nope' does not exist; models served: tiny, lora", ""),
    (503, Unavailable, "the server is busy", ""),
    (429, RagtuneError, "too many requests in the queue", ""),
])
def test_http_errors_are_ragtune_errors_that_name_the_url_and_the_fix(status, kind, message, fix):
    stub = Stub({"POST /ragtune/v1/chat/completions": error(status, message, code="c", param="retrieval.k")})
    with pytest.raises(kind) as e:
        stub.client().chat([{"role": "user", "content": "q"}], model="tiny")
    assert str(e.value) == f"{URL}/v1/chat/completions: HTTP {status}: {message}.{fix}"
    assert type(e.value) is kind and (e.value.code, e.value.param) == ("c", "retrieval.k")
    assert len(stub.requests) == 1  # no retries unless asked for


def test_an_answer_that_is_not_openais_error_body_still_says_the_status():
    stub = Stub({"GET /ragtune/v1/models": lambda r: httpx2.Response(500, text="<html>proxy error</html>")})
    with pytest.raises(RagtuneError, match=rf"^{URL}/v1/models: HTTP 500: Internal Server Error\.$"):
        stub.client().base_model()


@pytest.mark.parametrize(("raised", "reason"), [
    (httpx2.ConnectError("[Errno 111] Connection refused"), "[Errno 111] Connection refused"),
    (httpx2.ReadTimeout("timed out"), "timed out"),
])
def test_an_unreachable_or_silent_server_names_the_fix(raised, reason):
    def fail(request):
        raise raised

    with pytest.raises(RagtuneError) as e:
        RagtuneClient(URL, http_client=httpx2.Client(transport=httpx2.MockTransport(fail))).chat(
            [{"role": "user", "content": "q"}], model="tiny")
    assert str(e.value) == (f"{URL}: cannot connect ({reason}). Fix: start the server with `ragtune serve -c "
                            "configs/serve/<x>.yaml`, or pass --url, or --config to answer in this process")


def test_nothing_listening_is_cannot_connect():
    with pytest.raises(RagtuneError, match=r"^http://127.0.0.1:9: cannot connect \(.*\)\. Fix: start the server"):
        RagtuneClient("http://127.0.0.1:9/", timeout=5).base_model()


def test_models_search_and_reload():
    search = {"object": "search.result", "query": "capital", "k": 2, "mode": "hybrid", "version": "v-00002",
              "data": [{k: v for k, v in c.items() if k not in ("n", "truncated")} for c in CITATIONS]}
    stub = Stub({"POST /ragtune/v1/search": lambda r: httpx2.Response(200, json=search),
                "POST /ragtune/admin/reload": lambda r: httpx2.Response(200, json={"version": "v-00002",
                                                                                  "switched": True})})
    client = stub.client(api_key="k")
    assert client.base_model() == "tiny"
    assert [(m.id, m.kind) for m in client.models()] == [("lora", "adapter"), ("tiny", "base"),
                                                         ("all-MiniLM-L6-v2", "embedding")]
    got = client.search("capital", k=2, filter={"lang": "en"})
    assert stub.body() == {"query": "capital", "k": 2, "filter": {"lang": "en"}}
    assert (got.query, got.k, got.mode, got.version, got.passages) == ("capital", 2, "hybrid", "v-00002",
                                                                       search["data"])
    assert client.reload(timeout=300) == {"version": "v-00002", "switched": True}
    assert stub.requests[-1].url == f"{URL}/admin/reload"  # beside /v1, not below it
    assert stub.requests[-1].headers["authorization"] == "Bearer k"

    health = {"status": "loading", "ready": False, "version": "v-00002", "shards": 2, "loaded": [0]}
    stub.routes["GET /ragtune/healthz"] = lambda r: httpx2.Response(503, json=health)
    with pytest.raises(Unavailable, match="/healthz: HTTP 503"):
        client.health()
    stub.routes["GET /ragtune/healthz"] = lambda r: httpx2.Response(200, json={**health, "status": "ok",
                                                                                "ready": True, "loaded": [0, 1]})
    assert client.health()["ready"] is True and stub.requests[-1].url == f"{URL}/healthz"

    no_base = Stub({"GET /ragtune/v1/models": lambda r: httpx2.Response(200, json={"object": "list", "data": [
        MODELS["data"][0]]})})
    with pytest.raises(RagtuneError, match="lists no model of kind 'base'"):
        no_base.client().base_model()
