"""Resource and placement decisions, as pure functions of the cluster's shape (tested without Ray)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from configs.schema.base import RagtuneError


@dataclass(frozen=True)
class NodeResources:
    """What one Ray node offers."""

    cpus: float
    gpus: float = 0.0


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
    (default: a whole node, at most 8, since more torch threads per forward pass stop paying), and every node
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
    t = threads or max(1, min(8, int(min(nd.cpus for nd in cpu_nodes))))
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


def default_num_parts(corpus_bytes: int, part_size_mb: float, actors: int) -> int:
    """Parts to split a corpus into: enough to keep every actor busy, each about ``part_size_mb`` of text."""
    return max(actors, math.ceil(corpus_bytes / (part_size_mb * 2**20)), 1)


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


def plan_index_tasks(nodes: list[NodeResources], shards: int,
                     device: Literal["auto", "cpu", "gpu"] = "auto") -> IndexTaskPlan:
    """Decide how the training task and the shard tasks of ``ragtune index`` are placed.

    GPU clusters (``device`` auto or gpu): every task takes one GPU and one CPU; as many shards run at once as
    there are GPUs. CPU clusters: the shards are spread over the nodes and each node's cores are split evenly
    between the shards it runs at once, so FAISS's threads never exceed the cores they were given.
    """
    if not nodes:
        raise RagtuneError("the Ray cluster has no alive node with CPUs or GPUs; check `ray status`")
    total_gpus = int(sum(n.gpus for n in nodes))
    use_gpu = total_gpus > 0 if device == "auto" else device == "gpu"
    if use_gpu and total_gpus == 0:
        raise RagtuneError("index.device = 'gpu' but the Ray cluster has no GPUs. "
                           "Fix: set index.device to auto or cpu, or add GPU nodes to the cluster")
    if use_gpu:
        gpu_nodes = [nd for nd in nodes if nd.gpus >= 1]
        threads = max(1, min(8, int(min(nd.cpus / nd.gpus for nd in gpu_nodes))))
        return IndexTaskPlan(True, 1, 1, threads, threads, min(shards, total_gpus),
                             f"{total_gpus} GPU(s): training and adds on GPU, {min(shards, total_gpus)} shard(s) "
                             "at a time")
    cpu_nodes = [nd for nd in nodes if nd.cpus >= 1]
    cores = int(min(nd.cpus for nd in cpu_nodes))
    per_node = min(cores, math.ceil(shards / len(cpu_nodes)))
    threads = max(1, cores // per_node)
    concurrent = min(shards, per_node * len(cpu_nodes))
    return IndexTaskPlan(False, threads, 0, threads, cores, concurrent,
                         f"no GPUs: {concurrent} shard task(s) at a time x {threads} FAISS thread(s) on "
                         f"{len(cpu_nodes)} node(s)")


@dataclass(frozen=True)
class TrainPlan:
    """How Ray Train runs a fine-tuning job."""

    num_workers: int
    use_gpu: bool
    backend: Literal["gloo", "nccl"]
    precision: Literal["fp32", "bf16", "fp16"]
    reason: str


def plan_training(nodes: list[NodeResources], num_workers: int, use_gpu: bool | Literal["auto"] = "auto",
                  cpus_per_worker: int = 1, precision: str = "auto") -> TrainPlan:
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
