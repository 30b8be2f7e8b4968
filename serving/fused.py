"""The fused layout: the Ingress replicas hold the whole index themselves, the query encoder, every shard (FAISS and
BM25) and the docstore (an :class:`IndexReplica` object in each Ingress replica's process).

    proxy --> Ingress (HTTP + embed + every shard + docstore)     /v1/search, chat retrieval, /v1/embeddings
                 \\----> Generator                                 chat, completions
    VersionBoard: the index version every Ingress replica answers from

With ``shards.fused_in_ingress`` false (the default with 2 or more replicas) the IndexReplica is a Serve deployment
of its own behind one Ingress, which holds the version pointer and calls it once per search, retrying on another
replica a call whose replica died (``serving.deployments.call_retrying``): one more hop, no request lost with a
replica.

    proxy --> Ingress (HTTP, version pointer) --> IndexReplica (embed + every shard + docstore)

The serving plan (``cluster.placement.plan_serving``, ``shards.layout``) chooses it when the whole index fits
one replica's memory budget: a search then crosses no deployment at all (proxy -> Ingress), where the split
layout makes five calls (Retriever, Embedder, the shard groups, back); the Ingress replicas scale like a shard
group (``shards.replicas``, ``shards.autoscaling``). Concurrent queries are batched three times: their texts go
through one forward pass of the encoder (``BatchedEncoder``, shared with ``/v1/embeddings``), then their vectors
through one FAISS search and their texts through one BM25 search per (mode, depth) (``serving.rag.search_many``),
then their passages through one docstore read, in a thread of its own, never on the event loop. Each batch is
taken when the last one has finished (``serving.batching.Batcher``). Results are those of the split layout and
of ``sharding.search.search`` over all shards: the same functions (``resolve_mode``, ``search_k``, ``widen_k``,
``group_rankings``, ``combine``, ``passages_from``'s ``passages_of``) with the whole index as one group.

Versions: each Ingress replica holds a version pointer (``serving.versions.VersionPointer``) and names the
version of each of its searches; its IndexReplica holds the newest two versions (``LoadedVersions``), loaded on
demand and checked for room before a swap, exactly as a ShardSearcher does. The replicas agree through the
:class:`VersionBoard`: a replica that switches (``/admin/reload`` or polling) loads the new version, switches,
and publishes it; the board answers once every other live replica has loaded it and switched too (each follows
the board by a long poll, :func:`follow_board`), so a request sent after a reload was answered is answered from
the new version, whichever replica takes it.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from ray import serve

from cluster.placement import ReplicaResources
from configs.schema.serve import EmbedderConfig, IndexSource, RetrievalConfig
from serving.batching import Batcher
from serving.deployments import BatchedEncoder, Bursts, give_back_in_background, lower_cpu_priority, replica_name
from serving.rag import (
    PASSAGE_FIELDS,
    FusionOverrides,
    Query,
    make_fusion,
    passages_of,
    resolve_mode,
    search_k,
    search_many,
    widen_k,
)
from serving.schemas import (
    EmbedderInfo,
    Embedding,
    Health,
    Passage,
    SearchResult,
    SearchTimings,
    ShardsLoaded,
)
from serving.versions import Docstores, LoadedVersions, VersionPointer, version_name
from sharding.filters import Filter
from sharding.manifest import IndexManifest
from sharding.search import ShardedIndex


@dataclass(frozen=True)
class _Job:
    """One query of a search batch: the opened version it searches, the query, its vector (d,) (None: lexical)."""

    index: ShardedIndex
    query: Query
    xq: np.ndarray | None


def search_jobs(jobs: list[_Job]) -> list[tuple[np.ndarray, np.ndarray]]:
    """The top-kk (D, I) row of each job: ``search_many`` once per version among them."""
    out: list[tuple[np.ndarray, np.ndarray]] = [(np.zeros(0), np.zeros(0))] * len(jobs)
    by_version: dict[int, list[int]] = {}
    for n, job in enumerate(jobs):
        by_version.setdefault(id(job.index), []).append(n)
    for rows in by_version.values():
        index = jobs[rows[0]].index
        vectors = [jobs[r].xq for r in rows]
        xq = None if all(v is None for v in vectors) else np.stack(
            [np.zeros(index.manifest.dim, np.float32) if v is None else v for v in vectors]).astype(np.float32)
        for r, hit in zip(rows, search_many(index, xq, [jobs[r].query for r in rows]), strict=True):
            out[r] = hit
    return out


@dataclass(frozen=True)
class _Read:
    """One query's docstore read: its version, its merged (D, I) row, ``k`` and its filter."""

    version: str
    manifest: IndexManifest
    d: np.ndarray
    i: np.ndarray
    k: int
    filter: Filter | None


