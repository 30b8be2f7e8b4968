"""`ragtune serve`: the RAG app on Ray Serve behind an OpenAI-compatible API, until Ctrl-C.

    ragtune index -c configs/index/sample.yaml            # an index to serve (after ragtune embed)
    ragtune serve -c configs/serve/sample.yaml             # a laptop: local Ray, tiny generator, 127.0.0.1:8000
    ragtune ask "How do I build an index?"                 # another terminal
    RAGTUNE_API_KEYS=... ragtune serve -c configs/serve/gpu-cluster.yaml --address ray://HEAD:10001
    ragtune serve -c configs/serve/gpu-cluster.yaml --print-serve-config > serve.yaml   # KubeRay RayService

Setup (check the index, the model, the adapters and the auth settings before any Ray work) -> start Ray and
Serve's HTTP proxy -> deploy the app (``serving.app.build_app``) -> wait until every shard is loaded -> serve
until interrupted -> delete the app. See docs/serving.md.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from cluster.runtime import init_ray
from configs.errors import RagtuneError
from configs.schema.serve import LOOPBACK, ServeJobConfig, is_loopback
from jobs.commands import job_main
from serving.app import ServeAppArgs, build_app, check_retrieval, serve_config
from serving.auth import api_key_hashes
from serving.client import RagtuneClient
from serving.schemas import Health
from sharding.manifest import read_index_manifest, resolve_index
from sharding.storage import exists, resolve

log = logging.getLogger("ragtune.serve")


def resolved_host(cfg: ServeJobConfig) -> str:
    return cfg.http.host or LOOPBACK


def check(cfg: ServeJobConfig) -> None:
    """Preflight without Ray or torch: the index version and its retrieval mode, the generator and adapter
    folders, auth vs host."""
    manifest = read_index_manifest(resolve_index(cfg.index.path))
    check_retrieval(cfg)
    if cfg.shards.groups is not None and cfg.shards.groups > len(manifest.shards):
        raise RagtuneError(f"shards.groups = {cfg.shards.groups} but {cfg.index.path} has {len(manifest.shards)} "
                           f"shard(s). Fix: set shards.groups <= {len(manifest.shards)}, or null")
    model = cfg.generator.model
    if "://" in model:
        if not exists(resolve(model).join("config.json")):
            raise RagtuneError(f"generator.model = {model!r}: no config.json there. Fix: point it at a model folder")
    elif model.startswith((".", "/", "~")) or Path(model).expanduser().exists():
        if not (Path(model).expanduser() / "config.json").is_file():
            raise RagtuneError(f"generator.model = {model!r}: no model folder (config.json) there. Fix: point it at "
                               "a transformers model folder, e.g. a fine-tuning run's base_model/")
    for name, path in cfg.generator.adapters.items():
        folder = resolve(path)
        if not exists(folder.join("adapter_config.json")):
            raise RagtuneError(f"generator.adapters.{name} = {path!r}: no adapter_config.json there. Fix: point it "
                               "at a PEFT adapter folder, e.g. runs/finetune/<run>/outputs/adapter")
    host = resolved_host(cfg)
    if not is_loopback(host) and not _has_keys(cfg):
        raise RagtuneError(f"http.host = {host!r} exposes the API but no API key is set (auth.api_keys empty and "
                           f"${cfg.auth.api_keys_env} unset). Fix: export {cfg.auth.api_keys_env}=<long random "
                           "key>, or leave http.host null (127.0.0.1)")


def _has_keys(cfg: ServeJobConfig) -> bool:
    return bool(api_key_hashes(cfg.auth.api_keys, cfg.auth.api_keys_env))


@dataclass
class ServeSummary:
    url: str
    app: str
    version: str
    seconds: float  # how long it served

    def line(self) -> str:
        return f"served {self.app} at {self.url} (index {self.version}) for {self.seconds:.0f}s"


def print_serve_config(cfg: ServeJobConfig) -> None:
    print(f"# Serve config for a KubeRay RayService (spec.serveConfigV2) or `serve deploy`, from ragtune serve.\n"
          f"# API keys are read by the replicas from ${cfg.auth.api_keys_env} (set it from a Kubernetes Secret);\n"
          "# the deployments' resources are decided on the cluster (cluster.placement.plan_serving).")
    print(yaml.safe_dump(serve_config(cfg), sort_keys=False), end="")


def wait_ready(url: str, timeout_s: float = 120.0) -> Health:
    """Poll /healthz until every shard is loaded (it answers 503 until then)."""
    deadline = time.monotonic() + timeout_s
    last: object = None
    with RagtuneClient(url, timeout=10, max_retries=0) as client:
        while time.monotonic() < deadline:
            try:
                return Health.model_validate(client.health())
            except RagtuneError as e:  # not listening yet, or a 503 while shards load
                last = e
            time.sleep(0.5)
    raise RagtuneError(f"{url}/healthz did not report ready within {timeout_s:.0f}s ({last}). Fix: see the Serve "
                       "logs (ray logs, or /tmp/ray/session_latest/logs/serve/)")


def run(cfg: ServeJobConfig) -> ServeSummary | None:
    if cfg.serve.print_config:
        print_serve_config(cfg)
        return None
    check(cfg)

    # --- setup: Ray and Serve's proxy
    from ray import serve

    started = init_ray(cfg.cluster)
    host = resolved_host(cfg)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://{shown}:{cfg.http.port}{cfg.http.route_prefix.rstrip('/')}"
    t0 = time.monotonic()
    version, deployed = "not ready", False
    # from here on a stop (Ctrl-C, or SIGTERM: cluster.runtime.Stopped), at start or while serving, drains and ends
    # with status 0: a server asked to stop has done its job
    try:
        serve.start(http_options={"host": host, "port": cfg.http.port,
                                  "request_timeout_s": cfg.limits.request_timeout_s + 5})
        if not _has_keys(cfg):
            log.warning("=" * 100)
            log.warning("NO API KEYS CONFIGURED: serving WITHOUT authentication, bound to %s only. Set %s to "
                        "require keys (and to listen beyond this machine).", host, cfg.auth.api_keys_env)
            log.warning("=" * 100)
        deployed = True  # from here the app may be (partly) deployed: the stop deletes it
        serve.run(build_app(ServeAppArgs(config=cfg.model_dump(mode="json"))), name=cfg.http.app_name,
                  route_prefix=cfg.http.route_prefix, blocking=False)
        state = wait_ready(url)
        version = str(state.version)
        log.info("ready in %.1fs: %s (index %s, %s shard(s)); OpenAI base_url %s/v1; Ctrl-C stops",
                 time.monotonic() - t0, url, state.version, state.shards, url)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt as e:
        log.info("stopping (%s): draining requests under way", e or "SIGINT")
    finally:
        if deployed:  # replicas finish their requests (graceful_shutdown_timeout_s) and stop
            serve.delete(cfg.http.app_name)
        if started == "local":  # the embedded Ray and all its processes (agents included) go with the command
            import ray

            serve.shutdown()
            ray.shutdown()
    return ServeSummary(url, cfg.http.app_name, version, time.monotonic() - t0)


if __name__ == "__main__":  # python -m jobs.serve --config FILE [overrides] (what `ray job submit` calls)
    job_main("serve", run)
