"""Resource and placement decisions, as pure functions of the cluster's shape (tested without Ray)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from configs.errors import RagtuneError


@dataclass(frozen=True)
class NodeResources:
    """What one Ray node offers."""

    cpus: float
    gpus: float = 0.0
    memory: float = 0.0  # bytes of Ray's ``memory`` resource (what tasks may reserve with memory=); 0 = unknown


@dataclass(frozen=True)
class EmbedActorPlan:
    """How many embedding actors to start and what each reserves."""

    actors: int
    num_cpus: float  # Ray CPUs reserved per actor
    num_gpus: float  # Ray GPUs reserved per actor
    threads: int  # torch intra-op threads per actor
    device: Literal["cpu", "cuda"]
    fp16: bool
    batch_size: int
    reason: str


def plan_embed_actors(
    nodes: list[NodeResources],
    *,
    device: Literal["auto", "cpu", "gpu"] = "auto",
    actors: int | None = None,
    threads: int | None = None,
    fp16: bool | None = None,
    batch_size: int | None = None,
) -> EmbedActorPlan:
    """Decide the embedding actor pool from the nodes' resources.

    GPU clusters get one actor per GPU (fp16, large batches). CPU clusters get actors of ``threads`` cores
    (default: a quarter of a node's cores, 1 to 4: more processes beat more threads per forward pass), and every node
    keeps at least one Ray CPU unreserved so that Ray Data's read and chunk tasks can be scheduled: if the
    actors claimed every CPU, those tasks would wait forever and the job would hang without an error.
    """
    if not nodes:
        raise RagtuneError("the Ray cluster has no alive node with CPUs or GPUs; check `ray status`")
    total_gpus = int(sum(n.gpus for n in nodes))
    use_gpu = total_gpus > 0 if device == "auto" else device == "gpu"
    if use_gpu and total_gpus == 0:
        raise RagtuneError(
            "embed.device = 'gpu' but the Ray cluster has no GPUs. "
            "Fix: set embed.device to auto or cpu, or add GPU nodes to the cluster"
        )
    if use_gpu:
        n = actors or total_gpus
        if n > total_gpus:
            raise RagtuneError(
                f"embed.actors = {n} GPU actors but the cluster has {total_gpus} GPUs. "
                f"Fix: set embed.actors <= {total_gpus} or null"
            )
        gpu_nodes = [nd for nd in nodes if nd.gpus >= 1]
        cpus_per_gpu = min(nd.cpus / nd.gpus for nd in gpu_nodes)
        return EmbedActorPlan(
            actors=n, num_cpus=1, num_gpus=1, threads=max(1, min(4, int(cpus_per_gpu) - 1)),
            device="cuda", fp16=True if fp16 is None else fp16, batch_size=batch_size or 256,
            reason=f"{total_gpus} GPUs: one actor per GPU",
        )

    cpu_nodes = [nd for nd in nodes if nd.cpus >= 1]
    # Small BERT-style embedders scale better over processes than over intra-op threads: on 2 cores, 2 actors x
    # 1 thread embedded 0.99x the chunks/s of a plain 2-thread encode loop, 1 actor x 2 threads 0.88x
    # (bench/embed.py, docs/benchmarks.md). Bigger nodes get a few threads per actor to bound model copies.
    t = threads or max(1, min(4, int(min(nd.cpus for nd in cpu_nodes)) // 4))
    per_node = [max(1, int(nd.cpus) // t) for nd in cpu_nodes]
    capacity = sum(per_node)
    n = actors or capacity
    if n > capacity:
        raise RagtuneError(
            f"embed.actors = {n} actors of {t} threads do not fit on {len(cpu_nodes)} node(s) with "
            f"{sum(int(nd.cpus) for nd in cpu_nodes)} CPUs. "
            f"Fix: set embed.actors <= {capacity}, lower embed.threads_per_actor, or leave both null"
        )
    # Reserve one CPU less than the threads when the actors would otherwise take every CPU (half a CPU for
    # one-thread actors: Ray accepts fractions below one). Threads may exceed the reservation: while the
    # actors embed, the reading and chunking before them is done.
    total = sum(int(nd.cpus) for nd in cpu_nodes)
    reserve: float = t if n * t <= total - 1 else (t - 1 if t > 1 else 0.5)
    if fp16:
        raise RagtuneError("embed.fp16 = true needs GPU actors but this plan runs on CPU. "
                           "Fix: set embed.fp16 to null or false, or run on a cluster with GPUs")
    return EmbedActorPlan(
        actors=n, num_cpus=reserve, num_gpus=0, threads=t, device="cpu",
        fp16=False, batch_size=batch_size or 64,
        reason=f"no GPUs: {n} CPU actor(s) x {t} threads on {len(cpu_nodes)} node(s)",
    )


@dataclass(frozen=True)
class IndexTaskPlan:
    """What each index task (training, one shard) reserves, and the FAISS threads it runs."""

    use_gpu: bool
    num_cpus: float  # Ray CPUs per task
    num_gpus: float  # Ray GPUs per task: 1 on a GPU cluster, else 0
    threads: int  # faiss OpenMP threads per task
    train_threads: int  # threads of the one training task (a whole node on CPU)
    concurrent: int  # shard tasks that run at once
    reason: str
    memory: int = 0  # bytes each shard task reserves (Ray's memory=); 0 = none declared


def plan_index_tasks(nodes: list[NodeResources], shards: int,
                     device: Literal["auto", "cpu", "gpu"] = "auto", task_memory: int = 0) -> IndexTaskPlan:
    """Decide how the training task and the shard tasks of ``ragtune index`` are placed.

    GPU clusters (``device`` auto or gpu): every task takes one GPU and one CPU; as many shards run at once as
    there are GPUs. CPU clusters: the shards are spread over the nodes and each node's cores are split evenly
    between the shards it runs at once, so FAISS's threads never exceed the cores they were given.
    ``task_memory`` (bytes a shard task needs at its peak, 0 = not known) is declared to Ray as ``memory=`` and
    also bounds how many run at once on a node: no more than the node's Ray ``memory`` holds.
    """
    if not nodes:
        raise RagtuneError("the Ray cluster has no alive node with CPUs or GPUs; check `ray status`")
    total_gpus = int(sum(n.gpus for n in nodes))
    use_gpu = total_gpus > 0 if device == "auto" else device == "gpu"
    if use_gpu and total_gpus == 0:
        raise RagtuneError("index.device = 'gpu' but the Ray cluster has no GPUs. "
                           "Fix: set index.device to auto or cpu, or add GPU nodes to the cluster")
    mem_nodes = [nd.memory for nd in nodes if nd.memory > 0 and (nd.gpus >= 1 if use_gpu else nd.cpus >= 1)]
    node_memory = int(min(mem_nodes)) if mem_nodes and task_memory else 0
    if node_memory and task_memory > node_memory:
        raise RagtuneError(f"a shard task needs about {task_memory / 2**30:.1f} GiB but the smallest node offers Ray "
                           f"{node_memory / 2**30:.1f} GiB of memory. Fix: set index.shards higher (smaller shards) or "
                           "null, or use nodes with more memory")
    by_memory = node_memory // task_memory if node_memory else None  # shard tasks one node's memory holds
    memory_note = (f"; memory={task_memory / 2**30:.2f} GiB each, {by_memory} per node in "
                   f"{node_memory / 2**30:.1f} GiB" if by_memory else "")
    if use_gpu:
        gpu_nodes = [nd for nd in nodes if nd.gpus >= 1]
        threads = max(1, min(8, int(min(nd.cpus / nd.gpus for nd in gpu_nodes))))
        at_once = min(shards, sum(min(int(nd.gpus), by_memory or int(nd.gpus)) for nd in gpu_nodes))
        return IndexTaskPlan(True, 1, 1, threads, threads, at_once,
                             f"{total_gpus} GPU(s): training and adds on GPU, {at_once} shard(s) at a time"
                             + memory_note, task_memory)
    cpu_nodes = [nd for nd in nodes if nd.cpus >= 1]
    cores = int(min(nd.cpus for nd in cpu_nodes))
    per_node = min(cores, math.ceil(shards / len(cpu_nodes)), by_memory or cores)
    threads = max(1, cores // per_node)
    concurrent = min(shards, per_node * len(cpu_nodes))
    return IndexTaskPlan(False, threads, 0, threads, cores, concurrent,
                         f"no GPUs: {concurrent} shard task(s) at a time x {threads} FAISS thread(s) on "
                         f"{len(cpu_nodes)} node(s)" + memory_note, task_memory)


@dataclass(frozen=True)
class TrainPlan:
    """How Ray Train runs a fine-tuning job."""

    num_workers: int
    use_gpu: bool
    backend: Literal["gloo", "nccl"]
    precision: Literal["fp32", "bf16", "fp16"]
    reason: str


def plan_training(nodes: list[NodeResources], num_workers: int, use_gpu: bool | Literal["auto"] = "auto",
                  cpus_per_worker: float = 1, precision: str = "auto") -> TrainPlan:
    """Decide GPUs, backend and precision for ``num_workers`` training workers, or fail before any work.

    A worker group that does not fit the cluster would wait for resources forever, so it is an error here.
    ``auto`` precision is bf16 on GPUs (the worker falls back to fp16 where the GPU lacks bf16) and fp32 on CPUs.
    """
    if not nodes:
        raise RagtuneError("the Ray cluster has no alive node with CPUs or GPUs; check `ray status`")
    total_gpus = int(sum(n.gpus for n in nodes))
    gpu = total_gpus > 0 if use_gpu == "auto" else bool(use_gpu)
    if gpu and num_workers > total_gpus:
        raise RagtuneError(f"scaling.num_workers = {num_workers} GPU workers but the cluster has {total_gpus} GPUs. "
                           + ("Fix: set scaling.use_gpu to false or auto" if total_gpus == 0 else
                              f"Fix: set scaling.num_workers <= {total_gpus}"))
    cpus = int(sum(n.cpus for n in nodes))
    if not gpu and num_workers * cpus_per_worker > cpus:
        raise RagtuneError(f"scaling.num_workers x scaling.cpus_per_worker = {num_workers} x {cpus_per_worker} "
                           f"CPUs but the cluster has {cpus}. Fix: fewer workers or fewer CPUs per worker")
    if precision == "auto":
        precision = "bf16" if gpu else "fp32"
    elif precision in ("bf16", "fp16") and not gpu:
        raise RagtuneError(f"train.precision = {precision!r} needs GPU workers; this run trains on CPUs. "
                           "Fix: set train.precision to auto or fp32")
    return TrainPlan(num_workers, gpu, "nccl" if gpu else "gloo", precision,  # type: ignore[arg-type]
                     f"{num_workers} {'GPU' if gpu else 'CPU'} worker(s), {'nccl' if gpu else 'gloo'}, {precision}")


# --- serving ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ReplicaResources:
    """What one replica of a Serve deployment reserves and runs with."""

    num_cpus: float  # Ray CPUs reserved
    num_gpus: float  # Ray GPUs reserved (fractions share a device)
    threads: int  # torch or FAISS threads
    device: Literal["cpu", "gpu"]
    nice: int = 0  # CPU priority of its threads (limits.compute_nice for the replicas that compute; 0 = as Ray's)


Layout = Literal["fused", "split"]


@dataclass(frozen=True)
class ServePlan:
    """Resources of every deployment of the serving app, its layout, and which index shards each ShardSearcher
    holds.

    ``layout`` fused: the Ingress replicas hold the query encoder, every shard and the docstore themselves
    (``fused_in_ingress``; else IndexReplica replicas do, behind one Ingress of ``light`` resources);
    ``searcher`` is their resources (``embedder`` too: they embed), ``groups`` one group of every shard, and
    ``light`` is unused when the Ingress holds the index. Split: an Embedder, one ShardSearcher deployment per
    group, a Retriever and the Ingress.
    """

    embedder: ReplicaResources
    searcher: ReplicaResources
    generator: ReplicaResources
    light: ReplicaResources  # Retriever and Ingress: routing, merging, HTTP
    groups: list[list[int]]  # shard numbers of each ShardSearcher deployment
    reason: str
    searcher_max_per_node: int | None = None  # replicas of one group on one node at most (Serve's
    # max_replicas_per_node), so that losing a node leaves each group a replica elsewhere; None = no limit
    layout: Layout = "split"
    fused_in_ingress: bool = True  # fused: the Ingress replicas hold the index (else an IndexReplica deployment)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def choose_layout(nodes: list[NodeResources], layout: Literal["auto", "fused", "split"], index_bytes: int | None,
                  memory_share: float) -> tuple[Layout, str]:
    """The serving layout and why: ``layout`` when it is fused or split; for auto, fused when the whole index
    (``index_bytes``: shards, BM25 shards, docstore and embedding model, as one replica holds them) fits
    ``memory_share`` of the smallest node's memory, else split (also when either size is unknown)."""
    if layout != "auto":
        return layout, f"shards.layout = {layout}"
    mem = [n.memory for n in nodes if n.cpus >= 1 and n.memory > 0]
    if index_bytes is None or not mem:
        return "split", f"shards.layout auto: {'the index size' if index_bytes is None else 'node memory'} unknown"
    budget = memory_share * min(mem)
    fits = index_bytes <= budget
    return ("fused" if fits else "split"), (
        f"shards.layout auto: the index needs {_gib(index_bytes)} in one replica, "
        f"{'within' if fits else 'over'} {_gib(budget)} (shards.fused_memory_share {memory_share:g} of the "
        f"smallest node's {_gib(min(mem))})")


def replicas_per_node(replicas: int, capacity: list[int]) -> int | None:
    """The most replicas of one deployment to allow on one node, so that they spread over the nodes.

    ``capacity``: how many replicas each node could hold by its resources. The limit is the smallest that still
    places every replica (the sum over nodes of min(limit, capacity) reaches ``replicas``: a replica beyond that
    would wait for a node forever), and it is below ``replicas``, so no node holds them all and losing any one
    node leaves the deployment a replica elsewhere. None (no limit) where there is nothing to spread (one
    replica, or one node that can hold one) or no such limit exists (only one node has room for more than one),
    or it would exceed Serve's largest (100).
    """
    hosts = [c for c in capacity if c >= 1]
    if replicas < 2 or len(hosts) < 2:
        return None
    for limit in range(math.ceil(replicas / len(hosts)), min(replicas, 101)):
        if sum(min(limit, c) for c in hosts) >= replicas:
            return limit
    return None


MAX_DEFAULT_GROUPS = 8  # more deployments than this cost more in fan-out than they give in parallel search


def shard_groups(num_shards: int, groups: int | None = None) -> list[list[int]]:
    """Split shards 0..num_shards-1 into contiguous groups of nearly equal size (one ShardSearcher each).

    ``groups`` null means one group per shard, at most 8; more groups than shards is an error.
    """
    if num_shards < 1:
        raise RagtuneError("the index has no shards. Fix: build it with `ragtune index`")
    if groups is not None and groups > num_shards:
        raise RagtuneError(f"shards.groups = {groups} but the index has {num_shards} shard(s). "
                           f"Fix: set shards.groups <= {num_shards}, or null")
    g = groups or min(num_shards, MAX_DEFAULT_GROUPS)
    bounds = [i * num_shards // g for i in range(g + 1)]
    return [list(range(bounds[i], bounds[i + 1])) for i in range(g)]


def _floor3(x: float) -> float:
    """``x`` rounded down to 3 decimals: shares that add up to no more than what they were cut from (rounded to
    nearest, three replicas of 2/3 of a CPU each asked 0.667, 2.001 of 2 CPUs, and the third never started)."""
    return math.floor(x * 1000 + 1e-9) / 1000


def plan_serving(nodes: list[NodeResources], *, num_shards: int, groups: int | None = None,
                 searcher_replicas: int = 1, searcher_max_replicas: int | None = None,
                 embedder_replicas: int = 1, generator_replicas: int = 1,
                 light_replicas: int = 2, generator_device: Literal["auto", "cpu", "gpu"] = "auto",
                 searcher_device: Literal["auto", "cpu", "gpu"] = "auto",
                 num_cpus: dict[str, float | None] | None = None,
                 threads: dict[str, int | None] | None = None, generator_gpus: int = 1,
                 layout: Literal["auto", "fused", "split"] = "auto", index_bytes: int | None = None,
                 memory_share: float = 0.25, fused_in_ingress: bool | None = None) -> ServePlan:
    """Decide the resources of the serving app's deployments from the cluster's shape.

    GPUs: each Generator replica takes a whole GPU (device auto or gpu); ShardSearchers share the GPUs left over
    (fractions, so several replicas fit one device) when the index kind can go onto a GPU; with none left over
    they stay on the CPU (auto) or it is an error (gpu). The Embedder stays on the CPU: queries are a few
    tokens, and batching keeps it cheap. CPUs: the default reservations (Embedder and Generator 1 each,
    ShardSearcher 0.5, Retriever and Ingress 0.1) are scaled down together when the app would not otherwise fit
    the cluster (a laptop runs it all on 2 cores: reservations only place replicas, threads do the work);
    reservations given explicitly are kept and must fit. The replicas of each shard group are spread over the
    nodes that can hold one (``replicas_per_node``), so that a lost node never takes a group's every replica.

    The layout (``choose_layout``): fused puts the encoder, every shard and the docstore in one replica type
    (reserving 1 CPU and the embedder's threads by default, GPUs as the searchers would, replicas like a shard
    group's) and leaves the Embedder and the Retriever out; split is the deployments above.

    Args:
        nodes: the cluster's alive nodes.
        num_shards: shards of the index version served.
        groups: ShardSearcher deployments (null: one per shard, at most 8).
        searcher_replicas, embedder_replicas, generator_replicas: replicas of each (searchers: per group).
        searcher_max_replicas: the most replicas a group scales to (autoscaling), for the per-node limit;
            None = ``searcher_replicas``.
        light_replicas: Retriever + Ingress replicas together.
        generator_device, searcher_device: auto, cpu or gpu.
        num_cpus: explicit reservations by role (embedder, searcher, generator), None = default.
        threads: explicit threads by role, None = default.
        generator_gpus: GPUs one Generator replica on GPUs spans, all on one node (generator.engine vllm:
            tensor_parallel_size; GeneratorConfig.gpus_per_replica).
        layout: shards.layout (auto, fused, split).
        index_bytes: what one replica holding the whole index would hold in memory (None: unknown).
        memory_share: shards.fused_memory_share.
        fused_in_ingress: shards.fused_in_ingress (fused: false = one light Ingress in front of the index
            replicas; None = false when a replica can be lost with another left to retry on: 2 or more of them).
    """
    if not nodes:
        raise RagtuneError("the Ray cluster has no alive node with CPUs or GPUs; check `ray status`")
    num_cpus, threads = num_cpus or {}, threads or {}
    kind, why = choose_layout(nodes, layout, index_bytes, memory_share)
    fused = kind == "fused"
    most = max(searcher_replicas, searcher_max_replicas or 0)
    if fused_in_ingress is None:  # apart where another replica is there to retry a lost one's requests on
        fused_in_ingress, apart_why = most < 2, f"shards.fused_in_ingress auto: {most} replica(s)"
    else:
        apart_why = f"shards.fused_in_ingress = {str(fused_in_ingress).lower()}"
    apart = fused and not fused_in_ingress  # the index replicas are a deployment of their own, behind one Ingress
    grouped = shard_groups(num_shards, 1 if fused else groups)
    total_gpus = int(sum(n.gpus for n in nodes))
    cpu_nodes = [n for n in nodes if n.cpus >= 1]
    node_cpus = int(min(n.cpus for n in cpu_nodes)) if cpu_nodes else 1
    gen_gpu = total_gpus > 0 if generator_device == "auto" else generator_device == "gpu"
    if gen_gpu and generator_replicas * generator_gpus > total_gpus:
        raise RagtuneError(f"generator.replicas = {generator_replicas} GPU replicas but the cluster has {total_gpus} "
                           f"GPU(s){f' ({generator_gpus} per replica)' if generator_gpus > 1 else ''}. " + (
                               "Fix: set generator.device to auto or cpu (generator.engine hf; vllm runs only on "
                               "GPUs), or add GPU nodes" if total_gpus == 0 else
                               f"Fix: set generator.replicas <= {total_gpus // generator_gpus}"))
    if gen_gpu and generator_gpus > max(n.gpus for n in nodes):
        raise RagtuneError(f"generator.vllm.tensor_parallel_size = {generator_gpus} but no node has "
                           f"{generator_gpus} GPUs (at most {max(n.gpus for n in nodes):g}): a replica's GPUs are "
                           "on one node. Fix: lower tensor_parallel_size, or use nodes with more GPUs")
    n_search = len(grouped) * searcher_replicas
    left = total_gpus - (generator_replicas * generator_gpus if gen_gpu else 0)
    search_gpu = left > 0 if searcher_device == "auto" else searcher_device == "gpu"
    if search_gpu and left <= 0:
        raise RagtuneError(f"shards.device = 'gpu' but no GPU is left for the ShardSearchers ({total_gpus} GPU(s), "
                           f"{total_gpus - left} taken by the Generator). Fix: set shards.device "
                           "to auto or cpu, or add GPUs")
    search_share = _floor3(min(1.0, left / n_search)) if search_gpu else 0.0
    defaults = {"embedder": 1.0, "generator": 1.0, "searcher": 1.0 if fused else 0.5, "light": 0.1}
    counts = {"embedder": 0 if fused else embedder_replicas, "generator": generator_replicas, "searcher": n_search,
              "light": (1 if apart else 0) if fused else light_replicas}
    total_cpus = sum(n.cpus for n in nodes)
    fixed = sum((num_cpus.get(r) or 0) * counts[r] for r in counts)
    if fixed > total_cpus:
        raise RagtuneError(f"the CPU reservations given (embedder/searcher/generator num_cpus x replicas = {fixed:g}) "
                           f"exceed the cluster's {total_cpus:g} CPUs. Fix: lower num_cpus or replicas, or leave "
                           "num_cpus null")
    flexible = sum(defaults[r] * counts[r] for r in counts if num_cpus.get(r) is None)
    scale = min(1.0, (total_cpus - fixed) / flexible) if flexible else 1.0
    if scale <= 0:
        raise RagtuneError("no CPUs are left for the deployments whose num_cpus is null. Fix: lower the explicit "
                           "num_cpus, or set them for every deployment")

    def cpus(role: str) -> float:
        given = num_cpus.get(role)
        return given if given is not None else max(0.01, _floor3(defaults[role] * scale))

    def thr(role: str, default: int) -> int:
        return threads.get(role) or default

    on_node = max(1, min(4, node_cpus))
    searcher_cpus = cpus("searcher")
    fit = [int(n.gpus / search_share + 1e-9) if search_gpu else int(n.cpus / searcher_cpus + 1e-9) for n in nodes]
    spread = replicas_per_node(searcher_max_replicas or searcher_replicas, fit)
    searcher = ReplicaResources(searcher_cpus, search_share, thr("searcher", on_node if fused else 1),
                                "gpu" if search_gpu else "cpu")
    return ServePlan(
        embedder=searcher if fused else ReplicaResources(cpus("embedder"), 0.0, thr("embedder", on_node), "cpu"),
        searcher=searcher,
        generator=ReplicaResources(cpus("generator"), float(generator_gpus) if gen_gpu else 0.0,
                                   thr("generator", on_node), "gpu" if gen_gpu else "cpu"),
        light=ReplicaResources(cpus("light"), 0.0, 1, "cpu"),
        groups=grouped,
        reason=(f"{kind} layout ({why}); "
                + (f"IndexReplica replicas holding all {num_shards} shard(s), behind one Ingress ({apart_why})"
                   if apart else f"Ingress replicas holding all {num_shards} shard(s) ({apart_why})" if fused else
                   f"{len(grouped)} shard group(s) of {num_shards} shard(s)")
                + f"; generator on {'GPU' if gen_gpu else 'CPU'}, {'index replicas' if fused else 'searchers'} on "
                f"{f'GPU ({search_share:g} of one each)' if search_gpu else 'CPU'}"
                + (f"; CPU reservations scaled x{scale:.2f} to fit {total_cpus:g} CPUs" if scale < 1 else "")
                + (f"; at most {spread} replica(s) of a shard group per node" if spread else "")),
        searcher_max_per_node=spread,
        layout=kind,
        fused_in_ingress=not apart,
    )