def read_passages(docstores: Docstores, reads: list[_Read]) -> list[list[Passage]]:
    """The passages of each read: one docstore lookup per version among them (the ids of all their rows)."""
    rows: dict[str, dict[int, dict[str, Any]]] = {}
    for version, manifest in {r.version: r.manifest for r in reads}.items():
        ids = np.concatenate([np.asarray(r.i).ravel() for r in reads if r.version == version])
        rows[version] = docstores.get(version, manifest).lookup(ids[ids >= 0], columns=list(PASSAGE_FIELDS))
    return [passages_of(r.d, r.i, rows[r.version], r.k, r.filter) for r in reads]


log = logging.getLogger("ragtune.serve")


@dataclass(frozen=True)
class FusedIndex:
    """What a fused Ingress replica builds its IndexReplica from, besides the index and ``retrieval`` sections it
    takes anyway: the encoder's batching and the replica's resources (threads, device)."""

    embedder: EmbedderConfig
    resources: ReplicaResources


class IndexReplica:
    """The whole index in one process (an Ingress replica's, or its own Serve replica's when the index is apart):
    encoder, shards, BM25 shards (unless ``retrieval.mode`` is dense) and docstore, for every version asked for (the
    newest two kept).

    ``embedder`` sizes the batches (``max_batch_size``, ``batch_wait_timeout_s``; ``batching: false`` = every
    query alone), ``retrieval`` gives the mode, fusion and filter candidate counts, ``resources`` the device of
    the shards and the threads of torch and FAISS (one forward pass or search at a time, on one thread).
    ``trim_after_bursts``: give the memory freed back to the system after a burst of searches, and every 30 s of
    them (:class:`serving.deployments.Bursts`; apart: in an Ingress replica, its admission does it for the process).
    """

    def __init__(self, index: IndexSource, embedder: EmbedderConfig, retrieval: RetrievalConfig,
                 resources: ReplicaResources, board: Any = None, trim_after_bursts: bool = True):
        import faiss
        import torch

        torch.set_num_threads(resources.threads)
        faiss.omp_set_num_threads(resources.threads)
        self.retrieval, self.fusion = retrieval, make_fusion(retrieval.fusion)
        self.compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="index")  # forward passes, searches
        self.docstore_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="docstore")
        self.held = LoadedVersions(index, None, resources.device, retrieval.mode != "dense", "IndexReplica")
        first = self.held.load_current()  # not ready (nor healthy) before its shards and docstore are
        # apart (a deployment of its own): the board names the versions to load before the Ingress switches
        self.board, self.first = board, first
        self.follower: asyncio.Task[None] | None = None
        manifest = self.held.versions[first].manifest
        self.docstores = Docstores("IndexReplica")
        self.docstore_pool.submit(self.docstores.get, first, manifest).result()
        self.encoder = BatchedEncoder(manifest, embedder, self.compute)
        # batches taken when the last one has finished (serving.batching): the searches and docstore reads of the
        # queries that arrived meanwhile, together; no batch waits for more once the replica is busy
        batch = embedder.max_batch_size if embedder.batching else 1
        self._search_batched = Batcher(self._search_jobs, self.compute, batch, embedder.batch_wait_timeout_s)
        self._read_batched = Batcher(self._read_passages, self.docstore_pool, batch, 0.0)
        # apart, no Ingress's admission trims this process after a burst of searches: this replica does
        self.bursts = Bursts(give_back_in_background if trim_after_bursts else None)
        lower_cpu_priority(resources.nice)  # apart: a replica of its own (in the Ingress: 0, the Ingress's)

    # --- search ---------------------------------------------------------------------------------------------------

    def _follow(self) -> None:
        """Apart: start following the board once, from the first call (a replica's event loop runs by then)."""
        if self.board is not None and self.follower is None:
            self.follower = asyncio.get_running_loop().create_task(
                follow_versions(self.board, replica_name(), self.first, self.prepare))

    def _search_jobs(self, jobs: list[_Job]) -> list[tuple[np.ndarray, np.ndarray]]:
        return search_jobs(jobs)

    def _read_passages(self, reads: list[_Read]) -> list[list[Passage]]:
        return read_passages(self.docstores, reads)

    async def search(self, version: str, query: str, k: int, filter: Filter | None = None, mode: str | None = None,
                     fusion: FusionOverrides | None = None, param: str = "mode") -> SearchResult:
        """The top ``k`` passages of ``query`` in ``version`` (the Ingress's current one); ``mode``, ``fusion`` and
        ``param`` as ``Retriever.search`` takes them. Lexical searches embed nothing."""
        self.bursts.enter()
        try:
            return await self._search(version, query, k, filter, mode, fusion, param)
        finally:
            self.bursts.leave()

    async def _search(self, version: str, query: str, k: int, filter: Filter | None, mode: str | None,
                      fusion: FusionOverrides | None, param: str) -> SearchResult:
        self._follow()
        index = await self.held.get(version)
        manifest = index.manifest
        # a 400 before any work
        mode = resolve_mode(mode or self.retrieval.mode, manifest, version_name(version), param)
        fused = make_fusion(self.fusion, fusion)
        t0 = time.perf_counter()
        xq, batch = None, 0
        if mode != "lexical":
            embedding = await self.encoder.embed(query)
            xq, batch = embedding.vector, embedding.batch
        t1 = time.perf_counter()
        kk: int | None = search_k(k, filter, manifest.ntotal, self.retrieval.filter_overfetch)
        passages: list[Passage] = []
        while kk is not None:  # with a filter: more candidates until k pass (widen_k)
            d, i = await self._search_batched(_Job(index, Query(query, mode, kk, fused), xq))
            passages = await self._read_batched(_Read(version, manifest, d, i, k, filter))
            kk = widen_k(kk, k, len(passages), filter, manifest.ntotal, self.retrieval.filter_max_candidates)
        return SearchResult(passages=passages, version=version, mode=mode, embed_batch=batch,
                            timings=SearchTimings(embed_s=t1 - t0, search_s=time.perf_counter() - t1))

    async def prepare(self, version: str) -> None:
        """Load ``version`` (shards and docstore) now, before the Ingress switches to it."""
        self._follow()
        index = await self.held.get(version)
        await asyncio.get_running_loop().run_in_executor(self.docstore_pool, self.docstores.get, version,
                                                         index.manifest)

    async def ready(self, version: str) -> Health:
        """Whether this replica has loaded ``version`` (it loads it now if not: a replica that started after a
        switch)."""
        self._follow()
        n = len((await self.held.get(version)).manifest.shards)
        return Health(ready=True, version=version_name(version), shards=n, loaded=list(range(n)))

    def loaded(self) -> ShardsLoaded:
        versions = self.held.versions
        shards = len(next(reversed(versions.values())).manifest.shards)
        return ShardsLoaded(shards=list(range(shards)), versions=list(versions),
                            ntotal={v: idx.ntotal for v, idx in versions.items()})

    # --- embeddings -----------------------------------------------------------------------------------------------

    async def embed_many(self, texts: list[str]) -> list[Embedding]:
        self._follow()
        self.bursts.enter()
        try:
            return await self.encoder.embed_many(texts)
        finally:
            self.bursts.leave()

    def info(self) -> EmbedderInfo:
        return self.encoder.info()

    # --- replica ----------------------------------------------------------------------------------------------------

    def check_health(self) -> None:
        if not self.held.versions:
            raise RuntimeError("no index version loaded")


