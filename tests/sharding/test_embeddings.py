import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from configs.errors import RagtuneError
from sharding.chunking import Chunker, ChunkerSettings
from sharding.embeddings import (
    CHUNK_SCHEMA,
    EmbeddingManifest,
    IdClash,
    PartCounts,
    chunk_documents,
    drop_ids,
    part_table,
    prepare_part,
    read_manifest,
    read_part_records,
    recover_part,
    repeated_ids,
    vectors_from_arrow,
    vectors_to_arrow,
    verify_part,
    write_manifest,
    write_part,
    write_part_record,
)
from sharding.storage import resolve


def docs(rows):
    return pa.table({k: [r[k] for r in rows] for k in ("doc_id", "title", "text", "metadata")})


@pytest.fixture
def chunker(minilm):
    return Chunker(minilm[1], 32, 4)


def test_chunk_rows_carry_their_part_and_a_key_per_model_input(chunker):
    t = chunk_documents(docs([
        {"doc_id": "a", "title": "T", "text": "shared boilerplate footer", "metadata": "{}"},
        {"doc_id": "b", "title": "T", "text": "shared boilerplate footer", "metadata": "{}"},
        {"doc_id": "c", "title": None, "text": "something else entirely", "metadata": "{}"},
        {"doc_id": "e", "title": "T", "text": "   ", "metadata": "{}"},
    ]), chunker, "fp", part=7)
    assert t.schema == CHUNK_SCHEMA
    rows = t.to_pylist()
    a, b, c, e = rows
    assert a["key"] == b["key"] and a["part"] == b["part"] == c["part"] == 7
    assert a["chunk_id"] != b["chunk_id"]
    assert c["key"] != a["key"]
    assert e["chunk_index"] == -1 and e["part"] == -1  # counted, never embedded


def test_prepare_part_embeds_identical_chunks_once_and_drops_repeated_documents(chunker):
    same = {"title": "T", "text": "shared text", "metadata": "{}"}
    t = chunk_documents(docs([
        {"doc_id": "a", **same}, {"doc_id": "b", **same}, {"doc_id": "a", **same},  # "a" listed twice
        {"doc_id": "z", "title": "T", "text": "other", "metadata": "{}"},
    ]), chunker, "fp")
    rows, inputs, inverse = prepare_part(t, prepend_title=True)
    assert rows.num_rows == 3  # a, b, z
    assert rows["chunk_id"].to_pylist() == sorted(rows["chunk_id"].to_pylist())
    assert sorted(inputs) == ["T\nother", "T\nshared text"]
    by_doc = dict(zip(rows["doc_id"].to_pylist(), inverse.tolist(), strict=True))
    assert by_doc["a"] == by_doc["b"] != by_doc["z"]


def test_one_id_for_two_texts_in_a_part_is_refused_naming_the_document(chunker):
    t = chunk_documents(docs([{"doc_id": "x", "title": None, "text": "first", "metadata": "{}"},
                              {"doc_id": "x", "title": None, "text": "second", "metadata": "{}"},
                              {"doc_id": "y", "title": None, "text": "fine", "metadata": "{}"}]), chunker, "fp")
    with pytest.raises(IdClash, match=r"documents \['x'\] appear more than once with different text") as e:
        prepare_part(t, True)
    assert e.value.param == "corpus.id_field"


def test_vectors_round_trip_through_arrow():
    xb = np.random.default_rng(0).standard_normal((5, 7)).astype("float32")
    arr = vectors_to_arrow(xb)
    assert arr.type == pa.list_(pa.float32(), 7)
    np.testing.assert_array_equal(vectors_from_arrow(arr), xb)


def make_part(chunker, tmp_path, n=3, first=0):
    t = chunk_documents(docs([{"doc_id": f"d{i}", "title": None, "text": f"text {i}", "metadata": "{}"}
                              for i in range(first, first + n)]), chunker, "fp")
    rows, inputs, inverse = prepare_part(t, True)
    xb = np.arange(len(inputs) * 4, dtype="float32").reshape(-1, 4)[inverse]
    return part_table(rows, xb, {"model": "m", "chunker": "fp"})


