"""Index freshness without Ray: add, delete, update, compact, the writer lock, leases, gc, history.

Small synthetic versions built with the sharding functions (tests/sharding/test_index.py ``build_version``,
BM25 shards as the index job writes them); new chunks come with their vectors (``jobs.freshness.add(chunks=...)``),
so no model is loaded. tests/jobs/test_freshness.py runs the same operations on SQuAD with the real model.
"""

import gc as pygc
import json
import os
import socket
import subprocess
import sys
import time

import faiss
import numpy as np
import pyarrow as pa
import pytest
from faiss.contrib.datasets import SyntheticDataset

import jobs.freshness as job
from configs.errors import RagtuneError
from jobs.cli import main
from sharding.docstore import write_docstore
from sharding.embeddings import EmbedderRecord, vectors_to_arrow
from sharding.faiss_index import index_layers
from sharding.filters import parse_where
from sharding.freshness import live_vectors
from sharding.manifest import read_index_manifest, switch_latest, write_index_manifest
from sharding.search import (
    Fusion,
    ShardedIndex,
    _without,  # the path of GPU copies, which take no selector
    search,
    search_parameters,
)
from sharding.storage import resolve
from sharding.tuning import apply_params, exact_knn, recall_at_k
from sharding.versions import LEASES, LOCK, WriterLock, hold_lease
from tests.conftest import REPO
from tests.sharding.test_index import build_version, chunk_ids, normalized
from tests.sharding.test_lexical import add_lexical, texts_for

D = 16


def docs_table(ids, doc_ids, texts, xb=None, metadata=None):
    """Chunk rows as the embed job writes them (one chunk per document), with vectors when given."""
    n = len(ids)
    cols = {"chunk_id": pa.array(np.asarray(ids, np.int64)), "doc_id": pa.array(list(doc_ids), pa.string()),
            "chunk_index": pa.array(np.zeros(n, np.int32)), "title": pa.array([None] * n, pa.string()),
            "text": pa.array(list(texts), pa.string()),
            "metadata": pa.array(metadata or ["{}"] * n, pa.string()), "n_tokens": pa.array(np.ones(n, np.int32))}
    t = pa.table(cols)
    if xb is not None:
        t = t.append_column("vector", vectors_to_arrow(xb))
    return t


def build_index(root, n=600, shards=3, factory="Flat", seed=0, xb=None, xt=None, lexical=True):
    """An index version v-00001 whose docstore holds full rows (doc ids d0.., texts ``texts_for``, a metadata
    ``source`` of a/b) and, by default, BM25 shards over them. Written by the sharding functions alone: no
    history, no trained file, no statistics file (the freshness operations must take such a version too)."""
    rng = np.random.default_rng(seed)
    xb = normalized(rng.normal(size=(n, D))) if xb is None else xb
    ids = chunk_ids(len(xb), seed)
    texts = [f"{t} base{i}" for i, t in enumerate(texts_for(len(xb), seed))]
    vdir = build_version(root, xb, ids, factory, shards, xt=xt)
    m = read_index_manifest(vdir)
    meta = [json.dumps({"source": "a" if i % 2 else "b", "n": i}) for i in range(len(xb))]
    for rec in m.shards:
        (p,) = rec.pieces
        rows = docs_table(ids[p.start:p.stop], [f"d{i}" for i in range(p.start, p.stop)], texts[p.start:p.stop],
                          metadata=meta[p.start:p.stop])
        rec.docstore_sha256, rec.docstore_bytes = write_docstore(rows, vdir.join(rec.docstore))
    write_index_manifest(vdir, m)
    if lexical:
        add_lexical(vdir)
    return {"root": str(root), "xb": xb, "ids": ids, "texts": texts}


def live(root):
    """(ids, vectors, texts, doc ids) a fresh build of the live chunks of LATEST would hold, from a search
    over everything: every id a full dense search returns, with its docstore row."""
    index = ShardedIndex.open(root)
    t = index.docstore().table(["doc_id", "text"])
    return index, t


@pytest.fixture
def flat(tmp_path):
    return build_index(tmp_path / "index")


def new_docs(n, start=0, seed=7):
    rng = np.random.default_rng(seed)
    xb = normalized(rng.normal(size=(n, D)))
    ids = chunk_ids(n, seed=1000 + seed)
    doc_ids = [f"new{start + i}" for i in range(n)]
    texts = [f"fresh{start + i} zebra news" for i in range(n)]
    return docs_table(ids, doc_ids, texts, xb), ids, xb


# --- FAISS: tombstones through search parameters -------------------------------------------------------------

@pytest.mark.parametrize("factory", ["IDMap2,Flat", "IDMap2,HNSW16", "IVF16,Flat", "IVF16,PQ4np",
                                     "IDMap2,IVF16,PQ4np,Refine(SQ8)", "IVF64_HNSW16,Flat"])
