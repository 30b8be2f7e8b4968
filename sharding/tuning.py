"""Recall against exact search, and the search-parameter tuning built on it.

``index.target_recall`` means recall@``RECALL_K`` against exact search. The index job measures it on each
candidate setting of a new index and keeps the cheapest that reaches the target; compaction re-tunes the version
it writes and ``--check-recall`` re-measures the current one (``sharding.freshness``), all with these functions,
so the number means the same everywhere.

Queries are either held-out database vectors (``qids`` their own chunk ids: the searched index does not hold
them, the exact search leaves them out, and each is dropped from its own results) or real query texts embedded
with the index's model (``qids`` -1). FAISS vocabulary: ``xq`` queries (nq, d), ``xb`` database vectors (nb, d)
with chunk ids ``ids``, ``k`` results, ``D``/``I`` distances and ids (nq, k); a missing result has id -1.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from configs.errors import RagtuneError
from sharding.faiss_index import faiss_metric, index_layers
from sharding.metrics import read_query_texts

RECALL_K = 10  # recall@RECALL_K is what index.target_recall means: the index job tunes on it, compaction re-measures it
REFINE_K_FACTOR = 16  # IVF-PQ + refine: re-rank k x 16 candidates on SQ8 codes (cheap next to the IVF scan)
HNSW_EF = [16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024]


# --- the queries ------------------------------------------------------------------------------------------------

def held_out_count(n_queries: int, nb: int) -> int:
    """How many database vectors to hold out as queries: ``n_queries``, but at most a tenth of the ``nb`` vectors,
    so that the index searched without them stays the same index."""
    return min(n_queries, max(1, nb // 10))


def sample_query_texts(path: str, n: int, rng: np.random.Generator) -> list[str]:
    """``n`` query texts of a queries file (BEIR ``queries.jsonl`` or one per line), drawn without replacement,
    in file order."""
    texts = read_query_texts(path)
    return [texts[i] for i in np.sort(rng.choice(len(texts), min(n, len(texts)), replace=False))]


# --- exact search -------------------------------------------------------------------------------------------------

def exact_knn(xq: np.ndarray, xb: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-k of ``xq`` in ``xb`` (row numbers as ids), by FAISS's own kernels."""
    import faiss

    k = min(k, len(xb))
    if k == 0:
        return np.zeros((len(xq), 0), np.float32), np.zeros((len(xq), 0), np.int64)
    return faiss.knn(np.ascontiguousarray(xq, dtype=np.float32), np.ascontiguousarray(xb, dtype=np.float32), k,
                     metric=faiss_metric(metric))


class GroundTruth:
    """The exact top-k of queries over a database that arrives in blocks (the parts a shard is read from, the
    shards of a version), as ``faiss.contrib.exhaustive_search.knn_ground_truth`` computes it: each block
    searched exactly, the results kept in FAISS's ``ResultHeap``, so memory stays (nq, k) whatever the database
    size. Unlike that function, ids are the blocks' own (chunk ids), and ids in ``exclude`` (held-out queries,
    which the index searched does not hold either) are left out.
    """

    def __init__(self, xq: np.ndarray, k: int, metric: str, exclude: np.ndarray | None = None):
        import faiss

        self.xq = np.ascontiguousarray(xq, dtype=np.float32)
        self.k, self.metric = k, metric
        self.exclude = None if exclude is None else np.asarray(exclude, dtype=np.int64)
        self._heap = faiss.ResultHeap(len(self.xq), k, keep_max=metric == "inner_product")

    def add(self, ids: np.ndarray, xb: np.ndarray) -> None:
        """One database block: (n,) chunk ids and their (n, d) vectors."""
        ids = np.asarray(ids, dtype=np.int64)
        if self.exclude is not None:
            keep = ~np.isin(ids, self.exclude)
            ids, xb = ids[keep], xb[keep]
        D, I = exact_knn(self.xq, xb, self.k, self.metric)
        self.add_result(D, np.where(I >= 0, ids[np.maximum(I, 0)], -1))

    def add_result(self, D: np.ndarray, I: np.ndarray) -> None:
        """Exact results over another block, found elsewhere (a shard task's), ids already chunk ids."""
        if D.shape[1]:
            self._heap.add_result(D, I)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(D, I) (nq, k), best first; -1 where the database holds fewer than k vectors."""
        self._heap.finalize()
        return self._heap.D, self._heap.I


# --- search parameters ------------------------------------------------------------------------------------------

def candidate_params(index: Any) -> list[dict[str, int]]:
    """Search settings to try, cheapest first: ``nprobe`` for IVF, ``efSearch`` for HNSW, nothing for Flat."""
    import faiss

    layers = index_layers(index)
    refine = {"k_factor_rf": REFINE_K_FACTOR} if any(isinstance(x, faiss.IndexRefine) for x in layers) else {}
    for x in layers:
        if isinstance(x, faiss.IndexIVF):
            probes = [p for p in (2 ** i for i in range(20)) if p < x.nlist] + [x.nlist]
            hnsw_q = isinstance(faiss.downcast_index(x.quantizer), faiss.IndexHNSW)
            return [{"nprobe": p, **({"quantizer_efSearch": max(2 * p, 64)} if hnsw_q else {}), **refine}
                    for p in probes]
        if isinstance(x, faiss.IndexHNSW):
            return [{"efSearch": ef, **refine} for ef in HNSW_EF]
    return [dict(refine)] if refine else [{}]


def apply_params(index: Any, params: dict[str, int]) -> None:
    """Set search parameters through FAISS's ParameterSpace (it walks IDMap2, Refine and PreTransform)."""
    import faiss

    ps = faiss.ParameterSpace()
    for name, value in params.items():
        try:
            ps.set_index_parameter(index, name, value)
        except RuntimeError:
            raise RagtuneError(f"search parameter {name}={value} does not apply to this index "
                               f"({type(faiss.downcast_index(index)).__name__}). Fix: use nprobe for IVF indexes, "
                               "efSearch for HNSW, none for Flat") from None


