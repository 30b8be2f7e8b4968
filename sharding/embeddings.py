"""The embedding shard format: chunk tables, parts on disk, and the manifest that says how they were made.

On disk (DESIGN.md, "Data flow and formats" 3)::

    embeddings/part-00000.parquet   chunk_id:int64, doc_id, chunk_index:int32, title, text, metadata (JSON),
                                    n_tokens:int32, vector: fixed_size_list<float32>[d]
    embeddings/_parts/part-00000.json   the record of a finished part, written by its actor (while running)
    embeddings/_manifest.json       model, dimension, normalisation, chunker, corpus, the input of every part
                                    (``sharding.inputs``), parts with rows and sha256, state (running | done)

A part is a fixed slice of the input (planned by the first run), so a rerun skips finished parts without reading
their input. Identical chunks within a part are embedded once; a chunk id found in two parts (a document listed
twice) is kept in the first part only (``repeated_ids``, ``drop_ids``).
"""

from __future__ import annotations

import io
import json
import time
from typing import Annotated, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, BeforeValidator, Field

from configs.errors import RagtuneError, redact
from sharding.chunking import CHUNKER_VERSION, Chunker, ChunkerSettings, embed_input
from sharding.ids import chunk_id, hash64
from sharding.inputs import PartInput
from sharding.storage import Location, atomic_write_bytes, exists, list_dir, read_bytes, sha256_hex

MANIFEST = "_manifest.json"
FORMAT = "ragtune.embeddings/1"

CHUNK_SCHEMA = pa.schema([
    ("chunk_id", pa.int64()), ("doc_id", pa.string()), ("chunk_index", pa.int32()), ("title", pa.string()),
    ("text", pa.string()), ("metadata", pa.string()), ("n_tokens", pa.int32()),
    ("key", pa.int64()),  # hash of the text the model sees: equal keys are embedded once
    ("part", pa.int32()),  # the part the chunk's input belongs to (-1: a document without chunks)
])
PARTS_DIR = "_parts"  # per-part records of a running job: one small file per finished part
ROW_GROUP_ROWS = 16384  # rows per Parquet row group of a part: id ranges skip row groups by their statistics


class IdClash(RagtuneError):
    """One chunk id names two different texts: a document id used for two documents."""


def id_clash(doc_ids: list[str], count: int) -> IdClash:
    return IdClash(f"{count} chunk ids name two different texts: documents {doc_ids} appear more than once with "
                   "different text. Fix: give every document a unique id (corpus.id_field), or drop the id column "
                   "so that ids come from the content", param="corpus.id_field")


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def chunk_documents(docs: pa.Table, chunker: Chunker, fingerprint: str, *, part: int = 0) -> pa.Table:
    """Documents (corpus.DOC_SCHEMA) of one part -> chunks (CHUNK_SCHEMA).

    A document without chunks (empty text) leaves one row with ``chunk_index = -1`` and ``part = -1``, so
    that it is counted and reported; those rows are dropped before embedding.
    """
    cols: dict[str, list[Any]] = {name: [] for name in CHUNK_SCHEMA.names}
    for doc_id, title, text, meta in zip(*(docs.column(c).to_pylist() for c in ("doc_id", "title", "text",
                                                                             "metadata")), strict=True):
        chunks = chunker.chunk(text, title)
        if not chunks:
            for name, v in zip(CHUNK_SCHEMA.names, (0, doc_id, -1, title, "", meta, 0, 0, -1), strict=True):
                cols[name].append(v)
            continue
        for ch in chunks:
            key = hash64(embed_input(title, ch.text, chunker.prepend_title))
            row = (chunk_id(doc_id, ch.index, fingerprint), doc_id, ch.index, title, ch.text, meta, ch.n_tokens,
                   key, part)
            for name, v in zip(CHUNK_SCHEMA.names, row, strict=True):
                cols[name].append(v)
    return pa.table(cols, schema=CHUNK_SCHEMA)


