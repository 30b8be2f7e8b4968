"""Schema of `ragtune embed`: corpus -> chunks -> embedding shards."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from configs.schema.base import Section
from configs.schema.cluster import ClusterConfig


class CorpusConfig(Section):
    """The documents to embed."""

    path: str | list[str] = Field(
        description="JSONL, Parquet or a folder of .txt/.md files (or a list); local path or URI (s3://, gs://)",
        json_schema_extra={"storage": "input"},
    )
    text_field: str = Field("text", description="column holding the document text (required in every record)")
    id_field: str | None = Field("id", description="column holding the document id; missing ids come from the "
                                                   "content; null = ids from the content on purpose")
    title_field: str = Field("title", description="column holding the title, prepended to every chunk")

    @field_validator("path")
    @classmethod
    def _non_empty(cls, v: str | list[str]) -> str | list[str]:
        paths = [v] if isinstance(v, str) else v
        if not paths or any(not p.strip() for p in paths):
            raise ValueError("empty corpus path. Fix: give a file, a folder or a URI")
        return v


class ChunkConfig(Section):
    """Token-aware windows cut with the embedding model's own tokenizer."""

    size: int | None = Field(
        None, ge=8,
        description="tokens per chunk including the title, without special tokens; null = the model's maximum",
    )
    overlap: int = Field(32, ge=0, description="tokens shared by consecutive chunks of a document")
    prepend_title: bool = Field(True, description="put the document title in front of every chunk")

    @model_validator(mode="after")
    def _overlap_below_size(self) -> ChunkConfig:
        if self.size is not None and self.overlap >= self.size:
            raise ValueError(
                f"chunk.overlap ({self.overlap}) must be smaller than chunk.size ({self.size}). "
                f"Fix: set chunk.overlap below {self.size}, e.g. {self.size // 8}"
            )
        return self


class EmbedderConfig(Section):
    """The embedding model and how its actors are placed."""

    model: str = Field(
        "all-MiniLM-L6-v2",
        description="bundled alias all-MiniLM-L6-v2, a local sentence-transformers folder, or a hub id",
    )
    metric: Literal["inner_product", "l2"] = Field(
        "inner_product", description="inner_product normalises vectors (cosine); l2 keeps them raw"
    )
    batch_size: int | None = Field(
        None, ge=1, le=65536, description="texts per forward pass; null = 64 on CPU, 256 on GPU"
    )
    actors: int | None = Field(None, ge=1, description="embedding actors; null = one per GPU, else per node")
    threads_per_actor: int | None = Field(
        None, ge=1, description="torch threads (and CPUs reserved) per CPU actor; null = the node's cores"
    )
    device: Literal["auto", "cpu", "gpu"] = Field("auto", description="auto = GPU actors when the cluster has GPUs")
    fp16: bool | None = Field(None, description="half precision on GPU; null = on for GPU, off for CPU")

    @property
    def normalize(self) -> bool:
        return self.metric == "inner_product"


class OutputConfig(Section):
    """Where embedding parts go."""

    path: str = Field(description="output folder or URI for part-XXXXX.parquet and _manifest.json",
                      json_schema_extra={"storage": "output"})
    num_parts: int | None = Field(
        None, ge=1, le=100000,
        description="about this many parts (cut at line, row group or file boundaries), fixed at the first run; "
                    "null = ~part_size_mb each and at least 8 per actor",
    )
    part_size_mb: float = Field(64.0, gt=0, description="target input text per part (MiB) when num_parts is null")
    overwrite: bool = Field(False, description="delete embeddings already in output.path made differently")


class EmbedJobConfig(Section):
    """`ragtune embed -c FILE`."""

    corpus: CorpusConfig
    chunk: ChunkConfig = Field(default_factory=ChunkConfig)
    embed: EmbedderConfig = Field(default_factory=EmbedderConfig)
    output: OutputConfig
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
