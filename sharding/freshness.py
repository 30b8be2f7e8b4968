"""Index freshness without Ray: new chunks into delta segments, deletes as tombstones, compaction, and the
recall of a version (re-measured and re-tuned at compaction, ``sharding.tuning``'s maths on its segments).

What a version written by ``ragtune index add|delete|compact`` holds, per shard (docs/index.md, "Freshness"):

- the **base** segment (``shard-00000.faiss``, its docstore and BM25 files), as built or last compacted;
- **deltas** (``shard-00000.d000.faiss`` ...): the chunks of a later add, each in an index made from the same
  trained empty index as the base (IVF: the same coarse quantizer, so ``merge_from`` folds it into the base
  exactly), with its own docstore and BM25 files;
- **tombstones** (``tombstones/shard-00000.npz``): per segment, the chunk ids masked in it. Chunk ids are a hash
  of (doc id, chunk index, chunker), so the new chunks of an updated document have the ids of its old ones:
  the old copy is masked in the segment that holds it, the new copy sits unmasked in the new delta.

Rules: an add of ``n`` chunks writes ``ceil(n / segment_size)`` delta segments (:func:`plan_segments`; one for
any add up to a shard's size), each attached to one of the shards that hold the fewest live vectors, so an add
touches the files of those shards alone and each query searches that many more segments until compaction. The
shard count never changes, so serving's shard groups stay valid and search whichever deltas their shards hold.
A chunk id is live in at most one segment of one shard (any segment of any shard: searches merge exactly, so
where a chunk lives changes no result). FAISS vocabulary as in ``sharding.faiss_index``: ``xb`` vectors,
``ids`` chunk ids, ``d`` dimension.

Memory: the operations read a version a docstore batch, a segment or a shard at a time (:func:`scan_live`),
never the whole corpus at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from configs.errors import RagtuneError
from sharding.docstore import Docstore, write_docstore
from sharding.faiss_index import (
    deserialize,
    index_layers,
    mmap_flags,
    read_index_file,
    serialize,
    write_index_file,
)
from sharding.layout import TRAINED, delta_docstore_name, delta_name, tombstone_name
from sharding.lexical import (
    STATS_NAME,
    CorpusStats,
    DocTerms,
    LexicalManifest,
    LexicalRecord,
    LexicalStatsRecord,
    chunk_texts,
    lexical_delta_name,
    tokenizer,
    write_lexical_file,
)
from sharding.manifest import (
    DeltaRecord,
    IndexManifest,
    ShardRecord,
    TombstoneRecord,
    TrainedRecord,
    write_tombstones,
)
from sharding.search import Segment, ShardedIndex, shard_segments
from sharding.storage import Location, atomic_write_bytes, read_bytes, sha256_hex
from sharding.tuning import (
    RECALL_K,
    GroundTruth,
    TuneRow,
    candidate_params,
    drop_self,
    held_out_count,
    measured_recall,
    sample_query_texts,
    tune,
    tune_settings,
)

log = logging.getLogger("ragtune.index")

COMPACT_THRESHOLD = 0.10  # compact a shard whose delta + masked vectors exceed this share of its base
COMPACT_MAX_DELTAS = 16  # ... or that has more deltas than this (each is one more search per query)
DOC_COLUMNS = ["chunk_id", "doc_id", "chunk_index", "title", "text", "metadata", "n_tokens"]


SEGMENT_MIN = 100_000  # a delta segment holds up to max(this, a base shard's mean size) chunks
SCAN_ROWS = 16_384  # docstore rows read per batch by scan_live


def delta_segment_size(m: IndexManifest) -> int:
    """The most chunks one delta segment of an add holds: a base shard's mean size (so a delta costs a search
    no dearer than a shard's and compacts in a shard's memory), at least ``SEGMENT_MIN``."""
    return max(SEGMENT_MIN, -(-sum(r.ntotal for r in m.shards) // max(len(m.shards), 1)))


def plan_segments(n: int, shards: Sequence[ShardRecord], size: int) -> list[tuple[int, np.ndarray]]:
    """Where the ``n`` new chunks of an add go: ``ceil(n / size)`` delta segments (none for ``n`` = 0) of nearly
    equal size, as (shard, positions of its chunks among the ``n``), contiguous runs in order.

    Segment ``j`` goes to the ``j``-th shard by fewest live vectors (ties: the lower number), round robin when
    there are more segments than shards: adds keep the shards even, and a small add touches one shard."""
    if n <= 0:
        return []
    if size < 1:
        raise RagtuneError(f"segment_size {size}: must be at least 1 chunk per delta segment. Fix: e.g. 100000")
    count = -(-n // size)
    order = sorted(range(len(shards)), key=lambda s: (shards[s].live, s))
    return [(order[j % len(order)], run) for j, run in enumerate(np.array_split(np.arange(n), count))]


# --- what a version holds ---------------------------------------------------------------------------------------

def segment_files(rec: ShardRecord) -> list[tuple[str, str, int]]:
    """(FAISS file, docstore file, docstore bytes) of each segment of a shard: base first, then deltas."""
    return [(rec.file, rec.docstore, rec.docstore_bytes)] + [(d.file, d.docstore, d.docstore_bytes)
                                                             for d in rec.deltas]


def scan_live(vloc: Location, m: IndexManifest, columns: Sequence[str], shards: Sequence[int] | None = None,
              verify: bool = True, batch_rows: int | None = None) -> Iterator[tuple[int, int, pa.Table]]:
    """The live rows of a version, a docstore batch at a time: (shard, segment position, rows with ``columns``),
    shards in order (or ``shards``), segments base first, rows in file order, masked rows left out. A column a
    docstore lacks (e.g. no titles) reads as nulls. At least one (possibly empty) table per segment; each holds
    at most ``batch_rows`` (default ``SCAN_ROWS``) rows."""
    if "chunk_id" not in columns:
        raise ValueError("scan_live needs chunk_id among the columns (tombstones mask by it)")
    for n in range(len(m.shards)) if shards is None else shards:
        segs = shard_segments(vloc, m, n, verify)
        for pos, (_, doc, _) in enumerate(segment_files(m.shards[n])):
            pf = pq.ParquetFile(vloc.join(doc).path, filesystem=vloc.fs)
            have = set(pf.schema_arrow.names)
            dead = pa.array(segs[pos].dead, pa.int64()) if len(segs[pos].dead) else None
            read = [c for c in columns if c in have]
            batches = pf.iter_batches(batch_size=batch_rows or SCAN_ROWS, columns=read)
            first = True
            for batch in batches:
                first = False
                yield n, pos, _shaped(pa.Table.from_batches([batch]), columns, dead)
            if first:  # no rows at all: one empty table, so that callers see the columns' types
                yield n, pos, _shaped(pf.schema_arrow.empty_table().select(read), columns, dead)


def _shaped(t: pa.Table, columns: Sequence[str], dead: pa.Array | None) -> pa.Table:
    for c in columns:
        if c not in t.column_names:
            t = t.append_column(c, pa.nulls(t.num_rows, pa.string()))
    t = t.select(list(columns))
    return t if dead is None else t.filter(pc.invert(pc.is_in(t["chunk_id"], value_set=dead)))


def select_live(vloc: Location, m: IndexManifest, columns: Sequence[str] = ("chunk_id", "doc_id"),
                keep: Callable[[pa.Table], pa.Array] | None = None, verify: bool = True) -> pa.Table:
    """The live rows of the version (``columns``) that ``keep`` (a batch -> boolean mask; None: every row)
    selects, with the ``shard`` and ``seg`` (segment position) that hold them. Streams the docstore batch by
    batch (:func:`scan_live`): memory is a batch plus the rows kept."""
    tables = []
    for n, pos, t in scan_live(vloc, m, columns, verify=verify):
        if keep is not None:
            t = t.filter(keep(t))
        tables.append(t.append_column("shard", pa.array(np.full(t.num_rows, n, np.int32)))
                      .append_column("seg", pa.array(np.full(t.num_rows, pos, np.int32))))
    return pa.concat_tables(tables, promote_options="default")


def live_ids(vloc: Location, m: IndexManifest, columns: Sequence[str] = ("chunk_id", "doc_id"),
             verify: bool = True) -> pa.Table:
    """Every live row of the version (``columns`` of the docstore), with the ``shard`` and ``seg`` (segment
    position) that hold it. Holds them all: ask for the short columns (ids), or stream with :func:`scan_live`."""
    return select_live(vloc, m, columns, None, verify)


def rows_of(vloc: Location, m: IndexManifest, where: pa.Table, columns: Sequence[str] = DOC_COLUMNS) -> pa.Table:
    """The docstore rows (``columns``) of the ids in ``where`` (chunk_id, shard, seg: from :func:`live_ids`),
    read a few row groups at a time, with shard and seg kept."""
    out = []
    for (n, pos), group in by_segment(where):
        _, doc, size = segment_files(m.shards[n])[pos]
        rows = Docstore([vloc.join(doc)], [size]).lookup(group, columns)
        if rows:
            t = pa.Table.from_pylist([rows[c] for c in group if c in rows])
            out.append(t.append_column("shard", pa.array(np.full(t.num_rows, n, np.int32)))
                       .append_column("seg", pa.array(np.full(t.num_rows, pos, np.int32))))
    if not out:
        empty = {c: pa.array([], pa.int64() if c == "chunk_id" else pa.string()) for c in columns}
        return pa.table({**empty, "shard": pa.array([], pa.int32()), "seg": pa.array([], pa.int32())})
    return pa.concat_tables(out, promote_options="default")


def by_segment(t: pa.Table) -> list[tuple[tuple[int, int], np.ndarray]]:
    """Chunk ids of a (chunk_id, shard, seg) table grouped by (shard, seg)."""
    if t.num_rows == 0:
        return []
    ids, shard, seg = (t[c].to_numpy() for c in ("chunk_id", "shard", "seg"))
    keys = sorted(set(zip(shard.tolist(), seg.tolist(), strict=True)))
    return [((a, b), ids[(shard == a) & (seg == b)]) for a, b in keys]


# --- planning an add ----------------------------------------------------------------------------------------------

@dataclass
class AddPlan:
    """What an add does: chunks to add, old copies to mask, and the documents counted by what happens to them."""

    add: pa.Table  # new chunk rows (DOC_COLUMNS, plus whatever the input had, e.g. vector)
    dead: pa.Table  # chunk_id, shard, seg of the live rows to mask (old chunks of updated documents)
    removed: pa.Table  # those rows (title, text): their statistics leave the BM25 corpus
    docs_added: int = 0
    docs_updated: int = 0
    docs_skipped: int = 0  # present with the same chunks: nothing to do
    doc_ids: dict[str, list[str]] = field(default_factory=dict)  # added / updated, a few of each for messages


_SAME = ("chunk_index", "title", "text", "metadata")


def plan_add(new: pa.Table, old: pa.Table) -> AddPlan:
    """Compare the new chunks with the live rows of the same documents.

    A document whose doc id is not in the index is added; one whose chunks (index, title, text, metadata) are
    all the same is skipped; any other is an update: all its old chunks are masked and all its new ones added.

    Args:
        new: the new corpus' chunks (DOC_COLUMNS at least), one row per chunk.
        old: the live rows of the index for those doc ids (DOC_COLUMNS + shard, seg), from :func:`rows_of`.
    """
    def by_doc(t: pa.Table) -> dict[str, list[tuple[Any, ...]]]:
        out: dict[str, list[tuple[Any, ...]]] = {}
        for row in t.select([c for c in ("doc_id", *_SAME) if c in t.column_names]).to_pylist():
            out.setdefault(row["doc_id"], []).append(tuple(row.get(c) for c in _SAME))
        return out

    old_by_doc, new_by_doc = by_doc(old), by_doc(new)
    added, updated, skipped = [], [], []
    for doc, chunks in new_by_doc.items():
        if doc not in old_by_doc:
            added.append(doc)
        elif sorted(chunks, key=lambda c: c[0] or 0) == sorted(old_by_doc[doc], key=lambda c: c[0] or 0):
            skipped.append(doc)
        else:
            updated.append(doc)
    take = pa.array(added + updated, pa.string())
    mask_old = pa.array(updated, pa.string())
    dead_rows = old.filter(pc.is_in(old["doc_id"], value_set=mask_old))
    return AddPlan(add=new.filter(pc.is_in(new["doc_id"], value_set=take)),
                   dead=dead_rows.select(["chunk_id", "shard", "seg"]), removed=dead_rows,
                   docs_added=len(added), docs_updated=len(updated), docs_skipped=len(skipped),
                   doc_ids={"added": added[:5], "updated": updated[:5]})


# --- the trained empty index ----------------------------------------------------------------------------------

def trained_index(vloc: Location, m: IndexManifest) -> tuple[bytes, bool]:
    """The trained empty index every delta starts from (serialized), and whether it had to be derived.

    ``ragtune index`` keeps it as ``trained.faiss``; a version that names no such file (written with the sharding
    functions alone) gets it derived from base shard 0 (read, then ``reset()``: the vectors go, the trained
    quantizer and codebooks stay), and the version written from it keeps the file."""
    if m.trained and m.trained.file:
        loc = vloc.join(m.trained.file)
        data = read_bytes(loc)
        if m.trained.file_sha256 and sha256_hex(data) != m.trained.file_sha256:
            raise RagtuneError(f"{loc.uri}: checksum mismatch (the trained index was changed). Fix: rebuild the "
                               "index with `ragtune index`")
        return data, False
    rec = m.shards[0]
    index = read_index_file(vloc.join(rec.file), rec.sha256)
    index.reset()
    return serialize(index), True


def with_trained_file(m: IndexManifest, vdir: Location, data: bytes) -> None:
    """Write the trained empty index into the new version ``vdir`` and record it in ``m`` (when derived)."""
    atomic_write_bytes(vdir.join(TRAINED), data)
    m.trained = (m.trained or TrainedRecord()).model_copy(update={"file": TRAINED, "file_sha256": sha256_hex(data)})


# --- writing segments ---------------------------------------------------------------------------------------------

def new_segment(trained: bytes, ids: np.ndarray, xb: np.ndarray) -> Any:
    """An index made from the trained empty index, holding (ids, xb)."""
    index = deserialize(trained)
    if len(ids):
        index.add_with_ids(np.ascontiguousarray(xb, dtype=np.float32), np.ascontiguousarray(ids, dtype=np.int64))
    return index


def write_delta(vdir: Location, version: str, shard: int, pos: int, index: Any, rows: pa.Table,
                lexical: tuple[Any, CorpusStats] | None) -> DeltaRecord:
    """Write delta ``pos`` of ``shard`` (its FAISS index, docstore rows and, with ``lexical`` = (params,
    statistics), its BM25 rows) into the version folder; returns its record."""
    sha, size = write_index_file(index, vdir.join(delta_name(shard, pos)))
    dsha, dsize = write_docstore(rows, vdir.join(delta_docstore_name(shard, pos)))
    lex = None
    if lexical is not None:
        params, stats = lexical
        lex = write_lexical(vdir, lexical_delta_name(shard, pos), rows, params, stats)
    return DeltaRecord(file=delta_name(shard, pos), ntotal=int(index.ntotal), sha256=sha, bytes=size,
                       docstore=delta_docstore_name(shard, pos), docstore_sha256=dsha, docstore_bytes=dsize,
                       lexical=lex, version=version)


TOKENIZE_BATCH = 8192  # rows tokenized at once when BM25 rows are written (a delta, or a compacted shard)


def write_lexical(vdir: Location, name: str, rows: pa.Table, params: Any, stats: CorpusStats) -> LexicalRecord:
    """BM25 rows for ``rows`` (chunk_id, title, text) scored with ``stats``, written as ``name``."""
    ids = rows["chunk_id"].to_numpy().astype(np.int64)
    tokenize, terms = tokenizer(params), DocTerms()
    for b in rows.select(["title", "text"]).to_batches(TOKENIZE_BATCH):  # token lists of one batch at a time
        terms.add(tokenize(chunk_texts(b.column("title").to_pylist(), b.column("text").to_pylist())))
    shard = terms.finish(ids, stats, params)
    sha, size = write_lexical_file(shard, params, vdir.join(name))
    return LexicalRecord(file=name, ntotal=shard.ntotal, terms=len(shard.model.vocab_dict) - 1, sha256=sha,
                         bytes=size)


def masked_ids(vloc: Location, m: IndexManifest, n: int,
               more: Mapping[tuple[int, int], np.ndarray]) -> tuple[list[np.ndarray], bool]:
    """The masked ids of each segment of shard ``n`` of version (``vloc``, ``m``), with ``more`` ((shard,
    segment) -> chunk ids, from :func:`by_segment`) added; and whether ``more`` had any for this shard."""
    dead = [g.dead for g in shard_segments(vloc, m, n)]
    added = False
    for pos in range(len(dead)):
        if (n, pos) in more:
            dead[pos] = np.union1d(dead[pos], more[(n, pos)])
            added = True
    return dead, added


def set_tombstones(vdir: Location, rec: ShardRecord, shard: int, dead: list[np.ndarray]) -> None:
    """Write a shard's masked ids per segment (one array per segment) into the version; update its record."""
    if not any(len(d) for d in dead):
        rec.tombstones = None
        return
    sha, size = write_tombstones(vdir.join(tombstone_name(shard)), dead)
    rec.tombstones = TombstoneRecord(file=tombstone_name(shard), sha256=sha, bytes=size,
                                     dead=[int(len(np.unique(d))) for d in dead])


