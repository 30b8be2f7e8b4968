"""`ragtune index add|delete|compact|gc|history`: change an index without rebuilding it, one new version each.

Laptop (no Ray: a small add embeds its new chunks in this process)::

    ragtune index add -i runs/beir/index --corpus new-and-changed.jsonl   # or --embeddings DIR (by ragtune embed)
    ragtune index delete -i runs/beir/index --doc-id sq00p000 sq00p001   # or --where source=wiki
    ragtune index compact -i runs/beir/index [--force]                   # fold deltas and tombstones in
    ragtune index gc -i runs/beir/index --keep 3 && ragtune index history -i runs/beir/index

Cluster (the index root on storage every node sees; an add above ``--ray-above`` chunks embeds on Ray Data)::

    ray job submit --working-dir . -- python -m jobs.freshness add -i s3://bucket/index --corpus s3://bucket/new/

Every write takes the index's writer lock, starts from the version ``LATEST`` names, writes a new version that
shares every unchanged file of it (nothing is copied) and switches ``LATEST`` last, so readers of the old
version keep working (docs/index.md, "Freshness"). The flow of an add, top to bottom:
1. read the new corpus here (``sharding.corpus``) and chunk it with the chunker and tokenizer the manifest
   records (the embed job's chunk ids), or take chunks embedded by ``ragtune embed`` (``--embeddings``);
2. compare with the live rows of the same doc ids: new documents are added, unchanged ones skipped, changed
   ones updated (old chunks masked, new ones added);
3. embed the new chunks with the index's model: in this process (``models.embedders.QueryEncoder``; a Ray Data
   pipeline's start-up would be most of a small add's time), or above ``--ray-above`` chunks with the embed job;
4. ``ceil(chunks / segment size)`` delta segments (one for any add up to a shard's size), each attached to a
   shard with the fewest live vectors (``sharding.freshness.plan_segments``; the shard count never changes, other
   shards' files are not touched), tombstones for the masked chunks, BM25 deltas and statistics, the manifest
   with its history; ``LATEST``;
5. optionally ``gc`` (``--gc-keep N`` or the index's ``index.keep_versions``).
Delete masks chunks by tombstones; compact folds deltas and tombstones into one base per shard and re-tunes the
search parameters as the index job does; gc deletes old versions that no reader leases. Delete and compact
stream the version a docstore batch or a shard at a time (one shard's data in memory, written before the next
is read).
"""

from __future__ import annotations

import argparse
import atexit
import gc as pygc
import logging
import os
import shutil
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import ValidationError

from configs.errors import RagtuneError, redact
from configs.schema import EmbedJobConfig, IndexJobConfig
from configs.schema.embed import CorpusConfig
from configs.schema.index import IndexConfig
from jobs import console
from jobs.commands import ADD_RAY_ABOVE, guarded, index_ops_parser, print_summary
from jobs.embed import run as embed_run
from models.embedders import EmbedderSpec, QueryEncoder, load_tokenizer, resolve_embedder
from sharding.chunking import Chunker, ChunkerSettings, embed_input
from sharding.corpus import read_documents_local
from sharding.docstore import write_docstore
from sharding.embeddings import (
    check_finite,
    check_part_dims,
    chunk_documents,
    read_manifest,
    read_part_table,
    recipe_differences,
    vectors_from_arrow,
)
from sharding.faiss_index import deserialize, read_index_file, write_index_file
from sharding.filters import filter_mask, parse_where
from sharding.freshness import (
    COMPACT_MAX_DELTAS,
    COMPACT_THRESHOLD,
    DOC_COLUMNS,
    AddPlan,
    by_segment,
    compaction_reason,
    delta_segment_size,
    fold_segments,
    masked_ids,
    new_segment,
    plan_add,
    plan_segments,
    read_stats,
    recall_measurable,
    rows_of,
    scan_live,
    segment_files,
    select_live,
    set_tombstones,
    stats_of,
    stats_of_all,
    trained_index,
    tune_compacted,
    version_recall,
    with_stats,
    with_trained_file,
    write_delta,
    write_lexical,
)
from sharding.layout import DOCSTORE_DIR, LATEST, MANIFEST, docstore_name, shard_name
from sharding.lexical import LEXICAL_DIR, CorpusStats, LexicalManifest, lexical_delta_name, lexical_name
from sharding.manifest import (
    HistoryEntry,
    IndexManifest,
    Operation,
    RecallRecord,
    ShardRecord,
    carried_manifest,
    read_index_manifest,
    read_latest,
    switch_latest,
    write_index_manifest,
)
from sharding.search import shard_segments
from sharding.storage import (
    Location,
    delete_dir_if_empty,
    delete_file,
    exists,
    makedirs,
    resolve,
    with_credentials_of,
)
from sharding.tuning import RECALL_K as K
from sharding.tuning import TuneRow, apply_params, held_out_count
from sharding.versions import GRACE_S, WriterLock, gc_versions, next_version, read_leases, version_states

log = logging.getLogger("ragtune.index")


# --- the version written from LATEST ------------------------------------------------------------------------------

def _root(index_path: str) -> Location:
    """The index root of ``-i``: it must hold LATEST (writes start from the latest version)."""
    root = resolve(index_path)
    if exists(root.join(MANIFEST)):
        raise RagtuneError(f"-i {index_path}: a version folder, not an index root. Fix: pass the folder that holds "
                           "LATEST and the v-NNNNN folders (writes always start from LATEST)")
    if read_latest(root) is None:
        raise RagtuneError(f"-i {index_path}: no index here (no {LATEST}). Fix: build one with `ragtune index -c "
                           "configs/index/<x>.yaml`, or pass the index.path it was built at")
    return root


def _latest(root: Location) -> tuple[Location, IndexManifest]:
    vloc = root.join(read_latest(root) or "")
    return vloc, read_index_manifest(vloc)


