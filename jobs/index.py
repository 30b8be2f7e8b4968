"""`ragtune index`: embedding parts -> a sharded FAISS index + docstore, one new version per build (Ray tasks).

Laptop (embedded local Ray, no cluster needed)::

    ragtune embed -c configs/embed/sample.yaml && ragtune index -c configs/index/sample.yaml
    ragtune index -c configs/index/sample.yaml index.kind=HNSW32 index.shards=2

Cluster (paths must be storage every node sees: a URI or a shared mount)::

    ray job submit --working-dir . -- python -m jobs.index --config configs/index/squad.yaml

New knowledge without a rebuild (a new version each: jobs/freshness.py, docs/index.md "Freshness")::

    ragtune index add -i runs/beir/index --corpus new.jsonl      # new and changed documents, embedded here
    ragtune index delete -i runs/beir/index --doc-id sq00p000    # masked in every search mode
    ragtune index compact -i runs/beir/index && ragtune index gc -i runs/beir/index --keep 3

The flow, top to bottom:
1. check before any work: the embeddings are complete, the index kind (``auto``: chosen from the number of
   vectors, their dimension and ``index.max_memory``, with the reason printed) and the output folder;
2. join or start Ray, plan the tasks from the cluster (one GPU per task when there are GPUs, else the cores);
   ``auto`` is chosen again when the cluster changes it (GPUs found; ``index.max_nodes: auto``: the alive nodes
   a more exact index may be spread over);
3. one task samples training vectors and held-out query vectors, and trains the index once (GPU k-means when
   present); the trained, empty index goes to every shard task through the object store;
4. one task per shard reads its embedding rows, adds them with their chunk ids as FAISS ids, writes the shard
   and its docstore atomically, finds the exact neighbours of the held-out queries among its rows, and
   searches them with each candidate ``nprobe``/``efSearch``;
5. the driver merges those results across shards, measures recall@10 against exact search, keeps the cheapest
   setting that reaches ``index.target_recall``, writes the manifest and a recall-vs-QPS plot, and switches
   ``<index.path>/LATEST`` to the new version (readers of the old one keep working).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cluster.placement import IndexTaskPlan, plan_index_tasks
from cluster.runtime import alive_nodes, init_ray
from configs.errors import RagtuneError
from configs.schema import IndexJobConfig
from jobs import console
from jobs.commands import job_main
from jobs.plots import png, pyplot
from jobs.progress import Rate, ensure_logging
from models.embedders import EmbedderSpec, load_sentence_transformer
from sharding.choice import (
    ADD_BATCH,
    DOCSTORE_RANGE_BYTES,
    IndexChoice,
    choose_index,
    default_num_shards,
    explicit_choice,
    human_bytes,
    lexical_build_task_bytes,
    lexical_stats_task_bytes,
    row_bytes,
    shard_task_bytes,
    shards_for_memory,
    train_task_bytes,
)
from sharding.docstore import COLUMNS as DOCSTORE_COLUMNS
from sharding.docstore import write_docstore_sorted
from sharding.embeddings import (
    EmbedderRecord,
    EmbeddingManifest,
    PartRecord,
    check_finite,
    check_part_dims,
    read_manifest,
    vectors_from_arrow,
)
from sharding.faiss_index import (
    ShardBuilder,
    coarse_training,
    deserialize,
    effective_factory,
    index_layers,
    new_index,
    serialize,
    train_index,
    write_index_file,
)
from sharding.freshness import stats_of_all, with_stats
from sharding.layout import (
    DOCSTORE_DIR,
    MANIFEST,
    TRAINED,
    Piece,
    docstore_name,
    plan_shards,
    sample_rows,
    shard_name,
)
from sharding.lexical import (
    LEXICAL_DIR,
    CorpusStats,
    DocTerms,
    LexicalManifest,
    LexicalParams,
    LexicalRecord,
    chunk_texts,
    lexical_name,
    tokenizer,
    write_lexical_file,
)
from sharding.manifest import (
    BuildRecord,
    EmbeddingsRecord,
    HistoryEntry,
    IndexManifest,
    RecallRecord,
    ShardRecord,
    TrainedRecord,
    read_index_manifest,
    read_latest,
    switch_latest,
    write_index_manifest,
)
from sharding.search import merge_topk
from sharding.storage import Location, atomic_write_bytes, exists, makedirs, resolve, sha256_hex, sha256_of
from sharding.tuning import RECALL_K as K  # recall@K is what index.target_recall means
from sharding.tuning import (
    GroundTruth,
    TuneRow,
    candidate_params,
    drop_self,
    held_out_count,
    queries_per_second,
    recall_at_k,
    sample_query_texts,
    search_candidates,
    tune,
    tuning_table,
)
from sharding.versions import WriterLock, gc_versions, next_version

log = logging.getLogger("ragtune.index")
logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # four lines per process about CPU builds


# --- 1. checks before any work ------------------------------------------------------------------------------------

@dataclass
class Plan:
    """What preflight found: the embeddings, the index to build and where."""

    cfg: IndexJobConfig
    emb: Location
    embeddings: EmbeddingManifest
    parts: list[tuple[str, int]]  # (part file, rows) in part order
    nb: int
    d: int
    choice: IndexChoice
    root: Location
    max_nodes: int  # index.max_nodes as the choice used it (auto: the alive nodes; 1 before Ray is up)


def max_nodes_for(setting: int | str, alive: int | None) -> int:
    """``index.max_nodes`` as a number: ``auto`` is the Ray cluster's ``alive`` nodes (1 before Ray is up, or
    when none is known), a number is itself."""
    if setting == "auto":
        return max(1, alive or 1)
    return int(setting)


def check(cfg: IndexJobConfig, use_gpu: bool | None = None, cluster_nodes: int | None = None) -> Plan:
    """Everything that can fail before work starts, without Ray, torch or faiss. Raises RagtuneError.

    ``cluster_nodes``: the Ray cluster's alive nodes, once it is up (``index.max_nodes: auto`` plans for them)."""
    emb = resolve(cfg.embeddings.path)
    m = read_manifest(emb)
    if m is None:
        raise RagtuneError(f"embeddings.path = {cfg.embeddings.path!r} holds no _manifest.json. Fix: run `ragtune "
                           f"embed` with output.path {cfg.embeddings.path} first, or point embeddings.path at its "
                           "output")
    if m.state != "done" or m.dim is None:
        raise RagtuneError(f"embeddings at {emb.uri} are not complete (state {m.state!r}, {len(m.parts)}/"
                           f"{m.num_parts} parts). Fix: rerun the same `ragtune embed` command to finish them")
    check_part_dims(emb, m)
    parts = [(rec.file, rec.rows) for _, rec in sorted(m.parts.items())]
    nb = sum(rows for _, rows in parts)
    if nb == 0:
        raise RagtuneError(f"embeddings at {emb.uri} hold no vectors. Fix: embed a corpus with text")
    ix = cfg.index
    gpu = ix.device == "gpu" if use_gpu is None else use_gpu
    max_nodes = max_nodes_for(ix.max_nodes, cluster_nodes)
    if ix.kind.lower() == "auto":
        choice = choose_index(nb, m.dim, ix.max_memory_bytes, use_gpu=gpu, exact_below=ix.exact_below,
                              train_sample=ix.train_sample, max_nodes=max_nodes)
    else:
        choice = explicit_choice(ix.kind, nb, m.dim, ix.train_sample)
    if ix.tune_queries_path and not Path(ix.tune_queries_path).is_file():
        raise RagtuneError(f"index.tune_queries_path = {ix.tune_queries_path!r}: no such file. Fix: give a local BEIR "
                           "queries.jsonl or a text file with one query per line, or null to tune on held-out vectors")
    if ix.lexical.enabled:  # an unknown stemmer or a missing PyStemmer fails here, not after the FAISS build
        tokenizer(lexical_params(cfg))
    root = resolve(ix.path)
    if exists(root.join(MANIFEST)):
        raise RagtuneError(f"index.path = {ix.path!r} is an index version folder, not an index root. Fix: set "
                           "index.path to the folder that holds LATEST and the v-NNNNN folders")
    return Plan(cfg, emb, m, parts, nb, m.dim, choice, root, max_nodes)


