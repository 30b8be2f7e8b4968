"""`ragtune index`: embedding parts -> a sharded FAISS index + docstore, one new version per build (Ray tasks).

Laptop (embedded local Ray, no cluster needed)::

    ragtune embed -c configs/embed/sample.yaml && ragtune index -c configs/index/sample.yaml
    ragtune index -c configs/index/sample.yaml index.kind=HNSW32 index.shards=2

Cluster (paths must be storage every node sees: a URI or a shared mount)::

    ray job submit --working-dir . -- python -m jobs.index --config configs/index/squad.yaml

New knowledge without a rebuild (a new version each; bottom of this file, docs/index.md "Freshness")::

    ragtune index add -i runs/beir/index --corpus new.jsonl      # new and changed documents, embedded here
    ragtune index delete -i runs/beir/index --doc-id sq00p000    # masked in every search mode
    ragtune index compact -i runs/beir/index && ragtune index gc -i runs/beir/index --keep 3

The flow, top to bottom:
1. check before any work: the embeddings are complete, the index kind (``auto``: chosen from the number of
   vectors, their dimension and ``index.max_memory``, with the reason printed) and the output folder;
2. join or start Ray, plan the tasks from the cluster (one GPU per task when there are GPUs, else the cores);
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

import functools
import io
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from cluster.placement import IndexTaskPlan, plan_index_tasks
from configs.schema import IndexJobConfig, RagtuneError
from sharding.embeddings import EmbeddingManifest, PartRecord, read_manifest
from sharding.index import (
    DOCSTORE_DIR,
    MANIFEST,
    TRAINED,
    HistoryEntry,
    IndexChoice,
    IndexManifest,
    Piece,
    ShardRecord,
    choose_index,
    default_num_shards,
    docstore_name,
    explicit_choice,
    human_bytes,
    plan_shards,
    read_latest,
    sample_rows,
    shard_name,
    switch_latest,
    version_name,
    write_index_manifest,
)
from sharding.metrics import read_query_texts
from sharding.storage import Location, atomic_write_bytes, exists, makedirs, resolve

log = logging.getLogger("ragtune.index")
logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # four lines per process about CPU builds

K = 10  # recall@K is what index.target_recall means


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


def check(cfg: IndexJobConfig, use_gpu: bool | None = None) -> Plan:
    """Everything that can fail before work starts, without Ray, torch or faiss. Raises RagtuneError."""
    emb = resolve(cfg.embeddings.path)
    m = read_manifest(emb)
    if m is None:
        raise RagtuneError(f"embeddings.path = {cfg.embeddings.path!r} holds no _manifest.json. Fix: run `ragtune "
                           f"embed` with output.path {cfg.embeddings.path} first, or point embeddings.path at its "
                           "output")
    if m.state != "done" or m.dim is None:
        raise RagtuneError(f"embeddings at {emb.uri} are not complete (state {m.state!r}, {len(m.parts)}/"
                           f"{m.num_parts} parts). Fix: rerun the same `ragtune embed` command to finish them")
    parts = [(rec.file, rec.rows) for _, rec in sorted(m.parts.items())]
    nb = sum(rows for _, rows in parts)
    if nb == 0:
        raise RagtuneError(f"embeddings at {emb.uri} hold no vectors. Fix: embed a corpus with text")
    ix = cfg.index
    gpu = ix.device == "gpu" if use_gpu is None else use_gpu
    if ix.kind.lower() == "auto":
        choice = choose_index(nb, m.dim, ix.max_memory_bytes, use_gpu=gpu, exact_below=ix.exact_below,
                              train_sample=ix.train_sample)
    else:
        choice = explicit_choice(ix.kind, nb, m.dim, ix.train_sample)
    if ix.tune_queries_path and not Path(ix.tune_queries_path).is_file():
        raise RagtuneError(f"index.tune_queries_path = {ix.tune_queries_path!r}: no such file. Fix: give a local BEIR "
                           "queries.jsonl or a text file with one query per line, or null to tune on held-out vectors")
    if ix.lexical.enabled:  # an unknown stemmer or a missing PyStemmer fails here, not after the FAISS build
        from sharding.lexical import tokenizer

        tokenizer(lexical_params(cfg))
    root = resolve(ix.path)
    if exists(root.join(MANIFEST)):
        raise RagtuneError(f"index.path = {ix.path!r} is an index version folder, not an index root. Fix: set "
                           "index.path to the folder that holds LATEST and the v-NNNNN folders")
    return Plan(cfg, emb, m, parts, nb, m.dim, choice, root)


def lexical_params(cfg: IndexJobConfig):
    """index.lexical as the parameters stored in the manifest (sharding.lexical.LexicalParams)."""
    from sharding.lexical import LexicalParams

    return LexicalParams(**cfg.index.lexical.model_dump(exclude={"enabled"}))


# --- 3. sample and train (one Ray task) ---------------------------------------------------------------------------

def prepare(emb_uri: str, records: dict[str, PartRecord], sample: list[tuple[str, np.ndarray, np.ndarray]],
            factory: str, d: int, metric: str, threads: int, gpu: int | None,
            tune_texts: list[str] | None = None, model: dict[str, Any] | None = None,
            normalize: bool = True) -> dict[str, Any]:
    """Read the sampled rows, train the index once; returns the trained empty index and the tuning queries:
    held-out database vectors (with their ids, to be dropped from their own results), or ``tune_texts``
    embedded with the embeddings' model (ids -1)."""
    import faiss

    from jobs.progress import ensure_logging
    from sharding.embeddings import vectors_from_arrow
    from sharding.index import new_index, read_part_table, serialize, train_index

    ensure_logging()
    faiss.omp_set_num_threads(threads)
    t0 = time.perf_counter()
    emb = resolve(emb_uri)
    xt, xq, qids = [], [], []
    for name, t_rows, q_rows in sample:
        table = read_part_table(emb, records[name], ["chunk_id", "vector"])
        x = vectors_from_arrow(table["vector"])
        ids = table["chunk_id"].to_numpy()
        xt.append(x[t_rows])
        xq.append(x[q_rows])
        qids.append(ids[q_rows])
    if tune_texts:
        from models.embedders import EmbedderSpec, load_sentence_transformer

        st = load_sentence_transformer(EmbedderSpec(**(model or {})))
        xq = [st.encode(tune_texts, batch_size=256, convert_to_numpy=True, normalize_embeddings=normalize,
                        show_progress_bar=False).astype(np.float32)]
        qids = [np.full(len(tune_texts), -1, dtype=np.int64)]
    index = new_index(factory, d, metric)
    nt = 0
    if not index.is_trained:
        xt_all = np.concatenate(xt) if xt else np.zeros((0, d), np.float32)
        nt = len(xt_all)
        log.info("training %s on %d vectors%s", factory, nt, f" on GPU {gpu}" if gpu is not None else "")
        train_index(index, xt_all, gpu)
    return {"index": serialize(index), "xq": np.concatenate(xq) if xq else np.zeros((0, d), np.float32),
            "qids": np.concatenate(qids) if qids else np.zeros(0, np.int64), "train_rows": nt,
            "seconds": time.perf_counter() - t0}


# --- 4. build one shard (one Ray task per shard) -----------------------------------------------------------------

def build_shard(shard: int, pieces: list[Piece], emb_uri: str, records: dict[str, PartRecord], trained: bytes,
                xq: np.ndarray, qids: np.ndarray, k: int, metric: str, version_uri: str, threads: int,
                gpu: int | None) -> dict[str, Any]:
    """Add this shard's rows to the trained index, search the tuning queries with each candidate setting, and
    write the shard and its docstore.

    Held-out database vectors (``qids`` >= 0) are queries the index must not contain while it is searched
    (else a query finds itself and its graph or cell neighbours too easily): their rows are added after the
    tuning searches, just before the shard is written.
    """
    import faiss

    from jobs.progress import ensure_logging
    from sharding.docstore import write_docstore
    from sharding.embeddings import vectors_from_arrow
    from sharding.index import ShardBuilder, deserialize, read_part_table, write_index_file
    from sharding.search import candidate_params, exact_knn, merge_topk, search_candidates

    ensure_logging()
    faiss.omp_set_num_threads(threads)
    t0 = time.perf_counter()
    emb, out = resolve(emb_uri), resolve(version_uri)
    builder = ShardBuilder(deserialize(trained), gpu)
    nq = len(xq)
    true_D = np.zeros((nq, 0), np.float32)
    true_I = np.zeros((nq, 0), np.int64)
    rows: list[pa.Table] = []
    later: list[tuple[np.ndarray, np.ndarray]] = []  # held-out rows, added after the tuning searches
    for piece in pieces:
        table = read_part_table(emb, records[piece.part]).slice(piece.start, piece.rows)
        xb = vectors_from_arrow(table["vector"])
        ids = table["chunk_id"].to_numpy()
        held = np.isin(ids, qids[qids >= 0])
        builder.add(ids[~held], xb[~held])
        if held.any():
            later.append((ids[held], xb[held]))
        if nq:  # exact neighbours of the tuning queries among the rows searched, merged as rows arrive
            D, I = exact_knn(xq, xb[~held], k, metric)
            kept = ids[~held]
            true_D, true_I = merge_topk([true_D, D], [true_I, np.where(I >= 0, kept[np.maximum(I, 0)], -1)], k,
                                        metric)
        rows.append(table.drop_columns(["vector"]))
    index = builder.finish()
    candidates = candidate_params(index)
    searched = search_candidates(index, xq, k, candidates) if nq else []
    for ids, xb in later:
        index.add_with_ids(xb, ids)
    sha, size = write_index_file(index, out.join(shard_name(shard)))
    dsha, dsize = write_docstore(pa.concat_tables(rows), out.join(docstore_name(shard)))
    record = ShardRecord(file=shard_name(shard), ntotal=int(index.ntotal), sha256=sha, bytes=size,
                         docstore=docstore_name(shard), docstore_sha256=dsha, docstore_bytes=dsize, pieces=pieces,
                         seconds=time.perf_counter() - t0)
    return {"record": record.model_dump(), "candidates": candidates, "searched": searched,
            "truth": (true_D, true_I)}


