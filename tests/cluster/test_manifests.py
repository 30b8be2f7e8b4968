"""The cluster manifests under cluster/ (KubeRay RayJob / RayService / RayCluster, the cluster launcher's YAML) and
the image they run (cluster/Dockerfile), checked without Kubernetes, Docker or a cloud: KubeRay's v1 CRD schemas
(tests/cluster/crds/), Ray's own launcher validator, the pins in pyproject.toml, the configs they run (loaded with
their schemas and planned on the manifests' nodes by cluster.placement, through cluster.manifests.check), and the
serveConfigV2 that `ragtune serve --print-serve-config` prints.

Every positive check on the real files has a negative twin that breaks one thing and expects the problem named.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
from functools import cache
from pathlib import Path

import jsonschema
import pytest
import yaml

from cluster import manifests as cm
from cluster.placement import NodeResources

tomllib = pytest.importorskip("tomllib")

REPO = Path(__file__).resolve().parents[2]
KUBERAY = sorted((REPO / "cluster" / "kuberay").glob("*.yaml"))
LAUNCHER = REPO / "cluster" / "launcher" / "ray-cluster.yaml"
DOCKERFILE = REPO / "cluster" / "Dockerfile"
RAYSERVICE = REPO / "cluster" / "kuberay" / "rayservice.yaml"
UPDATE = os.environ.get("RAGTUNE_UPDATE_MANIFESTS") == "1"


@cache
def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def pin(package: str) -> str:
    """The version pyproject.toml pins ``package`` to (``ray[data,train,serve]==2.60.0`` -> ``2.60.0``)."""
    for req in pyproject()["project"]["dependencies"]:
        m = re.match(rf"^{re.escape(package)}(\[[^\]]*\])?==([^;\s]+)$", req)
        if m:
            return m.group(2)
    raise AssertionError(f"{package} is not pinned in pyproject.toml")


def dockerfile_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S*)$", DOCKERFILE.read_text(), re.M))


@cache
def crd_validators() -> dict[str, jsonschema.Draft202012Validator]:
    """KubeRay v1's structural schemas with unknown fields refused (kubectl's strict field validation)."""
    data = json.loads((REPO / "tests" / "cluster" / "crds" / "kuberay-crds.json").read_text())

    def strict(node):
        if isinstance(node, dict):
            node = {k: strict(v) for k, v in node.items()}
            if "properties" in node and "additionalProperties" not in node and \
                    not node.get("x-kubernetes-preserve-unknown-fields"):
                node["additionalProperties"] = False
            return node
        return [strict(v) for v in node] if isinstance(node, list) else node

    defs = strict(data["$defs"])
    return {kind: jsonschema.Draft202012Validator({**strict(data[kind]), "$defs": defs}) for kind in cm.KUBERAY_KINDS}


def crd_errors(doc: dict) -> list[str]:
    errors = crd_validators()[doc["kind"]].iter_errors(doc)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]


def ray_docs(path: Path) -> list[dict]:
    return [d for d in cm.load_documents(path) if d.get("apiVersion") == "ray.io/v1"]


def cluster_spec(doc: dict) -> dict:
    return {"RayJob": lambda s: s["rayClusterSpec"], "RayService": lambda s: s["rayClusterConfig"],
            "RayCluster": lambda s: s}[doc["kind"]](doc["spec"])


def problems_of(docs: list[dict], tmp_path: Path, name: str = "m.yaml") -> list[str]:
    """cluster.manifests.check on documents written to a file (the way a user's edited manifest would be)."""
    path = tmp_path / name
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return cm.check(path)


# --- the files as they are -------------------------------------------------------------------------------------------

def test_the_manifests_are_all_there():
    names = {p.name for p in KUBERAY}
    assert {"rayjob-finetune.yaml", "rayjob-embed-index.yaml", "rayservice.yaml", "raycluster.yaml"} <= names
    kinds = sorted(d["kind"] for p in KUBERAY for d in ray_docs(p))
    assert kinds == ["RayCluster", "RayJob", "RayJob", "RayService"]
    assert LAUNCHER.is_file() and DOCKERFILE.is_file()


@pytest.mark.parametrize("path", [*KUBERAY, LAUNCHER], ids=lambda p: p.name)
def test_every_manifest_fits_the_jobs_it_runs(path):
    assert cm.check(path) == []
    head = path.read_text().splitlines()[0]  # headed by the command that applies it
    assert head.startswith(("# kubectl apply -f cluster/kuberay/", "# ray up cluster/launcher/")) and path.name in head


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_documents_follow_the_v1_crds(path):
    for doc in ray_docs(path):
        assert crd_errors(doc) == [], doc["kind"]
        broken = copy.deepcopy(doc)
        cluster_spec(broken)["workerGroupSpec"] = cluster_spec(broken).pop("workerGroupSpecs")  # a typo
        assert any("'workerGroupSpec' was unexpected" in e for e in crd_errors(broken))
        broken = copy.deepcopy(doc)
        cluster_spec(broken)["workerGroupSpecs"][0]["minReplicas"] = "one"
        assert any("minReplicas" in e and "'one' is not of type 'integer'" in e for e in crd_errors(broken))


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_rayjobs_and_clusters_say_what_kuberay_needs(path):
    for doc in ray_docs(path):
        spec, cluster = doc["spec"], cluster_spec(doc)
        assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])  # a DNS-1035 label
        assert cluster["rayVersion"] == pin("ray")
        assert cluster["authOptions"] == {"mode": "token", "secretName": "ragtune-ray-auth"}
        assert cluster["headGroupSpec"]["rayStartParams"] == {"num-cpus": "0"}  # work never lands on the head
        if doc["kind"] == "RayJob":
            assert spec["submissionMode"] == "K8sJobMode" and spec["shutdownAfterJobFinishes"] is True
            assert yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]["TOKENIZERS_PARALLELISM"] == "false"
        gpu_groups = [g for g in cluster["workerGroupSpecs"] if cm.group_shape(g["groupName"], g)[0].gpus > 0]
        assert gpu_groups, "every manifest here has a GPU worker group"
        for g in gpu_groups:  # GPU nodes are usually tainted: the pods must tolerate it
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in \
                g["template"]["spec"]["tolerations"]