class Local:
    """An object of this process called the way a deployment handle is: ``local.method.remote(*args)`` is an
    awaitable of the method's result (awaited when the method is async). The Ingress calls its IndexReplica
    through it, so the routes read alike in both layouts and a fused search crosses no process."""

    def __init__(self, obj: object):
        self._obj = obj

    def __getattr__(self, name: str) -> _LocalMethod:
        return _LocalMethod(getattr(self._obj, name))


class _LocalMethod:
    def __init__(self, fn: Callable[..., Any]):
        self.fn = fn

    async def _call(self, *args: Any, **kwargs: Any) -> Any:
        out = self.fn(*args, **kwargs)
        return await out if inspect.isawaitable(out) else out

    def remote(self, *args: Any, **kwargs: Any) -> Awaitable[Any]:
        return self._call(*args, **kwargs)


# --- versions across the fused replicas -------------------------------------------------------------------------------

FOLLOW_S = 20.0  # a follow call answers after this at the latest (a heartbeat): a replica silent for
LIVE_S = 3 * FOLLOW_S  # longer than this is gone, and not waited for
PUBLISH_WAIT_S = 60.0  # how long a switch waits for the other replicas before it answers anyway (logged)


async def _wait(event: asyncio.Event, timeout: float) -> bool:
    """Whether ``event`` is set within ``timeout`` seconds. (Not ``asyncio.wait_for``: on Python 3.11 it can
    swallow the cancellation of the task that awaits it, and a replica's loop would then never stop.)"""
    waiter = asyncio.ensure_future(event.wait())
    try:
        done, _ = await asyncio.wait({waiter}, timeout=timeout)
        return bool(done)
    finally:
        waiter.cancel()


