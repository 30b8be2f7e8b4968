"""Benchmark: the serving app under a bounded load, with dynamic batching on and off, in one run.

Builds a small index (SQuAD v1.1 paragraphs from ../shared/data, or ragtune's own docs/ without it) with the real
embed and index jobs and a tiny generator, deploys the Serve app on a local Ray bound to 127.0.0.1, and sends a
fixed number of requests at a fixed concurrency to each route, first with batching on (the encoder's
``serving.batching.Batcher``, the Generator's engine), then with it off, then on again, and so on
(``--repeats``); the load generator stops by itself.

    python bench/serve.py                                     # ~6 minutes on 2 cores
    python bench/serve.py --requests 1000 --concurrency 64 --repeats 2

Routes: ``embedder``, the deployment that embeds (the Embedder of the split layout; the fused layout embeds inside
the Ingress, so it has no such route) called through a Serve handle from this process (the embedder path without
the HTTP hops: what dynamic batching acts on);
``embeddings``, ``/v1/embeddings`` with one input per request (the embedder path over HTTP); ``search``,
``/v1/search`` (embed, search every shard, merge, docstore: hops as the plan lays them out); ``chat``, RAG chat
(``/v1/chat/completions``: search, prompt, ``--max-tokens`` greedy tokens of the tiny model). Printed per route and
mode: requests/s, p50/p95/p99 latency and the mean batch size the embedder / Generator ran; then batching-on /
batching-off ratios. Before the routes, what bounds them: the embedding model's queries/s in this process at batch 1
and 32 (no Serve), and the requests/s of a deployment that does nothing through the same handle path (Serve's own
cost per request); on a saturated machine the costs add up, so (1/q1 + 1/echo) / (1/q32 + 1/echo) is the most
batching can give. Client and server share the machine's cores, as a sidecar load generator would. Serve's
per-request access log is off unless ``--access-log`` (on 2 cores it costs a third of the HTTP requests/s). A PNG of
requests/s and p99 is written.

Then ragtune against its peer (``--peer-rounds``, 3 by default; 0 skips it): what a user would write instead, one
uvicorn process with FastAPI, the same all-MiniLM-L6-v2 through ``models.embedders.QueryEncoder`` and an exact FAISS
index (``IndexFlatIP``) over exactly the texts ragtune's index holds (its live docstore rows, embedded by the
peer at start), the same k. Routes: dense ``/v1/search``, hybrid ``/v1/search`` (BM25 + dense: more work than the
peer's dense search, compared with it) and ``/v1/embeddings``, each at ``--concurrency``, ragtune and the peer
alternating, route by route, round by round; printed: medians of requests/s and p99, ragtune / peer ratios, and
each route's hops through the serving plan's deployments (``serving.app.route_hops``; ``--layout`` picks it).

    python bench/serve.py --routes none --peer-rounds 3      # the peer comparison alone
    python bench/serve.py --paragraphs 40 --requests 20 --routes none --peer-rounds 1   # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

from pydantic import BaseModel

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cluster.placement import NodeResources, plan_serving  # noqa: E402
from configs.schema import EmbedJobConfig, IndexJobConfig, ServeJobConfig  # noqa: E402
from jobs.embed import run as embed  # noqa: E402
from jobs.index import run as index  # noqa: E402
from jobs.plots import pyplot  # noqa: E402
from jobs.serve import wait_ready  # noqa: E402
from models.embedders import QueryEncoder  # noqa: E402
from models.generators import TinySpec, build_tiny  # noqa: E402
from serving.app import ServeAppArgs, build_app, plan_for, route_hops  # noqa: E402
from sharding.freshness import live_ids  # noqa: E402
from sharding.manifest import read_index_manifest, resolve_index  # noqa: E402
from sharding.search import open_docstore  # noqa: E402

SQUAD = Path(os.environ.get("RAGTUNE_SHARED", REPO.parent / "shared")) / "data" / "squad" / "retrieval-v1.1"
IN_INGRESS = {"auto": None, "true": True, "false": False}  # --fused-in-ingress -> shards.fused_in_ingress


def corpus_and_queries(n: int, work: Path) -> tuple[Path, list[str]]:
    """A JSONL corpus of ``n`` SQuAD paragraphs and their questions; ragtune's docs/ when the data is absent."""
    out = work / "corpus.jsonl"
    if (SQUAD / "corpus.jsonl").is_file():
        with open(SQUAD / "corpus.jsonl") as f:
            rows = [json.loads(next(f)) for _ in range(n)]
        ids = {r["_id"] for r in rows}
        qrels = {}
        for line in open(SQUAD / "qrels" / "test.tsv").read().splitlines()[1:]:
            qid, did, _ = line.split("\t")
            qrels.setdefault(qid, did)
        queries = [q["text"] for q in map(json.loads, open(SQUAD / "queries.jsonl")) if qrels.get(q["_id"]) in ids]
    else:
        rows, queries = [], []
        for p in sorted((REPO / "docs").glob("*.md")):
            for n_, para in enumerate(p.read_text().split("\n\n")):
                if len(para) > 80:
                    rows.append({"_id": f"{p.stem}-{n_}", "title": p.stem, "text": para})
                    queries.append(" ".join(para.split()[:12]))
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out, queries


