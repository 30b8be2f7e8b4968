"""Config values (YAML, one folder per job) and their typed schemas (`configs.schema`)."""

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent
