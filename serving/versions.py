"""Index versions in the serving app: which version requests are answered from, and the versions a replica holds.

A version is named by its folder's URI. One deployment holds the *pointer* (:class:`VersionPointer`: the
Retriever in the split layout, the Ingress in the fused one): it names the version of each request, so one
request never mixes versions, and switches to what ``LATEST`` names (polling ``index.poll_interval_s``, or
``POST /admin/reload``) only after the replicas that search have loaded it. The replicas that search (the
ShardSearchers, or the fused IndexReplicas) hold their versions in :class:`LoadedVersions`: the newest two, each
loaded on demand, so a replica that restarts, or has not yet seen a new version, still answers correctly (only
slower, once); searches already under way finish on the version they started on. Their docstores:
:class:`Docstores`.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

from configs.errors import Conflict, InvalidRequest, redact
from configs.schema.serve import IndexSource, SearchMode
from serving.rag import resolve_mode
from serving.schemas import Reloaded
from sharding.choice import human_bytes
from sharding.docstore import Docstore
from sharding.manifest import IndexManifest, read_index_manifest, resolve_index
from sharding.search import ShardedIndex, open_docstore, resident_bytes
from sharding.storage import resolve

log = logging.getLogger("ragtune.serve")

KEEP_VERSIONS = 2  # versions a replica keeps loaded: the current one and the one before


def current_version(path: str) -> str:
    """The URI of the version folder an index path means now (its LATEST, or the folder itself)."""
    return resolve_index(path).uri


def version_name(version: str) -> str:
    """What a client is told of a version: its folder's name (``v-00001``), never the path or URI it lives at
    (which names the server's filesystem or bucket, and may carry credentials)."""
    return version.partition("?")[0].rstrip("/").rsplit("/", 1)[-1] if "://" in version else \
        version.rstrip("/").rsplit("/", 1)[-1]


class LoadedVersions:
    """The opened versions of one searching replica (the newest ``KEEP_VERSIONS``) of its shards (``shards``;
    None = every shard of each version), loaded in a thread of their own, one load per version however many
    requests wait for it. ``lexical``: each version's BM25 shards load with it (``retrieval.mode`` not dense);
    otherwise a lexical request loads them on demand (``ShardedIndex.lexical_shards``). With
    ``index.poll_interval_s``, a version is loaded as soon as LATEST names it, before any request asks for it.
    ``owner`` names the replica kind in the versions' reader leases."""

    def __init__(self, source: IndexSource, shards: Sequence[int] | None, device: Literal["cpu", "gpu"],
                 lexical: bool, owner: str):
        self.source, self.shards, self.device, self.lexical, self.owner = source, shards, device, lexical, owner
        self.versions: OrderedDict[str, ShardedIndex] = OrderedDict()
        self.loading: dict[str, asyncio.Future[ShardedIndex]] = {}
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="load")
        self.poller: asyncio.Task[None] | None = None

    def load_current(self) -> str:
        """Load the version LATEST names now, in this thread (a replica is not ready before it is); its URI."""
        first = current_version(self.source.path)
        self.versions[first] = self._open(first)
        return first

    def _open(self, version: str) -> ShardedIndex:
        t0 = time.perf_counter()
        mmap = self.source.mmap and self.device == "cpu"
        # segments this version shares with one already loaded (the base files an `index add` keeps) are reused,
        # not loaded again: a swap after an add costs its deltas; GPU copies are per version
        reuse: dict[tuple[str, str], tuple[Any, dict[str, int]]] = {}
        if self.device == "cpu":
            for loaded in list(self.versions.values()):
                reuse.update(loaded.loaded_segments())
        if self.versions:  # a swap: the new version loads beside the one served
            self._check_room(version, mmap, reuse)
        index = ShardedIndex.open(version, verify=self.source.verify, mmap=mmap, params=self.source.params,
                                  only=None if self.shards is None else list(self.shards), lease=self.owner,
                                  reuse=reuse)
        if self.device == "gpu":
            _to_gpu(index)
        lexical = self.lexical and index.manifest.lexical is not None
        if lexical:
            index.lexical_shards()
        log.info("%s %s of %s loaded in %.2fs (%d vectors%s)", self.owner,
                 "every shard" if self.shards is None else f"shards {list(self.shards)}", redact(version),
                 time.perf_counter() - t0, index.ntotal, ", BM25 too" if lexical else "")
        return index

    def _check_room(self, version: str, mmap: bool, loaded: dict[tuple[str, str], Any]) -> None:
        """Refuse a version whose shards do not fit in memory beside the version served (before loading them)."""
        import psutil

        loc = resolve_index(version)
        manifest = read_index_manifest(loc)
        shards = list(range(len(manifest.shards))) if self.shards is None else list(self.shards)
        need = resident_bytes(loc, manifest, shards, mmap, loaded)
        free = psutil.virtual_memory().available
        if need > 0.9 * free:
            raise Conflict(
                f"{version_name(version)}: shards {shards} need about {human_bytes(need)} in memory beside the version "
                f"served, and {human_bytes(free)} is free here. Fix: give the replicas more memory, split the index "
                "into more groups (shards.layout: split, shards.groups), keep shards memory-mapped on local disk "
                "(index.mmap: true), or serve the new version with a new deployment (ragtune serve)",
                code="not_enough_memory")

    async def get(self, version: str) -> ShardedIndex:
        """The opened ``version``, loaded now if it is not (the oldest one beyond ``KEEP_VERSIONS`` let go)."""
        if self.poller is None and self.source.poll_interval_s:
            self.poller = asyncio.get_running_loop().create_task(self._poll())
        if version in self.versions:
            self.versions.move_to_end(version)
            return self.versions[version]
        if version not in self.loading:  # one load per version, however many requests wait for it
            loop = asyncio.get_running_loop()
            self.loading[version] = loop.run_in_executor(self.pool, self._open, version)
        try:
            index = await asyncio.shield(self.loading[version])
        finally:
            if self.loading.get(version) is not None and self.loading[version].done():
                self.loading.pop(version, None)
        self.versions[version] = index
        self.versions.move_to_end(version)
        while len(self.versions) > KEEP_VERSIONS:
            self.versions.popitem(last=False)  # searches still running on it keep their reference
        return index

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.source.poll_interval_s or 10)
            try:
                await self.get(current_version(self.source.path))
            except Exception as e:  # a half-written version or a storage hiccup: the next poll tries again
                log.warning("polling %s for a new version: %s", redact(self.source.path), redact(str(e)))


