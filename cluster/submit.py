"""Submitting ragtune jobs to a Ray cluster's job server, and the checks that belong before a submission.

``ragtune submit --address http://HEAD:8265 -- embed -c configs/embed/x.yaml`` ships the working directory
(``.gitignore`` and ``.rayignore`` are respected; the virtual environment and run outputs never travel) and
runs ``python -m jobs.embed --config configs/embed/x.yaml`` there, exactly what ``ray job submit --working-dir
. -- python -m jobs.embed ...`` would run.

Ray 2.60 turns token authentication on by default: the token comes from ``RAY_AUTH_TOKEN``, else the file named
by ``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``, and is sent as a bearer token on every request.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from configs.errors import RagtuneError

# Never uploaded with the working directory, whatever the ignore files say.
EXCLUDES = [".venv/", "venv/", ".git/", "runs/", "__pycache__/", "*.egg-info/", ".pytest_cache/", ".ruff_cache/",
            ".mypy_cache/"]
log = logging.getLogger("ragtune.submit")

# What a job server that is not ready answers (Ray's JobSubmissionClient raises RuntimeError("Request failed with
# status code 500: No available agent to submit job, please try again later..")): its agent has not registered yet
# (a head node just started) or a stale agent holds its port; or 503 from a proxy in front of it. Neither took the
# job, so a retry cannot submit it twice (a 502 or 504 could have, after the job was taken: those are not retried).
NOT_READY = re.compile(r"status code (?:503|500: No available agent)")
SUBMIT_RETRY_S = 60.0

# Environment a job needs wherever it runs: no hub downloads at run time unless the user allows them.
DEFAULT_ENV = {"TOKENIZERS_PARALLELISM": "false"}


def auth_token() -> str | None:
    """The Ray auth token the usual way: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token."""
    if token := os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return token
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise RagtuneError(f"RAY_AUTH_TOKEN_PATH = {path!r}: no such file. Fix: point it at the cluster's "
                               "token file, or set RAY_AUTH_TOKEN")
        return p.read_text().strip() or None
    default = Path.home() / ".ray" / "auth_token"
    return default.read_text().strip() or None if default.is_file() else None


def auth_headers() -> dict[str, str]:
    token = auth_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


def dashboard_address(address: str | None) -> str:
    """The job server's HTTP address from ``--address``, RAY_API_SERVER_ADDRESS or RAY_ADDRESS."""
    raw = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not raw:
        raise RagtuneError("no cluster address. Fix: pass --address http://HEAD:8265 (the Ray dashboard / job "
                           "server) or set RAY_ADDRESS")
    if raw.startswith("ray://") or raw == "auto" or raw.rstrip("/").endswith(":6379") or raw.endswith(":10001"):
        raise RagtuneError(f"--address {raw!r} is a Ray client or GCS address; jobs are submitted to the job "
                           "server. Fix: pass http://HEAD:8265 (the dashboard port)")
    if "://" not in raw:
        raw = "http://" + raw
    return raw.rstrip("/")


def connect(address: str | None):
    """A JobSubmissionClient for the cluster, with the auth token; a clear error when it cannot connect."""
    from ray.job_submission import JobSubmissionClient

    url = dashboard_address(address)
    try:
        return JobSubmissionClient(url, headers=auth_headers())
    except Exception as e:  # ConnectionError, AuthenticationError, version mismatch: one message each
        name = type(e).__name__
        hint = ("set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH to the cluster's token" if "Authentication" in name
                else "check the address and that the head node's dashboard is running")
        raise RagtuneError(f"cannot reach the Ray job server at {url} ({name}: {str(e).splitlines()[0]}). "
                           f"Fix: {hint}") from None


def submit_retrying(submit: Callable[[], str], url: str, retry_s: float = SUBMIT_RETRY_S,
                    sleep: Callable[[float], None] = time.sleep) -> str:
    """``submit()`` (a JobSubmissionClient.submit_job call: the job id), retried for up to ``retry_s`` seconds
    (backing off 1, 2, 4 ... 8 s) while the job server answers that it is not ready; then a clear error that says
    what to check. Any other failure is raised at once."""
    deadline, wait, tries = time.monotonic() + retry_s, 1.0, 0
    while True:
        tries += 1
        try:
            return submit()
        except RuntimeError as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            if not NOT_READY.search(first):
                raise
            if time.monotonic() + wait > deadline:
                raise RagtuneError(
                    f"the Ray job server at {url} is not ready to take jobs: after {tries} tries over "
                    f"{retry_s:g} s it still answers: {first.rstrip('.')}. Fix: check that the head node's Ray is "
                    "up (`ray status` there); Ray processes left from an earlier cluster on the head can hold the "
                    "job agent's port (`ray stop --force` there, then `ray start --head`); then submit again"
                ) from None
            log.warning("the job server at %s is not ready (%s); retrying in %.0f s", url, first.rstrip("."), wait)
            sleep(wait)
            wait = min(2 * wait, 8.0)


