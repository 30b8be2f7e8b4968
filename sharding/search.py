"""Searching sharded indexes: exact top-k merge, rank fusion, and the opened index version (segments, docstore).

Shards hold disjoint vectors with global ids (chunk ids), so the top-k of the union is the top-k of the per-shard
top-k lists: merging is exact, and exact shards give the results of one exact index over the same vectors. For
inner product higher is better; for L2 lower is better. FAISS vocabulary: ``xq`` queries (nq, d), ``k``
results, ``D``/``I`` distances and ids (nq, k); a missing result has id -1.
"""

from __future__ import annotations

import weakref
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from configs.errors import RagtuneError
from sharding.docstore import Docstore
from sharding.faiss_index import index_layers, mmap_flags, read_index_file
from sharding.layout import MANIFEST
from sharding.lexical import LexicalShard, read_lexical_file, tokenizer
from sharding.manifest import IndexManifest, read_index_manifest, read_tombstones, resolve_index
from sharding.storage import Location
from sharding.tuning import apply_params
from sharding.versions import hold_lease

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


# --- an opened index version --------------------------------------------------------------------------------------

def check_queries(xq: np.ndarray, manifest: IndexManifest, where: str = "the index") -> np.ndarray:
    """Refuse queries that do not match the index: another dimension, or raw vectors for a cosine index."""
    xq = np.asarray(xq, dtype=np.float32)
    if xq.ndim == 1:
        xq = xq[None, :]
    model = manifest.model.name
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


def search_parameters(index: Any, sel: Any, k: int, keep: list[Any]) -> Any:
    """FAISS SearchParameters for one search of ``index`` that keep its own settings (nprobe, efSearch,
    k_factor, as ``apply_params`` set them) and add the selector ``sel`` (None: none); an HNSW search for more
    than efSearch results is widened to k. Objects the parameters point to are appended to ``keep`` (SWIG does
    not own them).

    FAISS 1.15.1 (checked by tests/sharding/test_freshness.py): IndexIDMap2 translates ``params.sel`` from chunk
    ids to its internal ids for Flat, HNSW and IVF inside it; IndexRefine ignores ``params.sel`` and passes its
    ``base_index_params`` on untranslated, so under IDMap2 + Refine the selector goes, translated by
    ``IDSelectorTranslated``, onto the base index's parameters (the refinement only re-ranks what the base returns).
    """
    import faiss as _faiss

    faiss: Any = _faiss  # its type stubs lack the SearchParameters keyword arguments

    def build(layers: list[Any], sel: Any, k: int) -> Any:
        top = layers[0]
        if isinstance(top, (faiss.IndexIDMap, faiss.IndexIDMap2)):
            if sel is not None and any(isinstance(x, faiss.IndexRefine) for x in layers[1:]):
                sel = faiss.IDSelectorTranslated(top.id_map, sel)
                keep.append(sel)
            return build(layers[1:], sel, k)  # IDMap translates params.sel itself otherwise
        if isinstance(top, faiss.IndexRefine):
            base = build(layers[1:], sel, int(k * top.k_factor))
            keep.append(base)
            return faiss.IndexRefineSearchParameters(k_factor=top.k_factor, base_index_params=base)
        if isinstance(top, faiss.IndexIVF):
            p = faiss.SearchParametersIVF(nprobe=top.nprobe, max_codes=top.max_codes)
            quantizer = faiss.downcast_index(top.quantizer)
            if isinstance(quantizer, faiss.IndexHNSW):
                qp = faiss.SearchParametersHNSW(efSearch=quantizer.hnsw.efSearch)
                keep.append(qp)
                p.quantizer_params = qp
        elif isinstance(top, faiss.IndexHNSW):
            p = faiss.SearchParametersHNSW(efSearch=max(top.hnsw.efSearch, k))
        else:
            p = faiss.SearchParameters()
        if sel is not None:
            p.sel = sel
        return p

    return build(index_layers(index), sel, k)


