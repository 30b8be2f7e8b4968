"""The index job, `ragtune search` and `ragtune eval-retrieval` on a real local Ray, on real data (SQuAD v1.1).

The reference numbers (FACTS.md) were measured outside ragtune with all-MiniLM-L6-v2 and exact cosine search,
each paragraph embedded whole as "title text" (max 256 tokens). The embed fixture cuts chunks of 254 (+2
special) tokens with the title prepended ("title\\ntext", the same tokens for this tokenizer); paragraphs longer
than that become two chunks, and documents are ranked by their best chunk.
"""

import json

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import jobs.index
from configs.errors import RagtuneError
from configs.schema import IndexJobConfig
from jobs.cli import main
from jobs.index import build_shard, check, run
from jobs.search import evaluate_index
from sharding.docstore import write_docstore
from sharding.embeddings import EmbeddingManifest, read_part_table, vectors_to_arrow, write_manifest, write_part
from sharding.faiss_index import ShardBuilder, new_index, serialize, train_index, write_index_file
from sharding.layout import plan_shards
from sharding.search import ShardedIndex
from sharding.storage import makedirs, resolve
from sharding.tuning import apply_params, recall_at_k
from tests.conftest import REPO

REFERENCE = {"ndcg@10": 0.772, "recall@10": 0.917, "recall@100": 0.991, "mrr@10": 0.725}
QUESTION = "Which NFL team won Super Bowl 50?"  # its paragraph is sq00p000 (ranked 2nd, after sq00p001)


def config(emb, root, **index) -> IndexJobConfig:
    return IndexJobConfig.model_validate({"embeddings": {"path": str(emb)}, "index": {"path": str(root), **index}})


# --- checks before any work (no Ray) ----------------------------------------------------------------------------

def test_missing_or_unfinished_embeddings_are_refused(tmp_path):
    with pytest.raises(RagtuneError, match=r"embeddings.path = .* holds no _manifest.json. Fix: run `ragtune embed`"):
        check(config(tmp_path / "nothing", tmp_path / "index"))
    (tmp_path / "emb").mkdir()
    write_manifest(resolve(str(tmp_path / "emb")), EmbeddingManifest(
        model={"name": "m"}, normalize=True, metric="inner_product", chunker={}, corpus={}, num_parts=3))
    with pytest.raises(RagtuneError, match=r"are not complete \(state 'running', 0/3 parts\). Fix: rerun"):
        check(config(tmp_path / "emb", tmp_path / "index"))