# --- 4b. lexical shards: corpus statistics, then one BM25 shard per FAISS shard (Ray tasks) ----------------------

def _lexical_rows(pieces: list[Piece], emb_uri: str, records: dict[str, PartRecord]) -> tuple[np.ndarray, list[str]]:
    from sharding.index import read_part_table
    from sharding.lexical import chunk_texts

    emb = resolve(emb_uri)
    ids, texts = [], []
    for piece in pieces:
        t = read_part_table(emb, records[piece.part], ["chunk_id", "title", "text"]).slice(piece.start, piece.rows)
        ids.append(t["chunk_id"].to_numpy())
        texts += chunk_texts(t["title"].to_pylist(), t["text"].to_pylist())
    return np.concatenate(ids).astype(np.int64), texts


def lexical_stats(pieces: list[Piece], emb_uri: str, records: dict[str, PartRecord], params: Any) -> Any:
    """First pass: the BM25 statistics of one shard's chunks (documents, length, document frequencies)."""
    from sharding.lexical import CorpusStats, tokenizer

    _, texts = _lexical_rows(pieces, emb_uri, records)
    return CorpusStats.of(tokenizer(params)(texts))


def build_lexical(shard: int, pieces: list[Piece], emb_uri: str, records: dict[str, PartRecord], stats: Any,
                  params: Any, version_uri: str) -> dict[str, Any]:
    """Second pass: this shard's BM25 scores with the whole corpus' statistics, written atomically."""
    from sharding.lexical import LexicalRecord, build_shard, lexical_name, tokenizer, write_lexical_file

    t0 = time.perf_counter()
    ids, texts = _lexical_rows(pieces, emb_uri, records)
    lex = build_shard(tokenizer(params)(texts), ids, stats, params)
    sha, size = write_lexical_file(lex, params, resolve(version_uri).join(lexical_name(shard)))
    return LexicalRecord(file=lexical_name(shard), ntotal=lex.ntotal, terms=len(lex.model.vocab_dict) - 1,
                         sha256=sha, bytes=size, seconds=time.perf_counter() - t0).model_dump()


def _gpu_memory() -> int:
    """Total memory of the GPU this task was given (run as a Ray task with one GPU)."""
    import torch

    return int(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)


# --- 5. tuning, plot, manifest -------------------------------------------------------------------------------------

def merge_tuning(results: list[dict[str, Any]], qids: np.ndarray, k: int, metric: str, target: float):
    """Per-shard candidate searches -> one TuneRow per candidate (recall@k of the merged results, QPS)."""
    from sharding.search import TuneRow, drop_self, merge_topk, recall_at_k, tune

    truth = merge_topk([r["truth"][0] for r in results], [r["truth"][1] for r in results], k + 1, metric)
    _, true_I = drop_self(*truth, qids, k)
    rows = []
    for c, params in enumerate(results[0]["candidates"]):
        D, I = merge_topk([r["searched"][c][0] for r in results], [r["searched"][c][1] for r in results], k + 1,
                          metric)
        _, I = drop_self(D, I, qids, k)
        seconds = sum(r["searched"][c][2] for r in results)
        rows.append(TuneRow(params, recall_at_k(I, true_I, k), len(qids) / seconds if seconds > 0 else 0.0))
    chosen, reached = tune(rows, target)
    return rows, chosen, reached