def _pulse(event: asyncio.Event) -> asyncio.Event:
    """Wake everyone waiting on ``event``; the fresh event to wait on next."""
    event.set()
    return asyncio.Event()


# graceful_shutdown_timeout_s: its requests are long polls that never finish by themselves; nothing is lost by
# cutting them (a replica's loop asks again)
@serve.deployment(name="VersionBoard", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=10_000,
                  graceful_shutdown_timeout_s=1)
class VersionBoard:
    """The index version the fused app answers from, and which of its Ingress replicas have switched to it (with
    the index apart: which IndexReplica replicas have loaded it; the one Ingress publishes, the replicas follow).

    Every Ingress replica calls :meth:`follow` in a loop (a long poll: it says which version the replica serves
    and answers when the board's differs, or after ``FOLLOW_S``); a replica that switched calls :meth:`publish`,
    which answers once every replica heard from in the last ``LIVE_S`` serves the new version (or after
    ``PUBLISH_WAIT_S``, naming the ones behind). A replica behind whose actor is gone (killed: Ray releases its
    name at once, :func:`actor_alive`) is not waited for. One replica of no CPU: it only holds a name per
    replica. A board that restarted knows no version: it takes the first one a replica reports.
    """

    def __init__(self) -> None:
        self.version: str | None = None
        self.serving: dict[str, tuple[str, float]] = {}  # replica -> (version it serves, when it last said so)
        self.new_version = asyncio.Event()  # pulsed when the version changes
        self.heard = asyncio.Event()  # pulsed when a replica reports

    async def follow(self, replica: str, have: str) -> str:
        """``replica`` serves ``have``; the version to serve, as soon as it is not ``have`` (else after
        ``FOLLOW_S``). A replica's first call is answered at once: a new replica answers no search before it."""
        if self.version is None:
            self.version = have
        known = replica in self.serving
        self.serving[replica] = (have, time.monotonic())
        self.heard = _pulse(self.heard)  # a publish may be waiting for this replica
        if self.version == have and known:
            await _wait(self.new_version, FOLLOW_S)
        return self.version

    def behind(self, version: str) -> list[str]:
        """The live replicas (heard from in the last ``LIVE_S``) that do not serve ``version``."""
        now = time.monotonic()
        return sorted(r for r, (v, seen) in self.serving.items() if v != version and now - seen < LIVE_S)

    async def publish(self, version: str) -> list[str]:
        """Make ``version`` the one to serve; answered once every live replica serves it: the replicas still
        behind after ``PUBLISH_WAIT_S`` (empty when all switched)."""
        if version != self.version:
            self.version = version
            self.new_version = _pulse(self.new_version)
        deadline = time.monotonic() + PUBLISH_WAIT_S
        while self.behind(version) and (left := deadline - time.monotonic()) > 0:
            for gone in [r for r in self.behind(version) if not actor_alive(r)]:  # killed while it was behind
                log.info("index version %s: replica %s is gone; not waiting for it", version_name(version), gone)
                del self.serving[gone]
            if self.behind(version):
                await _wait(self.heard, min(left, 1.0))  # again each second: a silent replica stops being live
        return self.behind(version)


