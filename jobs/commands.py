"""The command table of ``ragtune``: the config-driven jobs, their parsers and overrides, and how a command ends.

Nothing here imports a job, so every job can use it for its own ``python -m jobs.<name>`` entry (what
``ray job submit`` calls) and ``ragtune submit`` can parse the job it sends; ``jobs.cli`` imports the jobs and
puts the whole ``ragtune`` command together.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.runtime import stop_on_sigterm, stop_signal
from configs import CONFIG_DIR
from configs.errors import RagtuneError, redact, user_error
from configs.schema import JOB_SCHEMAS, load_config
from jobs import console
from sharding.freshness import COMPACT_MAX_DELTAS, COMPACT_THRESHOLD

log = logging.getLogger("ragtune")


@dataclass(frozen=True)
class Job:
    """A config-driven job: its module has ``run(cfg)``, which returns a summary dataclass with ``line()`` (or None
    when it printed its own output), and may have ``check(cfg)`` (preflight without Ray or torch, which
    ``ragtune validate`` also runs)."""

    help: str
    example: tuple[str, str]  # a packaged config (relative to the repository) and an override that config takes
    # boolean command-line flags that are shorthands for a config override
    flags: dict[str, tuple[str, str]] = field(default_factory=dict)
    epilog: str | None = None
    default_config: str | None = None  # a packaged config used when -c is not given


JOBS: dict[str, Job] = {
    "embed": Job("embed a corpus into embedding parts on Ray Data",
                 ("configs/embed/sample.yaml", "embed.batch_size=128"),
                 {"--overwrite": ("output.overwrite=true", "replace embeddings in output.path made differently")}),
    "index": Job("build a sharded FAISS index (a new version) from embedding parts",
                 ("configs/index/sample.yaml", "index.shards=4"),
                 epilog="also: ragtune index add|delete|compact|gc|history -i INDEX ... (`ragtune index add -h`): "
                        "change an index without rebuilding it"),
    "finetune": Job("fine-tune a causal LM with LoRA on Ray Train + DeepSpeed ZeRO",
                    ("configs/finetune/tiny.yaml", "train.steps=80"),
                    {"--plan": ("run.plan_only=true", "print the memory plan per worker and whether it fits the "
                                                      "cluster, then exit without training")}),
    "compare": Job("measure base vs fine-tuned vs RAG vs RAFT on the same questions",
                   ("configs/compare/squad-slice.yaml", "questions.max_eval=50")),
    "demo": Job("the whole comparison on a fictional world, on a local Ray (about 8 minutes on a laptop)",
                ("configs/demo/default.yaml", "world.people=60"),
                default_config=str(CONFIG_DIR / "demo" / "default.yaml")),
    "serve": Job("serve RAG on Ray Serve behind an OpenAI-compatible API (until Ctrl-C)",
                 ("configs/serve/sample.yaml", "http.port=8001"),
                 {"--print-serve-config": ("serve.print_config=true",
                                           "print the Serve config YAML (KubeRay RayService) and exit")}),
}

INDEX_OPS = ("add", "delete", "compact", "gc", "history")  # `ragtune index <op>`: jobs.freshness
ADD_RAY_ABOVE = 20_000  # chunks to embed above which an add uses the Ray Data embed job


# --- parsers ----------------------------------------------------------------------------------------------------

def add_job_parser(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    job = JOBS[name]
    p = sub.add_parser(name, help=job.help, description=job.help, epilog=job.epilog)
    if job.default_config:
        p.add_argument("-c", "--config", default=job.default_config,
                       help=f"YAML config (default {Path(job.default_config).relative_to(CONFIG_DIR.parent)})")
    else:
        p.add_argument("-c", "--config", required=True, help=f"YAML config, e.g. {job.example[0]}")
    p.add_argument("overrides", nargs="*", metavar="section.field=value",
                   help=f"dotted overrides of config values, e.g. {job.example[1]}")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="show Ray's and the libraries' output here too (also RAGTUNE_LOG_LEVEL=DEBUG|INFO), "
                        "instead of only in the run's log file")
    for flag, (_, text) in job.flags.items():
        p.add_argument(flag, action="store_true", help=text)
    p.set_defaults(job=name)
    return p


def job_parser(prog: str = "ragtune") -> argparse.ArgumentParser:
    """A parser of the config jobs alone: ``JOB -c CONFIG [overrides]`` (what ``ragtune submit`` sends)."""
    parser = argparse.ArgumentParser(prog=prog)
    sub = parser.add_subparsers(dest="command", required=True, metavar="JOB")
    for name in JOBS:
        add_job_parser(sub, name)
    return parser


def job_overrides(name: str, args: argparse.Namespace) -> list[str]:
    """The dotted overrides a job's command line amounts to: the explicit ones, then --address and flags."""
    overrides = list(args.overrides)
    if args.address:
        overrides.append(f"cluster.address={args.address}")
    for flag, (override, _) in JOBS[name].flags.items():
        if getattr(args, flag.lstrip("-").replace("-", "_")):
            overrides.append(override)
    return overrides


