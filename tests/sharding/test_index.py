"""Sharded FAISS indexes without Ray: plans, the auto choice, exact merging, recall floors, files and versions."""

import math
import os

import faiss
import numpy as np
import pyarrow as pa
import pytest
from faiss.contrib.datasets import SyntheticDataset

from configs.errors import RagtuneError
from sharding.choice import (
    HNSW_MAX_VECTORS,
    choose_index,
    default_num_shards,
    estimate_bytes,
    explicit_choice,
    nlist_for,
    node_plan,
    pq_sizes,
    row_bytes,
    shard_task_bytes,
    shards_for_memory,
    train_task_bytes,
)
from sharding.docstore import write_docstore
from sharding.faiss_index import (
    ShardBuilder,
    coarse_training,
    effective_factory,
    new_index,
    serialize,
    train_index,
    write_index_file,
)
from sharding.layout import LATEST, docstore_name, plan_shards, sample_rows, shard_name, version_name
from sharding.manifest import (
    IndexManifest,
    ShardRecord,
    list_versions,
    read_index_manifest,
    resolve_index,
    switch_latest,
    write_index_manifest,
)
from sharding.search import ShardedIndex, check_queries, merge_topk
from sharding.storage import makedirs, resolve, sha256_hex
from sharding.tuning import (
    TuneRow,
    apply_params,
    candidate_params,
    drop_self,
    exact_knn,
    recall_at_k,
    search_candidates,
    tune,
)

GiB = 2**30


# --- helpers: build an index version in-process, the way the job's tasks do -------------------------------------

def chunk_ids(n, seed=0):
    """Ids shaped like the embed job's: random non-negative 63-bit, unique."""
    ids = np.random.default_rng(seed).integers(0, 2**63 - 1, size=n, dtype=np.int64)
    assert len(np.unique(ids)) == n
    return ids


def build_version(root, xb, ids, factory, num_shards, metric="inner_product", version=1, xt=None,
                  normalize=True, search_params=None):
    """Train once, add each shard's rows, write shards + docstore + manifest, switch LATEST."""
    d = xb.shape[1]
    factory = effective_factory(factory, d, metric)
    needs_training = not new_index(factory, d, metric).is_trained
    trained = train_index(new_index(factory, d, metric), xb if xt is None else xt)
    blob = serialize(trained)
    vdir = resolve(str(root)).join(version_name(version))
    makedirs(vdir.join("docstore"))
    records = []
    for s, pieces in enumerate(plan_shards([("part-00000.parquet", len(xb))], num_shards)):
        (p,) = pieces
        builder = ShardBuilder(faiss.deserialize_index(np.frombuffer(blob, dtype=np.uint8)))
        builder.add(ids[p.start:p.stop], xb[p.start:p.stop])
        sha, size = write_index_file(builder.finish(), vdir.join(shard_name(s)))
        rows = pa.table({"chunk_id": ids[p.start:p.stop], "doc_id": [f"d{i}" for i in range(p.start, p.stop)],
                         "text": [f"text {i}" for i in range(p.start, p.stop)]})
        dsha, dsize = write_docstore(rows, vdir.join(docstore_name(s)))
        records.append(ShardRecord(file=shard_name(s), ntotal=p.rows, sha256=sha, bytes=size,
                                   docstore=docstore_name(s), docstore_sha256=dsha, docstore_bytes=dsize,
                                   pieces=pieces))
    manifest = IndexManifest(version=version_name(version), factory=factory, kind="test", reason="test",
                             metric=metric, dim=d, normalize=normalize, ntotal=len(xb), shards=records,
                             model={"name": "test-model", "revision": "r1"},
                             trained={"sha256": sha256_hex(blob)} if needs_training else None,
                             search_params=search_params or {})
    write_index_manifest(vdir, manifest)
    switch_latest(resolve(str(root)), version_name(version))
    return vdir


def normalized(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


# --- shard plans -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sizes", [[1], [7], [0, 5, 0], [100, 100, 100, 100], [3, 1000, 2, 17, 0, 500],
                                   [517, 560, 602, 578], list(range(1, 40))])