def plot_tuning(rows, chosen, target: float, title: str) -> bytes:
    """Recall@10 against batched QPS of every setting tried, the chosen one marked (PNG bytes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


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
    from sharding.versions import WriterLock

    makedirs(plan.root)
    with WriterLock(plan.root, f"ragtune index -c ... (index.path={cfg.index.path})"):  # one writer at a time
        summary = _build(cfg, plan, t_start)
    if cfg.index.keep_versions:
        gc(cfg.index.path, keep=cfg.index.keep_versions)
    return summary


def _build(cfg: IndexJobConfig, plan: Plan, t_start: float) -> IndexSummary:
    ix = cfg.index

    import ray

    from cluster.runtime import alive_nodes, init_ray
    from jobs.progress import Rate
    from sharding.index import effective_factory, new_index

    init_ray(cfg.cluster)
    nodes = alive_nodes()
    use_gpu = plan_index_tasks(nodes, 1, ix.device).use_gpu
    gpu_memory = None
    if use_gpu:
        gpu_memory = ix.max_gpu_memory_bytes or int(0.8 * ray.get(ray.remote(num_gpus=1)(_gpu_memory).remote()))
    if use_gpu != (ix.device == "gpu"):
        plan = check(cfg, use_gpu=use_gpu)  # the choice depends on where it is built
    choice = plan.choice
    num_shards = ix.shards or default_num_shards(plan.nb, choice.est_bytes, gpu_memory)
    if gpu_memory and choice.est_bytes and choice.est_bytes / num_shards > gpu_memory:
        raise RagtuneError(f"index.shards = {num_shards}: each shard of {choice.factory} needs about "
                           f"{human_bytes(choice.est_bytes / num_shards)} on one GPU but index.max_gpu_memory is "
                           f"{human_bytes(gpu_memory)}. Fix: set index.shards >= "
                           f"{-(-choice.est_bytes // gpu_memory)} or null")
    shards = plan_shards(plan.parts, num_shards)
    tasks: IndexTaskPlan = plan_index_tasks(nodes, len(shards), ix.device)
    factory = effective_factory(choice.factory, plan.d, plan.embeddings.metric)  # a bad string fails here
    needs_training = not new_index(factory, plan.d, plan.embeddings.metric).is_trained
    log.info("index: %s (%s)%s", choice.factory, choice.reason, "" if choice.est_bytes is None else
             f"; about {human_bytes(choice.est_bytes)} in memory")
    log.info("%d vectors of d=%d (%s) from %d parts -> %d shard(s); %s", plan.nb, plan.d, plan.embeddings.metric,
             len(plan.parts), len(shards), tasks.reason)

    version = next_version(plan.root)
    vdir = plan.root.join(version)
    makedirs(vdir.join(DOCSTORE_DIR))
    if ix.lexical.enabled:
        from sharding.lexical import LEXICAL_DIR

        makedirs(vdir.join(LEXICAL_DIR))

    # Sample and train once.
    records = {rec.file: rec for rec in plan.embeddings.parts.values()}
    k = min(K, plan.nb - 1)
    tune_texts = None
    if ix.tune_queries_path and k >= 1:  # real queries: recall for queries of another kind than the documents
        texts = read_query_texts(ix.tune_queries_path)
        pick = np.random.default_rng(ix.seed).choice(len(texts), min(ix.tune_queries, len(texts)), replace=False)
        tune_texts = [texts[i] for i in np.sort(pick)]
    # held-out vectors leave the index while it is tuned: at most a tenth of it, so that it stays the same index
    n_queries = min(ix.tune_queries, max(1, plan.nb // 10)) if k >= 1 and not tune_texts else 0
    sample = sample_rows(plan.parts, choice.train_size if needs_training else 0, n_queries, ix.seed)
    gpu = 0 if tasks.use_gpu else None  # inside a task given one GPU, it is device 0
    prepare_task = ray.remote(prepare).options(num_cpus=tasks.train_threads if not tasks.use_gpu else 1,
                                               num_gpus=tasks.num_gpus)
    prep = ray.get(prepare_task.remote(plan.emb.uri, records, sample, factory, plan.d,
                                       plan.embeddings.metric, tasks.train_threads, gpu, tune_texts,
                                       plan.embeddings.model, plan.embeddings.normalize))
    if needs_training:
        log.info("trained on %d vectors in %.1fs", prep["train_rows"], prep["seconds"])
    trained = prep["index"]
    trained_ref, xq_ref = ray.put(trained), ray.put(prep["xq"])
    qids = prep["qids"]

    # One task per shard.
    shard_task = ray.remote(build_shard).options(num_cpus=tasks.num_cpus, num_gpus=tasks.num_gpus)
    qids_ref = ray.put(qids)
    pending = {shard_task.remote(i, pieces, plan.emb.uri, records, trained_ref, xq_ref, qids_ref, k + 1 if k else 0,
                                 plan.embeddings.metric, vdir.uri, tasks.threads, gpu): i
               for i, pieces in enumerate(shards)}
    stats_refs: list[Any] = []
    if ix.lexical.enabled:  # queued beside the FAISS shard tasks: statistics first, then the BM25 shards
        lparams = lexical_params(cfg)
        stats_task = ray.remote(lexical_stats).options(num_cpus=1)
        stats_refs = [stats_task.remote(pieces, plan.emb.uri, records, lparams) for pieces in shards]
    rate = Rate(plan.nb, "vectors")
    results: dict[int, dict[str, Any]] = {}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        i = pending.pop(done[0])
        results[i] = ray.get(done[0])
        rec = results[i]["record"]
        rate.add(rec["ntotal"])
        rate.log(log, f"{rec['file']} ({rec['ntotal']:,} vectors, {rec['seconds']:.1f}s) written; "
                      f"{len(results)}/{len(shards)} shards, ")
    ordered = [results[i] for i in range(len(shards))]
    lexical = None
    if ix.lexical.enabled:
        import bm25s

        from sharding.lexical import CorpusStats, LexicalManifest, LexicalRecord

        t_lex = time.perf_counter()
        stats = CorpusStats()
        for part in ray.get(stats_refs):
            stats = stats.merge(part)
        stats_ref = ray.put(stats)
        lex_task = ray.remote(build_lexical).options(num_cpus=1)
        lexical_refs = [lex_task.remote(i, pieces, plan.emb.uri, records, stats_ref, lparams, vdir.uri)
                        for i, pieces in enumerate(shards)]
        lex_records = [LexicalRecord.model_validate(r) for r in ray.get(lexical_refs)]
        from sharding.freshness import write_stats

        lexical = LexicalManifest(library_version=bm25s.__version__, params=lparams, n_docs=stats.n_docs,
                                  avg_len=stats.avg_len, terms=len(stats.df), shards=lex_records,
                                  stats=write_stats(vdir, stats))  # what later adds score their deltas with
        log.info("lexical (BM25) shards: %d chunks, %d terms, %d shard(s) in %.1fs after the vector shards",
                 stats.n_docs, len(stats.df), len(lex_records), time.perf_counter() - t_lex)

    # Tune the search parameters on the merged results.
    from sharding.search import tuning_table

    tuning_rows, chosen, reached = [], None, False
    queries_from = ix.tune_queries_path or "held-out database vectors"
    if len(qids) and k:
        tuning_rows, chosen, reached = merge_tuning(ordered, qids, k, plan.embeddings.metric, ix.target_recall)
        print(f"recall@{k} vs QPS on {len(qids)} queries from {queries_from} ({len(shards)} shard(s), {factory}):")
        print(tuning_table(tuning_rows, chosen, k))
        title = f"{factory}, {plan.nb:,} vectors, {len(shards)} shard(s)"
        atomic_write_bytes(vdir.join("tuning.png"), plot_tuning(tuning_rows, chosen, ix.target_recall, title))
        if not reached:
            log.warning("no setting reached recall@%d >= %s (best %.3f at %s). Fix: raise index.max_memory or set "
                        "index.kind to a more exact kind", k, ix.target_recall, chosen.recall, chosen.label())

    import faiss

    hardware = "GPU" if tasks.use_gpu else f"CPU ({tasks.reason})"
    shard_records = [ShardRecord.model_validate(r["record"]) for r in ordered]
    atomic_write_bytes(vdir.join(TRAINED), trained)  # deltas of later adds start from it
    trained_info = {"file": TRAINED, "file_sha256": _sha(trained)}
    manifest = IndexManifest(
        version=version, factory=factory, kind=choice.kind, reason=choice.reason, metric=plan.embeddings.metric,
        dim=plan.d, normalize=plan.embeddings.normalize, ntotal=sum(s.ntotal for s in shard_records),
        est_bytes=choice.est_bytes, model=plan.embeddings.model, chunker=plan.embeddings.chunker,
        embeddings={"path": plan.emb.uri, "rows": plan.nb, "parts": len(plan.parts),
                    "updated_at": plan.embeddings.updated_at},
        shards=shard_records,
        trained={"sha256": _sha(trained), "rows": prep["train_rows"], "seconds": prep["seconds"], **trained_info}
        if needs_training else trained_info,
        search_params=chosen.params if chosen else {},
        recall={"k": k, "recall": chosen.recall, "target": ix.target_recall, "reached": reached,
                "queries": len(qids), "queries_from": queries_from, "qps": chosen.qps} if chosen else {},
        tuning=[{"params": r.params, "recall": r.recall, "qps": r.qps} for r in tuning_rows],
        build={"seconds": time.perf_counter() - t_start, "hardware": hardware, "faiss": faiss.__version__,
               "threads_per_task": tasks.threads},
        config=cfg.model_dump(mode="json"),
        lexical=lexical,
    )
    if lexical is not None and [r.ntotal for r in lexical.shards] != [r.ntotal for r in shard_records]:
        raise RagtuneError(f"the lexical shards hold {[r.ntotal for r in lexical.shards]} chunks but the vector "
                           f"shards {[r.ntotal for r in shard_records]}; {version} is left incomplete and LATEST "
                           "unchanged. Fix: rerun the same command")
    if manifest.ntotal != plan.nb:
        raise RagtuneError(f"the shards hold {manifest.ntotal} vectors but the embeddings have {plan.nb}; "
                           f"{version} is left incomplete and LATEST unchanged. Fix: rerun the same command")
    manifest.history = previous_history(plan.root) + [HistoryEntry(
        version=version, operation="build", at=manifest.created_at, seconds=time.perf_counter() - t_start,
        ntotal=manifest.ntotal, counts={"vectors": manifest.ntotal, "shards": len(shard_records)})]
    write_index_manifest(vdir, manifest)
    switch_latest(plan.root, version)
    return IndexSummary(
        path=plan.root.uri, version=version, factory=factory, kind=choice.kind, reason=choice.reason,
        ntotal=manifest.ntotal, dim=plan.d, metric=plan.embeddings.metric, shards=len(shards),
        search_params=manifest.search_params, recall=chosen.recall if chosen else None,
        target_recall=ix.target_recall, reached=reached, qps=chosen.qps if chosen else None,
        seconds=time.perf_counter() - t_start, hardware=hardware)


def _sha(data: bytes) -> str:
    from sharding.storage import sha256_hex

    return sha256_hex(data)




# --- freshness: add, delete, compact, gc, history (docs/index.md "Freshness") -------------------------------------
#
#   ragtune index add -i runs/beir/index --corpus new-docs.jsonl          # new and changed documents
#   ragtune index delete -i runs/beir/index --doc-id sq00p000 sq00p001    # or --where source=wiki
#   ragtune index compact -i runs/beir/index [--force]                    # fold deltas and tombstones in
#   ragtune index gc -i runs/beir/index --keep 3                          # delete old versions
#   ragtune index history -i runs/beir/index
#
# Each writes a new version under the writer lock, sharing the files of the version it starts from (LATEST), and
# switches LATEST last. Small adds embed in this process (no Ray: its ~10 s of start-up would be most of the
# time-to-index); above `ray_above` chunks they go through the embed job on Ray Data.

ADD_RAY_ABOVE = 20_000  # chunks to embed above which an add uses the Ray Data embed job
COMPACT_THRESHOLD = 0.10  # compact a shard whose delta + masked vectors exceed this share of its base
COMPACT_MAX_DELTAS = 16  # ... or that has more deltas than this (each is one more search per query)


def next_version(root: Location) -> str:
    """The name of the next version folder: the highest number on disk + 1 (complete, collected or left by a
    writer that died: never reused, so no reader can mistake one for another)."""
    from sharding.versions import mark_latest_published, version_states

    mark_latest_published(root)
    states = version_states(root)
    for name, state in states.items():
        if state in ("unfinished", "abandoned"):
            log.warning("%s was left by a write that did not finish (%s); LATEST never named it and no reader "
                        "opens it; `ragtune index gc` removes it", name,
                        "no manifest" if state == "unfinished" else "its writer died before switching LATEST")
    return version_name(int(list(states)[-1].split("-")[1]) + 1 if states else 1)


def previous_history(root: Location) -> list[HistoryEntry]:
    """The history of the version LATEST names now (empty when there is none, or it cannot be read)."""
    from sharding.index import read_index_manifest

    latest = read_latest(root)
    if latest is None:
        return []
    try:
        return read_index_manifest(root.join(latest)).entries()
    except RagtuneError:
        return []


def _root(index_path: str) -> Location:
    """The index root of ``-i``: it must hold LATEST (writes start from the latest version)."""
    from sharding.index import LATEST

    root = resolve(index_path)
    if exists(root.join(MANIFEST)):
        raise RagtuneError(f"-i {index_path}: a version folder, not an index root. Fix: pass the folder that holds "
                           "LATEST and the v-NNNNN folders (writes always start from LATEST)")
    if read_latest(root) is None:
        raise RagtuneError(f"-i {index_path}: no index here (no {LATEST}). Fix: build one with `ragtune index -c "
                           "configs/index/<x>.yaml`, or pass the index.path it was built at")
    return root


def _latest(root: Location) -> tuple[Location, IndexManifest]:
    from sharding.index import read_index_manifest

    vloc = root.join(read_latest(root) or "")
    return vloc, read_index_manifest(vloc)


def _finish(root: Location, vdir: Location, nm: IndexManifest, base: IndexManifest, operation: str,
            t0: float, counts: dict[str, int]) -> None:
    """Write the new version's manifest (with its history) and switch LATEST to it: the last two steps."""
    nm.ntotal = sum(r.live for r in nm.shards)
    nm.operation, nm.parent, nm.created_at = operation, base.version, time.time()  # type: ignore[assignment]
    nm.history = base.entries() + [HistoryEntry(version=nm.version, operation=operation,  # type: ignore[arg-type]
                                                parent=base.version, at=nm.created_at,
                                                seconds=time.perf_counter() - t0, ntotal=nm.ntotal, counts=counts)]
    write_index_manifest(vdir, nm)
    switch_latest(root, nm.version)  # a crash before this line leaves LATEST (and every reader) on the old one


def _keep_versions(m: IndexManifest, keep: int | None) -> int | None:
    if keep is not None:
        return keep
    return (m.config.get("index") or {}).get("keep_versions")


