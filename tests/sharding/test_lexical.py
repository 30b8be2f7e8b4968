"""Lexical (BM25) shards, search modes and fusion, without Ray."""

import hashlib
import io
import json
import shutil

import bm25s
import numpy as np
import pyarrow.parquet as pq
import pytest

from configs.errors import RagtuneError
from configs.schema import IndexJobConfig
from jobs.index import lexical_params, lexical_sizes
from sharding.choice import LEX_SCORE_SLICE, TASK_BASE_BYTES, lexical_build_task_bytes
from sharding.docstore import write_docstore
from sharding.lexical import (
    SCORE_SLICE,
    CorpusStats,
    DocTerms,
    LexicalManifest,
    LexicalParams,
    LexicalRecord,
    Terms,
    build_shard,
    chunk_texts,
    lexical_name,
    read_lexical_file,
    tokenizer,
    write_lexical_file,
)
from sharding.manifest import read_index_manifest, write_index_manifest
from sharding.search import (
    Fusion,
    ShardedIndex,
    fuse,
    merge_topk,
    result_metric,
    rrf_fusion,
    search,
    weighted_fusion,
)
from sharding.storage import makedirs, resolve
from tests.sharding.test_index import build_version, chunk_ids, normalized

WORDS = [f"w{i}" for i in range(400)] + ["running", "runs", "runner", "the", "and", "of", "cats", "cat"]


def texts_for(n, seed=0):
    """Chunks of 5-40 words drawn from a Zipf-like vocabulary: many shared terms, few exact score ties."""
    rng = np.random.default_rng(seed)
    p = 1 / np.arange(1, len(WORDS) + 1)
    p /= p.sum()
    return [" ".join(rng.choice(WORDS, size=rng.integers(5, 40), p=p)) for _ in range(n)]


def add_lexical(vdir, params=None):
    """Add BM25 shards to a version built by build_version (texts from its docstore), as the job's tasks do:
    statistics of every shard first, then each shard built with them."""
    params = params or LexicalParams()
    m = read_index_manifest(vdir)
    tok = tokenizer(params)
    shards = []
    for rec in m.shards:
        t = pq.read_table(vdir.join(rec.docstore).path)
        shards.append((t["chunk_id"].to_numpy(), tok(chunk_texts([None] * t.num_rows, t["text"].to_pylist()))))
    stats = CorpusStats()
    for _, tokens in shards:
        stats = stats.merge(CorpusStats.of(tokens))
    makedirs(vdir.join("lexical"))
    records = []
    for i, (ids, tokens) in enumerate(shards):
        lex = build_shard(tokens, ids, stats, params)
        sha, size = write_lexical_file(lex, params, vdir.join(lexical_name(i)))
        records.append(LexicalRecord(file=lexical_name(i), ntotal=lex.ntotal, terms=len(lex.model.vocab_dict) - 1,
                                     sha256=sha, bytes=size))
    m.lexical = LexicalManifest(library_version=bm25s.__version__, params=params, n_docs=stats.n_docs,
                                avg_len=stats.avg_len, terms=len(stats.df), shards=records)
    write_index_manifest(vdir, m)
    return vdir


