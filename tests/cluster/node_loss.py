"""Node-loss scenarios on a multi-node Ray on one machine; ``tests/cluster/test_node_loss.py`` runs each in a
process of its own and asserts on what it writes.

Each scenario starts a ``ray.cluster_utils.Cluster`` (a head and 1-CPU worker nodes; fast health checks, so a
node that stops answering is declared dead in about a second instead of ~13.5 s), runs a ragtune job on it,
removes a worker node in the middle (its processes SIGKILLed: a machine that crashed, not one drained), lets the
job finish, and writes what happened to ``<work>/result.json``::

    export RAY_TMPDIR=$(mktemp -d /tmp/rtnl-XXXX) HF_HUB_OFFLINE=1
    python tests/cluster/node_loss.py embed --work $RAY_TMPDIR/w --corpus corpus.jsonl       # 400 SQuAD paragraphs
    python tests/cluster/node_loss.py finetune --work $RAY_TMPDIR/w --data DIR     # train.jsonl and val.jsonl
    python tests/cluster/node_loss.py serve --work $RAY_TMPDIR/w --embeddings EMB --model TINY_MODEL_DIR

Why a process: a Cluster needs its own Ray connection (the test session holds one, ``ray_2_cpus``), and two Rays
in one process confuse Ray Train. ``RAY_TMPDIR`` (short: Ray's socket paths must fit 107 characters) gives the
cluster its own sockets, logs and address file; the head's dashboard ports are picked free here, every other port
by Ray. Nothing here runs ``ray stop``: the cluster's processes die with ``Cluster.shutdown``, or with this process
(Ray's reaper) if it is killed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

log = logging.getLogger("node_loss")

# A removed node's raylet refuses connections at once, so 5 failed checks 200 ms apart declare it dead in ~1 s;
# a live but busy raylet has 1 s to answer each check (these 2 cores are shared).
FAST_HEALTH_CHECKS = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 200,
                      "health_check_timeout_ms": 1000, "health_check_failure_threshold": 5}
ENV = ("HF_HUB_OFFLINE", "TORCH_EXTENSIONS_DIR", "TOKENIZERS_PARALLELISM", "RAY_TMPDIR")
_CLUSTERS: list[Any] = []  # shut down at exit, whatever happened


# --- the cluster --------------------------------------------------------------------------------------------------

def start_cluster(head_cpus: int, workers: int):
    """A head with ``head_cpus`` CPUs and ``workers`` 1-CPU nodes, this process connected to it."""
    import ray
    import ray.data
    from ray.cluster_utils import Cluster

    t0 = time.monotonic()
    dashboard, agent = free_ports(2)  # Ray's fixed defaults (8265, 52365) may belong to another Ray on this machine
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": head_cpus, "include_dashboard": False, "dashboard_port": dashboard,
        "dashboard_agent_listen_port": agent, "_system_config": FAST_HEALTH_CHECKS})
    _CLUSTERS.append(cluster)
    for _ in range(workers):
        cluster.add_node(num_cpus=1, wait=False)  # the nodes start side by side
    cluster.wait_for_nodes(timeout=120)
    os.environ["RAY_ADDRESS"] = cluster.address  # anything that looks for "the" cluster finds this one
    env = {k: os.environ[k] for k in ENV if k in os.environ} | {"RAY_ADDRESS": cluster.address}
    ray.init(address=cluster.address, runtime_env={"env_vars": env}, log_to_driver=True)
    ray.data.DataContext.get_current().enable_progress_bars = False
    log.info("cluster up in %.1fs: head (%d CPUs) + %d nodes", time.monotonic() - t0, head_cpus, workers)
    return cluster


def free_ports(n: int) -> list[int]:
    import socket

    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def node_of(cluster, node_id: str):
    [node] = [n for n in cluster.worker_nodes if n.node_id == node_id]
    return node


def remove_node(cluster, node_id: str) -> dict[str, float]:
    """SIGKILL every process of the node; return when it was killed and when the cluster saw it dead."""
    t0 = time.monotonic()
    cluster.remove_node(node_of(cluster, node_id), allow_graceful=False)
    t_killed = time.monotonic()
    wait_for(lambda: not node_alive(node_id), 60, f"node {node_id[:8]} to be declared dead")
    t_dead = time.monotonic()
    log.info("node %s removed; declared dead %.2fs after the kill", node_id[:8], t_dead - t_killed)
    return {"t_remove": t0, "t_killed": t_killed, "t_dead": t_dead}


def node_alive(node_id: str) -> bool:
    import ray

    return any(n["NodeID"] == node_id and n["Alive"] for n in ray.nodes())


def actors(class_name: str | None = None, name_prefix: str | None = None) -> list[dict[str, Any]]:
    """Actors of the cluster (alive and dead) from the GCS: class, state, node, restarts; ``class_name`` matches a
    part of the class name."""
    import ray._private.state as state

    out = []
    for a in state.actors().values():
        if class_name and class_name not in a.get("ActorClassName", ""):
            continue
        if name_prefix and not (a.get("Name") or "").startswith(name_prefix):
            continue
        out.append({"id": a["ActorID"], "class": a["ActorClassName"], "name": a.get("Name") or "", "state": a["State"],
                    "node": a["Address"]["NodeID"], "restarts": a.get("NumRestarts", 0)})
    return out


def wait_for(condition, timeout: float, what: str, every: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:.0f}s for {what}")
        time.sleep(every)


def in_thread(fn, *args) -> tuple[threading.Thread, dict[str, Any]]:
    """Run ``fn(*args)`` in a thread; its return value or error lands in the dict."""
    box: dict[str, Any] = {}

    def target():
        t0 = time.monotonic()
        try:
            box["value"] = fn(*args)
        except BaseException as e:  # reported, the scenario decides
            box["error"] = f"{type(e).__name__}: {e}"
            box["traceback"] = traceback.format_exc()[-4000:]
        box["seconds"] = time.monotonic() - t0

    th = threading.Thread(target=target, daemon=True)
    th.start()
    return th, box


# --- embed --------------------------------------------------------------------------------------------------------

def scenario_embed(args) -> dict[str, Any]:
    """2 embedding actors on 2 of 3 worker nodes; the node of one is removed after the first part is recorded."""
    from configs.schema import EmbedJobConfig
    from jobs.embed import run

    out = Path(args.work) / "embeddings"
    cfg = EmbedJobConfig.model_validate({
        "corpus": {"path": args.corpus, "id_field": "_id"}, "chunk": {"size": 128},
        "embed": {"actors": 2}, "output": {"path": str(out), "num_parts": args.parts}})
    cluster = start_cluster(head_cpus=0, workers=3)
    t0 = time.monotonic()
    job, box = in_thread(run, cfg)

    def recorded() -> int:  # parts finished: a record each in _parts/ while the job runs
        return len(list((out / "_parts").glob("part-*.json")))

    wait_for(lambda: recorded() >= 1 or not job.is_alive(), 600, "the first part")
    assert job.is_alive(), f"the job ended before a node could be removed: {box}"
    workers = [a for a in actors("MapWorker") if a["state"] == "ALIVE"]
    assert workers, f"no embedding actor is alive: {actors()}"
    victim = workers[0]["node"]
    at_removal = recorded()
    times = remove_node(cluster, victim)
    job.join(900)
    result: dict[str, Any] = {
        "victim": victim, "parts_at_removal": at_removal, "parts": args.parts, **times, "t_start": t0,
        "workers_before": workers, "workers_after": actors("MapWorker"),
        "first_run": {k: v for k, v in box.items() if k != "value"} | {"summary": _asdict(box.get("value"))},
    }
    if "error" in box:  # the documented way on: rerun the same config (the test reports what it did)
        rerun, again = in_thread(run, cfg)
        rerun.join(900)
        result["rerun"] = {k: v for k, v in again.items() if k != "value"} | {"summary": _asdict(again.get("value"))}
    result["output"] = str(out)
    result["config"] = cfg.model_dump(mode="json")
    return result


def _asdict(x: Any) -> Any:
    return asdict(x) if x is not None else None


# --- finetune -----------------------------------------------------------------------------------------------------

def scenario_finetune(args) -> dict[str, Any]:
    """2 training workers on 2 of 3 worker nodes; the node of one is removed once a checkpoint is registered."""
    from configs.schema import FinetuneJobConfig, load_config
    from jobs.finetune import run

    data, storage = Path(args.data), Path(args.work) / "runs"
    cfg = load_config(FinetuneJobConfig, REPO / "configs" / "finetune" / "tiny.yaml", [
        f"data.train={data / 'train.jsonl'}", f"data.validation={data / 'val.jsonl'}", f"train.steps={args.steps}",
        f"train.eval_every={args.every}", f"train.checkpoint_every={args.every}", f"run.storage_path={storage}",
        "run.name=node-loss", "deepspeed.preset=zero2", "scaling.num_workers=2"])
    run_dir = storage / "node-loss"
    cluster = start_cluster(head_cpus=0, workers=3)
    t0 = time.monotonic()
    job, box = in_thread(run, cfg)

    def checkpoints() -> list[int]:
        """Steps of the checkpoints Ray Train has registered (every rank's part written: a restart resumes from
        the latest), from the snapshot its checkpoint manager keeps in the run folder."""
        try:
            snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
        except (OSError, ValueError):  # not written yet, or being replaced
            return []
        return sorted(c["metrics"]["step"] for c in snapshot["checkpoint_results"])

    wait_for(lambda: checkpoints() or not job.is_alive(), 600, "the first registered checkpoint")
    assert job.is_alive(), f"the run ended before a node could be removed: {box}"
    workers = [a for a in actors("RayTrainWorker") if a["state"] == "ALIVE"]
    assert len(workers) == 2, f"expected 2 training workers: {actors()}"
    at_removal = checkpoints()
    victim = workers[-1]["node"]
    times = remove_node(cluster, victim)
    job.join(900)
    metrics_file = run_dir / "outputs" / "metrics.jsonl"
    return {
        "victim": victim, "checkpoints_at_removal": at_removal, **times, "t_start": t0,
        "wall_minus_monotonic": time.time() - time.monotonic(),  # metrics rows carry wall-clock times
        "workers_before": workers, "workers_after": actors("RayTrainWorker"),
        "run": {k: v for k, v in box.items() if k != "value"} | {"summary": _asdict(box.get("value"))},
        "metrics": [json.loads(line) for line in metrics_file.read_text().splitlines()] if metrics_file.is_file()
        else None,
        "steps": args.steps, "every": args.every, "run_dir": str(run_dir),
    }


# --- serve --------------------------------------------------------------------------------------------------------

QUERIES = ["Which NFL team won Super Bowl 50?", "Where did Super Bowl 50 take place?", "What is the Amazon rainforest?",
           "Who was the Normans' leader?", "What color was used to emphasize the 50th anniversary?",
           "Who founded the University of Chicago?", "What is a Turing machine?", "How many tribes in Kenya?"]
REPLICA = "SERVE_REPLICA::ragtune#"  # Serve names each replica's actor SERVE_REPLICA::<app>#<deployment>#<id>


def replicas() -> dict[str, list[dict[str, Any]]]:
    """The app's alive replicas by deployment name."""
    out: dict[str, list[dict[str, Any]]] = {}
    for a in actors(name_prefix=REPLICA):
        if a["state"] == "ALIVE":
            out.setdefault(a["name"].split("#")[1], []).append(a)
    return out


