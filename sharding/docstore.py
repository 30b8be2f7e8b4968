"""The docstore: chunk_id -> doc_id, text and metadata, read a few rows at a time.

One Parquet file per index shard, sorted by ``chunk_id`` and written in small row groups, so that the row groups
do not overlap and their ``chunk_id`` min/max statistics (in the footer) say which one can hold an id. Looking up
``k`` ids reads the footer once and then at most ``k`` row groups per file: serving never loads the whole text.
"""

from __future__ import annotations

import io
import os
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from configs.errors import RagtuneError
from sharding.storage import TMP_MARK, Location, atomic_write_bytes, exists, sha256_file, sha256_hex

ROW_GROUP_ROWS = 512  # ~0.5 MB of paragraph text: one read per id looked up
COLUMNS = ["chunk_id", "doc_id", "chunk_index", "title", "text", "metadata", "n_tokens"]


def write_docstore(rows: pa.Table, loc: Location) -> tuple[str, int]:
    """Write the docstore rows of one shard (sorted by chunk_id here) atomically; returns (sha256, bytes)."""
    t = rows.select([c for c in COLUMNS if c in rows.column_names]).sort_by("chunk_id")
    buf = io.BytesIO()
    pq.write_table(t, buf, row_group_size=ROW_GROUP_ROWS, compression="zstd", write_statistics=["chunk_id"],
                   use_dictionary=["doc_id", "title", "metadata"])
    data = buf.getvalue()
    atomic_write_bytes(loc, data)
    return sha256_hex(data), len(data)


class _File:
    """One docstore file: its open reader and the chunk_id range of each row group."""

    def __init__(self, loc: Location, expected_bytes: int | None):
        if not exists(loc):
            raise RagtuneError(f"{loc.uri}: docstore file listed in the index manifest is missing. Fix: rebuild the "
                               "index with `ragtune index`")
        self.loc = loc
        try:
            f = loc.fs.open_input_file(loc.path)
            if expected_bytes is not None and f.size() != expected_bytes:
                raise RagtuneError(f"{loc.uri}: {f.size():,} bytes but the manifest says {expected_bytes:,} "
                                   "(truncated or replaced). Fix: rebuild the index with `ragtune index`")
            self.pf = pq.ParquetFile(f)
        except (OSError, pa.ArrowException) as e:
            raise RagtuneError(f"{loc.uri}: unreadable docstore file ({e}). Fix: rebuild the index") from None
        md = self.pf.metadata
        col = md.schema.to_arrow_schema().get_field_index("chunk_id")
        stats = [md.row_group(i).column(col).statistics for i in range(md.num_row_groups)]
        if any(s is None or not s.has_min_max for s in stats):
            raise RagtuneError(f"{loc.uri}: docstore written without chunk_id statistics. Fix: rebuild the index")
        self.names = set(md.schema.to_arrow_schema().names)
        self.mins = np.array([s.min for s in stats], dtype=np.int64)
        self.maxs = np.array([s.max for s in stats], dtype=np.int64)

    def row_groups_for(self, ids: np.ndarray) -> list[int]:
        g = np.searchsorted(self.maxs, ids, side="left")  # first row group whose max >= id
        ok = g < len(self.maxs)
        g, hit = g[ok], ids[ok]
        return sorted(set(g[self.mins[g] <= hit].tolist()))


