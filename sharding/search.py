"""Searching sharded indexes: exact top-k merge, the opened index version, recall and search-parameter tuning.

Shards hold disjoint vectors with global ids (chunk ids), so the top-k of the union is the top-k of the per-shard
top-k lists: merging is exact, and exact shards give the results of one exact index over the same vectors. For
inner product higher is better; for L2 lower is better. FAISS vocabulary: ``xq`` queries (nq, d), ``k``
results, ``D``/``I`` distances and ids (nq, k); a missing result has id -1.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from configs.schema.base import RagtuneError
from sharding.docstore import Docstore
from sharding.index import (
    MANIFEST,
    REFINE_K_FACTOR,
    IndexManifest,
    index_layers,
    mmap_flags,
    read_index_file,
    read_index_manifest,
    resolve_index,
)
from sharding.lexical import LexicalShard, read_lexical_file, tokenizer
from sharding.storage import Location

HNSW_EF = [16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024]
MODES = ("dense", "lexical", "hybrid")
FUSIONS = ("weighted", "rrf")


# --- merge ----------------------------------------------------------------------------------------------------------

def merge_topk(Ds: Sequence[np.ndarray], Is: Sequence[np.ndarray], k: int,
               metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard results (each (nq, k_s)) into the global top-k (nq, k).

    Ties keep shard order, then rank order inside a shard. Missing results (id -1) sort last.
    """
    D = np.hstack([np.asarray(d, dtype=np.float32) for d in Ds])
    I = np.hstack([np.asarray(i, dtype=np.int64) for i in Is])
    ip = metric == "inner_product"
    key = -D if ip else D.copy()
    key[I < 0] = np.inf
    order = np.argsort(key, axis=1, kind="stable")[:, :k]
    D, I = np.take_along_axis(D, order, axis=1), np.take_along_axis(I, order, axis=1)
    if D.shape[1] < k:  # fewer candidates than k in total
        pad = k - D.shape[1]
        D = np.hstack([D, np.full((len(D), pad), -np.inf if ip else np.inf, dtype=np.float32)])
        I = np.hstack([I, np.full((len(I), pad), -1, dtype=np.int64)])
    D[I < 0] = -np.inf if ip else np.inf
    return D, I


# --- fusion of rankings (hybrid search) -------------------------------------------------------------------------