def running(deployment: str) -> int:
    """Replicas Serve reports RUNNING for one deployment of the app."""
    from ray import serve

    app = serve.status().applications.get("ragtune")
    d = app.deployments.get(deployment) if app else None
    return d.replica_states.get("RUNNING", 0) if d else 0


def scenario_serve(args) -> dict[str, Any]:
    """A 2-shard index served with 2 replicas per shard group, the groups' second replicas on worker nodes and
    everything else on the head; a worker node holding one (or both) is removed under /v1/search traffic."""
    import ray
    import requests
    from ray import serve
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from configs.schema import EmbedJobConfig, IndexJobConfig, ServeJobConfig
    from jobs.embed import run as embed
    from jobs.index import run as index
    from serving.app import ServeAppArgs, build_app, plan_summary

    work = Path(args.work)
    # head: 4 CPUs for the Ingress, Retriever, Embedder, Generator and one replica of each group; 2 worker nodes
    cluster = start_cluster(head_cpus=4, workers=2)
    head = ray.get_runtime_context().get_node_id()
    workers = [n.node_id for n in cluster.worker_nodes]
    t0 = time.monotonic()
    embeddings = args.embeddings
    if embeddings is None:  # the embed job on this cluster too
        embeddings = str(work / "embeddings")
        embed(EmbedJobConfig.model_validate({
            "corpus": {"path": args.corpus, "id_field": "_id"}, "chunk": {"size": None}, "embed": {"actors": 2},
            "output": {"path": embeddings, "num_parts": 2}}))
    built = index(IndexJobConfig.model_validate({"embeddings": {"path": embeddings},
                                                 "index": {"path": str(work / "index"), "kind": "Flat",
                                                           "shards": 2}}))
    t_index = time.monotonic() - t0

    [port] = free_ports(1)
    cfg = ServeJobConfig.model_validate({
        "index": {"path": str(work / "index"), "poll_interval_s": None},
        # the split layout: this scenario loses a node that holds ShardSearcher replicas of shard groups
        "shards": {"layout": "split", "groups": 2, "replicas": 2, "health_check_period_s": 1},
        "generator": {"model": args.model, "name": "tiny", "defaults": {"max_tokens": 4}},
        "retrieval": {"k": 5, "retries_s": args.retries_s}, "http": {"port": port}, "serve": {"access_log": False},
        "auth": {"api_keys": [], "api_keys_env": None}})
    plan = plan_summary(cfg)
    assert plan["searcher_max_per_node"] == 1, plan  # the product's spreading, under test here

    # The placement this scenario needs: the groups' second replicas alone on worker nodes, the rest on the head.
    # Serve spreads replicas over every node that fits, so the worker nodes are held (a 1-CPU actor pinned to
    # each) while the head fills; max_replicas_per_node keeps each group's second replica off the head.
    @ray.remote(num_cpus=1)
    class Hold:
        def node(self) -> str:
            return ray.get_runtime_context().get_node_id()

    holds = [Hold.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote()
             for n in workers]
    ray.get([h.node.remote() for h in holds])
    t1 = time.monotonic()
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    serve._run(build_app(ServeAppArgs(config=cfg.model_dump(mode="json"))), name="ragtune", route_prefix="/",
               _blocking=False)
    on_head = ("Ingress", "Retriever", "Embedder", "Generator", "ShardSearcher0", "ShardSearcher1")
    wait_for(lambda: all(running(d) >= 1 for d in on_head), 300, "one replica of each deployment", every=0.5)
    for h in holds:
        ray.kill(h)
    wait_for(lambda: running("ShardSearcher0") == 2 and running("ShardSearcher1") == 2, 300,
             "the second replicas", every=0.5)
    t_serve = time.monotonic() - t1
    placed = replicas()
    victim = next(a["node"] for a in placed["ShardSearcher0"] if a["node"] != head)

    url = f"http://127.0.0.1:{port}"
    stop, log_, lock = threading.Event(), [], threading.Lock()

    def traffic(i: int) -> None:
        session = requests.Session()
        n = 0
        while not stop.is_set():
            q = QUERIES[(i + n) % len(QUERIES)]
            n += 1
            t_sent = time.monotonic()
            try:
                r = session.post(f"{url}/v1/search", json={"query": q, "k": 5}, timeout=120)
                row = {"query": q, "status": r.status_code, "t_sent": t_sent, "t_done": time.monotonic()}
                if r.status_code == 200:
                    body = r.json()
                    row |= {"ids": [h["chunk_id"] for h in body["data"]], "version": body["version"]}
                else:
                    row["body"] = r.text[:300]
            except Exception as e:  # a connection error is a failed request too
                row = {"query": q, "status": type(e).__name__, "body": str(e)[:300], "t_sent": t_sent,
                       "t_done": time.monotonic()}
            with lock:
                log_.append(row)

    threads = [threading.Thread(target=traffic, args=(i,), daemon=True) for i in range(args.clients)]
    for th in threads:
        th.start()
    wait_for(lambda: len(log_) >= 20, 120, "20 answers before the removal")
    times = remove_node(cluster, victim)
    groups = ("ShardSearcher0", "ShardSearcher1")
    before = {a["id"] for d in groups for a in placed[d]}

    def replaced() -> bool:  # every group has 2 replicas alive again, off the lost node, and Serve runs them
        now = replicas()
        return all(len(now.get(d, [])) == 2 and all(a["node"] != victim for a in now[d]) for d in groups) and \
            {a["id"] for d in groups for a in now[d]} != before and all(running(d) == 2 for d in groups)

    wait_for(replaced, 300, "Serve to replace the lost replicas", every=0.2)
    t_recovered = time.monotonic()
    n_recovered = len(log_)
    wait_for(lambda: len(log_) >= n_recovered + 20, 120, "20 answers after the replacement")
    stop.set()
    for th in threads:
        th.join(150)
    after = replicas()
    serve.shutdown()
    return {"head": head, "victim": victim, **times, "t_recovered": t_recovered, "t_index_s": t_index,
            "t_serve_s": t_serve, "plan": plan, "index_version": built.version,
            "placed": placed, "after": after, "requests": log_, "index": str(work / "index")}


