"""The app builder: one typed args model -> the composed Serve application.

    ragtune serve -c configs/serve/sample.yaml                                # what most people run
    serve run serving.app:build_app config_path=configs/serve/sample.yaml     # Serve's own CLI
    ragtune serve -c configs/serve/gpu-cluster.yaml --print-serve-config      # -> a KubeRay RayService's serveConfigV2

Deployments (``serving.deployments``, ``serving.fused``, ``serving.ingress``), composed by handles, in one of two
layouts (``shards.layout``; auto = fused when the whole index fits one replica's memory budget)::

    fused:  Ingress (HTTP + embed + every shard + docstore)   (/v1/search, chat retrieval, /v1/embeddings)
               \\----> Generator                              (LoRA adapters multiplexed)
            VersionBoard                                      (the version every Ingress replica answers from)

    split:  Ingress --> Retriever --> Embedder
               |            \\------> ShardSearcher0 .. ShardSearcherN-1   (one per shard group)
               |----------> Embedder                                        (/v1/embeddings)
               \\----------> Generator

The layout and resources come from ``cluster.placement.plan_serving`` on the cluster the builder runs in (the
driver for ``ragtune serve`` and ``serve run``; the Serve controller's node for ``serve deploy`` and RayService);
the plan and each route's hops are logged when the app is built (:func:`route_hops`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from pydantic import BaseModel, Field, model_validator

from cluster.placement import NodeResources, ReplicaResources, ServePlan, plan_serving
from cluster.runtime import alive_nodes
from configs.errors import redact
from configs.schema import load_config
from configs.schema.serve import LOOPBACK, ServeJobConfig
from serving.auth import api_key_hashes
from serving.rag import resolve_mode
from serving.vllm_engine import generator_deployment_options  # imports no vllm
from sharding.manifest import IndexManifest, read_index_manifest, resolve_index
from sharding.search import resident_bytes
from sharding.storage import Location

if TYPE_CHECKING:
    from ray.serve import Application, Deployment

log = logging.getLogger("ragtune.serve")


class ServeAppArgs(BaseModel):
    """Arguments of :func:`build_app`: the whole config inline (RayService, tests), or a config file path plus
    dotted overrides (``serve run serving.app:build_app config_path=...``)."""

    config: dict[str, Any] | None = Field(None, description="a ServeJobConfig as a mapping")
    config_path: str | None = Field(None, description="a configs/serve/*.yaml file")
    overrides: list[str] = Field(default_factory=list, description="dotted overrides applied to config_path")

    @model_validator(mode="after")
    def _one(self) -> ServeAppArgs:
        if (self.config is None) == (self.config_path is None):
            raise ValueError("give exactly one of config and config_path")
        return self

    def resolve(self) -> ServeJobConfig:
        if self.config is not None:
            return ServeJobConfig.model_validate(self.config)
        return load_config(ServeJobConfig, self.config_path or "", self.overrides)


def cluster_nodes() -> list[NodeResources]:
    """The alive nodes when Ray is up (the builder runs inside it), else this machine alone."""
    import ray

    if ray.is_initialized():
        return alive_nodes()
    import psutil

    try:
        import torch

        gpus = torch.cuda.device_count()
    except ImportError:
        gpus = 0
    return [NodeResources(cpus=float(os.cpu_count() or 1), gpus=float(gpus),
                          memory=float(psutil.virtual_memory().total))]


WEIGHTS = ("*.safetensors", "*.bin", "*.pt")  # the files of a model folder that are read into memory


def model_bytes(manifest: IndexManifest) -> int:
    """The embedding model's weights on disk (about what it takes in memory in fp32); 0 when not found here."""
    from models.embedders import resolve_embedder

    path = manifest.model.path
    if not (path and Path(path).is_dir()):
        try:
            path = resolve_embedder(manifest.model.name).path
        except Exception:  # not found on this machine: the replica finds it (or says why) when it starts
            return 0
    return sum(f.stat().st_size for pattern in WEIGHTS for f in Path(path).glob(pattern))