@pytest.mark.parametrize("num_shards", [1, 2, 3, 4, 7, 16, 1000])
def test_shard_plans_cover_every_row_exactly_once(sizes, num_shards):
    parts = [(f"part-{i:05d}.parquet", n) for i, n in enumerate(sizes)]
    plan = plan_shards(parts, num_shards)
    total = sum(sizes)
    assert len(plan) == min(num_shards, total)
    seen = {name: np.zeros(n, dtype=int) for name, n in parts}
    for pieces in plan:
        assert pieces and all(0 <= p.start < p.stop for p in pieces)
        for p in pieces:
            seen[p.part][p.start:p.stop] += 1
    assert all((c == 1).all() for c in seen.values())
    per_shard = [sum(p.rows for p in pieces) for pieces in plan]
    avg = total / len(plan)  # each boundary moves at most 10% of a shard onto a part boundary
    assert all(abs(n - avg) <= 2 * 0.1 * avg + 1 for n in per_shard), per_shard


def test_parts_of_equal_size_are_not_split():
    plan = plan_shards([(f"p{i}", 500 + i) for i in range(4)], 2)
    assert [[p.part for p in pieces] for pieces in plan] == [["p0", "p1"], ["p2", "p3"]]
    assert all(p.start == 0 for pieces in plan for p in pieces)


def test_default_shards_one_per_2m_vectors_and_enough_for_a_gpu():
    assert default_num_shards(1000) == 1
    assert default_num_shards(4_000_001) == 3
    assert default_num_shards(1_000_000, est_bytes=40 * GiB, gpu_memory=16 * GiB) == 3


# --- the automatic choice --------------------------------------------------------------------------------------

@pytest.mark.parametrize("nb", [500, 9_999, 10_000, 200_000, 2_000_000, 20_000_000, 500_000_000])
@pytest.mark.parametrize("d", [384, 768, 100])
@pytest.mark.parametrize("budget", [64 * 2**20, GiB, 16 * GiB, 256 * GiB])
@pytest.mark.parametrize("use_gpu", [False, True])
def test_auto_choice_fits_the_budget_and_follows_the_rules(nb, d, budget, use_gpu):
    try:
        c = choose_index(nb, d, budget, use_gpu=use_gpu)
    except RagtuneError as e:
        assert "index.max_memory" in str(e) and "Fix:" in str(e)
        sizes = pq_sizes(d, use_gpu)  # no PQ code, or not even the coarsest code can be planned across nodes
        assert not sizes or node_plan(nb, d, budget, nlist_for(nb), sizes[-1], use_gpu=use_gpu) is None
        return
    assert c.est_bytes is not None and c.reason
    if c.nodes > 1:  # rule 6: nothing fits one node; each node holds its shards within the budget
        assert estimate_bytes("ivf_pq", nb, d, nlist=nlist_for(nb), m=pq_sizes(d, use_gpu)[-1]) > budget
        assert c.kind == "ivf_pq" and "Refine" not in c.factory and c.shards is not None
        assert c.est_bytes / c.nodes <= budget and f"{c.nodes} node(s)" in c.reason
        return
    assert c.est_bytes <= budget
    flat_fits = estimate_bytes("flat", nb, d) <= budget
    hnsw_fits = estimate_bytes("hnsw", nb, d, M=32) <= budget
    if nb < 10_000 and flat_fits:
        assert c.factory == "Flat" and c.train_size == 0
    elif not use_gpu and nb <= HNSW_MAX_VECTORS and hnsw_fits:
        assert c.factory == "HNSW32" and c.train_size == 0
    else:
        assert c.kind in ("hnsw", "ivf_flat", "ivf_pq")
        if use_gpu:
            assert c.kind != "hnsw" and "_HNSW" not in c.factory
        if c.kind != "hnsw":
            nlist = int(c.factory.split(",")[0].removeprefix("IVF").split("_")[0])
            assert 39 * nlist <= c.train_size <= nb
    if nb >= 10_000:
        effective_factory(c.factory, d, "inner_product")  # FAISS accepts every string the choice writes


def test_auto_choice_examples():
    assert choose_index(200_000, 384, 4 * GiB).factory == "HNSW32"
    assert choose_index(200_000, 384, 4 * GiB, use_gpu=True).factory == "IVF1024,Flat"
    assert choose_index(2_000, 384, GiB).factory == "Flat"
    assert choose_index(2_000, 384, GiB, exact_below=0).factory == "HNSW32"
    assert choose_index(50_000_000, 384, 128 * GiB).factory == "IVF16384,Flat"
    assert choose_index(50_000_000, 384, 64 * GiB).factory == "IVF16384,PQ48np,Refine(SQ8)"
    assert choose_index(100_000_000, 768, 128 * GiB).factory == "IVF32768,PQ96np,Refine(SQ8)"
    assert choose_index(100_000_000, 768, 16 * GiB).factory == "IVF32768,PQ96np"
    assert choose_index(1_000_000_000, 768, 128 * GiB).factory == "IVF65536_HNSW32,PQ96np"
    assert choose_index(200_000, 384, 4 * GiB, train_sample=20_000).factory == "HNSW32"
    assert choose_index(200_000, 384, 100 * 2**20, train_sample=20_000).factory.startswith("IVF512,")  # 39 x 512 <= 20k
    with pytest.raises(RagtuneError, match=r"no index kind fits index.max_memory = 1.0 MiB .* Fix: raise"):
        choose_index(1_000_000, 384, 2**20)


