"""The Serve deployments: Embedder, ShardSearcher (one per shard group), Retriever, Generator. The HTTP Ingress
is in ``serving.ingress``; ``serving.app.build_app`` composes them by handles.

Index versions: a version is named by its folder's URI. The Retriever holds the version it answers from and
asks every shard group for that version by name, so one request never mixes versions. A ShardSearcher replica
keeps the versions it has loaded (the newest two) and loads one it is asked for on demand, so a replica that
restarts, or has not yet seen a new version, still answers correctly (only slower, once). New versions are
found by polling ``LATEST`` (``index.poll_interval_s``) or by ``POST /admin/reload``: the Retriever first has
every group load the new version, then switches; searches already under way finish on the old one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from ray import serve

from configs.errors import Conflict, InvalidRequest, NotFound, Unavailable

log = logging.getLogger("ragtune.serve")
logging.getLogger("faiss.loader").setLevel(logging.WARNING)

KEEP_VERSIONS = 2  # versions a ShardSearcher replica keeps loaded: the current one and the one before


def current_version(path: str) -> str:
    """The URI of the version folder an index path means now (its LATEST, or the folder itself)."""
    from sharding.manifest import resolve_index

    return resolve_index(path).uri


def _replica_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "that replica is gone", not "the request is wrong": worth a retry."""
    import ray.exceptions as rex

    names = ("RayActorError", "ActorDiedError", "ActorUnavailableError", "ActorUnschedulableError")
    errors: list[type[BaseException]] = [getattr(rex, n) for n in names if hasattr(rex, n)]
    from ray.serve.exceptions import BackPressureError

    return (*errors, BackPressureError)


@serve.deployment(name="Embedder")
class Embedder:
    """The index's embedding model; concurrent requests are batched into one forward pass (``@serve.batch``).

    One forward pass runs at a time, on a worker thread (the replica's event loop keeps collecting the next
    batch meanwhile). With batching off, every request is its own forward pass.
    """

    def __init__(self, index_path: str, batching: bool = True, max_batch_size: int = 32,
                 batch_wait_timeout_s: float = 0.005, threads: int = 1):
        import torch

        from models.embedders import QueryEncoder
        from sharding.manifest import read_index_manifest, resolve_index

        torch.set_num_threads(threads)
        manifest = read_index_manifest(resolve_index(index_path))
        self.encoder = QueryEncoder(manifest, batch_size=max_batch_size)
        self.name = manifest.model.get("name", "")
        self.batching = batching
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed")
        self._batched.set_max_batch_size(max_batch_size)
        self._batched.set_batch_wait_timeout_s(batch_wait_timeout_s)

    def _encode(self, texts: list[str]) -> list[tuple[np.ndarray, int, int]]:
        xq = self.encoder.encode(texts)
        tokens = self.encoder.count_tokens(texts)
        return [(x, t, len(texts)) for x, t in zip(xq, tokens, strict=True)]

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _batched(self, texts: list[str]) -> list[tuple[np.ndarray, int, int]]:
        return await asyncio.get_running_loop().run_in_executor(self.pool, self._encode, texts)

    async def embed(self, text: str) -> tuple[np.ndarray, int, int]:
        """(vector (d,), tokens, size of the batch it was embedded in)."""
        if self.batching:
            return await self._batched(text)
        [out] = await asyncio.get_running_loop().run_in_executor(self.pool, self._encode, [text])
        return out

    async def embed_many(self, texts: list[str]) -> list[tuple[np.ndarray, int, int]]:
        return list(await asyncio.gather(*(self.embed(t) for t in texts)))

    def info(self) -> dict[str, Any]:
        return {"model": self.name, "dim": self.encoder.dim, "batching": self.batching}