def test_images_are_the_pinned_ray_and_python():
    """Every image of every manifest: Ray = the pin in pyproject.toml, Python = the Dockerfile's, which is the
    Python the project is checked with (tool.mypy) and allowed by requires-python; ragtune's version in its tag."""
    args = dockerfile_args()
    python = args["PYTHON"]
    assert args["RAY_VERSION"] == pin("ray") and python == "py" + pyproject()["tool"]["mypy"]["python_version"].replace(
        ".", "")
    lowest = pyproject()["project"]["requires-python"].removeprefix(">=")
    assert tuple(map(int, lowest.split("."))) <= (int(python[2]), int(python[3:]))
    names = []
    for path in KUBERAY:
        for doc in ray_docs(path):
            names += [cm.ray_container(g.get("template") or {})["image"] for _, g in cm.groups(cluster_spec(doc))]
    launcher = yaml.safe_load(LAUNCHER.read_text())
    names += [launcher["docker"]["image"], launcher["docker"]["head_image"]]
    names += [t["docker"]["worker_image"] for t in launcher["available_node_types"].values() if "docker" in t]
    images = [cm.parse_image(n) for n in names]
    assert None not in images, names
    assert {(i.ray, "py" + i.python) for i in images} == {(pin("ray"), python)}
    assert {re.search(r"ragtune:([^-]+)-", i.name).group(1) for i in images} == {pyproject()["project"]["version"]}
    assert {i.flavor for i in images} == {"cpu", "gpu"}


