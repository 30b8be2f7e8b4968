"""Files on local disks and object stores through one interface (pyarrow.fs), with atomic writes.

A local path stays a path; a URI that pyarrow knows (``s3://``, ``gs://``, ``hdfs://``, ``file://``) goes through
``pyarrow.fs.FileSystem.from_uri``, and any other scheme fsspec knows (``az://``, ``memory://``, ...) through
fsspec wrapped as a pyarrow filesystem. Writers never leave a half-written file under its final name: they write
a temporary sibling and rename it (on local disks after an fsync, so a crash leaves the old file or the new).
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import uuid
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs

from configs.errors import RagtuneError, redact, storage_error

TMP_MARK = ".tmp-"


@dataclass(frozen=True)
class Location:
    """A folder or file: its filesystem and the path inside it."""

    fs: pafs.FileSystem
    path: str
    uri: str  # as the user wrote it, for messages

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    @property
    def portable(self) -> str:
        """What to hand to another process: the absolute path when local (its working directory may differ),
        else the URI."""
        return self.path if self.is_local else self.uri

    @property
    def shown(self) -> str:
        """The URI without its credentials: for messages, logs, summaries and manifests."""
        return redact(self.uri)

    def join(self, *names: str) -> Location:
        """A path inside this folder; ``..`` segments (manifests name files of earlier versions as
        ``../v-00002/shard-00000.faiss``) are resolved here, so object stores see plain keys. A URI's query
        (``?endpoint_override=...``) stays at its end, so that the joined URI opens the same storage."""
        base, query = split_query(self.uri)
        path = "/".join([self.path.rstrip("/"), *names])
        uri = "/".join([base.rstrip("/"), *names])
        if any(".." in n.split("/") for n in names):
            path, uri = _normpath(path), _normpath(uri)
        return Location(self.fs, path, uri + query)

    @property
    def parent(self) -> Location:
        """The folder this file or folder is in (the query of a URI kept)."""
        base, query = split_query(self.uri)
        return Location(self.fs, self.path.rstrip("/").rsplit("/", 1)[0], base.rstrip("/").rsplit("/", 1)[0] + query)

    @property
    def name(self) -> str:
        """The last segment of the path (``v-00001``)."""
        return self.path.rstrip("/").rsplit("/", 1)[-1]


def with_credentials_of(recorded: str, given: Location) -> str:
    """A URI a manifest records (without credentials: :func:`configs.errors.redact`) with the credentials of the
    URI the user gave to reach that manifest, when both are on the same scheme and the recorded one carries
    none; else as recorded (a local path, other storage, or credentials from the environment)."""
    m = _USERINFO.match(given.uri)
    scheme, sep, rest = recorded.partition("://")
    if m is None or not sep or scheme != m.group(1) or _USERINFO.match(recorded):
        return recorded
    return f"{scheme}://{m.group(2)}@{rest}"


_USERINFO = re.compile(r"([a-z][a-z0-9+.-]*)://([^/@?#]+)@", re.IGNORECASE)


def split_query(uri: str) -> tuple[str, str]:
    """``(the URI up to its query, "?query" or "")``; a local path has no query (``?`` is a character of it)."""
    if "://" not in uri:
        return uri, ""
    base, sep, query = uri.partition("?")
    return base, sep + query


def _normpath(p: str) -> str:
    scheme, sep, rest = p.partition("://")
    if not sep:
        return posixpath.normpath(p)
    return f"{scheme}://{posixpath.normpath(rest)}"


def resolve(uri_or_path: str) -> Location:
    """Turn a user's path or URI into a Location; local paths become absolute."""
    if "://" in uri_or_path:
        try:
            fs, path = pafs.FileSystem.from_uri(uri_or_path)
        except pa.ArrowInvalid:  # not a scheme pyarrow implements: ask fsspec
            fs, path = _fsspec(uri_or_path)
        except OSError as e:  # S3 resolves the bucket's region here: the first network call
            raise storage_error(uri_or_path, e) from None
        return Location(fs, path, uri_or_path)
    path = os.path.abspath(os.path.expanduser(uri_or_path))
    return Location(pafs.LocalFileSystem(), path, uri_or_path)


