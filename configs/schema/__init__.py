"""Typed schemas of every job config, one module per concern, and the one loader they share."""

from __future__ import annotations

from pydantic import BaseModel

from configs.schema.base import ConfigError, Problem, Section, load_config, validate
from configs.schema.cluster import ClusterConfig
from configs.schema.compare import CompareJobConfig
from configs.schema.demo import DemoJobConfig
from configs.schema.embed import EmbedJobConfig
from configs.schema.finetune import FinetuneJobConfig
from configs.schema.index import IndexJobConfig
from configs.schema.serve import ServeJobConfig

# Which schema a config file follows, by job name (also the name of its folder under configs/).
JOB_SCHEMAS: dict[str, type[BaseModel]] = {
    "embed": EmbedJobConfig,
    "index": IndexJobConfig,
    "finetune": FinetuneJobConfig,
    "serve": ServeJobConfig,
    "compare": CompareJobConfig,
    "demo": DemoJobConfig,
}

__all__ = [
    "JOB_SCHEMAS",
    "ClusterConfig",
    "CompareJobConfig",
    "ConfigError",
    "DemoJobConfig",
    "EmbedJobConfig",
    "FinetuneJobConfig",
    "IndexJobConfig",
    "Problem",
    "Section",
    "ServeJobConfig",
    "load_config",
    "validate",
]
