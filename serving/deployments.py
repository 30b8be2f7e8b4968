"""The Serve deployments: Embedder, ShardSearcher (one per shard group), Retriever, Generator. The HTTP Ingress
is in ``serving.ingress``; ``serving.app.build_app`` composes them by handles.

Index versions: a version is named by its folder's URI. The Retriever holds the version it answers from and
asks every shard group for that version by name, so one request never mixes versions. A ShardSearcher replica
keeps the versions it has loaded (the newest two) and loads one it is asked for on demand, so a replica that
restarts, or has not yet seen a new version, still answers correctly (only slower, once). New versions are
found by polling ``LATEST`` (``index.poll_interval_s``) or by ``POST /admin/reload``: the Retriever first has
every group load the new version, then switches; searches already under way finish on the old one.

Each deployment is bound with the config sections it reads (``configs.schema.serve``) and the resources its
placement decided (``cluster.placement.ReplicaResources``: device, threads), and answers with the values of
``serving.schemas``.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
import weakref
from collections import OrderedDict
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, cast

import numpy as np
import ray
import ray.exceptions
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from cluster.placement import ReplicaResources
from configs.errors import Conflict, InvalidRequest, NotFound, Unavailable
from configs.schema.serve import EmbedderConfig, GeneratorConfig, IndexSource, PromptConfig, RetrievalConfig, SearchMode
from models.embedders import QueryEncoder
from models.prompt import completion_prompt
from serving.engine import load_engine
from serving.generation import GenRequest
from serving.rag import (
    RANKINGS,
    FusionOverrides,
    Rankings,
    combine,
    group_rankings,
    make_fusion,
    passages_from,
    rag_prompt,
    ranking_depth,
    resolve_mode,
    search_k,
    widen_k,
)
from serving.schemas import (
    ChatInput,
    CompletionInput,
    EmbedderInfo,
    Embedding,
    Generated,
    GeneratorInfo,
    Health,
    Passage,
    PromptInfo,
    Reloaded,
    RetrieverInfo,
    SearchResult,
    SearchTimings,
    ShardsLoaded,
    Step,
)
from sharding.choice import human_bytes
from sharding.docstore import Docstore
from sharding.filters import Filter
from sharding.manifest import IndexManifest, read_index_manifest, resolve_index
from sharding.search import ShardedIndex, open_docstore, resident_bytes
from sharding.storage import resolve

log = logging.getLogger("ragtune.serve")
logging.getLogger("faiss.loader").setLevel(logging.WARNING)

KEEP_VERSIONS = 2  # versions a ShardSearcher replica keeps loaded: the current one and the one before


def current_version(path: str) -> str:
    """The URI of the version folder an index path means now (its LATEST, or the folder itself)."""
    return resolve_index(path).uri


def _replica_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "that replica is gone", not "the request is wrong": worth a retry. Looked up by name:
    not every Ray version defines all of them."""
    names = ("RayActorError", "ActorDiedError", "ActorUnavailableError", "ActorUnschedulableError")
    errors: list[type[BaseException]] = [getattr(ray.exceptions, n) for n in names if hasattr(ray.exceptions, n)]
    return (*errors, BackPressureError)


class _Batching(Protocol):
    """The setters ``@serve.batch`` adds to the method it wraps (its type hints leave them out)."""

    def set_max_batch_size(self, new_max_batch_size: int) -> None: ...

    def set_batch_wait_timeout_s(self, new_batch_wait_timeout_s: float) -> None: ...


def _configure_batching(method: object, max_batch_size: int, batch_wait_timeout_s: float) -> None:
    """Size a ``@serve.batch`` method's batches from the config (the decorator's arguments are only defaults)."""
    batching = cast(_Batching, method)
    batching.set_max_batch_size(max_batch_size)
    batching.set_batch_wait_timeout_s(batch_wait_timeout_s)