def search_candidates(index: Any, xq: np.ndarray, k: int,
                      candidates: Sequence[dict[str, int]]) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """Search ``xq`` once per candidate setting: [(D, I, seconds)], the last setting left applied."""
    out = []
    for params in candidates:
        apply_params(index, params)
        t0 = time.perf_counter()
        D, I = index.search(xq, k)
        out.append((D, I, time.perf_counter() - t0))
    return out


# --- recall -------------------------------------------------------------------------------------------------------

def drop_self(D: np.ndarray, I: np.ndarray, qids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Remove each query's own id from its results (queries are database vectors) and keep k."""
    keep = I != np.asarray(qids, dtype=np.int64)[:, None]
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]  # kept entries first, in rank order
    return np.take_along_axis(D, order, axis=1), np.take_along_axis(I, order, axis=1)


def recall_at_k(I: np.ndarray, I_true: np.ndarray, k: int = 10) -> float:
    """Mean over queries of |top-k found ∩ true top-k| / k (the k-recall@k of ANN benchmarks)."""
    hits = 0
    n = 0
    for found, true in zip(I[:, :k], I_true[:, :k], strict=True):
        t = set(true[true >= 0].tolist())
        if t:
            hits += len(t.intersection(found.tolist()))
            n += len(t)
    return hits / n if n else 1.0


def queries_per_second(nq: int, seconds: float) -> float:
    return nq / seconds if seconds > 0 else 0.0


class Searchable(Protocol):
    """What recall is measured on: the segments of an index version searched together
    (``sharding.search.ShardedIndex``)."""

    def set_params(self, params: dict[str, int]) -> None: ...

    def search(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...


def measured_recall(index: Searchable, xq: np.ndarray, qids: np.ndarray, true_I: np.ndarray,
                    k: int) -> tuple[float, float]:
    """(recall@k, seconds) of one batched search of ``index`` at its current setting; searched k + 1 deep, so
    that k results remain when a held-out query finds itself."""
    t0 = time.perf_counter()
    D, I = index.search(xq, k + 1)
    seconds = time.perf_counter() - t0
    _, I = drop_self(D, I, qids, k)
    return recall_at_k(I, true_I, k), seconds


# --- tuning -------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TuneRow:
    params: dict[str, int]
    recall: float  # recall@k against exact search
    qps: float  # batched queries per second, all shards searched one after the other

    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.params.items() if k != "k_factor_rf") or "exact"


def tune_settings(index: Searchable, candidates: Sequence[dict[str, int]], xq: np.ndarray, qids: np.ndarray,
                  true_I: np.ndarray, k: int) -> list[TuneRow]:
    """Recall@k and QPS of ``index`` at each candidate setting (the last one left applied)."""
    rows = []
    for params in candidates:
        index.set_params(params)
        recall, seconds = measured_recall(index, xq, qids, true_I, k)
        rows.append(TuneRow(params, recall, queries_per_second(len(xq), seconds)))
    return rows


def tune(rows: Sequence[TuneRow], target: float) -> tuple[TuneRow, bool]:
    """The cheapest setting that reaches ``target`` recall (rows come cheapest first), else the best recall.

    Returns:
        (chosen row, whether the target was reached).
    """
    for row in rows:
        if row.recall >= target:
            return row, True
    return max(rows, key=lambda r: (r.recall, r.qps)), False


def tuning_table(rows: Sequence[TuneRow], chosen: TuneRow | None = None, k: int = 10) -> str:
    """Markdown table: setting, recall@k, QPS, the chosen row marked."""
    lines = [f"| search setting | recall@{k} | QPS (batched) |", "|---|---|---|"]
    for r in rows:
        mark = " **(chosen)**" if chosen is not None and r == chosen else ""
        lines.append(f"| {r.label()}{mark} | {r.recall:.4f} | {r.qps:,.0f} |")
    return "\n".join(lines)