def _fused_topk(scores: Sequence[dict[int, float]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per query {chunk id: fused score} -> top-k (D, I), higher first; ties keep first-seen order; -1 pads."""
    D = np.full((len(scores), k), -np.inf, dtype=np.float32)
    I = np.full((len(scores), k), -1, dtype=np.int64)
    for q, s in enumerate(scores):
        top = sorted(s.items(), key=lambda kv: -kv[1])[:k]  # sorted() is stable: dict order breaks ties
        if top:
            I[q, :len(top)] = [cid for cid, _ in top]
            D[q, :len(top)] = [v for _, v in top]
    return D, I


def rrf_fusion(Is: Sequence[np.ndarray], k: int, c: float = 60.0,
               weights: Sequence[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Reciprocal rank fusion (Cormack et al. 2009): score(id) = sum over rankings of w / (c + rank), rank from 1.

    Args:
        Is: rankings, each (nq, k_l) of ids best first (-1 = none).
        k: results to keep.
        c: the constant that damps the top ranks (60 in the paper and in most engines).
        weights: one per ranking (default 1 each).

    Returns:
        (D, I) (nq, k): fused scores (higher is better) and ids.
    """
    w = list(weights) if weights is not None else [1.0] * len(Is)
    nq = len(Is[0]) if Is else 0
    out: list[dict[int, float]] = []
    for q in range(nq):
        s: dict[int, float] = {}
        for wl, I in zip(w, Is, strict=True):
            for rank, cid in enumerate(np.asarray(I[q]).tolist(), 1):
                if cid >= 0:
                    s[cid] = s.get(cid, 0.0) + wl / (c + rank)
        out.append(s)
    return _fused_topk(out, k)


def weighted_fusion(Ds: Sequence[np.ndarray], Is: Sequence[np.ndarray], metrics: Sequence[str], k: int,
                    weights: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Weighted score fusion: each ranking's scores min-max normalised per query to [0, 1] (1 = its best
    result), then summed with ``weights``; an id a ranking did not return gets 0 from it.

    Args:
        Ds, Is: rankings (nq, k_l): scores and ids (-1 = none).
        metrics: per ranking, ``inner_product`` (higher is better: BM25, cosine) or ``l2`` (lower is better).
        k: results to keep.
        weights: one per ranking, e.g. (0.5, 0.5).
    """
    nq = len(Is[0]) if Is else 0
    out: list[dict[int, float]] = []
    for q in range(nq):
        s: dict[int, float] = {}
        for D, I, metric, wl in zip(Ds, Is, metrics, weights, strict=True):
            ids = np.asarray(I[q])
            ok = ids >= 0
            x = np.asarray(D[q], dtype=np.float64)[ok]
            if not len(x):
                continue
            x = x if metric == "inner_product" else -x
            lo, hi = x.min(), x.max()
            norm = (x - lo) / (hi - lo) if hi > lo else np.ones_like(x)
            for cid, v in zip(ids[ok].tolist(), norm.tolist(), strict=True):
                s[cid] = s.get(cid, 0.0) + wl * v
        out.append(s)
    return _fused_topk(out, k)


HIT_FIELDS = ("doc_id", "title", "text")


def ranked_hits(d: np.ndarray, i: np.ndarray, rows: dict[int, dict[str, Any]],
                fields: Sequence[str] = HIT_FIELDS) -> list[dict[str, Any]]:
    """One query's results (a row of D and I) as ranked hits: rank, score, chunk_id and the docstore ``fields``.

    Missing results (id -1) are left out; ranks keep their position in the merged top-k.
    """
    hits = []
    for rank, (score, cid) in enumerate(zip(np.asarray(d).tolist(), np.asarray(i).tolist(), strict=True), 1):
        if cid < 0:
            continue
        row = rows.get(cid, {})
        hits.append({"rank": rank, "score": score, "chunk_id": cid,
                     **{f: row.get(f, "" if f == "text" else None) for f in fields}})
    return hits


def exact_knn(xq: np.ndarray, xb: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-k of ``xq`` in ``xb`` (row numbers as ids), by FAISS's own kernels."""
    import faiss

    from sharding.index import faiss_metric

    k = min(k, len(xb))
    if k == 0:
        return np.zeros((len(xq), 0), np.float32), np.zeros((len(xq), 0), np.int64)
    return faiss.knn(np.ascontiguousarray(xq, dtype=np.float32), np.ascontiguousarray(xb, dtype=np.float32), k,
                     metric=faiss_metric(metric))


# --- search parameters -------------------------------------------------------------------------------------------

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


# --- an opened index version --------------------------------------------------------------------------------------

def check_queries(xq: np.ndarray, manifest: IndexManifest, where: str = "the index") -> np.ndarray:
    """Refuse queries that do not match the index: another dimension, or raw vectors for a cosine index."""
    xq = np.asarray(xq, dtype=np.float32)
    if xq.ndim == 1:
        xq = xq[None, :]
    model = manifest.model.get("name", "?")
    if xq.ndim != 2 or xq.shape[1] != manifest.dim:
        raise RagtuneError(f"query vectors have dimension {xq.shape[-1]} but {where} holds vectors of dimension "
                           f"{manifest.dim} from {model}. Fix: embed the queries with {model}, the model named in "
                           "the index manifest")
    if manifest.metric == "inner_product" and manifest.normalize and len(xq):
        norms = np.linalg.norm(xq, axis=1)
        if np.abs(norms - 1).max() > 1e-2:
            raise RagtuneError(f"query vectors are not normalised (norms {norms.min():.3g}..{norms.max():.3g}) but "
                               f"{where} compares normalised vectors by inner product (cosine). Fix: L2-normalise "
                               "the queries (normalize_embeddings=True), as the embed job did")
    return np.ascontiguousarray(xq)


def _mergeable(index: Any, manifest: IndexManifest) -> bool:
    """Shards FAISS can merge exactly: plain IVF trained once (same quantizer), or Flat behind IDMap2."""
    import faiss

    layers = index_layers(index)
    if isinstance(layers[0], faiss.IndexIVF):
        return manifest.trained is not None
    return len(layers) == 2 and isinstance(layers[0], faiss.IndexIDMap2) and isinstance(layers[1], faiss.IndexFlat)


@dataclass
class ShardedIndex:
    """The shards of one index version, loaded, searched together with an exact merge."""

    location: Location
    manifest: IndexManifest
    shards: list[Any]
    params: dict[str, int] = field(default_factory=dict)
    _ef: int | None = None  # efSearch of plain HNSW shards: raised to k for a search of k > efSearch
    numbers: list[int] | None = None  # the shard numbers loaded (None: all)
    verify: bool = True
    _lexical: list[LexicalShard] | None = None  # loaded on the first lexical search
    _tokenize: Any = None  # the tokenizer the lexical shards were built with

    @classmethod
    def open(cls, path: str, *, mmap: bool = True, verify: bool = True, params: dict[str, int] | None = None,
             merge: bool = False, only: Sequence[int] | None = None) -> ShardedIndex:
        """Open the version an index path means (``LATEST`` of a root, or a version folder).

        The version folder is resolved once: a later build that switches ``LATEST`` does not affect this object.
        ``verify`` checks every shard's sha256 before loading it; ``mmap`` maps local shards instead of reading.
        ``merge`` merges the shards into one in-memory index when they can be (plain IVF shards of one trained
        index, Flat shards): the same results as searching them apart, at the speed of one index; the shards
        are then read, not mapped. ``only`` loads just those shard numbers (a serving shard group): ``shards``,
        ``ntotal`` and searches then cover those alone.
        """
        loc = resolve_index(path)
        manifest = read_index_manifest(loc)
        flags = mmap_flags(manifest.factory) if mmap and not merge else 0
        numbers = list(range(len(manifest.shards))) if only is None else list(only)
        bad = [n for n in numbers if not 0 <= n < len(manifest.shards)]
        if bad or not numbers:
            raise RagtuneError(f"{loc.uri}: shards {bad or numbers} requested but the index has "
                               f"{len(manifest.shards)} (0..{len(manifest.shards) - 1}). Fix: ask for shards it has")
        records = [manifest.shards[n] for n in numbers]
        shards = [read_index_file(loc.join(s.file), s.sha256 if verify else None, flags) for s in records]
        for rec, shard in zip(records, shards, strict=True):
            if shard.ntotal != rec.ntotal or shard.d != manifest.dim:
                raise RagtuneError(f"{loc.join(rec.file).uri}: holds {shard.ntotal} vectors of d = {shard.d} but "
                                   f"{MANIFEST} says {rec.ntotal} of d = {manifest.dim}. Fix: rebuild the index")
        if merge and len(shards) > 1 and _mergeable(shards[0], manifest):
            for shard in shards[1:]:  # moves the codes and ids over: memory stays that of one index
                shards[0].merge_from(shard, 0)
            shards = shards[:1]
        index = cls(loc, manifest, shards, numbers=numbers, verify=verify)
        index.set_params({**manifest.search_params, **(params or {})})
        return index

    def set_params(self, params: dict[str, int]) -> None:
        import faiss

        for shard in self.shards:
            apply_params(shard, params)
        self.params = dict(params)
        layers = [index_layers(s) for s in self.shards]
        plain_hnsw = all(isinstance(x[-1], faiss.IndexHNSW) and len(x) <= 2 for x in layers)
        self._ef = self.params.get("efSearch", 16) if plain_hnsw else None

    @property
    def ntotal(self) -> int:
        return sum(s.ntotal for s in self.shards)

    def search(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (D, I) of the whole index; I holds chunk ids. Queries are checked against the manifest."""
        import faiss

        xq = check_queries(xq, self.manifest, self.location.uri)
        kw: dict[str, Any] = {}
        if self._ef is not None and k > self._ef:  # HNSW returns at most efSearch results: widen it for this call
            kw["params"] = faiss.SearchParametersHNSW(efSearch=k)  # type: ignore[attr-defined]
        if len(self.shards) == 1:
            return self.shards[0].search(xq, k, **kw)
        # Shards of one trained IVF index probe the same lists; each search quantizes again, which measured
        # faster than quantizing once and calling search_preassigned (that path runs with less parallelism).
        results = [s.search(xq, k, **kw) for s in self.shards]
        return merge_topk([r[0] for r in results], [r[1] for r in results], k, self.manifest.metric)

    def lexical_shards(self) -> list[LexicalShard]:
        """The BM25 shards of the same shard numbers, loaded (and checked) on first use."""
        lex = self.manifest.lexical
        if lex is None:
            raise RagtuneError(f"{self.location.uri}: this index version has no lexical (BM25) part: it was built "
                               "before hybrid search existed, or with index.lexical.enabled false. Fix: rebuild it "
                               "with `ragtune index` (index.lexical.enabled: true, the default), or search with "
                               "--mode dense")
        if self._lexical is None:
            numbers = self.numbers if self.numbers is not None else range(len(lex.shards))
            self._lexical = [read_lexical_file(self.location.join(lex.shards[n].file),
                                               lex.shards[n].sha256 if self.verify else None) for n in numbers]
            self._tokenize = tokenizer(lex.params)
        return self._lexical

    def search_lexical(self, texts: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (D, I) by BM25 over every loaded lexical shard (higher is better), merged exactly."""
        shards = self.lexical_shards()
        tokens = self._tokenize(list(texts))
        results = [s.search(tokens, k) for s in shards]
        return merge_topk([r[0] for r in results], [r[1] for r in results], k, "inner_product")

    def docstore(self) -> Docstore:
        return Docstore([self.location.join(s.docstore) for s in self.manifest.shards],
                        [s.docstore_bytes for s in self.manifest.shards])


@dataclass(frozen=True)
class Fusion:
    """How hybrid search fuses the dense and the lexical ranking.

    ``weighted`` (the default): min-max normalised scores, ``weight`` on dense and ``1 - weight`` on BM25;
    ``rrf``: reciprocal rank fusion with constant ``rrf_k``. Each ranking is ``depth`` deep (at least k).
    docs/index.md ("Search modes") has the SQuAD numbers behind the default.
    """

    method: str = "weighted"
    weight: float = 0.5
    rrf_k: float = 60.0
    depth: int = 100

    def __post_init__(self) -> None:
        if self.method not in FUSIONS:
            raise RagtuneError(f"fusion {self.method!r} is not known. Fix: use one of {', '.join(FUSIONS)}")
        if not 0 <= self.weight <= 1:
            raise RagtuneError(f"fusion weight {self.weight} is not in [0, 1]. Fix: give the dense ranking's weight, "
                               "e.g. 0.5 (the lexical ranking gets 1 - weight)")
        if self.rrf_k <= 0 or self.depth < 1:
            raise RagtuneError(f"rrf_k = {self.rrf_k}, depth = {self.depth}: both must be positive. Fix: e.g. "
                               "rrf_k 60, depth 100")


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise RagtuneError(f"search mode {mode!r} is not known. Fix: use one of {', '.join(MODES)}")
    return mode


def result_metric(index: ShardedIndex, mode: str) -> str:
    """How the scores of a search in ``mode`` compare: the index's metric for dense, else higher is better."""
    return index.manifest.metric if check_mode(mode) == "dense" else "inner_product"


def search(index: ShardedIndex, xq: np.ndarray | None, texts: Sequence[str] | None, k: int, mode: str = "dense",
           fusion: Fusion | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (D, I) of ``index`` in a search mode; I holds chunk ids, -1 where there are fewer results.

    Args:
        index: an opened index version.
        xq: query vectors (nq, d), needed by dense and hybrid (None for lexical).
        texts: the query texts (nq), needed by lexical and hybrid (None for dense).
        k: results per query.
        mode: ``dense`` (FAISS), ``lexical`` (BM25) or ``hybrid`` (both, fused by ``fusion``).
        fusion: how hybrid fuses; default :class:`Fusion` ().

    Returns:
        D: scores (nq, k): distances for dense (see :func:`result_metric`), BM25 or fused scores (higher is
        better) otherwise. I: chunk ids (nq, k).
    """
    check_mode(mode)
    if mode != "lexical" and xq is None:
        raise RagtuneError(f"search mode {mode!r} needs query vectors. Fix: embed the queries with the index's model")
    if mode != "dense" and texts is None:
        raise RagtuneError(f"search mode {mode!r} needs the query texts. Fix: pass them beside the vectors")
    if mode == "dense":
        assert xq is not None
        return index.search(xq, k)
    assert texts is not None
    if mode == "lexical":
        return index.search_lexical(texts, k)
    assert xq is not None
    fusion = fusion or Fusion()
    depth = max(k, fusion.depth)
    return fuse(index.search(xq, depth), index.search_lexical(texts, depth), k, index.manifest.metric, fusion)


def fuse(dense: tuple[np.ndarray, np.ndarray], lexical: tuple[np.ndarray, np.ndarray], k: int, metric: str,
         fusion: Fusion | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Hybrid's last step: fuse a dense (D, I) and a lexical (D, I), each ``max(k, fusion.depth)`` deep and
    already merged across shards (``merge_topk`` with ``metric`` for dense, ``"inner_product"`` for lexical),
    into the top-k (D = fused scores, higher is better). For callers that search shard groups apart (serving)."""
    fusion = fusion or Fusion()
    (Dd, Id), (Dl, Il) = dense, lexical
    if fusion.method == "rrf":
        return rrf_fusion([Id, Il], k, fusion.rrf_k)
    return weighted_fusion([Dd, Dl], [Id, Il], [metric, "inner_product"], k, [fusion.weight, 1 - fusion.weight])


# --- recall and tuning --------------------------------------------------------------------------------------------

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


@dataclass(frozen=True)
class TuneRow:
    params: dict[str, int]
    recall: float  # recall@k against exact search
    qps: float  # batched queries per second, all shards searched one after the other

    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.params.items() if k != "k_factor_rf") or "exact"


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
