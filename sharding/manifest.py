"""The index manifest (``manifest.json`` of one version), ``LATEST``, and the per-shard tombstone files.

A manifest says how its version was built, what it holds (shards, their delta segments and tombstones, the BM25
part) and how to search it; ``LATEST`` names the version readers open. File names are ``sharding.layout``'s.
"""

from __future__ import annotations

import io
import json
import re
import time
from collections.abc import Sequence
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, Field

from configs.errors import RagtuneError, redact
from sharding.embeddings import EMPTY_IS_NONE, ChunkerRecord, EmbedderRecord
from sharding.layout import LATEST, MANIFEST, PUBLISHED, Piece, carry
from sharding.lexical import LexicalManifest, LexicalRecord, lexical_files
from sharding.storage import (
    Location,
    atomic_write_bytes,
    exists,
    list_dir,
    read_bytes,
    resolve,
    sha256_hex,
)
from sharding.tuning import TuneRow

FORMAT = "ragtune.index/1"
Metric = Literal["inner_product", "l2"]
Operation = Literal["build", "add", "delete", "compact"]  # what wrote a version


class DeltaRecord(BaseModel):
    """A segment of a shard added after its base: chunks of one ``ragtune index add``, in an index made from the
    same trained empty index as the base (so IVF deltas share its quantizer and merge into it exactly)."""

    file: str  # relative to the version folder, like every file name in a manifest
    ntotal: int
    sha256: str
    bytes: int
    docstore: str
    docstore_sha256: str
    docstore_bytes: int
    lexical: LexicalRecord | None = None  # its BM25 rows, when the version has a lexical part
    version: str  # the version that wrote it
    seconds: float = 0.0


class TombstoneRecord(BaseModel):
    """Chunk ids masked in each segment of a shard (base first, then each delta), in one ``.npz`` file: a
    deleted chunk, or the old copy of an updated one (its new copy, under the same id, lives in a newer delta
    and is not masked)."""

    file: str
    sha256: str
    bytes: int
    dead: list[int]  # masked ids per segment, each present in that segment


class ShardRecord(BaseModel):
    file: str  # relative to the version folder
    ntotal: int  # vectors in the base file
    sha256: str
    bytes: int
    docstore: str
    docstore_sha256: str
    docstore_bytes: int
    pieces: list[Piece]  # the embedding rows it holds ([] once compacted: rows then come from several versions)
    seconds: float = 0.0
    deltas: list[DeltaRecord] = Field(default_factory=list)  # segments added since the base was built
    tombstones: TombstoneRecord | None = None  # ids masked per segment; None: nothing deleted

    @property
    def dead(self) -> int:
        return sum(self.tombstones.dead) if self.tombstones else 0

    @property
    def live(self) -> int:
        """Vectors a search can return: the base's and the deltas', less the masked ones."""
        return self.ntotal + sum(d.ntotal for d in self.deltas) - self.dead


class HistoryEntry(BaseModel):
    """One write of the index: what it did, to which version, from which."""

    version: str
    operation: Operation
    parent: str | None = None  # the version it started from (None for a build)
    at: float  # when the manifest was written (epoch seconds)
    seconds: float = 0.0  # how long the operation took
    ntotal: int  # live vectors after it
    counts: dict[str, int] = Field(default_factory=dict)  # e.g. added, updated, skipped, deleted, compacted


class EmbeddingsRecord(BaseModel):
    """The embeddings an index was built from (their folder's ``_manifest.json``, as it was then)."""

    path: str
    rows: int
    parts: int
    updated_at: float


class TrainedRecord(BaseModel):
    """The trained empty index every shard of the version (and every delta of a later add) starts from."""

    sha256: str | None = None  # of the trained index, for kinds that train (IVF, PQ, SQ)
    rows: int | None = None  # vectors it was trained on
    seconds: float | None = None  # training time
    file: str | None = None  # trained.faiss, relative to the version folder; None: derived from shard 0 when needed
    file_sha256: str | None = None


class RecallRecord(BaseModel):
    """Recall@k of the version at its chosen search setting, against exact search."""

    k: int
    recall: float
    target: float
    reached: bool
    queries: int
    queries_from: str  # a queries file, or held-out database vectors
    qps: float  # batched, all shards

    @classmethod
    def measured(cls, chosen: TuneRow, k: int, target: float, queries: int, queries_from: str) -> RecallRecord:
        """The record of the setting tuning chose."""
        return cls(k=k, recall=chosen.recall, target=target, reached=chosen.recall >= target, queries=queries,
                   queries_from=queries_from, qps=chosen.qps)