def alive_nodes(address: str | None) -> int:
    """How many nodes of the cluster are alive (through the dashboard's state API)."""
    import requests

    url = dashboard_address(address) + "/api/v0/nodes"
    try:
        r = requests.get(url, headers=auth_headers(), timeout=30)
        r.raise_for_status()
        nodes = r.json()["data"]["result"]["result"]
    except Exception as e:
        raise RagtuneError(f"cannot list the nodes of the cluster at {url} ({type(e).__name__}). Fix: check the "
                           "address and the auth token") from None
    return sum(1 for n in nodes if n.get("state") == "ALIVE")


@dataclass(frozen=True)
class StoragePath:
    field: str  # dotted, e.g. output.path
    value: str
    kind: Literal["input", "output"]


def storage_paths(cfg: BaseModel, prefix: str = "") -> Iterator[StoragePath]:
    """Every field a schema marks as storage (``json_schema_extra={"storage": "input" | "output"}``)."""
    for name, info in type(cfg).model_fields.items():
        value = getattr(cfg, name)
        dotted = f"{prefix}{name}"
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        match extra.get("storage"):
            case "input" | "output" as kind if value is not None:
                for v in [value] if isinstance(value, str) else value:
                    yield StoragePath(dotted, str(v), kind)
            case _ if isinstance(value, BaseModel):
                yield from storage_paths(value, dotted + ".")


def storage_problems(cfg: BaseModel, nodes: int, shared_fs: bool) -> tuple[list[str], list[str]]:
    """(errors, warnings) about where a job on a cluster of ``nodes`` would read and write.

    On more than one node, every worker must see the same files: a local path is an error unless it is an
    input inside the working directory (which Ray copies to every node) or ``--shared-fs`` says local paths
    are a shared mount. A relative output lands in the job's copy of the working directory on the cluster.
    """
    errors, warnings = [], []
    for sp in storage_paths(cfg):
        if "://" in sp.value:
            continue
        relative = not os.path.isabs(os.path.expanduser(sp.value))
        if sp.kind == "input" and relative:
            continue  # shipped with the working directory to every node
        if nodes > 1 and not shared_fs:
            errors.append(f"{sp.field} = {sp.value!r} is a local path but the cluster has {nodes} nodes: workers "
                          f"on other nodes cannot see it. Fix: use shared storage (a URI such as s3://bucket/"
                          f"path), or pass --shared-fs if {sp.value!r} is on a mount every node shares")
        elif sp.kind == "output" and relative:
            warnings.append(f"{sp.field} = {sp.value!r} is relative: it is written inside the job's copy of the "
                            "working directory on the cluster, which Ray deletes eventually. Use an absolute "
                            "path or a URI to keep it")
    return errors, warnings


def runtime_env(working_dir: str, env_vars: dict[str, str], pip: Sequence[str] | None = None) -> dict[str, Any]:
    """The runtime_env of a submitted job: the working directory, env vars, optionally the pinned packages."""
    env: dict[str, Any] = {"working_dir": working_dir, "excludes": EXCLUDES,
                           "env_vars": {**DEFAULT_ENV, **env_vars}}
    if pip:
        env["pip"] = list(pip)
    return env


def pinned_requirements() -> list[str]:
    """ragtune's own pinned dependencies (for clusters whose image does not have them)."""
    from importlib.metadata import PackageNotFoundError, requires

    try:
        reqs = requires("ragtune") or []
    except PackageNotFoundError:
        raise RagtuneError("ragtune is not installed here, so its pinned requirements are unknown. Fix: "
                           "pip install -e . first, or leave out --pip") from None
    return [r for r in reqs if "extra ==" not in r]


def entrypoint(job: str, config: str, overrides: Sequence[str]) -> str:
    """The command the job server runs: the job module, as ``ray job submit`` would run it."""
    return shlex.join(["python", "-m", f"jobs.{job}", "--config", config, *overrides])


def config_in_working_dir(config: str, working_dir: str) -> str:
    """The config's path relative to the working directory (what the job sees); an error when outside it."""
    cfg, wd = Path(config).resolve(), Path(working_dir).resolve()
    try:
        return cfg.relative_to(wd).as_posix()
    except ValueError:
        raise RagtuneError(f"config {config!r} is outside the working directory {str(wd)!r}, so it would not "
                           "be shipped with the job. Fix: move it under the working directory or pass "
                           "--working-dir") from None