def test_parse_image_reads_the_tag_schemes():
    assert cm.parse_image("rayproject/ray:2.60.0-py311-gpu") == cm.Image("rayproject/ray:2.60.0-py311-gpu", "2.60.0",
                                                                          "311", "gpu")
    assert cm.parse_image("rayproject/ray:2.60.0-py312-cu128").flavor == "cu128"
    assert cm.parse_image("rayproject/ray:2.60.0-py311").flavor is None
    img = cm.parse_image("ghcr.io:443/acme/ml/ragtune:0.1.0-ray2.60.0-py311-cpu")
    assert (img.ray, img.python, img.flavor) == ("2.60.0", "311", "cpu")
    for bad in ("rayproject/ray:latest", "rayproject/ray:2.60.0", "acme/ragtune:latest", "python:3.11"):
        assert cm.parse_image(bad) is None


def test_the_dockerfile_installs_the_project_as_pinned():
    text = DOCKERFILE.read_text()
    assert "FROM rayproject/ray:${RAY_VERSION}-${PYTHON}-${FLAVOR}" in text
    assert dockerfile_args()["FLAVOR"] == "gpu"
    assert set(pyproject()["project"]["optional-dependencies"]) >= {"cpu", "gpu"}
    assert f'"torch=={pin("torch")}"' in text and 'pip install --no-cache-dir ".[${FLAVOR}]"' in text
    assert re.search(rf"^WORKDIR {re.escape(cm.WORKDIR)}$", text, re.M)
    packages = {p.rstrip("*") for p in pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]}
    copied = set(re.findall(r"^COPY --chown=ray:users (\w+) \1$", text, re.M))
    assert copied == packages, "every package of pyproject.toml goes into the image"
    assert "g++" in text  # Ray's CPU images remove it; DeepSpeed compiles its CPU comm op with it
    ignored = (REPO / "cluster" / "Dockerfile.dockerignore").read_text().split()
    assert {".venv/", "runs/", ".git/"} <= set(ignored)


def test_the_launcher_passes_rays_own_validator_and_has_a_cpu_head_and_gpu_workers():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(LAUNCHER.read_text())
    validate_config(prepare_config(copy.deepcopy(config)))  # Ray's schema (ray-schema.json) and its own rules
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"]["CPU"] == 0  # a CPU head running no work
    assert cm.parse_image(config["docker"]["head_image"]).flavor == "cpu"
    gpu = [n for n, t in types.items() if t["resources"].get("GPU", 0) > 0]
    cpu = [n for n, t in types.items() if t["resources"].get("GPU", 0) == 0 and n != config["head_node_type"]]
    assert gpu and cpu and all(types[n]["max_workers"] >= 1 for n in gpu)
    assert sum(types[n].get("min_workers", 0) * types[n]["resources"]["CPU"] for n in cpu) >= 1  # small jobs start
    broken = copy.deepcopy(config)
    broken["available_node_types"][gpu[0]]["max_worker"] = 2
    with pytest.raises(jsonschema.ValidationError, match="'max_worker' was unexpected"):
        validate_config(prepare_config(broken))


# --- serveConfigV2 = ragtune serve --print-serve-config ---------------------------------------------------------------

def printed_serve_config(config: str, capsys, monkeypatch) -> str:
    from jobs.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # serve_config writes it into the app's runtime_env
    capsys.readouterr()
    assert main(["serve", "-c", config, "--print-serve-config"]) == 0
    return capsys.readouterr().out


def embed_block(text: str, key: str, block: str, indent: int) -> str:
    """``text`` with the literal block under ``key: |`` replaced by ``block`` (indented; empty lines kept empty)."""
    lines = text.splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines) if line.strip() == f"{key}: |")
    end = at + 1
    while end < len(lines) and (not lines[end].strip() or lines[end].startswith(" " * indent)):
        end += 1
    body = "".join((" " * indent + line if line.strip() else line) for line in block.splitlines(keepends=True))
    return "".join(lines[:at + 1]) + body + "".join(lines[end:])


