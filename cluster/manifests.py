"""What a cluster manifest asks for, and whether the ragtune jobs it runs fit it: pure functions, no Kubernetes.

    from cluster.manifests import check
    check("cluster/kuberay/rayjob-finetune.yaml")     # [] or every problem found, each with the fix

A manifest is a KubeRay ``RayJob``, ``RayService`` or ``RayCluster`` (``ray.io/v1``; other documents in the same
file, such as a Secret, are skipped) or a Ray cluster-launcher YAML (``ray up``). From it come

- the nodes Ray will see: a pod's Ray CPUs, GPUs and memory as KubeRay derives them for ``ray start``
  (``rayStartParams`` first, else the Ray container's limits, the CPU request as a fallback; GPUs from a limit
  whose name ends in ``gpu``), a launcher node type's ``resources``; counted at a group's minimum, its
  ``replicas`` or its maximum;
- the ragtune jobs it runs: a RayJob's ``entrypoint`` (``python -m jobs.JOB --config FILE [overrides]``, or
  ``bash -c 'cd DIR && python -m ... && python -m ...'``), else the ``ragtune/jobs`` annotation of a RayService
  or RayCluster or ``metadata.ragtune_jobs`` of a launcher YAML: one ``JOB -c FILE [overrides]`` each, what
  ``ragtune submit --`` is given.

Each job's config is loaded with its schema and its placement is planned on those nodes by the functions the
job itself calls (``cluster.placement``), and the workers, actors or replicas of the plan are packed onto the
nodes one whole bundle per node, as Ray places them: a job that would fail its own checks or wait forever for
resources is a problem here. Storage must be shared (a URI, or a volume mounted at the same path on every pod),
token auth must be on, and every image must say which Ray and Python it has (and agree with ``rayVersion``).
"""

from __future__ import annotations

import math
import re
import shlex
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from cluster.placement import (
    MAX_DEFAULT_GROUPS,
    NodeResources,
    plan_embed_actors,
    plan_index_tasks,
    plan_serving,
    plan_training,
)
from cluster.submit import storage_paths
from configs.errors import RagtuneError
from configs.schema import JOB_SCHEMAS, load_config
from configs.schema.serve import is_loopback

REPO = Path(__file__).resolve().parents[1]
KUBERAY_KINDS = ("RayJob", "RayService", "RayCluster")
JOBS_ANNOTATION = "ragtune/jobs"
WORKDIR = "/home/ray/ragtune"  # WORKDIR of cluster/Dockerfile: the configs are baked in there
SHARED_VOLUMES = ("persistentVolumeClaim", "nfs", "csi", "ephemeral")  # what every pod can mount read-write
LIGHT_REPLICAS = 2  # the serving app's Retriever and Ingress, one replica each (serving.app.build_app)

# Image tags that say their Ray and Python: rayproject/ray:2.60.0-py311-gpu, .../ragtune:0.1.0-ray2.60.0-py311-cpu
_RAY_IMAGE = re.compile(r"^(?:docker\.io/)?rayproject/ray(?:-ml)?:(?P<ray>\d+\.\d+\.\d+)-py(?P<py>\d+)"
                        r"(?:-(?P<flavor>cpu|gpu|cu\d+))?$")
_RAGTUNE_IMAGE = re.compile(r"^(?:[^:/]+(?::\d+)?/)*ragtune:(?P<version>[^-]+)-ray(?P<ray>\d+\.\d+\.\d+)"
                            r"-py(?P<py>\d+)-(?P<flavor>cpu|gpu|cu\d+)$")
_QUANTITY = re.compile(r"^([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_SUFFIX = {None: 1.0, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
           "Ki": 2.0**10, "Mi": 2.0**20, "Gi": 2.0**30, "Ti": 2.0**40, "Pi": 2.0**50, "Ei": 2.0**60}


@dataclass(frozen=True)
class NodeShape:
    """One node as Ray will see it."""

    group: str  # worker group or node type ("head" for the head)
    cpus: float  # Ray CPUs
    gpus: float = 0.0  # Ray GPUs
    memory: int | None = None  # bytes, when the manifest says

    def resources(self) -> NodeResources:
        return NodeResources(cpus=self.cpus, gpus=self.gpus)


@dataclass(frozen=True)
class Image:
    """What an image tag says about its contents."""

    name: str
    ray: str  # e.g. 2.60.0
    python: str  # e.g. 311
    flavor: str | None  # cpu, gpu, cuXXX; None = Ray's default (cpu)


@dataclass(frozen=True)
class JobRun:
    """One ragtune job a manifest runs."""

    job: str  # embed | index | finetune | serve
    config: str  # relative to the repository (the image's working directory)
    overrides: tuple[str, ...] = ()

    def line(self) -> str:
        return shlex.join([self.job, "-c", self.config, *self.overrides])