def _built_with(m: IndexManifest) -> IndexConfig:
    """The ``index`` section of the config the version was built with (its manifest's ``config``, read through the
    job's schema); the schema's defaults for a manifest that records no config (written with the sharding
    functions alone)."""
    if not m.config:
        return IndexConfig(path="")
    try:
        return IndexJobConfig.model_validate(m.config).index
    except ValidationError as e:
        raise RagtuneError(f"version {m.version}: the index config recorded in its manifest does not validate "
                           f"({str(e).splitlines()[0]}). Fix: rebuild the index with `ragtune index`") from None


def _new_version(root: Location, base_dir: Location, m: IndexManifest) -> tuple[Location, IndexManifest, bytes]:
    """Start the next version beside `m`'s: its folder, a manifest carrying m's shards, and m's trained index."""
    version = next_version(root)
    vdir = root.join(version)
    makedirs(vdir.join(DOCSTORE_DIR))
    nm = carried_manifest(m, version)
    trained, derived = trained_index(base_dir, m)
    if derived:
        with_trained_file(nm, vdir, trained)
    return vdir, nm, trained


def _finish(root: Location, vdir: Location, nm: IndexManifest, base: IndexManifest, operation: Operation,
            t0: float, counts: dict[str, int]) -> None:
    """Write the new version's manifest (with its history) and switch LATEST to it: the last two steps."""
    nm.ntotal = sum(r.live for r in nm.shards)
    nm.operation, nm.parent, nm.created_at = operation, base.version, time.time()
    nm.history = base.entries() + [HistoryEntry(version=nm.version, operation=operation,
                                                parent=base.version, at=nm.created_at,
                                                seconds=time.perf_counter() - t0, ntotal=nm.ntotal, counts=counts)]
    write_index_manifest(vdir, nm)
    switch_latest(root, nm.version)  # a crash before this line leaves LATEST (and every reader) on the old one


def _gc_after(index_path: str, m: IndexManifest, keep_versions: int | None) -> None:
    """``--gc-keep N``, else the index's ``index.keep_versions``: gc after a write."""
    keep = keep_versions if keep_versions is not None else _built_with(m).keep_versions
    if keep:
        gc(index_path, keep=keep)


# --- add: the new chunks and their vectors -------------------------------------------------------------------------

def _check_chunker(m: IndexManifest) -> tuple[EmbedderSpec, ChunkerSettings]:
    """The chunker settings the index was built with (its manifest), and the model's spec, checked: the
    embedding model named in the manifest must resolve here to the same revision."""
    name, built = m.model.name, m.model.revision
    spec = resolve_embedder(name)
    if built and spec.revision != built:
        raise RagtuneError(f"the index was built with {name} revision {built} but {name} resolves here to revision "
                           f"{spec.revision}: new chunks would be embedded by another model. Fix: install the same "
                           "model revision, or rebuild the whole index with `ragtune embed` + `ragtune index`")
    c = m.chunker
    if c is None:
        raise RagtuneError("the index manifest records no chunker settings, so new documents cannot be chunked as "
                           "the index was. Fix: embed them with `ragtune embed` and pass --embeddings")
    settings = c.settings()
    if settings.fingerprint() != c.fingerprint:
        raise RagtuneError(f"the index's chunker (version {c.version}) is not the chunker of this ragtune. "
                           "Fix: rebuild the index with `ragtune embed` + `ragtune index`")
    return spec, settings


def _corpus_fields(m: IndexManifest, root: Location, text_field: str | None, id_field: str | None,
                   title_field: str | None) -> tuple[str, str | None, str]:
    """The corpus fields: as given, else as the embed job that made the index read them, else the defaults."""
    recorded: CorpusConfig | None = None
    try:
        em = read_manifest(resolve(with_credentials_of(m.embeddings.path, root))) if m.embeddings else None
        recorded = EmbedJobConfig.model_validate(em.config).corpus if em and em.config else None
    except (RagtuneError, ValidationError, OSError):  # the embeddings moved, were made otherwise, or cannot be
        # read with this process's credentials (a manifest names them without the URI's): the defaults
        pass
    d = CorpusConfig.model_fields
    return (text_field or (recorded.text_field if recorded else d["text_field"].default),
            id_field or (recorded.id_field if recorded else d["id_field"].default),
            title_field or (recorded.title_field if recorded else d["title_field"].default))


def _unique_chunks(t: pa.Table) -> pa.Table:
    """Chunk rows with each chunk id once; two different texts under one id (a document listed twice with
    different text) are refused, as the embed job refuses them."""
    t = t.filter(pc.greater_equal(t["chunk_index"], 0)).sort_by("chunk_id")
    ids = t["chunk_id"].to_numpy()
    same = np.zeros(len(ids), dtype=bool)
    same[1:] = ids[1:] == ids[:-1]
    if same.any():
        texts = t["text"].to_pylist()
        clash = [i for i in np.flatnonzero(same) if texts[i] != texts[i - 1]]
        if clash:
            docs = sorted({t["doc_id"][int(i)].as_py() for i in clash})[:5]
            raise RagtuneError(f"documents {docs} appear more than once in the new corpus with different text. Fix: "
                               "give every document a unique id (--id-field), or keep one copy of each")
        t = t.filter(pa.array(~same))
    return t


