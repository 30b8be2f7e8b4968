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
4. one delta segment per shard that gets chunks (shard ``chunk_id % shards``; the shard count never changes),
   tombstones for the masked chunks, BM25 deltas and statistics, the manifest with its history; ``LATEST``;
5. optionally ``gc`` (``--gc-keep N`` or the index's ``index.keep_versions``).
Delete masks chunks by tombstones; compact folds deltas and tombstones into one base per shard and re-tunes the
search parameters as the index job does; gc deletes old versions that no reader leases.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from configs.errors import RagtuneError
from jobs.commands import ADD_RAY_ABOVE, guarded, index_ops_parser
from sharding.embeddings import read_manifest
from sharding.freshness import COMPACT_MAX_DELTAS, COMPACT_THRESHOLD
from sharding.layout import DOCSTORE_DIR, MANIFEST, docstore_name, shard_name
from sharding.manifest import HistoryEntry, IndexManifest, ShardRecord, read_latest, switch_latest, write_index_manifest
from sharding.metrics import read_query_texts
from sharding.search import RECALL_K as K
from sharding.storage import Location, exists, makedirs, resolve
from sharding.versions import next_version

log = logging.getLogger("ragtune.index")



def _root(index_path: str) -> Location:
    """The index root of ``-i``: it must hold LATEST (writes start from the latest version)."""
    from sharding.layout import LATEST

    root = resolve(index_path)
    if exists(root.join(MANIFEST)):
        raise RagtuneError(f"-i {index_path}: a version folder, not an index root. Fix: pass the folder that holds "
                           "LATEST and the v-NNNNN folders (writes always start from LATEST)")
    if read_latest(root) is None:
        raise RagtuneError(f"-i {index_path}: no index here (no {LATEST}). Fix: build one with `ragtune index -c "
                           "configs/index/<x>.yaml`, or pass the index.path it was built at")
    return root


def _latest(root: Location) -> tuple[Location, IndexManifest]:
    from sharding.manifest import read_index_manifest

    vloc = root.join(read_latest(root) or "")
    return vloc, read_index_manifest(vloc)


def _finish(root: Location, vdir: Location, nm: IndexManifest, base: IndexManifest, operation: str,
            t0: float, counts: dict[str, int]) -> None:
    """Write the new version's manifest (with its history) and switch LATEST to it: the last two steps."""
    nm.ntotal = sum(r.live for r in nm.shards)
    nm.operation, nm.parent, nm.created_at = operation, base.version, time.time()  # type: ignore[assignment]
    nm.history = base.entries() + [HistoryEntry(version=nm.version, operation=operation,  # type: ignore[arg-type]
                                                parent=base.version, at=nm.created_at,
                                                seconds=time.perf_counter() - t0, ntotal=nm.ntotal, counts=counts)]
    write_index_manifest(vdir, nm)
    switch_latest(root, nm.version)  # a crash before this line leaves LATEST (and every reader) on the old one


def _new_version(root: Location, base_dir: Location, m: IndexManifest) -> tuple[Location, IndexManifest, bytes]:
    """Start the next version beside `m`'s: its folder, a manifest carrying m's shards, and m's trained index."""
    from sharding.freshness import trained_index, with_trained_file
    from sharding.manifest import carried_manifest

    version = next_version(root)
    vdir = root.join(version)
    makedirs(vdir.join(DOCSTORE_DIR))
    nm = carried_manifest(m, version)
    trained, derived = trained_index(base_dir, m)
    if derived:
        with_trained_file(nm, vdir, trained)
    return vdir, nm, trained


def _keep_versions(m: IndexManifest, keep: int | None) -> int | None:
    if keep is not None:
        return keep
    return (m.config.get("index") or {}).get("keep_versions")


def _check_chunker(m: IndexManifest) -> Any:
    """The chunker settings the index was built with (its manifest), and the model's spec, checked: the
    embedding model named in the manifest must resolve here to the same revision."""
    from models.embedders import resolve_embedder
    from sharding.chunking import ChunkerSettings

    name, built = m.model.get("name", ""), m.model.get("revision")
    spec = resolve_embedder(name)
    if built and spec.revision != built:
        raise RagtuneError(f"the index was built with {name} revision {built} but {name} resolves here to revision "
                           f"{spec.revision}: new chunks would be embedded by another model. Fix: install the same "
                           "model revision, or rebuild the whole index with `ragtune embed` + `ragtune index`")
    c = m.chunker
    if not c.get("fingerprint"):
        raise RagtuneError("the index manifest records no chunker settings, so new documents cannot be chunked as "
                           "the index was. Fix: embed them with `ragtune embed` and pass --embeddings")
    settings = ChunkerSettings(size=c["size"], overlap=c["overlap"], prepend_title=c["prepend_title"],
                               tokenizer=c["tokenizer"], version=c.get("version", 1))
    if settings.fingerprint() != c["fingerprint"]:
        raise RagtuneError(f"the index's chunker (version {c.get('version')}) is not the chunker of this ragtune. "
                           "Fix: rebuild the index with `ragtune embed` + `ragtune index`")
    return spec, settings


def _corpus_fields(m: IndexManifest, text_field: str | None, id_field: str | None,
                   title_field: str | None) -> tuple[str, str, str]:
    """The corpus fields: as given, else as the embed job that made the index read them, else the defaults."""
    from configs.schema.embed import CorpusConfig

    recorded: dict[str, Any] = {}
    try:
        em = read_manifest(resolve(m.embeddings.get("path", ""))) if m.embeddings.get("path") else None
        recorded = (em.config.get("corpus") or {}) if em else {}
    except RagtuneError:
        pass
    d = CorpusConfig.model_fields
    return (text_field or recorded.get("text_field") or d["text_field"].default,
            id_field or recorded.get("id_field") or d["id_field"].default,
            title_field or recorded.get("title_field") or d["title_field"].default)


def _unique_chunks(t: pa.Table) -> pa.Table:
    """Chunk rows with each chunk id once; two different texts under one id (a document listed twice with
    different text) are refused, as the embed job refuses them."""
    import pyarrow.compute as pc

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
                fields: tuple[str, str, str]) -> tuple[pa.Table, int]:
    """The chunks of the new corpus (DOC_COLUMNS; with ``vector`` when they come from --embeddings), and the
    number of documents read."""
    from sharding.embeddings import chunk_documents, read_part_table, recipe_differences
    from sharding.embeddings import read_manifest as read_emb
    from sharding.freshness import DOC_COLUMNS

    if embeddings is not None:
        emb = resolve(embeddings)
        em = read_emb(emb)
        if em is None or em.state != "done":
            raise RagtuneError(f"--embeddings {embeddings}: no complete embeddings here (manifest "
                               f"{'missing' if em is None else em.state!r}). Fix: run `ragtune embed` to the end first")
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
    from models.embedders import load_tokenizer
    from sharding.chunking import Chunker
    from sharding.corpus import read_documents_local

    spec, settings = _check_chunker(m)
    docs = read_documents_local(corpus if isinstance(corpus, str) else list(corpus or []), *fields)
    chunker = Chunker(load_tokenizer(spec.path), settings.size, settings.overlap, settings.prepend_title)
    chunks = chunk_documents(docs, chunker, settings.fingerprint(), 1)
    return _unique_chunks(chunks.select(DOC_COLUMNS)), docs.num_rows