def test_selectors_mask_ids_for_every_kind_the_index_job_builds(factory):
    """FAISS 1.15.1: IDMap2 translates a selector for Flat/HNSW/IVF, Refine needs it translated on its base's
    parameters (search_parameters does both); the settings (nprobe, efSearch) are kept, not reset."""
    ds = SyntheticDataset(D, 3000, 1500, 30, metric="IP")
    xb, xq = normalized(ds.get_database()), normalized(ds.get_queries())
    ids = chunk_ids(len(xb))
    index = faiss.index_factory(D, factory, faiss.METRIC_INNER_PRODUCT)
    index.train(normalized(ds.get_train()))
    index.add_with_ids(xb, ids)
    apply_params(index, {"nprobe": 16} if "IVF" in factory else {"efSearch": 64} if "HNSW" in factory else {})
    dead = ids[::3]
    keep: list = []
    sel = faiss.IDSelectorNot(faiss.IDSelectorBatch(dead))
    _, I = index.search(xq, 10, params=search_parameters(index, sel, 10, keep))
    assert not np.isin(I, dead).any() and (I >= 0).all()
    if "IVF" in factory:  # the tuned nprobe is kept: nprobe 16 of 16 lists is exhaustive for Flat lists
        _, I_all = index.search(xq, 10)
        assert (I_all >= 0).all()
    if factory == "IDMap2,Flat":  # exact: masking equals removing, and equals over-fetching + filtering
        ref = faiss.clone_index(index)
        ref.remove_ids(faiss.IDSelectorBatch(dead))
        assert (ref.search(xq, 10)[1] == I).all()
        D2, I2 = index.search(xq, 10 + len(dead))
        assert (_without(D2, I2, dead, 10, "inner_product")[1] == I).all()


# --- add -----------------------------------------------------------------------------------------------------------

def test_add_then_every_mode_finds_the_new_chunks(flat):
    root = flat["root"]
    before = ShardedIndex.open(root)
    rows, ids, xb = new_docs(30)
    s = job.add(root, chunks=rows)
    assert (s.version, s.parent, s.docs_added, s.chunks_added, s.docs_updated, s.changed) == \
        ("v-00002", "v-00001", 30, 30, 0, True)
    assert (s.segments, s.shards_touched) == (1, [0])  # 30 chunks: one segment, on the (first) smallest shard
    index = ShardedIndex.open(root)
    m = index.manifest
    assert m.operation == "add" and m.parent == "v-00001" and index.ntotal == 630 == m.ntotal
    assert [len(r.deltas) for r in m.shards] == [1, 0, 0] and m.shards[0].deltas[0].ntotal == 30
    for n, r in enumerate(m.shards):
        assert r.file == f"../v-00001/shard-{n:05d}.faiss"  # the base is shared, not copied
    D_, I = index.search(xb, 1)
    assert (I[:, 0] == ids).all()
    _, I = index.search_lexical([f"fresh{i}" for i in range(30)], 1)
    assert (I[:, 0] == ids).all()
    _, I = search(index, xb, [f"fresh{i}" for i in range(30)], 1, "hybrid", Fusion())
    assert (I[:, 0] == ids).all()
    rows_back = index.docstore().lookup(ids)
    assert [rows_back[c]["text"] for c in ids] == [f"fresh{i} zebra news" for i in range(30)]
    assert before.ntotal == 600 and before.search(xb, 1)[1][0, 0] not in set(ids)  # the old version is unchanged
    # the same chunks again: nothing to do, no new version
    again = job.add(root, chunks=rows)
    assert not again.changed and again.docs_skipped == 30 and again.version == "v-00002"
    assert (resolve(root).join("LATEST").fs.open_input_stream(f"{root}/LATEST").read().strip() == b"v-00002")


def test_a_version_after_an_add_shares_the_loaded_base_segments_and_counts_only_its_deltas(flat):
    """What a ShardSearcher does on a swap: the new version reuses the segments it shares with the loaded one (the
    same objects, nothing read again), searches as a fresh open does, and only its delta counts as new memory."""
    from sharding.search import resident_bytes

    root = flat["root"]
    v1 = ShardedIndex.open(root, mmap=False)
    rows, ids, xb = new_docs(30)
    job.add(root, chunks=rows)
    v2 = ShardedIndex.open(root, mmap=False, reuse=v1.loaded_segments())
    fresh = ShardedIndex.open(root, mmap=False)
    assert len(v2.shards) == 4  # shard 0's base and the add's delta on it, then shards 1 and 2
    assert [any(a is b for b in v1.shards) for a in v2.shards] == [True, False, True, True]
    q = np.concatenate([xb[:5], flat["xb"][:5]])
    for a, b in zip(v2.search(q, 7), fresh.search(q, 7), strict=True):
        np.testing.assert_array_equal(a, b)
    m, loc = v2.manifest, v2.location
    delta = m.shards[0].deltas[0].bytes
    assert resident_bytes(loc, m, [0, 1, 2], mmap=False) == sum(r.bytes for r in m.shards) + delta
    assert resident_bytes(loc, m, [0, 1, 2], mmap=False, loaded=v1.loaded_segments()) == delta
    everything = sum(r.bytes for r in m.shards) + delta
    assert resident_bytes(loc, m, [0, 1, 2], mmap=True) == everything - 630 * D * 4  # vectors mapped, ids read
    # other search parameters: nothing shared (a shared object would change the version being served)
    other = {f: (ix, {"nprobe": 9}) for f, (ix, _) in v1.loaded_segments().items()}
    v3 = ShardedIndex.open(root, mmap=False, reuse=other)
    assert not any(a is b for a in v3.shards for b in v1.shards)


def test_a_shard_searcher_refuses_a_version_that_does_not_fit_beside_the_one_served(flat, monkeypatch):
    """The Serve ShardSearcher (its class): a swap to a version after an add loads only the delta and shares the
    base; a version whose new segments need more memory than is free is refused (409) before anything is read."""
    import collections

    import psutil

    from cluster.placement import ReplicaResources
    from configs.errors import Conflict
    from configs.schema.serve import IndexSource
    from serving.deployments import ShardSearcher

    root = flat["root"]
    searcher = ShardSearcher.func_or_class(IndexSource(path=root, mmap=False), [0, 1, 2],
                                           ReplicaResources(1, 0, 1, "cpu"), "dense")
    (v1,) = searcher.versions.values()
    job.add(root, chunks=new_docs(30)[0])
    v2_path = str(resolve(root).join("v-00002").path)
    v2 = searcher._open(v2_path)
    assert sum(any(a is b for b in v1.shards) for a in v2.shards) == 3  # the bases: shared
    delta = v2.manifest.shards[0].deltas[0].bytes
    free = collections.namedtuple("vm", "available")
    monkeypatch.setattr(psutil, "virtual_memory", lambda: free(available=delta))  # less than delta / 0.9
    job.add(root, chunks=new_docs(30, start=30, seed=8)[0])
    with pytest.raises(Conflict, match=r"v-00003: shards \[0, 1, 2\] need about .* in memory beside the version"):
        searcher._open(str(resolve(root).join("v-00003").path))