def _new_chunks(m: IndexManifest, corpus: str | list[str] | None, embeddings: str | None,
                fields: tuple[str, str | None, str]) -> tuple[pa.Table, int]:
    """The chunks of the new corpus (DOC_COLUMNS; with ``vector`` when they come from --embeddings), and the
    number of documents read."""
    if embeddings is not None:
        emb = resolve(embeddings)
        em = read_manifest(emb)
        if em is None or em.state != "done":
            raise RagtuneError(f"--embeddings {embeddings}: no complete embeddings here (manifest "
                               f"{'missing' if em is None else em.state!r}). Fix: run `ragtune embed` to the end first")
        check_part_dims(emb, em)
        problems = recipe_differences(em, m, "the index's")
        if em.dim != m.dim:
            problems.append(f"d = {em.dim} vs the index's {m.dim}")
        if problems:
            raise RagtuneError(f"--embeddings {embeddings} were made differently from the index: "
                               + "; ".join(problems) + ". Fix: embed the new documents with the index's model and "
                               "chunker (`ragtune embed` with the config the index was made from), or pass --corpus")
        parts = [read_part_table(emb, rec, [*DOC_COLUMNS, "vector"]) for _, rec in sorted(em.parts.items())]
        t = pa.concat_tables(parts) if parts else pa.table({})
        return _unique_chunks(t), len(set(t["doc_id"].to_pylist())) if parts else 0
    spec, settings = _check_chunker(m)
    docs = read_documents_local(corpus if isinstance(corpus, str) else list(corpus or []), *fields)
    chunker = Chunker(load_tokenizer(spec.path), settings.size, settings.overlap, settings.prepend_title)
    chunks = chunk_documents(docs, chunker, settings.fingerprint())
    return _unique_chunks(chunks.select(DOC_COLUMNS)), docs.num_rows


def _given_chunks(chunks: pa.Table) -> tuple[pa.Table, int]:
    """Chunk rows made by the caller (``add(chunks=...)``), checked, and the number of their documents."""
    missing = [c for c in (*DOC_COLUMNS, "vector") if c not in chunks.column_names]
    if missing:
        raise RagtuneError(f"chunks: columns {missing} are missing. Fix: give chunk_id, doc_id, chunk_index, "
                           "title, text, metadata, n_tokens and vector")
    return _unique_chunks(chunks), len(set(chunks["doc_id"].to_pylist()))


def _plan(base_dir: Location, m: IndexManifest, new: pa.Table) -> AddPlan:
    """The new chunks against the live rows of the same doc ids: what to add, what to mask."""
    docs = pa.array(sorted(set(new["doc_id"].to_pylist())), pa.string())
    where = select_live(base_dir, m, ("chunk_id", "doc_id"), lambda t: pc.is_in(t["doc_id"], value_set=docs))
    return plan_add(new, rows_of(base_dir, m, where))


def _embed_local(m: IndexManifest, rows: pa.Table, batch_size: int) -> np.ndarray:
    """Embed chunk rows in this process with the index's model, as the embed job's actors do: the model input
    is title + text, normalised as the index is (``models.embedders.QueryEncoder``: loaded once per process)."""
    prepend = m.chunker.prepend_title if m.chunker else True
    inputs = [embed_input(ti, te, prepend) for ti, te in zip(rows["title"].to_pylist(), rows["text"].to_pylist(),
                                                              strict=True)]
    return QueryEncoder(m, batch_size=batch_size).encode(inputs)


def _embed_ray(m: IndexManifest, root: Location, corpus: str | list[str], fields: tuple[str, str | None, str],
               ids: np.ndarray, address: str | None) -> np.ndarray:
    """Embed through the embed job (Ray Data) into a staging folder under the index root, then take the
    vectors of ``ids``. The whole given corpus is embedded: this path is for large adds."""
    c = m.chunker
    assert c is not None  # the corpus was chunked with it (_check_chunker)
    stage = root.join("_staging", f"embed-{uuid.uuid4().hex[:8]}")
    cfg = EmbedJobConfig.model_validate({
        "corpus": {"path": corpus, "text_field": fields[0], "id_field": fields[1], "title_field": fields[2]},
        "chunk": {"size": c.size, "overlap": c.overlap, "prepend_title": c.prepend_title},
        "embed": {"model": m.model.name, "metric": m.metric},
        "output": {"path": stage.uri}, "cluster": {"address": address}})
    try:
        embed_run(cfg)
        em = read_manifest(stage)
        assert em is not None
        if em.chunker is None or em.chunker.fingerprint != c.fingerprint:
            raise RagtuneError("the embed job chunked the new corpus differently from the index (chunker "
                               f"{em.chunker.model_dump() if em.chunker else {}} vs {c.model_dump()}). Fix: rebuild "
                               "the index with this ragtune")
        t = pa.concat_tables([read_part_table(stage, rec, ["chunk_id", "vector"]) for rec in em.parts.values()])
        pos = {cid: i for i, cid in enumerate(t["chunk_id"].to_pylist())}
        xb = vectors_from_arrow(t["vector"])
        return xb[[pos[int(i)] for i in ids]]
    finally:
        if stage.is_local:
            shutil.rmtree(stage.path, ignore_errors=True)
        else:  # an object store: every key under the staging prefix (they were left in the bucket before)
            try:
                stage.fs.delete_dir(stage.path)
                delete_dir_if_empty(stage.parent)
            except OSError as e:
                log.warning("could not remove the staging folder %s: %s", stage.shown, redact(str(e)))


def _embed(m: IndexManifest, root: Location, rows: pa.Table, ids: np.ndarray, corpus: str | list[str] | None,
           embeddings: str | None, fields: tuple[str, str | None, str], ray_above: int, batch_size: int,
           address: str | None) -> tuple[np.ndarray, str]:
    """The vectors of the chunks to add (given with them, or embedded here or on Ray Data), and who made them."""
    if "vector" in rows.column_names:
        xb, by = vectors_from_arrow(rows["vector"]), "--embeddings" if embeddings else "the caller"
    elif len(ids) > ray_above:
        assert corpus is not None
        xb, by = _embed_ray(m, root, corpus, fields, ids, address), "ray data (the embed job)"
    else:
        xb, by = _embed_local(m, rows, batch_size), "this process"
    if xb.shape[1:] != (m.dim,):
        raise RagtuneError(f"the new vectors have dimension {xb.shape[1:]} but the index {m.dim}. Fix: embed with "
                           f"the index's model {m.model.name}")
    check_finite(xb, ids, f"the new vectors (from {by})")
    return xb, by