def build_with_texts(root, texts, num_shards, seed=0):
    """A Flat version whose docstore holds ``texts`` (build_version writes "text {i}": overwrite it)."""
    import pyarrow as pa

    n = len(texts)
    xb = normalized(np.random.default_rng(seed).normal(size=(n, 16)))
    ids = chunk_ids(n, seed)
    vdir = build_version(root, xb, ids, "Flat", num_shards)
    m = read_index_manifest(vdir)
    for rec in m.shards:
        (p,) = rec.pieces
        rows = pa.table({"chunk_id": ids[p.start:p.stop], "doc_id": [f"d{i}" for i in range(p.start, p.stop)],
                         "text": texts[p.start:p.stop]})
        rec.docstore_sha256, rec.docstore_bytes = write_docstore(rows, vdir.join(rec.docstore))
    write_index_manifest(vdir, m)
    return add_lexical(vdir).uri, xb, ids


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The same 600 chunks as one shard and as three shards."""
    texts = texts_for(600)
    one, xb, ids = build_with_texts(tmp_path_factory.mktemp("one"), texts, 1)
    three, _, _ = build_with_texts(tmp_path_factory.mktemp("three"), texts, 3)
    queries = texts_for(50, seed=1)
    queries = [" ".join(q.split()[:4]) for q in queries]
    return {"one": one, "three": three, "xb": xb, "ids": ids, "texts": texts, "queries": queries}


def test_one_shard_scores_exactly_as_bm25s_index():
    tok = tokenizer(LexicalParams())
    tokens = tok(texts_for(300) + ["", "the and of"])  # an empty chunk, and one of stopwords only
    ref = bm25s.BM25()
    ref.index(tokens, show_progress=False)
    ours = build_shard(tokens, np.arange(len(tokens)), CorpusStats.of(tokens), LexicalParams())
    for q in tok(texts_for(20, seed=3)):
        assert np.array_equal(ref.get_scores(q), ours.model.get_scores(q))


@pytest.mark.parametrize("method", ["lucene", "robertson", "atire"])
def test_a_shard_counted_in_batches_scores_exactly_as_bm25s_index(method):
    """What the index job does with a large shard: token lists counted a batch at a time (uneven batches, an
    empty one), never held together; the scores are bm25s' own to the bit."""
    tok = tokenizer(LexicalParams())
    tokens = tok(texts_for(300) + ["", "the and of"])
    ref = bm25s.BM25(method=method)
    ref.index(tokens, show_progress=False)
    terms = DocTerms()
    for lo, hi in [(0, 7), (7, 7), (7, 150), (150, len(tokens))]:
        terms.add(tokens[lo:hi])
    assert terms.n_docs == len(tokens)
    assert terms.nnz == sum(len(set(t)) for t in tokens)
    ours = terms.finish(np.arange(len(tokens)), CorpusStats.of(tokens), LexicalParams(method=method))
    for q in tok(texts_for(20, seed=3)):
        assert np.array_equal(ref.get_scores(q), ours.model.get_scores(q))
    with pytest.raises(ValueError, match="3 chunk ids for 0 counted rows"):
        DocTerms().finish(np.arange(3), CorpusStats.of(tokens), LexicalParams())


def test_a_bm25_shard_task_asks_for_at_least_what_its_build_holds():
    """The driver sizes each BM25 shard task (Ray memory=) from its first pass: pairs = the sum of the shard's
    document frequencies, which is what DocTerms holds; the estimate covers the build's traced peak (numpy and
    Python allocations) without asking for several times it."""
    import tracemalloc

    tok, n = tokenizer(LexicalParams()), 20_000
    texts = texts_for(n, seed=5)
    batches = [tok(texts[i:i + 4096]) for i in range(0, n, 4096)]
    stats = CorpusStats.merge_all([CorpusStats.of(b) for b in batches])
    pairs, terms = lexical_sizes(stats)
    tracemalloc.start()
    try:
        built = DocTerms()
        for b in batches:
            built.add(b)
        assert built.nnz == pairs
        shard = built.finish(np.arange(n), stats, LexicalParams())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(shard.model.scores["data"]) == pairs and len(shard.terms) == terms + 1  # + bm25s' empty token
    need, why = lexical_build_task_bytes(pairs, terms, n, doc_row_bytes=0, batch_rows=4096)
    assert peak < need - TASK_BASE_BYTES < 3 * peak, why
    assert LEX_SCORE_SLICE == SCORE_SLICE


def test_tokenizer_stems_and_drops_stopwords():
    tok = tokenizer(LexicalParams())
    assert tok(["The runner runs, and the cats are running"]) == [["runner", "run", "cat", "run"]]
    plain = tokenizer(LexicalParams(stopwords=None, stemmer=None))
    assert plain(["The runner runs"]) == [["the", "runner", "runs"]]
    with pytest.raises(RagtuneError, match="not a Snowball algorithm"):
        tokenizer(LexicalParams(stemmer="klingon"))