def prepare_part(chunks: pa.Table, prepend_title: bool) -> tuple[pa.Table, list[str], np.ndarray]:
    """One part's chunks -> (rows sorted by chunk_id, unique model inputs, row -> unique input index).

    Rows with the same chunk_id (the same document listed twice) are kept once; rows with the same model
    input (identical chunks of different documents) share one embedding. One chunk_id with two different inputs
    raises IdClash.
    """
    t = chunks.filter(pc.greater_equal(chunks["chunk_index"], 0)).sort_by([("chunk_id", "ascending"),
                                                                          ("key", "ascending")])
    ids, keys = t["chunk_id"].to_numpy(), t["key"].to_numpy()
    keep = np.ones(len(ids), dtype=bool)
    keep[1:] = ids[1:] != ids[:-1]
    clash = ~keep
    clash[1:] &= keys[1:] != keys[:-1]
    if clash.any():
        raise id_clash(sorted(set(t.filter(pa.array(clash))["doc_id"].to_pylist()))[:5],
                       len(np.unique(ids[clash])))
    if not keep.all():
        t = t.filter(pa.array(keep))
    inputs = [embed_input(ti, te, prepend_title) for ti, te in zip(t["title"].to_pylist(), t["text"].to_pylist(),
                                                                    strict=True)]
    unique: dict[str, int] = {}
    inverse = np.fromiter((unique.setdefault(s, len(unique)) for s in inputs), dtype=np.int64, count=len(inputs))
    return t, list(unique), inverse


def vectors_to_arrow(xb: np.ndarray) -> pa.FixedSizeListArray:
    """(n, d) float32 -> fixed_size_list<float32>[d], without copying the floats."""
    xb = np.ascontiguousarray(xb, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(xb.reshape(-1)), xb.shape[1])


def vectors_from_arrow(col: pa.ChunkedArray | pa.FixedSizeListArray) -> np.ndarray:
    """fixed_size_list<float32>[d] -> (n, d) float32."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    d = arr.type.list_size
    return arr.flatten().to_numpy(zero_copy_only=False).reshape(-1, d)


def check_finite(xb: np.ndarray, ids: np.ndarray, where: str) -> None:
    """Refuse vectors that hold NaN or Inf (a model run in half precision can overflow): FAISS would rank them
    arbitrarily, and their chunks would be found for no query or for every one. The error names the chunks."""
    bad = ~np.isfinite(xb).all(axis=1)
    if bad.any():
        show = ", ".join(str(i) for i in np.asarray(ids)[bad][:5].tolist())
        raise RagtuneError(f"{where}: {int(bad.sum()):,} of {len(xb):,} vectors hold NaN or Inf (chunk ids {show}"
                           f"{', ...' if bad.sum() > 5 else ''}). Fix: embed again in full precision "
                           "(embed.fp16: false), or remove those chunks' documents", code="non_finite_vectors")


def part_table(rows: pa.Table, xb: np.ndarray, provenance: dict[str, str]) -> pa.Table:
    """The table written as a part: the chunk rows (without the routing column) and their vectors (finite:
    :func:`check_finite`)."""
    check_finite(xb, rows["chunk_id"].to_numpy(), "the embedding model's output")
    t = rows.drop_columns(["key", "part"]).append_column("vector", vectors_to_arrow(xb))
    meta = {f"ragtune.{k}".encode(): v.encode() for k, v in provenance.items()}
    return t.replace_schema_metadata(meta)


class PartCounts(BaseModel):
    """What one part's input held: documents, empty ones, rows dropped as repeats of a document."""

    docs: int = 0
    empty_docs: int = 0
    repeated_rows: int = 0  # rows of a document listed twice (in this part, or found later in an earlier part)


class PartRecord(PartCounts):
    file: str
    rows: int
    embedded: int  # rows whose vector was computed; the rest share an identical chunk's vector
    sha256: str
    bytes: int
    seconds: float = 0.0  # the actor's time on this part: read, chunk, embed, write
    inputs: str | None = None  # ``PartInput.fingerprint()`` of the input it was made from
    worker: str | None = None  # the actor that embedded it (how parts were spread over the actors)


_COUNTS = ("docs", "empty_docs", "repeated_rows")


def write_part(table: pa.Table, out: Location, index: int, embedded: int, *, inputs: str | None = None,
               counts: PartCounts | None = None) -> PartRecord:
    """Write one part atomically and return what the manifest records of it.

    The part also describes itself in its Parquet footer (``ragtune.*`` keys: model, chunker, embedded, the
    fingerprint of its input and its counts), so a part that was written but never recorded (its actor died in
    between) can be recognised and kept.
    """
    counts = counts or PartCounts()
    meta = dict(table.schema.metadata or {})
    meta[b"ragtune.embedded"] = str(embedded).encode()
    if inputs is not None:
        meta[b"ragtune.inputs"] = inputs.encode()
    for k in _COUNTS:
        meta[f"ragtune.{k}".encode()] = str(getattr(counts, k)).encode()
    table = table.replace_schema_metadata(meta)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", use_dictionary=["doc_id", "title", "metadata"],
                   row_group_size=ROW_GROUP_ROWS)
    data = buf.getvalue()
    name = part_name(index)
    atomic_write_bytes(out.join(name), data)
    return PartRecord(file=name, rows=table.num_rows, embedded=embedded, sha256=sha256_hex(data), bytes=len(data),
                      inputs=inputs, **counts.model_dump())


