"""The HTTP API's published contract: the OpenAPI document the Ingress serves at /openapi.json, fuzzed with
schemathesis against a real local app over HTTP, and a suite of hostile bodies.

The document is checked offline first (every route, its body and its errors; nothing of the server's machine in it).
Then one small app on a real local Ray Serve (the fused layout, the default for a small index; the tiny generator,
limits low enough that any generated request finishes in well under a second) answers requests generated from its
own document, valid and invalid: none may be a 500, every status must be one the document declares, every answer
must match its declared schema, and every error must be OpenAI's body.
"""

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import requests

from tests.serving.test_app import assert_openai_error, build_version, free_port

KEY = "openapi-key-0123456789abcdef"
SERVED = {"/v1/chat/completions": "tiny", "/v1/completions": "tiny", "/v1/embeddings": "all-MiniLM-L6-v2"}
ROUTES = {"/healthz": "get", "/metrics": "get", "/v1/models": "get", "/admin/reload": "post", "/v1/search": "post",
          "/v1/embeddings": "post", "/v1/chat/completions": "post", "/v1/completions": "post"}
BODIES = {"/v1/search": "SearchRequest", "/v1/embeddings": "EmbeddingRequest",
          "/v1/chat/completions": "ChatCompletionRequest", "/v1/completions": "CompletionRequest"}


def document() -> dict:
    from serving.ingress import app

    return app.openapi()


def resolve(doc: dict, ref: str) -> dict:
    assert ref.startswith("#/components/schemas/"), ref
    return doc["components"]["schemas"][ref.rsplit("/", 1)[1]]


def refs(node: object) -> set[str]:
    if isinstance(node, dict):
        return {node["$ref"]} if isinstance(node.get("$ref"), str) else set().union(*map(refs, node.values()))
    if isinstance(node, list):
        return set().union(*map(refs, node)) if node else set()
    return set()


# --- the document, offline --------------------------------------------------------------------------------------------