@serve.deployment(name="Embedder")
class Embedder:
    """The index's embedding model; concurrent requests are batched into one forward pass (``@serve.batch``).

    One forward pass runs at a time, on a worker thread (the replica's event loop keeps collecting the next
    batch meanwhile). With batching off, every request is its own forward pass.
    """

    def __init__(self, index: IndexSource, cfg: EmbedderConfig, resources: ReplicaResources):
        import torch

        torch.set_num_threads(resources.threads)
        manifest = read_index_manifest(resolve_index(index.path))
        self.encoder = QueryEncoder(manifest, batch_size=cfg.max_batch_size)
        self.name: str = manifest.model.name
        self.batching = cfg.batching
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed")
        _configure_batching(self._batched, cfg.max_batch_size, cfg.batch_wait_timeout_s)

    def _encode(self, texts: list[str]) -> list[Embedding]:
        xq = self.encoder.encode(texts)
        tokens = self.encoder.count_tokens(texts)
        return [Embedding(x, t, len(texts)) for x, t in zip(xq, tokens, strict=True)]

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _batched(self, texts: list[str]) -> list[Embedding]:
        return await asyncio.get_running_loop().run_in_executor(self.pool, self._encode, texts)

    async def embed(self, text: str) -> Embedding:
        if self.batching:
            return await self._batched(text)
        [out] = await asyncio.get_running_loop().run_in_executor(self.pool, self._encode, [text])
        return out

    async def embed_many(self, texts: list[str]) -> list[Embedding]:
        return list(await asyncio.gather(*(self.embed(t) for t in texts)))

    def info(self) -> EmbedderInfo:
        return EmbedderInfo(model=self.name, dim=self.encoder.dim, batching=self.batching)