def _embed_local(m: IndexManifest, rows: pa.Table, batch_size: int) -> np.ndarray:
    """Embed chunk rows in this process with the index's model, as the embed job's actors do: the model input
    is title + text, normalised as the index is (``models.embedders.QueryEncoder``: loaded once per process)."""
    from models.embedders import QueryEncoder
    from sharding.chunking import embed_input

    prepend = bool(m.chunker.get("prepend_title", True))
    inputs = [embed_input(ti, te, prepend) for ti, te in zip(rows["title"].to_pylist(), rows["text"].to_pylist(),
                                                              strict=True)]
    return QueryEncoder(m, batch_size=batch_size).encode(inputs)


def _embed_ray(m: IndexManifest, root: Location, corpus: str | list[str], fields: tuple[str, str, str],
               ids: np.ndarray, address: str | None) -> np.ndarray:
    """Embed through the embed job (Ray Data) into a staging folder under the index root, then take the
    vectors of ``ids``. The whole given corpus is embedded: this path is for large adds."""
    import shutil
    import uuid

    from configs.schema import EmbedJobConfig
    from jobs.embed import run as embed_run
    from sharding.embeddings import read_manifest as read_emb
    from sharding.embeddings import read_part_table, vectors_from_arrow

    stage = root.join("_staging", f"embed-{uuid.uuid4().hex[:8]}")
    c = m.chunker
    cfg = EmbedJobConfig.model_validate({
        "corpus": {"path": corpus, "text_field": fields[0], "id_field": fields[1], "title_field": fields[2]},
        "chunk": {"size": c["size"], "overlap": c["overlap"], "prepend_title": c["prepend_title"]},
        "embed": {"model": m.model["name"], "metric": m.metric},
        "output": {"path": stage.uri}, "cluster": {"address": address}})
    try:
        embed_run(cfg)
        em = read_emb(stage)
        assert em is not None
        if em.chunker.get("fingerprint") != c.get("fingerprint"):
            raise RagtuneError("the embed job chunked the new corpus differently from the index (chunker "
                               f"{em.chunker} vs {c}). Fix: rebuild the index with this ragtune")
        t = pa.concat_tables([read_part_table(stage, rec, ["chunk_id", "vector"]) for rec in em.parts.values()])
        pos = {cid: i for i, cid in enumerate(t["chunk_id"].to_pylist())}
        xb = vectors_from_arrow(t["vector"])
        return xb[[pos[int(i)] for i in ids]]
    finally:
        if stage.is_local:
            shutil.rmtree(stage.path, ignore_errors=True)


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

    def line(self) -> str:
        if not self.changed:
            return (f"nothing to add: {self.docs:,} docs read, all {self.docs_skipped:,} already in {self.path}/"
                    f"{self.version} with the same text; {self.seconds:.1f}s")
        return (f"added {self.docs_added:,} docs, updated {self.docs_updated:,} ({self.chunks_masked:,} old chunks "
                f"masked), skipped {self.docs_skipped:,} unchanged: {self.chunks_added:,} chunks embedded by "
                f"{self.embedded_by} in {self.embed_seconds:.1f}s; {self.ntotal:,} vectors; {self.seconds:.1f}s; "
                f"LATEST {self.parent} -> {self.version}")


