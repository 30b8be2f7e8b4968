"""Schema of `ragtune index`: embedding parts -> sharded FAISS index + docstore, one new version per build."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator

from configs.schema.base import Section
from configs.schema.cluster import ClusterConfig

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
MAX_NODES = 4096  # index.max_nodes at most: each node holds one shard at least, and index.shards is at most 4096
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value: str | int) -> int:
    """``"4GiB"`` -> 4294967296; ``"512MB"`` -> 512000000; a plain number is bytes. Raises ValueError."""
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"{value} bytes is not a memory size. Fix: give a positive size such as 4GiB")
        return value
    m = _SIZE.match(value)
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _UNITS:
        raise ValueError(f"{value!r} is not a memory size. Fix: write a number and a unit, e.g. 4GiB, 512MiB, 16GB")
    n = int(float(m.group(1)) * _UNITS[unit])
    if n <= 0:
        raise ValueError(f"{value!r} is not a memory size. Fix: give a positive size such as 4GiB")
    return n


class EmbeddingsInput(Section):
    """The embedding parts to index."""

    path: str = Field(description="folder or URI written by `ragtune embed` (part-*.parquet + _manifest.json)",
                      json_schema_extra={"storage": "input"})


class LexicalConfig(Section):
    """The BM25 index built beside the vector index (same shards, same chunk ids) for lexical and hybrid search."""

    enabled: bool = Field(True, description="build the BM25 shards (cheap next to the vectors); false = dense only")
    method: Literal["lucene", "robertson", "atire"] = Field("lucene", description="BM25 variant (bm25s' names)")
    k1: float = Field(1.5, gt=0, le=10, description="BM25 term-frequency saturation")
    b: float = Field(0.75, ge=0, le=1, description="BM25 length normalisation (0 = none, 1 = full)")
    stopwords: str | None = Field("english", description="stopword list removed from chunks and queries; null = none")
    stemmer: str | None = Field("english", description="Snowball stemmer (PyStemmer) applied to tokens; null = none")


class IndexConfig(Section):
    """What to build and where."""

    path: str = Field(description="index folder or URI; each build writes <path>/v-NNNNN/ and switches <path>/LATEST",
                      json_schema_extra={"storage": "output"})
    kind: str = Field(
        "auto",
        description="auto (Flat/HNSW/IVF-Flat/IVF-PQ from size, dimension and memory) or a FAISS factory string",
    )
    max_memory: str | int = Field(
        "4GiB", description="RAM one node may spend on the index (e.g. 4GiB); auto picks what fits, planning IVF-PQ "
        "across nodes when no index fits one"
    )
    max_nodes: int | Literal["auto"] = Field(
        "auto", description="nodes auto may spread a more exact index over when one node would hold only lossy PQ "
        "codes (recall below the target): auto = the Ray cluster's alive nodes when the job runs, or a number; 1 = "
        "one node unless nothing fits it"
    )
    max_gpu_memory: str | int | None = Field(
        None, description="memory per GPU for one shard when building on GPU; null = 80% of the device's memory"
    )
    shards: int | None = Field(
        None, ge=1, le=4096, description="index shards built in parallel; null = one per 2M vectors (and per GPU)"
    )
    train_sample: int | None = Field(
        None, ge=1000, description="vectors to train IVF/PQ on; null = 50 per IVF list (>= 10,000 for PQ), at most nb"
    )
    coarse_training: Literal["auto", "kmeans", "two_level"] = Field(
        "auto", description="how an IVF's coarse quantizer is trained: kmeans (faiss's own, over every list), "
        "two_level (sqrt(nlist) clusters, each split: about sqrt(nlist)/5 times less work), auto = "
        "two_level from 4096 lists up on CPUs, kmeans otherwise (and on GPUs)"
    )
    target_recall: float = Field(
        0.95, gt=0, le=1, description="recall@10 vs exact search that the tuned nprobe/efSearch must reach"
    )
    tune_queries: int = Field(
        1000, ge=10, le=100_000, description="held-out vectors used as queries to measure recall and tune"
    )
    tune_queries_path: str | None = Field(
        None, description="real queries to tune on instead of held-out vectors (BEIR queries.jsonl or one per line)"
    )
    exact_below: int = Field(10_000, ge=0, description="auto: exact Flat search below this many vectors")
    device: Literal["auto", "cpu", "gpu"] = Field(
        "auto", description="auto = train and add on GPUs when the cluster has them (IVF kinds)"
    )
    seed: int = Field(0, description="seed of the training and tuning samples")
    lexical: LexicalConfig = Field(default_factory=LexicalConfig, description="the BM25 index beside the vectors")
    keep_versions: int | None = Field(
        None, ge=1, description="after each write (build, add, delete, compact) garbage-collect all but the N newest "
        "versions (never LATEST, a leased one, or one superseded within the grace period); null = keep all"
    )

    @field_validator("kind")
    @classmethod
    def _kind(cls, v: str) -> str:
        v = v.strip()
        if not v:
            raise ValueError("empty index kind. Fix: write auto, or a FAISS factory string such as HNSW32 or "
                             "IVF1024,Flat")
        return v

    @field_validator("max_nodes", mode="before")
    @classmethod
    def _max_nodes(cls, v: object) -> object:
        if isinstance(v, str) and v.strip().lower() == "auto":
            return "auto"
        if isinstance(v, str) and v.strip().isdigit():  # "4" from JSON or an environment
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_NODES:
            raise ValueError(f"{v!r} is not a node count. Fix: write auto (the Ray cluster's alive nodes when the job "
                             f"runs) or a whole number from 1 to {MAX_NODES} (1 = plan for one node)")
        return v

    @field_validator("max_memory", "max_gpu_memory")
    @classmethod
    def _size(cls, v: str | int | None) -> str | int | None:
        if v is not None:
            parse_bytes(v)
        return v

    @property
    def max_memory_bytes(self) -> int:
        return parse_bytes(self.max_memory)

    @property
    def max_gpu_memory_bytes(self) -> int | None:
        return None if self.max_gpu_memory is None else parse_bytes(self.max_gpu_memory)


class IndexJobConfig(Section):
    """`ragtune index -c FILE`."""

    embeddings: EmbeddingsInput
    index: IndexConfig
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