def files_under(root):
    """Every file under an index root but LATEST: relative path -> (bytes, hash of the content, mtime in ns)."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            if name == "LATEST":
                continue
            with open(path, "rb") as f:
                data = f.read()
            out[os.path.relpath(path, root)] = (len(data), hash(data), os.stat(path).st_mtime_ns)
    return out


def test_a_delta_add_touches_only_the_segments_it_names(tmp_path):
    """An add of n chunks writes ceil(n / segment size) delta segments on the shards with the fewest live
    vectors: every file of the index before the add stays byte-identical (same mtime), the new version's folder
    holds the named segments' files and nothing of any other shard, and search equals a fresh full build."""
    info = build_index(tmp_path / "index", n=600, shards=4)
    root = info["root"]
    before = files_under(root)
    s = job.add(root, chunks=new_docs(30)[0])  # the default segment size (a shard, at least 100k): one segment
    assert (s.segments, s.shards_touched) == (1, [0])
    after = files_under(root)
    assert {f: after[f] for f in before} == before  # nothing written before is touched
    new = sorted(f for f in after if f not in before)
    assert [f for f in new if "/lexical/shard-" not in f] == [
        "v-00002/PUBLISHED", "v-00002/docstore/shard-00000.d000.parquet", "v-00002/lexical/stats.npz",
        "v-00002/manifest.json", "v-00002/shard-00000.d000.faiss",
        "v-00002/trained.faiss"]  # the trained index: derived once (this version was written without one)
    assert {f.rsplit("/", 1)[0] for f in new if "/lexical/shard-" in f} == {"v-00002/lexical/shard-00000.d000"}
    before = after
    rows, ids, xb = new_docs(25, start=100, seed=8)
    s = job.add(root, chunks=rows, segment_size=10)  # ceil(25 / 10) = 3 segments, on the 3 smallest shards
    assert (s.segments, s.shards_touched, s.chunks_added) == (3, [1, 2, 3], 25)
    after = files_under(root)
    assert {f: after[f] for f in before} == before
    new = sorted(f for f in after if f not in before)
    assert [f for f in new if "shard-" in f and "/lexical/" not in f] == sorted(
        f"v-00003/{d}shard-{n:05d}.d000.{ext}" for n in (1, 2, 3)
        for d, ext in (("", "faiss"), ("docstore/", "parquet")))
    assert {f.rsplit("/", 1)[0] for f in new if "/lexical/shard-" in f} == {
        f"v-00003/lexical/shard-{n:05d}.d000" for n in (1, 2, 3)}  # a BM25 delta is a folder of arrays
    index = ShardedIndex.open(root)
    m = index.manifest
    assert [len(r.deltas) for r in m.shards] == [1, 1, 1, 1] and sum(r.deltas[-1].ntotal for r in m.shards[1:]) == 25
    assert max(r.deltas[-1].ntotal for r in m.shards[1:]) - min(r.deltas[-1].ntotal for r in m.shards[1:]) <= 1
    assert m.shards[0].deltas[0].file == "../v-00002/shard-00000.d000.faiss"
    # exact: the merged top-k over bases and deltas equals one fresh index over every live chunk
    ref, _ = fresh_equivalent(tmp_path / "fresh", root, shards=4)
    xq = normalized(np.random.default_rng(4).normal(size=(30, D)))
    a, b = index.search(xq, 40), ref.search(xq, 40)
    np.testing.assert_allclose(a[0], b[0], rtol=1e-5, atol=1e-6)
    assert_same_up_to_ties(a, b)
    assert (index.search(xb, 1)[1][:, 0] == ids).all()
    assert (index.search_lexical([f"fresh{100 + i}" for i in range(25)], 1)[1][:, 0] == ids).all()
    with pytest.raises(RagtuneError, match="segment_size 0: must be at least 1"):
        job.add(root, chunks=new_docs(2, start=300, seed=9)[0], segment_size=0)