# --- reading ---------------------------------------------------------------------------------------------------------

def load_documents(path: str | Path) -> list[dict[str, Any]]:
    """Every YAML document of a file (``---`` separated), empty ones left out."""
    with open(path, encoding="utf-8") as f:
        docs = [d for d in yaml.safe_load_all(f) if d is not None]
    bad = [type(d).__name__ for d in docs if not isinstance(d, dict)]
    if bad:
        raise RagtuneError(f"{path}: every YAML document must be a mapping, got {bad}. Fix: the file's syntax")
    return docs


def quantity(value: str | int | float) -> float:
    """A Kubernetes quantity as a number: ``"500m"`` -> 0.5, ``"16Gi"`` -> 17179869184, ``4`` -> 4."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a Kubernetes quantity")
    if isinstance(value, int | float):
        return float(value)
    m = _QUANTITY.match(str(value).strip())
    if not m:
        raise ValueError(f"{value!r} is not a Kubernetes quantity (e.g. 4, 500m, 16Gi)")
    return float(m.group(1)) * _SUFFIX[m.group(2)]


def parse_image(name: str) -> Image | None:
    """The Ray and Python versions an image tag names, or None when the tag does not say."""
    for pattern in (_RAGTUNE_IMAGE, _RAY_IMAGE):
        if m := pattern.match(name):
            return Image(name, m.group("ray"), m.group("py"), m.group("flavor"))
    return None


def is_gpu_resource(name: str) -> bool:
    """KubeRay's rule for a GPU resource name (``utils.IsGPUResourceKey``): ``nvidia.com/gpu``, MIG slices."""
    return name.endswith("gpu") or re.search(r"nvidia\.com/mig-\d+g\.\d+gb$", name) is not None


def ray_container(template: dict[str, Any]) -> dict[str, Any]:
    """The Ray container of a pod template: the first one (KubeRay's ``RayContainerIndex``)."""
    containers = (template.get("spec") or {}).get("containers") or []
    return containers[0] if containers else {}


def group_shape(group: str, spec: dict[str, Any]) -> tuple[NodeShape, list[str]]:
    """One pod of a head or worker group, as ``ray start`` will see it (KubeRay ``generateRayStartCommand``)."""
    problems: list[str] = []
    params = {k: str(v) for k, v in (spec.get("rayStartParams") or {}).items()}
    for name, value in (spec.get("resources") or {}).items():  # the group's `resources` override (KubeRay >= 1.4)
        key = name.lower()
        params["num-cpus" if key == "cpu" else "memory" if key == "memory" else
               "num-gpus" if is_gpu_resource(key) else f"resource:{name}"] = str(math.ceil(quantity(value)))
    c = ray_container(spec.get("template") or {})
    res = c.get("resources") or {}
    limits, requests = res.get("limits") or {}, res.get("requests") or {}
    for name in {*limits, *requests}:
        if is_gpu_resource(name) and name in requests and (name not in limits or
                                                           quantity(requests[name]) != quantity(limits[name])):
            problems.append(f"group {group}: resources.requests[{name!r}] = {requests[name]!r} without an equal "
                            "limit; Kubernetes needs extended resources in limits. Fix: set limits to the same value")
    if "num-cpus" in params:
        cpus = float(params["num-cpus"])
    elif "cpu" in limits or "cpu" in requests:
        cpu = limits["cpu"] if "cpu" in limits else requests["cpu"]
        cpus = float(math.ceil(quantity(cpu)))  # Quantity.Value() rounds up
    else:
        cpus = 0.0
        problems.append(f"group {group}: the Ray container has no CPU limit or request, so Ray would count the CPUs "
                        "of the whole Kubernetes node. Fix: set resources.limits.cpu (or rayStartParams num-cpus)")
    gpu_limits = [quantity(v) for k, v in limits.items() if is_gpu_resource(k)]
    gpus = float(params["num-gpus"]) if "num-gpus" in params else float(math.ceil(sum(gpu_limits)))
    memory: int | None = None
    if "memory" in params:
        memory = int(float(params["memory"]))
    elif "memory" in limits:
        memory = int(quantity(limits["memory"]))
    else:
        problems.append(f"group {group}: the Ray container has no memory limit: Ray would size its object store "
                        "and memory from the whole Kubernetes node, and the pod can be OOM-killed. Fix: set "
                        "resources.limits.memory")
    return NodeShape(group, cpus, gpus, memory), problems


Scale = Literal["min", "replicas", "max"]