def _write_deltas(base_dir: Location, m: IndexManifest, vdir: Location, nm: IndexManifest, trained: bytes,
                  plan: AddPlan, ids: np.ndarray, xb: np.ndarray, stats: CorpusStats | None, size: int) -> list[int]:
    """The new chunks as ``ceil(len(ids) / size)`` delta segments, each on a shard with few live vectors
    (``plan_segments``), scored for BM25 with ``stats`` (the statistics after the add), and the tombstones of the
    old copies of updated chunks. Only the shards named here get new files; returns them."""
    lexical = (nm.lexical.params, stats) if nm.lexical is not None and stats is not None else None
    rows = plan.add.select(DOC_COLUMNS)
    masked = dict(by_segment(plan.dead))
    segments: dict[int, list[np.ndarray]] = {}
    for n, run in plan_segments(len(ids), m.shards, size):
        segments.setdefault(n, []).append(run)
    touched_shards = sorted({key[0] for key in masked} | set(segments))
    for n in touched_shards:
        rec = nm.shards[n]
        dead, touched = masked_ids(base_dir, m, n, masked)
        for run in segments.get(n, []):
            rec.deltas.append(write_delta(vdir, nm.version, n, len(rec.deltas),
                                          new_segment(trained, ids[run], xb[run]), rows.take(pa.array(run)),
                                          lexical))
            dead.append(np.zeros(0, np.int64))
            touched = touched or rec.tombstones is not None
        if touched:
            set_tombstones(vdir, rec, n, dead)
    return touched_shards


# --- add: the new version ---------------------------------------------------------------------------------------

@dataclass
class AddSummary:
    path: str
    version: str  # the version written (the current one when nothing changed)
    parent: str
    changed: bool
    docs: int  # documents read
    docs_added: int
    docs_updated: int
    docs_skipped: int  # present with the same chunks
    chunks_added: int
    chunks_masked: int  # old copies of updated documents' chunks
    ntotal: int
    embedded_by: str  # "this process", "ray data", "--embeddings"
    embed_seconds: float
    seconds: float
    segments: int = 0  # delta segments written (ceil(chunks / segment size))
    shards_touched: list[int] = field(default_factory=list)  # shards that got new files (deltas, tombstones)

    def line(self) -> str:
        if not self.changed:
            return (f"nothing to add: {self.docs:,} docs read, all {self.docs_skipped:,} already in {self.path}/"
                    f"{self.version} with the same text; {self.seconds:.1f}s")
        return (f"added {self.docs_added:,} docs, updated {self.docs_updated:,} ({self.chunks_masked:,} old chunks "
                f"masked), skipped {self.docs_skipped:,} unchanged: {self.chunks_added:,} chunks embedded by "
                f"{self.embedded_by} in {self.embed_seconds:.1f}s, in {self.segments} delta segment(s) on shard(s) "
                f"{self.shards_touched}; {self.ntotal:,} vectors; {self.seconds:.1f}s; "
                f"LATEST {self.parent} -> {self.version}")


def add(index_path: str, corpus: str | list[str] | None = None, embeddings: str | None = None, *,
        chunks: pa.Table | None = None, text_field: str | None = None, id_field: str | None = None,
        title_field: str | None = None, ray_above: int = ADD_RAY_ABOVE, batch_size: int = 64,
        keep_versions: int | None = None, address: str | None = None,
        segment_size: int | None = None) -> AddSummary:
    """Add new and changed documents to the index at ``index_path`` as a new version.

    The new corpus is chunked with the index's chunker and model (its manifest); chunks of documents already
    present with the same chunks are skipped, those of new documents added, and a document whose chunks differ
    is updated (its old chunks masked, its new ones added). New chunks go to ``ceil(chunks / segment_size)``
    delta segments (``segment_size`` default: a base shard's mean size, at least
    ``sharding.freshness.SEGMENT_MIN``), each on one of the shards with the fewest live vectors; no other shard's
    files change. Exactly one source gives the documents: ``corpus`` (files or URIs), ``embeddings`` (a
    folder by ``ragtune embed`` made with the index's model and chunker), or ``chunks`` (a table of chunk rows
    made by the caller: chunk_id, doc_id, chunk_index, title, text, metadata, n_tokens, and ``vector`` from the
    index's model).
    """
    t0 = time.perf_counter()
    if sum(x is not None for x in (corpus, embeddings, chunks)) != 1:
        raise RagtuneError("give the new documents as exactly one of --corpus (files) and --embeddings (a folder by "
                           "`ragtune embed`)")
    root = _root(index_path)
    with WriterLock(root, f"ragtune index add {corpus or embeddings or 'chunks'}"):
        base_dir, m = _latest(root)
        fields = _corpus_fields(m, root, text_field, id_field, title_field)
        new, docs = _given_chunks(chunks) if chunks is not None else _new_chunks(m, corpus, embeddings, fields)
        plan = _plan(base_dir, m, new)
        if plan.add.num_rows == 0 and plan.dead.num_rows == 0:
            return AddSummary(root.shown, m.version, m.version, False, docs, 0, 0, plan.docs_skipped, 0, 0, m.ntotal,
                              "-", 0.0, time.perf_counter() - t0)
        ids = plan.add["chunk_id"].to_numpy().astype(np.int64)
        t_embed = time.perf_counter()
        xb, by = _embed(m, root, plan.add, ids, corpus, embeddings, fields, ray_above, batch_size, address)
        embed_seconds = time.perf_counter() - t_embed

        vdir, nm, trained = _new_version(root, base_dir, m)
        stats = None
        if nm.lexical is not None:  # the live chunks' BM25 statistics after the add: the masked leave, the new come
            lparams = nm.lexical.params
            stats = read_stats(base_dir, m).minus(stats_of(plan.removed, lparams)).merge(stats_of(plan.add, lparams))
        size = segment_size if segment_size is not None else delta_segment_size(m)
        touched = _write_deltas(base_dir, m, vdir, nm, trained, plan, ids, xb, stats, size)
        if nm.lexical is not None and stats is not None:
            nm.lexical = with_stats(vdir, nm.lexical, stats)
        segments = sum(len(r.deltas) for r in nm.shards) - sum(len(r.deltas) for r in m.shards)
        counts = {"docs_added": plan.docs_added, "docs_updated": plan.docs_updated,
                  "docs_skipped": plan.docs_skipped, "chunks_added": len(ids), "chunks_masked": plan.dead.num_rows,
                  "segments": segments}
        _finish(root, vdir, nm, m, "add", t0, counts)
        if nm.ntotal != m.ntotal + len(ids) - plan.dead.num_rows:  # never: each id lives in one segment
            log.warning("%s holds %d vectors, expected %d", nm.version, nm.ntotal,
                        m.ntotal + len(ids) - plan.dead.num_rows)
    _gc_after(index_path, m, keep_versions)
    return AddSummary(root.shown, nm.version, m.version, True, docs, plan.docs_added, plan.docs_updated,
                      plan.docs_skipped, len(ids), plan.dead.num_rows, nm.ntotal, by, embed_seconds,
                      time.perf_counter() - t0, segments, touched)