def recover_part(out: Location, index: int, provenance: dict[str, str], *, inputs: str | None = None,
                 rows: int | None = None) -> PartRecord | None:
    """A part file that is on disk but not recorded, if it is complete and made the same way from the same input.

    Complete means: a readable footer, the same model and chunker in its ``ragtune.*`` metadata, and the same
    input fingerprint (``inputs``) or, for parts of the first format, the expected number of ``rows``. Anything
    else returns None and the part is embedded again.
    """
    loc = out.join(part_name(index))
    if not exists(loc):
        return None
    try:
        data = read_bytes(loc)
        md = pq.read_metadata(io.BytesIO(data))
    except (OSError, pa.ArrowException):
        return None
    kv = {k.decode(): v.decode() for k, v in (md.metadata or {}).items() if k.startswith(b"ragtune.")}
    if any(kv.get(f"ragtune.{k}") != v for k, v in provenance.items()):
        return None
    if (inputs is not None and kv.get("ragtune.inputs") != inputs) or (rows is not None and md.num_rows != rows):
        return None
    embedded = int(kv.get("ragtune.embedded", md.num_rows))
    counts = {k: int(kv[f"ragtune.{k}"]) for k in _COUNTS if f"ragtune.{k}" in kv}
    return PartRecord(file=loc.path.rsplit("/", 1)[-1], rows=md.num_rows, embedded=embedded,
                      sha256=sha256_hex(data), bytes=len(data), inputs=kv.get("ragtune.inputs"), **counts)


def record_name(index: int) -> str:
    return f"{PARTS_DIR}/part-{index:05d}.json"


def write_part_record(out: Location, index: int, record: PartRecord) -> None:
    """Record a finished part in a file of its own (atomic): O(1) per part, whatever the number of parts."""
    atomic_write_bytes(out.join(record_name(index)), redact(record.model_dump_json()).encode())


def read_part_records(out: Location) -> dict[int, PartRecord]:
    """The records of ``_parts/`` (part index -> record); an unreadable one is skipped (its part is redone)."""
    found: dict[int, PartRecord] = {}
    for f in list_dir(out.join(PARTS_DIR)):
        name = f.base_name
        if not (name.startswith("part-") and name.endswith(".json")):
            continue
        try:
            found[int(name[5:-5])] = PartRecord.model_validate_json(read_bytes(out.join(f"{PARTS_DIR}/{name}")))
        except (ValueError, OSError):
            continue
    return found


# --- chunk ids found in more than one part ------------------------------------------------------------------------

def part_ids(emb: Location, record: PartRecord, lo: int, hi: int) -> np.ndarray:
    """The chunk ids in ``[lo, hi)`` of one part; row groups outside the range are skipped by their statistics."""
    t = pq.read_table(emb.join(record.file).path, filesystem=emb.fs, columns=["chunk_id"],
                      filters=[("chunk_id", ">=", lo), ("chunk_id", "<", hi)])
    return t["chunk_id"].to_numpy()


def repeated_ids(emb: Location, records: dict[str, PartRecord], lo: int, hi: int) -> dict[int, list[str]]:
    """Chunk ids in ``[lo, hi)`` that are in more than one part -> the parts holding them, in part order.

    Memory is that of the ids in the range: the caller splits the id space so a range holds a bounded number.
    """
    keys = sorted(records)
    ids = [part_ids(emb, records[k], lo, hi) for k in keys]
    if not ids:
        return {}
    flat = np.concatenate(ids)
    owner = np.repeat(np.arange(len(keys)), [len(a) for a in ids])
    uniq, counts = np.unique(flat, return_counts=True)
    hit = np.isin(flat, uniq[counts > 1])
    out: dict[int, list[str]] = {}
    for cid, k in zip(flat[hit].tolist(), owner[hit].tolist(), strict=True):
        out.setdefault(cid, []).append(keys[k])
    return out


