"""ragtune's jobs, one file each, read top to bottom as named phases; the `ragtune` command line (``jobs.cli``,
with its table of jobs in ``jobs.commands``); and the pieces beside the jobs that only jobs use (the comparison's
questions, scores, results and report; progress lines; charts). The top floor: nothing imports it
(docs/layout.md)."""
