"""`ragtune`: one console script, one table of subcommands.

    ragtune embed -c configs/embed/sample.yaml [section.field=value ...] [--address ADDR]
    ragtune validate configs/embed/sample.yaml [more files] [--job embed] [--schema-only]
    ragtune search -i INDEX "query text" [-k 10]
    ragtune eval-retrieval -i INDEX --queries queries.jsonl --qrels qrels.tsv
    ragtune submit --address http://HEAD:8265 [--wait] -- embed -c configs/embed/sample.yaml [overrides]
    ragtune jobs list|status|logs|stop [ID] --address http://HEAD:8265
    ragtune serve -c configs/serve/sample.yaml [--print-serve-config]
    ragtune ask "question" [--url http://127.0.0.1:8000] [--config configs/serve/sample.yaml]
    ragtune compare -c configs/compare/squad-slice.yaml
    ragtune demo [-c configs/demo/default.yaml] [overrides]
    ragtune index add|delete|compact|gc|history -i INDEX ...    (freshness: docs/index.md)

Every config job also runs as ``python -m jobs.<name> --config FILE [overrides]`` (what ``ray job submit``
calls). ``ragtune --help`` and ``ragtune validate`` import neither torch nor Ray.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from configs import CONFIG_DIR
from configs.schema import JOB_SCHEMAS, ConfigError, RagtuneError, load_config
from jobs import ask as ask_cli
from jobs import search as search_cli
from jobs import submit as submit_cli

log = logging.getLogger("ragtune")


@dataclass(frozen=True)
class Job:
    """A config-driven job: its module has ``run(cfg)``, which returns a summary dataclass with ``line()``, and
    may have ``check(cfg)`` (preflight without Ray or torch, which ``ragtune validate`` also runs)."""

    help: str
    module: str
    # boolean command-line flags that are shorthands for a config override
    flags: dict[str, tuple[str, str]] = field(default_factory=dict)
    epilog: str | None = None
    default_config: str | None = None  # a packaged config used when -c is not given


JOBS: dict[str, Job] = {
    "embed": Job("embed a corpus into embedding parts on Ray Data", "jobs.embed",
                 {"--overwrite": ("output.overwrite=true", "replace embeddings in output.path made differently")}),
    "index": Job("build a sharded FAISS index (a new version) from embedding parts", "jobs.index",
                 epilog="also: ragtune index add|delete|compact|gc|history -i INDEX ... (`ragtune index add -h`): "
                        "change an index without rebuilding it"),
    "finetune": Job("fine-tune a causal LM with LoRA on Ray Train + DeepSpeed ZeRO", "jobs.finetune"),
    "compare": Job("measure base vs fine-tuned vs RAG vs RAFT on the same questions", "jobs.compare"),
    "demo": Job("the whole comparison on a fictional world, on a local Ray (about 8 minutes on a laptop)",
                "jobs.demo", default_config=str(CONFIG_DIR / "demo" / "default.yaml")),
    "serve": Job("serve RAG on Ray Serve behind an OpenAI-compatible API (until Ctrl-C)", "jobs.serve",
                 {"--print-serve-config": ("serve.print_config=true",
                                           "print the Serve config YAML (KubeRay RayService) and exit")}),
}


def _add_job_parser(sub: argparse._SubParsersAction, name: str, job: Job) -> None:
    p = sub.add_parser(name, help=job.help, description=job.help, epilog=job.epilog)
    if job.default_config:
        p.add_argument("-c", "--config", default=job.default_config,
                       help=f"YAML config (default {Path(job.default_config).relative_to(CONFIG_DIR.parent)})")
    else:
        p.add_argument("-c", "--config", required=True, help=f"YAML config, e.g. configs/{name}/sample.yaml")
    p.add_argument("overrides", nargs="*", metavar="section.field=value",
                   help="dotted overrides of config values, e.g. embed.batch_size=128")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    for flag, (_, text) in job.flags.items():
        p.add_argument(flag, action="store_true", help=text)
    p.set_defaults(job=name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ragtune", description="Fine-tuning and RAG, side by side, on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, job in JOBS.items():
        _add_job_parser(sub, name, job)
    v = sub.add_parser("validate", help="check config files and report every problem at once")
    v.add_argument("files", nargs="+", help="YAML config files")
    v.add_argument("--job", choices=sorted(JOB_SCHEMAS), help="the job a file configures (default: its folder)")
    v.add_argument("--schema-only", action="store_true",
                   help="check the values only, not the inputs they point at (corpus files, models)")
    search_cli.add_parsers(sub)  # search, eval-retrieval: they read an index, not a config
    submit_cli.add_parsers(sub)  # submit, jobs: send a job to a cluster's job server
    ask_cli.add_parsers(sub)  # ask: a question to a running `ragtune serve` (or in-process)
    return parser


def job_of(path: str, explicit: str | None) -> str:
    """Which job a config file is for: --job, else the name of its folder (configs/<job>/x.yaml)."""
    if explicit:
        return explicit
    folder = Path(path).resolve().parent.name
    if folder in JOB_SCHEMAS:
        return folder
    raise RagtuneError(f"{path}: cannot tell which job this config is for (folder {folder!r}). "
                       f"Fix: pass --job, one of {', '.join(sorted(JOB_SCHEMAS))}")


def validate_files(files: Sequence[str], job: str | None = None, schema_only: bool = False) -> int:
    failures = 0
    for path in files:
        try:
            name = job_of(path, job)
            cfg = load_config(JOB_SCHEMAS[name], path)
            module = importlib.import_module(JOBS[name].module) if name in JOBS else None
            if not schema_only and module is not None and hasattr(module, "check"):
                module.check(cfg)
            print(f"ok: {path} ({name})")
        except RagtuneError as e:
            failures += 1
            print(f"{e}" if isinstance(e, ConfigError) else f"{path}: {e}")
    return 1 if failures else 0


def job_overrides(name: str, args: argparse.Namespace) -> list[str]:
    """The dotted overrides a job's command line amounts to: the explicit ones, then --address and flags."""
    overrides = list(args.overrides)
    if args.address:
        overrides.append(f"cluster.address={args.address}")
    for flag, (override, _) in JOBS[name].flags.items():
        if getattr(args, flag.lstrip("-").replace("-", "_")):
            overrides.append(override)
    return overrides