def test_serve_config_v2_is_what_ragtune_serve_prints(capsys, monkeypatch):
    (doc,) = ray_docs(RAYSERVICE)
    (run,) = cm.kuberay_jobs(doc)
    printed = printed_serve_config(run.config, capsys, monkeypatch)
    if UPDATE and doc["spec"]["serveConfigV2"] != printed:
        RAYSERVICE.write_text(embed_block(RAYSERVICE.read_text(), "serveConfigV2", printed, 4))
        (doc,) = ray_docs(RAYSERVICE)
    assert doc["spec"]["serveConfigV2"] == printed, (
        "serveConfigV2 in cluster/kuberay/rayservice.yaml differs from `ragtune serve -c "
        f"{run.config} --print-serve-config`. Fix: RAGTUNE_UPDATE_MANIFESTS=1 python -m pytest "
        "tests/cluster/test_manifests.py -k serve_config")
    serve = yaml.safe_load(printed)
    assert serve["applications"][0]["import_path"] == "serving.app:build_app"
    assert serve["applications"][0]["args"]["config"]["auth"]["api_keys"] == []  # keys come from the Secret only


def test_embed_block_replaces_only_the_block():
    text = "a:\n  b: |\n    old\n\n    older\n  c: 1\n"
    assert embed_block(text, "b", "x: 1\n\ny: 2\n", 4) == "a:\n  b: |\n    x: 1\n\n    y: 2\n  c: 1\n"
    assert yaml.safe_load(embed_block(text, "b", "x: 1\n\ny: 2\n", 4))["a"] == {"b": "x: 1\n\ny: 2\n", "c": 1}


def test_the_serving_app_plans_the_rayservice_as_cluster_manifests_does(monkeypatch):
    """serving.app.plan_for (what the app's builder runs) on the RayService's nodes at deploy time, with an 8-shard
    index standing in for the one on storage: it fits, and agrees with cluster.manifests' own plan."""
    import serving.app
    from configs.schema import ServeJobConfig, load_config
    from serving.app import plan_for

    (doc,) = ray_docs(RAYSERVICE)
    nodes, _ = cm.kuberay_nodes(cluster_spec(doc), "min")
    cfg = load_config(ServeJobConfig, REPO / "configs" / "serve" / "gpu-cluster.yaml")
    fake = type("M", (), {"shards": [object()] * 8})()
    monkeypatch.setattr(serving.app, "resolve_index", lambda path: path)
    monkeypatch.setattr(serving.app, "read_index_manifest", lambda version: fake)
    plan = plan_for(cfg, [NodeResources(n.cpus, n.gpus) for n in nodes if n.cpus >= 1 or n.gpus >= 1])
    assert plan.generator.num_gpus == 1 and plan.generator.device == "gpu"
    assert plan.searcher.device == "gpu" and plan.searcher.num_gpus == 0.5 and len(plan.groups) == 4
    run = cm.JobRun("serve", "configs/serve/gpu-cluster.yaml")
    largest, _ = cm.kuberay_nodes(cluster_spec(doc), "max")
    assert cm.fit_problems(run, cfg, nodes, largest) == []


# --- each check can fail --------------------------------------------------------------------------------------------