def test_the_document_declares_every_route_with_its_body_answer_and_openai_errors():
    doc = document()
    assert {path: next(iter(ops)) for path, ops in doc["paths"].items()} == ROUTES
    for ref in refs(doc):  # every reference resolves: a client generator can read every schema
        resolve(doc, ref)
    for path, method in ROUTES.items():
        op = doc["paths"][path][method]
        if path in BODIES:
            schema = op["requestBody"]["content"]["application/json"]["schema"]
            assert schema == {"$ref": f"#/components/schemas/{BODIES[path]}"} and op["requestBody"]["required"]
            assert {"400", "413", "429", "503", "504"} <= set(op["responses"]), path
        errors = {s for s in op["responses"] if s not in ("200", "503")} | (
            {"503"} if path != "/healthz" and "503" in op["responses"] else set())
        for status in errors:
            assert op["responses"][status]["content"]["application/json"]["schema"] == {
                "$ref": "#/components/schemas/ErrorBody"}, (path, status)
        assert ("security" in op) == (path != "/healthz"), path
        if path != "/healthz":
            assert "401" in op["responses"], path
    assert set(resolve(doc, "#/components/schemas/ErrorDetail")["properties"]) == {"message", "type", "param", "code"}
    chat = resolve(doc, "#/components/schemas/ChatCompletionRequest")
    assert {"model", "messages"} <= set(chat["required"]) and "retrieval" in chat["properties"]
    assert "text/event-stream" in doc["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    assert resolve(doc, "#/components/schemas/FusionOptions")["additionalProperties"] is False  # misspelt knobs: 400
    assert doc["components"]["securitySchemes"]["bearer"] == {**doc["components"]["securitySchemes"]["bearer"],
                                                              "type": "http", "scheme": "bearer"}


def test_the_document_names_nothing_of_the_servers_machine_and_schemathesis_reads_it():
    import schemathesis

    text = json.dumps(document())
    for private in (str(Path.cwd()), str(Path.home()), "/tmp/", "file://", "s3://"):
        assert private not in text, private
    schema = schemathesis.openapi.from_dict(document())
    operations = [result.ok() for result in schema.get_all_operations()]  # raises on a schema it cannot use
    assert sorted(op.label for op in operations) == sorted(f"{m.upper()} {p}" for p, m in ROUTES.items())


@pytest.mark.parametrize("seed, ok", [(2**63, False), (10**38, False), (-(2**63) - 1, False), (2**63 - 1, True),
                                      (-(2**63), True), (0, True)])
def test_a_seed_beyond_int64_is_a_400_not_the_samplers_overflow(seed, ok):
    """A seed of 10^38 passed validation and overflowed the Generator's torch.Generator (a
    500); the API takes OpenAI's int64 seeds, each of which the sampler can be seeded with."""
    import torch
    from pydantic import ValidationError

    from serving.schemas import ChatCompletionRequest, CompletionRequest

    for model, body in ((ChatCompletionRequest, {"messages": [{"role": "user", "content": "q"}]}),
                        (CompletionRequest, {"prompt": "q"})):
        if ok:
            torch.Generator().manual_seed(model.model_validate({"model": "m", "seed": seed, **body}).seed)
        else:
            with pytest.raises(ValidationError) as e:
                model.model_validate({"model": "m", "seed": seed, **body})
            assert e.value.errors()[0]["loc"] == ("seed",)


def test_lone_surrogates_are_found_with_their_path_and_pairs_are_text():
    """Found by the hostile suite: a lone surrogate in a chat message, a prompt or an embedding input reached the
    tokenizer (a 500 TypeError); the Ingress now refuses it with a 400 naming where it is."""
    from serving.schemas import lone_surrogate

    def find(raw: str):
        return lone_surrogate(raw.encode(), json.loads(raw))

    assert find('{"messages": [{"role": "user", "content": "a \\ud83d"}]}') == "messages.0.content"
    assert find('{"input": ["ok", "\\uDC00"]}') == "input.1"
    assert find('{"filter": {"\\udc01": 1}}') == "filter.\\udc01"  # a key: its path written as the escape
    assert find('{"query": "\\ud83d\\ude00 fine"}') is None  # a pair: one character
    assert find('{"query": "\\\\ud800 not an escape"}') is None  # an escaped backslash, then text
    assert find('{"query": "plain"}') is None


def test_fastapis_own_validation_errors_are_in_openai_format():
    """No route binds its body through FastAPI today, but a parameter FastAPI validates (a query parameter added
    later) must still answer OpenAI's body, not FastAPI's {"detail": [...]}."""
    import asyncio

    from fastapi.exceptions import RequestValidationError
    from starlette.requests import Request

    from serving.ingress import _validation_error

    error = RequestValidationError([{"loc": ("query", "k"), "msg": "Input should be a valid integer", "type": "x"},
                                    {"loc": ("query", "mode"), "msg": "Field required", "type": "missing"}])
    response = asyncio.run(_validation_error(Request({"type": "http", "method": "GET", "path": "/"}), error))
    assert response.status_code == 400
    assert json.loads(response.body) == {"error": {
        "message": "k: Input should be a valid integer (and 1 more problems)", "type": "invalid_request_error",
        "param": "k", "code": "invalid_request"}}


# --- a real app -------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_app(ray_2_cpus, squad_retrieval, tmp_path_factory):
    """A real app over HTTP (the fused layout: the default for an index this small) of 40 SQuAD paragraphs, with
    the tiny generator and low limits (4 tokens, k <= 10): (base URL, index root)."""
    from ray import serve

    from configs.schema import ServeJobConfig
    from models.generators import TinySpec, build_tiny
    from serving.app import ServeAppArgs, build_app

    work = tmp_path_factory.mktemp("openapi")
    with open(squad_retrieval / "corpus.jsonl") as f:
        rows = [json.loads(next(f)) for _ in range(40)]
    root = work / "index"
    build_version(rows, work, root)
    tiny = str(build_tiny(work / "tiny", [r["text"] for r in rows], TinySpec(context=1024)))
    port = free_port()
    cfg = ServeJobConfig.model_validate({
        "index": {"path": str(root), "poll_interval_s": None},
        "embedder": {"max_batch_size": 8, "num_cpus": 0.2},
        "shards": {"num_cpus": 0.2},
        "generator": {"model": tiny, "name": "tiny", "defaults": {"max_tokens": 4}, "max_batch_size": 4,
                      "num_cpus": 0.3},
        "retrieval": {"k": 2, "retries_s": 30},
        "http": {"port": port},
        "auth": {"api_keys": [KEY], "api_keys_env": None},
        "limits": {"max_tokens": 4, "max_k": 10, "max_body_bytes": 20_000, "max_messages": 4,
                   "max_input_chars": 2000, "max_embedding_inputs": 8, "request_timeout_s": 30},
    })
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(ServeAppArgs(config=cfg.model_dump(mode="json"))), name="ragtune-openapi", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    yield url, root
    serve.delete("ragtune-openapi")


def auth(key: str | None = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_openapi_json_is_served_without_a_key_and_docs_behind_it(small_app):
    url, root = small_app
    r = requests.get(f"{url}/openapi.json", timeout=60)  # no key: the document holds no secret
    assert r.status_code == 200, r.text
    served = r.json()
    assert served["paths"].keys() == document()["paths"].keys()
    assert str(root) not in r.text and str(root.parent) not in r.text
    assert_openai_error(requests.get(f"{url}/docs", timeout=60), 401, "invalid_api_key")
    docs = requests.get(f"{url}/docs", headers=auth(), timeout=60)
    assert docs.status_code == 200 and "text/html" in docs.headers["content-type"]
    assert "/openapi.json" in docs.text


def openai_error(response) -> str | None:
    """What is wrong with an error answer's body (None: OpenAI's error body)."""
    try:
        body = response.json()
    except ValueError:
        return f"not JSON: {response.text[:200]!r}"
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict) or set(err) != {"message", "type", "param", "code"}:
        return f"not OpenAI's error body: {body!r}"[:300]
    if not isinstance(err["message"], str) or not err["message"] or not isinstance(err["type"], str):
        return f"no message or type: {err!r}"
    return None


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_generated_requests_get_no_500_a_declared_status_and_openai_errors(small_app):
    """Valid and invalid requests generated from the served document (schemathesis, a fixed seed): every answer is
    a status the document declares for its route, a 200 matches its schema, no 5xx but the declared 503/504, every
    error is OpenAI's body."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from schemathesis import GenerationMode
    from schemathesis.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )
    from schemathesis.core.failures import FailureGroup

    url, _ = small_app
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", timeout=60)
    problems: list[str] = []
    statuses: Counter[str] = Counter()
    reasons: Counter[str] = Counter()

    def served_model(path, case, use):  # half the valid bodies name a model served (else nearly all are 404s)
        if use and path in SERVED and isinstance(case.body, dict):
            case.body["model"] = SERVED[path]
            if isinstance(case.body.get("messages"), list) and isinstance(case.body["messages"][-1], dict):
                case.body["messages"][-1]["role"] = "user"  # what the schema cannot say: the last turn is the user's
        return case

    def fuzz(operation, mode) -> None:
        @settings(max_examples=12, derandomize=True, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=st.tuples(operation.as_strategy(mode), st.booleans()).map(
            lambda pair: served_model(operation.path, *pair) if mode == GenerationMode.POSITIVE else pair[0]))
        def call(case):
            response = case.call(base_url=url, headers=auth(), timeout=60)
            statuses[f"{operation.label} {response.status_code}"] += 1
            if response.status_code == 400 and operation.path in SERVED:
                reasons[f"{operation.label}: {response.json()['error']['message'][:50]}"] += 1
            where = f"{operation.label} ({mode.value}) {case.body!r}"[:400]
            status = response.status_code
            if status >= 500 and status not in (503, 504):
                problems.append(f"{where} -> {status} {response.text[:300]}")
            if status >= 400 and operation.path != "/healthz" and (bad := openai_error(response)):
                problems.append(f"{where} -> {status}: {bad}")
            try:
                case.validate_response(response, checks=[status_code_conformance, content_type_conformance,
                                                         response_schema_conformance])
            except (Exception, FailureGroup) as e:  # keep going, report them all
                problems.append(f"{where} -> {status}: {str(e)[:400]}")

        call()

    for operation in (result.ok() for result in schema.get_all_operations()):
        fuzz(operation, GenerationMode.POSITIVE)
        if operation.body:  # the GET routes and reload take nothing that could be made invalid
            fuzz(operation, GenerationMode.NEGATIVE)
    print(sorted(statuses.items()), reasons.most_common(20))
    assert statuses.total() >= 100, statuses
    assert not problems, "\n".join(problems[:20])


# --- hostile bodies (beyond tests/serving/test_app.py's bad-input cases) ----------------------------------------------

@pytest.mark.integration
@pytest.mark.timeout(300)
def test_hostile_bodies_get_a_4xx_in_openai_format(small_app):
    url, _ = small_app
    h = {**auth(), "Content-Type": "application/json"}
    failures: list[str] = []

    def expect(r, status, code=None, param=None):  # every case, then all that failed at once
        try:
            assert_openai_error(r, status, code, param)
        except AssertionError as e:
            failures.append(f"{r.request.body[:120]!r}: {e}")

    def post(path: str, raw: bytes | str):
        return requests.post(f"{url}{path}", data=raw.encode() if isinstance(raw, str) else raw, headers=h,
                             timeout=60)

    chat = '{"model": "tiny", "messages": [{"role": "user", "content": "q"}]'
    completion = '{"model": "tiny", "prompt": "q"'
    for raw, status, param in [
        ('{"query": "q", "k": 1e309}', 400, "k"),  # infinity as a number
        ('{"query": "q", "k": 100000000000000000000000000000000000000}', 400, "k"),
        ('{"query": "q", "k": 2.5}', 400, "k"),
        ('{"query": "q", "k": -1}', 400, "k"),
        ('{"query": "q", "k": Infinity}', 400, "k"),
        ('{"query": "\\ud800 lone"}', 400, "query"),  # a lone surrogate, escaped
        ('{"query": "q", "mode": "hybrid", "fusion": {"weight": -Infinity}}', 400, "fusion.weight"),
        ('{"query": 7}', 400, "query"),
        ('{"query": null}', 400, "query"),
        ("", 400, None),
        ('"just a string"', 400, None),
        ('{"query": "q"} trailing', 400, None),
    ]:
        expect(post("/v1/search", raw), status, param=param)
    for path, start in (("/v1/chat/completions", chat), ("/v1/completions", completion)):
        for extra, status, param in [
            (', "n": 2', 400, None), (', "logprobs": true', 400, None), (', "logprobs": 5', 400, None),
            (', "response_format": {"type": "json_schema"}', 400, "response_format"),
            (', "max_tokens": 1e309', 400, "max_tokens"), (', "max_tokens": 0', 400, "max_tokens"),
            (', "temperature": 1e309', 400, "temperature"), (', "top_p": NaN', 400, "top_p"),
            (', "seed": 100000000000000000000000000000000000000', 400, "seed"),
            (', "seed": -9223372036854775809', 400, "seed"),
            (', "stop": ["", "x"]', 400, "stop"), (', "stop": ["a", "b", "c", "d", "e"]', 400, "stop"),
            (', "model": "gpt-4o"', 404, "model"), (', "model": ""', 400, "model"),
            (', "stream": "yes please"', 400, "stream"),
        ]:
            expect(post(path, start + extra + "}"), status, param=param)
    expect(post("/v1/chat/completions", chat + ', "tools": [{"type": "function"}]}'), 400)
    expect(post("/v1/chat/completions", '{"model": "tiny", "messages": [{"role": "tool", "content": "q"}]}'),
           400, param="messages.0.role")
    expect(post("/v1/chat/completions", chat.replace('"q"', '"\\ud83d"') + "}"), 400, param="messages.0.content")
    expect(post("/v1/completions", completion.replace('"q"', '"a \\udc00 b"') + "}"), 400, param="prompt")
    expect(post("/v1/embeddings", '{"model": "all-MiniLM-L6-v2", "input": ["ok", "\\ud800"]}'), 400,
           param="input.1")
    expect(post("/v1/search", '{"query": "q", "filter": {"\\udc01": 1}}'), 400, param="filter.\\udc01")
    expect(post("/v1/embeddings", '{"model": "all-MiniLM-L6-v2", "input": "x", "dimensions": 7}'), 400,
           param="dimensions")
    expect(post("/v1/embeddings", json.dumps({"model": "all-MiniLM-L6-v2", "input": ["x"] * 9})), 400,
           "limit_exceeded", "input")
    megabyte = json.dumps({"query": "x" * 1_000_000})
    expect(post("/v1/search", megabyte), 413, "request_too_large")
    for path in ("/v1/search", "/v1/chat/completions"):  # wrong content type, same body: still read as JSON or 400
        r = requests.post(f"{url}{path}", data=b"query=q", headers={**auth(), "Content-Type": "text/plain"},
                          timeout=60)
        expect(r, 400, "invalid_json")
    pair = post("/v1/search", '{"query": "\\ud83d\\ude00 Super Bowl", "k": 2}')  # a pair is text: an emoji
    assert pair.status_code == 200 and pair.json()["query"] == "\U0001f600 Super Bowl", pair.text
    expect(post("/v1/search", '{"query": "q", "k": 2, "filter": {"title": "\\udfff"}}'), 400, param="filter.title")
    ok = requests.post(f"{url}/v1/search", json={"query": "Super Bowl", "k": 2}, headers=auth(), timeout=60)
    assert ok.status_code == 200 and len(ok.json()["data"]) == 2 and not math.isnan(ok.json()["data"][0]["score"])
    assert not failures, "\n".join(failures)
