"""Give a job its Ray: an embedded local Ray sized to this machine, or an existing cluster.

The same job code runs both ways. Under ``ray job submit`` the driver already has ``RAY_ADDRESS`` set, so
``python -m jobs.<name> --config ...`` joins the cluster it was submitted to.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType

from cluster.placement import NodeResources
from configs.schema import ClusterConfig

log = logging.getLogger("ragtune")


class Stopped(KeyboardInterrupt):
    """The process was asked to stop (SIGTERM, as Kubernetes, Docker and systemd send it; or SIGINT): raised in
    the main thread, so that a job unwinds as on Ctrl-C (``finally`` blocks run, an embedded Ray is shut down
    with all its processes at exit) and ends with ``128 + signum``; ``ragtune serve`` drains and ends with 0."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


received: int | None = None  # the last stop signal this process got (a KeyboardInterrupt may not say which)


def _stop(signum: int, frame: FrameType | None) -> None:
    global received
    received = signum
    raise Stopped(signum)


def stop_signal(e: KeyboardInterrupt) -> int:
    """The signal that stopped the process: a :class:`Stopped`'s own; else the SIGTERM it got, when a
    ``ray.get`` turned the Stopped raised while it waited into a plain KeyboardInterrupt (Ray's core worker
    checks signals as an interruption, whatever the handler raised); else SIGINT (Ctrl-C)."""
    if isinstance(e, Stopped):
        return e.signum
    return received if received is not None else signal.SIGINT


def stop_on_sigterm() -> None:
    """SIGTERM raises :class:`Stopped` in the main thread (Ray's driver handler, set by ``ray.init``, calls
    ``sys.exit`` from wherever the main thread is, which has left a C++ abort and Ray's agents running)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _stop)


def init_ray(cfg: ClusterConfig) -> str:
    """Connect to (or start) Ray once per process and say which. Returns "existing", "cluster" or "local".

    Order: a Ray already initialised in this process (tests, notebooks) is reused; then ``cluster.address``;
    then ``RAY_ADDRESS``; else a new local Ray with ``cluster.num_cpus`` / ``num_gpus`` or the whole machine.
    A local Ray is always a new one (``address="local"``), never a ``ray start`` cluster found by accident.
    """
    import ray
    import ray.data

    # a map function's own error (a RagtuneError: corpus, model) reaches the driver as the cause of Ray's
    # RayTaskError, where configs.errors.user_error finds it, not replaced by Ray Data's UserCodeException (which
    # loses it: "UDF failed to process a data block", a traceback from inside Ray)
    ray.data.DataContext.get_current().raise_original_map_exception = True
    if ray.is_initialized():
        return "existing"
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("joining the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
        stop_on_sigterm()
        return "cluster"
    object_store = int(cfg.object_store_memory_gb * 2**30) if cfg.object_store_memory_gb else None
    ray.init(
        address="local",
        num_cpus=cfg.num_cpus or os.cpu_count(),
        num_gpus=cfg.num_gpus,
        object_store_memory=object_store,
        include_dashboard=False,  # a local run needs no dashboard: it costs a core-share on a laptop
        log_to_driver=True,
    )
    stop_on_sigterm()
    res = ray.cluster_resources()
    log.info("started a local Ray: %d CPUs, %d GPUs", res.get("CPU", 0), res.get("GPU", 0))
    return "local"


def alive_nodes() -> list[NodeResources]:
    """CPU, GPU and memory totals of each alive node that can run work (a head with 0 CPUs is left out)."""
    import ray

    nodes = []
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        res = node.get("Resources", {})
        cpus, gpus = float(res.get("CPU", 0)), float(res.get("GPU", 0))
        if cpus >= 1 or gpus >= 1:
            nodes.append(NodeResources(cpus=cpus, gpus=gpus, memory=float(res.get("memory", 0))))
    return nodes