def kuberay_nodes(cluster: dict[str, Any], scale: Scale) -> tuple[list[NodeShape], list[str]]:
    """The nodes of a RayClusterSpec: the head, then each worker group's pods at ``scale``."""
    head, problems = group_shape("head", cluster.get("headGroupSpec") or {})
    nodes = [head]
    autoscaling = bool(cluster.get("enableInTreeAutoscaling"))
    for g in cluster.get("workerGroupSpecs") or []:
        name = g.get("groupName", "?")
        shape, more = group_shape(name, g)
        problems += more
        lo, hi = g.get("minReplicas"), g.get("maxReplicas")
        if not autoscaling and (lo is None or hi is None):
            problems.append(f"group {name}: minReplicas and maxReplicas are required without autoscaling (KubeRay "
                            "refuses the spec). Fix: set both")
        lo = 0 if lo is None else lo
        hi = 2**31 - 1 if hi is None else hi
        replicas = lo if g.get("replicas") is None else g["replicas"]
        if not lo <= replicas <= hi:
            problems.append(f"group {name}: replicas = {replicas} is outside minReplicas..maxReplicas = {lo}..{hi}. "
                            "Fix: keep minReplicas <= replicas <= maxReplicas")
        if scale == "max" and hi == 2**31 - 1:
            problems.append(f"group {name}: no maxReplicas, so the cluster's largest shape is unknown. Fix: set "
                            "maxReplicas")
            hi = replicas
        count = {"min": lo, "replicas": replicas, "max": hi}[scale] * int(g.get("numOfHosts") or 1)
        nodes += [shape] * count
    return nodes, problems


def launcher_nodes(config: dict[str, Any], scale: Literal["min", "max"]) -> tuple[list[NodeShape], list[str]]:
    """The nodes of a cluster-launcher YAML: the head, then each worker type at its min_workers or max_workers."""
    problems: list[str] = []
    types = config.get("available_node_types") or {}
    head_type = config.get("head_node_type")
    if head_type not in types:
        return [], [f"head_node_type = {head_type!r} is not one of available_node_types {sorted(types)}. Fix: name "
                    "the head's node type"]
    nodes: list[NodeShape] = []
    for name, t in types.items():
        res = t.get("resources") or {}
        if "CPU" not in res:
            problems.append(f"available_node_types.{name}.resources has no CPU: Ray would detect it from the "
                            "instance type, and this check cannot. Fix: write resources: {CPU: n, GPU: m}")
        shape = NodeShape(name, float(res.get("CPU", 0)), float(res.get("GPU", 0)),
                          int(res["memory"]) if "memory" in res else None)
        if name == head_type:
            nodes.insert(0, NodeShape("head", shape.cpus, shape.gpus, shape.memory))
            continue
        nodes += [shape] * int(t.get("min_workers" if scale == "min" else "max_workers", 0) or 0)
    per_type = sum(int(t.get("max_workers", 0) or 0) for n, t in types.items() if n != head_type)
    if int(config.get("max_workers", 0)) < per_type:
        problems.append(f"max_workers = {config.get('max_workers')} is below the node types' max_workers together "
                        f"({per_type}), so not every type can reach its maximum. Fix: set max_workers: {per_type}")
    return nodes, problems


def parse_job_line(line: str) -> JobRun:
    """``JOB -c FILE [section.field=value ...]`` (what ``ragtune submit --`` is given) as a JobRun."""
    words = shlex.split(line)
    if len(words) < 3 or words[0] not in JOB_SCHEMAS or words[1] not in ("-c", "--config"):
        raise RagtuneError(f"{line!r} is not `JOB -c CONFIG [overrides]` with JOB one of {', '.join(JOB_SCHEMAS)}. "
                           "Fix: write it as after `ragtune submit --`")
    bad = [w for w in words[3:] if "=" not in w]
    if bad:
        raise RagtuneError(f"{line!r}: {bad} are not section.field=value overrides. Fix: drop them")
    return JobRun(words[0], words[2], tuple(words[3:]))


