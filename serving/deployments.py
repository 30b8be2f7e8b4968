"""The Serve deployments of the split layout: Embedder, ShardSearcher (one per shard group), Retriever; and the
Generator. The fused layout's IndexReplica is in ``serving.fused``, the HTTP Ingress in ``serving.ingress``;
``serving.app.build_app`` composes them by handles.

Index versions (``serving.versions``): the Retriever holds the version it answers from and asks every shard
group for that version by name, so one request never mixes versions. A ShardSearcher replica keeps the versions
it has loaded (the newest two) and loads one it is asked for on demand. New versions are found by polling
``LATEST`` (``index.poll_interval_s``) or by ``POST /admin/reload``: the Retriever first has every group load
the new version, then switches; searches already under way finish on the old one.

Each deployment is bound with the config sections it reads (``configs.schema.serve``) and the resources its
placement decided (``cluster.placement.ReplicaResources``: device, threads), and answers with the values of
``serving.schemas``.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import ray
import ray.exceptions
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from cluster.placement import ReplicaResources
from configs.errors import Conflict, NotFound, RagtuneError, Unavailable
from configs.schema.serve import EmbedderConfig, GeneratorConfig, IndexSource, PromptConfig, RetrievalConfig, SearchMode
from models.embedders import QueryEncoder
from models.prompt import completion_prompt
from serving.batching import Batcher
from serving.engine import EngineInfo, load_engine
from serving.generation import Delta, GenRequest
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
    Refused,
    Reloaded,
    RetrieverInfo,
    SearchResult,
    SearchTimings,
    ShardsLoaded,
    Step,
)
from serving.versions import Docstores, LoadedVersions, VersionPointer, version_name
from sharding.filters import Filter
from sharding.manifest import IndexManifest, read_index_manifest, resolve_index

log = logging.getLogger("ragtune.serve")
logging.getLogger("faiss.loader").setLevel(logging.WARNING)


def lower_cpu_priority(nice: int) -> int:
    """Run this process's threads, and those it starts later, at ``nice`` (``limits.compute_nice``; 0 = leave
    them): the replicas that compute (embedder, index, generator) then yield the cores to the proxy and the
    Ingress, which decide what is admitted; so under overload a request over the limits is refused at once instead
    of after the work it would wait behind. Raising one's own nice needs no privilege. On Linux nice is a thread's:
    every thread of the process is set (threads inherit it from the one that starts them). Returns the nice now."""
    import os

    if nice <= 0:
        return os.getpriority(os.PRIO_PROCESS, 0)
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:  # not Linux: the process's priority is the process's
        tids = [0]
    for tid in tids:
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) < nice:
                os.setpriority(os.PRIO_PROCESS, tid, nice)
        except ProcessLookupError:  # a thread that has ended meanwhile
            pass
        except OSError as e:  # a platform that refuses: the replica runs, at the priority it has
            log.warning("limits.compute_nice %d not set (%s): this replica runs at the priority it has", nice, e)
            break
    return os.getpriority(os.PRIO_PROCESS, 0)


BURST = 64  # requests in flight at once in one replica that make a burst
TRIM_EVERY_S = 30.0  # without a burst, freed memory goes back at most this often while requests keep ending


def give_back_freed_memory() -> bool:
    """Return the heap pages that glibc's malloc keeps after the objects in them were freed (``malloc_trim(0)``,
    every arena): after a burst of requests a replica's memory otherwise stays at the burst's peak (short soaks,
    a burst at 141 req/s: the Ingress kept +73 MiB without it, +38 with it; an IndexReplica +71-73 MiB without,
    +27-45 with; docs/benchmarks.md). 20-70 ms there, in the calling thread. False where there is no glibc (macOS,
    musl) or nothing was returned."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return False
    t0 = time.perf_counter()
    returned = bool(trim(0))
    log.info("freed heap pages given back to the system in %.0f ms", 1e3 * (time.perf_counter() - t0))
    return returned


def give_back_in_background() -> None:
    """:func:`give_back_freed_memory` off the event loop (at once where there is no running loop: a test); what a
    replica's :class:`Bursts` calls."""
    try:
        asyncio.get_running_loop().run_in_executor(None, give_back_freed_memory)
    except RuntimeError:
        give_back_freed_memory()