def test_auto_plans_across_nodes_when_no_node_holds_the_index():
    plans = {nb: choose_index(nb, 384, 4 * GiB, use_gpu=True) for nb in (1_000_000, 100_000_000, 1_000_000_000)}
    assert [(c.factory, c.nodes) for c in plans.values()] == [
        ("IVF2048,Flat", 1),  # fits one node: unchanged rules
        ("IVF32768,PQ32np", 1),  # IVF-Flat (144 GiB) does not fit: PQ, the largest code that fits one node
        ("IVF65536,PQ48np", 16),  # no code fits one node: d/8-byte codes over 16 nodes
    ]
    nlists = [nlist_for(nb) for nb in (1_000_000, 10_000_000, 100_000_000, 1_000_000_000, 10_000_000_000)]
    assert nlists == sorted(nlists) and nlists[-2] == 65536
    c = choose_index(1_000_000_000, 384, 4 * GiB)  # the CPU default: an HNSW coarse quantizer
    assert c.factory == "IVF65536_HNSW32,PQ48np" and (c.nodes, c.shards) == (16, 48)
    assert "48 B PQ48x8 code + 8 B id = 56 B" in c.reason and "nodes = ceil(1,000,000,000 / " in c.reason
    plan = node_plan(1_000_000_000, 384, 4 * GiB, 65536, 48)
    assert plan is not None and (plan.nodes, plan.shards, plan.shards_per_node) == (c.nodes, c.shards, 3)
    assert plan.bytes_per_node <= 0.9 * 4 * GiB  # 10% headroom
    assert plan.nodes == math.ceil(plan.total_bytes / plan.bytes_per_node)  # every node full but the last
    assert plan.nodes == math.ceil(1_000_000_000 / (plan.shards_per_node * plan.shard_vectors))
    assert plan.total_bytes == 1_000_000_000 * 56 + 48 * plan.bytes_per_shard_fixed
    more = choose_index(1_000_000_000, 384, 16 * GiB)  # a bigger node: fewer nodes, the same code
    assert more.factory == c.factory and more.nodes == 4
    assert choose_index(1_000_000_000, 768, 4 * GiB).factory == "IVF65536_HNSW32,PQ96np"
    with pytest.raises(RagtuneError, match=r"not even across nodes.*IVF65536,PQ24x8.*Fix: raise index.max_memory "
                                           r"to at least"):
        choose_index(1_000_000_000, 384, 100 * 2**20)  # 100 MiB: the quantizer alone is 96 MiB


def test_shard_task_memory_and_shards_sized_to_fit_it():
    kw = {"doc_row_bytes": 2000, "part_row_bytes": 2200}
    small, why = shard_task_bytes("ivf_pq", "IVF4096,PQ48np", 1_000_000, 384, **kw)
    big, _ = shard_task_bytes("ivf_pq", "IVF4096,PQ48np", 4_000_000, 384, **kw)
    assert small < big < 4 * small and "400.0 MiB base + max(add: 1.5 x " in why and "chunk-id range(s)" in why
    whole, _ = shard_task_bytes("ivf_pq", "IVF4096,PQ48np", 4_000_000, 384, doc_row_bytes=2000)
    assert whole > 2 * 4_000_000 * 2000 > big  # the docstore in one piece would dominate
    limit = 2 * GiB
    n = shards_for_memory("hnsw", "HNSW32", 10_000_000, 384, limit, **kw)
    fits = [shard_task_bytes("hnsw", "HNSW32", math.ceil(10_000_000 / s), 384, **kw)[0] <= limit for s in (n - 1, n)]
    assert fits == [False, True]  # the fewest shards whose tasks fit
    assert shards_for_memory("flat", "Flat", 5_000, 384, limit, **kw) == 1
    with pytest.raises(RagtuneError, match=r"a shard task of 65,536 vectors already needs .* Fix: use nodes"):
        shards_for_memory("flat", "Flat", 10**9, 384, 2**20, **kw)
    assert row_bytes(1_000_000 * (1536 + 300), 1_000_000, 384) == (900, 1836)