def fused_bytes(loc: Location, manifest: IndexManifest, cfg: ServeJobConfig, mode: str) -> int:
    """What one replica holding the whole index version takes in memory: its shards (less what is memory-mapped:
    ``sharding.search.resident_bytes``), its BM25 shards when ``mode`` uses them, its docstore files (an upper
    bound: lookups read row groups) and the embedding model."""
    n = len(manifest.shards)
    shards = resident_bytes(loc, manifest, range(n), cfg.index.mmap and cfg.shards.device != "gpu")
    lexical = 0
    if manifest.lexical is not None and mode != "dense":
        lexical = sum(r.bytes for r in manifest.lexical.shards) + sum(
            d.lexical.bytes for rec in manifest.shards for d in rec.deltas if d.lexical)
    docstore = sum(rec.docstore_bytes + sum(d.docstore_bytes for d in rec.deltas) for rec in manifest.shards)
    return shards + lexical + docstore + model_bytes(manifest)


def plan_for(cfg: ServeJobConfig, nodes: list[NodeResources] | None = None) -> ServePlan:
    """The placement of this config's deployments, and their layout (fused when the whole index fits
    ``shards.fused_memory_share`` of the smallest node's memory, unless ``shards.layout`` says)."""
    loc = resolve_index(cfg.index.path)
    manifest = read_index_manifest(loc)
    s = cfg.shards
    index_bytes = None  # only auto weighs the index against the budget
    if s.layout == "auto":
        mode = resolve_mode(cfg.retrieval.mode, manifest, loc.uri, "retrieval.mode")
        index_bytes = fused_bytes(loc, manifest, cfg, mode)
    replicas = s.autoscaling.min_replicas if s.autoscaling else s.replicas
    plan = plan_serving(nodes if nodes is not None else cluster_nodes(), num_shards=len(manifest.shards),
                        layout=s.layout, index_bytes=index_bytes,
                        memory_share=s.fused_memory_share, fused_in_ingress=s.fused_in_ingress,
                        groups=s.groups, searcher_replicas=max(1, replicas),
                        searcher_max_replicas=s.autoscaling.max_replicas if s.autoscaling else s.replicas,
                        embedder_replicas=cfg.embedder.replicas,
                        generator_replicas=cfg.generator.replicas, generator_device=cfg.generator.placement_device,
                        generator_gpus=cfg.generator.gpus_per_replica,
                        searcher_device=s.device,
                        num_cpus={"embedder": cfg.embedder.num_cpus, "searcher": s.num_cpus,
                                  "generator": cfg.generator.num_cpus},
                        threads={"embedder": cfg.embedder.threads, "searcher": s.threads,
                                 "generator": cfg.generator.threads})
    # the replicas that compute yield the cores to the proxy and the Ingress (limits.compute_nice); an Ingress
    # that holds the index is the Ingress, at Ray's priority
    nice = cfg.limits.compute_nice
    index_nice = 0 if plan.layout == "fused" and plan.fused_in_ingress else nice
    return replace(plan, embedder=replace(plan.embedder, nice=index_nice), searcher=replace(plan.searcher,
                   nice=index_nice), generator=replace(plan.generator, nice=nice))


def check_retrieval(cfg: ServeJobConfig) -> str:
    """``retrieval.mode`` against the index version served first: the mode it resolves to (auto: hybrid when the
    version has a lexical part, else dense); lexical or hybrid on a version without one is an InvalidRequest that
    names retrieval.mode."""
    version = resolve_index(cfg.index.path)
    return resolve_mode(cfg.retrieval.mode, read_index_manifest(version), version.uri, "retrieval.mode")