def test_plan_segments_bounds_the_segments_and_keeps_shards_even():
    from sharding.freshness import plan_segments
    from sharding.manifest import ShardRecord

    shards = [ShardRecord(file="", ntotal=n, sha256="", bytes=0, docstore="", docstore_sha256="", docstore_bytes=0,
                          pieces=[]) for n in (500, 300, 300, 100)]
    assert plan_segments(0, shards, 10) == []
    for n, size in [(1, 10), (300, 1000), (999, 100), (5, 1), (1000, 7)]:
        plan = plan_segments(n, shards, size)
        assert len(plan) == -(-n // size)  # ceil(n / size), never one per shard
        runs = np.concatenate([run for _, run in plan])
        assert (runs == np.arange(n)).all()  # every chunk once, in order
        assert max(len(r) for _, r in plan) <= size
        assert [s for s, _ in plan][:4] == [3, 1, 2, 0][:len(plan)]  # fewest live first, ties by number


def test_update_replaces_the_text_in_every_mode(flat):
    root, ids, xb = flat["root"], flat["ids"], flat["xb"]
    old_text = flat["texts"][5]
    new_vec = normalized(np.random.default_rng(3).normal(size=(1, D)))
    update = docs_table([ids[5]], ["d5"], ["quokka replaced paragraph"], new_vec)
    s = job.add(root, chunks=update)
    assert (s.docs_updated, s.docs_added, s.chunks_added, s.chunks_masked) == (1, 0, 1, 1)
    index = ShardedIndex.open(root)
    assert index.ntotal == 600
    assert index.docstore().lookup([ids[5]])[ids[5]]["text"] == "quokka replaced paragraph"
    _, I = index.search(new_vec, 1)
    assert I[0, 0] == ids[5]
    D_, I = index.search(xb[5:6], 600)  # the old vector's copy is masked: the id comes back only at its new one
    assert list(I[0]).count(ids[5]) == 1
    pos = list(I[0]).index(ids[5])
    assert D_[0, pos] == pytest.approx(float(xb[5] @ new_vec[0]), abs=1e-5)
    _, I = index.search_lexical([f"base{5}"], 10)  # a word only the old text had
    assert ids[5] not in I[0]
    assert "base5" in old_text
    _, I = index.search_lexical(["quokka"], 10)
    assert I[0, 0] == ids[5]
    assert dict(zip(*index.docstore().column("text"), strict=True))[ids[5]] == "quokka replaced paragraph"
    # updated twice: the copy in the first delta is masked too
    job.add(root, chunks=docs_table([ids[5]], ["d5"], ["platypus third text"], new_vec))
    index = ShardedIndex.open(root)
    assert index.ntotal == 600 and index.docstore().lookup([ids[5]])[ids[5]]["text"] == "platypus third text"
    assert ids[5] not in index.search_lexical(["quokka"], 10)[1][0]


# --- delete --------------------------------------------------------------------------------------------------------

def test_delete_never_returns_the_chunks_from_any_mode_shard_or_docstore(flat):
    root, ids, xb, texts = flat["root"], flat["ids"], flat["xb"], flat["texts"]
    rows, new_ids, new_xb = new_docs(12)
    job.add(root, chunks=rows)
    gone_docs = ["d0", "d1", "d299", "d599", "new3", "new4"]  # base chunks of every shard and delta chunks
    s = job.delete(root, doc_ids=gone_docs)
    assert (s.docs_deleted, s.chunks_deleted, s.version) == (6, 6, "v-00003")
    gone = np.array([ids[0], ids[1], ids[299], ids[599], new_ids[3], new_ids[4]])
    index = ShardedIndex.open(root)
    assert index.ntotal == 606
    queries = np.vstack([xb[[0, 1, 299, 599]], new_xb[[3, 4]]])
    words = ["base0", "base1", "base299", "base599", "fresh3", "fresh4"]
    for opened in (index, ShardedIndex.open(root, merge=True), ShardedIndex.open(root, mmap=False),
                   *[ShardedIndex.open(root, only=[n]) for n in range(3)]):
        _, I = opened.search(queries, opened.ntotal)  # every result
        assert not np.isin(I, gone).any() and ((I >= 0).sum(1) == opened.ntotal).all()
        _, I = opened.search_lexical(words + [" ".join(texts[0].split()[:3])], 700)
        assert not np.isin(I, gone).any()
        _, I = search(opened, queries, words, 700, "hybrid", Fusion(depth=700))
        assert not np.isin(I, gone).any()
    store = index.docstore()
    assert store.lookup(gone) == {} and len(store) == 606
    cids, docs = store.column("doc_id")
    assert not np.isin(cids, gone).any() and not set(gone_docs) & set(docs)
    with pytest.raises(RagtuneError, match=r"--doc-id: 1 of 2 doc ids are not in .*\['d0'\]. Fix: check the ids"):
        job.delete(root, doc_ids=["d0", "d2"])
    assert ShardedIndex.open(root).manifest.version == "v-00003"  # nothing written
    # the version before the delete still holds them (readers of it are unaffected)
    assert ShardedIndex.open(f"{root}/v-00002").docstore().lookup(gone).keys() == set(gone.tolist())


def test_delete_where_metadata_filter(flat):
    root, ids = flat["root"], flat["ids"]
    s = job.delete(root, where=["source=a", "n=1,3,5,1001"])
    assert s.docs_deleted == 3
    index = ShardedIndex.open(root)
    assert index.docstore().lookup(ids[[1, 3, 5, 7]]).keys() == {ids[7]}
    job.delete(root, where=['{"doc_id": ["d10", "d11"]}'])
    assert ShardedIndex.open(root).ntotal == 595
    with pytest.raises(RagtuneError, match=r"matches no chunk .*Fix: check the field names"):
        job.delete(root, where=["source=zzz"])
    for bad in (["source"], ["=x"], ["{not json"], ["{}"]):
        with pytest.raises(RagtuneError, match=r"--where .*Fix: write field=value"):
            parse_where(bad)
    with pytest.raises(RagtuneError, match="exactly one of --doc-id"):
        job.delete(root)


METADATA = ['{"source": "a", "n": 1}', '{"source":"wiki","n":2.0}', '{"n": true}', '{"source": "caf\\u00e9"}',
            '{"source": "café"}', '{"sou\\u0072ce": "wiki"}', '{"x": {"source": "wiki"}}', '["source", "wiki"]',
            'not json', "", None, '{"source": null}', '{"source": ["wiki"]}', '{"source": "wiki "}',
            '{"tag": "a\\"b"}', '{"n": 1.0, "source": "b"}', '{"source": "wiki", "n": 2020}', "{}"]


@pytest.mark.parametrize("where", [{"source": "wiki"}, {"source": ["a", "b"]}, {"n": 1}, {"n": [True]},
                                   {"source": "café"}, {"source": None}, {"source": [None, "a"]}, {"n": 2},
                                   {"tag": 'a"b'}, {"doc_id": ["d1", "d7"], "source": "wiki"}, {"doc_id": "d3"},
                                   {"title": None}, {"title": "T1"}, {"title": 5}, {"source": "wiki", "n": 2020},
                                   {"doc_id": []}, {"missing": "x"}, {"source": [["wiki"]], "n": [2020.0, "x"]},
                                   {"source": [["wiki"]]}, {"n": [1, "a", None]}])
def test_filter_mask_equals_the_row_by_row_filter(where):
    """The vectorised evaluator of delete --where (screens on the JSON text, parses what passes) selects exactly
    the rows ``matches`` selects, on metadata written every way: escapes, nesting, null, non-objects, bad JSON."""
    from sharding.filters import filter_mask, matches

    n = len(METADATA)
    t = pa.table({"doc_id": [f"d{i}" for i in range(n)], "title": [None if i % 3 else f"T{i}" for i in range(n)],
                  "metadata": pa.array(METADATA, pa.string())})
    want = [matches(r, where) for r in t.to_pylist()]
    assert filter_mask(t, where).to_pylist() == want
    for batch in t.to_batches(max_chunksize=4):
        assert filter_mask(batch, where).to_pylist() == [matches(r, where) for r in batch.to_pylist()]
    no_title = t.drop_columns(["title"])  # a docstore written without titles: the field reads as null
    assert filter_mask(no_title, where).to_pylist() == [matches({**r, "title": None}, where)
                                                        for r in no_title.to_pylist()]


def test_delete_where_streams_in_batches_over_bases_and_deltas(flat, monkeypatch):
    """delete --where read a few rows at a time (SCAN_ROWS 7) masks exactly the live rows the row-by-row filter
    picks from the whole docstore, in base segments and in deltas."""
    import sharding.freshness as fresh
    from sharding.filters import matches

    root = flat["root"]
    rows, _, _ = new_docs(20)
    meta = [json.dumps({"source": "a" if i % 2 else "c", "n": 1000 + i}) for i in range(20)]
    job.add(root, chunks=rows.set_column(5, "metadata", pa.array(meta, pa.string())), segment_size=8)
    job.delete(root, doc_ids=["d1"])
    monkeypatch.setattr(fresh, "SCAN_ROWS", 7)
    where = ["source=a", "n=3,5,1001,1003,1004"]
    t = ShardedIndex.open(root).docstore().table(["doc_id", "title", "metadata"])
    picked = {r["chunk_id"] for r in t.to_pylist() if matches(r, parse_where(where))}
    assert len(picked) == 4  # d3, d5 (base), new1, new3 (deltas); d1 was deleted already
    s = job.delete(root, where=where)
    assert (s.chunks_deleted, s.docs_deleted) == (4, 4)
    left = ShardedIndex.open(root).docstore().table(["doc_id"])["chunk_id"].to_pylist()
    assert set(left) == set(t["chunk_id"].to_pylist()) - picked and len(left) == 619 - 4


# --- compaction ----------------------------------------------------------------------------------------------------

def churn(info):
    """Add 40 documents, update 10, delete 15 (base and delta): the same on every index kind."""
    root, ids = info["root"], info["ids"]
    rng = np.random.default_rng(11)
    rows, new_ids, new_xb = new_docs(40)
    job.add(root, chunks=rows)
    upd_xb = normalized(rng.normal(size=(10, D)))
    upd = docs_table(ids[20:30], [f"d{i}" for i in range(20, 30)], [f"changed{i} words" for i in range(10)], upd_xb)
    job.add(root, chunks=upd)
    job.delete(root, doc_ids=[f"d{i}" for i in range(40, 50)] + [f"new{i}" for i in range(5)])


def assert_same_up_to_ties(a, b):
    """Same ids in the same order, except inside a group of equal scores (shards hold other rows than in a
    fresh build, and ties keep shard order); a group cut by k may hold any of its members."""
    (Da, Ia), (_, Ib) = a, b
    for q in range(len(Da)):
        for v in np.unique(Da[q]):
            group = np.isclose(Da[q], v, rtol=1e-6, atol=1e-6)
            if not group[-1]:
                assert set(Ia[q][group]) == set(Ib[q][group]), q
        assert (Ia[q] >= 0).sum() == (Ib[q] >= 0).sum()


def fresh_equivalent(tmp, root, factory="Flat", shards=3):
    """A fresh build (build_version + BM25 with fresh statistics) over the live chunks of LATEST."""
    index = ShardedIndex.open(root)
    t = index.docstore().table(["doc_id", "text", "metadata"])
    cids = t["chunk_id"].to_numpy()
    # the vectors: from a full exact search of each id's own vector is circular; take them from the segments
    vecs = {}
    for n in range(len(index.manifest.shards)):
        i, x = live_vectors(index.location, index.manifest, n)
        vecs.update(zip(i.tolist(), x, strict=True))
    xb = np.stack([vecs[c] for c in cids.tolist()])
    vdir = build_version(tmp, xb, cids, factory, shards)
    m = read_index_manifest(vdir)
    for rec in m.shards:
        (p,) = rec.pieces
        rows = docs_table(cids[p.start:p.stop], t["doc_id"].to_pylist()[p.start:p.stop],
                          t["text"].to_pylist()[p.start:p.stop])
        rec.docstore_sha256, rec.docstore_bytes = write_docstore(rows, vdir.join(rec.docstore))
    write_index_manifest(vdir, m)
    add_lexical(vdir)
    return ShardedIndex.open(str(tmp)), xb


def test_compacted_exact_index_equals_a_fresh_build_dense_and_lexical(flat, tmp_path):
    root = flat["root"]
    churn(flat)
    first = job.compact(root)  # the shards whose delta + masked vectors passed 10% of their base
    assert first.changed and first.reasons and all("% of" in r for r in first.reasons.values())
    s = job.compact(root, force=True)  # and every other one
    assert s.changed and s.shards_compacted == 3 and s.recall is None  # exact: nothing to tune
    assert first.vectors_dropped + s.vectors_dropped == 25
    index = ShardedIndex.open(root)
    m = index.manifest
    assert all(not r.deltas and r.tombstones is None and r.file.startswith("shard-") for r in m.shards)
    assert len(index.shards) == 3 and index.ntotal == 625 == m.ntotal
    ref, xb = fresh_equivalent(tmp_path / "fresh", root)
    xq = normalized(np.random.default_rng(5).normal(size=(40, D)))
    D1, I1 = index.search(xq, 50)
    D2, I2 = ref.search(xq, 50)
    np.testing.assert_allclose(D1, D2, rtol=1e-5, atol=1e-6)
    assert_same_up_to_ties((D1, I1), (D2, I2))
    words = ["changed3", "fresh7 zebra", "base100 w1 w2", "w3 w5 w8 running"] + texts_for(20, seed=9)
    L1 = index.search_lexical(words, 30)
    L2 = ref.search_lexical(words, 30)
    assert np.array_equal(L1[0], L2[0])  # BM25 scores: bit for bit once compacted
    assert_same_up_to_ties(L1, L2)


def test_lexical_deltas_drift_a_little_before_compaction(flat, tmp_path):
    """Base shards keep the scores of the old statistics until compaction; deltas use the merged statistics.
    The drift on this small corpus: rankings mostly the same before compaction, identical after."""
    root = flat["root"]
    churn(flat)
    index = ShardedIndex.open(root)
    ref, _ = fresh_equivalent(tmp_path / "fresh", root)
    words = texts_for(50, seed=9)
    _, I1 = index.search_lexical(words, 10)
    _, I2 = ref.search_lexical(words, 10)
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(I1, I2, strict=True)])
    assert 0.8 <= overlap <= 1.0
    m = index.manifest
    assert m.lexical.n_docs == 625 and m.lexical.stats is not None