def actor_alive(name: str) -> bool:
    """Whether the Ray actor named ``name`` (a replica, in this process's namespace) is alive as far as Ray's
    named actors tell: a killed one's name is released within about 0.1 s. Outside Ray, or on any other error,
    it counts as alive (then only ``LIVE_S`` retires it)."""
    import ray

    if not ray.is_initialized():
        return True
    try:
        ray.get_actor(name, namespace=ray.get_runtime_context().namespace)
    except ValueError:  # no live actor of that name
        return False
    except Exception:  # noqa: BLE001 - the GCS unreachable for a moment: not a reason to forget a replica
        return True
    return True


async def _keep_following(replica: str, step: Callable[[], Awaitable[None]],
                          answered: asyncio.Event | None = None) -> None:
    """Run ``step`` (one long poll of the board and what follows it) again and again, for as long as the replica
    runs; a failed step (the board restarting, a version this replica cannot load) is tried again after a backoff.
    ``answered`` is set after the first step, however it ended."""
    delay = 1.0
    while True:
        try:
            await step()
            delay = 1.0
        except Exception as e:
            log.warning("%s following the index version (%s: %s); again in %.0fs", replica, type(e).__name__, e,
                        delay)
            await asyncio.sleep(delay)
            delay = min(2 * delay, 30.0)
        finally:
            if answered is not None:
                answered.set()


async def follow_versions(board: Any, replica: str, have: str, load: Callable[[str], Awaitable[None]]) -> None:
    """An IndexReplica's part when the index is apart (``shards.fused_in_ingress`` false), for as long as it runs:
    tell the board the version it loaded last (``have``), load the one the board names (``load``), again. The
    Ingress loads a new version in one replica, publishes it, and switches once every live replica has loaded it:
    no search of the new version waits for a replica to load it."""
    async def step() -> None:
        nonlocal have
        version = await board.follow.remote(replica, have)
        if version != have:
            await load(version)
            have = version

    await _keep_following(replica, step)


async def follow_board(board: Any, pointer: VersionPointer, replica: str,
                       prepare: Callable[[str, IndexManifest], Awaitable[None]],
                       first: asyncio.Event) -> None:
    """An Ingress replica's part in keeping the fused replicas on one version, for as long as it runs: tell the
    board which version ``pointer`` serves, switch to the version the board names (``prepare`` loads it first),
    again. ``first`` is set once the board has answered (a replica answers no search before it has)."""
    async def step() -> None:
        version = await board.follow.remote(replica, pointer.version)
        if version != pointer.version:
            await pointer.switch_to(version, prepare)

    await _keep_following(replica, step, first)