def test_vectors_with_nan_or_inf_are_refused_naming_their_chunks(chunker):
    t = chunk_documents(docs([{"doc_id": f"d{i}", "title": None, "text": f"text {i}", "metadata": "{}"}
                              for i in range(4)]), chunker, "fp")
    rows, inputs, inverse = prepare_part(t, True)
    xb = np.ones((len(rows), 4), dtype="float32")
    part_table(rows, xb, {})  # finite: fine
    xb[1, 2], xb[3, 0] = np.nan, np.inf  # what a model in half precision can overflow to
    with pytest.raises(RagtuneError) as e:
        part_table(rows, xb, {})
    ids = rows["chunk_id"].to_pylist()
    assert f"2 of 4 vectors hold NaN or Inf (chunk ids {ids[1]}, {ids[3]})" in e.value.message
    assert "embed.fp16: false" in e.value.message and e.value.code == "non_finite_vectors"


def test_part_is_written_atomically_and_verified(chunker, tmp_path):
    out = resolve(str(tmp_path))
    rec = write_part(make_part(chunker, tmp_path), out, 3, embedded=3)
    assert rec.file == "part-00003.parquet" and rec.rows == 3 and rec.embedded == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part-00003.parquet"]  # no temporaries left
    verify_part(out, rec)
    data = (tmp_path / rec.file).read_bytes()
    (tmp_path / rec.file).write_bytes(data[: len(data) // 2])
    with pytest.raises(RagtuneError, match=r"part-00003.parquet: checksum mismatch"):
        verify_part(out, rec)
    (tmp_path / rec.file).unlink()
    with pytest.raises(RagtuneError, match=r"part-00003.parquet: listed in _manifest.json but missing"):
        verify_part(out, rec)


def test_unrecorded_part_is_recovered_only_when_complete_and_made_the_same_way(chunker, tmp_path):
    out = resolve(str(tmp_path))
    counts = PartCounts(docs=4, empty_docs=1, repeated_rows=0)
    rec = write_part(make_part(chunker, tmp_path), out, 0, embedded=3, inputs="in0", counts=counts)
    assert recover_part(out, 0, {"model": "m", "chunker": "fp"}, inputs="in0") == rec
    assert rec.docs == 4 and rec.empty_docs == 1
    assert recover_part(out, 0, {"model": "m", "chunker": "fp"}, inputs="in1") is None  # other input
    assert recover_part(out, 0, {"model": "m"}, rows=4) is None  # rows differ (a part of the first format)
    assert recover_part(out, 0, {"model": "other", "chunker": "fp"}, inputs="in0") is None  # made differently
    assert recover_part(out, 1, {"model": "m"}, inputs="in0") is None  # not there
    (tmp_path / rec.file).write_bytes(b"PAR1 garbage")
    assert recover_part(out, 0, {"model": "m"}, inputs="in0") is None


def test_part_records_are_one_file_each_and_unreadable_ones_are_redone(chunker, tmp_path):
    out = resolve(str(tmp_path))
    recs = {i: write_part(make_part(chunker, tmp_path, first=3 * i), out, i, embedded=3, inputs=f"in{i}")
            for i in range(3)}
    for i, rec in recs.items():
        write_part_record(out, i, rec)
    (tmp_path / "_parts" / "part-00002.json").write_text("{cut")
    assert read_part_records(out) == {0: recs[0], 1: recs[1]}


def test_ids_in_two_parts_are_found_by_range_and_dropped_from_the_later_part(chunker, tmp_path):
    out = resolve(str(tmp_path))
    a = write_part(make_part(chunker, tmp_path, n=40), out, 0, embedded=40)
    b = write_part(make_part(chunker, tmp_path, n=40, first=30), out, 1, embedded=40)  # d30..d39 in both
    records = {"00000": a, "00001": b}
    both = set(pq.read_table(tmp_path / a.file)["chunk_id"].to_pylist()) & set(
        pq.read_table(tmp_path / b.file)["chunk_id"].to_pylist())
    assert len(both) == 10
    mid = 2**62  # two ranges: each finds the repeats inside it, together all of them
    found = {**repeated_ids(out, records, 0, mid), **repeated_ids(out, records, mid, 2**63 - 1)}
    assert set(found) == both and all(v == ["00000", "00001"] for v in found.values())
    new = drop_ids(out, 1, b, sorted(both))
    assert new.rows == 30 and new.repeated_rows == 10 and new.sha256 != b.sha256
    t = pq.read_table(tmp_path / b.file)
    assert t.num_rows == 30 and not both & set(t["chunk_id"].to_pylist())
    verify_part(out, new)
    assert repeated_ids(out, {"00000": a, "00001": new}, 0, 2**63 - 1) == {}


def manifest(**kw):
    base = dict(model={"name": "m", "revision": "r1"}, normalize=True, metric="inner_product",
                chunker=ChunkerSettings(128, 16, True, "r1").to_dict(), num_parts=4,
                corpus={"fingerprint": "c1", "files": 1, "bytes": 10})
    return EmbeddingManifest(**{**base, **kw})


def test_manifest_round_trip(tmp_path):
    out = resolve(str(tmp_path))
    assert read_manifest(out) is None
    m = manifest(dim=384, state="done")
    write_manifest(out, m)
    back = read_manifest(out)
    assert back == m and back.state == "done" and back.dim == 384


def test_manifest_differences_name_what_changed():
    m = manifest()
    assert m.differences(manifest()) == []
    diffs = m.differences(manifest(model={"name": "other", "revision": "r9"},
                                   chunker=ChunkerSettings(64, 16, True, "r1").to_dict(),
                                   corpus={"fingerprint": "c2", "files": 2, "bytes": 20}))
    assert len(diffs) == 3
    assert diffs[0].startswith("model m (r1) vs other (r9)")
    assert diffs[1] == "chunker size 128 vs 64"
    assert "corpus files changed" in diffs[2]


def test_unreadable_manifest_is_a_clear_error(tmp_path):
    (tmp_path / "_manifest.json").write_text("{not json")
    with pytest.raises(RagtuneError, match="unreadable manifest"):
        read_manifest(resolve(str(tmp_path)))
    (tmp_path / "_manifest.json").write_text('{"format": "something/else"}')
    with pytest.raises(RagtuneError, match="not a ragtune embeddings manifest"):
        read_manifest(resolve(str(tmp_path)))


def test_parts_of_another_dimension_are_refused_before_any_index_work(chunker, tmp_path):
    """A folder whose parts hold vectors of two dimensions (parts of another model copied in, or a rerun with
    another model): refused with the parts named, before any FAISS work, by the index job's preflight."""
    from configs.schema import IndexJobConfig
    from jobs.index import check
    from sharding.embeddings import EmbedderRecord, check_part_dims

    out = resolve(str(tmp_path / "emb"))
    good = write_part(make_part(chunker, tmp_path), out, 0, embedded=3)
    wide = make_part(chunker, tmp_path, first=3)
    wide = wide.set_column(wide.schema.get_field_index("vector"), "vector",
                           vectors_to_arrow(np.ones((wide.num_rows, 8), dtype="float32")))
    other = write_part(wide, out, 1, embedded=3)
    m = EmbeddingManifest(state="done", model=EmbedderRecord(name="m"), dim=4, normalize=True, metric="ip",
                          chunker=None, corpus={}, num_parts=2, parts={"00000": good})
    write_manifest(out, m)
    check_part_dims(out, m)  # one dimension: fine
    m.parts["00001"] = other
    write_manifest(out, m)
    with pytest.raises(RagtuneError) as e:
        check_part_dims(out, m)
    assert "mix vector dimensions: the manifest says d = 4 (m) but 1 of 2 parts differ (part 00001: d = 8)" \
        in e.value.message and "Fix: embed again into a new output.path" in e.value.message
    cfg = IndexJobConfig.model_validate({"embeddings": {"path": str(tmp_path / "emb")},
                                         "index": {"path": str(tmp_path / "index")}})
    with pytest.raises(RagtuneError, match="mix vector dimensions"):
        check(cfg)
