"""Where an index's files live and which embedding rows each shard holds.

On disk (DESIGN.md, "Data flow and formats" 4)::

    <path>/LATEST                         "v-00002": the version readers open (switched atomically)
    <path>/v-00002/manifest.json          factory, metric, d, shards (ntotal, sha256), search params, recall
    <path>/v-00002/shard-00000.faiss      ids = chunk_id (int64), so shards never need remapping
    <path>/v-00002/docstore/shard-00000.parquet   chunk_id -> doc_id, text, ... sorted by chunk_id
    <path>/v-00002/lexical/shard-00000/          BM25 shard over the same chunks, .npy arrays (sharding/lexical.py)
    <path>/v-00002/shard-00000.d000.faiss        a delta segment of shard 0 (``ragtune index add``)
    <path>/v-00002/tombstones/shard-00000.npz    chunk ids masked in each segment of shard 0
    <path>/v-00002/trained.faiss          the trained empty index every shard and delta starts from
    <path>/v-00002/tuning.png             recall@10 vs QPS of the search parameters tried

A version folder is written completely before ``LATEST`` names it and is never changed afterwards, so a reader
that opened version N keeps working while N+1 is built. Versions written by ``ragtune index add|delete|compact``
share the files of earlier versions: a manifest names a file of version 2 as ``../v-00002/shard-00000.faiss``
(every path in a manifest is relative to the manifest's own folder). The manifest itself is ``sharding.manifest``;
the FAISS files ``sharding.faiss_index``; the automatic choice of index ``sharding.choice``.
"""

from __future__ import annotations

import math
import posixpath
from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel

from configs.errors import RagtuneError

MANIFEST = "manifest.json"
LATEST = "LATEST"
PUBLISHED = "PUBLISHED"  # in a version folder: LATEST named it (sharding.versions)
DOCSTORE_DIR = "docstore"
TRAINED = "trained.faiss"  # the trained empty index every shard and delta starts from


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.faiss"


def docstore_name(index: int) -> str:
    return f"{DOCSTORE_DIR}/shard-{index:05d}.parquet"


def delta_name(shard: int, pos: int) -> str:
    """Delta segment ``pos`` (0, 1, ...) of a shard: chunks added after the base was built."""
    return f"shard-{shard:05d}.d{pos:03d}.faiss"


def delta_docstore_name(shard: int, pos: int) -> str:
    return f"{DOCSTORE_DIR}/shard-{shard:05d}.d{pos:03d}.parquet"


def tombstone_name(shard: int) -> str:
    return f"tombstones/shard-{shard:05d}.npz"

def version_name(n: int) -> str:
    return f"v-{n:05d}"


def carry(rel: str, version: str) -> str:
    """A file named ``rel`` by the manifest of ``version``, as a newer version's manifest names it: relative to
    the newer version's folder (a sibling), so ``shard-00000.faiss`` of v-00002 becomes
    ``../v-00002/shard-00000.faiss``; a name that already points at a sibling stays as it is."""
    return rel if rel.startswith("../") else f"../{version}/{rel}"


def root_relative(version: str, rel: str) -> str:
    """The path under the index root of a file ``rel`` named by the manifest of ``version``."""
    return posixpath.normpath(f"{version}/{rel}")



# --- shard plan ---------------------------------------------------------------------------------------------------

class Piece(BaseModel):
    """Rows ``[start, stop)`` of one embedding part."""

    part: str
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


def plan_shards(parts: Sequence[tuple[str, int]], num_shards: int) -> list[list[Piece]]:
    """Split the rows of the parts (in order) into ``num_shards`` contiguous runs of nearly equal size.

    Every row of every part lands in exactly one shard. A boundary that falls within 10% of a shard's size
    of a part boundary moves onto it, so parts of similar size (the embed job's are) are rarely split.

    Args:
        parts: (part file, rows) in order; parts with no rows are skipped.
        num_shards: wanted shards; fewer are made when there are fewer rows.

    Returns:
        One list of pieces per shard, none empty.
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    total = sum(rows for _, rows in parts)
    if total == 0:
        raise RagtuneError("the embeddings hold no vectors. Fix: embed a corpus with text first (`ragtune embed`)")
    s = min(num_shards, total)
    bounds = [i * total // s for i in range(s + 1)]
    edges = np.cumsum([0] + [rows for _, rows in parts])
    tol = 0.1 * total / s
    for i in range(1, s):
        near = int(edges[np.abs(edges - bounds[i]).argmin()])
        if abs(near - bounds[i]) <= tol and bounds[i - 1] < near < bounds[i + 1]:
            bounds[i] = near
    shards: list[list[Piece]] = [[] for _ in range(s)]
    offset, j = 0, 0
    for name, rows in parts:
        start = 0
        while start < rows:
            while bounds[j + 1] <= offset + start:
                j += 1
            stop = min(rows, bounds[j + 1] - offset)
            shards[j].append(Piece(part=name, start=start, stop=stop))
            start = stop
        offset += rows
    return shards


# --- samples for training and tuning -------------------------------------------------------------------------------

def sample_rows(parts: Sequence[tuple[str, int]], n_train: int, n_queries: int,
                seed: int = 0) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Choose training rows and held-out query rows, disjoint when there are enough rows, from every part.

    A part's rows are in chunk-id order, and chunk ids are hashes, so the first rows of a part are a uniform
    sample of it. Every part gives its first rows in proportion to its size (twice what is needed in all), and
    the rows are drawn from those: the sample covers the whole corpus even when the input is ordered (by source,
    date or topic) and each part is a range of it, and each part is read only as far as its sample goes.

    Returns:
        (part, train rows, query rows) for each part sampled; row numbers are sorted, within the part.
    """
    rng = np.random.default_rng(seed)
    total = sum(r for _, r in parts)
    nq = min(n_queries, total)
    share = min(1.0, 2 * (n_train + nq) / total) if total else 0.0
    heads = [min(rows, math.ceil(share * rows)) for _, rows in parts]  # the first rows of each part
    held = sum(heads)
    if nq + n_train <= held:
        pos = rng.choice(held, size=nq + n_train, replace=False)
        q_pos, t_pos = pos[:nq], pos[nq:]
    else:  # too few rows to hold queries out: train on every row
        q_pos, t_pos = rng.choice(held, size=nq, replace=False), np.arange(held)
    out, offset = [], 0
    for (name, _), head in zip(parts, heads, strict=True):
        t = np.sort(t_pos[(t_pos >= offset) & (t_pos < offset + head)] - offset)
        q = np.sort(q_pos[(q_pos >= offset) & (q_pos < offset + head)] - offset)
        if len(t) or len(q):
            out.append((name, t, q))
        offset += head
    return out

