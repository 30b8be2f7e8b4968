"""`ragtune search` and `ragtune eval-retrieval`: query an index version, and measure it in the BEIR format.

    ragtune search -i runs/squad/index "Which NFL team won Super Bowl 50?" -k 10
    ragtune eval-retrieval -i runs/squad/index --queries ../shared/data/squad/retrieval-v1.1/queries.jsonl \\
        --qrels ../shared/data/squad/retrieval-v1.1/qrels/test.tsv

Both run in this process without Ray: they open the version ``LATEST`` names (or the version folder given),
check every shard's checksum, embed the queries with the model named in the index manifest (the same revision,
normalised when the index compares by inner product), search all shards and merge the top-k exactly. Documents
are ranked by their best chunk. Heavy imports (torch, faiss) happen inside the functions, so ``ragtune --help``
stays light.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from configs.errors import RagtuneError
from models.embedders import QueryEncoder
from models.hardware import resolve_device
from sharding.lexical import chunk_texts
from sharding.metrics import evaluate, judged_in_index, rank_documents, read_qrels, read_queries
from sharding.search import Fusion, ShardedIndex, check_mode, ranked_hits, result_metric, search

log = logging.getLogger("ragtune.search")
logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # four lines per process about CPU builds

KS = (1, 5, 10, 100)


# --- search -------------------------------------------------------------------------------------------------------

def search_texts(index: ShardedIndex, encoder: QueryEncoder | None, queries: Sequence[str], k: int,
                 mode: str = "dense", fusion: Fusion | None = None,
                 reranker: Reranker | None = None) -> list[list[dict[str, Any]]]:
    """Ranked chunks for each query: rank, score, chunk_id, doc_id, title, text.

    ``mode`` is dense, lexical (no encoder needed) or hybrid (see ``sharding.search.search``); a ``reranker``
    re-scores the top ``reranker.depth`` candidates and keeps k.
    """
    depth = max(k, reranker.depth) if reranker else k
    xq = None if mode == "lexical" or encoder is None else encoder.encode(queries)
    D, I = search(index, xq, queries, depth, mode, fusion)
    rows = index.docstore().lookup(I[I >= 0])
    if reranker:
        D, I = reranker.rerank(queries, D, I, rows, k)
    return [ranked_hits(d, i, rows) for d, i in zip(D, I, strict=True)]


class Reranker:
    """A cross-encoder (sentence-transformers ``CrossEncoder``, a local folder) that re-scores the top candidates
    of a search: the optional re-ranking stage. None ships offline, so it is off unless a folder is given."""

    def __init__(self, path: str, depth: int = 50, batch_size: int = 64, device: str = "auto"):
        if not Path(path).is_dir():
            raise RagtuneError(f"--rerank {path!r}: no such folder. Fix: give a local sentence-transformers "
                               "CrossEncoder folder (e.g. a downloaded cross-encoder/ms-marco-MiniLM-L6-v2), or leave "
                               "re-ranking off")
        from sentence_transformers import CrossEncoder

        try:
            self.model = CrossEncoder(path, device=str(resolve_device(device)))  # type: ignore[arg-type]
        except (OSError, ValueError) as e:
            raise RagtuneError(f"--rerank {path!r}: not a loadable CrossEncoder ({str(e).splitlines()[0][:160]}). "
                               "Fix: give a folder saved by CrossEncoder.save or a Hugging Face cross-encoder") \
                from None
        self.depth = depth
        self.batch_size = batch_size

    def rerank(self, queries: Sequence[str], D: np.ndarray, I: np.ndarray, rows: Mapping[int, Mapping[str, Any]],
               k: int) -> tuple[np.ndarray, np.ndarray]:
        """Re-score each query's candidates (ids in I) against their docstore text; keep the top k (D = the
        cross-encoder's scores, higher is better)."""
        pairs, owner = [], []
        for q, ids in enumerate(I):
            for cid in ids[ids >= 0].tolist():
                row = rows.get(cid, {})
                pairs.append((queries[q], chunk_texts([row.get("title")], [row.get("text")])[0]))
                owner.append((q, cid))
        scores = np.asarray(self.model.predict(pairs, batch_size=self.batch_size, show_progress_bar=False),
                            dtype=np.float32).reshape(len(pairs), -1)[:, -1] if pairs else np.zeros(0, np.float32)
        per: list[list[tuple[float, int]]] = [[] for _ in range(len(I))]
        for (q, cid), sc in zip(owner, scores.tolist(), strict=True):
            per[q].append((sc, cid))
        D2 = np.full((len(I), k), -np.inf, dtype=np.float32)
        I2 = np.full((len(I), k), -1, dtype=np.int64)
        for q, cands in enumerate(per):
            top = sorted(cands, key=lambda x: -x[0])[:k]
            D2[q, :len(top)] = [sc for sc, _ in top]
            I2[q, :len(top)] = [cid for _, cid in top]
        return D2, I2