def parse_entrypoint(entrypoint: str, workdir: str = WORKDIR) -> list[JobRun]:
    """The jobs of a RayJob entrypoint: ``python -m jobs.JOB --config FILE [overrides]``, or several, after a
    ``cd WORKDIR``, joined by ``&&`` inside ``bash -c '...'``.

    KubeRay's submitter pastes the entrypoint unquoted into a shell line (``ray job submit ... -- <entrypoint> ;``,
    ``common/job.go``), so a bare ``&&`` or ``;`` would end the submission there and run the rest in the submitter
    pod; inside ``bash -c '...'`` the whole line reaches the job (``ray job submit`` re-quotes it with shlex).
    """
    try:
        words = shlex.split(entrypoint)
    except ValueError as e:
        raise RagtuneError(f"entrypoint {entrypoint!r}: {e}. Fix: balance the quotes") from None
    if words[:2] == ["bash", "-c"] and len(words) == 3:
        inner = words[2]
    else:
        lexer = shlex.shlex(entrypoint, posix=True, punctuation_chars=True)
        operators = sorted({t for t in lexer if t and set(t) <= set(";&|<>()")})
        if operators:
            raise RagtuneError(f"entrypoint uses {operators} outside `bash -c '...'`: KubeRay's submitter runs "
                               "`ray job submit -- <entrypoint>` in a shell, so what follows would run in the "
                               f"submitter pod, not in the job. Fix: bash -c 'cd {workdir} && python -m jobs.<job> "
                               "...'")
        inner = entrypoint
    runs = []
    for n, part in enumerate(p.strip() for p in inner.split("&&")):
        words = shlex.split(part)
        if n == 0 and words[:1] == ["cd"]:
            if words[1:] != [workdir]:
                raise RagtuneError(f"entrypoint: `{part}` but the image's working directory is {workdir} "
                                   f"(cluster/Dockerfile). Fix: cd {workdir}")
            continue
        if words[:2] != ["python", "-m"] or len(words) < 3 or not words[2].startswith("jobs."):
            raise RagtuneError(f"entrypoint: `{part}` is not `python -m jobs.<job> --config FILE [overrides]`. Fix: "
                               "run the job modules, as ragtune submit does")
        runs.append(parse_job_line(shlex.join([words[2].removeprefix("jobs."), *words[3:]])))
    if not runs:
        raise RagtuneError("entrypoint runs no ragtune job. Fix: python -m jobs.<job> --config FILE")
    return runs


# --- placement -------------------------------------------------------------------------------------------------------

def pack(bundles: Iterable[tuple[float, float]], nodes: list[NodeShape]) -> list[int] | None:
    """Place (cpus, gpus) bundles whole on nodes, largest first, each on the first node with room (first-fit
    decreasing); the node index of each bundle, or None when one fits on no node. A bundle is one Ray Train
    worker, actor or Serve replica: Ray never splits one across nodes."""
    items = list(bundles)
    free = [[n.cpus, n.gpus] for n in nodes]
    where = [-1] * len(items)
    for i in sorted(range(len(items)), key=lambda i: (items[i][1], items[i][0]), reverse=True):
        c, g = items[i]
        for j, f in enumerate(free):
            if f[0] + 1e-9 >= c and f[1] + 1e-9 >= g:
                f[0], f[1], where[i] = f[0] - c, f[1] - g, j
                break
        else:
            return None
    return where


def _schedulable(nodes: list[NodeShape]) -> list[NodeResources]:
    """What ``cluster.runtime.alive_nodes`` returns for these nodes (a head with 0 CPUs is left out)."""
    return [n.resources() for n in nodes if n.cpus >= 1 or n.gpus >= 1]


def _fits(what: str, bundles: list[tuple[float, float]], nodes: list[NodeShape], leave_cpu: bool) -> list[str]:
    if pack(bundles, nodes) is None:
        kinds = sorted({b: bundles.count(b) for b in bundles}.items(), key=lambda kv: kv[0], reverse=True)
        asked = ", ".join(f"{n} x ({c:g} CPU, {g:g} GPU)" for (c, g), n in kinds)
        have = sorted({(n.group, n.cpus, n.gpus): sum(m == n for m in nodes) for n in nodes}.items())
        return [f"{what}: {asked} (in all {sum(b[0] for b in bundles):g} CPUs, {sum(b[1] for b in bundles):g} GPUs) "
                f"do not fit the nodes: " + ", ".join(f"{k} x {grp} ({c:g} CPU, {g:g} GPU)" for (grp, c, g), k in have)
                + ". Fix: larger or more worker pods, or fewer replicas"]
    if leave_cpu and sum(n.cpus for n in nodes) - sum(b[0] for b in bundles) < 1:
        return [f"{what}: placed, they leave no CPU for Ray Data's read tasks, and the job would hang without an "
                "error. Fix: more CPUs in the worker pods"]
    return []