# --- delete ------------------------------------------------------------------------------------------------------

@dataclass
class DeleteSummary:
    path: str
    version: str
    parent: str
    docs_deleted: int
    chunks_deleted: int
    ntotal: int
    seconds: float

    def line(self) -> str:
        return (f"deleted {self.docs_deleted:,} docs ({self.chunks_deleted:,} chunks masked in every search mode); "
                f"{self.ntotal:,} vectors; {self.seconds:.1f}s; LATEST {self.parent} -> {self.version}")


def _rows_to_delete(base_dir: Location, m: IndexManifest, where_of: str, doc_ids: list[str] | None,
                    cond: dict[str, list[Any]] | None, where: list[str] | None) -> pa.Table:
    """The live rows (chunk_id, doc_id, shard, seg) of the documents to delete; none found is an error. The
    docstore is streamed a batch at a time (``select_live``): only the rows to delete are kept."""
    if doc_ids:
        wanted = pa.array(sorted(set(doc_ids)), pa.string())
        t = select_live(base_dir, m, ("chunk_id", "doc_id"), lambda b: pc.is_in(b["doc_id"], value_set=wanted))
        unknown = sorted(set(doc_ids) - set(t["doc_id"].to_pylist()))
        if unknown:
            raise RagtuneError(f"--doc-id: {len(unknown)} of {len(set(doc_ids))} doc ids are not in {where_of}: "
                               f"{unknown[:5]}. Fix: check the ids (`ragtune search` prints them); nothing was deleted")
        return t
    assert cond is not None
    t = select_live(base_dir, m, ("chunk_id", "doc_id", "title", "metadata"), lambda b: filter_mask(b, cond))
    if t.num_rows == 0:
        raise RagtuneError(f"--where {' '.join(where or [])!r} matches no chunk of {where_of} (fields: doc_id, "
                           "title, or a metadata key). Fix: check the field names and values; nothing was deleted")
    return t.select(["chunk_id", "doc_id", "shard", "seg"])


def _removed_stats(base_dir: Location, m: IndexManifest, segments: pa.Table, params: Any) -> CorpusStats:
    """The BM25 statistics of the rows of ``segments`` (chunk_id, shard, seg), read a segment at a time."""
    def per_segment() -> Iterator[pa.Table]:
        for (n, pos), group in by_segment(segments):
            one = pa.table({"chunk_id": pa.array(group, pa.int64()),
                            "shard": pa.array(np.full(len(group), n, np.int32)),
                            "seg": pa.array(np.full(len(group), pos, np.int32))})
            yield rows_of(base_dir, m, one, ["chunk_id", "title", "text"])

    return stats_of_all(per_segment(), params)


def delete(index_path: str, doc_ids: list[str] | None = None, where: list[str] | None = None, *,
           keep_versions: int | None = None) -> DeleteSummary:
    """Delete documents (``doc_ids``, or every document whose chunks match ``where``, see
    ``sharding.filters.parse_where``) as a new version: their chunks are masked by tombstones in the segments
    that hold them, so no search mode, docstore lookup or evaluation returns them; compaction drops them."""
    t0 = time.perf_counter()
    if bool(doc_ids) == bool(where):
        raise RagtuneError("say what to delete with exactly one of --doc-id ID [ID ...] and --where FILTER")
    cond = parse_where(where) if where else None  # a bad filter fails before the lock
    root = _root(index_path)
    with WriterLock(root, f"ragtune index delete {' '.join(doc_ids or where or [])[:80]}"):
        base_dir, m = _latest(root)
        t = _rows_to_delete(base_dir, m, root.join(m.version).shown, doc_ids, cond, where)
        version = next_version(root)
        vdir = root.join(version)
        nm = carried_manifest(m, version)
        segments = t.select(["chunk_id", "shard", "seg"])
        masked = dict(by_segment(segments))
        for n in sorted({key[0] for key in masked}):
            dead, _ = masked_ids(base_dir, m, n, masked)
            set_tombstones(vdir, nm.shards[n], n, dead)
        if nm.lexical is not None:  # the deleted chunks' statistics leave the BM25 corpus
            removed = _removed_stats(base_dir, m, segments, nm.lexical.params)
            nm.lexical = with_stats(vdir, nm.lexical, read_stats(base_dir, m).minus(removed))
        docs = len(set(t["doc_id"].to_pylist()))
        _finish(root, vdir, nm, m, "delete", t0, {"docs_deleted": docs, "chunks_deleted": t.num_rows})
    _gc_after(index_path, m, keep_versions)
    return DeleteSummary(root.shown, version, m.version, docs, t.num_rows, nm.ntotal, time.perf_counter() - t0)