def search_shared_quantizer(ivfs: Sequence[Any], selectors: Sequence[Any], xq: np.ndarray,
                            k: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per-shard top-k (D, I) of IVF shards that share one trained coarse quantizer, the queries quantized once.

    Exactly what each shard's own ``search`` returns (ids and distances, bit for bit), at the cost of one coarse
    quantization instead of one per shard: ``IndexIVF::search`` (parallel_mode 0) cuts the queries into one slice
    per OpenMP thread, quantizes each slice and scans its lists with ``search_preassigned``; this does the same
    slices (one call where each query's coarse distances do not depend on the batch: an HNSW quantizer, or fewer
    queries than FAISS's BLAS threshold) with the first shard's quantizer (the same centroids in every shard),
    then scans each shard's lists with its own ``search_preassigned``, which keeps the shard's nprobe, max_codes
    and the segment's selector. FAISS's ``IndexShardsIVF`` quantizes once too, but it takes one selector for
    every shard and merges with its own tie order; here each segment keeps its tombstones and ``merge_topk`` its
    order.

    Args:
        ivfs: ``faiss.IndexIVF`` shards (downcast), same nlist, nprobe and quantizer.
        selectors: per shard a FAISS IDSelector (tombstones) or None.
        xq: queries (nq, d) float32, C-contiguous, nq >= 1.
        k: results per shard.
    """
    import faiss as _faiss

    faiss: Any = _faiss  # its type stubs lack the SearchParameters keyword arguments
    nq = len(xq)
    first = ivfs[0]
    nprobe = min(first.nlist, first.nprobe)
    quantizer = faiss.downcast_index(first.quantizer)  # its efSearch is the one set by quantizer_efSearch
    Dq = np.empty((nq, nprobe), np.float32)  # (nq, nprobe) distances to the probed centroids
    Iq = np.empty((nq, nprobe), np.int64)  # (nq, nprobe) list numbers
    nt = min(faiss.omp_get_max_threads(), nq)
    if isinstance(quantizer, faiss.IndexHNSW) or nq < faiss.cvar.distance_compute_blas_threshold:
        nt = 1  # each query's coarse distances computed alone whatever the batch: one call gives the same bits
    for s in range(nt):  # else IndexIVF::search's slices (a flat quantizer uses BLAS from 20 queries on)
        i0, i1 = nq * s // nt, nq * (s + 1) // nt
        if i1 > i0:
            Dq[i0:i1], Iq[i0:i1] = quantizer.search(xq[i0:i1], nprobe)
    out = []
    for ivf, sel in zip(ivfs, selectors, strict=True):
        if ivf.parallel_mode == 0:
            # search_preassigned runs its queries in parallel only in mode 3 (mode 0 leaves that to search(), which
            # these shards no longer go through); each query is scanned the same way in both modes
            ivf.parallel_mode = 3
        params = None if sel is None else faiss.SearchParametersIVF(sel=sel, nprobe=ivf.nprobe,
                                                                     max_codes=ivf.max_codes)
        D = np.empty((nq, k), np.float32)
        I = np.empty((nq, k), np.int64)
        sp = faiss.swig_ptr
        ivf.search_preassigned_c(nq, sp(xq), k, sp(Iq), sp(Dq), sp(D), sp(I), False, params)
        out.append((D, I))
    return out


@dataclass
class Segment:
    """One searchable piece of a shard: its base (``pos`` 0) or a delta (``pos`` 1, 2, ...), and the chunk ids
    masked in it (tombstones: deleted chunks, or old copies of updated ones)."""

    shard: int
    pos: int
    dead: np.ndarray  # (n_dead,) int64, sorted; every id is in this segment
    _selector: Any = None

    def selector(self) -> Any:
        """A FAISS selector that lets every id through but the masked ones (None when none are masked)."""
        import faiss

        if not len(self.dead):
            return None
        if self._selector is None:
            batch = faiss.IDSelectorBatch(self.dead)
            self._selector = (faiss.IDSelectorNot(batch), batch)  # IDSelectorNot does not own the batch
        return self._selector[0]

    def mask(self, ids: np.ndarray) -> None:
        """Mask ``ids`` too (ids this segment does not hold are let through anyway)."""
        self.dead, self._selector = np.union1d(self.dead, ids), None


def _without(D: np.ndarray, I: np.ndarray, dead: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """The top-k of results searched ``k + len(dead)`` deep, the ``dead`` ids left out: exactly what a search
    with a selector masking them returns, for indexes that take no selector (GPU copies)."""
    masked = np.isin(I, dead) | (I < 0)
    order = np.argsort(masked, axis=1, kind="stable")[:, :k]  # live results first, in rank order
    D, I, masked = (np.take_along_axis(x, order, axis=1) for x in (D, I, masked))
    return np.where(masked, -np.inf if metric == "inner_product" else np.inf, D), np.where(masked, -1, I)


def shard_segments(location: Location, manifest: IndexManifest, n: int, verify: bool = True) -> list[Segment]:
    """The segments of shard ``n`` (base, then deltas) with their tombstones read from disk."""
    rec = manifest.shards[n]
    if rec.tombstones is None:
        dead = [np.zeros(0, np.int64)] * (1 + len(rec.deltas))
    else:
        dead = read_tombstones(location.join(rec.tombstones.file), rec.tombstones, verify)
        if len(dead) != 1 + len(rec.deltas):
            raise RagtuneError(f"{location.uri}: shard {n} has {1 + len(rec.deltas)} segments but its tombstones "
                               f"name {len(dead)}. Fix: open an older version, or rebuild with `ragtune index`")
    return [Segment(n, pos, d) for pos, d in enumerate(dead)]


def open_docstore(location: Location, manifest: IndexManifest, verify: bool = True,
                  lease: str | None = None) -> Docstore:
    """The docstore of a whole index version: every segment's file, each with its tombstones, so a lookup
    returns each chunk's live row (a deleted chunk never; an updated one's new text, never its old).
    ``lease`` (an owner name) holds a reader lease on the version while the returned object lives."""
    if lease:
        held = hold_lease(location, lease)
        try:
            store = open_docstore(location, manifest, verify)
        except BaseException:
            held.release()
            raise
        weakref.finalize(store, held.release)
        return store
    locs, sizes, dead = [], [], []
    for n, rec in enumerate(manifest.shards):
        segs = shard_segments(location, manifest, n, verify) if rec.tombstones else None
        files = [(rec.docstore, rec.docstore_bytes)] + [(d.docstore, d.docstore_bytes) for d in rec.deltas]
        for pos, (name, size) in enumerate(files):
            locs.append(location.join(name))
            sizes.append(size)
            dead.append(segs[pos].dead if segs else None)
    return Docstore(locs, sizes, dead)


def resident_bytes(loc: Location, manifest: IndexManifest, only: Sequence[int], mmap: bool,
                   loaded: Collection[tuple[str, str]] = ()) -> int:
    """About how many bytes opening shards ``only`` of a version reads into memory: its segment files, except
    those ``loaded`` already ((path, sha256) keys of ``ShardedIndex.loaded_segments``, shared instead) and the parts
    that are memory-mapped (page cache, not the process's memory): IVF lists, and the vectors of Flat and HNSW
    (an HNSW graph is read even then). What a version swap costs beside the version being served."""
    mapped = mmap and loc.is_local
    ivf = "IVF" in manifest.factory
    flat_vectors = "PQ" not in manifest.factory and "SQ" not in manifest.factory
    total = 0
    for n in only:
        rec = manifest.shards[n]
        for name, sha, size, ntotal in [(rec.file, rec.sha256, rec.bytes, rec.ntotal)] + [
                (d.file, d.sha256, d.bytes, d.ntotal) for d in rec.deltas]:
            if (loc.join(name).path, sha) in loaded:
                continue
            if not mapped:
                total += size
            elif not ivf:
                total += max(0, size - ntotal * manifest.dim * 4) if flat_vectors else size
    return total


@dataclass
class ShardedIndex:
    """The shards of one index version, loaded, searched together with an exact merge.

    A shard written by ``ragtune index add|delete`` is several segments: its base file and delta files, each
    searched with a selector that masks its tombstoned ids (``shards`` holds one FAISS index per segment, in
    shard order; ``segments`` says which is which), so a deleted chunk, or the old copy of an updated one, is
    never returned by any mode.
    """

    location: Location
    manifest: IndexManifest
    shards: list[Any]  # one FAISS index per loaded segment (a shard's base, then its deltas)
    params: dict[str, int] = field(default_factory=dict)
    _ef: int | None = None  # efSearch of plain HNSW shards: raised to k for a search of k > efSearch
    numbers: list[int] | None = None  # the shard numbers loaded (None: all)
    verify: bool = True
    mmap: bool = True  # lexical shards too: mapped when local (read into memory from object stores)
    _lexical: list[LexicalShard] | None = None  # loaded on the first lexical search
    _tokenize: Any = None  # the tokenizer the lexical shards were built with
    segments: list[Segment] = field(default_factory=list)  # parallel to ``shards``; empty: no tombstones
    lease: Any = None  # a sharding.versions.Lease while this object lives (ShardedIndex.open(lease=...))
    files: list[tuple[str, str]] = field(default_factory=list)  # parallel to ``shards``: (path, sha256) of each

    def loaded_segments(self) -> dict[tuple[str, str], tuple[Any, dict[str, int]]]:
        """(path, sha256) -> (FAISS index, search parameters) of every segment loaded here: what a later version
        sharing these files (``ragtune index add|delete`` keep the base files) can reuse instead of loading."""
        return {f: (index, self.params) for f, index in zip(self.files, self.shards, strict=False)}

    @classmethod
    def open(cls, path: str, *, mmap: bool = True, verify: bool = True, params: dict[str, int] | None = None,
             merge: bool = False, only: Sequence[int] | None = None, lease: str | None = None,
             reuse: Mapping[tuple[str, str], tuple[Any, dict[str, int]]] | None = None) -> ShardedIndex:
        """Open the version an index path means (``LATEST`` of a root, or a version folder).

        The version folder is resolved once: a later build that switches ``LATEST`` does not affect this object.
        ``verify`` checks every shard's sha256 before loading it; ``mmap`` maps local shards instead of reading.
        ``merge`` merges the shards into one in-memory index when they can be (plain IVF shards of one trained
        index, Flat shards; tombstoned vectors are removed first): the same results as searching them apart, at
        the speed of one index; the shards are then read, not mapped. ``only`` loads just those shard numbers (a
        serving shard group): ``shards``, ``ntotal`` and searches then cover those alone. ``lease`` (an owner
        name, e.g. "ShardSearcher") writes a reader lease for the version, renewed while this object lives, so
        that ``ragtune index gc`` never deletes it (``sharding.versions``). ``reuse`` (``loaded_segments()`` of
        versions already open) shares the segments whose file and search parameters are the same instead of
        loading them again: a version written by ``ragtune index add`` then costs only its new deltas.
        """
        loc = resolve_index(path)
        if not lease:
            return cls._open(loc, mmap, verify, params, merge, only, None, reuse)
        held = hold_lease(loc, lease)  # before reading, so that a gc starting meanwhile sees it
        try:
            index = cls._open(loc, mmap, verify, params, merge, only, held, reuse)
        except BaseException:
            held.release()
            raise
        weakref.finalize(index, held.release)  # released when the reader drops this version
        return index

    @classmethod
    def _open(cls, loc: Location, mmap: bool, verify: bool, params: dict[str, int] | None, merge: bool,
              only: Sequence[int] | None, held: Any,
              reuse: Mapping[tuple[str, str], tuple[Any, dict[str, int]]] | None = None) -> ShardedIndex:
        manifest = read_index_manifest(loc)
        wanted = {**manifest.search_params, **(params or {})}
        shared = {} if merge or not reuse else {f: ix for f, (ix, p) in reuse.items() if p == wanted}
        flags = mmap_flags(manifest.factory) if mmap and not merge else 0
        numbers = list(range(len(manifest.shards))) if only is None else list(only)
        bad = [n for n in numbers if not 0 <= n < len(manifest.shards)]
        if bad or not numbers:
            raise RagtuneError(f"{loc.uri}: shards {bad or numbers} requested but the index has "
                               f"{len(manifest.shards)} (0..{len(manifest.shards) - 1}). Fix: ask for shards it has")
        shards, segments, paths = [], [], []
        for n in numbers:
            rec = manifest.shards[n]
            segs = shard_segments(loc, manifest, n, verify)
            files = [(rec.file, rec.sha256, rec.ntotal)] + [(d.file, d.sha256, d.ntotal) for d in rec.deltas]
            for (name, sha, ntotal), seg in zip(files, segs, strict=True):
                key = (loc.join(name).path, sha)
                index = shared.get(key)
                if index is None:
                    index = read_index_file(loc.join(name), sha if verify else None, flags)
                paths.append(key)
                if index.ntotal != ntotal or index.d != manifest.dim:
                    raise RagtuneError(f"{loc.join(name).uri}: holds {index.ntotal} vectors of d = {index.d} but "
                                       f"{MANIFEST} says {ntotal} of d = {manifest.dim}. Fix: rebuild the index")
                shards.append(index)
                segments.append(seg)
        if merge and len(shards) > 1 and _mergeable(shards[0], manifest):
            import faiss

            for index, seg in zip(shards, segments, strict=True):
                if len(seg.dead):  # read, not mapped: the masked vectors can go
                    index.remove_ids(faiss.IDSelectorBatch(seg.dead))
            for index in shards[1:]:  # moves the codes and ids over: memory stays that of one index
                shards[0].merge_from(index, 0)
            shards = shards[:1]
            segments = [Segment(-1, 0, np.zeros(0, np.int64))]
        index = cls(loc, manifest, shards, numbers=numbers, verify=verify, mmap=mmap, segments=segments, lease=held,
                    files=paths if len(paths) == len(shards) else [])
        index.set_params(wanted)
        return index

    def set_params(self, params: dict[str, int]) -> None:
        import faiss

        for shard in self.shards:
            apply_params(shard, params)
        self.params = dict(params)
        layers = [index_layers(s) for s in self.shards]
        plain_hnsw = all(isinstance(x[-1], faiss.IndexHNSW) and len(x) <= 2 for x in layers)
        self._ef = self.params.get("efSearch", 16) if plain_hnsw else None

    def _segments(self) -> list[Segment]:
        if len(self.segments) != len(self.shards):  # built by hand (tests): nothing masked
            self.segments = [Segment(n, 0, np.zeros(0, np.int64)) for n in range(len(self.shards))]
        return self.segments

    @property
    def ntotal(self) -> int:
        """Vectors a search can return (masked ones excluded)."""
        return sum(s.ntotal for s in self.shards) - sum(len(g.dead) for g in self._segments())

    def _shared_ivf(self) -> list[Any] | None:
        """The segments as plain IVF indexes, when two or more of them on the CPU were made from one trained index
        (the manifest records it: same coarse quantizer) and probe the same number of lists; else None."""
        import faiss

        if len(self.shards) < 2 or self.manifest.trained is None:
            return None
        ivfs: list[Any] = [faiss.downcast_index(s) for s in self.shards]  # GPU copies, IDMap2/Refine: not IVF
        if not all(isinstance(x, faiss.IndexIVF) for x in ivfs):
            return None
        first = ivfs[0]
        if any((x.nlist, x.nprobe, x.d, x.metric_type) != (first.nlist, first.nprobe, first.d, first.metric_type)
               for x in ivfs):
            return None
        return ivfs

    def search(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (D, I) of the whole index; I holds chunk ids. Queries are checked against the manifest.

        Plain IVF segments of one trained index (IVF-Flat, IVF-PQ, IVF-SQ) are searched with one coarse
        quantization per query for all of them (:func:`search_shared_quantizer`); other kinds each search alone.
        """
        xq = check_queries(xq, self.manifest, self.location.uri)
        ivfs = self._shared_ivf() if len(xq) else None
        if ivfs is not None:
            results = search_shared_quantizer(ivfs, [seg.selector() for seg in self._segments()], xq, k)
        else:
            results = self.search_each(xq, k)
        if len(results) == 1:
            return results[0]
        return merge_topk([r[0] for r in results], [r[1] for r in results], k, self.manifest.metric)

    def search_each(self, xq: np.ndarray, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per-segment top-k (D, I), each segment searched alone (its own coarse quantization for IVF), with its
        tombstones masked; ``xq`` already checked."""
        widen = self._ef is not None and k > self._ef  # HNSW returns at most efSearch results: widen it
        results = []
        for index, seg in zip(self.shards, self._segments(), strict=True):
            sel = seg.selector()
            if sel is None and not widen:
                results.append(index.search(xq, k))
                continue
            if sel is not None and type(index).__name__.startswith("Gpu"):  # GPU copies (serving): no selectors
                Dg, Ig = index.search(xq, k + len(seg.dead))
                results.append(_without(Dg, Ig, seg.dead, k, self.manifest.metric))
                continue
            keep: list[Any] = []
            results.append(index.search(xq, k, params=search_parameters(index, sel, k, keep)))
        return results

    def lexical_shards(self) -> list[LexicalShard]:
        """The BM25 shards (one per segment) of the same shard numbers, loaded (and checked) on first use, each
        with its segment's tombstones masked."""
        lex = self.manifest.lexical
        if lex is None:
            raise RagtuneError(f"{self.location.uri}: this index version has no lexical (BM25) part (it was built "
                               "with index.lexical.enabled false, or by a writer that builds none). Fix: rebuild it "
                               "with `ragtune index` (index.lexical.enabled: true, the default), or search with "
                               "--mode dense")
        if self._lexical is None:
            numbers = self.numbers if self.numbers is not None else range(len(lex.shards))
            out = []
            for n in numbers:
                rec = self.manifest.shards[n]
                records = [lex.shards[n]] + [d.lexical for d in rec.deltas]
                segs = shard_segments(self.location, self.manifest, n, self.verify)
                for r, seg in zip(records, segs, strict=True):
                    if r is None:
                        raise RagtuneError(f"{self.location.uri}: a delta of shard {n} has no lexical part. Fix: "
                                           "run `ragtune index compact --force`, or search with --mode dense")
                    shard = read_lexical_file(self.location.join(r.file), r.sha256 if self.verify else None,
                                              mmap=self.mmap)
                    out.append(shard.masked(seg.dead) if len(seg.dead) else shard)
            self._lexical = out
            self._tokenize = tokenizer(lex.params)
        return self._lexical

    def search_lexical(self, texts: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (D, I) by BM25 over every loaded lexical shard (higher is better), merged exactly."""
        shards = self.lexical_shards()
        tokens = self._tokenize(list(texts))
        results = [s.search(tokens, k) for s in shards]
        return merge_topk([r[0] for r in results], [r[1] for r in results], k, "inner_product")

    def docstore(self) -> Docstore:
        """Live rows of every shard of the version (all shards, whatever ``only`` loaded)."""
        return open_docstore(self.location, self.manifest, self.verify)


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