def fit_problems(run: JobRun, cfg: Any, start: list[NodeShape], largest: list[NodeShape] | None = None) -> list[str]:
    """Whether a job's plan fits: planned on ``start`` (the nodes alive when it starts), placed there, and for a
    served app also at its autoscaling maximum on ``largest`` (default: ``start``)."""
    largest = largest or start
    alive = _schedulable(start)
    if not alive:
        return [f"{run.line()}: no node can run work when the job starts (the head reserves no CPUs and every "
                f"worker group is at 0). Fix: minReplicas >= 1 for a group the job can use"]
    try:
        if run.job == "finetune":
            s = cfg.scaling
            plan = plan_training(alive, s.num_workers, s.use_gpu, s.cpus_per_worker, cfg.train.precision)
            return _fits(f"{run.line()}: the Ray Train workers", [(s.cpus_per_worker, 1.0 if plan.use_gpu else 0.0)]
                         * plan.num_workers, start, leave_cpu=True)
        if run.job == "embed":
            e = cfg.embed
            actors = plan_embed_actors(alive, device=e.device, actors=e.actors, threads=e.threads_per_actor,
                                       fp16=e.fp16, batch_size=e.batch_size)
            return _fits(f"{run.line()}: the embedding actors", [(actors.num_cpus, actors.num_gpus)] * actors.actors,
                         start, leave_cpu=True)
        if run.job == "index":
            ix = cfg.index
            tasks = plan_index_tasks(alive, ix.shards or 1, ix.device)
            problems = _fits(f"{run.line()}: the shard tasks", [(tasks.num_cpus, tasks.num_gpus)] * tasks.concurrent,
                             start, leave_cpu=False)
            known = [n.memory for n in start if n.memory is not None and (n.cpus >= 1 or n.gpus >= 1)]
            if known and max(known) < ix.max_memory_bytes:
                problems.append(f"{run.line()}: index.max_memory = {ix.max_memory} but the largest worker has "
                                f"{max(known) / 2**30:g} GiB: a node holds up to index.max_memory of the index "
                                "(all of it, or its part of a multi-node plan). Fix: lower index.max_memory or raise "
                                "the pods' memory")
            return problems
        if run.job == "serve":
            return _serve_fits(run, cfg, start, largest)
    except RagtuneError as e:
        return [f"{run.line()}: {e}"]
    return [f"{run.line()}: no placement check for job {run.job!r}"]


def _serve_fits(run: JobRun, cfg: Any, start: list[NodeShape], largest: list[NodeShape]) -> list[str]:
    """The serving app: its plan on the nodes alive when it is built (mirrors ``serving.app.plan_for``), then
    every replica placed there, and at the searchers' autoscaling maximum on the largest cluster."""
    s, g, e = cfg.shards, cfg.generator, cfg.embedder
    n_groups = s.groups or MAX_DEFAULT_GROUPS  # the index (on storage) is not read here: the most groups it can make
    low = s.autoscaling.min_replicas if s.autoscaling else s.replicas
    high = s.autoscaling.max_replicas if s.autoscaling else s.replicas
    plan = plan_serving(_schedulable(start), num_shards=n_groups, groups=s.groups, searcher_replicas=max(1, low),
                        embedder_replicas=e.replicas, generator_replicas=g.replicas, light_replicas=LIGHT_REPLICAS,
                        generator_device=g.placement_device, searcher_device=s.device,
                        num_cpus={"embedder": e.num_cpus, "searcher": s.num_cpus, "generator": g.num_cpus},
                        threads={"embedder": e.threads, "searcher": s.threads, "generator": g.threads},
                        generator_gpus=g.gpus_per_replica,  # vllm: a replica's tensor-parallel GPUs, on one node
                        layout=s.layout,  # auto: split here (the index size is not read), the larger app
                        fused_in_ingress=s.fused_in_ingress if s.fused_in_ingress is not None else high < 2)
    fused = plan.layout == "fused"  # no Embedder, no Retriever: the Ingress replicas (or IndexReplica replicas
    #                                 behind one Ingress) hold the index, scaled like a shard group
    light = (0 if plan.fused_in_ingress else 1) if fused else LIGHT_REPLICAS

    def replicas(searchers: int) -> list[tuple[float, float]]:
        return ([(plan.embedder.num_cpus, plan.embedder.num_gpus)] * (0 if fused else e.replicas)
                + [(plan.generator.num_cpus, plan.generator.num_gpus)] * g.replicas
                + [(plan.searcher.num_cpus, plan.searcher.num_gpus)] * (len(plan.groups) * searchers)
                + [(plan.light.num_cpus, plan.light.num_gpus)] * light)

    problems = _fits(f"{run.line()}: the replicas when the app is built", replicas(max(1, low)), start, False)
    if high > low:
        problems += _fits(f"{run.line()}: the replicas at the searchers' autoscaling maximum ({high} per group)",
                          replicas(high), largest, False)
    return problems


# --- checks ----------------------------------------------------------------------------------------------------------

def load_job(run: JobRun, root: Path = REPO) -> tuple[Any, list[str]]:
    """The job's config, loaded with its schema and overrides; (None, problems) when it does not load."""
    if not (root / "jobs" / f"{run.job}.py").is_file():
        return None, [f"{run.line()}: no module jobs/{run.job}.py. Fix: one of {', '.join(JOB_SCHEMAS)}"]
    path = root / run.config
    if not path.is_file():
        return None, [f"{run.line()}: no config {run.config} in the repository (the image has the same files). Fix: "
                      "a path relative to the repository root"]
    try:
        return load_config(JOB_SCHEMAS[run.job], path, run.overrides), []
    except RagtuneError as e:
        return None, [f"{run.line()}: {e}"]


