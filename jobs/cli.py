"""`ragtune`: one console script, one table of subcommands.

    ragtune embed -c configs/embed/sample.yaml [section.field=value ...] [--address ADDR] [-v]
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
calls). The table of jobs, their parsers and overrides are ``jobs.commands`` (which imports no job); this module
imports the jobs and puts the command together. ``ragtune --help`` and ``ragtune validate`` import neither torch
nor Ray: no job module imports them when it is imported.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from configs.errors import user_error
from configs.schema import JOB_SCHEMAS, ConfigError, load_config
from jobs import ask, compare, demo, embed, finetune, freshness, index, search, serve, submit
from jobs.commands import INDEX_OPS, JOBS, add_job_parser, guarded, job_of, run_config_job

RUN: dict[str, Callable[[Any], Any]] = {"embed": embed.run, "index": index.run, "finetune": finetune.command,
                                        "compare": compare.run, "demo": demo.run, "serve": serve.run}
CHECK: dict[str, Callable[[Any], Any]] = {"embed": embed.check, "index": index.check, "finetune": finetune.check,
                                          "compare": compare.check, "serve": serve.check}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ragtune", description="Fine-tuning and RAG, side by side, on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in JOBS:
        add_job_parser(sub, name)
    v = sub.add_parser("validate", help="check config files and report every problem at once")
    v.add_argument("files", nargs="+", help="YAML config files")
    v.add_argument("--job", choices=sorted(JOB_SCHEMAS), help="the job a file configures (default: its folder)")
    v.add_argument("--schema-only", action="store_true",
                   help="check the values only, not the inputs they point at (corpus files, models)")
    search.add_parsers(sub)  # search, eval-retrieval: they read an index, not a config
    submit.add_parsers(sub)  # submit, jobs: send a job to a cluster's job server
    ask.add_parsers(sub)  # ask: a question to a running `ragtune serve` (or in-process)
    return parser


def validate_files(files: Sequence[str], job: str | None = None, schema_only: bool = False) -> int:
    failures = 0
    for path in files:
        try:
            name = job_of(path, job)
            cfg = load_config(JOB_SCHEMAS[name], path)
            if not schema_only and name in CHECK:
                CHECK[name](cfg)
            print(f"ok: {path} ({name})")
        except Exception as e:  # every file is checked and reported, also one whose storage cannot be reached
            err = user_error(e)
            if err is None:
                raise
            failures += 1
            print(f"{err}" if isinstance(err, ConfigError) else f"{path}: {err}")
    return 1 if failures else 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) > 1 and argv[0] == "index" and argv[1] in INDEX_OPS:  # ragtune index add|delete|...
        return guarded(lambda: freshness.ops_main(argv[1:]))
    args = build_parser().parse_args(argv)
    if args.command == "validate":
        return guarded(lambda: validate_files(args.files, args.job, args.schema_only))
    if hasattr(args, "func"):
        return guarded(lambda: int(args.func(args)))
    return guarded(lambda: run_config_job(args.job, RUN[args.job], args))


if __name__ == "__main__":
    sys.exit(main())