def _check_chunker(m: IndexManifest) -> Any:
    """The chunker settings the index was built with (its manifest), and the model's spec, checked: the
    embedding model named in the manifest must resolve here to the same revision."""
    from models.embedders import resolve_embedder
    from sharding.chunking import ChunkerSettings

    name, built = m.model.get("name", ""), m.model.get("revision")
    spec = resolve_embedder(name)
    if built and spec.revision != built:
        raise RagtuneError(f"the index was built with {name} revision {built} but {name} resolves here to revision "
                           f"{spec.revision}: new chunks would be embedded by another model. Fix: install the same "
                           "model revision, or rebuild the whole index with `ragtune embed` + `ragtune index`")
    c = m.chunker
    if not c.get("fingerprint"):
        raise RagtuneError("the index manifest records no chunker settings, so new documents cannot be chunked as "
                           "the index was. Fix: embed them with `ragtune embed` and pass --embeddings")
    settings = ChunkerSettings(size=c["size"], overlap=c["overlap"], prepend_title=c["prepend_title"],
                               tokenizer=c["tokenizer"], version=c.get("version", 1))
    if settings.fingerprint() != c["fingerprint"]:
        raise RagtuneError(f"the index's chunker (version {c.get('version')}) is not the chunker of this ragtune. "
                           "Fix: rebuild the index with `ragtune embed` + `ragtune index`")
    return spec, settings


def read_documents_local(paths: str | list[str], text_field: str, id_field: str, title_field: str) -> pa.Table:
    """A corpus (JSONL, Parquet, text/Markdown files; local or URI) as documents (corpus.DOC_SCHEMA), read in
    this process: the same reading and document schema as the embed job's Ray Data reads."""
    import pyarrow.json as pajson
    import pyarrow.parquet as pq

    from sharding.corpus import DOC_SCHEMA, list_corpus, preflight, text_file_document, to_documents

    corpus = list_corpus(paths)
    preflight(corpus, text_field)
    tables = []
    for f in corpus.files:
        if f.kind == "jsonl":
            compression = "detect" if f.path.endswith((".gz", ".zst")) else None
            with corpus.fs.open_input_stream(f.path, compression=compression) as stream:
                t = pajson.read_json(stream)
            tables.append(to_documents(t, text_field, id_field, title_field))
        elif f.kind == "parquet":
            tables.append(to_documents(pq.read_table(f.path, filesystem=corpus.fs), text_field, id_field,
                                       title_field))
        else:
            with corpus.fs.open_input_stream(f.path) as stream:
                tables.append(pa.Table.from_pylist([text_file_document(f.rel, stream.read())], schema=DOC_SCHEMA))
    return pa.concat_tables(tables)


def _corpus_fields(m: IndexManifest, text_field: str | None, id_field: str | None,
                   title_field: str | None) -> tuple[str, str, str]:
    """The corpus fields: as given, else as the embed job that made the index read them, else the defaults."""
    from configs.schema.embed import CorpusConfig

    recorded: dict[str, Any] = {}
    try:
        em = read_manifest(resolve(m.embeddings.get("path", ""))) if m.embeddings.get("path") else None
        recorded = (em.config.get("corpus") or {}) if em else {}
    except RagtuneError:
        pass
    d = CorpusConfig.model_fields
    return (text_field or recorded.get("text_field") or d["text_field"].default,
            id_field or recorded.get("id_field") or d["id_field"].default,
            title_field or recorded.get("title_field") or d["title_field"].default)


def _unique_chunks(t: pa.Table) -> pa.Table:
    """Chunk rows with each chunk id once; two different texts under one id (a document listed twice with
    different text) are refused, as the embed job refuses them."""
    import pyarrow.compute as pc

    t = t.filter(pc.greater_equal(t["chunk_index"], 0)).sort_by("chunk_id")
    ids = t["chunk_id"].to_numpy()
    same = np.zeros(len(ids), dtype=bool)
    same[1:] = ids[1:] == ids[:-1]
    if same.any():
        texts = t["text"].to_pylist()
        clash = [i for i in np.flatnonzero(same) if texts[i] != texts[i - 1]]
        if clash:
            docs = sorted({t["doc_id"][int(i)].as_py() for i in clash})[:5]
            raise RagtuneError(f"documents {docs} appear more than once in the new corpus with different text. Fix: "
                               "give every document a unique id (--id-field), or keep one copy of each")
        t = t.filter(pa.array(~same))
    return t


def _new_chunks(m: IndexManifest, corpus: str | list[str] | None, embeddings: str | None,
                fields: tuple[str, str, str]) -> tuple[pa.Table, int]:
    """The chunks of the new corpus (DOC_COLUMNS; with ``vector`` when they come from --embeddings), and the
    number of documents read."""
    from sharding.embeddings import chunk_documents
    from sharding.embeddings import read_manifest as read_emb
    from sharding.freshness import DOC_COLUMNS
    from sharding.index import read_part_table

    if embeddings is not None:
        emb = resolve(embeddings)
        em = read_emb(emb)
        if em is None or em.state != "done":
            raise RagtuneError(f"--embeddings {embeddings}: no complete embeddings here (manifest "
                               f"{'missing' if em is None else em.state!r}). Fix: run `ragtune embed` to the end first")
        problems = []
        if (em.model.get("name"), em.model.get("revision")) != (m.model.get("name"), m.model.get("revision")):
            problems.append(f"model {em.model.get('name')} ({em.model.get('revision')}) but the index has "
                            f"{m.model.get('name')} ({m.model.get('revision')})")
        if em.chunker.get("fingerprint") != m.chunker.get("fingerprint"):
            keys = ("size", "overlap", "prepend_title", "version")
            problems.append("chunker " + ", ".join(f"{k} {em.chunker.get(k)} vs the index's {m.chunker.get(k)}"
                                                   for k in keys if em.chunker.get(k) != m.chunker.get(k)))
        if em.normalize != m.normalize or em.dim != m.dim:
            problems.append(f"normalize {em.normalize}, d = {em.dim} but the index has {m.normalize}, d = {m.dim}")
        if problems:
            raise RagtuneError(f"--embeddings {embeddings} were made differently from the index: "
                               + "; ".join(problems) + ". Fix: embed the new documents with the index's model and "
                               "chunker (`ragtune embed` with the config the index was made from), or pass --corpus")
        parts = [read_part_table(emb, rec, [*DOC_COLUMNS, "vector"]) for _, rec in sorted(em.parts.items())]
        t = pa.concat_tables(parts) if parts else pa.table({})
        return _unique_chunks(t), len(set(t["doc_id"].to_pylist())) if parts else 0
    from models.embedders import load_tokenizer
    from sharding.chunking import Chunker

    spec, settings = _check_chunker(m)
    docs = read_documents_local(corpus if isinstance(corpus, str) else list(corpus or []), *fields)
    chunker = Chunker(load_tokenizer(spec.path), settings.size, settings.overlap, settings.prepend_title)
    chunks = chunk_documents(docs, chunker, settings.fingerprint(), 1)
    return _unique_chunks(chunks.select(DOC_COLUMNS)), docs.num_rows


def _embed_local(m: IndexManifest, rows: pa.Table, batch_size: int) -> np.ndarray:
    """Embed chunk rows in this process with the index's model, as the embed job's actors do: the model input
    is title + text, normalised as the index is (:func:`local_encoder`)."""
    from sharding.chunking import embed_input

    prepend = bool(m.chunker.get("prepend_title", True))
    inputs = [embed_input(ti, te, prepend) for ti, te in zip(rows["title"].to_pylist(), rows["text"].to_pylist(),
                                                              strict=True)]
    return local_encoder(m, batch_size)(inputs)


def local_encoder(m: IndexManifest, batch_size: int = 64) -> Any:
    """``encode(texts) -> (n, d) float32`` with the model the index manifest names (same revision, checked).

    When the model's sentence-transformers pipeline (``modules.json``) is a Transformer, a mean or CLS Pooling
    and optionally Normalize (all-MiniLM-L6-v2 and most sentence-transformers models), the same computation runs
    on plain ``transformers`` (the model card's own recipe): importing sentence-transformers costs ~4-6 s here,
    most of an add of a few documents (``tests/jobs/test_freshness.py`` checks both give the same vectors).
    Any other pipeline goes through sentence-transformers (``models.embedders.QueryEncoder``).
    """
    from pathlib import Path

    from models.embedders import EmbedderSpec, check_query_model, resolve_embedder

    name = m.model.get("name", "")
    try:
        spec = resolve_embedder(name)
    except RagtuneError:  # a local folder that moved: the manifest also records where it was
        if not Path(m.model.get("path", "")).is_dir():
            raise
        spec = EmbedderSpec(**m.model)
    check_query_model(m, spec)
    plan = _plain_pipeline(Path(spec.path))
    if plan is None:
        from models.embedders import QueryEncoder

        return QueryEncoder(m, batch_size=batch_size).encode
    pooling, normalize_module = plan
    import torch

    tok, model = _plain_model(spec.path, spec.revision)
    normalize = m.normalize or normalize_module

    def encode(texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), model.config.hidden_size), np.float32)
        order = np.argsort([-len(t) for t in texts], kind="stable")  # similar lengths per batch, as ST does
        with torch.inference_mode():
            for i in range(0, len(texts), batch_size):
                idx = order[i:i + batch_size]
                enc = tok([texts[j] for j in idx], padding=True, truncation="longest_first",
                          max_length=spec.max_seq_length, return_tensors="pt")
                h = model(**enc).last_hidden_state  # (B, T, d)
                if pooling == "mean":
                    mask = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
                    x = (h * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                else:
                    x = h[:, 0]
                if normalize:
                    x = torch.nn.functional.normalize(x, p=2, dim=1)
                out[idx] = x.float().numpy()
        check_query_model(m, spec, out.shape[1])
        return out

    return encode


@functools.lru_cache(maxsize=2)
def _plain_model(path: str, revision: str) -> tuple[Any, Any]:
    """(tokenizer, model) of a model folder, loaded once per process (a process that adds again, such as the
    compare job, does not load it twice)."""
    from transformers import AutoModel, AutoTokenizer

    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


def _plain_pipeline(path: Any) -> tuple[str, bool] | None:
    """("mean" | "cls", has Normalize) when a sentence-transformers folder is Transformer + Pooling [+ Normalize]
    with one plain pooling mode and no lower-casing; None for anything else."""
    try:
        modules = json.loads((path / "modules.json").read_text())
        types = [mod["type"].rsplit(".", 1)[-1] for mod in modules]
        if types not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]) or modules[0]["path"]:
            return None
        pool = json.loads((path / modules[1]["path"] / "config.json").read_text())
        st = json.loads((path / "sentence_bert_config.json").read_text())
    except (OSError, ValueError, KeyError, IndexError):
        return None
    on = sorted(k for k, v in pool.items() if k.startswith("pooling_mode") and v)
    mode = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}.get(on[0]) if len(on) == 1 else None
    if mode is None or st.get("do_lower_case") or pool.get("include_prompt") is False:
        return None
    return mode, len(types) == 3