# --- compact -----------------------------------------------------------------------------------------------------

@dataclass
class CompactSummary:
    path: str
    version: str
    parent: str
    changed: bool
    shards_compacted: int
    reasons: dict[str, str]
    vectors_dropped: int  # masked vectors removed for good
    ntotal: int
    search_params: dict[str, int]
    recall: float | None  # recall@10 re-measured after compaction (None: exact kind, or not measurable)
    target_recall: float | None
    seconds: float
    recall_before: float | None = None  # --check-recall: recall@10 of the version compaction started from

    def line(self) -> str:
        before = "" if self.recall_before is None else f"; recall@{K} {self.recall_before:.3f} is above its target"
        if not self.changed:
            return (f"nothing to compact in {self.path}/{self.version} (no shard passed the thresholds{before}; "
                    "--force compacts anyway)")
        tuned = (f"; recall@{K} {self.recall:.3f} at {', '.join(f'{k}={v}' for k, v in self.search_params.items())} "
                 f"(target {self.target_recall})" if self.recall is not None else "")
        return (f"compacted {self.shards_compacted} shard(s), {self.vectors_dropped:,} masked vectors dropped; "
                f"{self.ntotal:,} vectors{tuned}; {self.seconds:.1f}s; LATEST {self.parent} -> {self.version}")


def compact(index_path: str, *, force: bool = False, threshold: float = COMPACT_THRESHOLD,
            max_deltas: int = COMPACT_MAX_DELTAS, check_recall: bool = False,
            keep_versions: int | None = None) -> CompactSummary:
    """Fold the deltas and tombstones of every shard that passed ``threshold`` (or all with ``force``; or all
    when ``check_recall`` measures the current version below its target recall) into one base file per shard,
    as a new version; rebuild every BM25 file with fresh statistics; re-measure recall@10 and re-tune the search
    parameters as the index job does (approximate kinds)."""
    t0 = time.perf_counter()
    if not 0 < threshold:
        raise RagtuneError(f"--threshold {threshold}: must be positive, e.g. 0.1 (10% of a shard's base)")
    root = _root(index_path)
    with WriterLock(root, "ragtune index compact"):
        base_dir, m = _latest(root)
        built = _built_with(m)
        target = m.recall.target if m.recall else built.target_recall
        before = current_recall(base_dir, m) if check_recall and not force else None
        todo = _shards_to_compact(m, force, threshold, max_deltas, before, target)
        if not todo:
            return CompactSummary(root.shown, m.version, m.version, False, 0, {}, 0, m.ntotal, m.search_params,
                                  None, None, time.perf_counter() - t0, before)

        vdir, nm, trained = _new_version(root, base_dir, m)
        n_live = sum(r.live for r in m.shards)
        k = min(K, n_live - 1)
        qids = _held_out(base_dir, m, trained, todo, built, n_live)
        held: dict[int, tuple[np.ndarray, np.ndarray] | None] = {}
        dropped = 0
        for n in sorted(todo):  # one shard at a time: its segments folded, its files written, then let go
            held[n], d = _compact_shard(base_dir, m, vdir, nm, n, trained, qids)
            dropped += d
        chosen = None
        if qids is not None and len(qids):
            chosen = _retune(base_dir, m, vdir, nm, held, k, target, len(qids))
        if nm.lexical is not None:
            nm.lexical = _rescored_lexical(vdir, nm, nm.lexical)
        _finish(root, vdir, nm, m, "compact", t0, {"shards_compacted": len(todo), "vectors_dropped": dropped})
        if nm.ntotal != m.ntotal:
            raise RagtuneError(f"compaction changed the live vectors ({m.ntotal} -> {nm.ntotal}); LATEST now names "
                               f"{nm.version}: reopen {m.version} by its folder and report this")
    _gc_after(index_path, m, keep_versions)
    return CompactSummary(root.shown, nm.version, m.version, True, len(todo), {str(n): r for n, r in todo.items()},
                          dropped, nm.ntotal, nm.search_params, chosen.recall if chosen else None,
                          target if chosen else None, time.perf_counter() - t0, before)


def _shards_to_compact(m: IndexManifest, force: bool, threshold: float, max_deltas: int, before: float | None,
                       target: float) -> dict[int, str]:
    """Shard number -> why it is compacted: ``--force``, the thresholds, or (every shard) recall below target."""
    if before is not None and before < target:  # recall drifted: every shard, re-tuned
        return {n: f"recall@{K} {before:.3f} < target {target}" for n in range(len(m.shards))}
    reasons = {n: "--force" if force else compaction_reason(rec, threshold, max_deltas)
               for n, rec in enumerate(m.shards)}
    return {n: r for n, r in reasons.items() if r}


def _held_out(base_dir: Location, m: IndexManifest, trained: bytes, todo: dict[int, str], built: IndexConfig,
              n_live: int) -> np.ndarray | None:
    """The live vectors of the compacted shards held out as recall queries, as the index job holds them out
    (``index.tune_queries``, at most a tenth): positions drawn among the compacted shards' live rows (shard,
    segment and docstore order), their ids read a batch at a time. None when recall is not measured (exact kinds,
    kinds that keep only codes, tiny versions)."""
    if not (recall_measurable(deserialize(trained)) and n_live > 20):
        return None
    shards = sorted(todo)
    pool = sum(m.shards[n].live for n in shards)
    nq = min(held_out_count(built.tune_queries, n_live), pool)
    pick = np.sort(np.random.default_rng(built.seed).choice(pool, nq, replace=False))
    out, offset = [np.zeros(0, np.int64)], 0
    for _, _, t in scan_live(base_dir, m, ("chunk_id",), shards):
        ids = t["chunk_id"].to_numpy()
        lo, hi = np.searchsorted(pick, [offset, offset + len(ids)])
        out.append(ids[pick[lo:hi] - offset])
        offset += len(ids)
    if offset != pool:
        raise RagtuneError(f"{base_dir.uri}: shards {shards} hold {offset} live docstore rows but the manifest says "
                           f"{pool}. Fix: rebuild the index with `ragtune index`")
    return np.sort(np.concatenate(out))