# --- lexical statistics ---------------------------------------------------------------------------------------

def read_stats(vloc: Location, m: IndexManifest, verify: bool = True) -> CorpusStats:
    """The BM25 statistics of the version's live chunks: its stats file, or, for a lexical part that names none
    (written with the sharding functions alone), counted from the docstore texts; the version an add or delete
    writes from it keeps a stats file."""
    assert m.lexical is not None
    rec = m.lexical.stats
    if rec is not None:
        data = read_bytes(vloc.join(rec.file))
        if verify and sha256_hex(data) != rec.sha256:
            raise RagtuneError(f"{vloc.join(rec.file).uri}: checksum mismatch (BM25 statistics changed). Fix: run "
                               "`ragtune index compact --force`, which counts them again")
        return CorpusStats.from_bytes(data)
    log.info("%s has no BM25 statistics file: counting them from the docstore (once)", vloc.shown)
    return stats_of_all((t for _, _, t in scan_live(vloc, m, ("chunk_id", "title", "text"), verify=verify)),
                        m.lexical.params)


def stats_of(rows: pa.Table, params: Any) -> CorpusStats:
    """BM25 statistics of some chunk rows (title, text)."""
    return stats_of_all([rows], params)


def stats_of_all(tables: Iterable[pa.Table], params: Any) -> CorpusStats:
    """BM25 statistics of the chunk rows (title, text) of ``tables``, tokenized one table at a time as they come
    (a generator of docstore batches streams): one count, no merge of per-table vocabularies."""
    tokenize = tokenizer(params)

    def docs() -> Iterator[list[str]]:
        for t in tables:
            if t.num_rows:
                yield from tokenize(chunk_texts(t["title"].to_pylist(), t["text"].to_pylist()))

    return CorpusStats.of(docs())