class BuildRecord(BaseModel):
    """How the index job built the version."""

    seconds: float
    hardware: str  # "GPU", or "CPU (...)" with the task plan's reason
    faiss: str  # faiss.__version__
    threads_per_task: int


class IndexManifest(BaseModel):
    """``manifest.json`` of one index version: how it was built, what it holds, how to search it.

    Records that a version may lack are None (written as ``null``; an empty object reads the same).
    """

    format: str = FORMAT
    version: str
    factory: str  # what faiss.index_factory built (with IDMap2 where the kind keeps no ids)
    kind: str
    reason: str
    metric: Metric
    dim: int
    normalize: bool
    ntotal: int
    est_bytes: int | None = None
    model: EmbedderRecord  # the embedding model of the vectors: queries and new chunks are embedded with it
    chunker: Annotated[ChunkerRecord | None, EMPTY_IS_NONE] = None  # how new documents are chunked as these were
    embeddings: Annotated[EmbeddingsRecord | None, EMPTY_IS_NONE] = None
    shards: list[ShardRecord]
    trained: TrainedRecord | None = None
    search_params: dict[str, int] = Field(default_factory=dict)
    recall: Annotated[RecallRecord | None, EMPTY_IS_NONE] = None  # None: exact kinds, nothing to tune
    tuning: list[TuneRow] = Field(default_factory=list)  # each candidate setting tried, cheapest first
    build: Annotated[BuildRecord | None, EMPTY_IS_NONE] = None
    config: dict[str, Any] = Field(default_factory=dict)  # the index job's resolved config (IndexJobConfig)
    created_at: float = Field(default_factory=time.time)
    lexical: LexicalManifest | None = None  # BM25 shards beside the FAISS shards; None: dense search only
    operation: Operation = "build"
    parent: str | None = None  # the version this one was written from (add, delete, compact)
    history: list[HistoryEntry] = Field(default_factory=list)  # every write up to this version, oldest first

    def entries(self) -> list[HistoryEntry]:
        """The history. A manifest that records none (one written with the sharding functions alone, as tests and
        benchmarks write them: ``ragtune index`` and every freshness operation record theirs) reads as one entry
        for its own version."""
        if self.history:
            return self.history
        return [HistoryEntry(version=self.version, operation=self.operation, at=self.created_at,
                             seconds=self.build.seconds if self.build else 0.0, ntotal=self.ntotal,
                             counts={"vectors": self.ntotal})]


def write_index_manifest(version_dir: Location, manifest: IndexManifest) -> None:
    # the recorded config and paths name the storage, never its credentials
    atomic_write_bytes(version_dir.join(MANIFEST), redact(manifest.model_dump_json(indent=2)).encode())


def read_index_manifest(version_dir: Location) -> IndexManifest:
    loc = version_dir.join(MANIFEST)
    if not exists(loc):
        raise RagtuneError(f"{loc.uri}: no index manifest. Fix: point at an index folder written by `ragtune index`")
    try:
        data = json.loads(read_bytes(loc))
    except json.JSONDecodeError as e:
        raise RagtuneError(f"{loc.uri}: unreadable manifest ({e}). Fix: rebuild the index with `ragtune index`") \
            from None
    if data.get("format") != FORMAT:
        raise RagtuneError(f"{loc.uri}: not a ragtune index manifest (format {data.get('format')!r}, expected "
                           f"{FORMAT!r}). Fix: rebuild the index with this version of ragtune")
    try:
        return IndexManifest.model_validate(data)
    except ValueError as e:
        raise RagtuneError(f"{loc.uri}: invalid manifest ({str(e).splitlines()[0]}). Fix: rebuild the index") from None


_VERSION = re.compile(r"^v-(\d{5,})$")


def list_versions(root: Location) -> list[int]:
    """Version numbers of the folders under an index root (complete or not)."""
    return sorted(int(m.group(1)) for f in list_dir(root) if (m := _VERSION.match(f.base_name)))


def read_latest(root: Location) -> str | None:
    loc = root.join(LATEST)
    return read_bytes(loc).decode().strip() if exists(loc) else None


def switch_latest(root: Location, version: str) -> None:
    """Point ``LATEST`` at a complete version, atomically: readers see the old name or the new one. Then mark
    the version ``PUBLISHED`` (LATEST named it once: a manifest without that mark is one whose writer died
    before switching, ``sharding.versions.version_states``)."""
    if not exists(root.join(version, MANIFEST)):
        raise RagtuneError(f"{root.join(version).uri}: not a complete index version (no {MANIFEST})")
    atomic_write_bytes(root.join(LATEST), (version + "\n").encode())
    atomic_write_bytes(root.join(version, PUBLISHED), json.dumps({"published_at": time.time()}).encode())