@pytest.mark.parametrize("factory,params,floor", [("IVF32,Flat", "nprobe", 0.9), ("HNSW16", "efSearch", 0.9)])
def test_compaction_of_approximate_kinds_keeps_recall_and_retunes(tmp_path, factory, params, floor):
    ds = SyntheticDataset(D, 3000, 2400, 100, metric="IP")
    xb = normalized(ds.get_database())
    info = build_index(tmp_path / "index", xb=xb, xt=normalized(ds.get_train()), factory=factory, shards=2,
                       lexical=False)
    root = info["root"]
    extra = normalized(ds.get_queries()[:60] + 0.01)  # new chunks near the data
    job.add(root, chunks=docs_table(chunk_ids(60, 77), [f"x{i}" for i in range(60)], ["t"] * 60, extra))
    job.delete(root, doc_ids=[f"d{i}" for i in range(0, 300, 2)])
    s = job.compact(root, force=True)
    assert s.recall is not None and s.recall >= 0.95 and params in s.search_params
    index = ShardedIndex.open(root)
    assert index.manifest.recall.queries_from.startswith("held-out") and index.ntotal == 2400 - 150 + 60
    assert all(not r.deltas and r.tombstones is None for r in index.manifest.shards)
    assert not [f for f in os.listdir(index.location.path) if ".tune." in f]  # the copies searched while tuning
    for r in index.manifest.shards:  # the tuned setting is in the files too, not only in the manifest
        whole = faiss.read_index(index.location.join(r.file).path)  # kept: the layers below are its to free
        f = index_layers(whole)[-1]
        assert (faiss.extract_index_ivf(f).nprobe if params == "nprobe" else f.hnsw.efSearch) == s.search_params[params]
    t = index.docstore().table(["doc_id"])
    cids = t["chunk_id"].to_numpy()
    vecs = {}
    for n in range(2):
        i, x = live_vectors(index.location, index.manifest, n)
        vecs.update(zip(i.tolist(), x, strict=True))
    live_xb = np.stack([vecs[c] for c in cids.tolist()])
    xq = normalized(ds.get_queries()[60:])
    _, I_true = exact_knn(xq, live_xb, 10, "inner_product")
    _, I = index.search(xq, 10)
    assert recall_at_k(I, cids[I_true]) >= floor