class Bursts:
    """The requests in flight in one replica (``enter`` / ``leave``, on its event loop) and their peak since the
    last call of ``over``: once that peak was a burst (``BURST`` or more at once) and the requests in flight have
    come down to an eighth of it, ``over`` is called (in the soak's 20-second burst, 1-3 times a replica); and
    otherwise when a request ends ``every_s`` seconds or more after the last call. A surge that never makes a burst
    leaves freed memory behind too: the IndexReplica that answered alone while its peer was replaced grew by 29,
    24 and 9 MiB at three kills in a row, with no burst to give it back (docs/benchmarks.md)."""

    def __init__(self, over: Callable[[], None] | None = None, every_s: float = TRIM_EVERY_S,
                 clock: Callable[[], float] = time.monotonic):
        self.in_flight = self.peak = 0
        self.over, self.every_s, self.clock = over, every_s, clock
        self.last = clock()

    def enter(self) -> None:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)

    def leave(self) -> None:
        self.in_flight -= 1
        now = self.clock()
        if (self.peak >= BURST and self.in_flight * 8 <= self.peak) or now - self.last >= self.every_s:
            self.peak, self.last = self.in_flight, now
            if self.over is not None:
                self.over()


def replica_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "that replica is gone", not "the request is wrong": worth a retry. Looked up by name:
    not every Ray version defines all of them."""
    names = ("RayActorError", "ActorDiedError", "ActorUnavailableError", "ActorUnschedulableError")
    errors: list[type[BaseException]] = [getattr(ray.exceptions, n) for n in names if hasattr(ray.exceptions, n)]
    return (*errors, BackPressureError)


async def call_retrying(handle: DeploymentHandle, method: str, deadline: float,
                        retry_errors: tuple[type[BaseException], ...], *args: Any) -> Any:
    """Call a deployment that searches (a shard group, the fused layout's IndexReplica); while its replica is being
    replaced (died, unavailable: ``retry_errors``), retry until ``deadline`` (``time.monotonic``), then a 503.
    Given up by its caller (a timeout, a client gone), the call is cancelled there too."""
    delay = 0.05
    while True:
        response = getattr(handle, method).remote(*args)
        try:
            return await response
        except asyncio.CancelledError:
            cancel = getattr(response, "cancel", None)  # a DeploymentResponse: Ray's own await does not cancel it
            if callable(cancel):
                cancel()
            raise
        except retry_errors as e:
            if time.monotonic() + delay > deadline:
                raise Unavailable(f"no replica that holds the index answered in time ({type(e).__name__}); "
                                  "retry later", code="shard_unavailable") from None
            await asyncio.sleep(delay)
            delay = min(1.0, delay * 2)


class BatchedEncoder:
    """The index's query encoder behind a :class:`serving.batching.Batcher`: concurrent texts are embedded together
    in one forward pass on ``pool`` (one thread: the replica's event loop keeps taking requests meanwhile), the
    next batch taken when the last one has finished. With batching off (``embedder.batching``), every text is its
    own forward pass. The Embedder and the fused IndexReplica each hold one."""

    def __init__(self, manifest: IndexManifest, cfg: EmbedderConfig, pool: ThreadPoolExecutor):
        self.encoder = QueryEncoder(manifest, batch_size=cfg.max_batch_size)
        self.name: str = manifest.model.name
        self.batching, self.pool = cfg.batching, pool
        self._batched = Batcher(self._encode, pool, cfg.max_batch_size, cfg.batch_wait_timeout_s)

    def _encode(self, texts: list[str]) -> list[Embedding]:
        xq = self.encoder.encode(texts)
        tokens = self.encoder.count_tokens(texts)
        return [Embedding(x, t, len(texts)) for x, t in zip(xq, tokens, strict=True)]

    async def embed(self, text: str) -> Embedding:
        if self.batching:
            return await self._batched(text)
        [out] = await asyncio.get_running_loop().run_in_executor(self.pool, self._encode, [text])
        return out

    async def embed_many(self, texts: list[str]) -> list[Embedding]:
        return list(await asyncio.gather(*(self.embed(t) for t in texts)))

    def info(self) -> EmbedderInfo:
        return EmbedderInfo(model=self.name, dim=self.encoder.dim, batching=self.batching)


@serve.deployment(name="Embedder")
class Embedder:
    """The index's embedding model (split layout); concurrent requests are batched into one forward pass
    (:class:`BatchedEncoder`)."""

    def __init__(self, index: IndexSource, cfg: EmbedderConfig, resources: ReplicaResources):
        import torch

        torch.set_num_threads(resources.threads)
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed")
        self.encoder = BatchedEncoder(read_index_manifest(resolve_index(index.path)), cfg, pool)
        lower_cpu_priority(resources.nice)

    async def embed(self, text: str) -> Embedding:
        return await self.encoder.embed(text)

    async def embed_many(self, texts: list[str]) -> list[Embedding]:
        return await self.encoder.embed_many(texts)

    def info(self) -> EmbedderInfo:
        return self.encoder.info()


@serve.deployment(name="ShardSearcher")
class ShardSearcher:
    """The shards of one group, for every version asked for (``serving.versions.LoadedVersions``: loaded on
    demand, the newest two kept).

    ``mode`` is ``retrieval.mode``: unless it is dense, each version's BM25 shards are loaded with it.
    """

    def __init__(self, index: IndexSource, shards: list[int], resources: ReplicaResources, mode: SearchMode):
        import faiss

        faiss.omp_set_num_threads(resources.threads)
        self.shards = list(shards)
        self.held = LoadedVersions(index, self.shards, resources.device, mode != "dense", "ShardSearcher")
        self.versions = self.held.versions  # the replica is not ready (nor healthy) before its shards are:
        self.held.load_current()
        self._open = self.held._open
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="search")
        lower_cpu_priority(resources.nice)

    async def search(self, version: str, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (D, I) of this group's shards of ``version`` for queries ``xq`` (nq, d)."""
        index = await self.held.get(version)
        return await asyncio.get_running_loop().run_in_executor(self.pool, index.search, xq, k)

    async def rank(self, version: str, xq: np.ndarray | None, texts: list[str] | None, depth: int,
                   rankings: tuple[str, ...]) -> Rankings:
        """This group's rankings of ``version``: {"dense" | "lexical": (D, I)}, each (nq, depth); dense needs the
        query vectors ``xq`` (nq, d), lexical the query ``texts`` (``serving.rag.group_rankings``)."""
        index = await self.held.get(version)
        return await asyncio.get_running_loop().run_in_executor(self.pool, group_rankings, index, xq, texts, depth,
                                                                rankings)

    async def prepare(self, version: str) -> list[int]:
        """Load ``version`` now (before the Retriever switches to it); its shard numbers."""
        await self.held.get(version)
        return self.shards

    def loaded(self) -> ShardsLoaded:
        return ShardsLoaded(shards=self.shards, versions=list(self.versions),
                            ntotal={v: idx.ntotal for v, idx in self.versions.items()})

    def whoami(self) -> str:
        """This replica's actor name (tests kill a replica by it)."""
        return replica_name()

    def check_health(self) -> None:
        if not self.versions:
            raise RuntimeError("no index version loaded")


def replica_name() -> str:
    """This replica's actor name (tests kill a replica by it)."""
    name = ray.get_runtime_context().get_actor_name()
    assert name is not None, "a replica runs in an actor"
    return name


@serve.deployment(name="Retriever")
class Retriever:
    """Query -> Embedder (not for lexical) -> every shard group (in parallel) -> exact top-k merge of each
    ranking -> fusion (hybrid) -> docstore rows -> filter. The split layout's; it holds the version pointer
    (``serving.versions.VersionPointer``).

    ``retrieval`` gives the mode and fusion (requests override them), the filter's candidate counts and how long
    a shard group is retried; ``index`` the path whose LATEST is followed and how often it is polled.
    """

    def __init__(self, embedder: DeploymentHandle, searchers: list[DeploymentHandle], index: IndexSource,
                 retrieval: RetrievalConfig):
        self.embedder, self.searchers = embedder, searchers
        self.retrieval = retrieval
        self.pointer = VersionPointer(index, retrieval.mode)
        self.fusion = make_fusion(retrieval.fusion)
        # docstore files are opened and read in this one thread, never on the event loop: a lookup reads row groups
        # (disk or object store), and one thread owns the open Parquet readers and the cache above
        self.docstores = Docstores("Retriever")
        self.docstore_pool = ThreadPoolExecutor(1, thread_name_prefix="docstore")
        self.retry_errors: tuple[type[BaseException], ...] = replica_errors()

    @property
    def version(self) -> str:
        return self.pointer.version

    async def reload(self) -> Reloaded:
        """Switch to the version LATEST names now, after every shard group has loaded it."""
        return await self.pointer.reload(self._prepare)

    async def _prepare(self, new: str, manifest: IndexManifest) -> None:
        deadline = time.monotonic() + max(self.retrieval.retries_s, 60)
        groups = await asyncio.gather(*(self._call(h, "prepare", deadline, new) for h in self.searchers))
        covered = sorted(s for g in groups for s in g)
        if covered != list(range(len(manifest.shards))):
            raise Conflict(f"{version_name(new)}: has {len(manifest.shards)} shards but the shard groups serve "
                           f"{covered}: a version with another shard count needs a new deployment (ragtune serve)",
                           code="shard_count_changed")
        await asyncio.get_running_loop().run_in_executor(self.docstore_pool, self.docstores.get, new, manifest)

    def _passages(self, version: str, d: np.ndarray, i: np.ndarray, k: int, filter: Filter | None) -> list[Passage]:
        return passages_from(d, i, self.docstores.get(version, self.pointer.manifests.get(version)), k, filter)

    async def _call(self, handle: DeploymentHandle, method: str, deadline: float, *args: Any) -> Any:
        return await call_retrying(handle, method, deadline, self.retry_errors, *args)

    async def search(self, query: str, k: int, filter: Filter | None = None, mode: str | None = None,
                     fusion: FusionOverrides | None = None, param: str = "mode") -> SearchResult:
        """The top ``k`` passages of ``query`` from the current version.

        ``mode`` (None: ``retrieval.mode``; auto resolved per version) and ``fusion`` (overrides of
        ``retrieval.fusion``) as the request gives them; ``param`` names the request field in errors. Lexical
        searches embed nothing.
        """
        self.pointer.poll(self._prepare)
        version = self.pointer.version
        manifest = self.pointer.manifest
        # a 400 before any work
        mode = resolve_mode(mode or self.retrieval.mode, manifest, version_name(version), param)
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
        version = self.pointer.version
        n = len(self.pointer.manifest.shards)
        not_answering: tuple[type[BaseException], ...] = (TimeoutError, *self.retry_errors)
        try:
            states: list[ShardsLoaded] = await asyncio.wait_for(
                asyncio.gather(*(h.loaded.remote() for h in self.searchers)), 5)
        except not_answering as e:
            return Health(ready=False, version=version_name(version),
                          reason=f"a shard group is not answering ({e!r:.80})")
        covered = sorted(s for st in states if version in st.versions for s in st.shards)
        return Health(ready=covered == list(range(n)), version=version_name(version), shards=n, loaded=covered)

    def info(self) -> RetrieverInfo:
        return retriever_info(self.pointer.version, self.pointer.manifest, self.retrieval.mode)


def retriever_info(version: str, m: IndexManifest, mode: SearchMode) -> RetrieverInfo:
    """What is served: the version, its shards and vectors, its index kind and model, the mode it resolves to."""
    return RetrieverInfo(version=version, shards=len(m.shards), ntotal=m.ntotal, factory=m.factory,
                         model=m.model.name, lexical=m.lexical is not None, mode=resolve_mode(mode, m, version))


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

    def __init__(self, cfg: GeneratorConfig, prompt: PromptConfig, resources: ReplicaResources,
                 max_wait_s: float | None = None):
        self.engine = load_engine(cfg, resources, max_wait_s)
        lower_cpu_priority(resources.nice)
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

    async def _events(self, request: GenRequest, prompt: PromptInfo) -> AsyncIterator[PromptInfo | Step | Refused]:
        """The prompt, then one Step per decode step (or ``Refused`` alone: the engine's refusal, e.g. its queue
        full or the request's deadline too near). The adapter counts as in use from before the prompt is
        handed out, so that an eviction meanwhile does not unload it. Closed early (the client went away), the
        request is cancelled in the engine, which frees its slot at the next step."""
        adapter = request.adapter
        if adapter:
            self.in_use[adapter] = self.in_use.get(adapter, 0) + 1
        request_id = uuid.uuid4().hex
        deltas: AsyncGenerator[Delta, None] | None = None
        try:
            try:
                deltas = self.engine.generate(request, request_id)  # the hf engine refuses here (its queue full)
            except RagtuneError as e:  # the client's 4xx or a 429: a value for the Ingress, no traceback logged
                yield Refused(e)
                return
            yield prompt
            async for delta in deltas:
                yield Step(text=delta.text, finish_reason=delta.finish_reason,
                           completion_tokens=delta.completion_tokens, batch=delta.batch)
        finally:
            if deltas is not None:
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
        return GenRequest(ids, params, adapter, request.deadline), info

    async def stream(self, request: ChatInput | CompletionInput) -> AsyncIterator[PromptInfo | Step | Refused]:
        """Streamed generation: first the PromptInfo (or ``Refused``, and nothing after it), then one Step per
        decode step."""
        try:
            gen_request, prompt = await self._prepare(request)
        except RagtuneError as e:
            yield Refused(e)
            return
        async for event in self._events(gen_request, prompt):
            yield event

    async def complete(self, request: ChatInput | CompletionInput) -> Generated | Refused:
        """The whole answer at once (or ``Refused``)."""
        try:
            gen_request, prompt = await self._prepare(request)
        except RagtuneError as e:
            return Refused(e)
        text, finish_reason, completion_tokens, batch = "", None, 0, 0
        async for event in self._events(gen_request, prompt):
            if isinstance(event, Refused):
                return event
            if isinstance(event, Step):
                text += event.text
                finish_reason = event.finish_reason or finish_reason
                completion_tokens = event.completion_tokens
                batch = max(batch, event.batch)
        return Generated(prompt=prompt, text=text, finish_reason=finish_reason, completion_tokens=completion_tokens,
                         batch=batch)

    def engine_info(self) -> EngineInfo:
        """The engine's state now: its adapters loaded, its requests decoding and waiting (a request that timed
        out or whose client went away must leave none behind)."""
        return self.engine.info()

    def info(self) -> GeneratorInfo:
        info = self.engine.info()
        return GeneratorInfo(base=self.name, adapters=sorted(self.adapter_paths), loaded=info.adapters,
                             context=info.context, device=info.device)