def test_training_task_memory_against_the_measured_peak():
    # bench/scale.py, 625k-chunk size: IVF8192,PQ96np trained on 409,600 x 384 from parts of 100,000 rows of
    # ~1,750 B; the training task's peak RssAnon was 2,403 MiB
    est, why = train_task_bytes(409_600, 384, 100_000, 1_750)
    assert 0.9 < est / (2403 * 2**20) < 1.15
    assert why.startswith("400.0 MiB base + 3 x 409,600 x 1536 B training matrix + 2 x 100,000 rows x 1750 B part")
    assert train_task_bytes(0, 384, 100_000, 1_750)[0] < est / 3  # Flat and HNSW need no training matrix


def test_explicit_factory_strings():
    c = explicit_choice("IVF1024,PQ48", 1_000_000, 384)
    assert (c.kind, c.train_size, c.est_bytes) == ("ivf_pq", 51_200, None)
    assert explicit_choice("HNSW32", 10, 384).kind == "hnsw"
    assert effective_factory("HNSW32", 8, "l2") == "IDMap2,HNSW32"
    assert effective_factory("IVF4,Flat", 8, "l2") == "IVF4,Flat"
    assert effective_factory("IVF4,PQ2,Refine(SQ8)", 8, "l2") == "IDMap2,IVF4,PQ2,Refine(SQ8)"
    with pytest.raises(RagtuneError, match=r"index.kind = 'HNSW32,Nonsense' is not a FAISS factory string"):
        effective_factory("HNSW32,Nonsense", 8, "l2")


# --- exact merging across shards -------------------------------------------------------------------------------

def test_merge_topk_ip_and_l2_with_missing_results():
    D1, I1 = np.array([[0.9, 0.5]], np.float32), np.array([[10, 11]])
    D2, I2 = np.array([[0.7, -3.4e38]], np.float32), np.array([[20, -1]])
    D, I = merge_topk([D1, D2], [I1, I2], 3, "inner_product")
    assert I.tolist() == [[10, 20, 11]] and np.allclose(D, [[0.9, 0.7, 0.5]])
    D, I = merge_topk([D1, D2], [I1, I2], 4, "inner_product")
    assert I.tolist() == [[10, 20, 11, -1]]
    D, I = merge_topk([np.array([[1.0, 4.0]]), np.array([[2.0, 3.4e38]])], [np.array([[1, 2]]), np.array([[3, -1]])],
                      3, "l2")
    assert I.tolist() == [[1, 3, 2]]


@pytest.mark.parametrize("metric", ["inner_product", "l2"])
@pytest.mark.parametrize("num_shards", [2, 4, 7])
def test_sharded_exact_search_equals_one_flat_index(tmp_path, metric, num_shards):
    rng = np.random.default_rng(1)
    xb = rng.normal(size=(3000, 32)).astype(np.float32)
    xb[100:110] = xb[5]  # exact ties across shards
    if metric == "inner_product":
        xb = normalized(xb)
    ids = chunk_ids(len(xb))
    xq = np.vstack([xb[5:6], rng.normal(size=(49, 32))]).astype(np.float32)
    if metric == "inner_product":
        xq = normalized(xq)
    build_version(tmp_path, xb, ids, "Flat", num_shards, metric)
    index = ShardedIndex.open(str(tmp_path))
    assert len(index.shards) == num_shards and index.ntotal == len(xb)
    D, I = index.search(xq, 20)
    D_ref, I_ref = exact_knn(xq, xb, 20, metric)
    I_ref = ids[I_ref]
    np.testing.assert_allclose(D, D_ref, rtol=1e-5, atol=1e-5)
    row_of = {c: i for i, c in enumerate(ids.tolist())}
    for q in range(len(xq)):
        x = xb[[row_of[c] for c in I[q].tolist()]]  # every id returned has the distance reported
        true = x @ xq[q] if metric == "inner_product" else ((x - xq[q]) ** 2).sum(1)
        np.testing.assert_allclose(true, D[q], rtol=1e-4, atol=1e-4)
        for v in np.unique(D_ref[q]):  # same ids in the same order, except inside groups of equal distance
            group = np.isclose(D_ref[q], v, atol=1e-6)
            if group.sum() == 1:
                assert I[q][group] == I_ref[q][group]
            elif not group[-1]:  # a tie group cut by k may hold any of its members
                assert set(I[q][group]) == set(I_ref[q][group])