def _embed_ray(m: IndexManifest, root: Location, corpus: str | list[str], fields: tuple[str, str, str],
               ids: np.ndarray, address: str | None) -> np.ndarray:
    """Embed through the embed job (Ray Data) into a staging folder under the index root, then take the
    vectors of ``ids``. The whole given corpus is embedded: this path is for large adds."""
    import shutil
    import uuid

    from configs.schema import EmbedJobConfig
    from jobs.embed import run as embed_run
    from sharding.embeddings import read_manifest as read_emb
    from sharding.embeddings import vectors_from_arrow
    from sharding.index import read_part_table

    stage = root.join("_staging", f"embed-{uuid.uuid4().hex[:8]}")
    c = m.chunker
    cfg = EmbedJobConfig.model_validate({
        "corpus": {"path": corpus, "text_field": fields[0], "id_field": fields[1], "title_field": fields[2]},
        "chunk": {"size": c["size"], "overlap": c["overlap"], "prepend_title": c["prepend_title"]},
        "embed": {"model": m.model["name"], "metric": m.metric},
        "output": {"path": stage.uri}, "cluster": {"address": address}})
    try:
        embed_run(cfg)
        em = read_emb(stage)
        assert em is not None
        if em.chunker.get("fingerprint") != c.get("fingerprint"):
            raise RagtuneError("the embed job chunked the new corpus differently from the index (chunker "
                               f"{em.chunker} vs {c}). Fix: rebuild the index with this ragtune")
        t = pa.concat_tables([read_part_table(stage, rec, ["chunk_id", "vector"]) for rec in em.parts.values()])
        pos = {cid: i for i, cid in enumerate(t["chunk_id"].to_pylist())}
        xb = vectors_from_arrow(t["vector"])
        return xb[[pos[int(i)] for i in ids]]
    finally:
        if stage.is_local:
            shutil.rmtree(stage.path, ignore_errors=True)


@dataclass
class AddSummary:
    path: str
    version: str  # the version written (the current one when nothing changed)
    parent: str
    changed: bool
    docs: int  # documents read
    docs_added: int
    docs_updated: int
    docs_skipped: int  # present with the same chunks
    chunks_added: int
    chunks_masked: int  # old copies of updated documents' chunks
    ntotal: int
    embedded_by: str  # "this process", "ray data", "--embeddings"
    embed_seconds: float
    seconds: float

    def line(self) -> str:
        if not self.changed:
            return (f"nothing to add: {self.docs:,} docs read, all {self.docs_skipped:,} already in {self.path}/"
                    f"{self.version} with the same text; {self.seconds:.1f}s")
        return (f"added {self.docs_added:,} docs, updated {self.docs_updated:,} ({self.chunks_masked:,} old chunks "
                f"masked), skipped {self.docs_skipped:,} unchanged: {self.chunks_added:,} chunks embedded by "
                f"{self.embedded_by} in {self.embed_seconds:.1f}s; {self.ntotal:,} vectors; {self.seconds:.1f}s; "
                f"LATEST {self.parent} -> {self.version}")


def add(index_path: str, corpus: str | list[str] | None = None, embeddings: str | None = None, *,
        chunks: pa.Table | None = None, text_field: str | None = None, id_field: str | None = None,
        title_field: str | None = None, ray_above: int = ADD_RAY_ABOVE, batch_size: int = 64,
        keep_versions: int | None = None, address: str | None = None) -> AddSummary:
    """Add new and changed documents to the index at ``index_path`` as a new version.

    The new corpus is chunked with the index's chunker and model (its manifest); chunks of documents already
    present with the same chunks are skipped, those of new documents added, and a document whose chunks differ
    is updated (its old chunks masked, its new ones added). New chunks go to delta segments of shard
    ``chunk_id % shards``. Exactly one source gives the documents: ``corpus`` (files or URIs), ``embeddings`` (a
    folder by ``ragtune embed`` made with the index's model and chunker), or ``chunks`` (a table of chunk rows
    made by the caller: chunk_id, doc_id, chunk_index, title, text, metadata, n_tokens, and ``vector`` from the
    index's model).
    """
    from sharding.embeddings import vectors_from_arrow
    from sharding.freshness import (
        DOC_COLUMNS,
        assign_shards,
        by_segment,
        live_ids,
        new_segment,
        plan_add,
        read_stats,
        rows_of,
        set_tombstones,
        stats_of,
        trained_index,
        with_trained_file,
        write_delta,
        write_stats,
    )
    from sharding.index import carried_manifest
    from sharding.search import shard_segments
    from sharding.versions import WriterLock

    t0 = time.perf_counter()
    if sum(x is not None for x in (corpus, embeddings, chunks)) != 1:
        raise RagtuneError("give the new documents as exactly one of --corpus (files) and --embeddings (a folder by "
                           "`ragtune embed`)")
    root = _root(index_path)
    with WriterLock(root, f"ragtune index add {corpus or embeddings or 'chunks'}"):
        base_dir, m = _latest(root)
        fields = _corpus_fields(m, text_field, id_field, title_field)
        if chunks is not None:
            missing = [c for c in (*DOC_COLUMNS, "vector") if c not in chunks.column_names]
            if missing:
                raise RagtuneError(f"chunks: columns {missing} are missing. Fix: give chunk_id, doc_id, chunk_index, "
                                   "title, text, metadata, n_tokens and vector")
            new, docs = _unique_chunks(chunks), len(set(chunks["doc_id"].to_pylist()))
        else:
            new, docs = _new_chunks(m, corpus, embeddings, fields)
        import pyarrow.compute as pc

        where = live_ids(base_dir, m)
        where = where.filter(pc.is_in(where["doc_id"], value_set=pa.array(sorted(set(new["doc_id"].to_pylist())),
                                                                             pa.string())))
        plan = plan_add(new, rows_of(base_dir, m, where))
        if plan.add.num_rows == 0 and plan.dead.num_rows == 0:
            return AddSummary(root.uri, m.version, m.version, False, docs, 0, 0, plan.docs_skipped, 0, 0, m.ntotal,
                              "-", 0.0, time.perf_counter() - t0)
        ids = plan.add["chunk_id"].to_numpy().astype(np.int64)
        t_embed = time.perf_counter()
        if "vector" in plan.add.column_names:
            xb, by = vectors_from_arrow(plan.add["vector"]), "--embeddings" if embeddings else "the caller"
        elif len(ids) > ray_above:
            assert corpus is not None
            xb, by = _embed_ray(m, root, corpus, fields, ids, address), "ray data (the embed job)"
        else:
            xb, by = _embed_local(m, plan.add, batch_size), "this process"
        embed_seconds = time.perf_counter() - t_embed
        if xb.shape[1:] != (m.dim,):
            raise RagtuneError(f"the new vectors have dimension {xb.shape[1:]} but the index {m.dim}. Fix: embed with "
                               f"the index's model {m.model.get('name')}")

        version = next_version(root)
        vdir = root.join(version)
        makedirs(vdir.join(DOCSTORE_DIR))
        nm = carried_manifest(m, version)
        trained, derived = trained_index(base_dir, m)
        if derived:
            with_trained_file(nm, vdir, trained)
        lexical = None
        if nm.lexical is not None:
            lparams = nm.lexical.params
            stats = read_stats(base_dir, m).minus(stats_of(plan.removed, lparams)).merge(stats_of(plan.add, lparams))
            lexical = (lparams, stats)
        target = assign_shards(ids, len(m.shards))
        rows = plan.add.select(DOC_COLUMNS)
        dead_new = {key: group for key, group in by_segment(plan.dead)}
        for n, rec in enumerate(nm.shards):
            dead = [g.dead for g in shard_segments(base_dir, m, n)]
            touched = False
            for pos in range(len(dead)):
                if (n, pos) in dead_new:
                    dead[pos] = np.union1d(dead[pos], dead_new[(n, pos)])
                    touched = True
            sel = target == n
            if sel.any():
                pos = len(rec.deltas)
                rec.deltas.append(write_delta(vdir, version, n, pos, new_segment(trained, ids[sel], xb[sel]),
                                              rows.filter(pa.array(sel)), lexical))
                dead.append(np.zeros(0, np.int64))
                touched = touched or rec.tombstones is not None
            if touched:
                set_tombstones(vdir, rec, n, dead)
        if lexical is not None and nm.lexical is not None:
            stats = lexical[1]
            nm.lexical.stats = write_stats(vdir, stats)
            nm.lexical.n_docs, nm.lexical.avg_len, nm.lexical.terms = stats.n_docs, stats.avg_len, len(stats.df)
        counts = {"docs_added": plan.docs_added, "docs_updated": plan.docs_updated,
                  "docs_skipped": plan.docs_skipped, "chunks_added": len(ids), "chunks_masked": plan.dead.num_rows}
        _finish(root, vdir, nm, m, "add", t0, counts)
        if nm.ntotal != m.ntotal + len(ids) - plan.dead.num_rows:  # never: each id lives in one segment
            log.warning("%s holds %d vectors, expected %d", version, nm.ntotal,
                        m.ntotal + len(ids) - plan.dead.num_rows)
    keep = _keep_versions(m, keep_versions)
    if keep:
        gc(index_path, keep=keep)
    return AddSummary(root.uri, version, m.version, True, docs, plan.docs_added, plan.docs_updated,
                      plan.docs_skipped, len(ids), plan.dead.num_rows, nm.ntotal, by, embed_seconds,
                      time.perf_counter() - t0)