def resolve_index(path: str) -> Location:
    """The version folder an index path means: the folder itself when it holds a manifest, else ``LATEST``."""
    loc = resolve(path)
    if exists(loc.join(MANIFEST)):
        return loc
    latest = read_latest(loc)
    if latest is None:
        raise RagtuneError(f"{path}: no index here (neither {LATEST} nor {MANIFEST}). Fix: build one with "
                           "`ragtune index -c configs/index/<x>.yaml`, or pass the index.path it was built at")
    return loc.join(latest)


# --- tombstones and the files a manifest names (freshness) ---------------------------------------------------------

def write_tombstones(loc: Location, dead: Sequence[np.ndarray]) -> tuple[str, int]:
    """One shard's masked ids, one sorted int64 array per segment (``s0`` the base, ``s1``.. its deltas),
    written atomically as an ``.npz``; returns (sha256, bytes)."""
    buf = io.BytesIO()
    arrays: dict[str, Any] = {f"s{i}": np.unique(np.asarray(d, dtype=np.int64)) for i, d in enumerate(dead)}
    np.savez(buf, **arrays)
    data = buf.getvalue()
    atomic_write_bytes(loc, data)
    return sha256_hex(data), len(data)


def read_tombstones(loc: Location, record: TombstoneRecord, verify: bool = True) -> list[np.ndarray]:
    """The masked ids of each segment of a shard (see :func:`write_tombstones`); a missing or altered file is a
    RagtuneError naming it."""
    fix = "Fix: open an older version, or rebuild the index with `ragtune index`"
    if not exists(loc):
        raise RagtuneError(f"{loc.uri}: tombstone file listed in {MANIFEST} is missing. {fix}")
    data = read_bytes(loc)
    if verify and sha256_hex(data) != record.sha256:
        raise RagtuneError(f"{loc.uri}: checksum mismatch: the tombstone file was changed or truncated. {fix}")
    try:
        z = np.load(io.BytesIO(data), allow_pickle=False)
        dead = [z[f"s{i}"].astype(np.int64) for i in range(len(record.dead))]
    except Exception as e:  # zip and key errors mean the same here
        raise RagtuneError(f"{loc.uri}: not a readable tombstone file ({type(e).__name__}). {fix}") from None
    if [len(d) for d in dead] != record.dead:
        raise RagtuneError(f"{loc.uri}: holds {[len(d) for d in dead]} masked ids per segment but {MANIFEST} says "
                           f"{record.dead}. {fix}")
    return dead


def manifest_files(m: IndexManifest) -> list[str]:
    """Every file a manifest names, relative to its version folder (``../v-N/...`` for files of earlier
    versions), the manifest itself first."""
    out = [MANIFEST]
    for s in m.shards:
        out += [s.file, s.docstore]
        if s.tombstones:
            out.append(s.tombstones.file)
        for d in s.deltas:
            out += [d.file, d.docstore] + (lexical_files(d.lexical.file) if d.lexical else [])
    if m.lexical:  # a lexical shard is a folder of files
        out += [f for r in m.lexical.shards for f in lexical_files(r.file)]
        out += [m.lexical.stats.file] if m.lexical.stats else []
    if m.trained and m.trained.file:
        out.append(m.trained.file)
    return out


def carried_manifest(m: IndexManifest, version: str) -> IndexManifest:
    """A copy of version ``m.version``'s manifest for a new version ``version``: the same files, each named
    from the new version's folder (:func:`carry`), so the new version shares them without copying."""
    old = m.version
    c = m.model_copy(deep=True)
    c.version = version
    for s in c.shards:
        s.file, s.docstore = carry(s.file, old), carry(s.docstore, old)
        if s.tombstones:
            s.tombstones.file = carry(s.tombstones.file, old)
        for d in s.deltas:
            d.file, d.docstore = carry(d.file, old), carry(d.docstore, old)
            if d.lexical:
                d.lexical.file = carry(d.lexical.file, old)
    if c.lexical:
        for r in c.lexical.shards:
            r.file = carry(r.file, old)
        if c.lexical.stats:
            c.lexical.stats.file = carry(c.lexical.stats.file, old)
    if c.trained and c.trained.file:
        c.trained.file = carry(c.trained.file, old)
    return c