def test_ivf_shards_trained_once_equal_one_ivf_index(tmp_path):
    ds = SyntheticDataset(32, 4000, 6000, 50, metric="IP")
    xb, xq = normalized(ds.get_database()), normalized(ds.get_queries())
    ids = chunk_ids(len(xb))
    build_version(tmp_path / "one", xb, ids, "IVF64,Flat", 1, xt=normalized(ds.get_train()))
    build_version(tmp_path / "four", xb, ids, "IVF64,Flat", 4, xt=normalized(ds.get_train()))
    one = ShardedIndex.open(str(tmp_path / "one"), params={"nprobe": 8})
    four = ShardedIndex.open(str(tmp_path / "four"), params={"nprobe": 8})
    D1, I1 = one.search(xq, 10)
    D4, I4 = four.search(xq, 10)
    np.testing.assert_allclose(D1, D4, rtol=1e-6)
    assert (I1 == I4).mean() > 0.99  # identical up to ties
    merged = ShardedIndex.open(str(tmp_path / "four"), params={"nprobe": 8}, merge=True)
    assert len(merged.shards) == 1 and merged.ntotal == len(xb)
    Dm, Im = merged.search(xq, 10)
    np.testing.assert_allclose(D1, Dm, rtol=1e-6)
    assert (I1 == Im).mean() > 0.99


@pytest.mark.parametrize("factory", ["IVF64,Flat", "IVF64,PQ8np", "IVF64_HNSW16,Flat"])
@pytest.mark.parametrize("metric", ["inner_product", "l2"])
def test_ivf_shards_quantized_once_equal_each_shard_searched_alone(tmp_path, factory, metric):
    ds = SyntheticDataset(32, 10_000, 6000, 60, metric="IP" if metric == "inner_product" else "L2")
    xb, xq, xt = ds.get_database(), ds.get_queries(), ds.get_train()
    if metric == "inner_product":
        xb, xq, xt = normalized(xb), normalized(xq), normalized(xt)
    ids = chunk_ids(len(xb))
    build_version(tmp_path, xb, ids, factory, 4, metric, xt=xt)
    params = {"nprobe": 8, **({"quantizer_efSearch": 32} if "HNSW" in factory else {})}
    once, each = (ShardedIndex.open(str(tmp_path), params=params) for _ in range(2))  # two copies of the shards
    assert once._shared_ivf() is not None
    for index in (once, each):  # tombstones: the selectors go to search_preassigned too
        index.segments[1].mask(ids[1500:1600])
        index.segments[3].mask(ids[4600:4605])
    for nq in (1, 3, 30, 60):  # one query; fewer than threads; BLAS for the batch, not its slices; several
        D, I = once.search(xq[:nq], 10)
        Ds, Is = zip(*each.search_each(xq[:nq], 10), strict=True)
        D_ref, I_ref = merge_topk(Ds, Is, 10, metric)
        np.testing.assert_array_equal(I, I_ref)
        np.testing.assert_array_equal(D, D_ref)  # bit for bit: the same coarse distances, the same scans
    assert not np.isin(I, ids[1500:1600]).any()


@pytest.mark.parametrize("factory", ["Flat", "HNSW8", "IVF16,PQ4np,Refine(SQ8)"])
def test_other_kinds_search_each_shard(tmp_path, factory):
    xb = normalized(np.random.default_rng(0).normal(size=(2000, 16)))
    build_version(tmp_path, xb, chunk_ids(2000), factory, 3)
    assert ShardedIndex.open(str(tmp_path))._shared_ivf() is None
    build_version(tmp_path / "one", xb, chunk_ids(2000), "IVF16,Flat", 1)
    assert ShardedIndex.open(str(tmp_path / "one"))._shared_ivf() is None  # one shard: nothing to share


def test_flat_shards_merge_and_hnsw_shards_stay_apart(tmp_path):
    xb = normalized(np.random.default_rng(0).normal(size=(400, 16)))
    build_version(tmp_path / "flat", xb, chunk_ids(400), "Flat", 3)
    build_version(tmp_path / "hnsw", xb, chunk_ids(400), "HNSW8", 3)
    flat = ShardedIndex.open(str(tmp_path / "flat"), merge=True)
    assert len(flat.shards) == 1
    D, I = flat.search(xb[:5], 4)
    D3, I3 = ShardedIndex.open(str(tmp_path / "flat")).search(xb[:5], 4)
    assert (I == I3).all()
    assert len(ShardedIndex.open(str(tmp_path / "hnsw"), merge=True).shards) == 3