class Docstores:
    """The docstores of the newest ``KEEP_VERSIONS`` versions, each opened on first use with a reader lease
    (``owner``). Call from one thread only (the replica's docstore thread, never its event loop): a lookup reads
    row groups from disk or an object store, and that thread owns the open Parquet readers."""

    def __init__(self, owner: str):
        self.owner = owner
        self.stores: OrderedDict[str, Docstore] = OrderedDict()

    def get(self, version: str, manifest: IndexManifest | None = None) -> Docstore:
        if version not in self.stores:
            m = manifest or read_index_manifest(resolve(version))
            self.stores[version] = open_docstore(resolve(version), m, lease=self.owner)  # deltas, tombstones
            while len(self.stores) > KEEP_VERSIONS:
                self.stores.popitem(last=False)
        self.stores.move_to_end(version)
        return self.stores[version]


Prepare = Callable[[str, IndexManifest], Awaitable[None]]  # load a version wherever it is searched


class VersionPointer:
    """The version requests are answered from, and the switch to a new one.

    ``mode`` is ``retrieval.mode``: a version it cannot serve (lexical or hybrid without BM25 shards) is refused at
    start and never switched to. ``prepare(version, manifest)`` loads a new version where it is searched (every
    shard group, or a fused replica) and raises to keep the old one. ``on_switch(version)``, when given, is
    awaited after a switch to what LATEST names (by ``reload``, so also by polling), before the switch is answered:
    the fused layout publishes it to its other replicas there (``serving.fused.VersionBoard``).
    """

    def __init__(self, index: IndexSource, mode: SearchMode,
                 on_switch: Callable[[str], Awaitable[None]] | None = None):
        self.path, self.poll_interval_s, self.mode = index.path, index.poll_interval_s, mode
        self.on_switch = on_switch
        self.version = current_version(index.path)
        self.manifests = {self.version: read_index_manifest(resolve_index(self.version))}
        resolve_mode(mode, self.manifests[self.version], self.version, "retrieval.mode")
        self.switching = asyncio.Lock()
        self.poller: asyncio.Task[None] | None = None

    @property
    def manifest(self) -> IndexManifest:
        return self.manifests[self.version]

    def poll(self, prepare: Prepare) -> None:
        """Start following LATEST (every ``index.poll_interval_s``; once, from the first request)."""
        if self.poller is None and self.poll_interval_s:
            self.poller = asyncio.get_running_loop().create_task(self._poll(prepare))

    async def _poll(self, prepare: Prepare) -> None:
        while True:
            await asyncio.sleep(self.poll_interval_s or 10)
            try:
                await self.reload(prepare)
            except Exception as e:
                log.warning("polling %s for a new version: %s", redact(self.path), redact(str(e)))

    async def reload(self, prepare: Prepare) -> Reloaded:
        """Switch to the version LATEST names now, once ``prepare`` has loaded it (then ``on_switch``)."""
        async with self.switching:
            new = current_version(self.path)
            old = self.version
            if new != old:
                await self._switch(new, prepare)
            if self.on_switch is not None:  # also when unchanged here: other replicas may still be behind
                await self.on_switch(new)
            return Reloaded(version=version_name(new), previous=version_name(old), changed=new != old)

    async def switch_to(self, version: str, prepare: Prepare) -> None:
        """Switch to ``version`` (another replica's switch, published), once ``prepare`` has loaded it."""
        async with self.switching:
            if version != self.version:
                await self._switch(version, prepare)

    async def _switch(self, new: str, prepare: Prepare) -> None:
        manifest = read_index_manifest(resolve(new))
        try:  # retrieval.mode lexical or hybrid and a version without BM25 shards: keep serving the old one
            resolve_mode(self.mode, manifest, version_name(new), "retrieval.mode")
        except InvalidRequest as e:
            raise Conflict(f"not switching to it: {e.message}", code=e.code) from None
        await prepare(new, manifest)
        self.manifests[new] = manifest
        log.info("index version %s -> %s", redact(self.version), redact(new))
        self.version = new