@serve.deployment(name="ShardSearcher")
class ShardSearcher:
    """The shards of one group, for every version asked for (loaded on demand, the newest two kept)."""

    def __init__(self, index_path: str, shards: list[int], params: dict[str, int] | None = None,
                 verify: bool = True, mmap: bool = True, device: str = "cpu", threads: int = 1,
                 poll_interval_s: float | None = None, lexical: bool = False):
        import faiss

        faiss.omp_set_num_threads(threads)
        self.path, self.shards, self.params = index_path, list(shards), dict(params or {})
        self.verify, self.mmap, self.device = verify, mmap, device
        self.lexical = lexical  # load each version's BM25 shards with it (retrieval.mode may use them)
        self.versions: OrderedDict[str, Any] = OrderedDict()
        self.loading: dict[str, asyncio.Future] = {}
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="search")
        first = current_version(index_path)
        self.versions[first] = self._open(first)  # the replica is not ready (nor healthy) before its shards are
        self.poll_interval_s = poll_interval_s
        self.poller: asyncio.Task | None = None

    def _open(self, version: str) -> Any:
        from sharding.search import ShardedIndex

        t0 = time.perf_counter()
        index = ShardedIndex.open(version, verify=self.verify, mmap=self.mmap and self.device == "cpu",
                                  params=self.params, only=self.shards, lease="ShardSearcher")
        if self.device == "gpu":
            _to_gpu(index)
        lexical = self.lexical and index.manifest.lexical is not None
        if lexical:  # otherwise a lexical request loads them on demand (ShardedIndex.lexical_shards)
            index.lexical_shards()
        log.info("shards %s of %s loaded in %.2fs (%d vectors%s)", self.shards, version, time.perf_counter() - t0,
                 index.ntotal, ", BM25 too" if lexical else "")
        return index

    async def _get(self, version: str) -> Any:
        if self.poller is None and self.poll_interval_s:
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
            await asyncio.sleep(self.poll_interval_s or 10)
            try:
                await self._get(current_version(self.path))
            except Exception as e:  # a half-written version or a storage hiccup: the next poll tries again
                log.warning("polling %s for a new version: %s", self.path, e)

    async def search(self, version: str, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (D, I) of this group's shards of ``version`` for queries ``xq`` (nq, d)."""
        index = await self._get(version)
        return await asyncio.get_running_loop().run_in_executor(self.pool, index.search, xq, k)

    async def rank(self, version: str, xq: np.ndarray | None, texts: list[str] | None, depth: int,
                   rankings: tuple[str, ...]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """This group's rankings of ``version``: {"dense" | "lexical": (D, I)}, each (nq, depth); dense needs the
        query vectors ``xq`` (nq, d), lexical the query ``texts`` (``serving.rag.group_rankings``)."""
        from serving.rag import group_rankings

        index = await self._get(version)
        return await asyncio.get_running_loop().run_in_executor(self.pool, group_rankings, index, xq, texts, depth,
                                                                rankings)

    async def prepare(self, version: str) -> list[int]:
        """Load ``version`` now (before the Retriever switches to it)."""
        await self._get(version)
        return self.shards

    def loaded(self) -> dict[str, Any]:
        return {"shards": self.shards, "versions": list(self.versions),
                "ntotal": {v: idx.ntotal for v, idx in self.versions.items()}}

    def whoami(self) -> str:
        """This replica's actor name (tests kill a replica by it)."""
        import ray

        return ray.get_runtime_context().get_actor_name()

    def check_health(self) -> None:
        if not self.versions:
            raise RuntimeError("no index version loaded")


def _to_gpu(index: Any) -> None:
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
    index._gpu_resources = res  # kept alive with the index


@serve.deployment(name="Retriever")
class Retriever:
    """Query -> Embedder (not for lexical) -> every shard group (in parallel) -> exact top-k merge of each
    ranking -> fusion (hybrid) -> docstore rows -> filter."""

    def __init__(self, embedder: Any, searchers: list[Any], index_path: str, overfetch: int = 10,
                 retries_s: float = 20.0, poll_interval_s: float | None = None, max_candidates: int = 10_000,
                 mode: str = "auto", fusion: dict[str, Any] | None = None):
        from serving.rag import make_fusion, resolve_mode
        from sharding.manifest import read_index_manifest, resolve_index

        self.embedder, self.searchers = embedder, searchers
        self.path, self.overfetch, self.retries_s = index_path, overfetch, retries_s
        self.max_candidates = max_candidates
        self.version = current_version(index_path)
        self.manifests = {self.version: read_index_manifest(resolve_index(self.version))}
        self.mode, self.fusion = mode, make_fusion(fusion)  # retrieval.mode and .fusion; requests override them
        resolve_mode(mode, self.manifests[self.version], self.version, "retrieval.mode")
        self.docstores: OrderedDict[str, Any] = OrderedDict()
        self.poll_interval_s = poll_interval_s
        self.poller: asyncio.Task | None = None
        self.switching = asyncio.Lock()
        self.retry_errors = _replica_errors()

    def _docstore(self, version: str) -> Any:
        if version not in self.docstores:
            from sharding.manifest import read_index_manifest
            from sharding.search import open_docstore
            from sharding.storage import resolve

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

    async def reload(self) -> dict[str, Any]:
        """Switch to the version LATEST names now, after every shard group has loaded it."""
        from serving.rag import resolve_mode
        from sharding.manifest import read_index_manifest
        from sharding.storage import resolve

        async with self.switching:
            new = current_version(self.path)
            old = self.version
            if new == old:
                return {"version": new, "previous": old, "changed": False}
            manifest = read_index_manifest(resolve(new))
            try:  # retrieval.mode lexical or hybrid and a version without BM25 shards: keep serving the old one
                resolve_mode(self.mode, manifest, new, "retrieval.mode")
            except InvalidRequest as e:
                raise Conflict(f"not switching to it: {e.message}", code=e.code) from None
            deadline = time.monotonic() + max(self.retries_s, 60)
            groups = await asyncio.gather(*(self._call(h, "prepare", deadline, new) for h in self.searchers))
            covered = sorted(s for g in groups for s in g)
            if covered != list(range(len(manifest.shards))):
                raise Conflict(f"{new}: has {len(manifest.shards)} shards but the shard groups serve {covered}: "
                               "a version with another shard count needs a new deployment (ragtune serve)",
                               code="shard_count_changed")
            self._docstore_for(new, manifest)
            self.version = new
            log.info("index version %s -> %s", old, new)
            return {"version": new, "previous": old, "changed": True}

    def _docstore_for(self, version: str, manifest: Any) -> None:
        self.manifests[version] = manifest
        self._docstore(version)

    async def _call(self, handle: Any, method: str, deadline: float, *args: Any) -> Any:
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

    async def search(self, query: str, k: int, filter: dict[str, Any] | None = None, mode: str | None = None,
                     fusion: dict[str, Any] | None = None, param: str = "mode") -> dict[str, Any]:
        """{"passages", "version", "mode", "timings": {"embed_s", "search_s"}, "embed_batch"}.

        ``mode`` (None: ``retrieval.mode``; auto resolved per version) and ``fusion`` (overrides of
        ``retrieval.fusion``) as the request gives them; ``param`` names the request field in errors. Lexical
        searches embed nothing (embed_batch 0).
        """
        from serving import rag

        if self.poller is None and self.poll_interval_s:
            self.poller = asyncio.get_running_loop().create_task(self._poll())
        version = self.version
        manifest = self.manifests[version]
        mode = rag.resolve_mode(mode or self.mode, manifest, version, param)  # a 400 before any work
        fused = rag.make_fusion(self.fusion, fusion)
        t0 = time.perf_counter()
        xq, batch = None, 0
        if mode != "lexical":
            vector, _, batch = await self.embedder.embed.remote(query)
            xq = vector[None, :]
        t1 = time.perf_counter()
        kk: int | None = rag.search_k(k, filter, manifest.ntotal, self.overfetch)
        deadline = time.monotonic() + self.retries_s
        passages: list[dict[str, Any]] = []
        while kk is not None:  # with a filter: more candidates until k pass (widen_k)
            depth = rag.ranking_depth(mode, kk, fused)
            results = await asyncio.gather(*(self._call(h, "rank", deadline, version, xq, [query], depth,
                                                        rag.RANKINGS[mode]) for h in self.searchers))
            D, I = rag.combine(results, mode, kk, manifest.metric, fused)
            passages = rag.passages_from(D[0], I[0], self._docstore(version), k, filter)
            kk = rag.widen_k(kk, k, len(passages), filter, manifest.ntotal, self.max_candidates)
        t2 = time.perf_counter()
        return {"passages": passages, "version": version, "mode": mode, "embed_batch": batch,
                "timings": {"embed_s": t1 - t0, "search_s": t2 - t1}}

    async def ready(self) -> dict[str, Any]:
        """Whether some replica of every shard group has loaded the current version's shards."""
        version = self.version
        n = len(self.manifests[version].shards)
        try:
            states = await asyncio.wait_for(asyncio.gather(*(h.loaded.remote() for h in self.searchers)), 5)
        except (TimeoutError, *self.retry_errors) as e:
            return {"ready": False, "version": version, "reason": f"a shard group is not answering ({e!r:.80})"}
        covered = sorted(s for st in states if version in st["versions"] for s in st["shards"])
        return {"ready": covered == list(range(n)), "version": version, "shards": n, "loaded": covered}

    def info(self) -> dict[str, Any]:
        from serving.rag import resolve_mode

        m = self.manifests[self.version]
        return {"version": self.version, "shards": len(m.shards), "ntotal": m.ntotal, "factory": m.factory,
                "model": m.model.get("name"), "lexical": m.lexical is not None,
                "mode": resolve_mode(self.mode, m, self.version)}


class _Adapter:
    """A loaded LoRA adapter as Serve's multiplexer holds it; unloading it (LRU) removes it from the base."""

    def __init__(self, generator: Generator, name: str):
        self.generator, self.name = generator, name

    def __del__(self):
        gen, self.generator = self.generator, None
        if gen is not None:
            gen.unload_adapter(self.name)


@serve.deployment(name="Generator")
class Generator:
    """A causal LM with LoRA adapters multiplexed on one base, batched and streamed generation.

    The request's adapter comes from Serve's multiplexed model id (the Ingress sets it from ``model``); Serve
    routes a request to a replica that has its adapter loaded, and loads it (LRU) where none has. Requests
    are batched per adapter (``@serve.batch`` splits batches by model id); PEFT's ``adapter_names`` would
    also take mixed batches.
    """

    def __init__(self, model: str, name: str, adapters: dict[str, str], prompt: dict[str, Any],
                 defaults: dict[str, Any], device: str = "auto", dtype: str = "auto", context: int | None = None,
                 threads: int | None = None, batching: bool = True, max_batch_size: int = 8,
                 batch_wait_timeout_s: float = 0.01, max_adapters: int = 4):
        from configs.schema.serve import GenerationDefaults, PromptConfig
        from serving.generation import Decoder

        self.decoder = Decoder.load(model, device, dtype, context, threads)
        self.name, self.adapter_paths = name, dict(adapters)
        self.prompt = PromptConfig.model_validate(prompt)
        self.defaults = GenerationDefaults.model_validate(defaults)
        self.batching = batching
        self.in_use: dict[str, int] = {}
        self._decode_batch.set_max_batch_size(max_batch_size)
        self._decode_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

        async def load(name: str) -> _Adapter:
            return await self._load_adapter(name)

        # wired at init so that the LRU size comes from the config (Serve detects multiplexing on the instance)
        self.get_adapter = serve.multiplexed(max_num_models_per_replica=max_adapters)(load)

    async def _load_adapter(self, name: str) -> _Adapter:
        if name not in self.adapter_paths:
            raise NotFound(f"model {name!r} is not served", param="model", code="model_not_found")
        await asyncio.to_thread(self.decoder.add_adapter, name, self.adapter_paths[name])
        return _Adapter(self, name)

    def unload_adapter(self, name: str) -> None:
        if not self.in_use.get(name):  # a batch still decoding with it keeps it (removed at a later eviction)
            self.decoder.remove_adapter(name)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _decode_batch(self, requests: list[Any]):
        """One decode loop for the batch; yields, per step, each request's delta (StopIteration once done)."""
        steps = self.decoder.stream(requests)
        while True:
            events = await asyncio.to_thread(next, steps, None)
            if events is None:
                return
            yield [StopIteration if e is None else (e, len(requests)) for e in events]

    async def _decode_one(self, request: Any):
        steps = self.decoder.stream([request])
        while True:
            events = await asyncio.to_thread(next, steps, None)
            if events is None or events[0] is None:
                return
            yield events[0], 1

    async def _events(self, gen_request: Any, prompt_event: dict[str, Any]):
        """The prompt event, then {"text", "finish_reason", "completion_tokens", "batch"} per step."""
        adapter = gen_request.adapter
        if adapter:
            self.in_use[adapter] = self.in_use.get(adapter, 0) + 1
        try:
            yield prompt_event
            source = self._decode_batch(gen_request) if self.batching else self._decode_one(gen_request)
            async for delta, batch in source:
                yield {"text": delta.text, "finish_reason": delta.finish_reason,
                       "completion_tokens": delta.completion_tokens, "batch": batch}
        finally:
            if adapter:
                self.in_use[adapter] -= 1

    async def _prepare(self, kind: str, payload: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        from models.prompt import build_prompt, completion_prompt
        from serving.generation import GenRequest, SamplingParams

        model_id = serve.get_multiplexed_model_id()
        adapter = None
        if model_id and model_id != self.name:
            await self.get_adapter(model_id)
            adapter = model_id
        params = SamplingParams(**payload["params"])
        if kind == "chat":
            prompt = build_prompt(self.decoder.tokenizer, payload["messages"], payload["passages"], self.prompt,
                                  self.decoder.context, params.max_tokens)
            ids, used = prompt.ids, prompt.passages
            extra = {"dropped_passages": prompt.dropped_passages, "dropped_turns": prompt.dropped_turns}
        else:
            ids, used, extra = completion_prompt(self.decoder.tokenizer, payload["prompt"], self.decoder.context,
                                                 params.max_tokens), [], {}
        return GenRequest(ids, params, adapter), {"prompt_tokens": len(ids), "passages": used, **extra}

    async def stream(self, kind: str, payload: dict[str, Any]):
        """Streamed generation: first {"prompt_tokens", "passages", ...}, then one event per decode step.

        ``kind`` is chat (``payload``: messages, passages, params) or completion (prompt, params).
        """
        request, prompt_event = await self._prepare(kind, payload)
        async for event in self._events(request, prompt_event):
            yield event

    async def complete(self, kind: str, payload: dict[str, Any]) -> dict[str, Any]:
        """The whole answer at once: {"text", "finish_reason", "prompt_tokens", "completion_tokens", "passages",
        "batch"}."""
        request, prompt_event = await self._prepare(kind, payload)
        out = {**prompt_event, "text": "", "finish_reason": None, "completion_tokens": 0, "batch": 0}
        async for event in self._events(request, prompt_event):
            if "text" in event:
                out["text"] += event["text"]
                out["finish_reason"] = event["finish_reason"] or out["finish_reason"]
                out["completion_tokens"] = event["completion_tokens"]
                out["batch"] = max(out["batch"], event["batch"])
        return out

    def info(self) -> dict[str, Any]:
        return {"base": self.name, "adapters": sorted(self.adapter_paths), "loaded": self.decoder.adapters,
                "context": self.decoder.context, "device": str(self.decoder.device)}