def test_lexical_shards_cover_every_chunk_once(corpus):
    index = ShardedIndex.open(corpus["three"])
    shards = index.lexical_shards()
    ids = np.concatenate([s.chunk_ids for s in shards])
    assert len(shards) == 3 and len(ids) == len(set(ids.tolist())) == 600
    assert sorted(ids.tolist()) == sorted(corpus["ids"].tolist())
    m = index.manifest.lexical
    assert [r.ntotal for r in m.shards] == [r.ntotal for r in index.manifest.shards]
    assert (m.kind, m.library, m.n_docs) == ("bm25", "bm25s", 600)
    # each shard's rows are the chunks of the FAISS shard of the same number
    for rec, lex in zip(index.manifest.shards, shards, strict=True):
        store = pq.read_table(index.location.join(rec.docstore).path)
        assert sorted(store["chunk_id"].to_pylist()) == sorted(lex.chunk_ids.tolist())


def test_sharded_lexical_search_equals_one_index_over_all_chunks(corpus):
    D1, I1 = ShardedIndex.open(corpus["one"]).search_lexical(corpus["queries"], 20)
    D3, I3 = ShardedIndex.open(corpus["three"]).search_lexical(corpus["queries"], 20)
    assert np.array_equal(D1, D3)  # global statistics: a chunk scores the same in its shard
    assert (I1 >= 0).sum() > 500
    for d, a, b in zip(D1, I1, I3, strict=True):  # ids equal, up to the order inside runs of equal scores
        for score in np.unique(d):
            if score == d[-1] and a[-1] >= 0:  # the run cut at k may keep different members of a tie
                continue
            assert set(a[d == score].tolist()) == set(b[d == score].tolist())
    # a query with no known term finds nothing, in every shard
    D, I = ShardedIndex.open(corpus["three"]).search_lexical(["zzz unknown", "the of and"], 5)
    assert (I == -1).all() and np.isneginf(D).all()


def test_rrf_fusion_on_hand_built_rankings():
    dense = np.array([[10, 20, 30, -1]])
    lex = np.array([[30, 40, 10, 50]])
    D, I = rrf_fusion([dense, lex], k=5, c=60)
    want = {10: 1 / 61 + 1 / 63, 20: 1 / 62, 30: 1 / 63 + 1 / 61, 40: 1 / 62, 50: 1 / 64}
    # 10 and 30 tie (first seen first), then 20 and 40 tie, then 50
    assert I.tolist() == [[10, 30, 20, 40, 50]]
    assert np.allclose(D[0], [want[i] for i in I[0]])
    D, I = rrf_fusion([dense, lex], k=2, c=1, weights=[1.0, 2.0])  # lexical weighted up: 30 = 1/4 + 2/2
    assert I.tolist() == [[30, 10]] and np.allclose(D, [[1 / 4 + 1, 1 / 2 + 2 / 4]])


def test_weighted_fusion_normalises_each_ranking():
    # dense as L2 distances (lower is better), lexical BM25 (higher is better)
    Dd, Id = np.array([[0.1, 0.3, 0.5]]), np.array([[1, 2, 3]])
    Dl, Il = np.array([[12.0, 6.0, 2.0]]), np.array([[3, 4, 1]])
    D, I = weighted_fusion([Dd, Dl], [Id, Il], ["l2", "inner_product"], 4, [0.5, 0.5])
    # dense: 1 -> 1, 2 -> 0.5, 3 -> 0; lexical: 3 -> 1, 4 -> 0.4, 1 -> 0
    assert I.tolist() == [[1, 3, 2, 4]] and np.allclose(D, [[0.5, 0.5, 0.25, 0.2]])
    D, I = weighted_fusion([Dd, Dl], [Id, Il], ["l2", "inner_product"], 2, [0.0, 1.0])
    assert I.tolist() == [[3, 4]]
    D, I = weighted_fusion([Dd, Dl[:, :0]], [Id, Il[:, :0]], ["l2", "inner_product"], 4, [0.5, 0.5])
    assert I.tolist() == [[1, 2, 3, -1]] and np.isneginf(D[0, 3])


