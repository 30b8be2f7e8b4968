"""`ragtune ask`: a question for humans, against a running `ragtune serve` or answered in this process.

    ragtune ask "How is an index version switched?"                      # http://127.0.0.1:8000
    ragtune ask "..." --url https://rag.example.com --model capitals -k 8 --stream   # key from RAGTUNE_API_KEY
    ragtune ask "..." --mode lexical                                     # BM25 only (dense, hybrid, auto)
    ragtune ask "..." --config configs/serve/sample.yaml                 # in this process, no Ray, no server

Prints the answer, then the passages it was given, numbered as the answer cites them. In-process answering
runs the same functions the Serve app runs (``serving.rag.RagPipeline``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

from configs.errors import RagtuneError
from jobs.commands import guarded

DEFAULT_URL = "http://127.0.0.1:8000"


def unreachable(url: str, e: Exception) -> RagtuneError:
    return RagtuneError(f"{url}: cannot connect ({getattr(e, 'reason', e)}). Fix: start the server with "
                        "`ragtune serve -c configs/serve/<x>.yaml`, or pass --url, or --config to answer in this "
                        "process")


def _post(url: str, body: dict[str, Any], key: str | None, timeout: float) -> Any:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {key}"} if key else {})})
    try:
        return urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        try:
            msg = json.loads(e.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            msg = e.reason
        fix = " Fix: pass --api-key or set RAGTUNE_API_KEY" if e.code == 401 else ""
        raise RagtuneError(f"{url}: HTTP {e.code}: {msg}.{fix}") from None
    except (urllib.error.URLError, OSError) as e:
        raise unreachable(url, e) from None


def _sse(resp: Any) -> Iterator[dict[str, Any]]:
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data: "):
            continue
        data = line[len("data: "):]
        if data == "[DONE]":
            return
        event = json.loads(data)
        if "error" in event:
            raise RagtuneError(f"the server ended the stream: {event['error']['message']}")
        yield event


def base_model(url: str, key: str | None, timeout: float) -> str:
    """The base model's name, from GET /v1/models."""
    req = urllib.request.Request(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            models = json.loads(r.read())["data"]
    except urllib.error.HTTPError as e:
        fix = " Fix: pass --api-key or set RAGTUNE_API_KEY" if e.code == 401 else ""
        raise RagtuneError(f"{url}/v1/models: HTTP {e.code}.{fix}") from None
    except (urllib.error.URLError, OSError) as e:
        raise unreachable(url, e) from None
    return next(m["id"] for m in models if m.get("kind") == "base")


def ask_http(args: argparse.Namespace) -> dict[str, Any]:
    url = args.url.rstrip("/")
    model = args.model or base_model(url, args.api_key, args.timeout)
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": args.question}],
                            "stream": args.stream,
                            "retrieval": {"enabled": not args.no_retrieval, **({"k": args.k} if args.k else {}),
                                          **({"mode": args.mode} if args.mode else {})}}
    if args.max_tokens:
        body["max_tokens"] = args.max_tokens
    if args.temperature is not None:
        body["temperature"] = args.temperature
    resp = _post(f"{url}/v1/chat/completions", body, args.api_key, args.timeout)
    if not args.stream:
        out = json.loads(resp.read())
        return {"text": out["choices"][0]["message"]["content"], "citations": out.get("citations", []),
                "finish_reason": out["choices"][0]["finish_reason"]}
    text, citations, finish = "", [], None
    for event in _sse(resp):
        citations = event.get("citations", citations)
        for choice in event.get("choices", []):
            piece = choice.get("delta", {}).get("content") or ""
            text += piece
            print(piece, end="", flush=True)
            finish = choice.get("finish_reason") or finish
    print()
    return {"text": text, "citations": citations, "finish_reason": finish, "streamed": True}


def ask_local(args: argparse.Namespace) -> dict[str, Any]:
    from configs.schema import ServeJobConfig, load_config
    from serving.rag import RagPipeline

    cfg = load_config(ServeJobConfig, args.config, args.overrides or [])
    pipeline = RagPipeline(cfg)
    return pipeline.answer([{"role": "user", "content": args.question}], model=args.model,
                           retrieval=not args.no_retrieval, k=args.k, mode=args.mode, max_tokens=args.max_tokens,
                           temperature=args.temperature)


def ask_main(args: argparse.Namespace) -> int:
    out = ask_local(args) if args.config else ask_http(args)
    if args.json:
        print(json.dumps(out))
        return 0
    if not out.get("streamed"):
        print(out["text"])
    if out["citations"]:
        print("\npassages:")
        for c in out["citations"]:
            title = f"{c['title']}: " if c.get("title") else ""
            text = " ".join(f"{title}{c['text']}".split())
            print(f"  [{c['n']}] {c['score']:.3f} {c['doc_id']}  {text[:150]}{'…' if len(text) > 150 else ''}")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """``ragtune ask`` (not config-driven: it talks to a server, or reads a serve config with --config)."""
    a = sub.add_parser("ask", help="ask a question (a running `ragtune serve`, or in-process with --config)",
                       description="Ask a retrieval-augmented question and print the answer and its passages.")
    a.add_argument("question", help="the question")
    a.add_argument("--url", default=os.environ.get("RAGTUNE_URL", DEFAULT_URL),
                   help=f"server (default: RAGTUNE_URL, else {DEFAULT_URL})")
    a.add_argument("--api-key", default=os.environ.get("RAGTUNE_API_KEY"), help="API key (default: RAGTUNE_API_KEY)")
    a.add_argument("--config", "-c", help="a configs/serve/*.yaml: answer in this process (no server, no Ray)")
    a.add_argument("overrides", nargs="*", metavar="section.field=value", help="overrides of --config")
    a.add_argument("--model", help="base model or adapter name (default: the base)")
    a.add_argument("-k", type=int, help="passages to retrieve (default: the server's retrieval.k)")
    a.add_argument("--mode", choices=("auto", "dense", "lexical", "hybrid"),
                   help="search mode: dense (vectors), lexical (BM25), hybrid (both, fused), auto (hybrid when the "
                        "index has a lexical part); default: the server's retrieval.mode")
    a.add_argument("--no-retrieval", action="store_true", help="ask the model alone")
    a.add_argument("--max-tokens", type=int, help="new tokens at most")
    a.add_argument("--temperature", type=float, help="0 = greedy")
    a.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    a.add_argument("--timeout", type=float, default=120, help="seconds to wait for the answer")
    a.add_argument("--json", action="store_true", help="print JSON")
    a.set_defaults(func=ask_main)


if __name__ == "__main__":  # python -m jobs.ask "question" [...]: the same as `ragtune ask`
    parser = argparse.ArgumentParser(prog="python -m jobs")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["ask", *sys.argv[1:]])
    sys.exit(guarded(lambda: ask_main(args)))