def job_of(path: str, explicit: str | None) -> str:
    """Which job a config file is for: --job, else the name of its folder (configs/<job>/x.yaml)."""
    if explicit:
        return explicit
    folder = Path(path).resolve().parent.name
    if folder in JOB_SCHEMAS:
        return folder
    raise RagtuneError(f"{path}: cannot tell which job this config is for (folder {folder!r}). "
                       f"Fix: pass --job, one of {', '.join(sorted(JOB_SCHEMAS))}")


def index_ops_parser() -> argparse.ArgumentParser:
    """The parser of ``ragtune index <op>`` (``jobs.freshness.ops_main``)."""
    parser = argparse.ArgumentParser(prog="ragtune index", description="Change an index without rebuilding it: "
                                     "each operation writes a new version and switches LATEST (docs/index.md).")
    sub = parser.add_subparsers(dest="op", required=True, metavar="OP")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-i", "--index", required=True, help="the index root (the folder that holds LATEST)")
    writes = argparse.ArgumentParser(add_help=False)
    writes.add_argument("--gc-keep", type=int, metavar="N",
                        help="then garbage-collect all but the N newest versions (default: index.keep_versions)")
    a = sub.add_parser("add", parents=[common, writes], help="add new and changed documents (a new version)")
    a.add_argument("-v", "--verbose", action="store_true",
                   help="show Ray's and the libraries' output here instead of in the log beside the index")
    src = a.add_mutually_exclusive_group(required=True)
    src.add_argument("--corpus", nargs="+", metavar="PATH", help="new documents: JSONL, Parquet, text files, URIs")
    src.add_argument("--embeddings", metavar="DIR", help="or embedding parts by `ragtune embed` (same model, chunker)")
    a.add_argument("--text-field", help="corpus field with the text (default: as the index's embed job read it)")
    a.add_argument("--id-field", help="corpus field with the document id (default: as the embed job)")
    a.add_argument("--title-field", help="corpus field with the title (default: as the embed job)")
    a.add_argument("--ray-above", type=int, default=ADD_RAY_ABOVE, metavar="N",
                   help=f"embed on Ray Data (the embed job) above N chunks, else in this process "
                        f"(default {ADD_RAY_ABOVE:,})")
    a.add_argument("--batch-size", type=int, default=64, help="texts per forward pass when embedding here")
    a.add_argument("--segment-size", type=int, metavar="N",
                   help="chunks per delta segment: the add writes ceil(chunks / N) segments (default: a base "
                        "shard's mean size, so a small add is one segment)")
    a.add_argument("--address", help="Ray cluster for large adds (default: RAY_ADDRESS, else a local Ray)")
    d = sub.add_parser("delete", parents=[common, writes], help="delete documents (masked by tombstones)")
    what = d.add_mutually_exclusive_group(required=True)
    what.add_argument("--doc-id", nargs="+", metavar="ID", help="documents to delete")
    what.add_argument("--where", action="append", metavar="FILTER",
                      help="documents whose chunks match: field=value[,value] or a JSON object (repeat: AND)")
    c = sub.add_parser("compact", parents=[common, writes], help="fold deltas and tombstones into the shards")
    c.add_argument("--force", action="store_true", help="compact every shard, whatever the thresholds")
    c.add_argument("--threshold", type=float, default=COMPACT_THRESHOLD,
                   help=f"compact shards whose delta + masked vectors exceed this share of the base (default "
                        f"{COMPACT_THRESHOLD})")
    c.add_argument("--max-deltas", type=int, default=COMPACT_MAX_DELTAS,
                   help=f"... or that have more deltas than this (default {COMPACT_MAX_DELTAS})")
    c.add_argument("--check-recall", action="store_true",
                   help="re-measure recall@10 as at build time; below the target, compact (and re-tune) every shard")
    g = sub.add_parser("gc", parents=[common], help="delete old versions (never LATEST or a leased one)")
    g.add_argument("--keep", type=int, default=3, help="complete versions to keep, newest first (default 3)")
    g.add_argument("--grace", type=float, default=None, metavar="SECONDS",
                   help="also keep versions superseded less than this ago (default 600)")
    g.add_argument("--dry-run", action="store_true", help="say what would be deleted, delete nothing")
    h = sub.add_parser("history", parents=[common], help="the versions: operation, counts, times, state")
    h.set_defaults(op="history")
    return parser