def _fsspec(uri: str) -> tuple[pafs.FileSystem, str]:
    try:
        import fsspec

        fs, path = fsspec.core.url_to_fs(uri)
    except (ImportError, ValueError) as e:
        raise RagtuneError(f"{uri}: no filesystem for this URI ({e}). Fix: use a local path or an s3://, gs://, "
                           "hdfs:// or file:// URI, or install the fsspec package for the scheme") from None
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def info(loc: Location) -> pafs.FileInfo:
    return loc.fs.get_file_info(loc.path)


def exists(loc: Location) -> bool:
    return info(loc).type != pafs.FileType.NotFound


def makedirs(loc: Location) -> None:
    loc.fs.create_dir(loc.path, recursive=True)


def read_bytes(loc: Location) -> bytes:
    with loc.fs.open_input_stream(loc.path) as f:
        return f.read()


def uploads_whole(loc: Location) -> bool:
    """Whether ``loc``'s storage shows a file only once it is whole, so it is written in place: S3 shows a key
    only once its upload (one PUT, or a multipart upload's completion) is complete. A temporary + move there
    would be a CopyObject, which S3 refuses above 5 GiB (a large FAISS shard) and which writes the bytes twice."""
    return isinstance(loc.fs, pafs.S3FileSystem)


def atomic_write_bytes(loc: Location, data: bytes) -> None:
    """Write ``data`` to ``loc`` so that readers see the old file or the whole new one, never a part."""
    tmp = f"{loc.path}{TMP_MARK}{uuid.uuid4().hex[:12]}"
    if loc.is_local:
        os.makedirs(os.path.dirname(loc.path), exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, loc.path)
        return
    if uploads_whole(loc):
        with loc.fs.open_output_stream(loc.path) as f:
            f.write(data)
        return
    with loc.fs.open_output_stream(tmp) as f:
        f.write(data)
    loc.fs.move(tmp, loc.path)  # a copy + delete elsewhere: the final key appears whole or not at all


def create_exclusive(loc: Location, data: bytes) -> bool:
    """Create ``loc`` holding ``data`` only if nothing is there; False if something is.

    Local and shared POSIX filesystems: ``os.open(O_CREAT | O_EXCL)``, atomic. Object stores have no exclusive
    create through pyarrow: best effort, the caller writes a token and reads it back (``sharding.versions``).
    """
    if loc.is_local:
        os.makedirs(os.path.dirname(loc.path), exist_ok=True)
        try:
            fd = os.open(loc.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return True
    if exists(loc):
        return False
    with loc.fs.open_output_stream(loc.path) as f:
        f.write(data)
    return True


def list_dir(loc: Location) -> list[pafs.FileInfo]:
    """Entries directly inside a folder (none when it does not exist)."""
    if not exists(loc):
        return []
    return loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=False))


def delete_file(loc: Location) -> None:
    if exists(loc):
        loc.fs.delete_file(loc.path)


def delete_dir_if_empty(loc: Location) -> bool:
    """Remove a folder that holds no file (empty subfolders go with it); True if it is gone."""
    if not exists(loc):
        return True
    entries = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True))
    if any(e.type == pafs.FileType.File for e in entries):
        return False
    loc.fs.delete_dir(loc.path)
    return True


def list_files(loc: Location) -> list[str]:
    """Every file under a folder, as paths relative to it (none when it does not exist)."""
    if not exists(loc):
        return []
    base = loc.path.rstrip("/") + "/"
    return sorted(f.path[len(base):] for f in loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True))
                  if f.type == pafs.FileType.File)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_of(loc: Location, block: int = 1 << 22) -> str:
    """The sha256 of a file on any filesystem, read in blocks (never whole in memory)."""
    h = hashlib.sha256()
    with loc.fs.open_input_stream(loc.path) as f:
        while data := f.read(block):
            h.update(data)
    return h.hexdigest()


def sha256_file(path: str) -> str:
    """The sha256 of a local file, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(1 << 22):
            h.update(data)
    return h.hexdigest()