def storage_problems(run: JobRun, cfg: Any, shared: set[str], root: Path = REPO) -> list[str]:
    """Every storage path of the config must be visible to every node: a URI, a relative input that ships in the
    image, or a path under a volume that every pod mounts at ``shared``."""
    problems = []
    for sp in storage_paths(cfg):
        value = sp.value
        if "://" in value:
            continue
        if not value.startswith(("/", "~")):
            if sp.kind == "input" and (root / value).exists():
                continue  # baked into the image at its working directory
            where = "is not in the repository, so not in the image" if sp.kind == "input" else \
                "would be written inside one container and lost with it"
            problems.append(f"{run.line()}: {sp.field} = {value!r} is a relative path that {where}. Fix: a URI "
                            "(s3://bucket/path) or a path on a volume every pod mounts")
        elif not any(value == m or value.startswith(m.rstrip("/") + "/") for m in shared):
            problems.append(f"{run.line()}: {sp.field} = {value!r} is a local path that other nodes cannot see. "
                            "Fix: a URI (s3://bucket/path), or a ReadWriteMany volume mounted at the same path on "
                            "every pod")
    return problems


def groups(cluster: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(name, group spec) of the head group ("head") and every worker group."""
    return [("head", cluster.get("headGroupSpec") or {})] + [(g.get("groupName", "?"), g)
                                                             for g in cluster.get("workerGroupSpecs") or []]


def _templates(cluster: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(name, g.get("template") or {}) for name, g in groups(cluster)]


def shared_mounts(cluster: dict[str, Any]) -> set[str]:
    """Mount paths of shared volumes (PVC, NFS, CSI) that the Ray container of every pod has."""
    per_pod = []
    for _, t in _templates(cluster):
        volumes = {v.get("name"): v for v in (t.get("spec") or {}).get("volumes") or []}
        per_pod.append({m["mountPath"] for m in ray_container(t).get("volumeMounts") or []
                        if any(k in volumes.get(m.get("name"), {}) for k in SHARED_VOLUMES)})
    return set.intersection(*per_pod) if per_pod else set()


def _env_from_secret(container: dict[str, Any], name: str) -> bool:
    return any(e.get("name") == name and ((e.get("valueFrom") or {}).get("secretKeyRef") or {}).get("name")
               for e in container.get("env") or [])


def auth_problems(cluster: dict[str, Any]) -> list[str]:
    """Ray token auth on every container: ``authOptions.mode: token`` (KubeRay sets RAY_AUTH_MODE and
    RAY_AUTH_TOKEN from the Secret everywhere), or both variables set by hand, the token from a Secret."""
    auth = cluster.get("authOptions") or {}
    if auth.get("mode") == "token":
        version = str(cluster.get("rayVersion", ""))
        ok = re.match(r"^(\d+)\.(\d+)", version)
        if not ok or (int(ok.group(1)), int(ok.group(2))) < (2, 52):
            return [f"rayVersion = {version!r}: authOptions.mode token needs rayVersion 2.52.0 or later (KubeRay "
                    "refuses the spec). Fix: set rayVersion to the image's Ray version"]
        return []
    missing = [g for g, t in _templates(cluster)
               if not (_env_from_secret(ray_container(t), "RAY_AUTH_TOKEN") and any(
                   e.get("name") == "RAY_AUTH_MODE" and e.get("value") == "token"
                   for e in ray_container(t).get("env") or []))]
    if missing:
        return [f"groups {missing}: no Ray token auth, so anyone who reaches the dashboard can run code on the "
                "cluster. Fix: authOptions: {mode: token, secretName: <a Secret with auth_token>}"]
    return []


def image_problems(images: list[tuple[str, str, float]], ray_version: str | None) -> list[str]:
    """(group, image, gpus): each tag names its Ray and Python, all agree (and with ``rayVersion``), and nodes
    with GPUs get a GPU (CUDA) image."""
    problems, seen = [], []
    for group, name, gpus in images:
        img = parse_image(name)
        if img is None:
            problems.append(f"group {group}: image {name!r} does not say its Ray and Python version. Fix: "
                            "rayproject/ray:<ray>-py<xy>-<cpu|gpu> or <registry>/ragtune:<v>-ray<ray>-py<xy>-<cpu|gpu> "
                            "(cluster/Dockerfile)")
            continue
        seen.append(img)
        if gpus > 0 and not (img.flavor or "cpu").startswith(("gpu", "cu")):
            problems.append(f"group {group}: {gpus:g} GPU(s) per node but image {name!r} is a CPU image (no CUDA, "
                            "faiss-cpu). Fix: the -gpu image")
    if len({(i.ray, i.python) for i in seen}) > 1:
        problems.append(f"images disagree on Ray or Python: {sorted({i.name for i in seen})}: every node must run the "
                        "same Ray and Python. Fix: tags of one Ray and Python version")
    if ray_version is not None and any(i.ray != ray_version for i in seen):
        problems.append(f"rayVersion = {ray_version!r} but the images have Ray {sorted({i.ray for i in seen})}. Fix: "
                        "make them equal")
    return problems


def kuberay_jobs(doc: dict[str, Any]) -> list[JobRun]:
    """The ragtune jobs of a KubeRay document: a RayJob's entrypoint, else its ``ragtune/jobs`` annotation."""
    spec = doc.get("spec") or {}
    if doc["kind"] == "RayJob":
        return parse_entrypoint(str(spec.get("entrypoint") or ""))
    lines = ((doc.get("metadata") or {}).get("annotations") or {}).get(JOBS_ANNOTATION, "")
    return [parse_job_line(line) for line in str(lines).splitlines() if line.strip()]


def check_kuberay(doc: dict[str, Any], root: Path = REPO) -> list[str]:
    """Problems of a RayJob, RayService or RayCluster document.

    The jobs are planned on the cluster as it is when they start: a RayJob (or any cluster without autoscaling)
    at its groups' ``replicas``; a RayService at ``minReplicas``, when its app is built, and at ``maxReplicas``
    for the searchers' autoscaling; an autoscaled RayCluster at ``maxReplicas`` (its jobs plan on the nodes alive
    when they start, so the GPU group must be up first: docs/cluster.md, "Autoscaling").
    """
    kind, spec = doc["kind"], doc.get("spec") or {}
    cluster = spec.get({"RayJob": "rayClusterSpec", "RayService": "rayClusterConfig"}.get(kind, "")) \
        if kind != "RayCluster" else spec
    if not isinstance(cluster, dict):
        return [f"spec.{'rayClusterSpec' if kind == 'RayJob' else 'rayClusterConfig'} is missing: ragtune's "
                "manifests describe the cluster they need. Fix: add it"]
    problems = auth_problems(cluster)
    if kind == "RayJob" and spec.get("ttlSecondsAfterFinished") and not spec.get("shutdownAfterJobFinishes"):
        problems.append("ttlSecondsAfterFinished without shutdownAfterJobFinishes: true (KubeRay refuses it). Fix: "
                        "set shutdownAfterJobFinishes: true")
    fixed = kind == "RayJob" or not cluster.get("enableInTreeAutoscaling")
    start, more = kuberay_nodes(cluster, "replicas" if fixed else ("min" if kind == "RayService" else "max"))
    largest, _ = kuberay_nodes(cluster, "replicas" if fixed else "max")
    problems += more
    images = [(name, ray_container(g.get("template") or {}).get("image", ""), group_shape(name, g)[0].gpus)
              for name, g in groups(cluster)]
    submitter = ray_container(spec.get("submitterPodTemplate") or {}).get("image")
    problems += image_problems(images + ([("submitter", submitter, 0.0)] if submitter else []),
                               str(cluster["rayVersion"]) if "rayVersion" in cluster else None)
    try:
        runs = kuberay_jobs(doc)
    except RagtuneError as e:
        return problems + [str(e)]
    if kind != "RayJob" and not runs:
        problems.append(f"no `{JOBS_ANNOTATION}` annotation: nothing says which ragtune jobs this cluster is for, "
                        "so nothing can be checked. Fix: one `JOB -c CONFIG [overrides]` a line")
    shared = shared_mounts(cluster)
    loaded = []
    for run in runs:
        cfg, more = load_job(run, root)
        problems += more
        if cfg is None:
            continue
        loaded.append((run, cfg))
        problems += storage_problems(run, cfg, shared, root)
        problems += fit_problems(run, cfg, start, largest)
        if run.job == "serve":
            problems += _serve_problems(run, cfg, doc, cluster)
    return problems + pipeline_problems(loaded)


def pipeline_problems(loaded: list[tuple[JobRun, Any]]) -> list[str]:
    """Jobs that follow one another connect: an index job reads what the embed job before it wrote."""
    problems, embedded = [], None
    for run, cfg in loaded:
        if run.job == "embed":
            embedded = cfg.output.path
        elif run.job == "index" and embedded is not None and cfg.embeddings.path.rstrip("/") != embedded.rstrip("/"):
            problems.append(f"{run.line()}: embeddings.path = {cfg.embeddings.path!r} but the embed job before it "
                            f"writes {embedded!r}. Fix: override embeddings.path={embedded}")
    return problems


def _serve_problems(run: JobRun, cfg: Any, doc: dict[str, Any], cluster: dict[str, Any]) -> list[str]:
    """A served config: its port on the head, its API keys from a Secret in every container, and for a
    RayService a serveConfigV2 for the same port and app."""
    problems = []
    head = ray_container((cluster.get("headGroupSpec") or {}).get("template") or {})
    if cfg.http.port not in {p.get("containerPort") for p in head.get("ports") or []}:
        problems.append(f"{run.line()}: http.port {cfg.http.port} is not a containerPort of the head. Fix: add "
                        f"{{containerPort: {cfg.http.port}, name: serve}}")
    if cfg.auth.api_keys_env and not is_loopback(cfg.http.host or "127.0.0.1"):
        missing = [g for g, t in _templates(cluster) if not _env_from_secret(ray_container(t), cfg.auth.api_keys_env)]
        if missing:
            problems.append(f"{run.line()}: groups {missing} lack {cfg.auth.api_keys_env} from a Secret; the app is "
                            "built on any node and would refuse to listen beyond loopback without keys. Fix: env "
                            f"{cfg.auth.api_keys_env} valueFrom.secretKeyRef in every Ray container")
    if doc["kind"] == "RayService":
        try:
            serve = yaml.safe_load(doc["spec"].get("serveConfigV2") or "") or {}
        except yaml.YAMLError as e:
            return problems + [f"serveConfigV2 is not YAML ({e}). Fix: regenerate it with ragtune serve "
                               "--print-serve-config"]
        if not isinstance(serve, dict):
            return problems + [f"serveConfigV2 is not a Serve config. Fix: ragtune serve -c {run.config} "
                               "--print-serve-config"]
        apps = [a.get("name") for a in serve.get("applications") or [] if isinstance(a, dict)]
        if (serve.get("http_options") or {}).get("port") != cfg.http.port or cfg.http.app_name not in apps:
            problems.append(f"serveConfigV2 is not for {run.config} (port {cfg.http.port}, app "
                            f"{cfg.http.app_name!r}). Fix: ragtune serve -c {run.config} --print-serve-config")
    return problems


def check_launcher(config: dict[str, Any], root: Path = REPO) -> list[str]:
    """Problems of a cluster-launcher YAML (``ray up``), beyond Ray's own schema."""
    start, problems = launcher_nodes(config, "max")
    types = config.get("available_node_types") or {}
    docker = config.get("docker") or {}
    images = []
    for name, t in types.items():
        head = name == config.get("head_node_type")
        own = (t.get("docker") or {}).get("worker_image")
        image = (docker.get("head_image") if head else own or docker.get("worker_image")) or docker.get("image")
        if not image:
            problems.append(f"available_node_types.{name}: no Docker image, so the node runs whatever the machine "
                            "image has. Fix: docker.image (cluster/Dockerfile)")
            continue
        images.append(("head" if head else name, image, float((t.get("resources") or {}).get("GPU", 0))))
    problems += image_problems(images, None)
    starts = [*(config.get("head_start_ray_commands") or []), *(config.get("worker_start_ray_commands") or [])]
    if not any("ray start" in c for c in starts) or any("ray start" in c and "RAY_AUTH_MODE=token" not in c
                                                         for c in starts):
        problems.append("a `ray start` without RAY_AUTH_MODE=token: Ray's token auth must be on for every node. Fix: "
                        "RAY_AUTH_MODE=token ray start ... in head_start_ray_commands and worker_start_ray_commands")
    if not any(str(k).endswith(".ray/auth_token") for k in (config.get("file_mounts") or {})):
        problems.append("file_mounts does not copy the auth token: the nodes would not share one. Fix: "
                        '"~/.ray/auth_token": "~/.ray/auth_token" (after `ray get-auth-token --generate`)')
    try:
        runs = [parse_job_line(line) for line in (config.get("metadata") or {}).get("ragtune_jobs") or []]
    except RagtuneError as e:
        return problems + [str(e)]
    if not runs:
        problems.append("no metadata.ragtune_jobs: nothing says which ragtune jobs this cluster is for. Fix: a list "
                        "of `JOB -c CONFIG [overrides]`")
    loaded = []
    for run in runs:
        cfg, more = load_job(run, root)
        problems += more
        if cfg is not None:
            loaded.append((run, cfg))
            problems += storage_problems(run, cfg, set(), root) + fit_problems(run, cfg, start)
    return problems + pipeline_problems(loaded)


def check(path: str | Path, root: Path = REPO) -> list[str]:
    """Every problem of a manifest file, each prefixed with the document it is in."""
    problems = []
    for doc in load_documents(path):
        if doc.get("apiVersion") == "ray.io/v1" and doc.get("kind") in KUBERAY_KINDS:
            name = f"{doc['kind']}/{(doc.get('metadata') or {}).get('name', '?')}"
            problems += [f"{name}: {p}" for p in check_kuberay(doc, root)]
        elif "available_node_types" in doc and "provider" in doc:
            problems += [f"{doc.get('cluster_name', 'cluster')}: {p}" for p in check_launcher(doc, root)]
    return problems