def test_compact_check_recall_compacts_and_retunes_when_recall_is_below_target(tmp_path):
    """No delta, no tombstone, but the tuned setting (nprobe=1) gives recall far below the target: with
    --check-recall, compaction re-measures it, compacts every shard and re-tunes."""
    ds = SyntheticDataset(D, 3000, 2000, 50, metric="IP")
    info = build_index(tmp_path / "index", xb=normalized(ds.get_database()), xt=normalized(ds.get_train()),
                       factory="IVF32,Flat", shards=2, lexical=False)
    root = info["root"]
    m = read_index_manifest(resolve(root).join("v-00001"))
    m.search_params = {"nprobe": 1}
    write_index_manifest(resolve(root).join("v-00001"), m)
    assert not job.compact(root).changed  # the thresholds alone: nothing to do
    s = job.compact(root, check_recall=True)
    assert s.changed and s.shards_compacted == 2 and s.recall_before < 0.9
    assert all("recall@10" in r for r in s.reasons.values())
    assert s.recall >= 0.95 and s.search_params["nprobe"] > 1
    assert job.compact(root, check_recall=True).changed is False  # now above its target


# --- versions: crash, lock, gc, leases, history --------------------------------------------------------------------

def test_a_crash_between_writing_a_version_and_switching_latest_leaves_the_previous_one(flat, monkeypatch):
    root = flat["root"]
    rows, ids, xb = new_docs(5)

    def crash(*a, **k):
        raise RuntimeError("killed between the manifest and LATEST")

    monkeypatch.setattr(job, "switch_latest", crash)
    with pytest.raises(RuntimeError, match="killed"):
        job.add(root, chunks=rows)
    monkeypatch.undo()
    assert open(f"{root}/LATEST").read().strip() == "v-00001"
    assert os.path.exists(f"{root}/v-00002/manifest.json")  # written, never named by LATEST
    assert not os.path.exists(f"{root}/{LOCK}")  # the lock went with the failed writer
    index = ShardedIndex.open(root)
    assert index.manifest.version == "v-00001" and index.ntotal == 600
    assert not np.isin(index.search(xb, 5)[1], ids).any()
    s = job.add(root, chunks=rows)  # the next writer starts from LATEST and takes the next number
    assert (s.version, s.parent) == ("v-00003", "v-00001")
    assert not os.path.exists(f"{root}/v-00002/PUBLISHED")  # LATEST never named it: abandoned, not complete
    assert "abandoned" in {r["version"]: r["state"] for r in job.history(root).rows}["v-00002"]
    g = job.gc(root, keep=5, grace_s=0)
    assert g.incomplete == ["v-00002"] and not os.path.exists(f"{root}/v-00002")
    assert ShardedIndex.open(root).ntotal == 605