def test_hybrid_search_fuses_both_rankings(corpus):
    index = ShardedIndex.open(corpus["three"])
    xq, texts = corpus["xb"][:5], corpus["queries"][:5]
    Dd, Id = search(index, xq, None, 10, "dense")
    Dl, Il = search(index, None, texts, 10, "lexical")
    Dd100, Id100 = search(index, xq, None, 100, "dense")
    Dl100, Il100 = search(index, None, texts, 100, "lexical")
    D, I = search(index, xq, texts, 10, "hybrid", Fusion(method="rrf"))
    assert np.array_equal(I, rrf_fusion([Id100, Il100], 10, 60.0)[1])
    D, I = search(index, xq, texts, 10, "hybrid", Fusion(weight=0.3))
    assert np.array_equal(I, weighted_fusion([Dd100, Dl100], [Id100, Il100], ["inner_product"] * 2, 10,
                                             [0.3, 0.7])[1])
    assert (np.diff(D, axis=1) <= 0).all()
    for q in range(5):  # every fused id comes from one of the two rankings
        assert set(I[q].tolist()) <= set(Id100[q].tolist()) | set(Il100[q].tolist())
    assert (search(index, xq, texts, 10, "hybrid", Fusion(weight=1.0))[1] == Id).all()  # all weight on dense
    found = Il[:, :3] >= 0  # all weight on BM25: its order first, for the chunks it found
    assert (search(index, xq, texts, 10, "hybrid", Fusion(weight=0.0))[1][:, :3][found] == Il[:, :3][found]).all()
    assert result_metric(index, "dense") == "inner_product" and result_metric(index, "hybrid") == "inner_product"


def test_manifest_round_trip_with_the_lexical_part(corpus):
    vdir = resolve(corpus["three"])
    m = read_index_manifest(vdir)
    raw = json.loads(read_index_manifest(vdir).model_dump_json())
    assert raw["lexical"]["params"] == LexicalParams().model_dump() and raw["lexical"]["library_version"] == "0.3.16"
    assert read_index_manifest(vdir) == m and m.lexical is not None and len(m.lexical.shards) == 3


def test_an_index_without_lexical_part_searches_dense_and_says_how_to_get_lexical(tmp_path):
    xb = normalized(np.random.default_rng(0).normal(size=(100, 16)))
    build_version(tmp_path, xb, chunk_ids(100), "Flat", 2)
    index = ShardedIndex.open(str(tmp_path))
    assert index.manifest.lexical is None
    D, I = search(index, xb[:3], None, 5, "dense")
    assert (I[:, 0] == index.search(xb[:3], 1)[1][:, 0]).all()
    for mode in ("lexical", "hybrid"):
        with pytest.raises(RagtuneError, match=r"no lexical \(BM25\) part.*Fix: rebuild it with `ragtune index`"):
            search(index, xb[:3], ["a query"] * 3, 5, mode)


def test_corrupted_missing_or_altered_lexical_shards_are_clear_errors(tmp_path):
    build_with_texts(tmp_path / "a", texts_for(120), 2)
    folder = tmp_path / "a" / "v-00001" / "lexical" / "shard-00001"
    data_file = folder / "data.csc.index.npy"
    data = data_file.read_bytes()

    def lexical(verify=True):
        return ShardedIndex.open(str(tmp_path / "a"), verify=verify).search_lexical(["w1"], 3)

    data_file.write_bytes(data[:500])  # truncated: its size tells, with or without verify
    for verify in (True, False):
        with pytest.raises(RagtuneError, match=r"shard-00001/data.csc.index.npy: 500 bytes on disk but shard.json "
                                               r"says .*truncated.*Fix: rebuild"):
            lexical(verify)
    data_file.write_bytes(data[:-4] + b"\0\0\0\0")  # altered, same size: the sha256 tells (verify)
    with pytest.raises(RagtuneError, match=r"shard-00001/data.csc.index.npy: checksum mismatch.*Fix: rebuild"):
        lexical()
    assert lexical(verify=False)[1].shape == (1, 3)  # without verify, sizes and shapes only
    data_file.write_bytes(data)
    header = folder / "shard.json"
    raw = header.read_bytes()
    header.write_bytes(raw.replace(b'"terms"', b'"terms" ', 1))  # shard.json: checked against the manifest
    with pytest.raises(RagtuneError, match=r"shard-00001/shard.json: checksum mismatch.*Fix: rebuild"):
        lexical()
    header.write_bytes(b"{not json")
    with pytest.raises(RagtuneError, match=r"shard-00001/shard.json: not a readable lexical shard header"):
        lexical(verify=False)
    header.write_bytes(raw)
    (folder / "vocab.terms.npy").unlink()
    with pytest.raises(RagtuneError, match=r"shard-00001/vocab.terms.npy: file of a lexical shard listed in the "
                                           r"manifest is missing"):
        lexical()
    shutil.rmtree(folder)
    with pytest.raises(RagtuneError, match=r"lexical/shard-00001: lexical shard listed in the manifest is missing"):
        lexical()