class Docstore:
    """Lookups of chunk rows by id across the docstore files of an index version.

    ``dead`` gives, per file, the chunk ids masked in it (tombstones): a deleted chunk, or the old copy of an
    updated one, whose new row (the same id) is in a newer file. Masked rows are never returned, so a lookup
    gives each id's live row.
    """

    def __init__(self, locs: Sequence[Location], sizes: Sequence[int | None] | None = None,
                 dead: Sequence[np.ndarray | None] | None = None):
        self._files = [_File(loc, size) for loc, size in zip(locs, sizes or [None] * len(locs), strict=True)]
        self._dead = [None if d is None or not len(d) else pa.array(np.asarray(d, dtype=np.int64), pa.int64())
                      for d in (dead or [None] * len(locs))]
        if len(self._dead) != len(self._files):
            raise ValueError(f"{len(self._dead)} tombstone sets for {len(self._files)} docstore files")
        self.row_groups_read = 0  # counts reads, so tests and benchmarks can see what a lookup cost

    def _live(self, t: pa.Table, n: int) -> pa.Table:
        dead = self._dead[n]
        return t if dead is None else t.filter(pc.invert(pc.is_in(t["chunk_id"], value_set=dead)))

    def lookup(self, ids: Sequence[int] | np.ndarray,
               columns: Sequence[str] | None = None) -> dict[int, dict[str, Any]]:
        """Rows for ``ids`` (unknown ids are left out), reading only the row groups that can hold them."""
        want = np.unique(np.asarray(ids, dtype=np.int64))
        want = want[want >= 0]
        cols = list(columns) if columns else COLUMNS
        if "chunk_id" not in cols:
            cols = ["chunk_id", *cols]
        out: dict[int, dict[str, Any]] = {}
        for n, f in enumerate(self._files):
            groups = f.row_groups_for(want)
            if not groups:
                continue
            self.row_groups_read += len(groups)
            t = f.pf.read_row_groups(groups, columns=[c for c in cols if c in f.names])
            t = self._live(t.filter(pc.is_in(t["chunk_id"], value_set=pa.array(want, pa.int64()))), n)
            for row in t.to_pylist():
                out[row["chunk_id"]] = row
        return out

    def table(self, columns: Sequence[str]) -> pa.Table:
        """The live rows of every file (``columns``, chunk_id first), sorted by chunk_id."""
        cols = ["chunk_id", *[c for c in columns if c != "chunk_id"]]
        ts = [self._live(f.pf.read(columns=[c for c in cols if c in f.names]), n) for n, f in enumerate(self._files)]
        return pa.concat_tables(ts, promote_options="default").sort_by("chunk_id")

    def column(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Every live chunk_id and its value of ``name`` (e.g. doc_id), sorted by chunk_id: for evaluation."""
        t = self.table([name])
        return t["chunk_id"].to_numpy(), np.asarray(t[name].to_pylist(), dtype=object)

    def __len__(self) -> int:
        return sum(f.pf.metadata.num_rows - (0 if d is None else len(d)) for f, d in zip(self._files, self._dead,
                                                                                       strict=True))


def write_docstore_sorted(tables: Iterable[pa.Table], loc: Location) -> tuple[str, int]:
    """Write one shard's docstore from tables that come sorted by chunk_id, each one's ids above the previous
    one's (a shard's rows in chunk-id ranges), without holding them all: the same file as :func:`write_docstore`
    of their concatenation (the same row groups of ``ROW_GROUP_ROWS``), written atomically; returns (sha256, bytes).
    Local files are written through a temporary name; remote ones are assembled in memory (compressed) first."""
    local = loc.is_local
    tmp = f"{loc.path}{TMP_MARK}{uuid.uuid4().hex[:12]}" if local else None
    buf = io.BytesIO()
    writer: pq.ParquetWriter | None = None
    carry: pa.Table | None = None  # rows short of a whole row group, written with the next table
    try:
        for t in tables:
            t = t.select([c for c in COLUMNS if c in t.column_names])
            if carry is not None:
                t = pa.concat_tables([carry, t])
            if writer is None:
                writer = pq.ParquetWriter(tmp if tmp else buf, t.schema, compression="zstd",
                                          write_statistics=["chunk_id"], use_dictionary=["doc_id", "title", "metadata"])
            whole = t.num_rows // ROW_GROUP_ROWS * ROW_GROUP_ROWS
            if whole:
                writer.write_table(t.slice(0, whole), row_group_size=ROW_GROUP_ROWS)
            carry = t.slice(whole)
        if writer is None:
            raise RagtuneError(f"{loc.uri}: no docstore rows to write. Fix: rebuild the index with `ragtune index`")
        if carry is not None and carry.num_rows:
            writer.write_table(carry, row_group_size=ROW_GROUP_ROWS)
        writer.close()
        writer = None
        if not local:
            data = buf.getvalue()
            atomic_write_bytes(loc, data)
            return sha256_hex(data), len(data)
        assert tmp is not None
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        digest, size = sha256_file(tmp), os.path.getsize(tmp)
        os.replace(tmp, loc.path)
        return digest, size
    finally:
        if writer is not None:
            writer.close()
        if tmp and os.path.exists(tmp):
            os.remove(tmp)
