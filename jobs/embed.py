"""`ragtune embed`: corpus -> token-aware chunks -> embedding parts (Parquet) on Ray Data.

Laptop (embedded local Ray, no cluster needed)::

    ragtune embed -c configs/embed/sample.yaml
    ragtune embed -c configs/embed/sample.yaml embed.batch_size=128 output.path=runs/other

Cluster::

    ray job submit --working-dir . -- python -m jobs.embed --config configs/embed/sample.yaml

The flow, top to bottom:
1. check everything that can be checked before work starts (model, chunk size, corpus files, output folder);
2. join or start Ray and plan the embedding actors from the cluster's CPUs and GPUs;
3. read and chunk the corpus with Ray Data tasks; every chunk gets a stable id and a part chosen by a hash of
   its text, so identical chunks meet in one part and the parts are the same on every run;
4. embed each unfinished part in an actor pool (the model loads once per actor; GPUs and fp16 when present),
   each actor writing its part atomically; the driver records each part in ``_manifest.json`` as it lands;
5. mark the manifest done and print a summary.

A rerun of the same config skips the parts already recorded, so a killed run resumes where it stopped; a rerun
with a different model, chunker or corpus into the same folder is refused unless ``--overwrite`` is given.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from cluster.placement import EmbedActorPlan, default_num_parts, plan_embed_actors
from cluster.runtime import alive_nodes, init_ray
from configs.errors import RagtuneError
from configs.schema import EmbedJobConfig
from jobs.commands import job_main
from jobs.progress import Rate, ensure_logging
from models.embedders import EmbedderSpec, load_sentence_transformer, load_tokenizer, resolve_embedder
from models.hardware import resolve_device
from sharding.chunking import Chunker, ChunkerSettings, count_special_tokens
from sharding.corpus import DOC_SCHEMA, Corpus, list_corpus, preflight, text_file_document, to_documents
from sharding.embeddings import (
    MANIFEST,
    EmbeddingManifest,
    PartRecord,
    chunk_documents,
    part_name,
    part_table,
    prepare_part,
    read_manifest,
    recover_part,
    write_manifest,
    write_part,
)
from sharding.storage import TMP_MARK, Location, delete_file, exists, list_dir, makedirs, resolve

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
    rows = preflight(corpus, cfg.corpus.text_field)
    out = resolve(cfg.output.path)
    previous = read_manifest(out)
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


# --- 3. read and chunk (Ray Data tasks) -------------------------------------------------------------------------

def _docs_from_records(batch: pa.Table, text_field: str, id_field: str, title_field: str) -> pa.Table:
    return to_documents(batch, text_field, id_field, title_field)


def _docs_from_text_files(batch: pa.Table, rel_of: dict[str, str]) -> pa.Table:
    rows = [text_file_document(rel_of[p], b) for p, b in zip(batch["path"].to_pylist(),
                                                              batch["bytes"].to_pylist(), strict=True)]
    return pa.Table.from_pylist(rows, schema=DOC_SCHEMA)


def _chunk_batch(docs: pa.Table, tokenizer_path: str, settings: dict[str, Any], num_parts: int) -> pa.Table:
    chunker = Chunker(load_tokenizer(tokenizer_path), settings["size"], settings["overlap"],
                      settings["prepend_title"])
    return chunk_documents(docs, chunker, settings["fingerprint"], num_parts)


def read_documents(corpus: Corpus, cfg: EmbedJobConfig):
    """One Ray Dataset of documents (corpus.DOC_SCHEMA) from every file of the corpus."""
    import ray.data

    fields = {"text_field": cfg.corpus.text_field, "id_field": cfg.corpus.id_field,
              "title_field": cfg.corpus.title_field}
    from_records = functools.partial(_docs_from_records, **fields)
    parts = []
    if jsonl := corpus.of_kind("jsonl"):
        parts.append(ray.data.read_json([f.path for f in jsonl], filesystem=corpus.fs, file_extensions=None)
                     .map_batches(from_records, batch_format="pyarrow"))
    if parquet := corpus.of_kind("parquet"):
        parts.append(ray.data.read_parquet([f.path for f in parquet], filesystem=corpus.fs, file_extensions=None)
                     .map_batches(from_records, batch_format="pyarrow"))
    if text := corpus.of_kind("text"):
        rel_of = {f.path: f.rel for f in text}
        parts.append(ray.data.read_binary_files([f.path for f in text], filesystem=corpus.fs, include_paths=True)
                     .map_batches(functools.partial(_docs_from_text_files, rel_of=rel_of), batch_format="pyarrow"))
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


@dataclass
class ChunkStats:
    docs: int
    empty_docs: int
    chunks: int  # unique (doc, chunk) rows
    repeated_rows: int  # rows dropped because the same document was listed more than once
    unique_inputs: int  # distinct texts to embed
    rows_per_part: np.ndarray


def chunk_stats(chunks, num_parts: int) -> ChunkStats:
    """Count documents and chunks, and refuse ids that name two different texts (before any embedding)."""
    import ray

    cols = chunks.select_columns(["chunk_id", "chunk_index", "part", "key"]).to_arrow_refs()
    t = pa.concat_tables(ray.get(cols))
    cid, idx, part, key = (t[c].to_numpy() for c in ("chunk_id", "chunk_index", "part", "key"))
    docs = int(np.count_nonzero(idx <= 0))
    empty = int(np.count_nonzero(idx < 0))
    real = idx >= 0
    cid, part, key = cid[real], part[real], key[real]
    order = np.lexsort((key, cid))
    cid, part, key = cid[order], part[order], key[order]
    same_id = np.zeros(len(cid), dtype=bool)
    same_id[1:] = cid[1:] == cid[:-1]
    clash = same_id.copy()
    clash[1:] &= key[1:] != key[:-1]
    if clash.any():
        bad = np.unique(cid[clash])[:5].tolist()
        rows = chunks.map_batches(_keep, batch_format="pyarrow", fn_kwargs={"column": "chunk_id", "values": bad})\
            .select_columns(["doc_id"]).take_all()
        ids = sorted({r["doc_id"] for r in rows})
        raise RagtuneError(
            f"{int(clash.sum())} chunk ids name two different texts: documents {ids} appear more than once "
            "with different text. Fix: give every document a unique id (corpus.id_field), or drop the id "
            "column so that ids come from the content"
        )
    keep = ~same_id
    return ChunkStats(docs=docs, empty_docs=empty, chunks=int(keep.sum()), repeated_rows=int(same_id.sum()),
                      unique_inputs=len(np.unique(key[keep])),
                      rows_per_part=np.bincount(part[keep], minlength=num_parts))


# --- 4. embed parts (Ray Data actor pool) -----------------------------------------------------------------------

class PartEmbedder:
    """One per actor: loads the model once, then embeds and writes whole parts."""

    def __init__(self, spec: dict[str, Any], device: str, fp16: bool, threads: int, batch_size: int,
                 normalize: bool, prepend_title: bool, out_uri: str, provenance: dict[str, str]):
        import torch

        ensure_logging()
        torch.set_num_threads(threads)
        self.device = resolve_device("gpu" if device == "cuda" else "cpu")
        self.model = load_sentence_transformer(EmbedderSpec(**spec), str(self.device), fp16)
        self.batch_size = batch_size
        self.normalize = normalize
        self.prepend_title = prepend_title
        self.out = resolve(out_uri)
        self.provenance = provenance

    def __call__(self, group: pa.Table) -> pa.Table:
        part = int(group["part"][0].as_py())
        t0 = time.perf_counter()
        try:
            rows, inputs, inverse = prepare_part(group, self.prepend_title)
            xb = self._encode(inputs, part)[inverse]
            record = write_part(part_table(rows, xb, self.provenance), self.out, part, embedded=len(inputs))
        except Exception as e:
            raise RagtuneError(f"embedding {part_name(part)} failed: {type(e).__name__}: {e}") from e
        record.seconds = time.perf_counter() - t0
        return pa.table({"part": [part], "record": [record.model_dump_json()]})

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


def _keep(batch: pa.Table, column: str, values: list[int]) -> pa.Table:
    """The rows whose ``column`` is one of ``values``."""
    import pyarrow.compute as pc

    return batch.filter(pc.is_in(batch[column], value_set=pa.array(values, batch.schema.field(column).type)))


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

    def line(self) -> str:
        return (f"embedded {self.docs:,} docs -> {self.chunks:,} chunks ({self.duplicates_skipped:,} duplicates "
                f"embedded once, {self.empty_docs:,} empty docs) into {self.parts} parts "
                f"({self.parts_written} written, {self.parts_skipped} already done) at {self.output}; "
                f"{self.seconds:.1f}s, {self.rows_per_s:,.1f} chunks/s")


def run(cfg: EmbedJobConfig) -> EmbedSummary:
    """Embed the corpus as ``cfg`` says: check, plan the actors, open the manifest, read and chunk, embed the parts
    not done yet, and mark the manifest done. Returns the summary, also kept in the manifest."""
    t_start = time.perf_counter()
    plan = check(cfg)
    finished = finished_summary(plan)
    if finished is not None:
        log.info("%s is complete for this config: nothing to do", plan.out.uri)
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
    chunks = read_and_chunk(plan, manifest.num_parts)
    stats = chunk_stats(chunks, manifest.num_parts)
    if stats.chunks == 0:
        raise RagtuneError(f"the corpus has {stats.docs} documents and all of them are empty (no text in "
                           f"`{cfg.corpus.text_field}`). Fix: check corpus.text_field")
    provenance = {"model": plan.spec.name, "model_revision": plan.spec.revision,
                  "chunker": plan.settings.fingerprint()}
    done, pending = parts_to_embed(plan.out, manifest, stats, provenance)

    t_embed = time.perf_counter()
    written = embed_parts(plan, actors, chunks, pending, manifest, stats, provenance)
    embed_seconds = time.perf_counter() - t_embed
    return finish_manifest(plan, manifest, stats, done=done, pending=pending, written=written,
                           actors=min(actors.actors, max(len(pending), 1)), t_start=t_start,
                           embed_seconds=embed_seconds)


def finished_summary(plan: Plan) -> EmbedSummary | None:
    """The summary of a finished run of this config whose parts are all still there, else None (work to do)."""
    prev = plan.previous
    if (prev is None or prev.state != "done" or plan.cfg.output.overwrite or not prev.stats
            or not all(exists(plan.out.join(rec.file)) for rec in prev.parts.values())):
        return None
    return EmbedSummary(**{**prev.stats, "parts_written": 0, "parts_skipped": len(prev.parts)})


def open_manifest(plan: Plan, actors: int) -> EmbeddingManifest:
    """The manifest to fill: the one already there (a resume) or a new one (``--overwrite`` deletes the old
    outputs first); the number of parts is fixed by the first run. Temporaries of a killed run are removed."""
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
        return manifest
    num_parts = cfg.output.num_parts or default_num_parts(plan.corpus.total_bytes, cfg.output.part_size_mb, actors)
    return _new_manifest(cfg, plan.spec, plan.settings, plan.corpus, num_parts)


def read_and_chunk(plan: Plan, num_parts: int):
    """Every chunk of the corpus with its id and part, read and chunked by Ray Data tasks; materialised (cheap
    next to embedding) so that it is counted once and embedded without reading the corpus again."""
    return (read_documents(plan.corpus, plan.cfg)
            .map_batches(_chunk_batch, batch_format="pyarrow", batch_size=256,
                         fn_kwargs={"tokenizer_path": plan.spec.path, "settings": plan.settings.to_dict(),
                                    "num_parts": num_parts})
            .materialize())


def parts_to_embed(out: Location, manifest: EmbeddingManifest, stats: ChunkStats,
                   provenance: dict[str, str]) -> tuple[set[int], list[int]]:
    """(done, pending) parts; the manifest keeps only the done ones and is written.

    A part is done when the manifest lists it with the rows this corpus gives it and its file is there; a part
    written by a run that died before recording it is recognised by its footer and kept.
    """
    num_parts = manifest.num_parts
    manifest.parts = {k: rec for k, rec in manifest.parts.items()
                      if rec.rows == stats.rows_per_part[int(k)] and exists(out.join(rec.file))}
    done = {int(k) for k in manifest.parts}
    for p in range(num_parts):
        if p not in done and stats.rows_per_part[p] > 0:
            rec = recover_part(out, p, int(stats.rows_per_part[p]), provenance)
            if rec is not None:
                manifest.parts[f"{p:05d}"] = rec
                done.add(p)
    pending = [p for p in range(num_parts) if p not in done and stats.rows_per_part[p] > 0]
    write_manifest(out, manifest)
    log.info("%d docs (%d empty) -> %d chunks, %d distinct texts; %d parts, %d already done, %d to embed",
             stats.docs, stats.empty_docs, stats.chunks, stats.unique_inputs, num_parts, len(done), len(pending))
    return done, pending


def embed_parts(plan: Plan, actors: EmbedActorPlan, chunks: Any, pending: list[int], manifest: EmbeddingManifest,
                stats: ChunkStats, provenance: dict[str, str]) -> int:
    """Embed the ``pending`` parts in an actor pool, each actor writing whole parts; each part is recorded in the
    manifest as soon as it lands. Returns the number of parts written."""
    import ray.data

    if not pending:
        return 0
    cfg = plan.cfg
    written = 0
    rate = Rate(int(stats.rows_per_part[pending].sum()), "chunks")
    results = (chunks
               .map_batches(_keep, batch_format="pyarrow", fn_kwargs={"column": "part", "values": pending})
               # twice as many shuffle partitions as parts: fewer parts share a block, so each part
               # is recorded in the manifest as soon as its block is done
               .groupby("part", num_partitions=2 * len(pending))
               .map_groups(PartEmbedder, batch_format="pyarrow",
                           compute=ray.data.ActorPoolStrategy(size=min(actors.actors, len(pending))),
                           num_cpus=actors.num_cpus, num_gpus=actors.num_gpus,
                           fn_constructor_kwargs={
                               "spec": plan.spec.to_dict(), "device": actors.device, "fp16": actors.fp16,
                               "threads": actors.threads, "batch_size": actors.batch_size,
                               "normalize": cfg.embed.normalize, "prepend_title": cfg.chunk.prepend_title,
                               "out_uri": cfg.output.path, "provenance": provenance}))
    for batch in results.iter_batches(batch_size=None, prefetch_batches=0, batch_format="pyarrow"):
        for row in batch.to_pylist():
            record = PartRecord.model_validate_json(row["record"])
            manifest.parts[f"{row['part']:05d}"] = record
            write_manifest(plan.out, manifest)
            written += 1
            rate.add(record.rows)
            rate.log(log, f"{record.file} ({record.rows:,} chunks, {record.embedded:,} embedded, "
                          f"{record.seconds:.1f}s) written; {written}/{len(pending)} parts, ")
    return written


def finish_manifest(plan: Plan, manifest: EmbeddingManifest, stats: ChunkStats, *, done: set[int],
                    pending: list[int], written: int, actors: int, t_start: float,
                    embed_seconds: float) -> EmbedSummary:
    """Check that every part with rows is recorded, then mark the manifest done with the run's summary (its
    ``seconds`` counted from ``t_start``, a ``time.perf_counter()``)."""
    out = plan.out
    missing = [p for p in range(manifest.num_parts) if stats.rows_per_part[p] > 0 and f"{p:05d}" not in manifest.parts]
    if missing:
        raise RagtuneError(f"parts {missing[:10]} were not written; the manifest stays 'running'. "
                           "Fix: rerun the same command to finish them")
    if manifest.dim is None:
        manifest.dim = _dim_of(out, next(iter(manifest.parts.values())))
    _delete_temporaries(out)  # of an actor lost with its node while writing (its part was embedded again)
    summary = EmbedSummary(
        output=out.uri, model=plan.spec.name, dim=manifest.dim, docs=stats.docs, empty_docs=stats.empty_docs,
        chunks=stats.chunks, duplicates_skipped=stats.chunks - stats.unique_inputs,
        repeated_rows=stats.repeated_rows, parts=int(np.count_nonzero(stats.rows_per_part)),
        parts_written=written, parts_skipped=len(done), actors=actors, seconds=time.perf_counter() - t_start,
        rows_per_s=sum(manifest.parts[f"{p:05d}"].rows for p in pending) / embed_seconds if pending else 0.0,
    )
    manifest.state = "done"
    manifest.stats = asdict(summary)
    write_manifest(out, manifest)
    return summary


def _dim_of(out: Location, record: PartRecord) -> int:
    import pyarrow.parquet as pq

    schema = pq.read_schema(out.join(record.file).path, filesystem=out.fs)
    return schema.field("vector").type.list_size


def _delete_temporaries(out: Location) -> None:
    """Remove the temporary files of part writers that died before their rename."""
    for f in list_dir(out):
        if TMP_MARK in f.base_name:
            delete_file(out.join(f.base_name))


def _delete_outputs(out: Location) -> None:
    """Remove what ragtune embed writes (parts, manifest, temporaries) and nothing else."""
    for f in list_dir(out):
        if f.base_name == MANIFEST or (f.base_name.startswith("part-") and ".parquet" in f.base_name):
            delete_file(out.join(f.base_name))


if __name__ == "__main__":  # python -m jobs.embed --config FILE [overrides] (what `ray job submit` calls)
    job_main("embed", run)
