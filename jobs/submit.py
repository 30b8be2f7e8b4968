"""`ragtune submit` and `ragtune jobs`: run any ragtune job on a Ray cluster through its job server.

    ragtune submit --address http://HEAD:8265 --wait -- embed -c configs/embed/sample.yaml embed.batch_size=128
    ragtune jobs list --address http://HEAD:8265
    ragtune jobs status|logs|stop JOB_ID --address http://HEAD:8265

The same job also runs with plain Ray: ``ray job submit --address http://HEAD:8265 --working-dir . -- python -m
jobs.embed --config configs/embed/sample.yaml``. ``ragtune submit`` adds the checks that belong before a
submission (the config, and storage every node can see) and passes Ray's auth token on.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time

from cluster import submit as cs
from configs.errors import RagtuneError
from configs.schema import JOB_SCHEMAS, load_config
from jobs.commands import JOBS, job_overrides, job_parser

log = logging.getLogger("ragtune.submit")

_TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "submit", help="submit a job to a Ray cluster's job server",
        usage="ragtune submit [--address URL] [--wait] [options] -- JOB -c CONFIG [section.field=value ...]",
        description="Submit a ragtune job (what follows --) to a Ray cluster; the working directory is shipped.")
    p.add_argument("--address", help="job server, http://HEAD:8265 (default: RAY_API_SERVER_ADDRESS, RAY_ADDRESS)")
    p.add_argument("--wait", action="store_true", help="follow the logs and exit with the job's status")
    p.add_argument("--working-dir", default=".", help="folder shipped to the cluster (default: .)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment of the job")
    p.add_argument("--pip", action="store_true",
                   help="install ragtune's pinned requirements on the cluster (when its image lacks them)")
    p.add_argument("--shared-fs", action="store_true",
                   help="local paths in the config are on a mount every node shares")
    p.add_argument("--no-check", action="store_true", help="submit without checking the config here first")
    p.add_argument("--submission-id", help="id for the job (default: Ray picks one)")
    p.add_argument("job_args", nargs=argparse.REMAINDER, help="-- JOB -c CONFIG [overrides]")
    p.set_defaults(func=submit)

    j = sub.add_parser("jobs", help="list, inspect, follow or stop jobs on a Ray cluster")
    j.add_argument("action", choices=["list", "status", "logs", "stop"])
    j.add_argument("job_id", nargs="?", help="the submission id (not for list)")
    j.add_argument("--address", help="job server, http://HEAD:8265 (default: RAY_API_SERVER_ADDRESS, RAY_ADDRESS)")
    j.add_argument("--follow", action="store_true", help="with logs: keep following until the job ends")
    j.set_defaults(func=jobs)


def submit(args: argparse.Namespace) -> int:
    rest = list(args.job_args)
    if rest and rest[0] == "--":
        rest = rest[1:]
    if not rest or rest[0] not in JOBS:
        raise RagtuneError(f"ragtune submit needs a job after --, one of {', '.join(JOBS)}; got {rest[:1] or 'none'}. "
                           "Fix: ragtune submit --address http://HEAD:8265 -- embed -c configs/embed/sample.yaml")
    job_args = job_parser("ragtune submit --").parse_args(rest)
    if job_args.address:
        raise RagtuneError("--address after -- would point the job at another cluster. Fix: give --address "
                           "before --, to ragtune submit")
    name, overrides = job_args.job, job_overrides(job_args.job, job_args)
    config = cs.config_in_working_dir(job_args.config, args.working_dir)
    client = cs.connect(args.address)
    if not args.no_check:
        cfg = load_config(JOB_SCHEMAS[name], job_args.config, overrides)
        nodes = cs.alive_nodes(args.address)
        errors, warnings = cs.storage_problems(cfg, nodes, args.shared_fs)
        for w in warnings:
            log.warning(w)
        if errors:
            raise RagtuneError("\n".join(errors))
    env = dict(kv.split("=", 1) for kv in args.env if "=" in kv)
    if len(env) != len(args.env):
        raise RagtuneError(f"--env takes KEY=VALUE, got {args.env}")
    pip = cs.pinned_requirements() if args.pip else None
    job_id = cs.submit_retrying(
        lambda: client.submit_job(entrypoint=cs.entrypoint(name, config, overrides),
                                  runtime_env=cs.runtime_env(args.working_dir, env, pip),
                                  submission_id=args.submission_id, metadata={"ragtune.job": name}),
        cs.dashboard_address(args.address))
    print(f"submitted {name} as {job_id}")
    if not args.wait:
        print(f"follow it with: ragtune jobs logs {job_id} --follow --address {cs.dashboard_address(args.address)}")
        return 0
    return _follow(client, job_id)


def _follow(client, job_id: str) -> int:
    """Print the job's logs as they come, then its final status; 0 only when it SUCCEEDED."""

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            sys.stdout.write(lines)
            sys.stdout.flush()

    asyncio.run(tail())
    status = str(client.get_job_status(job_id)).split(".")[-1]
    while status not in _TERMINAL:  # the log stream can end a moment before the status does
        time.sleep(0.5)
        status = str(client.get_job_status(job_id)).split(".")[-1]
    info = client.get_job_info(job_id)
    why = (info.message or "").strip().splitlines()[:1] if status != "SUCCEEDED" else []
    print(f"job {job_id} {status}" + (f": {why[0]}" if why else ""))
    return 0 if status == "SUCCEEDED" else 1


def jobs(args: argparse.Namespace) -> int:
    client = cs.connect(args.address)
    if args.action == "list":
        rows = sorted(client.list_jobs(), key=lambda j: j.start_time or 0)
        print(f"{'SUBMISSION ID':<28} {'STATUS':<10} ENTRYPOINT")
        for j in rows:
            print(f"{j.submission_id or j.job_id:<28} {str(j.status).split('.')[-1]:<10} {j.entrypoint}")
        return 0
    if not args.job_id:
        raise RagtuneError(f"ragtune jobs {args.action} needs a job id. Fix: see `ragtune jobs list`")
    if args.action == "status":
        info = client.get_job_info(args.job_id)
        why = (info.message or "").strip().splitlines()[:1]
        print(f"{args.job_id} {str(info.status).split('.')[-1]}" + (f": {why[0]}" if why else ""))
        return 0
    if args.action == "logs":
        if args.follow:
            return _follow(client, args.job_id)
        print(client.get_job_logs(args.job_id), end="")
        return 0
    stopped = client.stop_job(args.job_id)
    print(f"{args.job_id}: {'stop requested' if stopped else 'not running'}")
    return 0