def test_more_workers_than_gpus_or_a_local_checkpoint_folder_are_problems(tmp_path):
    docs = cm.load_documents(REPO / "cluster" / "kuberay" / "rayjob-finetune.yaml")
    job = docs[0]["spec"]
    job["entrypoint"] = job["entrypoint"].removesuffix("'") + " scaling.num_workers=8 train.global_batch=null'"
    assert any("scaling.num_workers = 8 GPU workers but the cluster has 4 GPUs" in p
               for p in problems_of(docs, tmp_path))
    docs = cm.load_documents(REPO / "cluster" / "kuberay" / "rayjob-finetune.yaml")
    docs[0]["spec"]["entrypoint"] = docs[0]["spec"]["entrypoint"].removesuffix("'") + " run.storage_path=/mnt/ckpt'"
    assert any("run.storage_path = '/mnt/ckpt' is a local path that other nodes cannot see" in p
               for p in problems_of(docs, tmp_path))
    for _, group in cm.groups(docs[0]["spec"]["rayClusterSpec"]):  # a ReadWriteMany volume on every pod: fine
        pod = group["template"]["spec"]
        pod["volumes"] = [{"name": "shared", "persistentVolumeClaim": {"claimName": "ragtune"}}]
        pod["containers"][0]["volumeMounts"] = [{"name": "shared", "mountPath": "/mnt"}]
    assert problems_of(docs, tmp_path) == []
    pod["containers"][0]["volumeMounts"] = []  # ... but not when one pod lacks it
    assert any("/mnt/ckpt" in p for p in problems_of(docs, tmp_path))


