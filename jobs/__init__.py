"""ragtune's jobs, one file each, and the `ragtune` command line (jobs/cli.py)."""
