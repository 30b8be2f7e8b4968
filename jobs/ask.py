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
from typing import Any

from configs.schema import ServeJobConfig, load_config
from jobs.commands import guarded
from serving.client import Citation, RagtuneClient, Retrieval
from serving.rag import RagPipeline

DEFAULT_URL = "http://127.0.0.1:8000"


def ask_http(args: argparse.Namespace) -> dict[str, Any]:
    # one attempt: --timeout bounds the whole wait
    with RagtuneClient(args.url, api_key=args.api_key, timeout=args.timeout, max_retries=0) as client:
        model = args.model or client.base_model()
        messages = [{"role": "user", "content": args.question}]
        retrieval = False if args.no_retrieval else Retrieval(k=args.k, mode=args.mode)
        max_tokens = args.max_tokens or None
        if not args.stream:
            reply = client.chat(messages, model=model, retrieval=retrieval, max_tokens=max_tokens,
                                temperature=args.temperature)
            return {"text": reply.text, "citations": reply.citations, "finish_reason": reply.finish_reason}
        text, finish = "", None
        citations: list[Citation] = []
        for delta in client.chat_stream(messages, model=model, retrieval=retrieval, max_tokens=max_tokens,
                                        temperature=args.temperature):
            citations = delta.citations if delta.citations is not None else citations
            text += delta.text
            print(delta.text, end="", flush=True)
            finish = delta.finish_reason or finish
        print()
        return {"text": text, "citations": citations, "finish_reason": finish, "streamed": True}


def ask_local(args: argparse.Namespace) -> dict[str, Any]:
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
