"""FAISS indexes: factory strings, training, adding (on a GPU where there is one) and shard files.

FAISS vocabulary: ``xb`` database vectors, ``xq`` queries, ``xt`` training vectors, ``nb``/``nq``/``nt`` their
counts, ``d`` the dimension, ``k`` results per query, ``D``/``I`` distances and ids. ``faiss`` is imported inside
functions, so importing this module is cheap (``ragtune validate`` imports no faiss).
"""

from __future__ import annotations

import logging
import os
import uuid
from typing import Any

import numpy as np

from configs.errors import RagtuneError
from sharding.layout import MANIFEST
from sharding.storage import (
    TMP_MARK,
    Location,
    atomic_write_bytes,
    exists,
    info,
    read_bytes,
    sha256_file,
    sha256_hex,
)

log = logging.getLogger("ragtune.index")

HNSW_EF_CONSTRUCTION = 100  # candidates kept while linking a new HNSW node (FAISS default 40)


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


TWO_LEVEL_MIN_NLIST = 4096  # coarse_training auto: two-level k-means from this many IVF lists up, on CPUs


def coarse_training(setting: str, index: Any, gpu: int | None) -> str:
    """How ``index``'s coarse quantizer is trained: ``kmeans`` (faiss's own, one k-means over nlist centroids) or
    ``two_level``. ``auto``: two-level for an IVF of at least ``TWO_LEVEL_MIN_NLIST`` lists trained on CPUs (a
    GPU's k-means is fast enough), and only where the IVF sees the vectors as given (no pre-transform)."""
    import faiss

    if setting != "auto":
        return setting
    ivf = faiss.try_extract_index_ivf(index)
    plain = not isinstance(faiss.downcast_index(index), faiss.IndexPreTransform)
    return "two_level" if ivf is not None and plain and gpu is None and ivf.nlist >= TWO_LEVEL_MIN_NLIST \
        else "kmeans"


def train_index(index: Any, xt: np.ndarray, gpu: int | None = None, coarse: str = "kmeans") -> Any:
    """Train ``index`` on ``xt`` (nt, d) once; on a GPU the k-means of IVF kinds runs there.

    ``coarse`` two_level (:func:`coarse_training`): the IVF's centroids come from faiss's two-level clustering
    (``faiss.contrib.clustering.two_level_clustering``: sqrt(nlist) clusters, then each split in proportion to
    its size), as faiss's billion-scale benchmarks train large coarse quantizers: each point is compared with
    about 2 x sqrt(nlist) centroids over 25 iterations instead of nlist over faiss's 10, about sqrt(nlist) / 5
    times less work (7.5x faster measured at 4,096 lists, 5.8x at 8,192 with PQ96, docs/scale.md): the
    fixed cost of a build at any N. The rest (PQ, SQ, refinement) trains as faiss trains it, on the same
    vectors."""
    import faiss

    if index.is_trained:
        return index
    xt = np.ascontiguousarray(xt, dtype=np.float32)
    ivf = faiss.try_extract_index_ivf(index)
    if gpu is not None and ivf is not None:
        # the coarse k-means is most of the training; PQ/SQ codebooks are small and train on the CPU
        ivf.clustering_index = faiss.index_cpu_to_gpu(gpu_resources(gpu), gpu, faiss.IndexFlatL2(ivf.d))
    elif coarse == "two_level" and ivf is not None and ivf.quantizer.ntotal == 0:
        from faiss.contrib.clustering import two_level_clustering

        if isinstance(faiss.downcast_index(index), faiss.IndexPreTransform):
            raise RagtuneError("index.coarse_training = two_level needs an IVF that sees the vectors as given; "
                               "this factory transforms them first. Fix: index.coarse_training: auto or kmeans")
        if len(xt) < ivf.nlist:
            raise RagtuneError(f"{len(xt):,} training vectors for {ivf.nlist:,} IVF lists. Fix: raise "
                               "index.train_sample or choose fewer lists")
        centroids, _ = two_level_clustering(xt, max(1, int(np.sqrt(ivf.nlist))), ivf.nlist,
                                            spherical=bool(ivf.cp.spherical), seed=int(ivf.cp.seed))
        ivf.quantizer.add(np.ascontiguousarray(centroids, dtype=np.float32))  # faiss's train then skips the k-means
    index.train(xt)
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
        digest, size = sha256_file(tmp), os.path.getsize(tmp)
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
        digest = sha256_file(loc.path) if data is None else sha256_hex(data)
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