@serve.deployment(name="ShardSearcher")
class ShardSearcher:
    """The shards of one group, for every version asked for (loaded on demand, the newest two kept).

    ``mode`` is ``retrieval.mode``: unless it is dense, each version's BM25 shards are loaded with it.
    """

    def __init__(self, index: IndexSource, shards: list[int], resources: ReplicaResources, mode: SearchMode):
        import faiss

        faiss.omp_set_num_threads(resources.threads)
        self.source, self.shards, self.device = index, list(shards), resources.device
        self.lexical = mode != "dense"
        self.versions: OrderedDict[str, ShardedIndex] = OrderedDict()
        self.loading: dict[str, asyncio.Future[ShardedIndex]] = {}
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="search")
        first = current_version(index.path)
        self.versions[first] = self._open(first)  # the replica is not ready (nor healthy) before its shards are
        self.poller: asyncio.Task[None] | None = None

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
                                  only=self.shards, lease="ShardSearcher", reuse=reuse)
        if self.device == "gpu":
            _to_gpu(index)
        lexical = self.lexical and index.manifest.lexical is not None
        if lexical:  # otherwise a lexical request loads them on demand (ShardedIndex.lexical_shards)
            index.lexical_shards()
        log.info("shards %s of %s loaded in %.2fs (%d vectors%s)", self.shards, version, time.perf_counter() - t0,
                 index.ntotal, ", BM25 too" if lexical else "")
        return index

    def _check_room(self, version: str, mmap: bool, loaded: dict[tuple[str, str], Any]) -> None:
        """Refuse a version whose shards do not fit in memory beside the version served (before loading them)."""
        import psutil

        loc = resolve_index(version)
        need = resident_bytes(loc, read_index_manifest(loc), self.shards, mmap, loaded)
        free = psutil.virtual_memory().available
        if need > 0.9 * free:
            raise Conflict(
                f"{version}: shards {self.shards} need about {human_bytes(need)} in memory beside the version "
                f"served, and {human_bytes(free)} is free here. Fix: give the shard searchers more memory or more "
                "groups (shards.groups), keep shards memory-mapped on local disk (index.mmap: true), or serve the "
                "new version with a new deployment (ragtune serve)", code="not_enough_memory")

    async def _get(self, version: str) -> ShardedIndex:
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
                await self._get(current_version(self.source.path))
            except Exception as e:  # a half-written version or a storage hiccup: the next poll tries again
                log.warning("polling %s for a new version: %s", self.source.path, e)

    async def search(self, version: str, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (D, I) of this group's shards of ``version`` for queries ``xq`` (nq, d)."""
        index = await self._get(version)
        return await asyncio.get_running_loop().run_in_executor(self.pool, index.search, xq, k)

    async def rank(self, version: str, xq: np.ndarray | None, texts: list[str] | None, depth: int,
                   rankings: tuple[str, ...]) -> Rankings:
        """This group's rankings of ``version``: {"dense" | "lexical": (D, I)}, each (nq, depth); dense needs the
        query vectors ``xq`` (nq, d), lexical the query ``texts`` (``serving.rag.group_rankings``)."""
        index = await self._get(version)
        return await asyncio.get_running_loop().run_in_executor(self.pool, group_rankings, index, xq, texts, depth,
                                                                rankings)

    async def prepare(self, version: str) -> list[int]:
        """Load ``version`` now (before the Retriever switches to it); its shard numbers."""
        await self._get(version)
        return self.shards

    def loaded(self) -> ShardsLoaded:
        return ShardsLoaded(shards=self.shards, versions=list(self.versions),
                            ntotal={v: idx.ntotal for v, idx in self.versions.items()})

    def whoami(self) -> str:
        """This replica's actor name (tests kill a replica by it)."""
        name = ray.get_runtime_context().get_actor_name()
        assert name is not None, "a replica runs in an actor"
        return name

    def check_health(self) -> None:
        if not self.versions:
            raise RuntimeError("no index version loaded")


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


@serve.deployment(name="Retriever")
class Retriever:
    """Query -> Embedder (not for lexical) -> every shard group (in parallel) -> exact top-k merge of each
    ranking -> fusion (hybrid) -> docstore rows -> filter.

    ``retrieval`` gives the mode and fusion (requests override them), the filter's candidate counts and how long
    a shard group is retried; ``index`` the path whose LATEST is followed and how often it is polled.
    """

    def __init__(self, embedder: DeploymentHandle, searchers: list[DeploymentHandle], index: IndexSource,
                 retrieval: RetrievalConfig):
        self.embedder, self.searchers = embedder, searchers
        self.path, self.poll_interval_s = index.path, index.poll_interval_s
        self.retrieval = retrieval
        self.version = current_version(index.path)
        self.manifests = {self.version: read_index_manifest(resolve_index(self.version))}
        self.fusion = make_fusion(retrieval.fusion)
        resolve_mode(retrieval.mode, self.manifests[self.version], self.version, "retrieval.mode")
        self.docstores: OrderedDict[str, Docstore] = OrderedDict()
        # docstore files are opened and read in this one thread, never on the event loop: a lookup reads row groups
        # (disk or object store), and one thread owns the open Parquet readers and the cache above
        self.docstore_pool = ThreadPoolExecutor(1, thread_name_prefix="docstore")
        self.poller: asyncio.Task[None] | None = None
        self.switching = asyncio.Lock()
        self.retry_errors: tuple[type[BaseException], ...] = _replica_errors()

    def _docstore(self, version: str) -> Docstore:
        if version not in self.docstores:
            m = self.manifests.get(version) or read_index_manifest(resolve(version))
            self.docstores[version] = open_docstore(resolve(version), m, lease="Retriever")  # deltas, tombstones
            while len(self.docstores) > KEEP_VERSIONS:
                self.docstores.popitem(last=False)
        return self.docstores[version]

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval_s or 10)
            try:
                await self.reload()
            except Exception as e:
                log.warning("polling %s for a new version: %s", self.path, e)

    async def reload(self) -> Reloaded:
        """Switch to the version LATEST names now, after every shard group has loaded it."""
        async with self.switching:
            new = current_version(self.path)
            old = self.version
            if new == old:
                return Reloaded(version=new, previous=old, changed=False)
            manifest = read_index_manifest(resolve(new))
            try:  # retrieval.mode lexical or hybrid and a version without BM25 shards: keep serving the old one
                resolve_mode(self.retrieval.mode, manifest, new, "retrieval.mode")
            except InvalidRequest as e:
                raise Conflict(f"not switching to it: {e.message}", code=e.code) from None
            deadline = time.monotonic() + max(self.retrieval.retries_s, 60)
            groups = await asyncio.gather(*(self._call(h, "prepare", deadline, new) for h in self.searchers))
            covered = sorted(s for g in groups for s in g)
            if covered != list(range(len(manifest.shards))):
                raise Conflict(f"{new}: has {len(manifest.shards)} shards but the shard groups serve {covered}: "
                               "a version with another shard count needs a new deployment (ragtune serve)",
                               code="shard_count_changed")
            await asyncio.get_running_loop().run_in_executor(self.docstore_pool, self._docstore_for, new, manifest)
            self.version = new
            log.info("index version %s -> %s", old, new)
            return Reloaded(version=new, previous=old, changed=True)

    def _passages(self, version: str, d: np.ndarray, i: np.ndarray, k: int, filter: Filter | None) -> list[Passage]:
        return passages_from(d, i, self._docstore(version), k, filter)

    def _docstore_for(self, version: str, manifest: IndexManifest) -> None:
        self.manifests[version] = manifest
        self._docstore(version)

    async def _call(self, handle: DeploymentHandle, method: str, deadline: float, *args: Any) -> Any:
        """Call a shard group; while its replica is being replaced (died, unavailable), retry until ``deadline``."""
        delay = 0.05
        while True:
            try:
                return await getattr(handle, method).remote(*args)
            except self.retry_errors as e:
                if time.monotonic() + delay > deadline:
                    raise Unavailable(f"a shard group did not answer in time ({type(e).__name__}); retry later",
                                      code="shard_unavailable") from None
                await asyncio.sleep(delay)
                delay = min(1.0, delay * 2)

    async def search(self, query: str, k: int, filter: Filter | None = None, mode: str | None = None,
                     fusion: FusionOverrides | None = None, param: str = "mode") -> SearchResult:
        """The top ``k`` passages of ``query`` from the current version.

        ``mode`` (None: ``retrieval.mode``; auto resolved per version) and ``fusion`` (overrides of
        ``retrieval.fusion``) as the request gives them; ``param`` names the request field in errors. Lexical
        searches embed nothing.
        """
        if self.poller is None and self.poll_interval_s:
            self.poller = asyncio.get_running_loop().create_task(self._poll())
        version = self.version
        manifest = self.manifests[version]
        mode = resolve_mode(mode or self.retrieval.mode, manifest, version, param)  # a 400 before any work
        fused = make_fusion(self.fusion, fusion)
        t0 = time.perf_counter()
        xq, batch = None, 0
        if mode != "lexical":
            embedding: Embedding = await self.embedder.embed.remote(query)
            xq, batch = embedding.vector[None, :], embedding.batch
        t1 = time.perf_counter()
        kk: int | None = search_k(k, filter, manifest.ntotal, self.retrieval.filter_overfetch)
        deadline = time.monotonic() + self.retrieval.retries_s
        passages: list[Passage] = []
        while kk is not None:  # with a filter: more candidates until k pass (widen_k)
            depth = ranking_depth(mode, kk, fused)
            results = await asyncio.gather(*(self._call(h, "rank", deadline, version, xq, [query], depth,
                                                        RANKINGS[mode]) for h in self.searchers))
            D, I = combine(results, mode, kk, manifest.metric, fused)
            passages = await asyncio.get_running_loop().run_in_executor(self.docstore_pool, self._passages,
                                                                        version, D[0], I[0], k, filter)
            kk = widen_k(kk, k, len(passages), filter, manifest.ntotal, self.retrieval.filter_max_candidates)
        t2 = time.perf_counter()
        return SearchResult(passages=passages, version=version, mode=mode, embed_batch=batch,
                            timings=SearchTimings(embed_s=t1 - t0, search_s=t2 - t1))

    async def ready(self) -> Health:
        """Whether some replica of every shard group has loaded the current version's shards."""
        version = self.version
        n = len(self.manifests[version].shards)
        not_answering: tuple[type[BaseException], ...] = (TimeoutError, *self.retry_errors)
        try:
            states: list[ShardsLoaded] = await asyncio.wait_for(
                asyncio.gather(*(h.loaded.remote() for h in self.searchers)), 5)
        except not_answering as e:
            return Health(ready=False, version=version, reason=f"a shard group is not answering ({e!r:.80})")
        covered = sorted(s for st in states if version in st.versions for s in st.shards)
        return Health(ready=covered == list(range(n)), version=version, shards=n, loaded=covered)

    def info(self) -> RetrieverInfo:
        m = self.manifests[self.version]
        return RetrieverInfo(version=self.version, shards=len(m.shards), ntotal=m.ntotal, factory=m.factory,
                             model=m.model.name, lexical=m.lexical is not None,
                             mode=resolve_mode(self.retrieval.mode, m, self.version))


