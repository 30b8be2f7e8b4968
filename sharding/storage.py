"""Files on local disks and object stores through one interface (pyarrow.fs), with atomic writes.

A local path stays a path; a URI that pyarrow knows (``s3://``, ``gs://``, ``hdfs://``, ``file://``) goes through
``pyarrow.fs.FileSystem.from_uri``, and any other scheme fsspec knows (``az://``, ``memory://``, ...) through
fsspec wrapped as a pyarrow filesystem. Writers never leave a half-written file under its final name: they write
a temporary sibling and rename it (on local disks after an fsync, so a crash leaves the old file or the new).
"""

from __future__ import annotations

import hashlib
import os
import uuid
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs

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

    def join(self, *names: str) -> Location:
        path = "/".join([self.path.rstrip("/"), *names])
        uri = "/".join([self.uri.rstrip("/"), *names])
        return Location(self.fs, path, uri)


def resolve(uri_or_path: str) -> Location:
    """Turn a user's path or URI into a Location; local paths become absolute."""
    if "://" in uri_or_path:
        try:
            fs, path = pafs.FileSystem.from_uri(uri_or_path)
        except pa.ArrowInvalid:  # not a scheme pyarrow implements: ask fsspec
            fs, path = _fsspec(uri_or_path)
        return Location(fs, path, uri_or_path)
    path = os.path.abspath(os.path.expanduser(uri_or_path))
    return Location(pafs.LocalFileSystem(), path, uri_or_path)


def _fsspec(uri: str) -> tuple[pafs.FileSystem, str]:
    from configs.schema.base import RagtuneError

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
    with loc.fs.open_output_stream(tmp) as f:
        f.write(data)
    loc.fs.move(tmp, loc.path)  # a copy + delete on object stores: the final key appears whole or not at all


def list_dir(loc: Location) -> list[pafs.FileInfo]:
    """Entries directly inside a folder (none when it does not exist)."""
    if not exists(loc):
        return []
    return loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=False))


def delete_file(loc: Location) -> None:
    if exists(loc):
        loc.fs.delete_file(loc.path)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
