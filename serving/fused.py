"""The fused layout's one replica type: the query encoder, every shard (FAISS and BM25) and the docstore.

    Ingress --> IndexReplica (embed + every shard + docstore)     /v1/search, chat retrieval, /v1/embeddings
       \\----> Generator

The serving plan (``cluster.placement.plan_serving``, ``shards.layout``) chooses it when the whole index fits
one replica's memory budget: a search is then one Serve call from the Ingress, where the split layout makes
five (Retriever, Embedder, the shard groups, back). Concurrent queries are batched twice: their texts go through
one forward pass of the encoder (``BatchedEncoder``, shared with ``/v1/embeddings``), then their vectors through
one FAISS search and their texts through one BM25 search per (mode, depth) (``serving.rag.search_many``); the
docstore is read in a thread of its own, never on the event loop. Results are those of the split layout and of
``sharding.search.search`` over all shards: the same functions (``resolve_mode``, ``search_k``, ``widen_k``,
``group_rankings``, ``combine``, ``passages_from``) with the whole index as one group.

Versions: the Ingress holds the version pointer (``serving.versions.VersionPointer``) and names the version of
each search; a replica holds the newest two it was asked for (``LoadedVersions``), loaded on demand and checked
for room before a swap, exactly as a ShardSearcher does. Replicas scale like a shard group (``shards.replicas``,
``shards.autoscaling``).
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from ray import serve

from cluster.placement import ReplicaResources
from configs.schema.serve import EmbedderConfig, IndexSource, RetrievalConfig
from serving.deployments import BatchedEncoder, _configure_batching, replica_name
from serving.rag import (
    FusionOverrides,
    Query,
    make_fusion,
    passages_from,
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
from serving.versions import Docstores, LoadedVersions, version_name
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


@serve.deployment(name="IndexReplica")
class IndexReplica:
    """The whole index in one replica: encoder, shards, BM25 shards (unless ``retrieval.mode`` is dense) and
    docstore, for every version asked for (the newest two kept).

    ``embedder`` sizes the batches (``max_batch_size``, ``batch_wait_timeout_s``; ``batching: false`` = every
    query alone), ``retrieval`` gives the mode, fusion and filter candidate counts, ``resources`` the device of
    the shards and the threads of torch and FAISS (one forward pass or search at a time, on one thread).
    """

    def __init__(self, index: IndexSource, embedder: EmbedderConfig, retrieval: RetrievalConfig,
                 resources: ReplicaResources):
        import faiss
        import torch

        torch.set_num_threads(resources.threads)
        faiss.omp_set_num_threads(resources.threads)
        self.retrieval, self.fusion = retrieval, make_fusion(retrieval.fusion)
        self.compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="index")  # forward passes, searches
        self.docstore_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="docstore")
        self.held = LoadedVersions(index, None, resources.device, retrieval.mode != "dense", "IndexReplica")
        first = self.held.load_current()  # not ready (nor healthy) before its shards and docstore are
        manifest = self.held.versions[first].manifest
        self.docstores = Docstores("IndexReplica")
        self.docstore_pool.submit(self.docstores.get, first, manifest).result()
        self.encoder = BatchedEncoder(manifest, embedder, self.compute)
        self.batching = embedder.batching
        _configure_batching(self._search_batched, embedder.max_batch_size, embedder.batch_wait_timeout_s)

    # --- search ---------------------------------------------------------------------------------------------------

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _search_batched(self, jobs: list[_Job]) -> list[tuple[np.ndarray, np.ndarray]]:
        return await asyncio.get_running_loop().run_in_executor(self.compute, search_jobs, jobs)

    async def _search(self, job: _Job) -> tuple[np.ndarray, np.ndarray]:
        if self.batching:
            return await self._search_batched(job)
        [hit] = await asyncio.get_running_loop().run_in_executor(self.compute, search_jobs, [job])
        return hit

    def _passages(self, version: str, manifest: IndexManifest, d: np.ndarray, i: np.ndarray, k: int,
                  filter: Filter | None) -> list[Passage]:
        return passages_from(d, i, self.docstores.get(version, manifest), k, filter)

    async def search(self, version: str, query: str, k: int, filter: Filter | None = None, mode: str | None = None,
                     fusion: FusionOverrides | None = None, param: str = "mode") -> SearchResult:
        """The top ``k`` passages of ``query`` in ``version`` (the Ingress's current one); ``mode``, ``fusion`` and
        ``param`` as ``Retriever.search`` takes them. Lexical searches embed nothing."""
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
        loop = asyncio.get_running_loop()
        kk: int | None = search_k(k, filter, manifest.ntotal, self.retrieval.filter_overfetch)
        passages: list[Passage] = []
        while kk is not None:  # with a filter: more candidates until k pass (widen_k)
            d, i = await self._search(_Job(index, Query(query, mode, kk, fused), xq))
            passages = await loop.run_in_executor(self.docstore_pool, self._passages, version, manifest, d, i, k,
                                                  filter)
            kk = widen_k(kk, k, len(passages), filter, manifest.ntotal, self.retrieval.filter_max_candidates)
        return SearchResult(passages=passages, version=version, mode=mode, embed_batch=batch,
                            timings=SearchTimings(embed_s=t1 - t0, search_s=time.perf_counter() - t1))

    async def prepare(self, version: str) -> None:
        """Load ``version`` (shards and docstore) now, before the Ingress switches to it."""
        index = await self.held.get(version)
        await asyncio.get_running_loop().run_in_executor(self.docstore_pool, self.docstores.get, version,
                                                         index.manifest)

    async def ready(self, version: str) -> Health:
        """Whether this replica has loaded ``version`` (it loads it now if not: a replica that started after a
        switch)."""
        n = len((await self.held.get(version)).manifest.shards)
        return Health(ready=True, version=version_name(version), shards=n, loaded=list(range(n)))

    def loaded(self) -> ShardsLoaded:
        versions = self.held.versions
        shards = len(next(reversed(versions.values())).manifest.shards)
        return ShardsLoaded(shards=list(range(shards)), versions=list(versions),
                            ntotal={v: idx.ntotal for v, idx in versions.items()})

    # --- embeddings -----------------------------------------------------------------------------------------------

    async def embed_many(self, texts: list[str]) -> list[Embedding]:
        return await self.encoder.embed_many(texts)

    def info(self) -> EmbedderInfo:
        return self.encoder.info()

    # --- replica ----------------------------------------------------------------------------------------------------

    def whoami(self) -> str:
        return replica_name()

    def check_health(self) -> None:
        if not self.held.versions:
            raise RuntimeError("no index version loaded")
