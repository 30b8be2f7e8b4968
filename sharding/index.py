"""Sharded FAISS indexes: shard plans, the automatic index choice, build, shard files, manifests and versions.

On disk (DESIGN.md, "Data flow and formats" 4)::

    <path>/LATEST                         "v-00002": the version readers open (switched atomically)
    <path>/v-00002/manifest.json          factory, metric, d, shards (ntotal, sha256), search params, recall
    <path>/v-00002/shard-00000.faiss      ids = chunk_id (int64), so shards never need remapping
    <path>/v-00002/docstore/shard-00000.parquet   chunk_id -> doc_id, text, ... sorted by chunk_id
    <path>/v-00002/lexical/shard-00000.npz       BM25 shard over the same chunks (sharding/lexical.py)
    <path>/v-00002/tuning.png             recall@10 vs QPS of the search parameters tried

A version folder is written completely before ``LATEST`` names it and is never changed afterwards, so a reader
that opened version N keeps working while N+1 is built. Versions written by ``ragtune index add|delete|compact``
share the files of earlier versions: a manifest names a file of version 2 as ``../v-00002/shard-00000.faiss``
(paths are relative to the manifest's own folder, as in manifests written before freshness existed), and adds
per-shard delta segments (``shard-00000.d000.faiss`` + docstore + BM25) and tombstones (``tombstones/``)
(``sharding/freshness.py``, docs/index.md "Freshness"). FAISS vocabulary: ``xb`` database vectors, ``xq``
queries, ``xt`` training vectors, ``nb``/``nq``/``nt`` their counts, ``d`` the dimension, ``k`` results per query,
``D``/``I`` distances and ids. ``faiss`` is imported inside functions, so importing this module is cheap.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, Field

from configs.schema.base import RagtuneError
from sharding.embeddings import MANIFEST as EMBEDDINGS_MANIFEST
from sharding.embeddings import PartRecord
from sharding.lexical import LexicalManifest, LexicalRecord
from sharding.storage import (
    TMP_MARK,
    Location,
    atomic_write_bytes,
    exists,
    info,
    list_dir,
    read_bytes,
    resolve,
    sha256_hex,
)

log = logging.getLogger("ragtune.index")

FORMAT = "ragtune.index/1"
MANIFEST = "manifest.json"
LATEST = "LATEST"
PUBLISHED = "PUBLISHED"  # in a version folder: LATEST named it (sharding.versions)
DOCSTORE_DIR = "docstore"
Metric = Literal["inner_product", "l2"]

# Defaults of the automatic choice (docs/index.md explains each).
SHARD_VECTORS = 2_000_000  # one shard per this many vectors when index.shards is null
HNSW_MAX_VECTORS = 10_000_000  # beyond this, HNSW builds take hours per shard: IVF trains once and adds fast
TRAIN_PER_LIST = 50  # training vectors per IVF list (FAISS warns below 39)
PQ_TRAIN_MIN = 10_000  # PQ codebooks have 256 centroids: 39 x 256 points at least
IDMAP2_BYTES = 56  # per vector: the int64 id + its entry in IndexIDMap2's reverse map (measured)
HNSW_EF_CONSTRUCTION = 100  # candidates kept while linking a new HNSW node (FAISS default 40)
REFINE_K_FACTOR = 16  # IVF-PQ + refine: re-rank k x 16 candidates on SQ8 codes (cheap next to the IVF scan)
GPU_PQ_SUBDIMS = {1, 2, 3, 4, 6, 8, 10, 12, 16, 20, 24, 28, 32}  # d / m that faiss GPU IVF-PQ supports


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


TRAINED = "trained.faiss"  # the trained empty index every shard and delta starts from


def version_name(n: int) -> str:
    return f"v-{n:05d}"


def carry(rel: str, version: str) -> str:
    """A file named ``rel`` by the manifest of ``version``, as a newer version's manifest names it: relative to
    the newer version's folder (a sibling), so ``shard-00000.faiss`` of v-00002 becomes
    ``../v-00002/shard-00000.faiss``; a name that already points at a sibling stays as it is."""
    return rel if rel.startswith("../") else f"../{version}/{rel}"


def root_relative(version: str, rel: str) -> str:
    """The path under the index root of a file ``rel`` named by the manifest of ``version``."""
    import posixpath

    return posixpath.normpath(f"{version}/{rel}")


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


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


# --- the automatic choice -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class IndexChoice:
    """Which index to build and why."""

    factory: str  # FAISS factory string (IDMap2 is added at build time where the kind keeps no ids)
    kind: str  # flat | hnsw | ivf_flat | ivf_pq | custom
    reason: str
    est_bytes: int | None  # estimated memory of the whole index once loaded; None for custom strings
    train_size: int  # vectors to train on; 0 = the index needs no training


def nlist_for(nb: int, train_sample: int | None = None) -> int:
    """IVF lists: the power of two at or below 4 * sqrt(nb) (FAISS's guideline is 4-16 x sqrt(nb)), and at
    most what ``train_sample`` vectors can train (39 per list)."""
    n = 2 ** max(4, int(math.floor(math.log2(max(4 * math.sqrt(nb), 16)))))
    limit = min(nb, train_sample) if train_sample else nb
    while n > 16 and 39 * n > limit:
        n //= 2
    return n


def pq_sizes(d: int, use_gpu: bool = False) -> list[int]:
    """Bytes per vector (PQ sub-quantizers m, 8 bits each) that divide ``d``, largest first."""
    sizes = [m for m in range(min(96, d // 2), 3, -1) if d % m == 0]
    if use_gpu:
        sizes = [m for m in sizes if d // m in GPU_PQ_SUBDIMS]
    return sizes


def estimate_bytes(kind: str, nb: int, d: int, *, M: int = 32, nlist: int = 0, m: int = 0,
                   refine: bool = False) -> int:
    """Memory of an index once loaded (as autofaiss estimates it: codes + ids + coarse quantizer).

    Building can take up to ~1.5x of one shard while inverted lists grow.
    """
    quantizer = nlist * 4 * d + (nlist * 9 * 32 if nlist >= 65536 else 0)
    if kind == "flat":
        return nb * (4 * d + IDMAP2_BYTES)
    if kind == "hnsw":
        return nb * (4 * d + 9 * M + IDMAP2_BYTES)  # level 0 keeps 2M links of 4 bytes, upper levels ~M/8
    if kind == "ivf_flat":
        return nb * (4 * d + 8) + quantizer
    if kind == "ivf_pq":
        per = m + 8 + (d + IDMAP2_BYTES if refine else 0)
        return nb * per + quantizer + 256 * 4 * d
    raise ValueError(f"unknown index kind {kind!r}")


def _ivf(nlist: int, use_gpu: bool) -> str:
    # a flat coarse quantizer compares every query with every list; past 64k lists a graph is cheaper (CPU)
    return f"IVF{nlist}_HNSW32" if nlist >= 65536 and not use_gpu else f"IVF{nlist}"


def _train_size(nb: int, nlist: int, pq: bool, train_sample: int | None) -> int:
    want = train_sample if train_sample else max(TRAIN_PER_LIST * nlist, PQ_TRAIN_MIN if pq else 0)
    return min(nb, want)


def choose_index(nb: int, d: int, max_memory: int, *, use_gpu: bool = False, exact_below: int = 10_000,
                 train_sample: int | None = None) -> IndexChoice:
    """Pick Flat / HNSW / IVF-Flat / IVF-PQ (+ refinement) from size, dimension and a memory budget.

    Rules, in order (after autofaiss's ``get_optimal_index_keys_v2``, with an exact tier first):

    1. fewer than ``exact_below`` vectors: Flat (exact; fast enough, nothing to tune);
    2. CPU, at most 10M vectors: HNSW32 (else HNSW16) if it fits: the fastest at high recall, no training;
    3. IVF-Flat if it fits (GPUs: the first choice, faiss has no GPU HNSW): exact distances in the lists;
    4. IVF-PQ with SQ8 refinement if it fits: PQ codes scan fast, the refinement restores the top ranks;
    5. IVF-PQ with the largest code that fits;
    (PQ codes are trained without polysemous training, ``np``: it is only used by Hamming-threshold search)
    6. nothing fits: a RagtuneError that says how much memory the smallest index needs.

    Args:
        nb: vectors to index.
        d: their dimension.
        max_memory: bytes the whole index may take in RAM on one node.
        use_gpu: the build runs on GPUs (HNSW is skipped: faiss has no GPU HNSW).
        exact_below: rule 1's threshold.
        train_sample: vectors available for training, when the user fixed it (limits the IVF lists).
    """
    budget = human_bytes(max_memory)
    flat = estimate_bytes("flat", nb, d)
    if nb < exact_below and flat <= max_memory:
        return IndexChoice("Flat", "flat", f"{nb:,} vectors < index.exact_below ({exact_below:,}): exact search is "
                           f"fast enough and needs no tuning ({human_bytes(flat)} <= {budget})", flat, 0)
    why_not_hnsw = "the build runs on GPUs (faiss has no GPU HNSW)" if use_gpu else ""
    if not use_gpu and nb > HNSW_MAX_VECTORS:
        why_not_hnsw = f"{nb:,} vectors > {HNSW_MAX_VECTORS:,} (HNSW would take hours to build per shard)"
    if not why_not_hnsw:
        for M in (32, 16):
            est = estimate_bytes("hnsw", nb, d, M=M)
            if est <= max_memory:
                return IndexChoice(f"HNSW{M}", "hnsw", f"HNSW{M} fits the budget ({human_bytes(est)} <= {budget}): "
                                   "the fastest kind on CPU at high recall, no training", est, 0)
        why_not_hnsw = f"HNSW16 needs {human_bytes(estimate_bytes('hnsw', nb, d, M=16))} > {budget}"
    nlist = nlist_for(nb, train_sample)
    est = estimate_bytes("ivf_flat", nb, d, nlist=nlist)
    if est <= max_memory:
        return IndexChoice(f"{_ivf(nlist, use_gpu)},Flat", "ivf_flat",
                           f"{why_not_hnsw}; IVF{nlist}-Flat fits ({human_bytes(est)} <= {budget}): exact distances "
                           "inside the probed lists", est, _train_size(nb, nlist, False, train_sample))
    why_not_flat = f"IVF-Flat needs {human_bytes(est)} > {budget}"
    sizes = pq_sizes(d, use_gpu)
    if not sizes:
        raise RagtuneError(f"d = {d} has no divisor usable as a PQ code size and IVF-Flat needs {human_bytes(est)} > "
                           f"index.max_memory = {budget}. Fix: raise index.max_memory, or set index.kind to a "
                           f"factory string such as IVF{nlist},SQ8")
    refined = [m for m in sizes if d // m >= 8] or sizes[-1:]  # ~8 dims per code byte: fast, refinement fixes the rest
    m = refined[0]
    est = estimate_bytes("ivf_pq", nb, d, nlist=nlist, m=m, refine=True)
    if est <= max_memory:
        return IndexChoice(f"{_ivf(nlist, use_gpu)},PQ{m}np,Refine(SQ8)", "ivf_pq",
                           f"{why_not_hnsw}; {why_not_flat}; IVF-PQ{m} with SQ8 refinement fits ({human_bytes(est)} "
                           f"<= {budget}): PQ scans fast, re-ranking on 8-bit codes restores recall", est,
                           _train_size(nb, nlist, True, train_sample))
    for m in sizes:
        est = estimate_bytes("ivf_pq", nb, d, nlist=nlist, m=m)
        if est <= max_memory:
            return IndexChoice(f"{_ivf(nlist, use_gpu)},PQ{m}np", "ivf_pq",
                               f"{why_not_hnsw}; {why_not_flat}; refinement codes do not fit; IVF-PQ{m} is the "
                               f"largest code that fits ({human_bytes(est)} <= {budget}); recall may stay below "
                               "the target", est, _train_size(nb, nlist, True, train_sample))
    smallest = estimate_bytes("ivf_pq", nb, d, nlist=nlist, m=sizes[-1])
    raise RagtuneError(f"no index kind fits index.max_memory = {budget} for {nb:,} vectors of d = {d}: the smallest, "
                       f"IVF{nlist},PQ{sizes[-1]}, needs about {human_bytes(smallest)}. Fix: raise index.max_memory to "
                       f"at least {human_bytes(smallest * 1.1)}")


def explicit_choice(factory: str, nb: int, d: int, train_sample: int | None = None) -> IndexChoice:
    """An index the user named with a factory string: classify it and size its training sample."""
    ivf = re.search(r"IVF(\d+)", factory)
    pq = bool(re.search(r"PQ\d", factory))
    if ivf:
        nlist = int(ivf.group(1))
        kind = "ivf_pq" if pq else "ivf_flat" if re.search(r"IVF\d+(_\w+)?,Flat", factory) else "custom"
        train = _train_size(nb, nlist, pq, train_sample)
    else:
        kind = "flat" if factory == "Flat" else "hnsw" if factory.startswith("HNSW") else "custom"
        train = min(nb, train_sample or max(PQ_TRAIN_MIN, 10_000))  # used only if the index needs training
    return IndexChoice(factory, kind, f"given as index.kind = {factory!r}", None, train)


def default_num_shards(nb: int, est_bytes: int | None = None, gpu_memory: int | None = None) -> int:
    """One shard per 2M vectors; on GPUs also enough shards that each fits one device."""
    n = max(1, math.ceil(nb / SHARD_VECTORS))
    if gpu_memory and est_bytes:
        n = max(n, math.ceil(est_bytes / gpu_memory))
    return min(n, nb)


# --- building (faiss) ---------------------------------------------------------------------------------------------

def faiss_metric(metric: str) -> int:
    import faiss

    if metric == "inner_product":
        return faiss.METRIC_INNER_PRODUCT
    if metric == "l2":
        return faiss.METRIC_L2
    raise RagtuneError(f"metric {metric!r} is not supported. Fix: embed with embed.metric inner_product or l2")


def _keeps_ids(index: Any) -> bool:
    """True when ``add_with_ids`` works on this index as built by the factory (IVF kinds keep ids)."""
    import faiss

    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexPreTransform):
        return _keeps_ids(index.index)
    return isinstance(index, (faiss.IndexIVF, faiss.IndexIDMap, faiss.IndexIDMap2))


def effective_factory(factory: str, d: int, metric: str) -> str:
    """The factory string to build: ``factory``, behind ``IDMap2,`` when that kind keeps no ids of its own
    (Flat, HNSW, Refine), so that every shard stores chunk ids. A string FAISS refuses is a RagtuneError."""
    import faiss

    try:
        index = faiss.index_factory(d, factory, faiss_metric(metric))
    except RuntimeError as e:
        msg = str(e).strip().splitlines()[-1][:200]
        raise RagtuneError(f"index.kind = {factory!r} is not a FAISS factory string that FAISS accepts for d = {d} "
                           f"({msg}). Fix: use auto, or a string such as Flat, HNSW32, IVF1024,Flat, "
                           "IVF1024,PQ48,Refine(SQ8)") from None
    return factory if _keeps_ids(index) else f"IDMap2,{factory}"


def index_layers(index: Any) -> list[Any]:
    """The index and the indexes it wraps (IDMap2, PreTransform, Refine -> base), outermost first."""
    import faiss

    out: list[Any] = []
    cur: Any = faiss.downcast_index(index)
    while cur is not None:
        out.append(cur)
        if isinstance(cur, (faiss.IndexIDMap, faiss.IndexIDMap2, faiss.IndexPreTransform)):
            cur = faiss.downcast_index(cur.index)
        elif isinstance(cur, faiss.IndexRefine):
            cur = faiss.downcast_index(cur.base_index)
        else:
            cur = None
    return out


def new_index(factory: str, d: int, metric: str) -> Any:
    """An empty index from a factory string that :func:`effective_factory` returned.

    HNSW graphs are built with ``efConstruction`` 100 instead of FAISS's 40 (the factory string cannot say it):
    on 200k real-like vectors queried with real questions, recall@10 at efSearch 64 rose from 0.915 to 0.961
    for 2.2x the build time (docs/benchmarks.md).
    """
    import faiss

    index = faiss.index_factory(d, factory, faiss_metric(metric))
    for layer in index_layers(index):
        if isinstance(layer, faiss.IndexHNSW):
            layer.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    return index


_GPU_RESOURCES: dict[int, Any] = {}


def gpu_resources(gpu: int) -> Any:
    """One ``StandardGpuResources`` per device and process; checks that faiss sees the GPU first."""
    import faiss

    n = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if gpu >= n:
        raise RagtuneError(f"building on GPU {gpu} but faiss sees {n} GPU(s) (faiss-cpu, or no CUDA device). "
                           "Fix: install faiss-gpu (pip install '.[gpu]') or set index.device = cpu")
    if gpu not in _GPU_RESOURCES:
        _GPU_RESOURCES[gpu] = faiss.StandardGpuResources()
    return _GPU_RESOURCES[gpu]


def train_index(index: Any, xt: np.ndarray, gpu: int | None = None) -> Any:
    """Train ``index`` on ``xt`` (nt, d) once; on a GPU the k-means of IVF kinds runs there."""
    import faiss

    if index.is_trained:
        return index
    ivf = faiss.try_extract_index_ivf(index)
    if gpu is not None and ivf is not None:
        # the coarse k-means is most of the training; PQ/SQ codebooks are small and train on the CPU
        ivf.clustering_index = faiss.index_cpu_to_gpu(gpu_resources(gpu), gpu, faiss.IndexFlatL2(ivf.d))
    index.train(np.ascontiguousarray(xt, dtype=np.float32))
    return index


class ShardBuilder:
    """Adds (ids, xb) batches to a copy of the trained index; on a GPU for IVF kinds, else on the CPU."""

    def __init__(self, trained: Any, gpu: int | None = None):
        import faiss

        self.index = trained
        self.device_index = trained
        self.on_gpu = False
        if gpu is not None and isinstance(faiss.downcast_index(trained), faiss.IndexIVF):
            try:
                self.device_index = faiss.index_cpu_to_gpu(gpu_resources(gpu), gpu, trained)
                self.on_gpu = True
            except RuntimeError as e:  # a kind the GPU cloner does not support: the same adds on the CPU
                log.warning("cannot add on GPU %d (%s); adding on the CPU", gpu, str(e).splitlines()[-1][:120])

    def add(self, ids: np.ndarray, xb: np.ndarray) -> None:
        self.device_index.add_with_ids(np.ascontiguousarray(xb, dtype=np.float32),
                                       np.ascontiguousarray(ids, dtype=np.int64))

    def finish(self) -> Any:
        """The index on the CPU, ready to write."""
        import faiss

        return faiss.index_gpu_to_cpu(self.device_index) if self.on_gpu else self.index


def serialize(index: Any) -> bytes:
    import faiss

    return faiss.serialize_index(index).tobytes()


def deserialize(data: bytes) -> Any:
    import faiss

    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))


# --- shard files ----------------------------------------------------------------------------------------------------

def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def write_index_file(index: Any, loc: Location) -> tuple[str, int]:
    """Write a FAISS index atomically (temp + fsync + rename); returns (sha256, bytes)."""
    import faiss

    if not loc.is_local:
        data = serialize(index)
        atomic_write_bytes(loc, data)
        return sha256_hex(data), len(data)
    tmp = f"{loc.path}{TMP_MARK}{uuid.uuid4().hex[:12]}"
    try:
        faiss.write_index(index, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        digest, size = _sha256_file(tmp), os.path.getsize(tmp)
        os.replace(tmp, loc.path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return digest, size


def mmap_flags(factory: str) -> int:
    """FAISS read flags that map a local shard instead of reading it: IO_FLAG_MMAP maps IVF lists and does
    nothing for Flat/HNSW storage, IO_FLAG_MMAP_IFC maps that (FACTS.md); both at once fail on IVF."""
    import faiss

    return faiss.IO_FLAG_MMAP if "IVF" in factory else faiss.IO_FLAG_MMAP_IFC


def read_index_file(loc: Location, sha256: str | None = None, flags: int = 0) -> Any:
    """Read a shard; with ``sha256`` verify it first. A missing, altered or truncated file is a RagtuneError
    naming the file. ``flags`` are FAISS IO flags for local files (see :func:`mmap_flags`)."""
    import faiss

    fix = "Fix: rebuild the index with `ragtune index` (it writes a new version), or open an older version"
    if not exists(loc):
        raise RagtuneError(f"{loc.uri}: index shard listed in {MANIFEST} is missing. {fix}")
    data = None if loc.is_local else read_bytes(loc)
    if sha256 is not None:
        digest = _sha256_file(loc.path) if data is None else sha256_hex(data)
        if digest != sha256:
            raise RagtuneError(f"{loc.uri}: checksum mismatch: the shard was changed or truncated after it was "
                               f"written ({info(loc).size:,} bytes on disk). {fix}")
    try:
        if data is not None:
            return deserialize(data)
        return faiss.read_index(loc.path, flags)
    except RuntimeError as e:
        msg = str(e).strip().splitlines()[-1][-160:]
        raise RagtuneError(f"{loc.uri}: not a readable FAISS index, truncated or corrupted ({msg}). {fix}") from None


def read_part_table(emb: Location, record: PartRecord, columns: list[str] | None = None) -> pa.Table:
    """One embedding part, read once and checked against the embeddings manifest's sha256."""
    loc = emb.join(record.file)
    if not exists(loc):
        raise RagtuneError(f"{loc.uri}: listed in {EMBEDDINGS_MANIFEST} but missing. Fix: rerun `ragtune embed` with "
                           "the same config to rebuild it")
    data = read_bytes(loc)
    if sha256_hex(data) != record.sha256:
        raise RagtuneError(f"{loc.uri}: checksum mismatch (file changed or truncated). Fix: rerun `ragtune embed` "
                           "with --overwrite")
    return pq.read_table(io.BytesIO(data), columns=columns)


# --- samples for training and tuning -------------------------------------------------------------------------------

def sample_rows(parts: Sequence[tuple[str, int]], n_train: int, n_queries: int,
                seed: int = 0) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Choose training rows and held-out query rows, disjoint when there are enough rows.

    Parts are taken in a seeded random order until they hold twice what is needed (embedding parts are a
    uniform random split of the chunks, so a few parts are a random sample and the rest need not be read).

    Returns:
        (part, train rows, query rows) for each part that is read; row numbers are sorted, within the part.
    """
    rng = np.random.default_rng(seed)
    total = sum(r for _, r in parts)
    nq = min(n_queries, total)
    need = min(total, 2 * (n_train + nq))
    chosen, held = [], 0
    for i in rng.permutation(len(parts)):
        if parts[i][1] == 0:
            continue
        chosen.append(int(i))
        held += parts[i][1]
        if held >= need:
            break
    chosen.sort()
    if nq + n_train <= held:
        pos = rng.choice(held, size=nq + n_train, replace=False)
        q_pos, t_pos = pos[:nq], pos[nq:]
    else:  # too few rows to hold queries out: train on every row
        q_pos, t_pos = rng.choice(held, size=nq, replace=False), np.arange(held)
    out, offset = [], 0
    for i in chosen:
        name, rows = parts[i]
        t = np.sort(t_pos[(t_pos >= offset) & (t_pos < offset + rows)] - offset)
        q = np.sort(q_pos[(q_pos >= offset) & (q_pos < offset + rows)] - offset)
        if len(t) or len(q):
            out.append((name, t, q))
        offset += rows
    return out


# --- manifest and versions ------------------------------------------------------------------------------------------

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
    operation: Literal["build", "add", "delete", "compact"]
    parent: str | None = None  # the version it started from (None for a build)
    at: float  # when the manifest was written (epoch seconds)
    seconds: float = 0.0  # how long the operation took
    ntotal: int  # live vectors after it
    counts: dict[str, int] = Field(default_factory=dict)  # e.g. added, updated, skipped, deleted, compacted


class IndexManifest(BaseModel):
    """``manifest.json`` of one index version: how it was built, what it holds, how to search it."""

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
    model: dict[str, Any]  # the embedding model (name, path, revision, max_seq_length)
    chunker: dict[str, Any] = Field(default_factory=dict)
    embeddings: dict[str, Any] = Field(default_factory=dict)  # path, rows, parts, updated_at
    shards: list[ShardRecord]
    trained: dict[str, Any] | None = None  # sha256 of the trained empty index all shards share; rows; seconds
    search_params: dict[str, int] = Field(default_factory=dict)
    recall: dict[str, Any] = Field(default_factory=dict)  # k, recall, target, reached, queries, qps
    tuning: list[dict[str, Any]] = Field(default_factory=list)  # params, recall, qps of each candidate tried
    build: dict[str, Any] = Field(default_factory=dict)  # seconds, hardware, faiss version
    config: dict[str, Any] = Field(default_factory=dict)
    created_at: float = Field(default_factory=time.time)
    lexical: LexicalManifest | None = None  # BM25 shards beside the FAISS shards; None: dense search only
    operation: Literal["build", "add", "delete", "compact"] = "build"
    parent: str | None = None  # the version this one was written from (add, delete, compact)
    history: list[HistoryEntry] = Field(default_factory=list)  # every write up to this version, oldest first

    def entries(self) -> list[HistoryEntry]:
        """The history, with one entry made up for a manifest written before histories existed."""
        if self.history:
            return self.history
        return [HistoryEntry(version=self.version, operation=self.operation, at=self.created_at,
                             seconds=float(self.build.get("seconds", 0.0)), ntotal=self.ntotal,
                             counts={"vectors": self.ntotal})]


def write_index_manifest(version_dir: Location, manifest: IndexManifest) -> None:
    atomic_write_bytes(version_dir.join(MANIFEST), manifest.model_dump_json(indent=2).encode())


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
            out += [d.file, d.docstore] + ([d.lexical.file] if d.lexical else [])
    if m.lexical:
        out += [r.file for r in m.lexical.shards] + ([m.lexical.stats.file] if m.lexical.stats else [])
    if m.trained and m.trained.get("file"):
        out.append(m.trained["file"])
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
    if c.trained and c.trained.get("file"):
        c.trained = {**c.trained, "file": carry(c.trained["file"], old)}
    return c