def add(index_path: str, corpus: str | list[str] | None = None, embeddings: str | None = None, *,
        chunks: pa.Table | None = None, text_field: str | None = None, id_field: str | None = None,
        title_field: str | None = None, ray_above: int = ADD_RAY_ABOVE, batch_size: int = 64,
        keep_versions: int | None = None, address: str | None = None) -> AddSummary:
    """Add new and changed documents to the index at ``index_path`` as a new version.

    The new corpus is chunked with the index's chunker and model (its manifest); chunks of documents already
    present with the same chunks are skipped, those of new documents added, and a document whose chunks differ
    is updated (its old chunks masked, its new ones added). New chunks go to delta segments of shard
    ``chunk_id % shards``. Exactly one source gives the documents: ``corpus`` (files or URIs), ``embeddings`` (a
    folder by ``ragtune embed`` made with the index's model and chunker), or ``chunks`` (a table of chunk rows
    made by the caller: chunk_id, doc_id, chunk_index, title, text, metadata, n_tokens, and ``vector`` from the
    index's model).
    """
    from sharding.embeddings import vectors_from_arrow
    from sharding.freshness import (
        DOC_COLUMNS,
        assign_shards,
        by_segment,
        live_ids,
        new_segment,
        plan_add,
        read_stats,
        rows_of,
        set_tombstones,
        stats_of,
        write_delta,
        write_stats,
    )
    from sharding.search import shard_segments
    from sharding.versions import WriterLock

    t0 = time.perf_counter()
    if sum(x is not None for x in (corpus, embeddings, chunks)) != 1:
        raise RagtuneError("give the new documents as exactly one of --corpus (files) and --embeddings (a folder by "
                           "`ragtune embed`)")
    root = _root(index_path)
    with WriterLock(root, f"ragtune index add {corpus or embeddings or 'chunks'}"):
        base_dir, m = _latest(root)
        fields = _corpus_fields(m, text_field, id_field, title_field)
        if chunks is not None:
            missing = [c for c in (*DOC_COLUMNS, "vector") if c not in chunks.column_names]
            if missing:
                raise RagtuneError(f"chunks: columns {missing} are missing. Fix: give chunk_id, doc_id, chunk_index, "
                                   "title, text, metadata, n_tokens and vector")
            new, docs = _unique_chunks(chunks), len(set(chunks["doc_id"].to_pylist()))
        else:
            new, docs = _new_chunks(m, corpus, embeddings, fields)
        import pyarrow.compute as pc

        where = live_ids(base_dir, m)
        where = where.filter(pc.is_in(where["doc_id"], value_set=pa.array(sorted(set(new["doc_id"].to_pylist())),
                                                                             pa.string())))
        plan = plan_add(new, rows_of(base_dir, m, where))
        if plan.add.num_rows == 0 and plan.dead.num_rows == 0:
            return AddSummary(root.uri, m.version, m.version, False, docs, 0, 0, plan.docs_skipped, 0, 0, m.ntotal,
                              "-", 0.0, time.perf_counter() - t0)
        ids = plan.add["chunk_id"].to_numpy().astype(np.int64)
        t_embed = time.perf_counter()
        if "vector" in plan.add.column_names:
            xb, by = vectors_from_arrow(plan.add["vector"]), "--embeddings" if embeddings else "the caller"
        elif len(ids) > ray_above:
            assert corpus is not None
            xb, by = _embed_ray(m, root, corpus, fields, ids, address), "ray data (the embed job)"
        else:
            xb, by = _embed_local(m, plan.add, batch_size), "this process"
        embed_seconds = time.perf_counter() - t_embed
        if xb.shape[1:] != (m.dim,):
            raise RagtuneError(f"the new vectors have dimension {xb.shape[1:]} but the index {m.dim}. Fix: embed with "
                               f"the index's model {m.model.get('name')}")

        vdir, nm, trained = _new_version(root, base_dir, m)
        version = nm.version
        lexical = None
        if nm.lexical is not None:
            lparams = nm.lexical.params
            stats = read_stats(base_dir, m).minus(stats_of(plan.removed, lparams)).merge(stats_of(plan.add, lparams))
            lexical = (lparams, stats)
        target = assign_shards(ids, len(m.shards))
        rows = plan.add.select(DOC_COLUMNS)
        dead_new = {key: group for key, group in by_segment(plan.dead)}
        for n, rec in enumerate(nm.shards):
            dead = [g.dead for g in shard_segments(base_dir, m, n)]
            touched = False
            for pos in range(len(dead)):
                if (n, pos) in dead_new:
                    dead[pos] = np.union1d(dead[pos], dead_new[(n, pos)])
                    touched = True
            sel = target == n
            if sel.any():
                pos = len(rec.deltas)
                rec.deltas.append(write_delta(vdir, version, n, pos, new_segment(trained, ids[sel], xb[sel]),
                                              rows.filter(pa.array(sel)), lexical))
                dead.append(np.zeros(0, np.int64))
                touched = touched or rec.tombstones is not None
            if touched:
                set_tombstones(vdir, rec, n, dead)
        if lexical is not None and nm.lexical is not None:
            stats = lexical[1]
            nm.lexical.stats = write_stats(vdir, stats)
            nm.lexical.n_docs, nm.lexical.avg_len, nm.lexical.terms = stats.n_docs, stats.avg_len, len(stats.df)
        counts = {"docs_added": plan.docs_added, "docs_updated": plan.docs_updated,
                  "docs_skipped": plan.docs_skipped, "chunks_added": len(ids), "chunks_masked": plan.dead.num_rows}
        _finish(root, vdir, nm, m, "add", t0, counts)
        if nm.ntotal != m.ntotal + len(ids) - plan.dead.num_rows:  # never: each id lives in one segment
            log.warning("%s holds %d vectors, expected %d", version, nm.ntotal,
                        m.ntotal + len(ids) - plan.dead.num_rows)
    keep = _keep_versions(m, keep_versions)
    if keep:
        gc(index_path, keep=keep)
    return AddSummary(root.uri, version, m.version, True, docs, plan.docs_added, plan.docs_updated,
                      plan.docs_skipped, len(ids), plan.dead.num_rows, nm.ntotal, by, embed_seconds,
                      time.perf_counter() - t0)


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


