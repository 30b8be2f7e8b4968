"""Where a job runs: an embedded local Ray or an existing cluster."""

from __future__ import annotations

from pydantic import Field

from configs.schema.base import Section


class ClusterConfig(Section):
    """Ray connection. No address (and no RAY_ADDRESS) starts an embedded local Ray sized to this machine."""

    address: str | None = Field(
        None, description="Ray address (auto, HOST:6379, ray://HOST:10001); null = RAY_ADDRESS or local Ray"
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the local Ray; null = all of this machine")
    num_gpus: int | None = Field(None, ge=0, description="GPUs of the local Ray; null = all detected")
    object_store_memory_gb: float | None = Field(
        None, gt=0, description="object store of the local Ray in GiB; null = Ray's default"
    )