def test_loaded_shards_are_memory_mapped_and_search_as_in_memory(corpus):
    """Local shards are np.memmap (file pages, not the searcher's own memory), vocabulary included; with
    mmap=False (what an object store gets) the same arrays are read into memory, and both search alike."""
    mapped = ShardedIndex.open(corpus["three"]).lexical_shards()
    read = ShardedIndex.open(corpus["three"], mmap=False).lexical_shards()
    for m, r in zip(mapped, read, strict=True):
        arrays = [*(m.model.scores[k] for k in ("data", "indices", "indptr")), m.chunk_ids, m.terms.offsets,
                  m.terms.blob]
        assert all(isinstance(a, np.memmap) and a.filename.endswith(".npy") for a in arrays)
        assert not any(isinstance(a, np.memmap) for a in (r.model.scores["data"], r.chunk_ids, r.terms.blob))
        assert isinstance(m.terms, Terms) and not isinstance(m.terms, dict)  # no Python object per term
        tokens = tokenizer(LexicalParams())(corpus["queries"])
        for a, b in zip(m.search(tokens, 20), r.search(tokens, 20), strict=True):
            assert np.array_equal(a, b)


def test_format_1_shards_still_load_into_memory(corpus, tmp_path):
    """An index written before the shard folders (one .npz per shard, vocabulary as JSON) still searches."""
    root = tmp_path / "old"
    shutil.copytree(resolve(corpus["three"]).path, root)
    vdir = resolve(str(root))
    m = read_index_manifest(vdir)
    for n, rec in enumerate(m.lexical.shards):
        s = ShardedIndex.open(corpus["three"], only=[n]).lexical_shards()[0]
        buf = io.BytesIO()
        np.savez(buf, format=np.array("ragtune.lexical/1"), data=s.model.scores["data"],
                 indices=s.model.scores["indices"], indptr=s.model.scores["indptr"], num_docs=np.array(s.ntotal),
                 chunk_ids=s.chunk_ids, vocab=np.frombuffer(json.dumps(dict(s.terms)).encode(), dtype=np.uint8),
                 params=np.array(LexicalParams().model_dump_json()))
        rec.file = f"lexical/shard-{n:05d}.npz"
        (root / rec.file).write_bytes(buf.getvalue())
        rec.sha256 = hashlib.sha256(buf.getvalue()).hexdigest()
        shutil.rmtree(root / "lexical" / f"shard-{n:05d}")
    write_index_manifest(vdir, m)
    old = ShardedIndex.open(str(root))
    assert all(isinstance(s.terms, dict) for s in old.lexical_shards())
    D1, I1 = old.search_lexical(corpus["queries"], 20)
    D2, I2 = ShardedIndex.open(corpus["three"]).search_lexical(corpus["queries"], 20)
    assert np.array_equal(D1, D2) and np.array_equal(I1, I2)


def test_a_shard_on_an_object_store_is_read_into_memory_and_checked(tmp_path):
    """fsspec's memory:// stands in for s3://: no file to map, so the arrays are read (and hashed) into memory."""
    tok = tokenizer(LexicalParams())
    tokens = tok(texts_for(200, seed=5))
    shard = build_shard(tokens, np.arange(200) * 3, CorpusStats.of(tokens), LexicalParams())
    remote, local = resolve("memory://ragtune-lexical/shard-00000"), resolve(str(tmp_path / "shard-00000"))
    sha, size = write_lexical_file(shard, LexicalParams(), remote)
    assert write_lexical_file(shard, LexicalParams(), local) == (sha, size)  # the same bytes either way
    read, mapped = read_lexical_file(remote, sha), read_lexical_file(local, sha)
    assert not isinstance(read.model.scores["data"], np.memmap) and isinstance(mapped.model.scores["data"], np.memmap)
    queries = tok(texts_for(20, seed=6))
    for a, b, c in zip(read.search(queries, 10), mapped.search(queries, 10), shard.search(queries, 10), strict=True):
        assert np.array_equal(a, b) and np.array_equal(a, c)
    with pytest.raises(RagtuneError, match="shard-00000/shard.json: checksum mismatch"):
        read_lexical_file(remote, "0" * 64)