# --- running a command ------------------------------------------------------------------------------------------

def print_summary(summary: Any) -> None:
    """A job's summary line, then its JSON (the last line: machine-readable)."""
    console.out(redact(summary.line()))  # a summary names its paths and URIs, never their credentials
    console.out(redact(json.dumps(dataclasses.asdict(summary))))


# a server's log is its output: `ragtune serve` keeps every line on the terminal
NO_CONSOLE = ("serve",)


def run_config_job(name: str, run: Callable[[Any], Any], args: argparse.Namespace) -> int:
    """Load the job's config with the command line's overrides, run it in a console session (ragtune's lines and
    progress on the terminal, the rest in the run's log file: ``jobs.console``), print its summary."""
    cfg = load_config(JOB_SCHEMAS[name], args.config, job_overrides(name, args))
    verbose = getattr(args, "verbose", False) or name in NO_CONSOLE
    with console.session(name, console.output_of(cfg), verbose=verbose):
        summary = run(cfg)
        if summary is not None:  # None: the job printed its own output (e.g. serve --print-serve-config)
            print_summary(summary)
    return 0


def guarded(command: Callable[[], int]) -> int:
    """Run a command the way every ``ragtune`` command ends: a RagtuneError (also inside Ray's wrappers) is one
    paragraph on stderr (with the last lines of the run's log and its path, ``console.failure``) and exit status
    2, Ctrl-C is 130 and SIGTERM 143 (128 + the signal; ``ragtune serve`` returns 0 itself after draining),
    anything else a traceback (after the log's path)."""
    logging.basicConfig(level=console.log_level(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    console.last_log = None
    stop_on_sigterm()  # until a job's ray.init sets Ray's handler, which init_ray replaces with this one again
    try:
        return command()
    except KeyboardInterrupt as e:  # Ctrl-C, or cluster.runtime.Stopped (SIGTERM)
        signum = stop_signal(e)
        print(f"interrupted ({signal.Signals(signum).name})", file=sys.stderr)
        return 128 + signum
    except Exception as e:
        err = user_error(e)
        if err is None:
            if console.last_log is not None:  # the traceback follows
                print(f"the log of this run: {console.last_log}", file=sys.stderr)
            raise
        print(console.failure(str(err)), file=sys.stderr)
        return 2


def job_main(name: str, run: Callable[[Any], Any], argv: Sequence[str] | None = None) -> None:
    """``python -m jobs.<name> --config FILE [overrides]``: the same as ``ragtune <name>``."""
    parser = argparse.ArgumentParser(prog=f"python -m jobs.{name}")
    sub = parser.add_subparsers(dest="command", required=True)
    add_job_parser(sub, name)
    args = parser.parse_args([name, *(sys.argv[1:] if argv is None else argv)])
    sys.exit(guarded(lambda: run_config_job(name, run, args)))