def encode_ceiling(index_path: str, queries: list[str], seconds: float = 3.0) -> dict:
    """Queries/s of the index's embedding model in this process at batch 1 and 32, with the threads the
    Embedder replica gets (``cluster.placement.plan_serving``)."""
    import torch

    manifest = read_index_manifest(resolve_index(index_path))
    threads = plan_serving([NodeResources(cpus=float(os.cpu_count() or 1), gpus=0.0)],
                           num_shards=len(manifest.shards)).embedder.threads
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    enc = QueryEncoder(manifest)
    out: dict = {"threads": threads}
    for b in (1, 32):
        enc.encode(queries[:b])
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            enc.encode([queries[(n + j) % len(queries)] for j in range(b)])
            n += b
        out[b] = n / (time.perf_counter() - t0)
    torch.set_num_threads(before)
    return out


def serve_overhead(concurrency: int, n: int, texts: list[str]) -> float:
    """Requests/s of a deployment that does nothing (an ``embed`` returning a constant vector), called through a
    Serve handle from this process at the same concurrency: what routing, (de)serialisation and the replica's
    request handling alone allow on this machine, with client and replica sharing its cores."""
    import numpy as np
    from ray import serve

    @serve.deployment(max_ongoing_requests=max(64, 2 * concurrency))
    class Echo:
        async def embed_many(self, texts: list[str]) -> list[tuple[np.ndarray, int, int]]:
            return [(np.zeros(384, np.float32), len(t), 1) for t in texts]

    handle = serve.run(Echo.bind(), name="bench-echo", route_prefix=None)
    asyncio.run(load_handle(handle, texts[:concurrency * 2], concurrency))  # warm up
    lat, _, wall = asyncio.run(load_handle(handle, [texts[i % len(texts)] for i in range(n)], concurrency))
    serve.delete("bench-echo")
    return len(lat) / wall


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def load(url: str, bodies: list[dict], concurrency: int) -> tuple[list[float], int, float]:
    """Send every body once from ``concurrency`` workers: (latencies of the 200s, failures, wall seconds).

    Raw HTTP (aiohttp) rather than ragtune's client (``serving.client``): this measures the server's requests/s
    with the load generator on the same cores, so a request should cost the client as little as it can (an
    answer counted by its status, never parsed). The openai client's request building and response models, and
    its synchronous form's thread per request in flight, would take a share of those cores from the server.
    """
    import aiohttp

    queue: asyncio.Queue = asyncio.Queue()
    for b in bodies:
        queue.put_nowait(b)
    lat: list[float] = []
    failed = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal failed
        while not queue.empty():
            body = queue.get_nowait()
            t0 = time.perf_counter()
            try:
                async with session.post(url, json=body) as r:
                    await r.read()
                    ok = r.status == 200
            except aiohttp.ClientError:
                ok = False
            if ok:
                lat.append(time.perf_counter() - t0)
            else:
                failed += 1

    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=300)) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        return lat, failed, time.perf_counter() - t0


async def load_handle(handle, texts: list[str], concurrency: int) -> tuple[list[float], int, float]:
    """The same bounded load straight into the Embedder deployment through a Serve handle (no HTTP hops)."""
    queue: asyncio.Queue = asyncio.Queue()
    for t in texts:
        queue.put_nowait(t)
    lat: list[float] = []

    async def worker() -> None:
        while not queue.empty():
            text = queue.get_nowait()
            t0 = time.perf_counter()
            await handle.embed_many.remote([text])
            lat.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return lat, 0, time.perf_counter() - t0