def test_a_vocabulary_of_arrays_finds_every_term_and_only_those():
    terms = ["", "a", "café", "caf", "zz", "ß", "\udc80x", "日本"]  # non-ASCII and a lone surrogate too
    vocab = Terms.of(sorted(t.encode("utf-8", "surrogatepass") for t in terms))
    assert len(vocab) == len(terms) and sorted(vocab, key=lambda t: t.encode("utf-8", "surrogatepass")) == list(vocab)
    assert [vocab[t] for t in vocab] == list(range(len(terms)))
    assert all(t in vocab for t in terms) and "b" not in vocab and "cafe" not in vocab and vocab.get("zzz") is None
    with pytest.raises(KeyError):
        vocab["x"]
    assert list(Terms.from_arrow(vocab.arrow())) == list(vocab)


def test_mmapped_search_equals_in_memory_search_after_an_update_delta_and_a_delete(tmp_path):
    """A version with a delta per shard (BM25 rows built with the merged statistics), a masked chunk (the old
    copy of an updated one) and a deleted document: mapped and read-into-memory searches return the same ids
    with the same scores, and never a masked chunk."""
    import jobs.freshness as job
    from tests.sharding.test_freshness import build_index, docs_table, new_docs

    info = build_index(tmp_path / "index", n=150)
    root, ids = info["root"], info["ids"]
    rows, new_ids, _ = new_docs(12)
    job.add(root, chunks=rows, segment_size=4)  # 3 segments of 4 chunks: a delta on each of the 3 shards
    vec = normalized(np.random.default_rng(3).normal(size=(1, 16)))
    job.add(root, chunks=docs_table([ids[5]], ["d5"], ["quokka replaced paragraph"], vec))
    job.delete(root, doc_ids=["d7"])
    mapped, read = ShardedIndex.open(root), ShardedIndex.open(root, mmap=False)
    assert sum(len(r.deltas) for r in mapped.manifest.shards) >= 3
    assert sum(s.dead is not None for s in mapped.lexical_shards()) >= 1
    words = texts_for(40, seed=4) + [f"fresh{i}" for i in range(12)] + ["quokka", "base5", "base7"]
    D1, I1 = mapped.search_lexical(words, 20)
    D2, I2 = read.search_lexical(words, 20)
    assert np.array_equal(I1, I2) and np.array_equal(D1, D2)
    assert not np.isin([ids[5], ids[7]], I1[-2:]).any() and I1[-3, 0] == ids[5]
    assert (I1[40:52, 0] == new_ids).all()


def test_compact_stats_merge_equals_counters():
    """The compact statistics (sorted terms + counts, merged by pyarrow) equal the Counter arithmetic they
    replace: of, merge, merge_all, minus, and the stats file round trip (format 2; format 1 still reads)."""
    from collections import Counter

    tok = tokenizer(LexicalParams())
    parts = [tok(texts_for(80, seed=s)) + [["caf\u00e9", "日本"], []] for s in range(4)]

    def counter(docs):
        c = Counter()
        for d in docs:
            c.update(set(d))
        return c

    stats = [CorpusStats.of(p) for p in parts]
    for s, p in zip(stats, parts, strict=True):
        assert dict(s.df) == counter(p) and (s.n_docs, s.total_len) == (len(p), sum(map(len, p)))
    merged = CorpusStats.merge_all(stats)
    want = sum((counter(p) for p in parts), Counter())
    assert dict(merged.df) == want and merged.n_docs == sum(map(len, parts))
    assert merged == stats[0].merge(stats[1]).merge(stats[2]).merge(stats[3])
    assert merged.minus(stats[3]) == CorpusStats.merge_all(stats[:3])
    assert dict(merged.minus(stats[3]).df) == want - counter(parts[3])  # terms left in no chunk go
    assert CorpusStats.from_bytes(merged.to_bytes()) == merged
    keys = [b"zzz", "caf\u00e9".encode(), b"w1", b""]
    assert merged.df_of(keys).tolist() == [0, want["caf\u00e9"], want["w1"], 0]
    terms = sorted(want)  # format 1: terms as JSON
    buf = io.BytesIO()
    np.savez(buf, format=np.array("ragtune.lexical-stats/1"), n_docs=np.array(merged.n_docs),
             total_len=np.array(merged.total_len),
             terms=np.frombuffer(json.dumps(terms).encode(), dtype=np.uint8),
             df=np.array([want[t] for t in terms], dtype=np.int64))
    assert CorpusStats.from_bytes(buf.getvalue()) == merged
    assert CorpusStats.merge_all([]) == CorpusStats() == CorpusStats.of([])