@dataclass
class DeleteSummary:
    path: str
    version: str
    parent: str
    docs_deleted: int
    chunks_deleted: int
    ntotal: int
    seconds: float

    def line(self) -> str:
        return (f"deleted {self.docs_deleted:,} docs ({self.chunks_deleted:,} chunks masked in every search mode); "
                f"{self.ntotal:,} vectors; {self.seconds:.1f}s; LATEST {self.parent} -> {self.version}")


def delete(index_path: str, doc_ids: list[str] | None = None, where: list[str] | None = None, *,
           keep_versions: int | None = None) -> DeleteSummary:
    """Delete documents (``doc_ids``, or every document whose chunks match ``where``, see
    ``sharding.freshness.parse_where``) as a new version: their chunks are masked by tombstones in the segments
    that hold them, so no search mode, docstore lookup or evaluation returns them; compaction drops them."""
    import pyarrow.compute as pc

    from sharding.freshness import (
        by_segment,
        live_ids,
        matches,
        parse_where,
        read_stats,
        rows_of,
        set_tombstones,
        stats_of,
    )
    from sharding.freshness import write_stats as write_lex_stats
    from sharding.index import carried_manifest
    from sharding.search import shard_segments
    from sharding.versions import WriterLock

    t0 = time.perf_counter()
    if bool(doc_ids) == bool(where):
        raise RagtuneError("say what to delete with exactly one of --doc-id ID [ID ...] and --where FILTER")
    cond = parse_where(where) if where else None  # a bad filter fails before the lock
    root = _root(index_path)
    with WriterLock(root, f"ragtune index delete {' '.join(doc_ids or where or [])[:80]}"):
        base_dir, m = _latest(root)
        if doc_ids:
            t = live_ids(base_dir, m)
            t = t.filter(pc.is_in(t["doc_id"], value_set=pa.array(sorted(set(doc_ids)), pa.string())))
            unknown = sorted(set(doc_ids) - set(t["doc_id"].to_pylist()))
            if unknown:
                raise RagtuneError(f"--doc-id: {len(unknown)} of {len(set(doc_ids))} doc ids are not in {root.uri}/"
                                   f"{m.version}: {unknown[:5]}. Fix: check the ids (`ragtune search` prints them); "
                                   "nothing was deleted")
        else:
            assert cond is not None
            t = live_ids(base_dir, m, ("chunk_id", "doc_id", "title", "metadata"))
            keep = [matches(r, cond) for r in t.select(["doc_id", "title", "metadata"]).to_pylist()]
            t = t.filter(pa.array(keep, pa.bool_()))
            if t.num_rows == 0:
                raise RagtuneError(f"--where {' '.join(where or [])!r} matches no chunk of {root.uri}/{m.version} "
                                   f"(fields: doc_id, title, or a metadata key). Fix: check the field names and "
                                   "values; nothing was deleted")
        version = next_version(root)
        vdir = root.join(version)
        nm = carried_manifest(m, version)
        new_dead = dict(by_segment(t.select(["chunk_id", "shard", "seg"])))
        for n in sorted({key[0] for key in new_dead}):
            dead = [g.dead for g in shard_segments(base_dir, m, n)]
            for pos in range(len(dead)):
                if (n, pos) in new_dead:
                    dead[pos] = np.union1d(dead[pos], new_dead[(n, pos)])
            set_tombstones(vdir, nm.shards[n], n, dead)
        if nm.lexical is not None:
            removed = rows_of(base_dir, m, t.select(["chunk_id", "shard", "seg"]), ["chunk_id", "title", "text"])
            stats = read_stats(base_dir, m).minus(stats_of(removed, nm.lexical.params))
            nm.lexical.stats = write_lex_stats(vdir, stats)
            nm.lexical.n_docs, nm.lexical.avg_len, nm.lexical.terms = stats.n_docs, stats.avg_len, len(stats.df)
        docs = len(set(t["doc_id"].to_pylist()))
        _finish(root, vdir, nm, m, "delete", t0, {"docs_deleted": docs, "chunks_deleted": t.num_rows})
    keep = _keep_versions(m, keep_versions)
    if keep:
        gc(index_path, keep=keep)
    return DeleteSummary(root.uri, version, m.version, docs, t.num_rows, nm.ntotal, time.perf_counter() - t0)


@dataclass
class CompactSummary:
    path: str
    version: str
    parent: str
    changed: bool
    shards_compacted: int
    reasons: dict[str, str]
    vectors_dropped: int  # masked vectors removed for good
    ntotal: int
    search_params: dict[str, int]
    recall: float | None  # recall@10 re-measured after compaction (None: exact kind, or not measurable)
    target_recall: float | None
    seconds: float
    recall_before: float | None = None  # --check-recall: recall@10 of the version compaction started from

    def line(self) -> str:
        before = "" if self.recall_before is None else f"; recall@{K} {self.recall_before:.3f} is above its target"
        if not self.changed:
            return (f"nothing to compact in {self.path}/{self.version} (no shard passed the thresholds{before}; "
                    "--force compacts anyway)")
        tuned = (f"; recall@{K} {self.recall:.3f} at {', '.join(f'{k}={v}' for k, v in self.search_params.items())} "
                 f"(target {self.target_recall})" if self.recall is not None else "")
        return (f"compacted {self.shards_compacted} shard(s), {self.vectors_dropped:,} masked vectors dropped; "
                f"{self.ntotal:,} vectors{tuned}; {self.seconds:.1f}s; LATEST {self.parent} -> {self.version}")