def test_auth_images_and_limits_are_checked(tmp_path):
    path = REPO / "cluster" / "kuberay" / "rayjob-embed-index.yaml"
    docs = cm.load_documents(path)
    del docs[0]["spec"]["rayClusterSpec"]["authOptions"]
    assert any("no Ray token auth" in p for p in problems_of(docs, tmp_path))
    docs = cm.load_documents(path)
    gpu = docs[0]["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    gpu["image"] = gpu["image"].replace("-gpu", "-cpu")
    assert any("is a CPU image" in p for p in problems_of(docs, tmp_path))
    gpu["image"] = "registry.example.com/ragtune:latest"
    assert any("does not say its Ray and Python version" in p for p in problems_of(docs, tmp_path))
    gpu["image"] = "rayproject/ray:2.59.0-py311-gpu"
    found = problems_of(docs, tmp_path)
    assert any("rayVersion = '2.60.0' but the images have Ray ['2.59.0', '2.60.0']" in p for p in found)
    assert any("images disagree on Ray or Python" in p for p in found)
    docs = cm.load_documents(path)
    gpu = docs[0]["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    del gpu["resources"]["limits"]
    found = problems_of(docs, tmp_path)
    assert any("without an equal limit" in p for p in found) and any("no memory limit" in p for p in found)


def test_the_index_job_must_read_what_the_embed_job_wrote(tmp_path):
    docs = cm.load_documents(REPO / "cluster" / "kuberay" / "rayjob-embed-index.yaml")
    spec = docs[0]["spec"]
    assert not problems_of(docs, tmp_path)
    spec["entrypoint"] = spec["entrypoint"].replace("large-ivf.yaml", "large-ivf.yaml embeddings.path=s3://b/other")
    assert any("embeddings.path = 's3://b/other' but the embed job before it writes" in p
               for p in problems_of(docs, tmp_path))
    spec["entrypoint"] = spec["entrypoint"].replace("configs/embed/cluster-s3.yaml", "configs/embed/missing.yaml")
    assert any("no config configs/embed/missing.yaml" in p for p in problems_of(docs, tmp_path))
    spec["entrypoint"] = "python train.py"
    assert any("is not `python -m jobs.<job> --config FILE" in p for p in problems_of(docs, tmp_path))


def test_the_rayservice_must_hold_the_app_when_built_and_at_its_maximum(tmp_path):
    docs = cm.load_documents(RAYSERVICE)
    gpu = docs[0]["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    gpu["minReplicas"] = gpu["replicas"] = 0  # nothing alive but the head when the app is built
    assert any("no node can run work when the job starts" in p for p in problems_of(docs, tmp_path))
    gpu["minReplicas"] = gpu["replicas"] = 1
    for limits in gpu["template"]["spec"]["containers"][0]["resources"].values():
        del limits["nvidia.com/gpu"]  # worker pods without GPUs
    assert any("generator.replicas = 2 GPU replicas but the cluster has 0 GPU" in p
               for p in problems_of(docs, tmp_path))
    docs = cm.load_documents(RAYSERVICE)
    gpu = docs[0]["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    gpu["minReplicas"] = gpu["replicas"] = gpu["maxReplicas"] = 1  # no room for the searchers to autoscale
    assert any("at the searchers' autoscaling maximum (4 per group)" in p and "10 GPUs" in p
               for p in problems_of(docs, tmp_path))
    docs = cm.load_documents(RAYSERVICE)
    del docs[0]["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["env"]
    assert any("groups ['gpu'] lack RAGTUNE_API_KEYS from a Secret" in p for p in problems_of(docs, tmp_path))
    docs = cm.load_documents(RAYSERVICE)
    docs[0]["spec"]["serveConfigV2"] = yaml.safe_dump({"http_options": {"port": 9000}, "applications": []})
    assert any("serveConfigV2 is not for configs/serve/gpu-cluster.yaml" in p for p in problems_of(docs, tmp_path))


def test_an_interactive_cluster_is_checked_at_its_maximum(tmp_path):
    docs = cm.load_documents(REPO / "cluster" / "kuberay" / "raycluster.yaml")
    annotations = docs[0]["metadata"]["annotations"]
    assert [r.job for r in cm.kuberay_jobs(docs[0])] == ["finetune", "finetune", "embed", "index"]
    docs[0]["spec"]["workerGroupSpecs"][1]["maxReplicas"] = 0  # the GPU group can never start
    annotations[cm.JOBS_ANNOTATION] += "finetune -c configs/finetune/llama-lora.yaml scaling.use_gpu=true\n"
    assert any("scaling.num_workers = 4 GPU workers but the cluster has 0 GPUs" in p
               for p in problems_of(docs, tmp_path))
    annotations[cm.JOBS_ANNOTATION] += "finetune -c configs/finetune/tiny.yaml\n"  # local run.storage_path
    assert any("run.storage_path = 'runs/finetune' is a relative path that would be written inside one container" in p
               for p in problems_of(docs, tmp_path))
    annotations[cm.JOBS_ANNOTATION] = "train -c x.yaml"
    assert any("is not `JOB -c CONFIG [overrides]`" in p for p in problems_of(docs, tmp_path))
    del annotations[cm.JOBS_ANNOTATION]
    assert any("no `ragtune/jobs` annotation" in p for p in problems_of(docs, tmp_path))


def test_the_launcher_needs_token_auth_and_explicit_resources(tmp_path):
    config = yaml.safe_load(LAUNCHER.read_text())
    broken = copy.deepcopy(config)
    starts = broken["worker_start_ray_commands"]
    starts[-1] = starts[-1].replace("RAY_AUTH_MODE=token ", "")
    assert any("a `ray start` without RAY_AUTH_MODE=token" in p for p in problems_of([broken], tmp_path))
    broken = copy.deepcopy(config)
    broken["file_mounts"] = {}
    assert any("does not copy the auth token" in p for p in problems_of([broken], tmp_path))
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu-worker"]["resources"] = {}
    found = problems_of([broken], tmp_path)
    assert any("gpu-worker.resources has no CPU" in p for p in found)
    broken = copy.deepcopy(config)
    broken["max_workers"] = 1
    assert any("max_workers = 1 is below the node types' max_workers together" in p
               for p in problems_of([broken], tmp_path))


# --- the pieces ------------------------------------------------------------------------------------------------------

def test_quantities_as_kubernetes_writes_them():
    assert cm.quantity("500m") == 0.5 and cm.quantity("4") == 4 and cm.quantity(2) == 2
    assert cm.quantity("16Gi") == 16 * 2**30 and cm.quantity("1G") == 1e9 and cm.quantity("1.5k") == 1500
    assert cm.quantity("1e3") == 1000 and cm.quantity("2E") == 2e18
    for bad in ("", "4 cores", "Gi", "1.2.3"):
        with pytest.raises(ValueError, match="is not a Kubernetes quantity"):
            cm.quantity(bad)


def test_a_pod_is_seen_as_kuberay_tells_ray_start():
    pod = {"template": {"spec": {"containers": [{"resources": {
        "limits": {"cpu": "7500m", "memory": "8Gi", "nvidia.com/gpu": 2}, "requests": {"cpu": "1"}}}]}}}
    shape, problems = cm.group_shape("g", pod)
    assert (shape.cpus, shape.gpus, shape.memory, problems) == (8, 2, 8 * 2**30, [])  # limits win, rounded up
    pod["rayStartParams"] = {"num-cpus": "3", "num-gpus": "1", "memory": "1000"}
    assert cm.group_shape("g", pod)[0] == cm.NodeShape("g", 3, 1, 1000)  # rayStartParams win over limits
    only_requests = {"template": {"spec": {"containers": [{"resources": {"requests": {"cpu": "2"}}}]}}}
    shape, problems = cm.group_shape("g", only_requests)
    assert shape.cpus == 2 and shape.gpus == 0 and [p for p in problems if "no memory limit" in p]
    assert cm.group_shape("g", {"template": {"spec": {"containers": [{}]}}})[0].cpus == 0
    mig = {"template": {"spec": {"containers": [{"resources": {"limits": {"cpu": 1, "memory": "1Gi",
                                                                          "nvidia.com/mig-2g.32gb": 1}}}]}}}
    assert cm.group_shape("g", mig)[0].gpus == 1


def test_cluster_shapes_count_groups_at_min_replicas_and_max():
    pod = {"template": {"spec": {"containers": [{"resources": {"limits": {"cpu": 4, "memory": "4Gi"}}}]}}}
    cluster = {"enableInTreeAutoscaling": True, "headGroupSpec": {**pod, "rayStartParams": {"num-cpus": "0"}},
               "workerGroupSpecs": [{"groupName": "w", "minReplicas": 1, "replicas": 2, "maxReplicas": 5,
                                     "numOfHosts": 2, **pod}]}
    for scale, n in (("min", 2), ("replicas", 4), ("max", 10)):
        nodes, problems = cm.kuberay_nodes(cluster, scale)
        assert problems == [] and len(nodes) == 1 + n and nodes[0].cpus == 0 and nodes[1].cpus == 4
    cluster["workerGroupSpecs"][0]["replicas"] = 9
    assert any("replicas = 9 is outside" in p for p in cm.kuberay_nodes(cluster, "min")[1])
    del cluster["enableInTreeAutoscaling"], cluster["workerGroupSpecs"][0]["maxReplicas"]
    assert any("minReplicas and maxReplicas are required" in p for p in cm.kuberay_nodes(cluster, "min")[1])


def placeable(bundles, nodes) -> bool:
    """Whether the bundles fit the nodes whole in any assignment (exhaustive: the cases below are small)."""
    free = [list(n) for n in nodes]

    def place(i):
        if i == len(bundles):
            return True
        c, g = bundles[i]
        for f in free:
            if f[0] + 1e-9 >= c and f[1] + 1e-9 >= g:
                f[0], f[1] = f[0] - c, f[1] - g
                if place(i + 1):
                    return True
                f[0], f[1] = f[0] + c, f[1] + g
        return False

    return place(0)


@pytest.mark.parametrize("nodes", [[(4, 0)], [(4, 4), (8, 0)], [(16, 4), (16, 4), (2, 1)], [(1, 8), (32, 0)]])
@pytest.mark.parametrize("bundles", [[(1, 1)] * 4, [(1, 0)] * 9, [(0.5, 0.5)] * 6, [(4, 1), (1, 0), (2, 0)] * 2])
def test_pack_never_overfills_a_node_and_places_every_bundle_or_none(nodes, bundles):
    """pack places every bundle whole without overfilling a node whenever any placement exists, and says None
    only when none does (checked against an exhaustive search)."""
    shapes = [cm.NodeShape("n", c, g) for c, g in nodes]
    where = cm.pack(bundles, shapes)
    assert (where is not None) == placeable(bundles, nodes), (nodes, bundles, where)
    if where is None:
        return
    assert len(where) == len(bundles) and all(0 <= w < len(nodes) for w in where)
    for j, (c, g) in enumerate(nodes):
        mine = [b for b, w in zip(bundles, where, strict=True) if w == j]
        assert sum(b[0] for b in mine) <= c + 1e-9 and sum(b[1] for b in mine) <= g + 1e-9


def test_pack_refuses_what_does_not_fit_and_never_splits_a_bundle():
    assert cm.pack([(1, 1)] * 3, [cm.NodeShape("n", 8, 2)]) is None  # 3 GPUs asked, 2 there
    assert cm.pack([(3, 0), (3, 0)], [cm.NodeShape("a", 4, 0), cm.NodeShape("b", 4, 0)]) == [0, 1]  # never split
    assert cm.pack([(3, 0), (3, 0)], [cm.NodeShape("a", 4, 0), cm.NodeShape("b", 2, 0)]) is None  # 6 CPUs free, split
    assert cm.pack([], [cm.NodeShape("a", 1, 0)]) == []


def test_entrypoints_and_job_lines_parse_as_ragtune_submit_takes_them():
    runs = cm.parse_entrypoint(f"bash -c 'cd {cm.WORKDIR} && python -m jobs.embed --config a.yaml x.y=1 && "
                               "python -m jobs.index -c b.yaml'")
    assert runs == [cm.JobRun("embed", "a.yaml", ("x.y=1",)), cm.JobRun("index", "b.yaml")]
    assert cm.parse_entrypoint("python -m jobs.finetune --config c.yaml") == [cm.JobRun("finetune", "c.yaml")]
    assert cm.parse_job_line("finetune -c c.yaml 'train.lr=1e-4'") == cm.JobRun("finetune", "c.yaml",
                                                                              ("train.lr=1e-4",))
    assert shlex.split(runs[0].line()) == ["embed", "-c", "a.yaml", "x.y=1"]
    for bad, message in (("bash -c 'cd /tmp && python -m jobs.embed -c a.yaml'", "working directory is /home/ray"),
                         (f"cd {cm.WORKDIR} && python -m jobs.embed -c a.yaml", "uses ['&&'] outside `bash -c"),
                         ("python -m jobs.embed -c a.yaml; echo done", "uses [';'] outside"),
                         ("python -m jobs.embed a.yaml", "is not `JOB -c CONFIG"),
                         ("bash run.sh", "is not `python -m jobs.<job>"),
                         (f"bash -c 'cd {cm.WORKDIR}'", "runs no ragtune job"),
                         ("python -m jobs.embed -c a.yaml --wait", "are not section.field=value overrides")):
        with pytest.raises(cm.RagtuneError, match=re.escape(message)):
            cm.parse_entrypoint(bad)


# --- placement that Ray decides by default ----------------------------------------------------------------------------

def test_the_spread_and_pack_that_the_manifests_rely_on_are_rays_defaults():
    """ShardSearcher groups spread across nodes: Serve schedules replicas with its SPREAD policy unless
    RAY_SERVE_USE_PACK_SCHEDULING_STRATEGY (formerly ..._COMPACT_...) is set, which no manifest does. Training
    workers packed: Ray Train's placement group strategy is PACK unless ScalingConfig says otherwise, which
    jobs/finetune.py does not."""
    from ray.serve._private import deployment_scheduler
    from ray.train import ScalingConfig

    assert deployment_scheduler.RAY_SERVE_USE_PACK_SCHEDULING_STRATEGY is False
    assert ScalingConfig(num_workers=4, use_gpu=True).placement_strategy == "PACK"
    assert "placement_strategy" not in (REPO / "jobs" / "finetune.py").read_text()
    for path in [*KUBERAY, LAUNCHER]:
        text = path.read_text()
        assert "RAY_SERVE_USE_PACK_SCHEDULING_STRATEGY" not in text and "_COMPACT_SCHEDULING" not in text