def replica_env() -> dict[str, str]:
    """The environment variables every replica starts with: ``OMP_WAIT_POLICY`` PASSIVE unless this process sets
    it. The OpenMP threads of torch and FAISS otherwise spin after each parallel region, waiting for the next; when
    a node's replicas together run more threads than it has cores (a laptop: the index replicas and the Generator,
    2 threads each, on 2 cores), the spinning threads take the cores from the ones with work, every request takes
    more CPU, and the app can stay in that state: in the soak (docs/benchmarks.md) p50 went from 50 ms to 0.9 s for
    30-50 s after an index update, at the same load. Passive threads sleep instead."""
    return {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY") or "PASSIVE"}


def _with_env(options: dict[str, Any]) -> dict[str, Any]:
    """Serve ``ray_actor_options`` with :func:`replica_env` (Ray merges them into the application's env_vars)."""
    return {**options, "runtime_env": {"env_vars": replica_env()}}


def _actor_options(r: ReplicaResources) -> dict[str, Any]:
    return _with_env({"num_cpus": r.num_cpus, **({"num_gpus": r.num_gpus} if r.num_gpus else {})})


def _common(cfg: ServeJobConfig) -> dict[str, Any]:
    """Options every deployment takes."""
    return {"logging_config": {"enable_access_log": cfg.serve.access_log}}


def _deployment(cls: type) -> Deployment:
    """A ``@serve.deployment`` class as what it is when the program runs, a Serve Deployment (type checkers keep
    a decorated class's own type)."""
    return cast("Deployment", cls)


def route_hops(plan: ServePlan) -> dict[str, str]:
    """Each route's path through the deployments under this plan (logged at start, printed by bench/serve.py)."""
    n = len(plan.groups[0]) if plan.layout == "fused" else sum(len(g) for g in plan.groups)
    if plan.layout == "fused" and not plan.fused_in_ingress:
        index = f"IndexReplica (embed + {n} shard(s) + docstore)"
        return {"/v1/search": f"proxy -> Ingress -> {index} -> Ingress",
                "/v1/embeddings": "proxy -> Ingress -> IndexReplica (embed) -> Ingress",
                "/v1/chat/completions": f"proxy -> Ingress -> {index} -> Ingress -> Generator"}
    if plan.layout == "fused":
        index = f"Ingress (embed + {n} shard(s) + docstore, in process)"
        return {"/v1/search": f"proxy -> {index}",
                "/v1/embeddings": "proxy -> Ingress (embed, in process)",
                "/v1/chat/completions": f"proxy -> {index} -> Generator"}
    groups = f"ShardSearcher x{len(plan.groups)} ({n} shard(s), in parallel)"
    search = f"Retriever -> Embedder -> Retriever -> {groups} -> Retriever (docstore)"
    return {"/v1/search": f"proxy -> Ingress -> {search} -> Ingress",
            "/v1/embeddings": "proxy -> Ingress -> Embedder",
            "/v1/chat/completions": f"proxy -> Ingress -> {search} -> Ingress -> Generator"}


def _scaling(cfg: ServeJobConfig, plan: ServePlan) -> dict[str, Any]:
    """Replicas of a shard group, or of the fused replica: fixed or autoscaled, spread over the nodes."""
    s = cfg.shards
    scaling: dict[str, Any] = (
        {"autoscaling_config": {"min_replicas": s.autoscaling.min_replicas,
                                "max_replicas": s.autoscaling.max_replicas,
                                "target_ongoing_requests": s.autoscaling.target_ongoing_requests}}
        if s.autoscaling else {"num_replicas": s.replicas})
    if plan.searcher_max_per_node:  # a group's replicas on different nodes where the cluster has them: a lost node
        scaling["max_replicas_per_node"] = plan.searcher_max_per_node  # leaves one serving
    return scaling


def build_app(args: ServeAppArgs | dict[str, Any]) -> Application:
    """The Serve application for a ServeJobConfig (``serve.run(build_app(...))``).

    Each deployment is bound with the config sections it reads and the resources its placement decided; the
    plan's layout decides which deployments there are.
    """
    # imported here: they import Ray at their top, and importing this module (jobs.serve does, for
    # `ragtune --help`) must not
    from ray import serve

    from serving.deployments import Embedder, Generator, Retriever, ShardSearcher
    from serving.fused import FusedIndex, IndexReplica, VersionBoard
    from serving.ingress import Ingress

    if not isinstance(args, ServeAppArgs):
        args = ServeAppArgs.model_validate(args)
    cfg = args.resolve()
    mode = check_retrieval(cfg)
    plan = plan_for(cfg)
    log.info("serving plan: %s; retrieval.mode %s (%s for %s)", plan.reason, cfg.retrieval.mode, mode,
             redact(cfg.index.path))
    for route, hops in route_hops(plan).items():
        log.info("%s: %s", route, hops)
    e, s, g = cfg.embedder, cfg.shards, cfg.generator
    health: dict[str, Any] = {"health_check_period_s": s.health_check_period_s,
                              "health_check_timeout_s": max(10.0, s.health_check_period_s)}

    placed = generator_deployment_options(g, plan.generator)  # vllm with tensor parallelism: a placement group
    placed["ray_actor_options"] = _with_env(placed["ray_actor_options"])  # per replica
    generator = _deployment(Generator).options(
        num_replicas=g.replicas, **_common(cfg), **placed,
        max_ongoing_requests=max(32, 2 * g.max_batch_size), max_queued_requests=cfg.limits.max_queued_generations,
    ).bind(g, cfg.prompt, plan.generator, cfg.limits.latency_target_share * cfg.limits.request_timeout_s or None)
    keys = sorted(api_key_hashes(cfg.auth.api_keys, cfg.auth.api_keys_env))  # only hashes travel to the replicas
    ingress: dict[str, Any] = {"generation": g, "retrieval": cfg.retrieval, "limits": cfg.limits,
                               "key_hashes": keys, "api_keys_env": cfg.auth.api_keys_env}
    # above limits.max_concurrent_requests: the requests over it reach the Ingress, which answers them a 429
    max_ongoing = max(512, cfg.limits.max_concurrent_requests + 64)

    if plan.layout == "fused" and not plan.fused_in_ingress:  # IndexReplica replicas, scaled like a shard group,
        # behind one light Ingress that holds the version pointer and retries a replica that died on another; the
        # replicas follow the board, so that a new version is loaded in each before the Ingress switches to it
        board = _deployment(VersionBoard).options(**_common(cfg)).bind()
        replica = serve.deployment(name="IndexReplica")(IndexReplica).options(
            **_common(cfg), ray_actor_options=_actor_options(plan.searcher), **health, **_scaling(cfg, plan),
            max_ongoing_requests=256,  # Serve's default (5) would keep its batches (encoder, search, docstore) small
        ).bind(cfg.index, e, cfg.retrieval, plan.searcher, board)
        return _deployment(Ingress).options(
            num_replicas=1, **_common(cfg), ray_actor_options=_actor_options(plan.light),
            max_ongoing_requests=max_ongoing,
        ).bind(replica, replica, generator, **ingress, index=cfg.index, board=board)

    if plan.layout == "fused":  # the Ingress replicas hold the index: scaled like a shard group, in step by the board
        board = _deployment(VersionBoard).options(**_common(cfg)).bind()
        return _deployment(Ingress).options(
            **_common(cfg), ray_actor_options=_actor_options(plan.searcher), **health, **_scaling(cfg, plan),
            max_ongoing_requests=max_ongoing,
        ).bind(None, None, generator, **ingress, index=cfg.index, fused=FusedIndex(e, plan.searcher), board=board)

    # split: an Embedder, the shard groups and a Retriever behind one Ingress
    embedder = _deployment(Embedder).options(
        num_replicas=e.replicas, **_common(cfg), ray_actor_options=_actor_options(plan.embedder),
        max_ongoing_requests=max(64, 2 * e.max_batch_size),  # Serve's default (5) would keep batches from filling
    ).bind(cfg.index, e, plan.embedder)
    searchers = [
        _deployment(ShardSearcher).options(
            name=f"ShardSearcher{n}", **_common(cfg), ray_actor_options=_actor_options(plan.searcher),
            max_ongoing_requests=64, **health, **_scaling(cfg, plan),
        ).bind(cfg.index, shards, plan.searcher, cfg.retrieval.mode)
        for n, shards in enumerate(plan.groups)]
    retriever = _deployment(Retriever).options(
        num_replicas=1, **_common(cfg), ray_actor_options=_actor_options(plan.light), max_ongoing_requests=256,
    ).bind(embedder, searchers, cfg.index, cfg.retrieval)
    return _deployment(Ingress).options(
        num_replicas=1, **_common(cfg), ray_actor_options=_actor_options(plan.light), max_ongoing_requests=max_ongoing,
    ).bind(embedder, retriever, generator, **ingress)


def serve_config(cfg: ServeJobConfig) -> dict[str, Any]:
    """A Serve config (``serve deploy``; a KubeRay RayService's ``serveConfigV2``) for this ServeJobConfig.

    The whole config travels inline as the builder's args; the deployments' resources are decided by the
    builder on the cluster itself. API keys are never written: the replicas read ``auth.api_keys_env``.
    """
    inline = cfg.model_dump(mode="json")
    inline["auth"]["api_keys"] = []
    inline["serve"]["print_config"] = False
    inline.pop("cluster", None)
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": cfg.http.host or LOOPBACK, "port": cfg.http.port,
                         "request_timeout_s": cfg.limits.request_timeout_s + 5},
        "applications": [{
            "name": cfg.http.app_name, "route_prefix": cfg.http.route_prefix,
            "import_path": "serving.app:build_app",
            "runtime_env": {"env_vars": {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}},
            "args": {"config": inline},
        }],
    }


def plan_summary(cfg: ServeJobConfig, nodes: list[NodeResources] | None = None) -> dict[str, Any]:
    """The plan as plain data (for logs and tests)."""
    return asdict(plan_for(cfg, nodes))