def rows_of(emb: Location, record: PartRecord, ids: list[int], columns: list[str]) -> pa.Table:
    return pq.read_table(emb.join(record.file).path, filesystem=emb.fs, columns=columns,
                         filters=[("chunk_id", "in", ids)])


def drop_ids(emb: Location, index: int, record: PartRecord, ids: list[int]) -> PartRecord:
    """Rewrite one part without the rows of ``ids`` (atomically); returns its new record."""
    t = read_part_table(emb, record)
    keep = pc.invert(pc.is_in(t["chunk_id"], value_set=pa.array(ids, pa.int64())))
    kept = t.filter(keep)
    # rows dropped here were embedded in this part: they stay counted in ``embedded``, not in ``rows``
    counts = PartCounts(docs=record.docs, empty_docs=record.empty_docs,
                        repeated_rows=record.repeated_rows + t.num_rows - kept.num_rows)
    new = write_part(kept, emb, index, embedded=record.embedded, inputs=record.inputs, counts=counts)
    new.seconds = record.seconds
    return new


def verify_part(out: Location, record: PartRecord) -> None:
    """Raise a RagtuneError naming the file when a part is missing, truncated or altered."""
    loc = out.join(record.file)
    if not exists(loc):
        raise RagtuneError(f"{loc.uri}: listed in {MANIFEST} but missing. Fix: rerun `ragtune embed` with the "
                           "same config to rebuild it")
    digest = sha256_hex(read_bytes(loc))
    if digest != record.sha256:
        raise RagtuneError(f"{loc.uri}: checksum mismatch (file changed or truncated). Fix: rerun "
                           "`ragtune embed` with --overwrite")


EMPTY_IS_NONE = BeforeValidator(lambda v: None if v == {} else v)
"""On a record field that may be None: an empty object in a manifest means the record is absent, as null does."""


class EmbedderRecord(BaseModel):
    """The embedding model that made the vectors (``models.embedders.EmbedderSpec``, as recorded in the embeddings'
    manifest and copied into every index built from them): queries and new chunks are embedded with it."""

    name: str  # as the user named it: a bundled name, a hub id or a folder
    path: str | None = None  # the folder it was loaded from; the embed job records all four fields
    revision: str | None = None  # hub commit, or a content hash of the folder; None: not checked
    max_seq_length: int | None = None  # tokens per input, special tokens included


class ChunkerRecord(BaseModel):
    """The chunker settings (``sharding.chunking.ChunkerSettings``) with their fingerprint, which is part of every
    chunk id: new documents chunked with the same settings get the same ids."""

    size: int
    overlap: int
    prepend_title: bool
    tokenizer: str  # the revision of the model the tokenizer comes from
    version: int = CHUNKER_VERSION
    fingerprint: str

    def settings(self) -> ChunkerSettings:
        return ChunkerSettings(size=self.size, overlap=self.overlap, prepend_title=self.prepend_title,
                               tokenizer=self.tokenizer, version=self.version)


class EmbeddingManifest(BaseModel):
    """``_manifest.json``: how the embeddings in a folder were made and which parts are complete."""

    format: str = FORMAT
    state: Literal["running", "done"] = "running"
    model: EmbedderRecord
    dim: int | None = None
    normalize: bool
    metric: str
    chunker: Annotated[ChunkerRecord | None, EMPTY_IS_NONE]  # ChunkerSettings.to_dict()
    corpus: dict[str, Any]  # paths, fingerprint, files, bytes
    num_parts: int
    inputs: list[PartInput] = Field(default_factory=list)  # what each part reads (empty: a first-format folder)
    parts: dict[str, PartRecord] = Field(default_factory=dict)  # "00003" -> record
    stats: dict[str, Any] = Field(default_factory=dict)
    config: dict[str, Any] = Field(default_factory=dict)  # the resolved job config
    created_at: float = Field(default_factory=time.time)
    updated_at: float = Field(default_factory=time.time)

    def differences(self, other: EmbeddingManifest) -> list[str]:
        """What makes ``other`` (a new run's plan) produce different embeddings than this folder holds."""
        diffs = recipe_differences(self, other)
        if self.corpus.get("fingerprint") != other.corpus.get("fingerprint"):
            diffs.append(f"corpus files changed ({self.corpus.get('files')} files, {self.corpus.get('bytes')} "
                         f"bytes vs {other.corpus.get('files')} files, {other.corpus.get('bytes')} bytes)")
        return diffs