# --- recall floors and tuning on structured synthetic data -------------------------------------------------------

@pytest.mark.parametrize("factory", ["IVF64,Flat", "HNSW32", "IVF64,PQ8np,Refine(SQ8)"])
def test_recall_floor_after_tuning(factory):
    """faiss's SyntheticDataset: 'not completely random but still challenging'. Tune as the job does (held-out
    database vectors, left out of the index while it is searched), then check the recall on the dataset's own
    queries at the chosen setting."""
    ds = SyntheticDataset(32, 5000, 20000, 200, metric="IP")
    xb, xq = normalized(ds.get_database()), normalized(ds.get_queries())
    ids = chunk_ids(len(xb))
    held = np.zeros(len(xb), dtype=bool)
    held[np.random.default_rng(0).choice(len(xb), 300, replace=False)] = True
    b = ShardBuilder(train_index(new_index(effective_factory(factory, 32, "inner_product"), 32, "inner_product"),
                                 normalized(ds.get_train())))
    b.add(ids[~held], xb[~held])
    index = b.finish()
    _, true_I = exact_knn(xb[held], xb[~held], 10, "inner_product")
    true_I = ids[~held][true_I]
    candidates = candidate_params(index)
    searched = search_candidates(index, xb[held], 10, candidates)
    rows = [TuneRow(params, recall_at_k(I, true_I), held.sum() / secs)
            for params, (_, I, secs) in zip(candidates, searched, strict=True)]
    chosen, reached = tune(rows, 0.95)
    assert reached and chosen.recall >= 0.95
    assert rows.index(chosen) == next(i for i, r in enumerate(rows) if r.recall >= 0.95)  # the cheapest
    index.add_with_ids(xb[held], ids[held])
    apply_params(index, chosen.params)
    _, I = index.search(xq, 10)
    _, I_true = exact_knn(xq, xb, 10, "inner_product")
    assert recall_at_k(I, ids[I_true]) >= 0.93, (factory, chosen)


def test_tune_picks_cheapest_reaching_target_or_best():
    rows = [TuneRow({"nprobe": 1}, 0.5, 9000), TuneRow({"nprobe": 2}, 0.96, 5000), TuneRow({"nprobe": 4}, 0.99, 3000)]
    assert tune(rows, 0.95) == (rows[1], True)
    assert tune(rows, 0.995) == (rows[2], False)


def test_recall_and_drop_self():
    D, I = drop_self(np.array([[1.0, 0.9, 0.8]]), np.array([[7, 3, 4]]), np.array([7]), 2)
    assert I.tolist() == [[3, 4]] and np.allclose(D, [[0.9, 0.8]])
    assert recall_at_k(np.array([[1, 2, 3]]), np.array([[3, 2, 9]]), 3) == pytest.approx(2 / 3)


def test_samples_are_disjoint_reproducible_and_inside_the_parts():
    parts = [(f"p{i}", n) for i, n in enumerate([500, 0, 700, 300, 900])]
    a = sample_rows(parts, 400, 100, seed=3)
    assert [(n, t.tolist(), q.tolist()) for n, t, q in a] == [(n, t.tolist(), q.tolist())
                                                               for n, t, q in sample_rows(parts, 400, 100, seed=3)]
    sizes = dict(parts)
    assert sum(len(t) for _, t, _ in a) == 400 and sum(len(q) for _, _, q in a) == 100
    for name, t, q in a:
        assert not set(t) & set(q) and all(0 <= r < sizes[name] for r in [*t, *q])
    small = sample_rows([("p", 50)], 1000, 10)
    assert len(small[0][1]) == 50 and len(small[0][2]) == 10  # too few rows: train on all


def test_the_sample_covers_every_part_in_proportion_and_reads_only_their_first_rows():
    # parts are ranges of an input that may be ordered by topic: each must be in the sample, as much as its size
    parts = [(f"p{i}", 100_000 * (1 + i % 3)) for i in range(40)]
    total = sum(n for _, n in parts)
    sample = sample_rows(parts, 20_000, 1_000, seed=0)
    assert [n for n, _, _ in sample] == [n for n, _ in parts]
    for (_, rows), (_, t, q) in zip(parts, sample, strict=True):
        assert abs(len(t) - 20_000 * rows / total) < 0.25 * 20_000 * rows / total
        assert max(t.max(), q.max(initial=0)) < 2 * 21_000 * rows / total + 1  # within the part's first rows