def _tuning_name(n: int) -> str:
    """A compacted shard without its held-out vectors, searched while re-tuning; removed before the manifest."""
    return shard_name(n).replace(".faiss", ".tune.faiss")


def _compact_shard(base_dir: Location, m: IndexManifest, vdir: Location, nm: IndexManifest, n: int, trained: bytes,
                   qids: np.ndarray | None) -> tuple[tuple[np.ndarray, np.ndarray] | None, int]:
    """Fold shard ``n``'s segments into one index and write it with its live docstore rows as the new base (with
    ``qids``, also a copy without them for re-tuning, ``_tuning_name``). Only this shard is in memory.

    Returns the held-out (ids, xb) of the shard (None when nothing is tuned) and the masked vectors dropped."""
    rec = m.shards[n]
    segs = shard_segments(base_dir, m, n)
    shas = [rec.sha256] + [d.sha256 for d in rec.deltas]
    indexes = [read_index_file(base_dir.join(f), sha, 0) for (f, _, _), sha in zip(segment_files(rec), shas,
                                                                                     strict=True)]
    tuning = qids is not None and len(qids) > 0
    index, held = fold_segments(indexes, [g.dead for g in segs], trained, qids if tuning else None)
    del indexes
    if held is not None:
        write_index_file(index, vdir.join(_tuning_name(n)))
        if len(held[0]):
            index.add_with_ids(held[1], held[0])  # back in after the tuning searches, as the index job adds them
    sha, size = write_index_file(index, vdir.join(shard_name(n)))
    ntotal = int(index.ntotal)
    del index
    doc_rows = _live_rows(base_dir, m, n)
    if doc_rows.num_rows != rec.live:
        raise RagtuneError(f"{base_dir.uri}: shard {n} holds {doc_rows.num_rows} live docstore rows but {rec.live} "
                           "live vectors. Fix: rebuild the index with `ragtune index`")
    dsha, dsize = write_docstore(doc_rows, vdir.join(docstore_name(n)))
    nm.shards[n] = ShardRecord(file=shard_name(n), ntotal=ntotal, sha256=sha, bytes=size, docstore=docstore_name(n),
                               docstore_sha256=dsha, docstore_bytes=dsize, pieces=[])
    return held, sum(len(g.dead) for g in segs)


def _retune(base_dir: Location, m: IndexManifest, vdir: Location, nm: IndexManifest,
            held: dict[int, tuple[np.ndarray, np.ndarray] | None], k: int, target: float, nq: int) -> TuneRow:
    """Re-measure recall on the held-out vectors and keep the cheapest setting that reaches the target, in the
    new manifest (``search_params``, ``recall``, ``tuning``) and in each compacted shard's file (read, set,
    written again a shard at a time); the copies searched while tuning go."""
    tuned = {n: vdir.join(_tuning_name(n)) for n in held}
    chosen, rows, reached = tune_compacted(base_dir, m, tuned, held, k, target)
    if not reached:
        log.warning("after compaction no setting reached recall@%d >= %s (best %.3f at %s)", k, target, chosen.recall,
                    chosen.label())
    for n, loc in tuned.items():
        index = read_index_file(vdir.join(shard_name(n)))
        apply_params(index, chosen.params)
        r = nm.shards[n]
        r.sha256, r.bytes = write_index_file(index, vdir.join(shard_name(n)))
        del index
        delete_file(loc)
    nm.search_params = chosen.params
    nm.recall = RecallRecord.measured(chosen, k, target, nq, "held-out database vectors (at compaction)")
    nm.tuning = rows
    return chosen


def _rescored_lexical(vdir: Location, nm: IndexManifest, lexical: LexicalManifest) -> LexicalManifest:
    """Every BM25 file again, scored with the statistics of the live chunks (a compacted shard's one file, the
    other shards' segments each), so that scores equal a fresh build's. Two passes over the new version's
    segments, one segment's rows in memory at a time: the statistics, then the files."""
    makedirs(vdir.join(LEXICAL_DIR))
    segments = [(n, pos) for n, rec in enumerate(nm.shards) for pos in range(1 + len(rec.deltas))]
    stats = stats_of_all((_live_rows(vdir, nm, n, pos) for n, pos in segments), lexical.params)
    for n, pos in segments:
        t = _live_rows(vdir, nm, n, pos)
        if pos == 0:
            lexical.shards[n] = write_lexical(vdir, lexical_name(n), t, lexical.params, stats)
        else:
            nm.shards[n].deltas[pos - 1].lexical = write_lexical(vdir, lexical_delta_name(n, pos - 1), t,
                                                                 lexical.params, stats)
    return with_stats(vdir, lexical, stats)


def current_recall(vloc: Location, m: IndexManifest, seed: int = 0) -> float | None:
    """Recall@10 of a version at its tuned setting, re-measured as the index job measured it
    (``sharding.freshness.version_recall``: on the real queries it was tuned on, embedded here with the index's
    model, else on held-out live vectors). None for exact kinds and kinds that keep only codes."""
    return version_recall(vloc, m, _built_with(m).tune_queries,
                          lambda texts: QueryEncoder(m, batch_size=64).encode(texts), seed)


