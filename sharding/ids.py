"""Stable 63-bit ids: the same input gives the same id on every machine, run and Python version.

FAISS ids are int64 and -1 means "no result", so ids are kept non-negative (63 bits).
"""

from __future__ import annotations

import hashlib

_MASK63 = (1 << 63) - 1


def hash64(*parts: str | int) -> int:
    """A non-negative 63-bit hash of the parts (blake2b, not Python's salted ``hash``)."""
    data = "\x1f".join(str(p) for p in parts).encode("utf-8")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") & _MASK63


def chunk_id(doc_id: str, chunk_index: int, chunker_fingerprint: str) -> int:
    """The id of chunk ``chunk_index`` of ``doc_id`` under one chunker configuration."""
    return hash64(doc_id, chunk_index, chunker_fingerprint)


def doc_id_from_content(title: str | None, text: str) -> str:
    """An id for a document that has none: identical documents get the same id."""
    return "h" + hashlib.blake2b(f"{title or ''}\x1f{text}".encode(), digest_size=8).hexdigest()