def _snippet(text: str, width: int) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= width else text[: width - 1] + "…"


def describe(index: ShardedIndex) -> str:
    m = index.manifest
    params = ", ".join(f"{k}={v}" for k, v in index.params.items() if k != "k_factor_rf") or "exact"
    recall = f", recall@{m.recall.k} {m.recall.recall:.3f}" if m.recall else ""
    lexical = f", BM25 ({m.lexical.library} {m.lexical.library_version})" if m.lexical else ", no lexical part"
    return (f"{index.location.shown}: {m.factory}, {m.ntotal:,} vectors in {len(m.shards)} shard(s), {params}"
            f"{recall}, model {m.model.name}{lexical}")


def _fusion(args: argparse.Namespace) -> Fusion:
    check_mode(args.mode)
    return Fusion(method=args.fusion, weight=args.weight, rrf_k=args.rrf_k, depth=args.depth)


def search_main(args: argparse.Namespace) -> int:
    fusion = _fusion(args)
    reranker = Reranker(args.rerank, args.rerank_depth) if args.rerank else None
    index = ShardedIndex.open(args.index, verify=not args.no_verify, params=_params(args.param))
    encoder = None if args.mode == "lexical" else QueryEncoder(index.manifest)
    results = search_texts(index, encoder, args.query, args.k, args.mode, fusion, reranker)
    if args.json:
        print(json.dumps([{"query": q, "results": r} for q, r in zip(args.query, results, strict=True)]))
        return 0
    print(f"{describe(index)}; mode {args.mode}")
    for q, hits in zip(args.query, results, strict=True):
        print(f"\nquery: {q}")
        for h in hits:
            label = f"{h['title']}: " if h["title"] else ""
            print(f"{h['rank']:>3}  {h['score']:.4f}  {h['doc_id']}  {_snippet(label + h['text'], args.snippet)}")
    return 0


def _params(items: Sequence[str] | None) -> dict[str, int]:
    out = {}
    for item in items or ():
        name, sep, value = item.partition("=")
        if not sep or not value.strip().isdigit():
            raise RagtuneError(f"--param {item!r}: expected name=integer. Fix: e.g. --param nprobe=64 or "
                               "--param efSearch=128")
        out[name.strip()] = int(value)
    return out


# --- evaluation ---------------------------------------------------------------------------------------------------

def evaluate_index(index: ShardedIndex, xq: np.ndarray | None, qids: Sequence[str],
                   qrels: Mapping[str, Mapping[str, int]], ks: Sequence[int] = KS, chunks_per_doc: int = 3,
                   batch: int = 1024, *, mode: str = "dense", texts: Sequence[str] | None = None,
                   fusion: Fusion | None = None) -> dict[str, float]:
    """BEIR metrics of an index for embedded queries; documents are ranked by their best chunk.

    ``chunks_per_doc * max(ks)`` chunks are retrieved per query, so that the top documents are exact as long
    as at least ``max(ks)`` distinct documents appear among them (the count of queries short of that is
    returned as ``queries_short``). ``mode`` lexical and hybrid need the query ``texts`` (in ``qids`` order).
    """
    chunk_ids, doc_ids = index.docstore().column("doc_id")
    doc_of = dict(zip(chunk_ids.tolist(), doc_ids.tolist(), strict=True))
    judged = {q: dict(qrels[q]) for q in qids if q in qrels}
    coverage = judged_in_index(judged, set(doc_of.values()), index.location.uri)  # none: a clear error
    if coverage < 1:
        log.warning("%.1f%% of the documents judged relevant for these queries are not in %s: recall and nDCG "
                    "count them as missed (is the index built from the same corpus as the qrels?)",
                    100 * (1 - coverage), index.location.uri)
    k_docs = max(ks)
    k_chunks = min(index.ntotal, chunks_per_doc * k_docs)
    n_docs = len(set(doc_of.values()))
    run: dict[str, list[str]] = {}
    short = 0
    metric = result_metric(index, mode)
    for i in range(0, len(qids), batch):
        D, I = search(index, None if xq is None else xq[i:i + batch],
                      None if texts is None else texts[i:i + batch], k_chunks, mode, fusion)
        for qid, d, ids in zip(qids[i:i + batch], D, I, strict=True):
            ranked = rank_documents(d, ids, doc_of, metric, k_docs)
            short += len(ranked) < min(k_docs, n_docs)
            run[qid] = [doc for doc, _ in ranked]
    out = evaluate(run, {q: dict(r) for q, r in qrels.items() if q in run}, ks)
    out["queries_short"] = short
    out["judged_in_index"] = coverage
    return out