def test_serving_shard_groups_load_their_own_lexical_shards(corpus):
    full = ShardedIndex.open(corpus["three"])
    part = ShardedIndex.open(corpus["three"], only=[2])
    assert [s.ntotal for s in part.lexical_shards()] == [full.manifest.lexical.shards[2].ntotal]
    D, I = part.search_lexical(corpus["queries"], 5)
    ids = set(full.lexical_shards()[2].chunk_ids.tolist())
    assert set(I[I >= 0].tolist()) <= ids


def test_shard_groups_merged_then_fused_equal_one_hybrid_search(corpus):
    """What serving does with shard groups searched apart: merge each ranking across groups, then fuse."""
    full = ShardedIndex.open(corpus["three"])
    groups = [ShardedIndex.open(corpus["three"], only=[0]), ShardedIndex.open(corpus["three"], only=[1, 2])]
    xq, texts = corpus["xb"][:8], corpus["queries"][:8]
    for fusion in (Fusion(), Fusion(method="rrf")):
        dense = [g.search(xq, fusion.depth) for g in groups]
        lexical = [g.search_lexical(texts, fusion.depth) for g in groups]
        D, I = fuse(merge_topk([r[0] for r in dense], [r[1] for r in dense], fusion.depth, "inner_product"),
                    merge_topk([r[0] for r in lexical], [r[1] for r in lexical], fusion.depth, "inner_product"),
                    10, full.manifest.metric, fusion)
        D1, I1 = search(full, xq, texts, 10, "hybrid", fusion)
        assert np.array_equal(I, I1) and np.allclose(D, D1)


def test_mode_and_fusion_errors(corpus):
    index = ShardedIndex.open(corpus["three"])
    with pytest.raises(RagtuneError, match=r"search mode 'sparse' is not known. Fix: use one of dense, lexical"):
        search(index, corpus["xb"][:1], ["q"], 5, "sparse")
    with pytest.raises(RagtuneError, match="needs the query texts"):
        search(index, corpus["xb"][:1], None, 5, "hybrid")
    with pytest.raises(RagtuneError, match="needs query vectors"):
        search(index, None, ["q"], 5, "dense")
    with pytest.raises(RagtuneError, match="fusion 'max' is not known"):
        Fusion(method="max")
    with pytest.raises(RagtuneError, match=r"weight 1.5 is not in \[0, 1\]"):
        Fusion(weight=1.5)


def test_index_config_lexical_section():
    base = {"embeddings": {"path": "e"}, "index": {"path": "i"}}
    cfg = IndexJobConfig.model_validate(base)
    assert cfg.index.lexical.enabled and lexical_params(cfg) == LexicalParams()
    cfg = IndexJobConfig.model_validate({**base, "index": {"path": "i", "lexical": {"stemmer": None, "k1": 0.9}}})
    assert (lexical_params(cfg).stemmer, lexical_params(cfg).k1) == (None, 0.9)
    for bad in ({"b": 1.5}, {"method": "bm25+"}, {"stemming": True}):
        with pytest.raises(ValueError):
            IndexJobConfig.model_validate({**base, "index": {"path": "i", "lexical": bad}})