def with_stats(vdir: Location, lexical: LexicalManifest, stats: CorpusStats) -> LexicalManifest:
    """The lexical part of a new version whose live chunks have the BM25 statistics ``stats`` (what later adds
    score their deltas with): writes the stats file into ``vdir`` and returns ``lexical`` with its record and the
    counts. Every writer of a lexical part goes through here: the index job, add, delete, compact."""
    data = stats.to_bytes()
    atomic_write_bytes(vdir.join(STATS_NAME), data)
    record = LexicalStatsRecord(file=STATS_NAME, sha256=sha256_hex(data), bytes=len(data))
    return lexical.model_copy(update={"stats": record, "n_docs": stats.n_docs, "avg_len": stats.avg_len,
                                      "terms": len(stats.df)})


# --- compaction -------------------------------------------------------------------------------------------------

def compaction_reason(rec: ShardRecord, threshold: float, max_deltas: int) -> str | None:
    """Why a shard should be compacted (None: it need not): its delta vectors and masked vectors together
    exceed ``threshold`` of its base, or it has more than ``max_deltas`` deltas (each costs one more search)."""
    extra = sum(d.ntotal for d in rec.deltas) + rec.dead
    if extra and extra > threshold * max(rec.ntotal, 1):
        return (f"{sum(d.ntotal for d in rec.deltas):,} delta + {rec.dead:,} masked vectors > {threshold:.0%} of "
                f"{rec.ntotal:,}")
    if len(rec.deltas) > max_deltas:
        return f"{len(rec.deltas)} deltas > {max_deltas}"
    return None