def run_job(name: str, args: argparse.Namespace) -> int:
    job = JOBS[name]
    cfg = load_config(JOB_SCHEMAS[name], args.config, job_overrides(name, args))
    summary = importlib.import_module(job.module).run(cfg)
    if summary is None:  # the job printed its own output (e.g. serve --print-serve-config)
        return 0
    print(summary.line())
    print(json.dumps(dataclasses.asdict(summary)))  # the last line: machine-readable
    return 0


def user_error(e: BaseException) -> RagtuneError | None:
    """The RagtuneError behind an exception, looking through Ray's wrappers (task errors, user code errors)."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        cause = getattr(cur, "cause", None)  # ray.exceptions.RayTaskError keeps the original exception here
        if isinstance(cause, RagtuneError):
            return cause
        if isinstance(cur, RagtuneError) and cause is None:
            return cur
        cur = cause if isinstance(cause, BaseException) else (cur.__cause__ or cur.__context__)
    return None


INDEX_OPS = ("add", "delete", "compact", "gc", "history")  # `ragtune index <op>`: jobs.freshness.ops_main


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    index_op = len(argv) > 1 and argv[0] == "index" and argv[1] in INDEX_OPS
    args = None if index_op else build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args is None:
            from jobs.freshness import ops_main

            return ops_main(argv[1:])
        if args.command == "validate":
            return validate_files(args.files, args.job, args.schema_only)
        if hasattr(args, "func"):
            return int(args.func(args))
        return run_job(args.job, args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        err = user_error(e)
        if err is None:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2


def module_main(job: str) -> None:
    """``python -m jobs.<job> --config FILE [overrides]``: the same as ``ragtune <job>``."""
    sys.exit(main([job, *sys.argv[1:]]))


if __name__ == "__main__":
    sys.exit(main())