class _Adapter:
    """A loaded LoRA adapter as Serve's multiplexer holds it; unloading it (LRU) removes it from the engine.

    Serve calls ``__del__`` on a worker thread when it evicts the adapter: the removal is handed to the replica's
    event loop (the engine's methods are async)."""

    def __init__(self, generator: Generator, name: str, loop: asyncio.AbstractEventLoop):
        self.generator: Generator | None = generator
        self.name, self.loop = name, loop

    def __del__(self) -> None:
        gen, self.generator = self.generator, None
        if gen is not None and not self.loop.is_closed():
            asyncio.run_coroutine_threadsafe(gen.unload_adapter(self.name), self.loop)


@serve.deployment(name="Generator")
class Generator:
    """A generation engine (``serving.engine``: ``generator.engine`` hf or vllm) with LoRA adapters multiplexed
    on one base; the prompt is assembled here, the same for every engine.

    The request's adapter comes from Serve's multiplexed model id (the Ingress sets it from ``model``); Serve
    routes a request to a replica that has its adapter loaded, and loads it (LRU) where none has; an adapter a
    request of this replica uses is not unloaded before the request ends. Batching is the engine's (hf:
    continuous or static, ``generator.decoding``); a request whose client goes away is cancelled in the engine
    (Serve closes the caller's generator). The device and threads are the placement's (``generator.device`` and
    ``.threads`` are what it started from).
    """

    def __init__(self, cfg: GeneratorConfig, prompt: PromptConfig, resources: ReplicaResources):
        self.engine = load_engine(cfg, resources)
        self.name, self.adapter_paths = cfg.name, dict(cfg.adapters)
        self.prompt = prompt
        self.in_use: dict[str, int] = {}  # adapter -> requests of this replica using it
        self.unloading: set[str] = set()  # evicted while in use: removed when its last request ends

        async def load(name: str) -> _Adapter:
            return await self._load_adapter(name)

        # wired at init so that the LRU size comes from the config (Serve detects multiplexing on the instance)
        self.get_adapter = serve.multiplexed(max_num_models_per_replica=cfg.max_adapters_per_replica)(load)

    async def _load_adapter(self, name: str) -> _Adapter:
        if name not in self.adapter_paths:
            raise NotFound(f"model {name!r} is not served", param="model", code="model_not_found")
        self.unloading.discard(name)
        await self.engine.add_adapter(name, self.adapter_paths[name])
        return _Adapter(self, name, asyncio.get_running_loop())

    async def unload_adapter(self, name: str) -> None:
        if self.in_use.get(name):  # a request still decoding with it keeps it until the last one ends
            self.unloading.add(name)
        else:
            await self.engine.remove_adapter(name)

    async def _events(self, request: GenRequest, prompt: PromptInfo) -> AsyncIterator[PromptInfo | Step]:
        """The prompt, then one Step per decode step. The adapter counts as in use from before the prompt is
        handed out, so that an eviction meanwhile does not unload it. Closed early (the client went away), the
        request is cancelled in the engine, which frees its slot at the next step."""
        adapter = request.adapter
        if adapter:
            self.in_use[adapter] = self.in_use.get(adapter, 0) + 1
        request_id = uuid.uuid4().hex
        deltas = self.engine.generate(request, request_id)
        try:
            yield prompt
            async for delta in deltas:
                yield Step(text=delta.text, finish_reason=delta.finish_reason,
                           completion_tokens=delta.completion_tokens, batch=delta.batch)
        finally:
            await self.engine.cancel(request_id)  # nothing when it finished
            await deltas.aclose()
            if adapter:
                self.in_use[adapter] -= 1
                if not self.in_use[adapter] and adapter in self.unloading:
                    self.unloading.discard(adapter)
                    await self.engine.remove_adapter(adapter)

    async def _prepare(self, request: ChatInput | CompletionInput) -> tuple[GenRequest, PromptInfo]:
        model_id = serve.get_multiplexed_model_id()
        adapter = None
        if model_id and model_id != self.name:
            await self.get_adapter(model_id)
            adapter = model_id
        params = request.params
        if isinstance(request, ChatInput):
            prompt, citations = rag_prompt(self.engine.tokenizer, request.messages, request.passages, self.prompt,
                                           self.engine.context, params.max_tokens)
            info = PromptInfo(prompt_tokens=len(prompt.ids), citations=citations,
                              dropped_passages=prompt.dropped_passages, dropped_turns=prompt.dropped_turns)
            ids = prompt.ids
        else:
            ids = completion_prompt(self.engine.tokenizer, request.prompt, self.engine.context, params.max_tokens)
            info = PromptInfo(prompt_tokens=len(ids), citations=[])
        return GenRequest(ids, params, adapter), info

    async def stream(self, request: ChatInput | CompletionInput) -> AsyncIterator[PromptInfo | Step]:
        """Streamed generation: first the PromptInfo, then one Step per decode step."""
        gen_request, prompt = await self._prepare(request)
        async for event in self._events(gen_request, prompt):
            yield event

    async def complete(self, request: ChatInput | CompletionInput) -> Generated:
        """The whole answer at once."""
        gen_request, prompt = await self._prepare(request)
        text, finish_reason, completion_tokens, batch = "", None, 0, 0
        async for event in self._events(gen_request, prompt):
            if isinstance(event, Step):
                text += event.text
                finish_reason = event.finish_reason or finish_reason
                completion_tokens = event.completion_tokens
                batch = max(batch, event.batch)
        return Generated(prompt=prompt, text=text, finish_reason=finish_reason, completion_tokens=completion_tokens,
                         batch=batch)

    def info(self) -> GeneratorInfo:
        info = self.engine.info()
        return GeneratorInfo(base=self.name, adapters=sorted(self.adapter_paths), loaded=info.adapters,
                             context=info.context, device=info.device)