def test_validate_checks_the_embeddings_without_importing_faiss_ray_or_torch(tmp_path):
    import subprocess
    import sys

    cfg = tmp_path / "index.yaml"
    cfg.write_text(f"embeddings:\n  path: {tmp_path}/emb\nindex:\n  path: {tmp_path}/index\n")
    code = ("import sys; from jobs.cli import main\n"
            f"rc = main(['validate', '--job', 'index', {str(cfg)!r}])\n"
            "heavy = sorted(m for m in ('torch', 'ray', 'faiss', 'transformers') if m in sys.modules)\n"
            "print('RESULT', rc, heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert "RESULT 1 []" in out.stdout, out.stdout + out.stderr
    assert "holds no _manifest.json" in out.stdout


def test_auto_plans_over_the_clusters_alive_nodes(tmp_path, monkeypatch, caplog):
    """index.max_nodes auto: preflight (no Ray) plans for one node; the job, once Ray is up, for the alive nodes."""
    from cluster.placement import NodeResources
    from sharding.embeddings import PartRecord

    emb = resolve(str(tmp_path / "emb"))  # 10M x 384 listed in the manifest (no part files: nothing is read)
    parts = {f"{i:05d}": PartRecord(file=f"part-{i:05d}.parquet", rows=100_000, embedded=100_000, sha256="0" * 64,
                                    bytes=100_000 * 1836) for i in range(100)}
    makedirs(emb)
    write_manifest(emb, EmbeddingManifest(model={"name": "m"}, dim=384, normalize=True, metric="inner_product",
                                          chunker={}, corpus={}, num_parts=100, state="done", parts=parts))
    node = NodeResources(cpus=2, memory=16 * 2**30)
    cfg = config(tmp_path / "emb", tmp_path / "index", max_memory="4GiB")
    plan = check(cfg)
    assert (plan.choice.factory, plan.max_nodes) == ("IVF8192,PQ96np", 1)
    assert "would need 2 nodes of 4.0 GiB > index.max_nodes = 1" in plan.choice.reason

    monkeypatch.setattr(jobs.index, "alive_nodes", lambda: [node] * 3)
    with caplog.at_level("INFO", logger="ragtune.index"):
        layout = jobs.index._layout(cfg, plan)
    c = layout.plan.choice
    assert (c.factory, c.nodes, c.shards, layout.plan.max_nodes) == ("IVF8192,PQ48np,Refine(SQ8)", 2, 6, 3)
    assert layout.factory.endswith("Refine(SQ8)") and layout.needs_training
    assert len(layout.shards) >= c.shards  # the plan's shards (more only if a task would not fit half a node)
    assert "index.max_nodes auto: the cluster has 3 node(s)" in caplog.text
    assert "index.max_nodes = 3 nodes: IVF-PQ48 with SQ8 refinement" in caplog.text  # the reason, in the log
    assert "serving this index needs" not in caplog.text  # 2 nodes <= the 3 the cluster has

    monkeypatch.setattr(jobs.index, "alive_nodes", lambda: [node])  # one machine: today's choice
    assert jobs.index._layout(cfg, plan).plan.choice.factory == "IVF8192,PQ96np"
    monkeypatch.setattr(jobs.index, "alive_nodes", lambda: [node] * 3)
    pinned = config(tmp_path / "emb", tmp_path / "index", max_memory="4GiB", max_nodes=1)
    assert jobs.index._layout(pinned, check(pinned)).plan.choice.factory == "IVF8192,PQ96np"
    wide = config(tmp_path / "emb", tmp_path / "index", max_memory="4GiB", max_nodes=2)
    assert check(wide).choice.nodes == 2  # a number is used as given, before Ray is up


# --- real runs --------------------------------------------------------------------------------------------------

@pytest.mark.integration
@pytest.mark.timeout(600)
def test_every_chunk_is_in_exactly_one_shard_under_its_chunk_id(squad_flat_index, squad_embeddings):
    root, summary = squad_flat_index
    _, emb_summary, emb = squad_embeddings
    parts = pa.concat_tables([pq.read_table(p) for p in sorted(emb.glob("part-*.parquet"))])
    v1 = root / "v-00001"
    assert (summary.version, summary.shards, summary.ntotal) == ("v-00001", 2, emb_summary.chunks)
    assert (root / "LATEST").read_text().strip() == "v-00001"
    shards = [faiss.read_index(str(v1 / f"shard-{i:05d}.faiss")) for i in range(2)]  # kept: id_map lives in them
    ids = [faiss.vector_to_array(s.id_map) for s in shards]
    assert not set(ids[0]) & set(ids[1])
    assert sorted(np.concatenate(ids).tolist()) == sorted(parts["chunk_id"].to_pylist())
    m = json.loads((v1 / "manifest.json").read_text())
    assert (m["factory"], m["metric"], m["dim"], m["ntotal"]) == ("IDMap2,Flat", "inner_product", 384,
                                                                  emb_summary.chunks)
    assert m["recall"]["recall"] == 1.0 and m["recall"]["reached"] and m["model"]["name"] == "all-MiniLM-L6-v2"
    store = pa.concat_tables([pq.read_table(v1 / s["docstore"]) for s in m["shards"]])
    texts = dict(zip(parts["chunk_id"].to_pylist(), parts["text"].to_pylist(), strict=True))
    assert store.num_rows == parts.num_rows
    assert all(texts[c] == t for c, t in zip(store["chunk_id"].to_pylist(), store["text"].to_pylist(), strict=True))
    assert (v1 / "tuning.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_exact_index_reproduces_the_reference_retrieval_numbers(squad_flat_index, squad_queries):
    root, _ = squad_flat_index
    qids, xq, qrels = squad_queries
    m = evaluate_index(ShardedIndex.open(str(root / "v-00001")), xq, qids, qrels)
    assert m["queries"] == 10570 and m["queries_short"] == 0
    for name, ref in REFERENCE.items():
        assert abs(m[name] - ref) <= 0.005, (name, m[name], ref)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_auto_index_stays_within_001_of_exact_and_readers_keep_their_version(squad_flat_index, squad_embeddings,
                                                                             squad_queries):
    root, _ = squad_flat_index
    _, _, emb = squad_embeddings
    qids, xq, qrels = squad_queries
    reader = ShardedIndex.open(str(root))  # v-00001, opened before v-00002 is built
    D1, I1 = reader.search(xq[:200], 10)
    # exact_below=0 makes auto choose an approximate index even for these ~2k vectors
    summary = run(config(emb, root, kind="auto", exact_below=0))
    assert (summary.version, summary.kind, summary.factory) == ("v-00002", "hnsw", "IDMap2,HNSW32")
    assert "HNSW32 fits the budget" in summary.reason and summary.reached and summary.recall >= 0.95
    assert (root / "LATEST").read_text().strip() == "v-00002"
    D2, I2 = reader.search(xq[:200], 10)
    assert (I1 == I2).all() and np.array_equal(D1, D2)  # the old reader still answers from v-00001
    auto = ShardedIndex.open(str(root))
    assert auto.manifest.version == "v-00002" and set(auto.params) == {"efSearch"}
    exact = evaluate_index(reader, xq, qids, qrels)
    approx = evaluate_index(auto, xq, qids, qrels)
    for name in ("ndcg@10", "mrr@10", "recall@1", "recall@5", "recall@10", "recall@100"):
        assert abs(approx[name] - exact[name]) <= 0.01, (name, approx[name], exact[name])


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_tuning_on_real_questions_holds_for_the_other_questions(squad_flat_index, squad_embeddings, squad_queries,
                                                                squad_retrieval, tmp_path):
    """Held-out paragraph vectors are easy queries for IVF (their neighbours share their cell); questions are
    not. Tuned on 1,000 questions, the setting must hold on all 10,570. (The coarse quantizer trained by
    two-level clustering, which auto uses from 4,096 lists up: the job's path for it, on real embeddings.)"""
    root, _ = squad_flat_index
    _, _, emb = squad_embeddings
    qids, xq, _ = squad_queries
    summary = run(config(emb, tmp_path / "ivf", kind="IVF32,Flat", coarse_training="two_level",
                         tune_queries_path=str(squad_retrieval / "queries.jsonl")))
    m = json.loads((tmp_path / "ivf" / summary.version / "manifest.json").read_text())
    assert m["recall"]["queries_from"].endswith("queries.jsonl") and m["recall"]["queries"] == 1000
    assert summary.reached and summary.search_params["nprobe"] > 1
    _, I = ShardedIndex.open(str(tmp_path / "ivf")).search(xq, 10)
    _, I_true = ShardedIndex.open(str(root / "v-00001")).search(xq, 10)
    assert recall_at_k(I, I_true, 10) >= 0.93


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_search_command_prints_ranked_chunks(squad_flat_index, capsys):
    root, _ = squad_flat_index
    assert main(["search", "-i", str(root / "v-00001"), QUESTION, "-k", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "IDMap2,Flat" in out[0] and out[2] == f"query: {QUESTION}"
    hits = [line.split() for line in out[3:] if line.strip()]
    assert [h[0] for h in hits] == ["1", "2", "3"] and "sq00p000" in [h[2] for h in hits]
    assert all("Super Bowl 50:" in line for line in out[3:6])  # title, then the text
    assert main(["search", "-i", str(root), QUESTION, "other question", "--json", "-k", "5"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert [r["query"] for r in res] == [QUESTION, "other question"]
    hits = res[0]["results"]
    assert "sq00p000" in [h["doc_id"] for h in hits] and [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
    assert hits[0]["score"] >= hits[1]["score"] >= hits[4]["score"]


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_eval_retrieval_command_matches_the_library(squad_flat_index, squad_queries, squad_retrieval, tmp_path, capsys):
    root, _ = squad_flat_index
    qids, xq, qrels = squad_queries
    out = tmp_path / "m.json"
    assert main(["eval-retrieval", "-i", str(root / "v-00001"), "--queries", str(squad_retrieval / "queries.jsonl"),
                 "--qrels", str(squad_retrieval / "qrels" / "test.tsv"), "--limit", "300", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| ndcg@10 |" in printed and "| recall@100 |" in printed
    cli = json.loads(out.read_text())
    lib = evaluate_index(ShardedIndex.open(str(root / "v-00001")), xq[:300], qids[:300], qrels)
    assert cli["queries"] == 300
    for name in ("ndcg@10", "mrr@10", "recall@1", "recall@5", "recall@10", "recall@100"):
        assert cli[name] == pytest.approx(lib[name], abs=0.01)


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_a_corrupted_shard_is_a_one_line_error_naming_the_file(squad_flat_index, tmp_path, capsys):
    import shutil

    root, _ = squad_flat_index
    copy = tmp_path / "v-00001"
    shutil.copytree(root / "v-00001", copy)
    shard = copy / "shard-00001.faiss"
    shard.write_bytes(shard.read_bytes()[:5000])
    assert main(["search", "-i", str(copy), QUESTION]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "shard-00001.faiss: checksum mismatch" in err


# --- one shard task, in bounded memory (no Ray) ------------------------------------------------------------------

def _parts(tmp_path, sizes, d=16, seed=0):
    """Embedding parts as the embed job writes them: chunk rows with text, and their vectors."""
    rng = np.random.default_rng(seed)
    out = resolve(str(tmp_path / "emb"))
    makedirs(out)
    records, xbs = {}, []
    for i, n in enumerate(sizes):
        xb = rng.normal(size=(n, d)).astype(np.float32)
        xb /= np.linalg.norm(xb, axis=1, keepdims=True)
        ids = rng.integers(0, 2**63 - 1, size=n, dtype=np.int64)
        t = pa.table({"chunk_id": ids, "doc_id": pa.array([f"doc{i}-{j // 3}" for j in range(n)], pa.string()),
                      "chunk_index": pa.array([j % 3 for j in range(n)], pa.int32()),
                      "title": pa.array([f"title {i}" for _ in range(n)], pa.string()),
                      "text": pa.array([f"text of chunk {j} of part {i} " * (1 + j % 7) for j in range(n)],
                                       pa.string()),
                      "vector": vectors_to_arrow(xb)})
        rec = write_part(t.replace_schema_metadata({b"ragtune.model": b"test"}), out, i, n)
        records[rec.file] = rec
        xbs.append((ids, xb, t))
    return out, records, xbs


@pytest.mark.parametrize("factory", ["IVF16,Flat", "IVF16,PQ4np", "IDMap2,Flat", "IDMap2,HNSW8",
                                     "IDMap2,IVF16,PQ4np,Refine(SQ8)"])
def test_shard_task_streams_and_builds_the_same_shard_as_whole_parts(tmp_path, factory, monkeypatch):
    """build_shard reads batches of rows and writes its docstore in chunk-id ranges; the shard file and the
    docstore file are byte for byte those of adding whole parts and sorting the whole shard (the build before)."""
    faiss.omp_set_num_threads(1)  # HNSW links vectors in parallel otherwise: not reproducible even before
    emb, records, xbs = _parts(tmp_path, [700, 0, 1300, 45, 960])
    trained = serialize(train_index(new_index(factory, 16, "inner_product"), np.vstack([x for _, x, _ in xbs])))
    (pieces,) = plan_shards([(f, r.rows) for f, r in sorted(records.items())], 1)
    qids = np.concatenate([xbs[0][0][:5], xbs[2][0][100:103]])  # held-out tuning queries, added after the search
    xq = np.vstack([xbs[0][1][:5], xbs[2][1][100:103]])
    out = resolve(str(tmp_path / "v"))
    read, piece_batches = [], jobs.index.piece_batches

    def counted(*args, **kwargs):
        for t in piece_batches(*args, **kwargs):
            read.append((t.num_rows, "vector" in t.column_names))
            yield t

    monkeypatch.setattr(jobs.index, "piece_batches", counted)

    makedirs(out.join("docstore"))
    built = build_shard(0, pieces, emb.uri, records, trained, xq, qids, 5, "inner_product", out.uri, 1, None,
                        batch_rows=128, doc_bytes=20_000)  # many batches, many docstore ranges
    # the build before: whole parts added at once, every docstore row held and sorted at the end
    builder = ShardBuilder(faiss.deserialize_index(np.frombuffer(trained, dtype=np.uint8)))
    later = []
    for ids, xb, _ in xbs:
        held = np.isin(ids, qids)
        builder.add(ids[~held], xb[~held])
        later.append((ids[held], xb[held]))
    index = builder.finish()
    apply_params(index, built.candidates[-1])  # the tuning searches leave the last setting applied
    for ids, xb in later:
        index.add_with_ids(xb, ids)
    ref = resolve(str(tmp_path / "ref"))
    makedirs(ref.join("docstore"))
    sha, _ = write_index_file(index, ref.join("shard.faiss"))
    rows = [read_part_table(emb, records[p.part]).drop_columns(["vector"]) for p in pieces]  # with their metadata
    dsha, _ = write_docstore(pa.concat_tables(rows), ref.join("d.parquet"))
    assert built.record.ntotal == 3005 and built.record.sha256 == sha
    assert built.record.docstore_sha256 == dsha
    assert len(built.candidates) == len(built.searched) >= 1
    vectors = [n for n, v in read if v]  # at most one batch of vectors at a time (HNSW: one part)
    assert sum(vectors) == 3005 and (max(vectors) == 1300 if "HNSW" in factory else max(vectors) <= 128)
    texts = [n for n, v in read if not v]
    assert max(texts) <= 128 and sum(texts) > 3 * 3005  # the docstore read in several chunk-id ranges