def recipe_differences(ours: Any, theirs: Any, theirs_name: str = "") -> list[str]:
    """How two manifests (embeddings' or an index's: anything with a ``model`` (EmbedderRecord), a ``chunker``
    (ChunkerRecord or None) and ``normalize``) embed text differently: model and revision, chunker settings,
    normalisation; each a phrase "ours vs theirs", the second side named ``theirs_name`` ("the index's") when
    given."""
    of = f"{theirs_name} " if theirs_name else ""
    diffs = []
    a, b = ours.model, theirs.model
    if (a.name, a.revision) != (b.name, b.revision):
        diffs.append(f"model {a.name} ({a.revision}) vs {of}{b.name} ({b.revision})")

    def chunker(m: Any, key: str) -> Any:
        return getattr(m.chunker, key) if m.chunker is not None else None

    if chunker(ours, "fingerprint") != chunker(theirs, "fingerprint"):
        keys = ("size", "overlap", "prepend_title", "version")
        diffs.append("chunker " + ", ".join(f"{k} {chunker(ours, k)} vs {of}{chunker(theirs, k)}"
                                            for k in keys if chunker(ours, k) != chunker(theirs, k)))
    if ours.normalize != theirs.normalize:
        diffs.append(f"normalize {ours.normalize} vs {of}{theirs.normalize}")
    return diffs


def read_manifest(out: Location) -> EmbeddingManifest | None:
    loc = out.join(MANIFEST)
    if not exists(loc):
        return None
    try:
        data = json.loads(read_bytes(loc))
        if data.get("format") != FORMAT:
            raise RagtuneError(f"{loc.uri}: not a ragtune embeddings manifest (format {data.get('format')!r})")
        return EmbeddingManifest.model_validate(data)
    except (json.JSONDecodeError, ValueError) as e:
        raise RagtuneError(f"{loc.uri}: unreadable manifest ({e}). Fix: rerun with --overwrite") from None


def write_manifest(out: Location, manifest: EmbeddingManifest) -> None:
    manifest.updated_at = time.time()
    # the recorded config and paths name the storage, never its credentials
    atomic_write_bytes(out.join(MANIFEST), redact(manifest.model_dump_json(indent=2)).encode())


def part_dim(emb: Location, record: PartRecord) -> int | None:
    """The dimension of a part's vectors, from its Parquet footer (None: no fixed-size ``vector`` column)."""
    field = pq.read_schema(emb.join(record.file).path, filesystem=emb.fs).field("vector")
    return getattr(field.type, "list_size", None)


def check_part_dims(emb: Location, m: EmbeddingManifest) -> None:
    """Refuse a folder whose parts hold vectors of another dimension than the manifest's ``dim`` (parts of two
    models mixed in one folder): FAISS would fail deep inside the build, or a search would compare unlike vectors.
    Reads each part's footer only; a missing part is left to :func:`read_part_table` to report."""
    wrong = {name: d for name, rec in sorted(m.parts.items())
             if exists(emb.join(rec.file)) and (d := part_dim(emb, rec)) != m.dim}
    if wrong:
        shown = ", ".join(f"part {name}: d = {d}" for name, d in list(wrong.items())[:5])
        raise RagtuneError(f"embeddings at {emb.uri} mix vector dimensions: the manifest says d = {m.dim} "
                           f"({m.model.name}) but {len(wrong)} of {len(m.parts)} parts differ ({shown}). These parts "
                           "were made by another model. Fix: embed again into a new output.path, or rerun `ragtune "
                           "embed` with output.overwrite=true")


def read_part_table(emb: Location, record: PartRecord, columns: list[str] | None = None) -> pa.Table:
    """One embedding part, read once and checked against the embeddings manifest's sha256."""
    loc = emb.join(record.file)
    if not exists(loc):
        raise RagtuneError(f"{loc.uri}: listed in {MANIFEST} but missing. Fix: rerun `ragtune embed` with "
                           "the same config to rebuild it")
    data = read_bytes(loc)
    if sha256_hex(data) != record.sha256:
        raise RagtuneError(f"{loc.uri}: checksum mismatch (file changed or truncated). Fix: rerun `ragtune embed` "
                           "with --overwrite")
    return pq.read_table(io.BytesIO(data), columns=columns)