# The GPU resources of each index whose shards were moved onto the GPU, held as long as that index lives: its GPU
# shards use them, also in a search still running on a version the replica has let go of.
_GPU_RESOURCES: weakref.WeakKeyDictionary[ShardedIndex, object] = weakref.WeakKeyDictionary()


def _to_gpu(index: ShardedIndex) -> None:
    """Move each shard of an opened index onto the replica's GPU where FAISS can (Flat and IVF kinds; HNSW stays
    on the CPU). The search parameters are set again through the GPU parameter space."""
    import faiss

    if faiss.get_num_gpus() == 0:
        log.warning("shards.device = gpu but FAISS sees no GPU here (faiss-cpu installed?); searching on the CPU")
        return
    res = faiss.StandardGpuResources()
    for n, shard in enumerate(index.shards):
        try:
            gpu = faiss.index_cpu_to_gpu(res, 0, shard)
        except (RuntimeError, AttributeError) as e:  # e.g. HNSW: no GPU version
            log.warning("shard %d stays on the CPU (%s)", n, str(e).splitlines()[-1][:120])
            continue
        ps = faiss.GpuParameterSpace()
        for name, value in index.params.items():
            try:
                ps.set_index_parameter(gpu, name, value)
            except RuntimeError:
                log.warning("search parameter %s=%s does not apply on GPU", name, value)
        index.shards[n] = gpu
    _GPU_RESOURCES[index] = res