def delete(index_path: str, doc_ids: list[str] | None = None, where: list[str] | None = None, *,
           keep_versions: int | None = None) -> DeleteSummary:
    """Delete documents (``doc_ids``, or every document whose chunks match ``where``, see
    ``sharding.filters.parse_where``) as a new version: their chunks are masked by tombstones in the segments
    that hold them, so no search mode, docstore lookup or evaluation returns them; compaction drops them."""
    import pyarrow.compute as pc

    from sharding.filters import matches, parse_where
    from sharding.freshness import (
        by_segment,
        live_ids,
        read_stats,
        rows_of,
        set_tombstones,
        stats_of,
    )
    from sharding.freshness import write_stats as write_lex_stats
    from sharding.manifest import carried_manifest
    from sharding.search import shard_segments
    from sharding.versions import WriterLock

    t0 = time.perf_counter()
    if bool(doc_ids) == bool(where):
        raise RagtuneError("say what to delete with exactly one of --doc-id ID [ID ...] and --where FILTER")
    cond = parse_where(where) if where else None  # a bad filter fails before the lock
    root = _root(index_path)
    with WriterLock(root, f"ragtune index delete {' '.join(doc_ids or where or [])[:80]}"):
        base_dir, m = _latest(root)
        if doc_ids:
            t = live_ids(base_dir, m)
            t = t.filter(pc.is_in(t["doc_id"], value_set=pa.array(sorted(set(doc_ids)), pa.string())))
            unknown = sorted(set(doc_ids) - set(t["doc_id"].to_pylist()))
            if unknown:
                raise RagtuneError(f"--doc-id: {len(unknown)} of {len(set(doc_ids))} doc ids are not in {root.uri}/"
                                   f"{m.version}: {unknown[:5]}. Fix: check the ids (`ragtune search` prints them); "
                                   "nothing was deleted")
        else:
            assert cond is not None
            t = live_ids(base_dir, m, ("chunk_id", "doc_id", "title", "metadata"))
            keep = [matches(r, cond) for r in t.select(["doc_id", "title", "metadata"]).to_pylist()]
            t = t.filter(pa.array(keep, pa.bool_()))
            if t.num_rows == 0:
                raise RagtuneError(f"--where {' '.join(where or [])!r} matches no chunk of {root.uri}/{m.version} "
                                   f"(fields: doc_id, title, or a metadata key). Fix: check the field names and "
                                   "values; nothing was deleted")
        version = next_version(root)
        vdir = root.join(version)
        nm = carried_manifest(m, version)
        new_dead = dict(by_segment(t.select(["chunk_id", "shard", "seg"])))
        for n in sorted({key[0] for key in new_dead}):
            dead = [g.dead for g in shard_segments(base_dir, m, n)]
            for pos in range(len(dead)):
                if (n, pos) in new_dead:
                    dead[pos] = np.union1d(dead[pos], new_dead[(n, pos)])
            set_tombstones(vdir, nm.shards[n], n, dead)
        if nm.lexical is not None:
            removed = rows_of(base_dir, m, t.select(["chunk_id", "shard", "seg"]), ["chunk_id", "title", "text"])
            stats = read_stats(base_dir, m).minus(stats_of(removed, nm.lexical.params))
            nm.lexical.stats = write_lex_stats(vdir, stats)
            nm.lexical.n_docs, nm.lexical.avg_len, nm.lexical.terms = stats.n_docs, stats.avg_len, len(stats.df)
        docs = len(set(t["doc_id"].to_pylist()))
        _finish(root, vdir, nm, m, "delete", t0, {"docs_deleted": docs, "chunks_deleted": t.num_rows})
    keep = _keep_versions(m, keep_versions)
    if keep:
        gc(index_path, keep=keep)
    return DeleteSummary(root.uri, version, m.version, docs, t.num_rows, nm.ntotal, time.perf_counter() - t0)


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
    from sharding.docstore import write_docstore
    from sharding.faiss_index import deserialize, read_index_file, write_index_file
    from sharding.freshness import (
        compaction_reason,
        exact_storage,
        fold_segments,
        live_ids,
        live_vectors,
        segment_files,
        segment_vectors,
        stats_of,
        write_lexical,
        write_stats,
    )
    from sharding.lexical import CorpusStats, lexical_delta_name, lexical_name
    from sharding.search import candidate_params, shard_segments
    from sharding.versions import WriterLock

    t0 = time.perf_counter()
    if not 0 < threshold:
        raise RagtuneError(f"--threshold {threshold}: must be positive, e.g. 0.1 (10% of a shard's base)")
    root = _root(index_path)
    with WriterLock(root, "ragtune index compact"):
        base_dir, m = _latest(root)
        reasons = {n: "--force" if force else compaction_reason(rec, threshold, max_deltas)
                   for n, rec in enumerate(m.shards)}
        ix_cfg = (m.config.get("index") or {})
        target = float(m.recall.get("target") or ix_cfg.get("target_recall") or 0.95)
        before = current_recall(base_dir, m) if check_recall and not force else None
        if before is not None and before < target:  # recall drifted: every shard, re-tuned
            reasons = {n: f"recall@{K} {before:.3f} < target {target}" for n in range(len(m.shards))}
        todo = {n: r for n, r in reasons.items() if r}
        if not todo:
            return CompactSummary(root.uri, m.version, m.version, False, 0, {}, 0, m.ntotal, m.search_params,
                                  None, None, time.perf_counter() - t0, before)
        vdir, nm, trained = _new_version(root, base_dir, m)
        version = nm.version
        live = live_ids(base_dir, m, ("chunk_id", "doc_id"))
        sample = deserialize(trained)  # an empty index of the same kind
        measure = candidate_params(sample) != [{}] and exact_storage(sample) and live.num_rows > 20
        k = min(K, live.num_rows - 1)
        qids = np.zeros(0, np.int64)
        if measure:  # held-out live vectors of the compacted shards, as the index job holds them out
            in_todo = np.isin(live["shard"].to_numpy(), list(todo))
            pool = live["chunk_id"].to_numpy()[in_todo]
            nq = min(int(ix_cfg.get("tune_queries") or 1000), max(1, live.num_rows // 10), len(pool))
            qids = np.sort(np.random.default_rng(int(ix_cfg.get("seed") or 0)).choice(pool, nq, replace=False))
        folded, held, dropped = {}, {}, 0
        for n in todo:
            rec = m.shards[n]
            segs = shard_segments(base_dir, m, n)
            shas = [rec.sha256] + [d.sha256 for d in rec.deltas]
            indexes = [read_index_file(base_dir.join(f), sha, 0) for (f, _, _), sha in zip(segment_files(rec), shas,
                                                                                           strict=True)]
            dropped += sum(len(g.dead) for g in segs)
            folded[n], held[n] = fold_segments(indexes, [g.dead for g in segs], trained,
                                               qids if measure else None)
            rows = live.filter(pa.array(live["shard"].to_numpy() == n))
            doc_rows = _live_rows(base_dir, m, n)
            dsha, dsize = write_docstore(doc_rows, vdir.join(docstore_name(n)))
            nm.shards[n] = ShardRecord(file=shard_name(n), ntotal=0, sha256="", bytes=0, docstore=docstore_name(n),
                                       docstore_sha256=dsha, docstore_bytes=dsize, pieces=[])
            assert doc_rows.num_rows == rows.num_rows
        recall_row, tuning_rows = None, []
        if measure and len(qids):
            recall_row, tuning_rows = _tune_compacted(base_dir, m, folded, held, qids, k, target, live_vectors,
                                                      segment_vectors)
            nm.search_params = recall_row.params
            nm.recall = {"k": k, "recall": recall_row.recall, "target": target, "reached": recall_row.recall >= target,
                         "queries": len(qids), "queries_from": "held-out database vectors (at compaction)",
                         "qps": recall_row.qps}
            nm.tuning = [{"params": r.params, "recall": r.recall, "qps": r.qps} for r in tuning_rows]
        for n in todo:
            index = folded[n]
            if held[n] is not None and len(held[n][0]):
                index.add_with_ids(held[n][1], held[n][0])  # the held-out rows go back in, as at build time
            sha, size = write_index_file(index, vdir.join(shard_name(n)))
            r = nm.shards[n]
            r.ntotal, r.sha256, r.bytes = int(index.ntotal), sha, size
        if nm.lexical is not None:  # every BM25 file again, with the statistics of the live chunks
            makedirs(vdir.join("lexical"))
            lparams = nm.lexical.params
            per_seg = {}
            for n, rec in enumerate(nm.shards):
                if n in todo:
                    per_seg[(n, 0)] = _live_rows(vdir, nm, n)
                else:
                    for pos in range(1 + len(rec.deltas)):
                        per_seg[(n, pos)] = _live_rows(base_dir, m, n, pos)
            stats = CorpusStats()
            for t in per_seg.values():
                stats = stats.merge(stats_of(t, lparams))
            for (n, pos), t in per_seg.items():
                if pos == 0:
                    nm.lexical.shards[n] = write_lexical(vdir, lexical_name(n), t, lparams, stats)
                else:
                    nm.shards[n].deltas[pos - 1].lexical = write_lexical(vdir, lexical_delta_name(n, pos - 1), t,
                                                                         lparams, stats)
            nm.lexical.stats = write_stats(vdir, stats)
            nm.lexical.n_docs, nm.lexical.avg_len, nm.lexical.terms = stats.n_docs, stats.avg_len, len(stats.df)
        counts = {"shards_compacted": len(todo), "vectors_dropped": dropped}
        _finish(root, vdir, nm, m, "compact", t0, counts)
        if nm.ntotal != m.ntotal:
            raise RagtuneError(f"compaction changed the live vectors ({m.ntotal} -> {nm.ntotal}); LATEST now names "
                               f"{version}: reopen {m.version} by its folder and report this")
    keep = _keep_versions(m, keep_versions)
    if keep:
        gc(index_path, keep=keep)
    return CompactSummary(root.uri, version, m.version, True, len(todo), {str(n): r for n, r in todo.items()},
                          dropped, nm.ntotal, nm.search_params, recall_row.recall if recall_row else None,
                          target if recall_row else None, time.perf_counter() - t0, before)


def current_recall(vloc: Location, m: IndexManifest, seed: int = 0) -> float | None:
    """Recall@10 of a version at its tuned setting, re-measured as the index job measured it: on the real
    queries it was tuned on (``recall.queries_from``, when that file is still there), else on held-out live
    vectors (masked from every segment while searched; for HNSW they still sit in the graph, which makes this
    optimistic), against exact search over the other live vectors. None for exact kinds and kinds that keep
    only codes (no exact vectors to measure against)."""
    from pathlib import Path

    from models.embedders import QueryEncoder
    from sharding.faiss_index import deserialize
    from sharding.freshness import exact_storage, live_vectors, trained_index
    from sharding.search import ShardedIndex, candidate_params, drop_self, exact_knn, merge_topk, recall_at_k

    trained, _ = trained_index(vloc, m)
    sample = deserialize(trained)
    if candidate_params(sample) == [{}] or not exact_storage(sample):
        return None
    vecs = [live_vectors(vloc, m, n) for n in range(len(m.shards))]
    ids = np.concatenate([v[0] for v in vecs])
    if len(ids) < 20:
        return None
    rng = np.random.default_rng(seed)
    n_queries = int((m.config.get("index") or {}).get("tune_queries") or 1000)
    qfile = str(m.recall.get("queries_from") or "")
    k = min(K, len(ids) - 1)
    if qfile and Path(qfile).is_file():
        texts = read_query_texts(qfile)
        texts = [texts[i] for i in np.sort(rng.choice(len(texts), min(n_queries, len(texts)), replace=False))]
        xq, qids = QueryEncoder(m, batch_size=64).encode(texts), np.full(len(texts), -1, np.int64)
    else:
        qids = np.sort(rng.choice(ids, min(n_queries, max(1, len(ids) // 10)), replace=False))
        order = np.argsort(ids)
        xq = np.concatenate([v[1] for v in vecs])[order][np.searchsorted(ids[order], qids)]
    true_D, true_I = np.zeros((len(xq), 0), np.float32), np.zeros((len(xq), 0), np.int64)
    for sid, sxb in vecs:
        keep = ~np.isin(sid, qids)
        D, I = exact_knn(xq, sxb[keep], k + 1, m.metric)
        true_D, true_I = merge_topk([true_D, D], [true_I, np.where(I >= 0, sid[keep][np.maximum(I, 0)], -1)], k + 1,
                                    m.metric)
    _, true_I = drop_self(true_D, true_I, qids, k)
    index = ShardedIndex.open(vloc.uri, verify=False, mmap=False)
    for seg in index.segments:  # the held-out vectors are masked too, as if they were not in the index
        seg.dead, seg._selector = np.union1d(seg.dead, qids[qids >= 0]), None
    D, I = index.search(xq, k + 1)
    _, I = drop_self(D, I, qids, k)
    return recall_at_k(I, true_I, k)


def _live_rows(vloc: Location, m: IndexManifest, n: int, pos: int | None = None) -> pa.Table:
    """The live docstore rows of shard ``n`` (every segment, or only segment ``pos``), sorted by chunk id."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from sharding.freshness import DOC_COLUMNS, segment_files
    from sharding.search import shard_segments

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


def _tune_compacted(base_dir: Location, m: IndexManifest, folded: dict[int, Any],
                    held: dict[int, tuple[np.ndarray, np.ndarray] | None], qids: np.ndarray, k: int, target: float,
                    live_vectors: Any, segment_vectors: Any) -> tuple[Any, list[Any]]:
    """Recall@k of the compacted version on held-out vectors, for each candidate setting, as the index job
    measures it: the held-out rows are out of the compacted shards while they are searched, the true
    neighbours are exact search over every other live vector, results are merged across shards."""
    from sharding.search import (
        Segment,
        ShardedIndex,
        TuneRow,
        candidate_params,
        drop_self,
        exact_knn,
        merge_topk,
        recall_at_k,
        shard_segments,
        tune,
    )

    xq = np.concatenate([h[1] for h in held.values() if h is not None and len(h[0])])
    hq = np.concatenate([h[0] for h in held.values() if h is not None and len(h[0])])
    order = np.argsort(hq)
    xq, hq = xq[order], hq[order]
    indexes, segments = [], []
    true_D, true_I = np.zeros((len(xq), 0), np.float32), np.zeros((len(xq), 0), np.int64)
    for n, rec in enumerate(m.shards):
        if n in folded:
            ids, xb = segment_vectors(folded[n])
            indexes.append(folded[n])
            segments.append(Segment(n, 0, np.zeros(0, np.int64)))
        else:
            ids, xb = live_vectors(base_dir, m, n)
            for (f, _, _), seg in zip([(rec.file, "", 0)] + [(d.file, "", 0) for d in rec.deltas],
                                      shard_segments(base_dir, m, n), strict=True):
                from sharding.faiss_index import read_index_file

                indexes.append(read_index_file(base_dir.join(f), None, 0))
                segments.append(seg)
        D, I = exact_knn(xq, xb, k + 1, m.metric)
        true_D, true_I = merge_topk([true_D, D], [true_I, np.where(I >= 0, ids[np.maximum(I, 0)], -1)], k + 1,
                                    m.metric)
    _, true_I = drop_self(true_D, true_I, hq, k)
    view = ShardedIndex(base_dir, m, indexes, segments=segments)
    rows = []
    for params in candidate_params(indexes[0]):
        view.set_params(params)
        t = time.perf_counter()
        D, I = view.search(xq, k + 1)
        seconds = time.perf_counter() - t
        _, I = drop_self(D, I, hq, k)
        rows.append(TuneRow(params, recall_at_k(I, true_I, k), len(xq) / seconds if seconds > 0 else 0.0))
    chosen, reached = tune(rows, target)
    if not reached:
        log.warning("after compaction no setting reached recall@%d >= %s (best %.3f at %s)", k, target, chosen.recall,
                    chosen.label())
    for index in folded.values():  # leave the compacted shards with the chosen setting applied
        from sharding.search import apply_params

        apply_params(index, chosen.params)
    return chosen, rows


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
    from sharding.versions import GRACE_S, gc_versions

    t0 = time.perf_counter()
    root = _root(index_path)
    plan = gc_versions(root, keep, GRACE_S if grace_s is None else grace_s, dry_run)
    return GcSummary(root.uri, plan.keep, plan.delete, plan.incomplete, len(plan.files), dry_run,
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
    from sharding.versions import read_leases, version_states

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
    return HistorySummary(root.uri, latest, rows)


def _state(v: str, states: dict[str, str], latest: str, leased: dict[str, int]) -> str:
    state = {"complete": "LATEST" if v == latest else "complete", "collected": "collected (shared files kept)",
             "unfinished": "unfinished (no manifest)",
             "abandoned": "abandoned (written, LATEST never named it)"}.get(states.get(v, ""), "deleted by gc")
    return state + (f", {leased[v]} lease(s)" if v in leased else "")


# --- `ragtune index add|delete|compact|gc|history` ----------------------------------------------------------

def ops_main(argv: list[str]) -> int:
    """``ragtune index <op> ...``: run one operation, print its line and (writes) the JSON summary."""
    import atexit
    import dataclasses
    import gc as pygc

    args = index_ops_parser().parse_args(argv)
    # The process ends after the operation: at exit, the garbage collector's last walk over the ~1M objects that
    # torch and transformers leave behind took 1 s of a 9 s add here. Frozen objects are skipped (their memory
    # goes back with the process; atexit handlers and finalizers still run).
    atexit.unregister(pygc.freeze)
    atexit.register(pygc.freeze)
    if args.op == "add":
        summary: Any = add(args.index, corpus=args.corpus, embeddings=args.embeddings, text_field=args.text_field,
                           id_field=args.id_field, title_field=args.title_field, ray_above=args.ray_above,
                           batch_size=args.batch_size, keep_versions=args.gc_keep, address=args.address)
    elif args.op == "delete":
        summary = delete(args.index, args.doc_id, args.where, keep_versions=args.gc_keep)
    elif args.op == "compact":
        summary = compact(args.index, force=args.force, threshold=args.threshold, max_deltas=args.max_deltas,
                          check_recall=args.check_recall, keep_versions=args.gc_keep)
    elif args.op == "gc":
        summary = gc(args.index, keep=args.keep, grace_s=args.grace, dry_run=args.dry_run)
    else:
        print(history(args.index).line())
        return 0
    print(summary.line())
    print(json.dumps(dataclasses.asdict(summary)))  # the last line: machine-readable
    return 0

if __name__ == "__main__":  # python -m jobs.freshness add -i INDEX ... (what `ray job submit` calls)
    sys.exit(guarded(lambda: ops_main(sys.argv[1:])))