def lexical_params(cfg: IndexJobConfig) -> LexicalParams:
    """index.lexical as the parameters stored in the manifest."""
    return LexicalParams(**cfg.index.lexical.model_dump(exclude={"enabled"}))


# --- 2. where and how: the tasks, the shards, the index string ----------------------------------------------------

@dataclass
class Layout:
    """How the build runs on this cluster."""

    plan: Plan  # preflight's, checked again when the GPUs found change the automatic choice
    tasks: IndexTaskPlan
    shards: list[list[Piece]]  # the embedding rows of each shard
    factory: str  # what faiss.index_factory builds
    needs_training: bool
    doc_row_bytes: int  # a docstore row decoded, from the parts' sizes (sharding.choice.row_bytes): tasks' memory=
    node_memory: float  # Ray memory of the smallest node (0: not known)

    @property
    def gpu(self) -> int | None:
        return 0 if self.tasks.use_gpu else None  # inside a task given one GPU, it is device 0

    @property
    def hardware(self) -> str:
        return "GPU" if self.tasks.use_gpu else f"CPU ({self.tasks.reason})"


def _layout(cfg: IndexJobConfig, plan: Plan) -> Layout:
    """Plan the tasks from the cluster (one GPU per task when there are GPUs, else the cores) and the shards."""
    import ray

    ix = cfg.index
    nodes = alive_nodes()
    use_gpu = plan_index_tasks(nodes, 1, ix.device).use_gpu
    gpu_memory = None
    if use_gpu:
        gpu_memory = ix.max_gpu_memory_bytes or int(0.8 * ray.get(ray.remote(num_gpus=1)(_gpu_memory).remote()))
    if use_gpu != (ix.device == "gpu") or max_nodes_for(ix.max_nodes, len(nodes)) != plan.max_nodes:
        plan = check(cfg, use_gpu=use_gpu, cluster_nodes=len(nodes))  # the choice depends on where it is built
    choice = plan.choice
    if ix.max_nodes == "auto" and ix.kind.lower() == "auto":
        log.info("index.max_nodes auto: the cluster has %d node(s) to spread the index over", plan.max_nodes)
    num_shards = ix.shards or choice.shards or default_num_shards(plan.nb, choice.est_bytes, gpu_memory)
    doc_row, part_row = row_bytes(sum(r.bytes for r in plan.embeddings.parts.values()), plan.nb, plan.d)
    node_memory = min((nd.memory for nd in nodes if nd.memory > 0), default=0)
    if node_memory and not ix.shards:  # shards small enough that a task takes at most half a node's memory
        num_shards = max(num_shards, shards_for_memory(choice.kind, choice.factory, plan.nb, plan.d,
                                                       int(node_memory // 2), doc_row_bytes=doc_row,
                                                       part_row_bytes=part_row))
    if gpu_memory and choice.est_bytes and choice.est_bytes / num_shards > gpu_memory:
        raise RagtuneError(f"index.shards = {num_shards}: each shard of {choice.factory} needs about "
                           f"{human_bytes(choice.est_bytes / num_shards)} on one GPU but index.max_gpu_memory is "
                           f"{human_bytes(gpu_memory)}. Fix: set index.shards >= "
                           f"{-(-choice.est_bytes // gpu_memory)} or null")
    shards = plan_shards(plan.parts, num_shards)
    batch = max(rows for _, rows in plan.parts) if choice.kind == "hnsw" else ADD_BATCH  # HNSW adds a part at once
    task_memory, memory_why = shard_task_bytes(choice.kind, choice.factory, max(sum(p.rows for p in s) for s in shards),
                                               plan.d, doc_row_bytes=doc_row, part_row_bytes=part_row,
                                               batch_rows=batch)
    tasks = plan_index_tasks(nodes, len(shards), ix.device, task_memory=task_memory)
    factory = effective_factory(choice.factory, plan.d, plan.embeddings.metric)  # a bad string fails here
    needs_training = not new_index(factory, plan.d, plan.embeddings.metric).is_trained
    where = f" over {choice.nodes} nodes" if choice.nodes > 1 else ""
    log.info("index: %s (%s)%s", choice.factory, choice.reason, "" if choice.est_bytes is None else
             f"; about {human_bytes(choice.est_bytes)} in memory{where}")
    if choice.nodes > len(nodes):
        log.warning("serving this index needs %d nodes of index.max_memory = %s each; the cluster has %d now (the "
                    "build itself runs on any number)", choice.nodes, human_bytes(ix.max_memory_bytes), len(nodes))
    log.info("%d vectors of d=%d (%s) from %d parts -> %d shard(s); %s", plan.nb, plan.d, plan.embeddings.metric,
             len(plan.parts), len(shards), tasks.reason)
    log.info("memory of a shard task (Ray memory=): %s", memory_why)
    return Layout(plan, tasks, shards, factory, needs_training, doc_row, node_memory)


def _gpu_memory() -> int:
    """Total memory of the GPU this task was given (run as a Ray task with one GPU)."""
    import torch

    return int(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)


# --- 3. sample and train (one Ray task) ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Prepared:
    """What the training task hands every shard task: the trained empty index and the tuning queries."""

    index: bytes  # the trained empty index, serialized
    xq: np.ndarray  # (nq, d) tuning queries: held-out database vectors, or real query texts embedded
    qids: np.ndarray  # (nq,) their chunk ids (-1 for query texts): each is dropped from its own results
    train_rows: int  # vectors trained on (0: the kind needs no training)
    seconds: float


def prepare(emb_uri: str, records: dict[str, PartRecord], sample: list[tuple[str, np.ndarray, np.ndarray]],
            factory: str, d: int, metric: str, threads: int, gpu: int | None,
            tune_texts: list[str] | None = None, model: EmbedderRecord | None = None,
            normalize: bool = True, coarse: str = "auto") -> Prepared:
    """Read the sampled rows, train the index once; returns the trained empty index and the tuning queries:
    held-out database vectors (with their ids, to be dropped from their own results), or ``tune_texts``
    embedded with the embeddings' model (ids -1)."""
    import faiss

    ensure_logging()
    faiss.omp_set_num_threads(threads)
    t0 = time.perf_counter()
    emb = resolve(emb_uri)
    xt, xq, qids = [], [], []
    for name, t_rows, q_rows in sample:  # each part read only as far as its sample goes (its first rows)
        upto = int(max(t_rows.max(initial=-1), q_rows.max(initial=-1))) + 1
        table = pa.concat_tables(piece_batches(emb, records[name], Piece(part=name, start=0, stop=upto),
                                               ["chunk_id", "vector"], 0, verify=False))
        x = vectors_from_arrow(table["vector"])
        ids = table["chunk_id"].to_numpy()
        xt.append(x[t_rows])
        xq.append(x[q_rows])
        qids.append(ids[q_rows])
    if tune_texts and model is not None:
        st = load_sentence_transformer(EmbedderSpec(**model.model_dump()))
        xq = [st.encode(tune_texts, batch_size=256, convert_to_numpy=True, normalize_embeddings=normalize,
                        show_progress_bar=False).astype(np.float32)]
        qids = [np.full(len(tune_texts), -1, dtype=np.int64)]
    index = new_index(factory, d, metric)
    nt = 0
    if not index.is_trained:
        xt_all = np.concatenate(xt) if xt else np.zeros((0, d), np.float32)
        nt = len(xt_all)
        way = coarse_training(coarse, index, gpu)
        log.info("training %s on %d vectors%s%s", factory, nt, f" on GPU {gpu}" if gpu is not None else "",
                 " (two-level k-means for the coarse quantizer: index.coarse_training)" if way == "two_level" else "")
        train_index(index, xt_all, gpu, way)
    return Prepared(serialize(index), np.concatenate(xq) if xq else np.zeros((0, d), np.float32),
                    np.concatenate(qids) if qids else np.zeros(0, np.int64), nt, time.perf_counter() - t0)


def _train(cfg: IndexJobConfig, layout: Layout, records: dict[str, PartRecord], k: int) -> Prepared:
    """Choose the training sample and the tuning queries (real queries, else held-out vectors: at most a tenth
    of the index, so that it stays the same index), and train once in one task (``prepare``)."""
    import ray

    ix, plan, tasks = cfg.index, layout.plan, layout.tasks
    tune_texts = None
    if ix.tune_queries_path and k >= 1:  # real queries: recall for queries of another kind than the documents
        tune_texts = sample_query_texts(ix.tune_queries_path, ix.tune_queries, np.random.default_rng(ix.seed))
    n_queries = held_out_count(ix.tune_queries, plan.nb) if k >= 1 and not tune_texts else 0
    sample = sample_rows(plan.parts, plan.choice.train_size if layout.needs_training else 0, n_queries, ix.seed)
    _, part_row = row_bytes(sum(r.bytes for r in plan.embeddings.parts.values()), plan.nb, plan.d)
    memory, why = train_task_bytes(sum(len(t) for _, t, _ in sample), plan.d,
                                   max((rows for _, rows in plan.parts), default=0), part_row, n_queries)
    log.info("memory of the training task (Ray memory=): %s", why)
    prepare_task = ray.remote(prepare).options(num_cpus=tasks.train_threads if not tasks.use_gpu else 1,
                                               num_gpus=tasks.num_gpus, memory=memory)
    prep = ray.get(prepare_task.remote(plan.emb.uri, records, sample, layout.factory, plan.d,
                                       plan.embeddings.metric, tasks.train_threads, layout.gpu, tune_texts,
                                       plan.embeddings.model, plan.embeddings.normalize, ix.coarse_training))
    if layout.needs_training:
        log.info("trained on %d vectors in %.1fs", prep.train_rows, prep.seconds)
    return prep


# --- 4. build one shard (one Ray task per shard) -----------------------------------------------------------------

@dataclass(frozen=True)
class BuiltShard:
    """A shard task's result: the shard it wrote, and its part of the tuning (merged across shards by the
    driver, ``merge_tuning``)."""

    record: ShardRecord
    candidates: list[dict[str, int]]  # the search settings tried, the same for every shard
    searched: list[tuple[np.ndarray, np.ndarray, float]]  # per candidate: (D, I) of the tuning queries, seconds
    truth: tuple[np.ndarray, np.ndarray]  # the queries' exact (D, I) among this shard's rows


def piece_batches(emb: Location, record: PartRecord, piece: Piece, columns: list[str], batch_rows: int,
                  verify: bool = True) -> Iterator[pa.Table]:
    """Rows ``[piece.start, piece.stop)`` of one embedding part, ``batch_rows`` at a time (0: the piece at once),
    only those of ``columns`` the part has: its sha256 checked first (``verify``) by reading it in blocks, then the
    Parquet file read batch by batch, so a task never holds a whole part (nor its other columns)."""
    if piece.rows == 0:
        return
    loc = emb.join(record.file)
    if not exists(loc):
        raise RagtuneError(f"{loc.uri}: listed in the embeddings manifest but missing. Fix: rerun `ragtune embed` "
                           "with the same config to rebuild it")
    if verify:
        if sha256_of(loc) != record.sha256:
            raise RagtuneError(f"{loc.uri}: checksum mismatch (file changed or truncated). Fix: rerun `ragtune "
                               "embed` with --overwrite")
    with loc.fs.open_input_file(loc.path) as f:
        pf = pq.ParquetFile(f)
        meta = pf.schema_arrow.metadata
        columns = [c for c in columns if c in pf.schema_arrow.names]
        pending: list[pa.RecordBatch] = []
        row = 0  # the part's row number of the next batch read
        want = batch_rows or piece.rows
        for batch in pf.iter_batches(batch_size=min(65_536, max(want, 1)), columns=columns):
            lo, hi = max(piece.start - row, 0), min(piece.stop - row, batch.num_rows)
            row += batch.num_rows
            if hi > lo:
                pending.append(batch.slice(lo, hi - lo))
            while sum(b.num_rows for b in pending) >= want or (pending and row >= piece.stop):
                t = pa.Table.from_batches(pending).replace_schema_metadata(meta)
                yield t.slice(0, want)
                rest = t.slice(want)
                pending = rest.to_batches() if rest.num_rows else []
            if row >= piece.stop:
                break


def build_shard(shard: int, pieces: list[Piece], emb_uri: str, records: dict[str, PartRecord], trained: bytes,
                xq: np.ndarray, qids: np.ndarray, k: int, metric: str, version_uri: str, threads: int,
                gpu: int | None, batch_rows: int = ADD_BATCH, doc_bytes: int = DOCSTORE_RANGE_BYTES) -> BuiltShard:
    """Add this shard's rows to the trained index, search the tuning queries with each candidate setting, and
    write the shard and its docstore.

    Memory stays that of the index and one batch (``shard_task_bytes``): vectors are read ``batch_rows`` at a time
    (only ``chunk_id`` and ``vector``) and added batch by batch (HNSW a piece at a time: its graph depends on how
    the adds are grouped, so it is built as before); batches of IVF kinds keep at least 20 rows where the piece
    has them, so FAISS assigns them with the same kernel as a whole piece: the same index, bit for bit. The
    docstore is read after the index is written and let go, in chunk-id ranges of about ``doc_bytes`` of text,
    each written sorted (``write_docstore_sorted``): the same file as sorting the whole shard at once.

    Held-out database vectors (``qids`` >= 0) are queries the index must not contain while it is searched
    (else a query finds itself and its graph or cell neighbours too easily): their rows are added after the
    tuning searches, just before the shard is written. The exact neighbours of the queries among the other rows
    are found batch by batch as the rows are read (``GroundTruth``: memory stays that of one batch).
    """
    import faiss

    ensure_logging()
    faiss.omp_set_num_threads(threads)
    t0 = time.perf_counter()
    emb, out = resolve(emb_uri), resolve(version_uri)
    builder = ShardBuilder(deserialize(trained), gpu)
    per_piece = any(isinstance(x, faiss.IndexHNSW) for x in index_layers(builder.index))
    truth = GroundTruth(xq, k, metric) if len(xq) else None
    ids_seen: list[np.ndarray] = []  # (rows,) int64 per batch: the docstore's chunk-id ranges
    later: list[tuple[np.ndarray, np.ndarray]] = []  # held-out rows, added after the tuning searches
    held_ids = qids[qids >= 0]
    for piece in pieces:
        for table in piece_batches(emb, records[piece.part], piece, ["chunk_id", "vector"],
                                   0 if per_piece else even_batch(piece.rows, batch_rows)):
            xb = vectors_from_arrow(table["vector"])
            ids = table["chunk_id"].to_numpy()
            check_finite(xb, ids, f"{piece.part} of {emb.uri}")
            held = np.isin(ids, held_ids)
            builder.add(ids[~held], xb[~held])
            if held.any():
                later.append((ids[held], xb[held]))
            if truth is not None:
                truth.add(ids[~held], xb[~held])
            ids_seen.append(ids)
    index = builder.finish()
    candidates = candidate_params(index)
    searched = search_candidates(index, xq, k, candidates) if truth is not None else []
    for ids, xb in later:
        index.add_with_ids(xb, ids)
    later.clear()
    sha, size = write_index_file(index, out.join(shard_name(shard)))
    ntotal = int(index.ntotal)
    del index, builder  # the docstore phase holds text, not vectors
    ids = np.concatenate(ids_seen) if ids_seen else np.zeros(0, np.int64)
    dsha, dsize = write_docstore_sorted(_docstore_ranges(emb, records, pieces, ids, doc_bytes, batch_rows),
                                        out.join(docstore_name(shard)))
    record = ShardRecord(file=shard_name(shard), ntotal=ntotal, sha256=sha, bytes=size,
                         docstore=docstore_name(shard), docstore_sha256=dsha, docstore_bytes=dsize, pieces=pieces,
                         seconds=time.perf_counter() - t0)
    no_truth = (np.zeros((len(xq), 0), np.float32), np.zeros((len(xq), 0), np.int64))
    return BuiltShard(record, candidates, searched, truth.result() if truth is not None else no_truth)


def even_batch(rows: int, batch_rows: int) -> int:
    """A batch size that cuts ``rows`` into equal batches of at most ``batch_rows``: no short last batch (a batch
    under 20 rows is assigned by another FAISS kernel than the whole piece would be)."""
    return math.ceil(rows / max(1, math.ceil(rows / batch_rows))) if rows else batch_rows


def _docstore_ranges(emb: Location, records: dict[str, PartRecord], pieces: list[Piece], ids: np.ndarray,
                     doc_bytes: int, batch_rows: int) -> Iterator[pa.Table]:
    """The shard's docstore rows in ascending chunk-id ranges, each sorted: ``ids`` cut into ranges of about
    ``doc_bytes`` of part data, and for each range every piece read again in batches, keeping the range's rows."""
    part_bytes = sum(records[p.part].bytes * p.rows / max(records[p.part].rows, 1) for p in pieces)
    ranges = max(1, min(len(ids), math.ceil(part_bytes / doc_bytes)))
    bounds = np.sort(ids)[[len(ids) * i // ranges for i in range(1, ranges)]]  # (ranges - 1,) lower bounds
    edges = [None, *bounds.tolist(), None]
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        kept = []
        for piece in pieces:  # checked when the vectors were read
            for t in piece_batches(emb, records[piece.part], piece, DOCSTORE_COLUMNS, batch_rows, verify=False):
                cid = t["chunk_id"]
                mask = None
                if lo is not None:
                    mask = pc.greater_equal(cid, lo)
                if hi is not None:
                    below = pc.less(cid, hi)
                    mask = below if mask is None else pc.and_(mask, below)
                kept.append(t if mask is None else t.filter(mask))
        yield pa.concat_tables(kept).sort_by("chunk_id")


def _build_shards(layout: Layout, records: dict[str, PartRecord], prep: Prepared, k: int,
                  vdir: Location) -> list[BuiltShard]:
    """One task per shard (``build_shard``), each logged as it finishes; their results in shard order."""
    import ray

    plan, tasks = layout.plan, layout.tasks
    remote: Any = ray.remote  # build_shard takes more arguments than ray's typed overloads of remote() spell out
    shard_task = remote(build_shard).options(num_cpus=tasks.num_cpus, num_gpus=tasks.num_gpus,
                                             **({"memory": tasks.memory} if tasks.memory else {}))
    trained_ref, xq_ref, qids_ref = ray.put(prep.index), ray.put(prep.xq), ray.put(prep.qids)
    pending = {shard_task.remote(i, pieces, plan.emb.uri, records, trained_ref, xq_ref, qids_ref, k + 1 if k else 0,
                                 plan.embeddings.metric, vdir.uri, tasks.threads, layout.gpu): i
               for i, pieces in enumerate(layout.shards)}
    return _gather(pending, plan.nb, len(layout.shards))


def _gather(pending: dict[Any, int], nb: int, n: int) -> list[BuiltShard]:
    import ray

    rate = Rate(nb, "vectors", stage="index")
    results: dict[int, BuiltShard] = {}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        i = pending.pop(done[0])
        results[i] = ray.get(done[0])
        rec = results[i].record
        rate.add(rec.ntotal)
        rate.log(log, f"{rec.file} ({rec.ntotal:,} vectors, {rec.seconds:.1f}s) written; "
                      f"{len(results)}/{n} shards, ", figure=f"{len(results)}/{n} shards")
    return [results[i] for i in range(n)]


# --- 4b. lexical shards: corpus statistics, then one BM25 shard per FAISS shard (Ray tasks) ----------------------

LEXICAL_BATCH = 8192  # rows tokenized at once by a BM25 task (their texts and token lists: a few tens of MiB)


def _lexical_batches(pieces: list[Piece], emb_uri: str, records: dict[str, PartRecord]) -> Iterator[pa.Table]:
    """The shard's rows, the text columns only, in batches: a BM25 task never holds the parts' vectors, nor
    the shard's texts or token lists at once."""
    emb = resolve(emb_uri)
    for piece in pieces:
        yield from piece_batches(emb, records[piece.part], piece, ["chunk_id", "title", "text"], LEXICAL_BATCH)


def lexical_stats(pieces: list[Piece], emb_uri: str, records: dict[str, PartRecord],
                  params: LexicalParams) -> CorpusStats:
    """First pass: the BM25 statistics of one shard's chunks (documents, length, document frequencies), counted
    a batch at a time."""
    return stats_of_all(_lexical_batches(pieces, emb_uri, records), params)


def build_lexical(shard: int, pieces: list[Piece], emb_uri: str, records: dict[str, PartRecord],
                  stats: CorpusStats, params: LexicalParams, version_uri: str) -> LexicalRecord:
    """Second pass: this shard's BM25 scores with the whole corpus' statistics, written atomically. The task
    holds its shard's (chunk, term, count) triples (:class:`DocTerms`), not its texts or token lists; ``stats``
    comes from the object store (numpy arrays, mapped, not copied)."""
    t0 = time.perf_counter()
    tokenize, terms, ids = tokenizer(params), DocTerms(), []
    for t in _lexical_batches(pieces, emb_uri, records):
        ids.append(t["chunk_id"].to_numpy().astype(np.int64))
        terms.add(tokenize(chunk_texts(t["title"].to_pylist(), t["text"].to_pylist())))
    lex = terms.finish(np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64), stats, params)
    sha, size = write_lexical_file(lex, params, resolve(version_uri).join(lexical_name(shard)))
    return LexicalRecord(file=lexical_name(shard), ntotal=lex.ntotal, terms=len(lex.terms) - 1,
                         sha256=sha, bytes=size, seconds=time.perf_counter() - t0)


def merge_lexical_stats(*parts: CorpusStats) -> CorpusStats:
    """The shards' statistics merged into the corpus' (sorted terms + counts; one pyarrow sort)."""
    return CorpusStats.merge_all(parts)


def lexical_manifest(stats: CorpusStats, version_uri: str, params: LexicalParams, library_version: str,
                     shards: list[LexicalRecord]) -> LexicalManifest:
    """The manifest's lexical part, with the statistics file written beside the shards (what later adds score
    their deltas with) and their counts."""
    empty = LexicalManifest(library_version=library_version, params=params, n_docs=0, avg_len=0.0, terms=0,
                            shards=shards)
    return with_stats(resolve(version_uri), empty, stats)


def lexical_sizes(stats: CorpusStats) -> tuple[int, int]:
    """(chunk, distinct term) pairs and terms of a shard's statistics: what its BM25 shard task will hold."""
    return int(stats.counts.sum()), len(stats.terms)


def _task_memory(need: int, why: str, what: str, node_memory: float) -> int:
    """Ray's ``memory=`` for a task that needs ``need`` bytes, logged; capped at 90% of the smallest node (a task
    asking more than any node has would wait forever), with a warning that it may not fit."""
    if node_memory and need > 0.9 * node_memory:
        log.warning("memory of a %s (%s) is more than 90%% of a node's %s: asking for that much instead; it may "
                    "run out of memory. Fix: more shards (index.shards) or lexical search off (index.lexical."
                    "enabled: false)", what, why, human_bytes(node_memory))
        return int(0.9 * node_memory)
    return need


def _lexical_stats_tasks(cfg: IndexJobConfig, layout: Layout, records: dict[str, PartRecord]) -> list[Any]:
    """The first pass, one task per shard, queued beside the FAISS shard tasks; each task's ``memory=`` bounds
    its batch and the shard's vocabulary."""
    import ray

    plan = layout.plan
    doc_row, node_memory = layout.doc_row_bytes, layout.node_memory
    rows = max(sum(p.rows for p in pieces) for pieces in layout.shards)
    need, why = lexical_stats_task_bytes(rows, doc_row, LEXICAL_BATCH)
    log.info("memory of a BM25 statistics task (Ray memory=): %s", why)
    stats_task = ray.remote(lexical_stats).options(num_cpus=1, memory=_task_memory(need, why, "BM25 statistics task",
                                                                                   node_memory))
    return [stats_task.remote(pieces, plan.emb.uri, records, lexical_params(cfg)) for pieces in layout.shards]


def _build_lexical(cfg: IndexJobConfig, layout: Layout, records: dict[str, PartRecord], stats_refs: list[Any],
                   vdir: Location) -> LexicalManifest:
    """The corpus statistics merged in a task and put in the object store once (every shard task reads that one
    copy), then the second pass, each shard's task sized (``memory=``) by what the first pass counted of it, then
    the statistics file: the driver never holds the vocabulary."""
    import bm25s
    import ray

    t_lex = time.perf_counter()
    lparams = lexical_params(cfg)
    plan = layout.plan
    doc_row, node_memory = layout.doc_row_bytes, layout.node_memory
    sizes: list[tuple[int, int]] = ray.get([ray.remote(lexical_sizes).options(num_cpus=0).remote(r)
                                           for r in stats_refs])
    stats_ref = ray.remote(merge_lexical_stats).options(num_cpus=1).remote(*stats_refs)
    largest, refs = max(range(len(sizes)), key=lambda j: sizes[j][0]), []
    for i, (pieces, (pairs, terms)) in enumerate(zip(layout.shards, sizes, strict=True)):
        need, why = lexical_build_task_bytes(pairs, terms, sum(p.rows for p in pieces), doc_row, LEXICAL_BATCH)
        if i == largest:
            log.info("memory of the largest BM25 shard task (Ray memory=): %s", why)
        lex_task = ray.remote(build_lexical).options(num_cpus=1, memory=_task_memory(need, why, "BM25 shard task",
                                                                                     node_memory))
        refs.append(lex_task.remote(i, pieces, plan.emb.uri, records, stats_ref, lparams, vdir.uri))
    lex_records: list[LexicalRecord] = ray.get(refs)
    lexical: LexicalManifest = ray.get(ray.remote(lexical_manifest).options(num_cpus=1).remote(
        stats_ref, vdir.uri, lparams, bm25s.__version__, lex_records))
    log.info("lexical (BM25) shards: %d chunks, %d terms, %d shard(s) in %.1fs after the vector shards",
             lexical.n_docs, lexical.terms, len(lex_records), time.perf_counter() - t_lex)
    return lexical


# --- 5. tuning, plot, manifest -------------------------------------------------------------------------------------

def merge_tuning(results: list[BuiltShard], xq: np.ndarray, qids: np.ndarray, k: int, metric: str,
                 target: float) -> tuple[list[TuneRow], TuneRow, bool]:
    """Per-shard candidate searches -> one TuneRow per candidate (recall@k of the merged results, QPS)."""
    truth = GroundTruth(xq, k + 1, metric)
    for r in results:
        truth.add_result(*r.truth)
    _, true_I = drop_self(*truth.result(), qids, k)
    rows = []
    for c, params in enumerate(results[0].candidates):
        D, I = merge_topk([r.searched[c][0] for r in results], [r.searched[c][1] for r in results], k + 1, metric)
        _, I = drop_self(D, I, qids, k)
        seconds = sum(r.searched[c][2] for r in results)
        rows.append(TuneRow(params, recall_at_k(I, true_I, k), queries_per_second(len(qids), seconds)))
    chosen, reached = tune(rows, target)
    return rows, chosen, reached


def plot_tuning(rows: Sequence[TuneRow], chosen: TuneRow, target: float, title: str) -> bytes:
    """Recall@10 against batched QPS of every setting tried, the chosen one marked (PNG bytes)."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot([r.qps for r in rows], [r.recall for r in rows], "o-", color="tab:blue")
    for r in rows:
        ax.annotate(r.label(), (r.qps, r.recall), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.plot([chosen.qps], [chosen.recall], "o", ms=12, mfc="none", mec="tab:red", label="chosen")
    ax.axhline(target, ls="--", color="gray", lw=1, label=f"target {target}")
    ax.set_xscale("log")
    ax.set_xlabel("queries per second (batched, all shards)")
    ax.set_ylabel(f"recall@{K} vs exact search")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    return png(fig, dpi=120)


@dataclass
class Tuned:
    """What tuning found: every setting tried, the one kept (None: nothing to tune), and the queries."""

    rows: list[TuneRow]
    chosen: TuneRow | None
    reached: bool
    queries: int
    queries_from: str


def _tune(cfg: IndexJobConfig, layout: Layout, results: list[BuiltShard], prep: Prepared, k: int,
          vdir: Location) -> Tuned:
    """Merge the shards' candidate searches, measure recall@k against exact search, keep the cheapest setting
    that reaches ``index.target_recall``; print the table and write the recall-vs-QPS plot."""
    ix, plan = cfg.index, layout.plan
    qids = prep.qids
    queries_from = ix.tune_queries_path or "held-out database vectors"
    if not (len(qids) and k):
        return Tuned([], None, False, len(qids), queries_from)
    rows, chosen, reached = merge_tuning(results, prep.xq, qids, k, plan.embeddings.metric, ix.target_recall)
    console.out(f"recall@{k} vs QPS on {len(qids)} queries from {queries_from} ({len(layout.shards)} shard(s), "
                f"{layout.factory}):\n{tuning_table(rows, chosen, k)}")
    title = f"{layout.factory}, {plan.nb:,} vectors, {len(layout.shards)} shard(s)"
    atomic_write_bytes(vdir.join("tuning.png"), plot_tuning(rows, chosen, ix.target_recall, title))
    if not reached:
        log.warning("no setting reached recall@%d >= %s (best %.3f at %s). Fix: raise index.max_memory, let auto "
                    "spread a more exact index over more nodes (index.max_nodes; the reason above says how many), "
                    "or set index.kind to a more exact kind", k, ix.target_recall, chosen.recall, chosen.label())
    return Tuned(rows, chosen, reached, len(qids), queries_from)


def _manifest(cfg: IndexJobConfig, layout: Layout, version: str, vdir: Location, results: list[BuiltShard],
              prep: Prepared, lexical: LexicalManifest | None, tuned: Tuned, k: int,
              t_start: float) -> IndexManifest:
    """The new version's manifest, with the trained empty index written beside the shards (deltas of later adds
    start from it)."""
    import faiss

    plan = layout.plan
    trained = prep.index
    atomic_write_bytes(vdir.join(TRAINED), trained)
    shard_records = [r.record for r in results]
    training = ({"sha256": sha256_hex(trained), "rows": prep.train_rows, "seconds": prep.seconds}
                if layout.needs_training else {})
    return IndexManifest(
        version=version, factory=layout.factory, kind=plan.choice.kind, reason=plan.choice.reason,
        metric=plan.embeddings.metric, dim=plan.d, normalize=plan.embeddings.normalize,
        ntotal=sum(s.ntotal for s in shard_records), est_bytes=plan.choice.est_bytes, model=plan.embeddings.model,
        chunker=plan.embeddings.chunker,
        embeddings=EmbeddingsRecord(path=plan.emb.shown, rows=plan.nb, parts=len(plan.parts),
                                    updated_at=plan.embeddings.updated_at),
        shards=shard_records,
        trained=TrainedRecord(**training, file=TRAINED, file_sha256=sha256_hex(trained)),
        search_params=tuned.chosen.params if tuned.chosen else {},
        recall=RecallRecord.measured(tuned.chosen, k, cfg.index.target_recall, tuned.queries, tuned.queries_from)
        if tuned.chosen else None,
        tuning=tuned.rows,
        build=BuildRecord(seconds=time.perf_counter() - t_start, hardware=layout.hardware, faiss=faiss.__version__,
                          threads_per_task=layout.tasks.threads),
        config=cfg.model_dump(mode="json"),
        lexical=lexical,
    )


def _publish(root: Location, vdir: Location, manifest: IndexManifest, nb: int, t_start: float) -> None:
    """Check the version is whole, record it in the history, write the manifest and switch LATEST to it."""
    version = manifest.version
    if manifest.lexical is not None and ([r.ntotal for r in manifest.lexical.shards]
                                         != [r.ntotal for r in manifest.shards]):
        raise RagtuneError(f"the lexical shards hold {[r.ntotal for r in manifest.lexical.shards]} chunks but the "
                           f"vector shards {[r.ntotal for r in manifest.shards]}; {version} is left incomplete and "
                           "LATEST unchanged. Fix: rerun the same command")
    if manifest.ntotal != nb:
        raise RagtuneError(f"the shards hold {manifest.ntotal} vectors but the embeddings have {nb}; "
                           f"{version} is left incomplete and LATEST unchanged. Fix: rerun the same command")
    manifest.history = previous_history(root) + [HistoryEntry(
        version=version, operation="build", at=manifest.created_at, seconds=time.perf_counter() - t_start,
        ntotal=manifest.ntotal, counts={"vectors": manifest.ntotal, "shards": len(manifest.shards)})]
    write_index_manifest(vdir, manifest)
    switch_latest(root, version)


def previous_history(root: Location) -> list[HistoryEntry]:
    """The history of the version LATEST names now (empty when there is none, or it cannot be read)."""
    latest = read_latest(root)
    if latest is None:
        return []
    try:
        return read_index_manifest(root.join(latest)).entries()
    except RagtuneError:
        return []


@dataclass
class IndexSummary:
    path: str
    version: str
    factory: str
    kind: str
    reason: str
    ntotal: int
    dim: int
    metric: str
    shards: int
    search_params: dict[str, int]
    recall: float | None
    target_recall: float
    reached: bool
    qps: float | None
    seconds: float
    hardware: str

    def line(self) -> str:
        tuned = (f"{', '.join(f'{k}={v}' for k, v in self.search_params.items()) or 'exact'} -> recall@{K} "
                 f"{self.recall:.3f} (target {self.target_recall}{'' if self.reached else ', NOT reached'}), "
                 f"{self.qps:,.0f} QPS batched" if self.recall is not None else "no tuning (too few vectors)")
        return (f"indexed {self.ntotal:,} vectors (d={self.dim}, {self.metric}) as {self.factory} in {self.shards} "
                f"shard(s) at {self.path}/{self.version}; {tuned}; {self.seconds:.1f}s on {self.hardware}; "
                f"LATEST -> {self.version}")


# --- the job ------------------------------------------------------------------------------------------------------

def run(cfg: IndexJobConfig) -> IndexSummary:
    t_start = time.perf_counter()
    plan = check(cfg)
    makedirs(plan.root)
    with WriterLock(plan.root, f"ragtune index -c ... (index.path={cfg.index.path})"):  # one writer at a time
        summary = _build(cfg, plan, t_start)
    if cfg.index.keep_versions:  # as `ragtune index gc --keep N` (jobs/freshness.py)
        gc_versions(plan.root, keep=cfg.index.keep_versions)
    return summary


def _build(cfg: IndexJobConfig, plan: Plan, t_start: float) -> IndexSummary:
    """The build, under the writer lock: the steps 2 to 5 of the module docstring, in order."""
    init_ray(cfg.cluster)
    layout = _layout(cfg, plan)
    plan = layout.plan
    version = next_version(plan.root)
    vdir = plan.root.join(version)
    makedirs(vdir.join(DOCSTORE_DIR))
    if cfg.index.lexical.enabled:
        makedirs(vdir.join(LEXICAL_DIR))
    records = {rec.file: rec for rec in plan.embeddings.parts.values()}
    k = min(K, plan.nb - 1)
    prep = _train(cfg, layout, records, k)
    stats_refs = _lexical_stats_tasks(cfg, layout, records) if cfg.index.lexical.enabled else None
    results = _build_shards(layout, records, prep, k, vdir)
    lexical = _build_lexical(cfg, layout, records, stats_refs, vdir) if stats_refs is not None else None
    tuned = _tune(cfg, layout, results, prep, k, vdir)
    manifest = _manifest(cfg, layout, version, vdir, results, prep, lexical, tuned, k, t_start)
    _publish(plan.root, vdir, manifest, plan.nb, t_start)
    chosen = tuned.chosen
    return IndexSummary(
        path=plan.root.shown, version=version, factory=layout.factory, kind=plan.choice.kind,
        reason=plan.choice.reason, ntotal=manifest.ntotal, dim=plan.d, metric=plan.embeddings.metric,
        shards=len(layout.shards), search_params=manifest.search_params, recall=chosen.recall if chosen else None,
        target_recall=cfg.index.target_recall, reached=tuned.reached, qps=chosen.qps if chosen else None,
        seconds=time.perf_counter() - t_start, hardware=layout.hardware)


if __name__ == "__main__":  # python -m jobs.index --config FILE [overrides] (what `ray job submit` calls)
    job_main("index", run)
