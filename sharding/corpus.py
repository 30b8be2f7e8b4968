"""Corpus files: find them, check them before any work starts, and turn records into one document schema.

Formats: JSON Lines (``.jsonl``, ``.json``, optionally compressed), Parquet, and plain text or Markdown
files (one document each). Every document becomes ``doc_id, title, text, metadata`` where ``metadata`` is a
JSON object (as a string) holding every other field of the record, so any input schema fits one output schema.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from configs.errors import RagtuneError
from sharding.ids import doc_id_from_content
from sharding.storage import Location, resolve

log = logging.getLogger("ragtune.corpus")

Kind = Literal["jsonl", "parquet", "text"]

_KINDS: dict[str, Kind] = {
    ".jsonl": "jsonl", ".json": "jsonl", ".jsonl.gz": "jsonl", ".json.gz": "jsonl", ".jsonl.zst": "jsonl",
    ".parquet": "parquet", ".txt": "text", ".md": "text", ".markdown": "text",
}
_HEAD_BYTES = 1 << 20  # how much of a JSONL or text file preflight reads

DOC_SCHEMA = pa.schema([
    ("doc_id", pa.string()), ("title", pa.string()), ("text", pa.string()), ("metadata", pa.string()),
])


class CorpusError(RagtuneError):
    """The corpus cannot be read as given; the message names the file and the fix."""


@dataclass(frozen=True)
class CorpusFile:
    path: str  # inside the filesystem (what readers are given, with the filesystem)
    uri: str  # as the user would write it, for messages
    rel: str  # relative to the corpus root it was found under: the id of a text document
    kind: Kind
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Corpus:
    """The files of a corpus, grouped by how they are read."""

    fs: pafs.FileSystem
    files: tuple[CorpusFile, ...]

    def of_kind(self, kind: Kind) -> list[CorpusFile]:
        return [f for f in self.files if f.kind == kind]

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def fingerprint(self) -> str:
        """Changes when a file is added, removed, resized or rewritten (by size and modification time)."""
        h = hashlib.sha256()
        for f in self.files:
            h.update(f"{f.uri}\0{f.size}\0{f.mtime_ns}\n".encode())
        return h.hexdigest()[:16]


def kind_of(name: str) -> Kind | None:
    lower = name.lower()
    for ext, kind in _KINDS.items():
        if lower.endswith(ext):
            return kind
    return None


def list_corpus(paths: str | Sequence[str]) -> Corpus:
    """Find the corpus files under each path (a file or a folder, searched recursively)."""
    paths = [paths] if isinstance(paths, str) else list(paths)
    files: list[CorpusFile] = []
    fs: pafs.FileSystem | None = None
    for p in paths:
        loc = resolve(p)
        if fs is not None and type(loc.fs) is not type(fs):
            raise CorpusError(f"corpus.path mixes filesystems ({p!r}). Fix: keep every corpus path on one store")
        fs = loc.fs
        try:
            top = loc.fs.get_file_info(loc.path)
        except OSError as e:
            raise CorpusError(f"corpus.path {p!r} cannot be read: {e}") from None
        if top.type == pafs.FileType.NotFound:
            raise CorpusError(f"corpus.path {p!r} does not exist. Fix: check the path (relative paths start "
                              "from the directory the job runs in)")
        if top.type == pafs.FileType.File:
            kind = kind_of(top.path)
            if kind is None:
                raise CorpusError(f"corpus.path {p!r} is not a supported file. Fix: use .jsonl, .json, .parquet, "
                                  ".txt or .md")
            files.append(_file(loc, top, top.base_name, kind))
            continue
        found = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True))
        for fi in sorted(found, key=lambda f: f.path):
            rel = fi.path[len(loc.path.rstrip("/")) + 1:]
            if fi.type != pafs.FileType.File or any(part.startswith((".", "_")) for part in rel.split("/")):
                continue  # hidden files, _SUCCESS markers and the like
            kind = kind_of(fi.path)
            if kind is not None:
                files.append(_file(loc, fi, rel, kind))
    if not files:
        raise CorpusError(f"corpus.path {paths} holds no .jsonl, .json, .parquet, .txt or .md files. "
                          "Fix: point corpus.path at the documents")
    assert fs is not None
    return Corpus(fs=fs, files=tuple(files))


def _file(root: Location, fi: pafs.FileInfo, rel: str, kind: Kind) -> CorpusFile:
    # rel == base name when the root itself is the file; the uri is only for messages
    uri = root.uri if root.path.rstrip("/") == fi.path.rstrip("/") else root.join(rel).uri
    mtime = int(fi.mtime.timestamp() * 1e9) if fi.mtime is not None else 0
    return CorpusFile(path=fi.path, uri=uri, rel=rel, kind=kind, size=fi.size or 0, mtime_ns=mtime)


ID_LIKE = ("_id", "id", "doc_id", "docid", "document_id", "uuid")  # fields that hold a document id elsewhere


def preflight(corpus: Corpus, text_field: str, id_field: str | None = None) -> int | None:
    """Check every file can be read and has ``text_field``; report every bad file at once.

    Returns the number of records when every file tells it cheaply (Parquet footers), else None.
    Raises CorpusError when any file is unreadable, has no text field, or when the corpus is empty, and when
    ``id_field`` is in no file's first record (or schema) while another id-like field is
    (:func:`check_id_field`).
    """
    problems: list[str] = []
    rows = 0
    known_rows = True
    nonempty = 0
    fields: list[list[str]] = []  # each JSONL and Parquet file's first record's fields (or columns)
    for f in corpus.files:
        try:
            if f.kind == "parquet":
                meta = pq.read_metadata(f.path, filesystem=corpus.fs)
                names = meta.schema.to_arrow_schema().names
                fields.append(names)
                if text_field not in names:
                    problems.append(f"{f.uri}: no `{text_field}` column (columns: {', '.join(names)}). "
                                    "Fix: set corpus.text_field to the column holding the text")
                rows += meta.num_rows
                nonempty += meta.num_rows > 0
            elif f.kind == "jsonl":
                known_rows = False
                first = _first_jsonl_record(corpus.fs, f)
                if first is None:
                    continue
                nonempty += 1
                fields.append(list(first))
                if text_field not in first:
                    problems.append(f"{f.uri}: the first record has no `{text_field}` field (fields: "
                                    f"{', '.join(first) or 'none'}). Fix: set corpus.text_field")
            else:
                known_rows = False
                with corpus.fs.open_input_stream(f.path) as s:
                    head = s.read(_HEAD_BYTES)
                _decode(head, f.uri, partial=len(head) == _HEAD_BYTES)
                nonempty += bool(head.strip())
        except CorpusError as e:
            problems.append(str(e))
        except (OSError, pa.ArrowException, UnicodeDecodeError, ValueError) as e:
            problems.append(f"{f.uri}: cannot be read as {f.kind} ({type(e).__name__}: {e})")
    if problems:
        n = len(problems)
        raise CorpusError(f"{n} corpus file{'s' if n > 1 else ''} cannot be used:\n" +
                          "\n".join(f"  - {p}" for p in problems))
    if nonempty == 0:
        raise CorpusError(f"the corpus is empty: {len(corpus.files)} file(s) and no documents. "
                          "Fix: point corpus.path at files that hold documents")
    check_id_field(fields, id_field)
    return rows if known_rows else None


def check_id_field(fields: Sequence[Sequence[str]], id_field: str | None) -> None:
    """``id_field`` against the fields the records have (one list per file): absent from every file while
    another id-like field (``ID_LIKE``) is present, every document id would silently become a content hash, and
    qrels, filters and deletes by id would match nothing: a CorpusError with the field to set. Absent with no
    id-like field: a warning (ids come from the content). ``id_field`` None: ids from the content, on purpose."""
    if id_field is None or not fields or any(id_field in f for f in fields):
        return
    seen = sorted({c for f in fields for c in f if c in ID_LIKE}, key=ID_LIKE.index)
    if seen:
        raise CorpusError(f"corpus.id_field = {id_field!r} is in no record, but the records have "
                          f"{', '.join(f'`{c}`' for c in seen)}: every document id would become a content hash, "
                          f"and qrels, filters and deletes by id would match nothing. Fix: set corpus.id_field: "
                          f"{seen[0]} (or corpus.id_field: null for ids from the content)", param="corpus.id_field")
    log.warning("corpus.id_field = %r is in no record (fields: %s): document ids come from the content", id_field,
                ", ".join(sorted({c for f in fields for c in f})[:12]))


def _first_jsonl_record(fs: pafs.FileSystem, f: CorpusFile) -> dict[str, Any] | None:
    compression = "detect" if f.path.endswith((".gz", ".zst")) else None
    with fs.open_input_stream(f.path, compression=compression) as s:
        head = s.read(_HEAD_BYTES)
    for magic, kind, ext in ((b"\x1f\x8b", "gzip", ".gz"), (b"\x28\xb5\x2f\xfd", "zstd", ".zst")):
        if compression is None and head.startswith(magic):  # compressed, and named as if it were not
            raise CorpusError(f"{f.uri}: {kind}-compressed, but its name does not end in {ext}. Fix: rename it "
                              f"{f.rel}{ext} (compressed JSON Lines are read as such), or decompress it")
    text = _decode(head, f.uri, partial=len(head) == _HEAD_BYTES).removeprefix("\ufeff")  # a BOM: read as UTF-8
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("[") and lineno == 1:
            raise CorpusError(f"{f.uri}: a JSON array, not JSON Lines. Fix: write one object per line "
                              "(e.g. `jq -c '.[]' in.json > out.jsonl`)")
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if len(head) == _HEAD_BYTES and lineno == len(text.splitlines()):
                raise CorpusError(f"{f.uri}: line {lineno} is longer than {_HEAD_BYTES} bytes") from None
            raise CorpusError(f"{f.uri}: line {lineno} is not JSON ({e.msg}). Fix: one JSON object per line") \
                from None
        if not isinstance(record, dict):
            raise CorpusError(f"{f.uri}: line {lineno} is a JSON {type(record).__name__}, not an object")
        return record
    return None


def _decode(data: bytes, uri: str, partial: bool) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        if partial and e.start >= len(data) - 4:  # a character cut by the read limit
            return data[: e.start].decode("utf-8")
        raise CorpusError(f"{uri}: not UTF-8 text (byte {e.start}). Fix: re-encode the file as UTF-8") from None


# --- records -> documents -------------------------------------------------------------------------------------

def _clean(v: Any) -> Any:
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    return v


def to_documents(table: pa.Table, text_field: str, id_field: str | None, title_field: str) -> pa.Table:
    """Records with any columns -> DOC_SCHEMA. Missing ids come from the content; other fields -> metadata."""
    cols = table.column_names
    n = table.num_rows
    texts = table.column(text_field).to_pylist() if text_field in cols else [None] * n
    ids = table.column(id_field).to_pylist() if id_field in cols else [None] * n
    titles = table.column(title_field).to_pylist() if title_field in cols else [None] * n
    meta_cols = [c for c in cols if c not in (text_field, id_field, title_field)]
    meta_rows = table.select(meta_cols).to_pylist() if meta_cols else [{}] * n
    out_ids, out_titles, out_texts, out_meta = [], [], [], []
    for doc_id, title, text, meta in zip(ids, titles, texts, meta_rows, strict=True):
        text = "" if text is None else str(text)
        title = None if title is None else str(title)
        out_ids.append(str(doc_id) if doc_id is not None and str(doc_id) != "" else doc_id_from_content(title, text))
        out_titles.append(title)
        out_texts.append(text)
        out_meta.append(json.dumps({k: _clean(v) for k, v in meta.items()}, ensure_ascii=False, default=str,
                                   sort_keys=True))
    return pa.table([out_ids, out_titles, out_texts, out_meta], schema=DOC_SCHEMA)


_HEADING = re.compile(r"^\s{0,3}#\s+(.+?)\s*#*\s*$", re.MULTILINE)


def text_file_document(rel: str, data: bytes) -> dict[str, str | None]:
    """A .txt or .md file as one document: id = its path under the corpus root, title = its first # heading."""
    text = data.decode("utf-8")
    title = None
    if rel.lower().endswith((".md", ".markdown")):
        m = _HEADING.search(text)
        title = m.group(1) if m else None
    return {"doc_id": rel, "title": title, "text": text, "metadata": json.dumps({"path": rel})}


