import numpy as np
import pyarrow as pa
import pytest

from configs.errors import RagtuneError
from sharding.chunking import Chunker, ChunkerSettings
from sharding.embeddings import (
    CHUNK_SCHEMA,
    EmbeddingManifest,
    chunk_documents,
    part_table,
    prepare_part,
    read_manifest,
    recover_part,
    vectors_from_arrow,
    vectors_to_arrow,
    verify_part,
    write_manifest,
    write_part,
)
from sharding.storage import resolve


def docs(rows):
    return pa.table({k: [r[k] for r in rows] for k in ("doc_id", "title", "text", "metadata")})


@pytest.fixture
def chunker(minilm):
    return Chunker(minilm[1], 32, 4)


def test_chunk_rows_route_identical_texts_to_one_part(chunker):
    t = chunk_documents(docs([
        {"doc_id": "a", "title": "T", "text": "shared boilerplate footer", "metadata": "{}"},
        {"doc_id": "b", "title": "T", "text": "shared boilerplate footer", "metadata": "{}"},
        {"doc_id": "c", "title": None, "text": "something else entirely", "metadata": "{}"},
        {"doc_id": "e", "title": "T", "text": "   ", "metadata": "{}"},
    ]), chunker, "fp", num_parts=7)
    assert t.schema == CHUNK_SCHEMA
    rows = t.to_pylist()
    a, b, c, e = rows
    assert a["key"] == b["key"] and a["part"] == b["part"] == a["key"] % 7
    assert a["chunk_id"] != b["chunk_id"]
    assert c["key"] != a["key"]
    assert e["chunk_index"] == -1 and e["part"] == -1  # counted, never embedded


def test_prepare_part_embeds_identical_chunks_once_and_drops_repeated_documents(chunker):
    same = {"title": "T", "text": "shared text", "metadata": "{}"}
    t = chunk_documents(docs([
        {"doc_id": "a", **same}, {"doc_id": "b", **same}, {"doc_id": "a", **same},  # "a" listed twice
        {"doc_id": "z", "title": "T", "text": "other", "metadata": "{}"},
    ]), chunker, "fp", num_parts=1)
    rows, inputs, inverse = prepare_part(t, prepend_title=True)
    assert rows.num_rows == 3  # a, b, z
    assert rows["chunk_id"].to_pylist() == sorted(rows["chunk_id"].to_pylist())
    assert sorted(inputs) == ["T\nother", "T\nshared text"]
    by_doc = dict(zip(rows["doc_id"].to_pylist(), inverse.tolist(), strict=True))
    assert by_doc["a"] == by_doc["b"] != by_doc["z"]


def test_vectors_round_trip_through_arrow():
    xb = np.random.default_rng(0).standard_normal((5, 7)).astype("float32")
    arr = vectors_to_arrow(xb)
    assert arr.type == pa.list_(pa.float32(), 7)
    np.testing.assert_array_equal(vectors_from_arrow(arr), xb)


def make_part(chunker, tmp_path, n=3):
    t = chunk_documents(docs([{"doc_id": f"d{i}", "title": None, "text": f"text {i}", "metadata": "{}"}
                              for i in range(n)]), chunker, "fp", num_parts=1)
    rows, inputs, inverse = prepare_part(t, True)
    xb = np.arange(len(inputs) * 4, dtype="float32").reshape(-1, 4)[inverse]
    return part_table(rows, xb, {"model": "m", "chunker": "fp"})


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
    rec = write_part(make_part(chunker, tmp_path), out, 0, embedded=3)
    assert recover_part(out, 0, 3, {"model": "m", "chunker": "fp"}) == rec
    assert recover_part(out, 0, 4, {"model": "m", "chunker": "fp"}) is None  # rows differ
    assert recover_part(out, 0, 3, {"model": "other", "chunker": "fp"}) is None  # made differently
    assert recover_part(out, 1, 3, {"model": "m"}) is None  # not there
    (tmp_path / rec.file).write_bytes(b"PAR1 garbage")
    assert recover_part(out, 0, 3, {"model": "m"}) is None


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