def compact(index_path: str, *, force: bool = False, threshold: float = COMPACT_THRESHOLD,
            max_deltas: int = COMPACT_MAX_DELTAS, check_recall: bool = False,
            keep_versions: int | None = None) -> CompactSummary:
    """Fold the deltas and tombstones of every shard that passed ``threshold`` (or all with ``force``; or all
    when ``check_recall`` measures the current version below its target recall) into one base file per shard,
    as a new version; rebuild every BM25 file with fresh statistics; re-measure recall@10 and re-tune the search
    parameters as the index job does (approximate kinds)."""
    from sharding.docstore import write_docstore
    from sharding.freshness import (
        compaction_reason,
        exact_storage,
        fold_segments,
        live_ids,
        live_vectors,
        segment_files,
        segment_vectors,
        stats_of,
        trained_index,
        with_trained_file,
        write_lexical,
        write_stats,
    )
    from sharding.index import carried_manifest, deserialize, read_index_file, write_index_file
    from sharding.lexical import CorpusStats, lexical_delta_name, lexical_name
    from sharding.search import candidate_params, shard_segments
    from sharding.versions import WriterLock

    t0 = time.perf_counter()
    if not 0 < threshold:
        raise RagtuneError(f"--threshold {threshold}: must be positive, e.g. 0.1 (10% of a shard's base)")
    root = _root(index_path)
    with WriterLock(root, "ragtune index compact"):
        base_dir, m = _latest(root)
        reasons = {n: "--force" if force else compaction_reason(rec, threshold, max_deltas)
                   for n, rec in enumerate(m.shards)}
        ix_cfg = (m.config.get("index") or {})
        target = float(m.recall.get("target") or ix_cfg.get("target_recall") or 0.95)
        before = current_recall(base_dir, m) if check_recall and not force else None
        if before is not None and before < target:  # recall drifted: every shard, re-tuned
            reasons = {n: f"recall@{K} {before:.3f} < target {target}" for n in range(len(m.shards))}
        todo = {n: r for n, r in reasons.items() if r}
        if not todo:
            return CompactSummary(root.uri, m.version, m.version, False, 0, {}, 0, m.ntotal, m.search_params,
                                  None, None, time.perf_counter() - t0, before)
        version = next_version(root)
        vdir = root.join(version)
        makedirs(vdir.join(DOCSTORE_DIR))
        nm = carried_manifest(m, version)
        trained, derived = trained_index(base_dir, m)
        if derived:
            with_trained_file(nm, vdir, trained)
        live = live_ids(base_dir, m, ("chunk_id", "doc_id"))
        sample = deserialize(trained)  # an empty index of the same kind
        measure = candidate_params(sample) != [{}] and exact_storage(sample) and live.num_rows > 20
        k = min(K, live.num_rows - 1)
        qids = np.zeros(0, np.int64)
        if measure:  # held-out live vectors of the compacted shards, as the index job holds them out
            in_todo = np.isin(live["shard"].to_numpy(), list(todo))
            pool = live["chunk_id"].to_numpy()[in_todo]
            nq = min(int(ix_cfg.get("tune_queries") or 1000), max(1, live.num_rows // 10), len(pool))
            qids = np.sort(np.random.default_rng(int(ix_cfg.get("seed") or 0)).choice(pool, nq, replace=False))
        folded, held, dropped = {}, {}, 0
        for n in todo:
            rec = m.shards[n]
            segs = shard_segments(base_dir, m, n)
            shas = [rec.sha256] + [d.sha256 for d in rec.deltas]
            indexes = [read_index_file(base_dir.join(f), sha, 0) for (f, _, _), sha in zip(segment_files(rec), shas,
                                                                                           strict=True)]
            dropped += sum(len(g.dead) for g in segs)
            folded[n], held[n] = fold_segments(indexes, [g.dead for g in segs], trained,
                                               qids if measure else None)
            rows = live.filter(pa.array(live["shard"].to_numpy() == n))
            doc_rows = _live_rows(base_dir, m, n)
            dsha, dsize = write_docstore(doc_rows, vdir.join(docstore_name(n)))
            nm.shards[n] = ShardRecord(file=shard_name(n), ntotal=0, sha256="", bytes=0, docstore=docstore_name(n),
                                       docstore_sha256=dsha, docstore_bytes=dsize, pieces=[])
            assert doc_rows.num_rows == rows.num_rows
        recall_row, tuning_rows = None, []
        if measure and len(qids):
            recall_row, tuning_rows = _tune_compacted(base_dir, m, folded, held, qids, k, target, live_vectors,
                                                      segment_vectors)
            nm.search_params = recall_row.params
            nm.recall = {"k": k, "recall": recall_row.recall, "target": target, "reached": recall_row.recall >= target,
                         "queries": len(qids), "queries_from": "held-out database vectors (at compaction)",
                         "qps": recall_row.qps}
            nm.tuning = [{"params": r.params, "recall": r.recall, "qps": r.qps} for r in tuning_rows]
        for n in todo:
            index = folded[n]
            if held[n] is not None and len(held[n][0]):
                index.add_with_ids(held[n][1], held[n][0])  # the held-out rows go back in, as at build time
            sha, size = write_index_file(index, vdir.join(shard_name(n)))
            r = nm.shards[n]
            r.ntotal, r.sha256, r.bytes = int(index.ntotal), sha, size
        if nm.lexical is not None:  # every BM25 file again, with the statistics of the live chunks
            makedirs(vdir.join("lexical"))
            lparams = nm.lexical.params
            per_seg = {}
            for n, rec in enumerate(nm.shards):
                if n in todo:
                    per_seg[(n, 0)] = _live_rows(vdir, nm, n)
                else:
                    for pos in range(1 + len(rec.deltas)):
                        per_seg[(n, pos)] = _live_rows(base_dir, m, n, pos)
            stats = CorpusStats()
            for t in per_seg.values():
                stats = stats.merge(stats_of(t, lparams))
            for (n, pos), t in per_seg.items():
                if pos == 0:
                    nm.lexical.shards[n] = write_lexical(vdir, lexical_name(n), t, lparams, stats)
                else:
                    nm.shards[n].deltas[pos - 1].lexical = write_lexical(vdir, lexical_delta_name(n, pos - 1), t,
                                                                         lparams, stats)
            nm.lexical.stats = write_stats(vdir, stats)
            nm.lexical.n_docs, nm.lexical.avg_len, nm.lexical.terms = stats.n_docs, stats.avg_len, len(stats.df)
        counts = {"shards_compacted": len(todo), "vectors_dropped": dropped}
        _finish(root, vdir, nm, m, "compact", t0, counts)
        if nm.ntotal != m.ntotal:
            raise RagtuneError(f"compaction changed the live vectors ({m.ntotal} -> {nm.ntotal}); LATEST now names "
                               f"{version}: reopen {m.version} by its folder and report this")
    keep = _keep_versions(m, keep_versions)
    if keep:
        gc(index_path, keep=keep)
    return CompactSummary(root.uri, version, m.version, True, len(todo), {str(n): r for n, r in todo.items()},
                          dropped, nm.ntotal, nm.search_params, recall_row.recall if recall_row else None,
                          target if recall_row else None, time.perf_counter() - t0, before)


def current_recall(vloc: Location, m: IndexManifest, seed: int = 0) -> float | None:
    """Recall@10 of a version at its tuned setting, re-measured as the index job measured it: on the real
    queries it was tuned on (``recall.queries_from``, when that file is still there), else on held-out live
    vectors (masked from every segment while searched; for HNSW they still sit in the graph, which makes this
    optimistic), against exact search over the other live vectors. None for exact kinds and kinds that keep
    only codes (no exact vectors to measure against)."""
    from pathlib import Path

    from sharding.freshness import exact_storage, live_vectors, trained_index
    from sharding.index import deserialize
    from sharding.search import ShardedIndex, candidate_params, drop_self, exact_knn, merge_topk, recall_at_k

    trained, _ = trained_index(vloc, m)
    sample = deserialize(trained)
    if candidate_params(sample) == [{}] or not exact_storage(sample):
        return None
    vecs = [live_vectors(vloc, m, n) for n in range(len(m.shards))]
    ids = np.concatenate([v[0] for v in vecs])
    if len(ids) < 20:
        return None
    rng = np.random.default_rng(seed)
    n_queries = int((m.config.get("index") or {}).get("tune_queries") or 1000)
    qfile = str(m.recall.get("queries_from") or "")
    k = min(K, len(ids) - 1)
    if qfile and Path(qfile).is_file():
        texts = read_query_texts(qfile)
        texts = [texts[i] for i in np.sort(rng.choice(len(texts), min(n_queries, len(texts)), replace=False))]
        xq, qids = local_encoder(m)(texts), np.full(len(texts), -1, np.int64)
    else:
        qids = np.sort(rng.choice(ids, min(n_queries, max(1, len(ids) // 10)), replace=False))
        order = np.argsort(ids)
        xq = np.concatenate([v[1] for v in vecs])[order][np.searchsorted(ids[order], qids)]
    true_D, true_I = np.zeros((len(xq), 0), np.float32), np.zeros((len(xq), 0), np.int64)
    for sid, sxb in vecs:
        keep = ~np.isin(sid, qids)
        D, I = exact_knn(xq, sxb[keep], k + 1, m.metric)
        true_D, true_I = merge_topk([true_D, D], [true_I, np.where(I >= 0, sid[keep][np.maximum(I, 0)], -1)], k + 1,
                                    m.metric)
    _, true_I = drop_self(true_D, true_I, qids, k)
    index = ShardedIndex.open(vloc.uri, verify=False, mmap=False)
    for seg in index.segments:  # the held-out vectors are masked too, as if they were not in the index
        seg.dead, seg._selector = np.union1d(seg.dead, qids[qids >= 0]), None
    D, I = index.search(xq, k + 1)
    _, I = drop_self(D, I, qids, k)
    return recall_at_k(I, true_I, k)


def _live_rows(vloc: Location, m: IndexManifest, n: int, pos: int | None = None) -> pa.Table:
    """The live docstore rows of shard ``n`` (every segment, or only segment ``pos``), sorted by chunk id."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from sharding.freshness import DOC_COLUMNS, segment_files
    from sharding.search import shard_segments

    segs = shard_segments(vloc, m, n)
    out = []
    for i, (_, doc, _) in enumerate(segment_files(m.shards[n])):
        if pos is not None and i != pos:
            continue
        t = pq.read_table(vloc.join(doc).path, filesystem=vloc.fs)
        t = t.select([c for c in DOC_COLUMNS if c in t.column_names])
        if len(segs[i].dead):
            t = t.filter(pc.invert(pc.is_in(t["chunk_id"], value_set=pa.array(segs[i].dead, pa.int64()))))
        out.append(t)
    return pa.concat_tables(out, promote_options="default").sort_by("chunk_id")


def _tune_compacted(base_dir: Location, m: IndexManifest, folded: dict[int, Any],
                    held: dict[int, tuple[np.ndarray, np.ndarray] | None], qids: np.ndarray, k: int, target: float,
                    live_vectors: Any, segment_vectors: Any) -> tuple[Any, list[Any]]:
    """Recall@k of the compacted version on held-out vectors, for each candidate setting, as the index job
    measures it: the held-out rows are out of the compacted shards while they are searched, the true
    neighbours are exact search over every other live vector, results are merged across shards."""
    from sharding.search import (
        Segment,
        ShardedIndex,
        TuneRow,
        candidate_params,
        drop_self,
        exact_knn,
        merge_topk,
        recall_at_k,
        shard_segments,
        tune,
    )

    xq = np.concatenate([h[1] for h in held.values() if h is not None and len(h[0])])
    hq = np.concatenate([h[0] for h in held.values() if h is not None and len(h[0])])
    order = np.argsort(hq)
    xq, hq = xq[order], hq[order]
    indexes, segments = [], []
    true_D, true_I = np.zeros((len(xq), 0), np.float32), np.zeros((len(xq), 0), np.int64)
    for n, rec in enumerate(m.shards):
        if n in folded:
            ids, xb = segment_vectors(folded[n])
            indexes.append(folded[n])
            segments.append(Segment(n, 0, np.zeros(0, np.int64)))
        else:
            ids, xb = live_vectors(base_dir, m, n)
            for (f, _, _), seg in zip([(rec.file, "", 0)] + [(d.file, "", 0) for d in rec.deltas],
                                      shard_segments(base_dir, m, n), strict=True):
                from sharding.index import read_index_file

                indexes.append(read_index_file(base_dir.join(f), None, 0))
                segments.append(seg)
        D, I = exact_knn(xq, xb, k + 1, m.metric)
        true_D, true_I = merge_topk([true_D, D], [true_I, np.where(I >= 0, ids[np.maximum(I, 0)], -1)], k + 1,
                                    m.metric)
    _, true_I = drop_self(true_D, true_I, hq, k)
    view = ShardedIndex(base_dir, m, indexes, segments=segments)
    rows = []
    for params in candidate_params(indexes[0]):
        view.set_params(params)
        t = time.perf_counter()
        D, I = view.search(xq, k + 1)
        seconds = time.perf_counter() - t
        _, I = drop_self(D, I, hq, k)
        rows.append(TuneRow(params, recall_at_k(I, true_I, k), len(xq) / seconds if seconds > 0 else 0.0))
    chosen, reached = tune(rows, target)
    if not reached:
        log.warning("after compaction no setting reached recall@%d >= %s (best %.3f at %s)", k, target, chosen.recall,
                    chosen.label())
    for index in folded.values():  # leave the compacted shards with the chosen setting applied
        from sharding.search import apply_params

        apply_params(index, chosen.params)
    return chosen, rows


@dataclass
class GcSummary:
    path: str
    kept: dict[str, str]
    deleted: list[str]
    incomplete: list[str]
    files_deleted: int
    dry_run: bool
    seconds: float

    def line(self) -> str:
        verb = "would delete" if self.dry_run else "deleted"
        kept = ", ".join(f"{v} ({why})" for v, why in sorted(self.kept.items()))
        return (f"gc {self.path}: {verb} {len(self.deleted)} version(s) {self.deleted} and {len(self.incomplete)} "
                f"unfinished folder(s), {self.files_deleted} file(s); kept {kept}")


def gc(index_path: str, keep: int = 3, *, grace_s: float | None = None, dry_run: bool = False) -> GcSummary:
    """Delete old versions: all but the ``keep`` newest complete ones, LATEST, leased ones and those superseded
    less than ``grace_s`` ago (``sharding.versions``); only files no kept version shares."""
    from sharding.versions import GRACE_S, WriterLock, collect, plan_gc

    t0 = time.perf_counter()
    root = _root(index_path)
    with WriterLock(root, f"ragtune index gc --keep {keep}"):
        plan = plan_gc(root, keep, GRACE_S if grace_s is None else grace_s)
        if not dry_run:
            collect(root, plan)
    return GcSummary(root.uri, plan.keep, plan.delete, plan.incomplete, len(plan.files), dry_run,
                     time.perf_counter() - t0)


@dataclass
class HistorySummary:
    path: str
    latest: str
    rows: list[dict[str, Any]]

    def line(self) -> str:
        out = [f"{self.path}: LATEST -> {self.latest}",
               "| version | operation | from | written | seconds | vectors | counts | on disk |", "|---|" * 8]
        for r in self.rows:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["at"])) if r.get("at") else "-"
            counts = ", ".join(f"{k} {v:,}" for k, v in (r.get("counts") or {}).items())
            out.append(f"| {r['version']} | {r.get('operation', '-')} | {r.get('parent') or '-'} | {when} | "
                       f"{r.get('seconds', 0):.1f} | {r.get('ntotal', 0):,} | {counts} | {r['state']} |")
        return "\n".join(out)


def history(index_path: str) -> HistorySummary:
    """The versions of an index: the history recorded in LATEST's manifest, and what is on disk of each."""
    from sharding.versions import read_leases, version_states

    root = _root(index_path)
    latest = read_latest(root) or ""
    _, m = _latest(root)
    leased: dict[str, int] = {}
    now = time.time()
    for le in read_leases(root):
        if le.get("expires_at", 0) > now:
            leased[le.get("version", "")] = leased.get(le.get("version", ""), 0) + 1
    states = version_states(root)
    rows, seen = [], set()
    for e in m.entries():
        seen.add(e.version)
        rows.append({**e.model_dump(), "state": _state(e.version, states, latest, leased)})
    for name in states:
        if name not in seen:
            rows.append({"version": name, "state": _state(name, states, latest, leased)})
    rows.sort(key=lambda r: r["version"])
    return HistorySummary(root.uri, latest, rows)


def _state(v: str, states: dict[str, str], latest: str, leased: dict[str, int]) -> str:
    state = {"complete": "LATEST" if v == latest else "complete", "collected": "collected (shared files kept)",
             "unfinished": "unfinished (no manifest)",
             "abandoned": "abandoned (written, LATEST never named it)"}.get(states.get(v, ""), "deleted by gc")
    return state + (f", {leased[v]} lease(s)" if v in leased else "")


# --- `ragtune index add|delete|compact|gc|history` ----------------------------------------------------------

OPS = ("add", "delete", "compact", "gc", "history")


def ops_parser() -> Any:
    """The parser of ``ragtune index <op>`` (jobs/cli.py hands every ``ragtune index add ...`` to it)."""
    import argparse

    parser = argparse.ArgumentParser(prog="ragtune index", description="Change an index without rebuilding it: "
                                     "each operation writes a new version and switches LATEST (docs/index.md).")
    sub = parser.add_subparsers(dest="op", required=True, metavar="OP")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-i", "--index", required=True, help="the index root (the folder that holds LATEST)")
    writes = argparse.ArgumentParser(add_help=False)
    writes.add_argument("--gc-keep", type=int, metavar="N",
                        help="then garbage-collect all but the N newest versions (default: index.keep_versions)")
    a = sub.add_parser("add", parents=[common, writes], help="add new and changed documents (a new version)")
    src = a.add_mutually_exclusive_group(required=True)
    src.add_argument("--corpus", nargs="+", metavar="PATH", help="new documents: JSONL, Parquet, text files, URIs")
    src.add_argument("--embeddings", metavar="DIR", help="or embedding parts by `ragtune embed` (same model, chunker)")
    a.add_argument("--text-field", help="corpus field with the text (default: as the index's embed job read it)")
    a.add_argument("--id-field", help="corpus field with the document id (default: as the embed job)")
    a.add_argument("--title-field", help="corpus field with the title (default: as the embed job)")
    a.add_argument("--ray-above", type=int, default=ADD_RAY_ABOVE, metavar="N",
                   help=f"embed on Ray Data (the embed job) above N chunks, else in this process "
                        f"(default {ADD_RAY_ABOVE:,})")
    a.add_argument("--batch-size", type=int, default=64, help="texts per forward pass when embedding here")
    a.add_argument("--address", help="Ray cluster for large adds (default: RAY_ADDRESS, else a local Ray)")
    d = sub.add_parser("delete", parents=[common, writes], help="delete documents (masked by tombstones)")
    what = d.add_mutually_exclusive_group(required=True)
    what.add_argument("--doc-id", nargs="+", metavar="ID", help="documents to delete")
    what.add_argument("--where", action="append", metavar="FILTER",
                      help="documents whose chunks match: field=value[,value] or a JSON object (repeat: AND)")
    c = sub.add_parser("compact", parents=[common, writes], help="fold deltas and tombstones into the shards")
    c.add_argument("--force", action="store_true", help="compact every shard, whatever the thresholds")
    c.add_argument("--threshold", type=float, default=COMPACT_THRESHOLD,
                   help=f"compact shards whose delta + masked vectors exceed this share of the base (default "
                        f"{COMPACT_THRESHOLD})")
    c.add_argument("--max-deltas", type=int, default=COMPACT_MAX_DELTAS,
                   help=f"... or that have more deltas than this (default {COMPACT_MAX_DELTAS})")
    c.add_argument("--check-recall", action="store_true",
                   help="re-measure recall@10 as at build time; below the target, compact (and re-tune) every shard")
    g = sub.add_parser("gc", parents=[common], help="delete old versions (never LATEST or a leased one)")
    g.add_argument("--keep", type=int, default=3, help="complete versions to keep, newest first (default 3)")
    g.add_argument("--grace", type=float, default=None, metavar="SECONDS",
                   help="also keep versions superseded less than this ago (default 600)")
    g.add_argument("--dry-run", action="store_true", help="say what would be deleted, delete nothing")
    h = sub.add_parser("history", parents=[common], help="the versions: operation, counts, times, state")
    h.set_defaults(op="history")
    return parser


def ops_main(argv: list[str]) -> int:
    """``ragtune index <op> ...``: run one operation, print its line and (writes) the JSON summary."""
    import dataclasses

    args = ops_parser().parse_args(argv)
    if args.op == "add":
        summary: Any = add(args.index, corpus=args.corpus, embeddings=args.embeddings, text_field=args.text_field,
                           id_field=args.id_field, title_field=args.title_field, ray_above=args.ray_above,
                           batch_size=args.batch_size, keep_versions=args.gc_keep, address=args.address)
    elif args.op == "delete":
        summary = delete(args.index, args.doc_id, args.where, keep_versions=args.gc_keep)
    elif args.op == "compact":
        summary = compact(args.index, force=args.force, threshold=args.threshold, max_deltas=args.max_deltas,
                          check_recall=args.check_recall, keep_versions=args.gc_keep)
    elif args.op == "gc":
        summary = gc(args.index, keep=args.keep, grace_s=args.grace, dry_run=args.dry_run)
    else:
        print(history(args.index).line())
        return 0
    print(summary.line())
    print(json.dumps(dataclasses.asdict(summary)))  # the last line: machine-readable
    return 0

if __name__ == "__main__":
    from jobs.cli import module_main

    module_main("index")
