"""`ragtune embed`: corpus -> token-aware chunks -> embedding parts (Parquet) on Ray Data.

Laptop (embedded local Ray, no cluster needed)::

    ragtune embed -c configs/embed/sample.yaml
    ragtune embed -c configs/embed/sample.yaml embed.batch_size=128 output.path=runs/other

Cluster::

    ray job submit --working-dir . -- python -m jobs.embed --config configs/embed/sample.yaml

The flow, top to bottom:
1. check everything that can be checked before work starts (model, chunk size, corpus files, output folder);
2. join or start Ray and plan the embedding actors from the cluster's CPUs and GPUs;
3. plan the parts where the input is read (``sharding.inputs``: byte ranges of JSON Lines, runs of Parquet row
   groups, whole small files; several parts per actor) and fix that plan in ``_manifest.json``;
4. embed each unfinished part in a Ray Data actor pool (the model loads once per actor; GPUs and fp16 when
   present): an actor reads its part's slices, chunks them (every chunk gets a stable id), embeds and writes the
   part atomically, then a record of it in ``_parts/`` (O(1) per part), and takes the next part;
5. keep every chunk id in one part (a document listed twice), fold the records into the manifest, mark it done
   and print a summary.

A rerun of the same config skips the parts already recorded without reading their input, so a killed run resumes
where it stopped; a rerun with a different model, chunker or corpus into the same folder is refused unless
``--overwrite`` is given.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cluster.placement import EmbedActorPlan, plan_embed_actors
from cluster.runtime import alive_nodes, init_ray
from configs.errors import RagtuneError
from configs.schema import EmbedJobConfig
from jobs.commands import job_main
from jobs.progress import Rate, ensure_logging
from models.embedders import EmbedderSpec, load_sentence_transformer, load_tokenizer, resolve_embedder
from models.hardware import resolve_device
from sharding.choice import human_bytes
from sharding.chunking import Chunker, ChunkerSettings, count_special_tokens
from sharding.corpus import Corpus, list_corpus, preflight
from sharding.embeddings import (
    MANIFEST,
    PARTS_DIR,
    EmbeddingManifest,
    IdClash,
    PartCounts,
    PartRecord,
    check_part_dims,
    chunk_documents,
    drop_ids,
    id_clash,
    part_name,
    part_table,
    prepare_part,
    read_manifest,
    read_part_records,
    recover_part,
    repeated_ids,
    rows_of,
    write_manifest,
    write_part,
    write_part_record,
)
from sharding.inputs import PartInput, plan_parts, read_part_documents, target_part_bytes
from sharding.storage import TMP_MARK, Location, delete_dir_if_empty, delete_file, exists, list_dir, makedirs, resolve

log = logging.getLogger("ragtune.embed")

_PROGRESS_EVERY_S = 15.0


# --- 1. checks before any work ----------------------------------------------------------------------------------

@dataclass
class Plan:
    """What preflight found: the resolved model, chunker, corpus files and output folder."""

    cfg: EmbedJobConfig
    spec: EmbedderSpec
    settings: ChunkerSettings
    corpus: Corpus
    out: Location
    previous: EmbeddingManifest | None
    corpus_rows: int | None


def check(cfg: EmbedJobConfig) -> Plan:
    """Everything that can fail before work starts, without Ray or torch. Raises RagtuneError."""
    spec = resolve_embedder(cfg.embed.model)
    specials = count_special_tokens(load_tokenizer(spec.path))
    max_size = spec.max_seq_length - specials
    size = cfg.chunk.size if cfg.chunk.size is not None else max_size
    if size > max_size:
        raise RagtuneError(
            f"chunk.size = {size} is larger than {cfg.embed.model} takes: {spec.max_seq_length} tokens "
            f"including {specials} special ones. Fix: set chunk.size <= {max_size} (or null for the maximum)"
        )
    if cfg.chunk.overlap >= size:
        raise RagtuneError(f"chunk.overlap = {cfg.chunk.overlap} must be smaller than the chunk size {size}. "
                           f"Fix: set chunk.overlap below {size}")
    settings = ChunkerSettings(size=size, overlap=cfg.chunk.overlap, prepend_title=cfg.chunk.prepend_title,
                               tokenizer=spec.revision)
    corpus = list_corpus(cfg.corpus.path)
    out = resolve(cfg.output.path)
    previous = read_manifest(out)
    resuming = (previous is not None and previous.inputs and not cfg.output.overwrite
                and previous.corpus.get("fingerprint") == corpus.fingerprint())
    # a resume reads no input it has finished: the first run checked these files, unchanged since (size, mtime)
    rows = None if resuming else preflight(corpus, cfg.corpus.text_field, cfg.corpus.id_field)
    if previous is None and not cfg.output.overwrite:
        strays = [f.base_name for f in list_dir(out) if f.base_name.startswith("part-")]
        if strays:
            raise RagtuneError(
                f"output.path {out.uri} holds {len(strays)} part files but no {MANIFEST}: they were not made "
                "by ragtune embed, or their manifest was lost. Fix: choose another output.path or pass "
                "--overwrite to replace them"
            )
    if previous is not None and not cfg.output.overwrite:
        diffs = previous.differences(_new_manifest(cfg, spec, settings, corpus, num_parts=previous.num_parts))
        if diffs:
            raise RagtuneError(
                f"output.path {out.uri} holds embeddings made differently: " + "; ".join(diffs) + ". Fix: "
                "choose another output.path, or pass --overwrite to delete them and embed again "
                "(for new documents in an existing index, use `ragtune index add`)"
            )
        if not previous.inputs and not (  # a finished one is still read as it is
                previous.state == "done" and all(exists(out.join(r.file)) for r in previous.parts.values())):
            raise RagtuneError(
                f"output.path {out.uri} holds embeddings of an earlier ragtune ({previous.state}, parts chosen by a "
                "hash of the text) that are not complete, and cannot be resumed or repaired by input. Fix: pass "
                "--overwrite to embed again"
            )
    return Plan(cfg, spec, settings, corpus, out, previous, rows)


def _new_manifest(cfg: EmbedJobConfig, spec: EmbedderSpec, settings: ChunkerSettings, corpus: Corpus,
                  num_parts: int) -> EmbeddingManifest:
    paths = [cfg.corpus.path] if isinstance(cfg.corpus.path, str) else cfg.corpus.path
    return EmbeddingManifest(
        model=spec.to_dict(), normalize=cfg.embed.normalize, metric=cfg.embed.metric,
        chunker=settings.to_dict(), num_parts=num_parts, config=cfg.model_dump(mode="json"),
        corpus={"paths": paths, "fingerprint": corpus.fingerprint(), "files": len(corpus.files),
                "bytes": corpus.total_bytes},
    )


# --- 4. read, chunk and embed parts (Ray Data actor pool) --------------------------------------------------------

class PartEmbedder:
    """One per actor: loads the model and tokenizer once, then turns whole parts into part files: reads the part's
    slices of the corpus, chunks them, embeds the chunks and writes the part and its record."""

    def __init__(self, spec: dict[str, Any], device: str, fp16: bool, threads: int, batch_size: int,
                 normalize: bool, settings: dict[str, Any], fields: dict[str, str], corpus_fs: Any, out_uri: str,
                 provenance: dict[str, str]):
        import ray
        import torch

        ensure_logging()
        torch.set_num_threads(threads)
        self.device = resolve_device("gpu" if device == "cuda" else "cpu")
        spec_ = EmbedderSpec(**spec)
        self.model = load_sentence_transformer(spec_, str(self.device), fp16)
        self.chunker = Chunker(load_tokenizer(spec_.path), settings["size"], settings["overlap"],
                               settings["prepend_title"])
        self.fingerprint = settings["fingerprint"]
        self.batch_size = batch_size
        self.normalize = normalize
        self.fields = fields
        self.fs = corpus_fs
        self.out = resolve(out_uri)
        self.provenance = provenance
        self.worker = ray.get_runtime_context().get_actor_id() or "driver"

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = [self.embed_part(PartInput.model_validate_json(s)) for s in batch["input"].to_pylist()]
        return pa.table({"part": [r[0] for r in rows], "record": [r[1] for r in rows],
                         "clash": [r[2] for r in rows]})

    def embed_part(self, part: PartInput) -> tuple[int, str, str]:
        """(part, its record as JSON, "") or (part, "", the message) when a document id names two texts."""
        t0 = time.perf_counter()
        try:
            docs = pa.concat_tables(list(read_part_documents(self.fs, part, **self.fields)))
            chunks = chunk_documents(docs, self.chunker, self.fingerprint, part=part.part)
            real = int(np.count_nonzero(chunks["chunk_index"].to_numpy() >= 0))
            counts = PartCounts(docs=docs.num_rows, empty_docs=chunks.num_rows - real)
            try:
                rows, inputs, inverse = prepare_part(chunks, self.chunker.prepend_title)
            except IdClash as e:
                return part.part, "", e.message
            counts.repeated_rows = real - rows.num_rows
            if rows.num_rows:
                xb = self._encode(inputs, part.part)[inverse]
                record = write_part(part_table(rows, xb, self.provenance), self.out, part.part,
                                    embedded=len(inputs), inputs=part.fingerprint(), counts=counts)
            else:  # only empty documents: nothing to write, but the input is done
                record = PartRecord(file="", rows=0, embedded=0, sha256="", bytes=0, inputs=part.fingerprint(),
                                    **counts.model_dump())
        except RagtuneError:
            raise
        except Exception as e:
            raise RagtuneError(f"embedding {part_name(part.part)} failed: {type(e).__name__}: {e}") from e
        record.seconds = time.perf_counter() - t0
        record.worker = self.worker
        write_part_record(self.out, part.part, record)
        return part.part, record.model_dump_json(), ""

    def _encode(self, texts: list[str], part: int) -> np.ndarray:
        rate, last = Rate(len(texts), "chunks"), time.perf_counter()
        step = max(self.batch_size * 16, 1024)  # sentence-transformers sorts each call by length
        out = []
        for i in range(0, len(texts), step):
            out.append(self.model.encode(texts[i:i + step], batch_size=self.batch_size, convert_to_numpy=True,
                                         normalize_embeddings=self.normalize, show_progress_bar=False))
            rate.add(len(texts[i:i + step]))
            if time.perf_counter() - last > _PROGRESS_EVERY_S and rate.done < rate.total:
                rate.log(log, f"{part_name(part)}: ")
                last = time.perf_counter()
        if not out:
            return np.zeros((0, self.model.get_embedding_dimension()), dtype=np.float32)
        return np.concatenate(out).astype(np.float32, copy=False)


# --- the job ------------------------------------------------------------------------------------------------------

@dataclass
class EmbedSummary:
    output: str
    model: str
    dim: int | None
    docs: int
    empty_docs: int
    chunks: int
    duplicates_skipped: int  # chunks whose text was already embedded (identical chunks are embedded once)
    repeated_rows: int
    parts: int
    parts_written: int
    parts_skipped: int
    actors: int
    seconds: float
    rows_per_s: float  # chunks written per second of the embedding stage
    parts_per_actor: list[int] = field(default_factory=list)  # parts written by each actor of this run, most first

    def line(self) -> str:
        return (f"embedded {self.docs:,} docs -> {self.chunks:,} chunks ({self.duplicates_skipped:,} duplicates "
                f"embedded once, {self.empty_docs:,} empty docs) into {self.parts} parts "
                f"({self.parts_written} written, {self.parts_skipped} already done) at {self.output}; "
                f"{self.seconds:.1f}s, {self.rows_per_s:,.1f} chunks/s"
                + (f"; parts per actor {'/'.join(map(str, self.parts_per_actor))}" if self.parts_per_actor else ""))


def run(cfg: EmbedJobConfig) -> EmbedSummary:
    """Embed the corpus as ``cfg`` says: check, plan the actors, open the manifest (which fixes each part's input
    on the first run), embed the parts not done yet, keep each chunk id in one part, and mark the manifest done.
    Returns the summary, also kept in the manifest."""
    t_start = time.perf_counter()
    plan = check(cfg)
    finished = finished_summary(plan)
    if finished is not None:
        log.info("%s is complete for this config: nothing to do", plan.out.shown)
        finished.seconds = time.perf_counter() - t_start
        return finished

    init_ray(cfg.cluster)
    actors = plan_embed_actors(alive_nodes(), device=cfg.embed.device, actors=cfg.embed.actors,
                               threads=cfg.embed.threads_per_actor, fp16=cfg.embed.fp16,
                               batch_size=cfg.embed.batch_size)
    log.info("model %s (%s, max %d tokens); chunks of %d tokens, overlap %d; %s", plan.spec.name,
             plan.spec.revision, plan.spec.max_seq_length, plan.settings.size, plan.settings.overlap,
             actors.reason)
    manifest = open_manifest(plan, actors.actors)
    provenance = {"model": plan.spec.name, "model_revision": plan.spec.revision,
                  "chunker": plan.settings.fingerprint()}
    done = finished_parts(plan.out, manifest, provenance)
    pending = [p for p in manifest.inputs if p.part not in done]
    log.info("%d parts of about %s of input each: %d already done, %d to embed", manifest.num_parts,
             human_bytes(max((p.bytes for p in manifest.inputs), default=0)), len(done), len(pending))

    t_embed = time.perf_counter()
    written = embed_parts(plan, actors, pending, provenance)
    embed_seconds = time.perf_counter() - t_embed
    records = finished_parts(plan.out, manifest, provenance)
    records = keep_each_id_once(plan.out, records)
    return finish_manifest(plan, manifest, records, done=set(done), pending=[p.part for p in pending],
                           written=written, actors=min(actors.actors, max(len(pending), 1)), t_start=t_start,
                           embed_seconds=embed_seconds)


def finished_summary(plan: Plan) -> EmbedSummary | None:
    """The summary of a finished run of this config whose parts are all still there, else None (work to do)."""
    prev = plan.previous
    if (prev is None or prev.state != "done" or plan.cfg.output.overwrite or not prev.stats
            or not all(exists(plan.out.join(rec.file)) for rec in prev.parts.values())):
        return None
    return EmbedSummary(**{**prev.stats, "parts_written": 0, "parts_skipped": len(prev.parts)})


def open_manifest(plan: Plan, actors: int) -> EmbeddingManifest:
    """The manifest to fill: the one already there (a resume) or a new one whose parts' inputs are planned here
    from file sizes and Parquet footers (``--overwrite`` deletes the old outputs first). The parts are fixed by
    the first run. Temporaries of a killed run are removed."""
    cfg, out = plan.cfg, plan.out
    makedirs(out)
    if cfg.output.overwrite:
        _delete_outputs(out)
        plan.previous = None
    _delete_temporaries(out)  # of a run that was killed while writing
    if plan.previous is not None:
        manifest = plan.previous
        manifest.state = "running"
        manifest.config = cfg.model_dump(mode="json")
        write_manifest(out, manifest)
        return manifest
    target = target_part_bytes(plan.corpus.total_bytes, part_size_mb=cfg.output.part_size_mb, actors=actors,
                               num_parts=cfg.output.num_parts)
    inputs = plan_parts(plan.corpus, target)
    manifest = _new_manifest(cfg, plan.spec, plan.settings, plan.corpus, num_parts=len(inputs))
    manifest.inputs = inputs
    write_manifest(out, manifest)  # the plan is fixed from here on: a resume embeds exactly these parts
    return manifest


def finished_parts(out: Location, manifest: EmbeddingManifest, provenance: dict[str, str]) -> dict[int, PartRecord]:
    """The parts already done, found without reading any input: a record in ``_parts/`` made from this part's
    input whose file is there, or a part file that was written but not recorded (its actor died in between),
    recognised by its footer (same model, chunker and input) and recorded now."""
    records = read_part_records(out)
    names = {f.base_name for f in list_dir(out)}
    done: dict[int, PartRecord] = {}
    for p in manifest.inputs:
        fp = p.fingerprint()
        rec = records.get(p.part)
        if rec is not None and rec.inputs == fp and (rec.rows == 0 or rec.file in names):
            done[p.part] = rec
        elif part_name(p.part) in names:
            found = recover_part(out, p.part, provenance, inputs=fp)
            if found is not None:
                write_part_record(out, p.part, found)
                done[p.part] = found
    return done


def embed_parts(plan: Plan, actors: EmbedActorPlan, pending: list[PartInput], provenance: dict[str, str]) -> int:
    """Embed the ``pending`` parts in an actor pool, each actor reading, chunking, embedding and writing whole
    parts, one at a time: an actor that is done takes the next part, so no actor idles while parts remain. The
    largest parts go first. Returns the number of parts written."""
    import ray.data

    if not pending:
        return 0
    cfg = plan.cfg
    order = sorted(pending, key=lambda p: -p.bytes)
    rate = Rate(sum(p.bytes for p in order) // 1024, "KiB of input", stage="embed")
    written = chunks = 0
    items = [{"input": p.model_dump_json()} for p in order]
    results = (ray.data.from_items(items, override_num_blocks=len(items))
               .map_batches(PartEmbedder, batch_size=1, batch_format="pyarrow",
                            compute=ray.data.ActorPoolStrategy(size=min(actors.actors, len(order)),
                                                               max_tasks_in_flight_per_actor=1),
                            num_cpus=actors.num_cpus, num_gpus=actors.num_gpus,
                            fn_constructor_kwargs={
                                "spec": plan.spec.to_dict(), "device": actors.device, "fp16": actors.fp16,
                                "threads": actors.threads, "batch_size": actors.batch_size,
                                "normalize": cfg.embed.normalize, "settings": plan.settings.to_dict(),
                                "fields": {"text_field": cfg.corpus.text_field, "id_field": cfg.corpus.id_field,
                                           "title_field": cfg.corpus.title_field},
                                "corpus_fs": plan.corpus.fs, "out_uri": cfg.output.path,
                                "provenance": provenance}))
    by_part = {p.part: p for p in order}
    rate.log(log, f"{len(order)} parts to embed; ")
    for batch in results.iter_batches(batch_size=None, prefetch_batches=0, batch_format="pyarrow"):
        for row in cast(pa.Table, batch).to_pylist():
            if row["clash"]:
                raise RagtuneError(f"{part_name(row['part'])}: {row['clash']}", param="corpus.id_field")
            record = PartRecord.model_validate_json(row["record"])
            written, chunks = written + 1, chunks + record.rows
            rate.add(by_part[row["part"]].bytes // 1024)
            rate.log(log, f"{part_name(row['part'])} ({record.rows:,} chunks, {record.embedded:,} embedded, "
                          f"{record.seconds:.1f}s) written; {written}/{len(order)} parts, ",
                     figure=f"{chunks / rate.elapsed:,.1f} chunks/s")
    return written


IDS_PER_TASK = 4_000_000  # chunk ids one repeat-finding task holds (32 MB), whatever the corpus size


def keep_each_id_once(out: Location, records: dict[int, PartRecord]) -> dict[int, PartRecord]:
    """A document listed twice may land in two parts: keep its chunks in the first part only (the copies are the
    same text) or refuse (different texts under one id). The id space is split into ranges of about
    ``IDS_PER_TASK`` ids, each searched by a Ray task that reads only the chunk_id column of the parts (row groups
    outside its range are skipped), so no process holds every id."""
    import ray

    full = {f"{i:05d}": rec for i, rec in records.items() if rec.rows > 0}
    if len(full) < 2:
        return records
    total = sum(rec.rows for rec in full.values())
    n = max(1, -(-total // IDS_PER_TASK))
    bounds = [(2**63 - 1) * i // n for i in range(n + 1)]
    bounds[-1] = 2**63 - 1
    task = ray.remote(repeated_ids).options(num_cpus=1, memory=max(64 * 2**20, 3 * 8 * (total // n)))
    found: dict[int, list[str]] = {}
    for part in ray.get([task.remote(out, full, lo, hi) for lo, hi in zip(bounds, bounds[1:], strict=False)]):
        found.update(part)
    if not found:
        return records
    by_part: dict[str, list[int]] = {}
    for cid, keys in found.items():
        for k in keys:
            by_part.setdefault(k, []).append(cid)
    copies = pa.concat_tables([rows_of(out, full[k], ids, ["chunk_id", "doc_id", "title", "text"])
                               for k, ids in by_part.items()])
    every = pc.CountOptions(mode="all")  # a null title differs from any title
    distinct = copies.group_by("chunk_id").aggregate([("text", "count_distinct", every),
                                                       ("title", "count_distinct", every)])
    clash = distinct.filter(pc.or_(pc.greater(distinct["text_count_distinct"], 1),
                                   pc.greater(distinct["title_count_distinct"], 1)))
    if clash.num_rows:
        bad = set(clash["chunk_id"].to_pylist())
        docs = sorted({d for c, d in zip(copies["chunk_id"].to_pylist(), copies["doc_id"].to_pylist(), strict=True)
                       if c in bad})[:5]
        raise id_clash(docs, clash.num_rows)
    drop: dict[str, list[int]] = {}
    for cid, keys in found.items():
        for k in keys[1:]:
            drop.setdefault(k, []).append(cid)
    log.info("%d chunk ids were in more than one part (documents listed twice): kept in the first, dropped from "
             "%d parts", len(found), len(drop))
    out_records = dict(records)
    for k, ids in drop.items():
        new = drop_ids(out, int(k), full[k], ids)
        write_part_record(out, int(k), new)
        out_records[int(k)] = new
    return out_records


def finish_manifest(plan: Plan, manifest: EmbeddingManifest, records: dict[int, PartRecord], *, done: set[int],
                    pending: list[int], written: int, actors: int, t_start: float,
                    embed_seconds: float) -> EmbedSummary:
    """Check that every part is done, fold the part records into the manifest (once, at the end) and mark it done
    with the run's summary (its ``seconds`` counted from ``t_start``, a ``time.perf_counter()``)."""
    out = plan.out
    missing = [p.part for p in manifest.inputs if p.part not in records]
    if missing:
        raise RagtuneError(f"parts {missing[:10]} were not written; the manifest stays 'running'. "
                           "Fix: rerun the same command to finish them")
    chunks = sum(r.rows for r in records.values())
    docs = sum(r.docs for r in records.values())
    if chunks == 0:
        raise RagtuneError(f"the corpus has {docs} documents and all of them are empty (no text in "
                           f"`{plan.cfg.corpus.text_field}`). Fix: check corpus.text_field",
                           param="corpus.text_field")
    manifest.parts = {f"{i:05d}": rec for i, rec in sorted(records.items()) if rec.rows > 0}
    if manifest.dim is None:
        manifest.dim = _dim_of(out, next(iter(manifest.parts.values())))
    check_part_dims(out, manifest)  # never marked done with parts of another model among them
    _delete_temporaries(out)  # of an actor lost with its node while writing (its part was embedded again)
    embedded = sum(min(r.embedded, r.rows) for r in records.values())
    summary = EmbedSummary(
        output=out.shown, model=plan.spec.name, dim=manifest.dim, docs=docs,
        empty_docs=sum(r.empty_docs for r in records.values()), chunks=chunks,
        duplicates_skipped=chunks - embedded, repeated_rows=sum(r.repeated_rows for r in records.values()),
        parts=len(manifest.parts), parts_written=written, parts_skipped=len(done), actors=actors,
        seconds=time.perf_counter() - t_start,
        rows_per_s=sum(records[p].rows for p in pending) / embed_seconds if pending else 0.0,
        parts_per_actor=sorted(Counter(records[p].worker for p in pending).values(), reverse=True),
    )
    manifest.state = "done"
    manifest.stats = asdict(summary)
    write_manifest(out, manifest)
    for f in list_dir(out.join(PARTS_DIR)):  # folded into the manifest
        delete_file(out.join(f"{PARTS_DIR}/{f.base_name}"))
    delete_dir_if_empty(out.join(PARTS_DIR))
    return summary


def _dim_of(out: Location, record: PartRecord) -> int:
    import pyarrow.parquet as pq

    schema = pq.read_schema(out.join(record.file).path, filesystem=out.fs)
    return schema.field("vector").type.list_size


def _delete_temporaries(out: Location) -> None:
    """Remove the temporary files of part writers that died before their rename."""
    for folder in ("", PARTS_DIR):
        for f in list_dir(out.join(folder) if folder else out):
            if TMP_MARK in f.base_name:
                delete_file(out.join(f"{folder}/{f.base_name}" if folder else f.base_name))


def _delete_outputs(out: Location) -> None:
    """Remove what ragtune embed writes (parts, their records, manifest, temporaries) and nothing else."""
    for f in list_dir(out.join(PARTS_DIR)):
        delete_file(out.join(f"{PARTS_DIR}/{f.base_name}"))
    for f in list_dir(out):
        if f.base_name == MANIFEST or (f.base_name.startswith("part-") and ".parquet" in f.base_name):
            delete_file(out.join(f.base_name))


if __name__ == "__main__":  # python -m jobs.embed --config FILE [overrides] (what `ray job submit` calls)
    job_main("embed", run)