# --- a small corpus, read in this process ---------------------------------------------------------------------

def read_documents_local(paths: str | Sequence[str], text_field: str, id_field: str | None,
                         title_field: str) -> pa.Table:
    """A corpus (JSONL, Parquet, text/Markdown files; local or URI) as documents (DOC_SCHEMA), read in this
    process: the same reading and document schema as the embed job's Ray Data reads (for small corpora, e.g.
    the new documents of ``ragtune index add``)."""
    import pyarrow.json as pajson

    corpus = list_corpus(paths)
    preflight(corpus, text_field, id_field)
    tables = []
    for f in corpus.files:
        if f.kind == "jsonl":
            compression = "detect" if f.path.endswith((".gz", ".zst")) else None
            with corpus.fs.open_input_stream(f.path, compression=compression) as stream:
                t = pajson.read_json(stream)
            tables.append(to_documents(t, text_field, id_field, title_field))
        elif f.kind == "parquet":
            tables.append(to_documents(pq.read_table(f.path, filesystem=corpus.fs), text_field, id_field,
                                       title_field))
        else:
            with corpus.fs.open_input_stream(f.path) as stream:
                tables.append(pa.Table.from_pylist([text_file_document(f.rel, stream.read())], schema=DOC_SCHEMA))
    return pa.concat_tables(tables)