async def _batches(handle, texts: list[str], concurrency: int) -> float:
    """Mean batch size the Embedder reports for ``concurrency`` requests sent at once."""
    out = await asyncio.gather(*(handle.embed_many.remote([t]) for t in texts[:concurrency]))
    return statistics.mean(e.batch for [e] in out)


def batch_totals(url: str, dep: str) -> tuple[float, float]:
    """(sum, count) of the batch sizes the Ingress saw for a deployment so far, from its /metrics."""
    import urllib.request

    text = urllib.request.urlopen(f"{url}/metrics", timeout=30).read().decode()
    s = re.search(rf'ragtune_batch_size_sum{{deployment="{dep}"}} ([0-9.e+]+)', text)
    c = re.search(rf'ragtune_batch_size_count{{deployment="{dep}"}} ([0-9.e+]+)', text)
    return (float(s.group(1)) if s else 0.0), (float(c.group(1)) if c else 0.0)


# --- the peer: what a user would write instead ------------------------------------------------------------------------

class PeerSearch(BaseModel):
    """The peer's /v1/search body (at module level: FastAPI resolves the handlers' annotations in its globals)."""

    query: str
    k: int = 5


class PeerEmbed(BaseModel):
    input: str | list[str]
    model: str | None = None


def peer_app(index_path: str):
    """A FastAPI app over the texts ragtune's index holds: the index's embedding model, an exact FAISS index of
    their vectors (inner product of normalised vectors: cosine, as ragtune's), ``/v1/search`` {query, k} and
    ``/v1/embeddings`` {input}. Plain code, no batching: handlers are ``def``, so FastAPI runs them in its thread
    pool, the model with torch's threads."""
    import faiss
    import numpy as np
    from fastapi import FastAPI

    loc = resolve_index(index_path)
    manifest = read_index_manifest(loc)
    ids = live_ids(loc, manifest, ("chunk_id",))["chunk_id"].to_numpy()
    rows = open_docstore(loc, manifest).lookup(ids, columns=["doc_id", "title", "text"])
    chunk_ids = np.array(sorted(rows), dtype=np.int64)
    texts = [rows[int(c)]["text"] for c in chunk_ids]
    encoder = QueryEncoder(manifest, batch_size=64)
    xb = encoder.encode(texts)
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(xb.shape[1]))
    index.add_with_ids(xb, chunk_ids)
    app = FastAPI()

    @app.post("/v1/search")
    def search(req: PeerSearch) -> dict:
        D, I = index.search(encoder.encode([req.query]), req.k)
        return {"data": [{"rank": r, "chunk_id": int(c), "score": float(d), **rows[int(c)]}
                         for r, (d, c) in enumerate(zip(D[0], I[0], strict=True), 1) if c >= 0]}

    @app.post("/v1/embeddings")
    def embeddings(req: PeerEmbed) -> dict:
        inputs = [req.input] if isinstance(req.input, str) else req.input
        return {"data": [{"index": i, "embedding": v.tolist()} for i, v in enumerate(encoder.encode(inputs))]}

    return app, len(texts)


def run_peer(index_path: str, port: int) -> None:
    """The peer's process: ``python bench/serve.py --peer INDEX --port N``."""
    import uvicorn

    app, n = peer_app(index_path)
    print(f"peer: {n} texts indexed", flush=True)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def start_peer(index_path: str) -> tuple[object, str]:
    """The peer in a process of its own (as a user runs it), once it answers: (process, base URL)."""
    import subprocess
    import urllib.error
    import urllib.request

    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--peer", index_path, "--port", str(port)])
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            body = json.dumps({"query": "warm up", "k": 1}).encode()
            urllib.request.urlopen(urllib.request.Request(f"{url}/v1/search", body,
                                                          {"Content-Type": "application/json"}), timeout=5)
            return proc, url
        except urllib.error.HTTPError as e:  # it answers, wrongly: no point waiting
            proc.kill()
            raise SystemExit(f"the peer answered {e.code}: {e.read()[:300]!r}") from None
        except OSError:  # not listening yet
            if proc.poll() is not None:
                raise SystemExit(f"the peer exited with {proc.returncode}") from None
            time.sleep(1)
    proc.kill()
    raise SystemExit("the peer did not answer within 600 s")