def test_two_level_coarse_training_keeps_kmeans_recall_and_auto_picks_it_for_large_ivfs_on_cpus():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((400, 32)).astype(np.float32)

    def points(n, seed):
        r = np.random.default_rng(seed)
        return normalized(centres[r.integers(0, 400, n)] + 0.4 * r.standard_normal((n, 32)).astype(np.float32))

    xt, xb, xq = points(256 * 40, 1), points(20_000, 2), points(300, 3)
    _, gt = exact_knn(xq, xb, 10, "inner_product")
    recall = {}
    for way in ("kmeans", "two_level"):
        index = train_index(new_index("IVF256,Flat", 32, "inner_product"), xt, coarse=way)
        ivf = faiss.extract_index_ivf(index)
        assert index.is_trained and ivf.quantizer.ntotal == 256
        index.add(xb)
        ivf.nprobe = 8
        recall[way] = recall_at_k(index.search(xq, 10)[1], gt)
    assert recall["two_level"] > 0.8 and recall["two_level"] >= recall["kmeans"] - 0.03, recall
    refined = train_index(new_index("IVF256,PQ8np,Refine(SQ8)", 32, "inner_product"), xt, coarse="two_level")
    assert refined.is_trained and faiss.extract_index_ivf(refined).quantizer.ntotal == 256

    def way(factory, gpu=None):
        return coarse_training("auto", new_index(factory, 32, "inner_product"), gpu)

    assert way("IVF4096,Flat") == way("IVF8192,PQ8np,Refine(SQ8)") == "two_level"
    assert way("IVF4096,Flat", gpu=0) == way("IVF256,Flat") == way("PCA16,IVF4096,Flat") == "kmeans"
    assert way(effective_factory("HNSW32", 32, "inner_product")) == "kmeans"
    with pytest.raises(RagtuneError, match="sees the vectors as given"):
        train_index(new_index("PCA16,IVF64,Flat", 32, "inner_product"), xt, coarse="two_level")
    with pytest.raises(RagtuneError, match="10,240 training vectors for 16,384 IVF lists"):
        train_index(new_index("IVF16384,Flat", 32, "inner_product"), xt, coarse="two_level")


# --- files, manifests, versions ----------------------------------------------------------------------------------

def test_manifest_round_trip(tmp_path):
    xb = normalized(np.random.default_rng(0).normal(size=(200, 16)))
    vdir = build_version(tmp_path, xb, chunk_ids(200), "Flat", 2, search_params={"nprobe": 3})
    m = read_index_manifest(vdir)
    assert read_index_manifest(vdir) == m
    assert m.model_dump() == IndexManifest.model_validate_json(m.model_dump_json()).model_dump()
    assert (m.version, m.factory, m.ntotal, len(m.shards), m.search_params) == ("v-00001", "IDMap2,Flat", 200, 2,
                                                                               {"nprobe": 3})
    (tmp_path / "v-00001" / "manifest.json").write_text('{"format": "other/1"}')
    with pytest.raises(RagtuneError, match="not a ragtune index manifest"):
        read_index_manifest(vdir)


@pytest.fixture
def small_index(tmp_path):
    xb = normalized(np.random.default_rng(0).normal(size=(500, 16)))
    build_version(tmp_path, xb, chunk_ids(500), "Flat", 2)
    return tmp_path, xb


def test_truncated_shard_is_a_clear_error_naming_the_file(small_index):
    root, _ = small_index
    shard = root / "v-00001" / "shard-00001.faiss"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(RagtuneError, match=r"shard-00001.faiss: checksum mismatch.*Fix: rebuild"):
        ShardedIndex.open(str(root))
    with pytest.raises(RagtuneError, match=r"shard-00001.faiss: not a readable FAISS index, truncated or corrupted"):
        ShardedIndex.open(str(root), verify=False)


def test_altered_and_missing_shards_are_clear_errors(small_index):
    root, _ = small_index
    shard = root / "v-00001" / "shard-00000.faiss"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF  # same size, one byte flipped
    shard.write_bytes(bytes(data))
    with pytest.raises(RagtuneError, match=r"shard-00000.faiss: checksum mismatch"):
        ShardedIndex.open(str(root))
    os.remove(shard)
    with pytest.raises(RagtuneError, match=r"shard-00000.faiss: index shard listed in manifest.json is missing"):
        ShardedIndex.open(str(root))


