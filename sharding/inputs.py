"""Which input each embedding part reads: the corpus cut into parts where it is read, never by a shuffle of texts.

A part is a list of *slices* of corpus files, planned once from file sizes and Parquet footers (no document is
read to plan) and recorded in the embeddings' manifest, so a finished part maps to finished input and a resume
skips it without reading it again::

    JSON Lines (.jsonl, .json)     byte ranges [start, stop): a range holds the lines that *start* in it
    compressed JSON Lines          the whole file (.gz and .zst cannot be cut without reading them)
    Parquet                        runs of row groups [start, stop)
    text and Markdown files        the whole file (one document each)

Slices are packed into parts of about ``target`` input bytes, in corpus order: small files share a part, a large
file is cut into several. ``target_part_bytes`` asks for several parts per actor, so that actors that finish early
take the parts that remain instead of waiting for one slow part (parts equal to actors leave balance to chance).
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pydantic import BaseModel

from sharding.corpus import DOC_SCHEMA, Corpus, CorpusError, CorpusFile, Kind, text_file_document, to_documents

PARTS_PER_ACTOR = 8  # parts planned per embedding actor when output.num_parts is not given
MIN_PART_BYTES = 32 * 2**10  # below this a part costs more in files and scheduling than it balances
_SCAN = 1 << 16  # bytes read at a time while looking for the end of a line


class Slice(BaseModel):
    """A piece of one corpus file: a byte range (JSON Lines), a run of row groups (Parquet) or the whole file."""

    path: str  # inside the corpus filesystem
    rel: str  # under the corpus root: the id of a text document
    kind: Kind
    start: int
    stop: int
    bytes: int  # input bytes (uncompressed for Parquet row groups): what parts are balanced on


class PartInput(BaseModel):
    """What one part reads, in order."""

    part: int
    slices: list[Slice]

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.slices)

    def fingerprint(self) -> str:
        """Names this part's input; written in the part's footer so a part on disk is matched to its input."""
        h = hashlib.sha256()
        for s in self.slices:
            h.update(f"{s.path}\0{s.kind}\0{s.start}\0{s.stop}\n".encode())
        return h.hexdigest()[:16]


def target_part_bytes(total_bytes: int, *, part_size_mb: float, actors: int, num_parts: int | None) -> int:
    """Input bytes per part: ``num_parts`` when given, else at most ``part_size_mb`` and small enough for
    ``PARTS_PER_ACTOR`` parts per actor, but not below ``MIN_PART_BYTES``."""
    if num_parts is not None:
        return max(1, math.ceil(total_bytes / num_parts))
    spread = math.ceil(total_bytes / (PARTS_PER_ACTOR * max(actors, 1)))
    return max(MIN_PART_BYTES, min(int(part_size_mb * 2**20), spread))


def plan_parts(corpus: Corpus, target: int) -> list[PartInput]:
    """Cut the corpus into parts of about ``target`` bytes (see the module's docstring). Reads Parquet footers
    only; every byte of every file lands in exactly one slice."""
    parts: list[PartInput] = []
    current: list[Slice] = []
    size = 0
    for f in corpus.files:
        for s in _slices(corpus.fs, f, target):
            if current and size + s.bytes > target:
                parts.append(PartInput(part=len(parts), slices=current))
                current, size = [], 0
            current.append(s)
            size += s.bytes
    if current:
        parts.append(PartInput(part=len(parts), slices=current))
    return parts


def _slices(fs: pafs.FileSystem, f: CorpusFile, target: int) -> Iterator[Slice]:
    if f.kind == "parquet":
        meta = pq.read_metadata(f.path, filesystem=fs)
        start, size = 0, 0
        for i in range(meta.num_row_groups):
            rg = meta.row_group(i).total_byte_size
            if i > start and size + rg > target:
                yield Slice(path=f.path, rel=f.rel, kind=f.kind, start=start, stop=i, bytes=size)
                start, size = i, 0
            size += rg
        if meta.num_row_groups > start:
            yield Slice(path=f.path, rel=f.rel, kind=f.kind, start=start, stop=meta.num_row_groups, bytes=size)
        return
    if f.kind == "jsonl" and not _compressed(f.path) and f.size > target:
        n = math.ceil(f.size / target)
        bounds = [f.size * i // n for i in range(n + 1)]
        for a, b in zip(bounds, bounds[1:], strict=False):
            yield Slice(path=f.path, rel=f.rel, kind=f.kind, start=a, stop=b, bytes=b - a)
        return
    yield Slice(path=f.path, rel=f.rel, kind=f.kind, start=0, stop=f.size, bytes=f.size)


def _compressed(path: str) -> bool:
    return path.endswith((".gz", ".zst"))


# --- reading a part -----------------------------------------------------------------------------------------------

def read_part_documents(fs: pafs.FileSystem, part: PartInput, text_field: str, id_field: str | None,
                        title_field: str) -> Iterator[pa.Table]:
    """The documents (corpus.DOC_SCHEMA) of one part, a table per slice, in order."""
    for s in part.slices:
        yield read_slice(fs, s, text_field, id_field, title_field)


def read_slice(fs: pafs.FileSystem, s: Slice, text_field: str, id_field: str | None,
               title_field: str) -> pa.Table:
    try:
        if s.kind == "parquet":
            records = pq.ParquetFile(s.path, filesystem=fs).read_row_groups(list(range(s.start, s.stop)))
            return to_documents(records, text_field, id_field, title_field)
        if s.kind == "jsonl":
            data = _read_lines(fs, s) if not _compressed(s.path) else _read_all(fs, s.path, "detect")
            return to_documents(_parse_jsonl(data), text_field, id_field, title_field)
        return pa.Table.from_pylist([text_file_document(s.rel, _read_all(fs, s.path, None))], schema=DOC_SCHEMA)
    except (OSError, pa.ArrowException, UnicodeDecodeError) as e:
        where = f"bytes {s.start}-{s.stop} of " if s.kind == "jsonl" and not _compressed(s.path) else ""
        raise CorpusError(f"{where}{s.path} cannot be read as {s.kind} ({type(e).__name__}: {e}). Fix: repair or "
                          "remove the file; finished parts are kept, so a rerun redoes only the rest") from None


def _read_all(fs: pafs.FileSystem, path: str, compression: str | None) -> bytes:
    with fs.open_input_stream(path, compression=compression) as stream:
        return bytes(stream.read())


def _read_lines(fs: pafs.FileSystem, s: Slice) -> bytes:
    """The lines that start in ``[s.start, s.stop)``, whole (the last one may end after ``s.stop``)."""
    with fs.open_input_file(s.path) as f:
        size = f.size()
        begin = s.start if s.start == 0 else _line_start_at_or_after(f, s.start, size)
        if begin >= s.stop:
            return b""
        f.seek(begin)
        data = bytes(f.read(s.stop - begin))
        if s.stop < size and not data.endswith(b"\n"):
            data += _rest_of_line(f, size)
        return data


def _line_start_at_or_after(f: pa.NativeFile, pos: int, size: int) -> int:
    """The first offset >= pos where a line starts (just after a newline), or ``size``."""
    f.seek(pos - 1)
    at = pos - 1
    while at < size:
        buf = bytes(f.read(_SCAN))
        if not buf:
            break
        i = buf.find(b"\n")
        if i >= 0:
            return at + i + 1
        at += len(buf)
    return size


def _rest_of_line(f: pa.NativeFile, size: int) -> bytes:
    out = []
    while f.tell() < size:
        buf = bytes(f.read(_SCAN))
        if not buf:
            break
        i = buf.find(b"\n")
        if i >= 0:
            out.append(buf[:i + 1])
            break
        out.append(buf)
    return b"".join(out)


def _parse_jsonl(data: bytes) -> pa.Table:
    import pyarrow.json as pajson

    if not data.strip():
        return pa.table({})
    # one block for the whole slice: a record longer than pyarrow's default 1 MiB block would not parse
    opts = pajson.ReadOptions(block_size=max(1 << 20, len(data) + 1))
    return pajson.read_json(io.BytesIO(data), read_options=opts)