def compare_with_peer(args: argparse.Namespace, index_path: str, queries: list[str], port: int,
                      access_log: bool) -> None:
    """ragtune (batching on, ``--layout``) against the peer: dense and hybrid /v1/search, /v1/embeddings at
    ``--concurrency``, alternating, ``--peer-rounds`` rounds; medians, ratios, p99s and each route's hops."""
    from ray import serve

    cfg = ServeJobConfig.model_validate({
        "index": {"path": index_path, "poll_interval_s": None},
        "shards": {"layout": args.layout, "fused_in_ingress": IN_INGRESS[args.fused_in_ingress]},
        "embedder": {"max_batch_size": 32}, "generator": {"model": str(args.model), "name": "tiny"},
        "http": {"port": port}, "auth": {"api_keys_env": None}, "limits": {"request_timeout_s": 300},
        "serve": {"access_log": access_log}})
    hops = route_hops(plan_for(cfg))
    url = f"http://127.0.0.1:{port}"
    serve.run(build_app(ServeAppArgs(config=cfg.model_dump(mode="json"))), name="bench-peer", route_prefix="/")
    wait_ready(url)
    peer, peer_url = start_peer(index_path)
    n = args.requests
    routes = {  # name: (path, ragtune's bodies, the peer's bodies)
        "dense": ("/v1/search", [{"query": queries[i % len(queries)], "k": 5, "mode": "dense"} for i in range(n)],
                  [{"query": queries[i % len(queries)], "k": 5} for i in range(n)]),
        "hybrid": ("/v1/search", [{"query": queries[i % len(queries)], "k": 5, "mode": "hybrid"}
                                  for i in range(n)], [{"query": queries[i % len(queries)], "k": 5} for i in range(n)]),
        "embeddings": ("/v1/embeddings", [{"model": "all-MiniLM-L6-v2", "input": queries[i % len(queries)],
                                           "encoding_format": "float"} for i in range(n)],
                       [{"input": queries[i % len(queries)]} for i in range(n)]),
    }
    conc = args.concurrency
    try:
        for path, ours, theirs in routes.values():  # warm up both
            asyncio.run(load(url + path, ours[:conc * 2], conc))
            asyncio.run(load(peer_url + path, theirs[:conc * 2], conc))
        results: dict[tuple[str, str], list[dict]] = {}
        for r in range(args.peer_rounds):
            for name, (path, ours, theirs) in routes.items():
                for who, base, bodies in (("ragtune", url, ours), ("peer", peer_url, theirs)):
                    lat, failed, wall = asyncio.run(load(base + path, bodies, conc))
                    res = {"rps": len(lat) / wall, "p50": pct(lat, .5), "p99": pct(lat, .99), "failed": failed}
                    results.setdefault((name, who), []).append(res)
                    print(f"round {r + 1} {who:8s} {name:10s} {res['rps']:7.1f} req/s  p50 {res['p50'] * 1e3:6.0f} ms"
                          f"  p99 {res['p99'] * 1e3:6.0f} ms  failed {failed}", flush=True)
    finally:
        peer.kill()  # type: ignore[attr-defined]
        serve.delete("bench-peer")

    def med(name: str, who: str, key: str) -> float:
        return statistics.median(x[key] for x in results[(name, who)])

    print(f"\nragtune ({plan_for(cfg).layout} layout) vs the peer (uvicorn + FastAPI + the same model + exact FAISS), "
          f"medians over {args.peer_rounds} round(s), concurrency {conc}, {n} requests each:")
    print(f"{'route':10s} {'ragtune req/s':>13s} {'peer req/s':>10s} {'ratio':>6s} {'ragtune p99':>11s} "
          f"{'peer p99':>9s}")
    for name in routes:
        print(f"{name:10s} {med(name, 'ragtune', 'rps'):13.1f} {med(name, 'peer', 'rps'):10.1f} "
              f"{med(name, 'ragtune', 'rps') / med(name, 'peer', 'rps'):5.2f}x "
              f"{med(name, 'ragtune', 'p99') * 1e3:8.0f} ms {med(name, 'peer', 'p99') * 1e3:6.0f} ms")
    print("hybrid is BM25 + dense fused, compared with the peer's dense search. Hops of each route:")
    for route, path in hops.items():
        print(f"  {route}: {path}")


