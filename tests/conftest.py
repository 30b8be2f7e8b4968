"""Shared fixtures: one local Ray per session, the bundled embedder, and the real data in ../shared."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("RAGTUNE_SHARED", REPO.parent / "shared"))
SQUAD_RETRIEVAL = SHARED / "data" / "squad" / "retrieval-v1.1"

# DeepSpeed compiles its ops once; keep them where every test run (and CI) finds them again.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "ragtune" / "torch_extensions"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if not has_gpu:
        skip = pytest.mark.skip(reason="needs a CUDA GPU; this machine has none")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def squad_retrieval() -> Path:
    """The BEIR-style SQuAD v1.1 view (corpus, queries, qrels) from ../shared/data."""
    if not (SQUAD_RETRIEVAL / "corpus.jsonl").is_file():
        pytest.skip(f"real data not found at {SQUAD_RETRIEVAL} (set RAGTUNE_SHARED to the shared/ folder)")
    return SQUAD_RETRIEVAL


@pytest.fixture(scope="session")
def minilm():
    """The bundled all-MiniLM-L6-v2: (spec, fast tokenizer)."""
    from models.embedders import load_tokenizer, resolve_embedder

    spec = resolve_embedder("all-MiniLM-L6-v2")
    return spec, load_tokenizer(spec.path)


@pytest.fixture(scope="session")
def ray_2_cpus():
    """One local Ray for the whole session (starting one costs seconds)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def squad_embeddings(ray_2_cpus, squad_retrieval, tmp_path_factory):
    """The whole SQuAD v1.1 paragraph corpus embedded once per session by the embed job.

    Chunks are as long as the model allows (254 tokens + 2 special), so nearly every paragraph is one chunk,
    as in the retrieval reference numbers of FACTS.md. Returns (config, summary, output folder).
    """
    from configs.schema import EmbedJobConfig
    from jobs.embed import run

    out = tmp_path_factory.mktemp("squad") / "embeddings"
    cfg = EmbedJobConfig.model_validate({
        "corpus": {"path": str(squad_retrieval / "corpus.jsonl"), "id_field": "_id"},
        "chunk": {"size": None, "overlap": 32},
        "output": {"path": str(out), "num_parts": 4},
    })
    return cfg, run(cfg), out


@pytest.fixture(scope="session")
def squad_flat_index(squad_embeddings, tmp_path_factory):
    """The session's SQuAD chunks in an exact (Flat) index of 2 shards with its BM25 shards, built once by the index
    job: (root, summary). Its version is v-00001; a test may build later versions on the same root, so the others
    open v-00001 by name."""
    from configs.schema import IndexJobConfig
    from jobs.index import run

    _, _, emb = squad_embeddings
    root = tmp_path_factory.mktemp("squad-index") / "index"
    return root, run(IndexJobConfig.model_validate({"embeddings": {"path": str(emb)},
                                                    "index": {"path": str(root), "kind": "Flat", "shards": 2}}))


@pytest.fixture(scope="session")
def squad_queries(squad_flat_index, squad_retrieval):
    """Every SQuAD question that has qrels, embedded once with the index's model: (qids, xq, qrels)."""
    from models.embedders import QueryEncoder
    from sharding.metrics import read_qrels, read_queries
    from sharding.search import ShardedIndex

    root, summary = squad_flat_index
    queries = read_queries(squad_retrieval / "queries.jsonl")
    qrels = read_qrels(squad_retrieval / "qrels" / "test.tsv")
    qids = [q for q in queries if q in qrels]
    xq = QueryEncoder(ShardedIndex.open(str(root / summary.version)).manifest).encode([queries[q] for q in qids])
    return qids, xq, qrels


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """The tiny preset built once per session (a tokenizer trained on a few fictional facts)."""
    from models.generators import TinySpec, build_tiny

    texts = [f"What is the capital of Zal{i}? Ophir{i % 7}. Where was Ana born? In Ophir." for i in range(300)]
    return str(build_tiny(tmp_path_factory.mktemp("tiny") / "tiny", texts, TinySpec()))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from models.generators import load_tokenizer

    return load_tokenizer(tiny_model_dir)
