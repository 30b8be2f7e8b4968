"""`ragtune ask` over HTTP against a stub of ragtune's API (FastAPI on uvicorn, in a thread): what it prints (the
answer, the passages, --json, --stream), what the server is asked, and the errors."""

import json
import socket
import threading
import time

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from jobs.cli import main
from serving.schemas import ChatCompletionRequest

KEY = "stub-key-0123456789"
LONG = "A harbour town " + "with a long history of trade " * 8
CITATIONS = [{"n": 1, "rank": 1, "score": 0.9123, "chunk_id": 11, "doc_id": "d1", "title": "Marlow",
              "text": "Marlow is a\n river city.", "metadata": {}, "truncated": False},
             {"n": 2, "rank": 2, "score": 0.5, "chunk_id": 12, "doc_id": "d2", "title": None, "text": LONG,
              "metadata": {"lang": "en"}, "truncated": True}]


def stub_app(requests: list, stream_fails: dict) -> FastAPI:
    app = FastAPI()

    def denied(request: Request) -> JSONResponse | None:
        if request.headers.get("authorization") != f"Bearer {KEY}":
            return JSONResponse({"error": {"message": "invalid API key", "type": "authentication_error",
                                           "param": None, "code": "invalid_api_key"}}, status_code=401)
        return None

    @app.get("/v1/models")
    async def models(request: Request):
        return denied(request) or {"object": "list", "data": [
            {"id": "lora", "object": "model", "created": 1, "owned_by": "ragtune", "kind": "adapter"},
            {"id": "tiny", "object": "model", "created": 1, "owned_by": "ragtune", "kind": "base"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        if (no := denied(request)) is not None:
            return no
        req = ChatCompletionRequest.model_validate(await request.json())  # as the Ingress reads it
        requests.append(req)
        cites = CITATIONS if req.retrieval_options().enabled else []
        if not req.stream:
            return {"id": "c", "object": "chat.completion", "created": 1, "model": req.model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Marlow."},
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}, "citations": cites}

        def chunk(delta, finish=None, **extra):
            return {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": req.model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}

        events = [chunk({"role": "assistant", "content": ""}, citations=cites), chunk({"content": "Mar"}),
                  chunk({"content": "low."})]
        events += [{"error": {"message": "the generator stopped", "type": "server_error", "param": None,
                              "code": "internal_error"}}] if stream_fails["now"] else [chunk({}, "length")]
        body = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
        return StreamingResponse(iter([body.encode()]), media_type="text/event-stream")

    return app


@pytest.fixture(scope="module")
def stub():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    requests: list[ChatCompletionRequest] = []
    stream_fails = {"now": False}
    server = uvicorn.Server(uvicorn.Config(stub_app(requests, stream_fails), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", requests, stream_fails
    server.should_exit = True
    thread.join(10)


def ask(url, *args, key=KEY):
    return main(["ask", "Where is the tower?", "--url", url, *(["--api-key", key] if key else []), *args])


def test_the_answer_then_the_passages_numbered_as_cited(stub, capsys):
    url, requests, _ = stub
    assert ask(url) == 0
    cut = " ".join(LONG.split())[:150]
    assert capsys.readouterr().out == ("Marlow.\n\npassages:\n"
                                       "  [1] 0.912 d1  Marlow: Marlow is a river city.\n"
                                       f"  [2] 0.500 d2  {cut}…\n")
    req = requests[-1]
    assert req.model == "tiny" and not req.stream  # the base model, from /v1/models
    assert [m.plain() for m in req.messages] == [{"role": "user", "content": "Where is the tower?"}]
    opts = req.retrieval_options()
    assert (opts.enabled, opts.k, opts.mode, req.max_tokens, req.temperature) == (True, None, None, None, None)


def test_json_and_the_options_sent(stub, capsys):
    url, requests, _ = stub
    assert ask(url, "--json", "--model", "lora", "-k", "2", "--mode", "lexical", "--max-tokens", "4",
               "--temperature", "0") == 0
    assert json.loads(capsys.readouterr().out) == {"text": "Marlow.", "citations": CITATIONS, "finish_reason": "stop"}
    req = requests[-1]
    opts = req.retrieval_options()
    assert (req.model, opts.enabled, opts.k, opts.mode, req.max_tokens, req.temperature) == \
        ("lora", True, 2, "lexical", 4, 0.0)
    assert ask(url, "--json", "--no-retrieval") == 0
    assert json.loads(capsys.readouterr().out) == {"text": "Marlow.", "citations": [], "finish_reason": "stop"}
    assert not requests[-1].retrieval_options().enabled


def test_stream_prints_as_it_goes_then_the_passages(stub, capsys):
    url, requests, _ = stub
    assert ask(url, "--stream") == 0
    assert capsys.readouterr().out.startswith("Marlow.\n\npassages:\n  [1] 0.912 d1  Marlow: Marlow is a river city.\n")
    assert requests[-1].stream
    assert ask(url, "--stream", "--json") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "Marlow." and json.loads(out[1]) == {"text": "Marlow.", "citations": CITATIONS,
                                                          "finish_reason": "length", "streamed": True}


def test_errors_are_one_line_with_the_fix(stub, capsys):
    url, _, stream_fails = stub
    assert ask(url, "--model", "tiny", key="wrong-key-0123456789") == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {url}/v1/chat/completions: HTTP 401: invalid API key. Fix: pass --api-key or set RAGTUNE_API_KEY")
    assert ask(url, key=None) == 2  # the base model's name is asked first
    err = capsys.readouterr().err
    assert f"{url}/v1/models: HTTP 401" in err and "Fix: pass --api-key or set RAGTUNE_API_KEY" in err
    stream_fails["now"] = True
    try:
        assert ask(url, "--stream") == 2
    finally:
        stream_fails["now"] = False
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: the server ended the stream: the generator " \
                                                               "stopped"
    assert ask("http://127.0.0.1:9") == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        "error: http://127.0.0.1:9: cannot connect (")