def test_truncated_docstore_is_a_clear_error(small_index):
    root, _ = small_index
    f = root / "v-00001" / "docstore" / "shard-00000.parquet"
    f.write_bytes(f.read_bytes()[:-100])
    index = ShardedIndex.open(str(root))
    with pytest.raises(RagtuneError, match=r"docstore/shard-00000.parquet: .* bytes but the manifest says"):
        index.docstore()


def test_dimension_or_metric_mismatch_is_refused(small_index):
    root, xb = small_index
    index = ShardedIndex.open(str(root))
    with pytest.raises(RagtuneError, match=r"query vectors have dimension 8 but .* holds vectors of dimension 16 "
                                           r"from test-model. Fix: embed the queries with test-model"):
        index.search(np.ones((2, 8), np.float32), 5)
    with pytest.raises(RagtuneError, match=r"not normalised .* by inner product \(cosine\). Fix: L2-normalise"):
        index.search(xb[:3] * 3, 5)
    m = index.manifest.model_copy(update={"metric": "l2", "normalize": False})
    check_queries(xb[:3] * 3, m)  # raw vectors are right for an L2 index


def test_versions_switch_atomically_and_readers_keep_their_version(tmp_path):
    rng = np.random.default_rng(0)
    xb1, xb2 = normalized(rng.normal(size=(300, 16))), normalized(rng.normal(size=(400, 16)))
    build_version(tmp_path, xb1, chunk_ids(300, 1), "Flat", 1)
    reader = ShardedIndex.open(str(tmp_path))
    D1, I1 = reader.search(xb1[:5], 3)
    build_version(tmp_path, xb2, chunk_ids(400, 2), "Flat", 2, version=2)
    assert (tmp_path / LATEST).read_text().strip() == "v-00002"
    assert list_versions(resolve(str(tmp_path))) == [1, 2]
    assert resolve_index(str(tmp_path)).path.endswith("v-00002")
    assert ShardedIndex.open(str(tmp_path)).ntotal == 400
    D, I = reader.search(xb1[:5], 3)  # the reader of v-00001 still answers from v-00001
    assert (I == I1).all() and reader.ntotal == 300
    assert ShardedIndex.open(str(tmp_path / "v-00001")).ntotal == 300  # a version folder opens directly
    with pytest.raises(RagtuneError, match=r"no index here .* Fix: build one"):
        resolve_index(str(tmp_path / "nothing"))
    with pytest.raises(RagtuneError, match="not a complete index version"):
        switch_latest(resolve(str(tmp_path)), "v-00009")


def test_write_is_atomic_and_checksummed(tmp_path):
    index = faiss.IndexFlatL2(4)
    index.add(np.eye(4, dtype=np.float32))
    sha, size = write_index_file(index, resolve(str(tmp_path / "x.faiss")))
    assert size == (tmp_path / "x.faiss").stat().st_size and len(sha) == 64
    assert [p.name for p in tmp_path.iterdir()] == ["x.faiss"]


def test_candidates_follow_the_index_family():
    assert candidate_params(new_index("IDMap2,Flat", 8, "l2")) == [{}]
    hnsw = candidate_params(new_index("IDMap2,HNSW16", 8, "l2"))
    assert hnsw[0] == {"efSearch": 16} and hnsw == sorted(hnsw, key=lambda p: p["efSearch"])
    ivf = candidate_params(new_index("IVF64,Flat", 8, "l2"))
    assert [p["nprobe"] for p in ivf] == [1, 2, 4, 8, 16, 32, 64]
    refine = candidate_params(new_index("IDMap2,IVF16,PQ2,Refine(SQ8)", 8, "l2"))
    assert refine[0] == {"nprobe": 1, "k_factor_rf": 16}


@pytest.mark.gpu
def test_gpu_training_and_adds_match_the_cpu(tmp_path):
    ds = SyntheticDataset(32, 5000, 10000, 100)
    xb = ds.get_database()
    ids = chunk_ids(len(xb))
    out = []
    for gpu in (None, 0):
        b = ShardBuilder(train_index(new_index("IVF64,Flat", 32, "l2"), ds.get_train(), gpu), gpu)
        b.add(ids, xb)
        index = b.finish()
        index.nprobe = 64
        out.append(index.search(ds.get_queries(), 10)[1])
    assert (out[0] == out[1]).mean() > 0.99