def _live_rows(vloc: Location, m: IndexManifest, n: int, pos: int | None = None) -> pa.Table:
    """The live docstore rows of shard ``n`` (every segment, or only segment ``pos``), sorted by chunk id."""
    segs = shard_segments(vloc, m, n)
    out = []
    for i, (_, doc, _) in enumerate(segment_files(m.shards[n])):
        if pos is not None and i != pos:
            continue
        t = pq.read_table(vloc.join(doc).path, filesystem=vloc.fs)
        t = t.select([c for c in DOC_COLUMNS if c in t.column_names])
        if len(segs[i].dead):
            t = t.filter(pc.invert(pc.is_in(t["chunk_id"], value_set=pa.array(segs[i].dead, pa.int64()))))
        out.append(t)
    return pa.concat_tables(out, promote_options="default").sort_by("chunk_id")


# --- gc and history ----------------------------------------------------------------------------------------------

@dataclass
class GcSummary:
    path: str
    kept: dict[str, str]
    deleted: list[str]
    incomplete: list[str]
    files_deleted: int
    dry_run: bool
    seconds: float

    def line(self) -> str:
        verb = "would delete" if self.dry_run else "deleted"
        kept = ", ".join(f"{v} ({why})" for v, why in sorted(self.kept.items()))
        return (f"gc {self.path}: {verb} {len(self.deleted)} version(s) {self.deleted} and {len(self.incomplete)} "
                f"unfinished folder(s), {self.files_deleted} file(s); kept {kept}")


def gc(index_path: str, keep: int = 3, *, grace_s: float | None = None, dry_run: bool = False) -> GcSummary:
    """Delete old versions: all but the ``keep`` newest complete ones, LATEST, leased ones and those superseded
    less than ``grace_s`` ago (``sharding.versions``); only files no kept version shares."""
    t0 = time.perf_counter()
    root = _root(index_path)
    plan = gc_versions(root, keep, GRACE_S if grace_s is None else grace_s, dry_run)
    return GcSummary(root.shown, plan.keep, plan.delete, plan.incomplete, len(plan.files), dry_run,
                     time.perf_counter() - t0)


@dataclass
class HistorySummary:
    path: str
    latest: str
    rows: list[dict[str, Any]]

    def line(self) -> str:
        out = [f"{self.path}: LATEST -> {self.latest}",
               "| version | operation | from | written | seconds | vectors | counts | on disk |", "|---|" * 8]
        for r in self.rows:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["at"])) if r.get("at") else "-"
            counts = ", ".join(f"{k} {v:,}" for k, v in (r.get("counts") or {}).items())
            out.append(f"| {r['version']} | {r.get('operation', '-')} | {r.get('parent') or '-'} | {when} | "
                       f"{r.get('seconds', 0):.1f} | {r.get('ntotal', 0):,} | {counts} | {r['state']} |")
        return "\n".join(out)


def history(index_path: str) -> HistorySummary:
    """The versions of an index: the history recorded in LATEST's manifest, and what is on disk of each."""
    root = _root(index_path)
    latest = read_latest(root) or ""
    _, m = _latest(root)
    leased: dict[str, int] = {}
    now = time.time()
    for le in read_leases(root):
        if le.get("expires_at", 0) > now:
            leased[le.get("version", "")] = leased.get(le.get("version", ""), 0) + 1
    states = version_states(root)
    rows, seen = [], set()
    for e in m.entries():
        seen.add(e.version)
        rows.append({**e.model_dump(), "state": _state(e.version, states, latest, leased)})
    for name in states:
        if name not in seen:
            rows.append({"version": name, "state": _state(name, states, latest, leased)})
    rows.sort(key=lambda r: r["version"])
    return HistorySummary(root.shown, latest, rows)


def _state(v: str, states: dict[str, str], latest: str, leased: dict[str, int]) -> str:
    state = {"complete": "LATEST" if v == latest else "complete", "collected": "collected (shared files kept)",
             "unfinished": "unfinished (no manifest)",
             "abandoned": "abandoned (written, LATEST never named it)"}.get(states.get(v, ""), "deleted by gc")
    return state + (f", {leased[v]} lease(s)" if v in leased else "")


# --- `ragtune index add|delete|compact|gc|history` ----------------------------------------------------------

def ops_main(argv: list[str]) -> int:
    """``ragtune index <op> ...``: run one operation, print its line and (writes) the JSON summary."""
    args = index_ops_parser().parse_args(argv)
    # The process ends after the operation: at exit, the garbage collector's last walk over the ~1M objects that
    # torch and transformers leave behind took 1 s of a 9 s add here. Frozen objects are skipped (their memory
    # goes back with the process; atexit handlers and finalizers still run).
    atexit.unregister(pygc.freeze)
    atexit.register(pygc.freeze)
    if args.op == "history":
        print(history(args.index).line())
        return 0
    if args.op != "add":  # seconds of work in this process: its lines are the output
        print_summary(_op(args))
        return 0
    # an add may embed on Ray: Ray's and the libraries' lines go to a log beside the index (when it is a local
    # folder that exists; else runs/logs), as a job's do
    root = resolve(args.index)
    folder = args.index if root.is_local and os.path.isdir(root.path) else None
    with console.session("index-add", folder, verbose=args.verbose):
        print_summary(_op(args))
    return 0


def _op(args: argparse.Namespace) -> Any:
    if args.op == "add":
        return add(args.index, corpus=args.corpus, embeddings=args.embeddings, text_field=args.text_field,
                           id_field=args.id_field, title_field=args.title_field, ray_above=args.ray_above,
                           batch_size=args.batch_size, keep_versions=args.gc_keep, address=args.address,
                           segment_size=args.segment_size)
    if args.op == "delete":
        return delete(args.index, args.doc_id, args.where, keep_versions=args.gc_keep)
    if args.op == "compact":
        return compact(args.index, force=args.force, threshold=args.threshold, max_deltas=args.max_deltas,
                       check_recall=args.check_recall, keep_versions=args.gc_keep)
    return gc(args.index, keep=args.keep, grace_s=args.grace, dry_run=args.dry_run)


if __name__ == "__main__":  # python -m jobs.freshness add -i INDEX ... (what `ray job submit` calls)
    sys.exit(guarded(lambda: ops_main(sys.argv[1:])))