# --- main ---------------------------------------------------------------------------------------------------------

SCENARIOS = {"embed": scenario_embed, "finetune": scenario_finetune, "serve": scenario_serve}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("scenario", choices=sorted(SCENARIOS))
    p.add_argument("--work", required=True, help="folder for outputs and result.json")
    p.add_argument("--corpus", help="JSONL corpus (embed; serve without --embeddings)")
    p.add_argument("--embeddings", help="embeddings made by ragtune embed, to index (serve)")
    p.add_argument("--parts", type=int, default=8, help="embedding parts (embed)")
    p.add_argument("--data", help="folder with train.jsonl and val.jsonl (finetune)")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps (finetune)")
    p.add_argument("--every", type=int, default=10, help="steps between checkpoints and evals (finetune)")
    p.add_argument("--model", help="the generator's model folder (serve)")
    p.add_argument("--clients", type=int, default=4, help="threads sending /v1/search (serve)")
    p.add_argument("--retries-s", type=float, default=60.0,
                   help="the Retriever's retrieval.retries_s (serve; tiny = no retries, to see requests fail)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    Path(args.work).mkdir(parents=True, exist_ok=True)
    import ray

    try:
        result = SCENARIOS[args.scenario](args)
    finally:
        for cluster in _CLUSTERS:
            ray.shutdown()  # again: a job thread still running may have reconnected
            cluster.shutdown()
    (Path(args.work) / "result.json").write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