def mergeable(index: Any) -> bool:
    """Kinds whose segments fold into one by ``remove_ids`` + ``merge_from`` (no vectors, no retraining): plain
    IVF (its codes move over; every segment shares the trained quantizer) and Flat behind IDMap2. HNSW graphs and
    IndexRefine support neither in FAISS 1.15.1."""
    import faiss

    layers = index_layers(index)
    if isinstance(layers[0], faiss.IndexIVF):
        return True
    return len(layers) == 2 and isinstance(layers[0], faiss.IndexIDMap2) and isinstance(layers[1], faiss.IndexFlat)


def exact_storage(index: Any) -> bool:
    """The index keeps the vectors themselves (Flat, HNSW over Flat storage, IVF-Flat), not codes."""
    import faiss

    layers = index_layers(index)
    last = layers[-1]
    if isinstance(last, faiss.IndexHNSW):
        return isinstance(faiss.downcast_index(last.storage), faiss.IndexFlat)
    return isinstance(last, (faiss.IndexFlat, faiss.IndexIVFFlat)) and not any(
        isinstance(x, faiss.IndexRefine) for x in layers)


def segment_vectors(index: Any) -> tuple[np.ndarray, np.ndarray]:
    """(ids, xb) of every vector in a segment, by FAISS's own reconstruction: exact for the kinds of
    :func:`exact_storage`, decoded codes (approximations) otherwise."""
    import faiss

    layers = index_layers(index)
    top = layers[0]
    if isinstance(top, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        ids = faiss.vector_to_array(top.id_map).astype(np.int64)
        inner = faiss.downcast_index(top.index)
        xb = inner.reconstruct_n(0, inner.ntotal) if inner.ntotal else np.zeros((0, index.d), np.float32)
        return ids, xb
    ivf = faiss.extract_index_ivf(index)
    from faiss.contrib.inspect_tools import get_invlist

    ids = np.concatenate([get_invlist(ivf.invlists, n)[0] for n in range(ivf.nlist)] or
                         [np.zeros(0, np.int64)]).astype(np.int64)
    if not len(ids):
        return ids, np.zeros((0, index.d), np.float32)
    direct_map: Any = faiss.DirectMap  # type: ignore[attr-defined]  # not in faiss's stubs
    ivf.set_direct_map_type(direct_map.Hashtable)  # id -> (list, offset), for reconstruct_batch
    xb = ivf.reconstruct_batch(ids)
    ivf.set_direct_map_type(direct_map.NoMap)  # as it was: remove_ids and writing expect no map
    return ids, xb


def fold_segments(indexes: list[Any], dead: list[np.ndarray], trained: bytes,
                  hold: np.ndarray | None = None) -> tuple[Any, tuple[np.ndarray, np.ndarray] | None]:
    """One index holding the live vectors of a shard's segments (base first), as a compaction writes it.

    Mergeable kinds (:func:`mergeable`): the masked vectors are removed (``remove_ids``) and the deltas merged
    into the base (``merge_from``). Other kinds (HNSW, Refine): the live vectors are reconstructed from every
    segment and added to a fresh index made from the trained empty index (HNSW cannot remove; over Flat
    storage the vectors are exact, over SQ/PQ codes they are decoded approximations).

    ``hold``: chunk ids kept out of the result (held-out tuning queries, added after the tuning searches as
    the index job does); returned as (ids, xb) beside the index, None when ``hold`` is None.
    """
    import faiss

    hold_ids = np.zeros(0, np.int64) if hold is None else np.asarray(hold, dtype=np.int64)
    if mergeable(indexes[0]):
        base = indexes[0]
        for index, d in zip(indexes, dead, strict=True):
            if len(d):
                index.remove_ids(faiss.IDSelectorBatch(d))
        for index in indexes[1:]:
            base.merge_from(index, 0)
        held = None
        if hold is not None:
            ids, xb = segment_vectors(base)
            keep = np.isin(ids, hold_ids)
            held = (ids[keep], xb[keep])
            if len(hold_ids):
                base.remove_ids(faiss.IDSelectorBatch(hold_ids))
        return base, held
    parts = []
    for index, d in zip(indexes, dead, strict=True):
        ids, xb = segment_vectors(index)
        live = ~np.isin(ids, d)
        parts.append((ids[live], xb[live]))
    ids = np.concatenate([p[0] for p in parts])
    xb = np.concatenate([p[1] for p in parts]) if parts else np.zeros((0, indexes[0].d), np.float32)
    out_mask = np.isin(ids, hold_ids)
    index = new_segment(trained, ids[~out_mask], xb[~out_mask])
    return index, ((ids[out_mask], xb[out_mask]) if hold is not None else None)


def live_vectors(vloc: Location, m: IndexManifest, n: int, verify: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(ids, xb) of the live vectors of shard ``n`` (every segment, masked ones left out), reconstructed."""
    rec = m.shards[n]
    segs = shard_segments(vloc, m, n, verify)
    out_ids, out_xb = [], []
    for (name, _, _), seg, sha in zip(segment_files(rec), segs, [rec.sha256] + [d.sha256 for d in rec.deltas],
                                      strict=True):
        ids, xb = segment_vectors(read_index_file(vloc.join(name), sha if verify else None))
        live = ~np.isin(ids, seg.dead)
        out_ids.append(ids[live])
        out_xb.append(xb[live])
    return np.concatenate(out_ids), np.concatenate(out_xb)


# --- recall of a version -------------------------------------------------------------------------------------

def recall_measurable(index: Any) -> bool:
    """Whether recall can be measured (and tuned) for indexes of this kind: it has search settings to tune, and
    it keeps the exact vectors that exact search over the live chunks needs (``exact_storage``)."""
    return candidate_params(index) != [{}] and exact_storage(index)


def tune_compacted(base_dir: Location, m: IndexManifest, folded: Mapping[int, Location],
                   held: Mapping[int, tuple[np.ndarray, np.ndarray] | None], k: int,
                   target: float) -> tuple[TuneRow, list[TuneRow], bool]:
    """Recall@k of a compacted version at each candidate setting, as the index job measures a new one.

    Args:
        base_dir, m: the version compaction started from (the shards it leaves as they are are read from it).
        folded: shard number -> the file of its compacted index, written without the held-out vectors.
        held: shard number -> the (ids, xb) held out of it (``fold_segments``): the queries. They are out of
            the compacted shards while searched; the true neighbours are exact search over every other live
            vector; results merge across shards.
        k: recall@k; target: the recall to reach.

    The true neighbours are gathered a shard at a time; the searches run over every segment memory-mapped
    where the kind allows (``mmap_flags``), as serving maps them.

    Returns:
        (chosen row, every row, whether the target was reached).
    """
    xq = np.concatenate([h[1] for h in held.values() if h is not None and len(h[0])])
    qids = np.concatenate([h[0] for h in held.values() if h is not None and len(h[0])])
    order = np.argsort(qids)
    xq, qids = xq[order], qids[order]
    flags = mmap_flags(m.factory) if base_dir.is_local else 0
    indexes, segments = [], []
    truth = GroundTruth(xq, k + 1, m.metric)
    for n, rec in enumerate(m.shards):
        if n in folded:
            truth.add(*segment_vectors(read_index_file(folded[n])))
            indexes.append(read_index_file(folded[n], None, flags))
            segments.append(Segment(n, 0, np.zeros(0, np.int64)))
        else:
            truth.add(*live_vectors(base_dir, m, n))
            for (name, _, _), seg in zip(segment_files(rec), shard_segments(base_dir, m, n), strict=True):
                indexes.append(read_index_file(base_dir.join(name), None, flags))
                segments.append(seg)
    _, true_I = drop_self(*truth.result(), qids, k)
    view = ShardedIndex(base_dir, m, indexes, segments=segments)
    rows = tune_settings(view, candidate_params(indexes[0]), xq, qids, true_I, k)
    chosen, reached = tune(rows, target)
    return chosen, rows, reached


def version_recall(vloc: Location, m: IndexManifest, n_queries: int, encode: Callable[[list[str]], np.ndarray],
                   seed: int = 0) -> float | None:
    """Recall@RECALL_K of a version at its tuned setting, measured as the index job measured it.

    The queries: ``n_queries`` of the real queries it was tuned on (``recall.queries_from``, when that file is
    still there), embedded by ``encode`` (the index's model); else held-out live vectors, masked from every
    segment while searched (for HNSW they still sit in the graph, which makes this optimistic). The truth: exact
    search over the other live vectors. None for exact kinds and kinds that keep only codes (no exact vectors to
    measure against), and for versions of fewer than 20 vectors.
    """
    trained, _ = trained_index(vloc, m)
    if not recall_measurable(deserialize(trained)):
        return None
    vecs = [live_vectors(vloc, m, n) for n in range(len(m.shards))]
    ids = np.concatenate([v[0] for v in vecs])
    if len(ids) < 20:
        return None
    rng = np.random.default_rng(seed)
    qfile = m.recall.queries_from if m.recall else ""
    k = min(RECALL_K, len(ids) - 1)
    if qfile and Path(qfile).is_file():
        texts = sample_query_texts(qfile, n_queries, rng)
        xq, qids = encode(texts), np.full(len(texts), -1, np.int64)
    else:
        qids = np.sort(rng.choice(ids, held_out_count(n_queries, len(ids)), replace=False))
        order = np.argsort(ids)
        xq = np.concatenate([v[1] for v in vecs])[order][np.searchsorted(ids[order], qids)]
    truth = GroundTruth(xq, k + 1, m.metric, exclude=qids)
    for sid, sxb in vecs:
        truth.add(sid, sxb)
    _, true_I = drop_self(*truth.result(), qids, k)
    index = ShardedIndex.open(vloc.uri, verify=False, mmap=False)
    for seg in index.segments:  # the held-out vectors are masked too, as if they were not in the index
        seg.mask(qids[qids >= 0])
    return measured_recall(index, xq, qids, true_I, k)[0]