def test_a_version_latest_named_once_is_never_taken_for_abandoned(flat):
    """Rolling LATEST back by hand (switch_latest, or editing the file) keeps the newer version complete."""
    root = flat["root"]
    job.add(root, chunks=new_docs(3)[0])  # v-00002
    switch_latest(resolve(root), "v-00001")  # roll back
    s = job.add(root, chunks=new_docs(2, start=40)[0])
    assert (s.version, s.parent) == ("v-00003", "v-00001")
    states = {r["version"]: r["state"] for r in job.history(root).rows}
    assert states == {"v-00001": "complete", "v-00002": "complete", "v-00003": "LATEST"}
    with open(f"{root}/LATEST", "w") as f:  # by hand, to v-00002: still complete, and gc keeps it
        f.write("v-00002\n")
    g = job.gc(root, keep=1, grace_s=0)
    assert g.kept == {"v-00002": "LATEST", "v-00003": "one of the 1 newest"} and g.deleted == ["v-00001"]
    assert g.incomplete == [] and ShardedIndex.open(root).ntotal == 603


def test_two_writers_are_refused_with_the_holder_named(flat):
    root = flat["root"]
    rows, _, _ = new_docs(3)
    with WriterLock(resolve(root), "ragtune index add other.jsonl"):
        with pytest.raises(RagtuneError, match=rf"another writer holds the index lock: 'ragtune index add other.jsonl' "
                                               rf"\(pid {os.getpid()} on .*Fix: wait for it"):
            job.add(root, chunks=rows)
        with pytest.raises(RagtuneError, match="another writer holds the index lock"):
            job.compact(root, force=True)
    assert open(f"{root}/LATEST").read().strip() == "v-00001"
    # a holder that died: same host, pid gone
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with open(f"{root}/{LOCK}", "w") as f:
        json.dump({"host": socket.gethostname(), "pid": dead.pid, "command": "ragtune index add x",
                   "since": time.time()}, f)
    with pytest.raises(RagtuneError, match=r"no longer running on this host .*Fix: remove .*LOCK and retry"):
        job.delete(root, doc_ids=["d0"])
    os.remove(f"{root}/{LOCK}")
    assert job.add(root, chunks=rows).version == "v-00002"
    # and a real second process holding it
    code = ("import sys, time; from sharding.versions import WriterLock; from sharding.storage import resolve\n"
            f"with WriterLock(resolve({root!r}), 'ragtune index compact'):\n"
            "    print('held', flush=True); time.sleep(30)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RagtuneError, match=rf"'ragtune index compact' \(pid {holder.pid} "):
            job.add(root, chunks=new_docs(2, start=50)[0])
    finally:
        holder.kill()
        holder.wait()
    assert ShardedIndex.open(root).ntotal == 603  # nothing corrupted


def test_gc_keeps_latest_leased_and_shared_files(flat):
    root = flat["root"]
    for i in range(4):  # v-00002 .. v-00005
        job.add(root, chunks=new_docs(3, start=10 * i, seed=i)[0])
    reader = ShardedIndex.open(f"{root}/v-00002", lease="test-reader")
    leases = [f for f in os.listdir(f"{root}/{LEASES}") if f.endswith(".json")]
    assert len(leases) == 1 and leases[0].startswith("v-00002--")
    g = job.gc(root, keep=1, grace_s=0)
    assert sorted(g.deleted) == ["v-00001", "v-00003", "v-00004"]
    assert set(g.kept) == {"v-00002", "v-00005"} and "leased by test-reader" in g.kept["v-00002"]
    assert not os.path.exists(f"{root}/v-00003/manifest.json")
    assert os.path.exists(f"{root}/v-00001/shard-00000.faiss")  # shared by v-00005: kept
    latest = ShardedIndex.open(root)
    assert latest.manifest.version == "v-00005" and latest.ntotal == 612
    assert latest.search(flat["xb"][:3], 1)[1][:, 0].tolist() == flat["ids"][:3].tolist()
    assert reader.search(flat["xb"][:2], 1)[1].shape == (2, 1)  # the leased reader still reads
    del reader
    pygc.collect()
    assert [f for f in os.listdir(f"{root}/{LEASES}") if f.endswith(".json")] == []  # released with the reader
    g = job.gc(root, keep=1, grace_s=0)
    assert g.deleted == ["v-00002"]
    assert sorted(os.listdir(root)) == ["LATEST", "leases", "v-00001", "v-00002", "v-00003", "v-00004", "v-00005"]
    assert ShardedIndex.open(root).ntotal == 612
    # the grace period protects recently superseded versions (readers without a lease)
    job.add(root, chunks=new_docs(3, start=90, seed=9)[0])
    g = job.gc(root, keep=1)
    assert "v-00005" in g.kept and "grace" in g.kept["v-00005"]
    # an expired lease protects nothing and is removed
    expired = hold_lease(resolve(root).join("v-00005"), "old", ttl_s=-1)
    expired.released = True  # stop renewing it: a reader that died
    g = job.gc(root, keep=1, grace_s=0)
    assert "v-00005" in g.deleted and [f for f in os.listdir(f"{root}/{LEASES}") if f.endswith(".json")] == []
    h = job.history(root)
    assert [r["operation"] for r in h.rows if "operation" in r] == ["build", "add", "add", "add", "add", "add"]
    states = {r["version"]: r["state"] for r in h.rows}
    assert states["v-00006"] == "LATEST"  # every older one holds files (a base, deltas) that v-00006 shares
    assert {states[f"v-0000{i}"] for i in range(1, 6)} == {"collected (shared files kept)"}


def test_old_manifests_without_deltas_still_open_and_take_adds(tmp_path):
    info = build_index(tmp_path / "index", lexical=False)  # no lexical part, no trained file, no history
    root = info["root"]
    m = read_index_manifest(resolve(root).join("v-00001"))
    assert m.history == [] and m.trained is None and m.entries()[0].operation == "build"
    assert ShardedIndex.open(root).ntotal == 600
    rows, ids, xb = new_docs(4)
    job.add(root, chunks=rows)
    index = ShardedIndex.open(root)
    assert index.manifest.trained.file == "trained.faiss"  # derived once from the base (reset)
    assert (index.search(xb, 1)[1][:, 0] == ids).all()
    with pytest.raises(RagtuneError, match="no lexical"):
        index.search_lexical(["x"], 1)


def test_a_corpus_for_another_model_revision_is_refused(flat, tmp_path):
    root = flat["root"]
    vdir = resolve(root).join("v-00001")
    m = read_index_manifest(vdir)
    m.model = EmbedderRecord(name="all-MiniLM-L6-v2", revision="sha256:0000000000000000")
    write_index_manifest(vdir, m)
    corpus = tmp_path / "new.jsonl"
    corpus.write_text(json.dumps({"id": "n1", "text": "hello"}) + "\n")
    with pytest.raises(RagtuneError, match=r"built with all-MiniLM-L6-v2 revision sha256:0000000000000000 but .* "
                                           r"resolves here to revision .*Fix: install the same model revision"):
        job.add(root, corpus=str(corpus))
    with pytest.raises(RagtuneError, match="exactly one of --corpus"):
        job.add(root)


def test_cli_commands_and_errors(flat, capsys, tmp_path):
    root = flat["root"]
    assert main(["index", "delete", "-i", root, "--doc-id", "d3"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("deleted 1 docs") and json.loads(out[-1])["version"] == "v-00002"
    assert main(["index", "history", "-i", root]) == 0
    out = capsys.readouterr().out
    assert "| v-00002 | delete | v-00001 |" in out and "LATEST -> v-00002" in out
    assert main(["index", "compact", "-i", root]) == 0  # 1 masked of 200: below the threshold
    assert "nothing to compact" in capsys.readouterr().out
    assert main(["index", "gc", "-i", root, "--keep", "1", "--grace", "0", "--dry-run"]) == 0
    assert "would delete 1 version(s) ['v-00001']" in capsys.readouterr().out
    for argv, msg in [(["index", "delete", "-i", str(tmp_path / "none"), "--doc-id", "x"], "no index here"),
                      (["index", "delete", "-i", f"{root}/v-00001", "--doc-id", "x"], "a version folder, not an"),
                      (["index", "delete", "-i", root, "--doc-id", "nope"], "doc ids are not in"),
                      (["index", "delete", "-i", root, "--where", "a"], "expected field=value"),
                      (["index", "add", "-i", root, "--embeddings", str(tmp_path)], "no complete embeddings")]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        if argv[1] == "add":  # an add runs as a job does: the path of its log first (Ray's lines go there)
            assert err[0].startswith(f"log: {root}/_logs/index-add-"), err
            err = err[1:]
        assert len(err) == 1 and err[0].startswith("error: ") and msg in err[0] and "Fix:" in err[0], err
    assert not os.path.exists(f"{root}/_logs")  # nothing was written to it: an empty log is not kept
    assert not (tmp_path / "none").exists()  # no folder made where no index is


def test_ragtune_help_stays_light():
    code = ("import sys; from jobs.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = ('torch', 'faiss', 'ray', 'transformers', 'deepspeed')\n"
            "print('HEAVY', sorted(m for m in heavy if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert "HEAVY []" in out.stdout, out.stdout + out.stderr