def eval_main(args: argparse.Namespace) -> int:
    fusion = _fusion(args)
    index = ShardedIndex.open(args.index, verify=not args.no_verify, params=_params(args.param))
    if args.mode != "dense":
        index.lexical_shards()  # an index without a lexical part fails before the queries are embedded
    queries = read_queries(args.queries)
    qrels = read_qrels(args.qrels)
    qids = [q for q in queries if q in qrels][: args.limit or None]
    if not qids:
        raise RagtuneError(f"no query of {args.queries} has qrels in {args.qrels}. Fix: pass the matching files")
    print(f"{describe(index)}; mode {args.mode}")
    t0 = time.perf_counter()
    texts = [queries[q] for q in qids]
    xq = None if args.mode == "lexical" else QueryEncoder(index.manifest, args.batch_size).encode(texts)
    t1 = time.perf_counter()
    metrics = evaluate_index(index, xq, qids, qrels, mode=args.mode, texts=texts, fusion=fusion)
    t2 = time.perf_counter()
    names = ["ndcg@10", "mrr@10", *(f"recall@{k}" for k in KS)]
    print(f"{len(qids):,} queries: embedded in {t1 - t0:.1f}s, searched and scored in {t2 - t1:.1f}s")
    print("| metric | value |\n|---|---|")
    for name in names:
        print(f"| {name} | {metrics[name]:.4f} |")
    result = {"index": index.location.shown, "version": index.manifest.version, "factory": index.manifest.factory,
              "params": index.params, "mode": args.mode,
              **({"fusion": vars(fusion)} if args.mode == "hybrid" else {}), **metrics}
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return 0


# --- command line -------------------------------------------------------------------------------------------------

def add_parsers(sub: argparse._SubParsersAction) -> None:
    """``ragtune search`` and ``ragtune eval-retrieval`` (not config-driven: they read an index's manifest)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-i", "--index", required=True, help="index folder (its LATEST version) or a version folder")
    common.add_argument("--param", action="append", metavar="NAME=VALUE",
                        help="override a tuned search parameter, e.g. nprobe=64 or efSearch=128 (repeatable)")
    common.add_argument("--no-verify", action="store_true", help="skip the shard checksums (faster start)")
    common.add_argument("--mode", choices=("dense", "lexical", "hybrid"), default="dense",
                        help="dense (vectors), lexical (BM25) or hybrid (both, fused); default dense")
    common.add_argument("--fusion", choices=("weighted", "rrf"), default="weighted",
                        help="hybrid: weighted (min-max normalised scores) or rrf (reciprocal rank fusion)")
    common.add_argument("--weight", type=float, default=0.5,
                        help="hybrid weighted: weight of the dense scores, 1 - weight on BM25 (default 0.5)")
    common.add_argument("--rrf-k", type=float, default=60.0, help="hybrid rrf: the rank constant (default 60)")
    common.add_argument("--depth", type=int, default=100,
                        help="hybrid: candidates taken from each ranking before fusing (default 100, at least k)")
    s = sub.add_parser("search", parents=[common], help="search an index with query text",
                       description="Embed the query with the index's model and print the ranked chunks.")
    s.add_argument("query", nargs="+", help="query text (several queries: several arguments)")
    s.add_argument("-k", type=int, default=10, help="results per query (default 10)")
    s.add_argument("--snippet", type=int, default=160, help="characters of text shown per result")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.add_argument("--rerank", metavar="DIR", help="re-rank with this local sentence-transformers CrossEncoder "
                   "folder (off by default: none ships offline)")
    s.add_argument("--rerank-depth", type=int, default=50, help="candidates the cross-encoder re-scores (default 50)")
    s.set_defaults(func=search_main)
    e = sub.add_parser("eval-retrieval", parents=[common], help="recall, nDCG and MRR of an index on BEIR qrels",
                       description="recall@1/5/10/100, nDCG@10 and MRR@10, documents ranked by their best chunk.")
    e.add_argument("--queries", required=True, help="BEIR queries.jsonl (_id, text)")
    e.add_argument("--qrels", required=True, help="BEIR qrels TSV (query-id, corpus-id, score)")
    e.add_argument("--limit", type=int, default=0, help="evaluate only the first N queries (0 = all)")
    e.add_argument("--batch-size", type=int, default=512, help="queries per embedding batch")
    e.add_argument("--output", help="also write the metrics as JSON to this file")
    e.set_defaults(func=eval_main)