def pct(xs: list[float], q: float) -> float:
    return sorted(xs)[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--paragraphs", type=int, default=400, help="SQuAD paragraphs in the index")
    ap.add_argument("--requests", type=int, default=600, help="requests per route for embedder, embeddings, search")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--chat-requests", type=int, default=64)
    ap.add_argument("--chat-concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=16, help="tokens generated per chat answer (greedy)")
    ap.add_argument("--repeats", type=int, default=1, help="on/off rounds (medians over them)")
    ap.add_argument("--access-log", action="store_true", help="keep Serve's per-request access log (costs CPU)")
    ap.add_argument("--routes", default="embedder,embeddings,search,chat", help="which routes to load")
    ap.add_argument("--plot", default="bench-serve.png")
    ap.add_argument("--peer-rounds", type=int, default=3, help="rounds of ragtune vs the peer (0: none)")
    ap.add_argument("--layout", default="auto", choices=("auto", "fused", "split"), help="shards.layout")
    ap.add_argument("--fused-in-ingress", choices=("auto", "true", "false"), default="auto",
                    help="shards.fused_in_ingress (auto: false with 2 or more replicas; false = IndexReplica replicas "
                    "behind one Ingress, which retries a replica lost mid-call on another, at one more hop)")
    ap.add_argument("--peer", metavar="INDEX", help=argparse.SUPPRESS)  # the peer's own process
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peer:
        run_peer(args.peer, args.port)
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging

    logging.basicConfig(level=logging.WARNING)

    from ray import serve


    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    corpus, queries = corpus_and_queries(args.paragraphs, work)
    t0 = time.perf_counter()
    embed(EmbedJobConfig.model_validate({"corpus": {"path": str(corpus), "id_field": "_id"},
                                         "output": {"path": str(work / "emb"), "num_parts": 2}}))
    built = index(IndexJobConfig.model_validate({"embeddings": {"path": str(work / "emb")},
                                                 "index": {"path": str(work / "index"), "kind": "Flat", "shards": 2}}))
    texts = [json.loads(line)["text"] for line in open(corpus)]
    model = args.model = build_tiny(work / "tiny", texts[:300], TinySpec())
    print(f"setup: {built.line()} + tiny generator in {time.perf_counter() - t0:.0f}s; {len(queries)} queries, "
          f"{os.cpu_count()} cores; client and server share them", flush=True)

    ceiling = encode_ceiling(str(work / "index"), queries)
    print(f"in one process, no Serve ({ceiling['threads']} torch threads): the embedding model encodes "
          f"{ceiling[1]:.0f} queries/s one at a time, {ceiling[32]:.0f} in batches of 32 "
          f"(x{ceiling[32] / ceiling[1]:.2f}: the most batching can give on this CPU)", flush=True)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    routes = {
        "embedder": ("handle", [queries[i % len(queries)] for i in range(args.requests)], args.concurrency),
        "embeddings": ("/v1/embeddings", [{"model": "all-MiniLM-L6-v2", "input": queries[i % len(queries)],
                                           "encoding_format": "float"} for i in range(args.requests)],
                       args.concurrency),
        "search": ("/v1/search", [{"query": queries[i % len(queries)], "k": 5} for i in range(args.requests)],
                   args.concurrency),
        "chat": ("/v1/chat/completions",
                 [{"model": "tiny", "max_tokens": args.max_tokens, "temperature": 0,
                   "messages": [{"role": "user", "content": queries[i % len(queries)]}]}
                  for i in range(args.chat_requests)], args.chat_concurrency),
    }
    routes = {name: routes[name] for name in args.routes.split(",") if name != "none"}
    echo = serve_overhead(args.concurrency, args.requests, queries) if "embedder" in routes else None
    if echo:
        # on a saturated machine the costs of a request add up: the model's share plus Serve's
        bound = (1 / ceiling[1] + 1 / echo) / (1 / ceiling[32] + 1 / echo)
        print(f"through a Serve handle, a deployment that does nothing answers {echo:.0f} requests/s at concurrency "
              f"{args.concurrency} ({1e3 / echo:.1f} ms of the machine per request): batching can give the Embedder "
              f"at most x{bound:.2f} here", flush=True)
    results: dict[tuple[str, str], list[dict]] = {}
    for r in range(args.repeats):
        for mode in ("on", "off"):
            on = mode == "on"
            cfg = ServeJobConfig.model_validate({
                "index": {"path": str(work / "index"), "poll_interval_s": None},
                "embedder": {"batching": on, "max_batch_size": 32},
                "shards": {"layout": args.layout, "fused_in_ingress": IN_INGRESS[args.fused_in_ingress]},
                "generator": {"model": str(model), "name": "tiny", "batching": on, "max_batch_size": 8,
                              "defaults": {"max_tokens": args.max_tokens}},
                "http": {"port": port}, "auth": {"api_keys_env": None},
                "limits": {"request_timeout_s": 300}, "serve": {"access_log": args.access_log}})
            serve.run(build_app(ServeAppArgs(config=cfg.model_dump(mode="json"))), name="bench", route_prefix="/")
            wait_ready(url)
            # the deployment that embeds: the Embedder (split); in the fused layout the Ingress embeds in its own
            # process, so there is no handle to call without HTTP
            fused = plan_for(cfg).layout == "fused"
            handle = None if fused else serve.get_deployment_handle("Embedder", app_name="bench")
            active = {n: route for n, route in routes.items() if route[0] != "handle" or handle is not None}
            if len(active) < len(routes) and r == 0 and on:
                print("fused layout: the Ingress embeds in its own process; no `embedder` handle route", flush=True)
            for path, bodies, conc in active.values():  # warm up (adapters, caches)
                asyncio.run(load_handle(handle, bodies[:conc * 2], conc) if path == "handle" else
                            load(url + path, bodies[: max(conc * 2, 16)], conc))
            for name, (path, bodies, conc) in active.items():
                dep = "generator" if name == "chat" else "embedder"
                s0, c0 = batch_totals(url, dep)
                if path == "handle":
                    lat, failed, wall = asyncio.run(load_handle(handle, bodies, conc))
                    ws = asyncio.run(_batches(handle, bodies[:conc], conc))
                else:
                    lat, failed, wall = asyncio.run(load(url + path, bodies, conc))
                    s1, c1 = batch_totals(url, dep)
                    ws = (s1 - s0) / (c1 - c0) if c1 > c0 else float("nan")
                res = {"rps": len(lat) / wall, "p50": pct(lat, .5), "p95": pct(lat, .95), "p99": pct(lat, .99),
                       "failed": failed, "batch": ws}
                results.setdefault((name, mode), []).append(res)
                print(f"round {r + 1} batching {mode:3s} {name:10s} {res['rps']:7.1f} req/s  "
                      f"p50 {res['p50'] * 1e3:6.0f} ms  p95 {res['p95'] * 1e3:6.0f} ms  p99 {res['p99'] * 1e3:6.0f} ms"
                      f"  batch {res['batch']:.1f}  failed {failed}", flush=True)
            serve.delete("bench")
    if args.peer_rounds:
        compare_with_peer(args, str(work / "index"), queries, port, args.access_log)
    serve.shutdown()
    if not routes:
        return

    def med(name: str, mode: str, key: str) -> float:
        return statistics.median(x[key] for x in results[(name, mode)])

    print(f"\nmedians over {args.repeats} round(s); concurrency {args.concurrency} (chat {args.chat_concurrency})")
    print(f"{'route':10s} {'batching':8s} {'req/s':>8s} {'p50 ms':>8s} {'p95 ms':>8s} {'p99 ms':>8s} {'batch':>6s}")
    for name in routes:
        for mode in ("on", "off"):
            print(f"{name:10s} {mode:8s} {med(name, mode, 'rps'):8.1f} {med(name, mode, 'p50') * 1e3:8.0f} "
                  f"{med(name, mode, 'p95') * 1e3:8.0f} {med(name, mode, 'p99') * 1e3:8.0f} "
                  f"{med(name, mode, 'batch'):6.1f}")
    print("\nbatching on / off:")
    for name in routes:
        print(f"  {name:10s} requests/s x{med(name, 'on', 'rps') / med(name, 'off', 'rps'):.2f}   "
              f"p99 x{med(name, 'on', 'p99') / med(name, 'off', 'p99'):.2f}")


    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    xs = range(len(routes))
    for j, mode in enumerate(("on", "off")):
        axes[0].bar([x + 0.4 * j for x in xs], [med(n, mode, "rps") for n in routes], 0.4, label=f"batching {mode}")
        axes[1].bar([x + 0.4 * j for x in xs], [med(n, mode, "p99") * 1e3 for n in routes], 0.4,
                    label=f"batching {mode}")
    for ax, title in zip(axes, ("requests/s", "p99 latency (ms)"), strict=True):
        ax.set_xticks([x + 0.2 for x in xs], list(routes))
        ax.set_title(title)
        ax.legend()
    fig.suptitle(f"ragtune serve, {os.cpu_count()} cores, concurrency {args.concurrency} (chat "
                 f"{args.chat_concurrency})")
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
