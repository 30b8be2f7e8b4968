"""Parts planned where the input is read: every record in exactly one part, without reading documents to plan."""

import gzip
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sharding.corpus import list_corpus, preflight
from sharding.inputs import MIN_PART_BYTES, PARTS_PER_ACTOR, plan_parts, read_part_documents, target_part_bytes

FIELDS = {"text_field": "text", "id_field": "id", "title_field": "title"}


def read_all(corpus, parts):
    return [doc for p in parts for t in read_part_documents(corpus.fs, p, **FIELDS) for doc in t.to_pylist()]


def write_jsonl(path, n, rng):
    with open(path, "w") as f:
        for i in range(n):  # lines of very different lengths, so range bounds fall anywhere within a line
            f.write(json.dumps({"id": f"d{i}", "text": "w" * int(rng.integers(1, 400)), "n": i}) + "\n")


@pytest.mark.parametrize("target", [1, 97, 1000, 10**6])
def test_jsonl_byte_ranges_hold_every_line_exactly_once(tmp_path, target):
    write_jsonl(tmp_path / "c.jsonl", 300, np.random.default_rng(target))
    corpus = list_corpus(str(tmp_path / "c.jsonl"))
    parts = plan_parts(corpus, target)
    slices = [s for p in parts for s in p.slices]
    assert slices[0].start == 0 and slices[-1].stop == corpus.total_bytes
    assert all(a.stop == b.start for a, b in zip(slices, slices[1:], strict=False))  # no byte twice, none lost
    ids = [d["doc_id"] for d in read_all(corpus, parts)]
    assert ids == [f"d{i}" for i in range(300)]
    assert len(parts) == min(300 * 10, -(-corpus.total_bytes // target)) or target == 1


def test_a_jsonl_file_that_starts_with_a_byte_order_mark_is_read_as_utf8(tmp_path):
    write_jsonl(tmp_path / "plain.jsonl", 50, np.random.default_rng(0))
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + (tmp_path / "plain.jsonl").read_bytes())  # Windows tools
    (tmp_path / "plain.jsonl").unlink()
    corpus = list_corpus(str(tmp_path))
    preflight(corpus, "text", "id")  # the first record parses, its first field is `id`, not `\ufeffid`
    for target in (200, 10**6):
        assert [d["doc_id"] for d in read_all(corpus, plan_parts(corpus, target))] == [f"d{i}" for i in range(50)]


def test_parquet_row_groups_small_files_and_compressed_jsonl_are_never_cut(tmp_path):
    pq.write_table(pa.table({"id": [f"p{i}" for i in range(100)], "text": ["x" * 50] * 100}),
                   tmp_path / "a.parquet", row_group_size=10)
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"id": f"g{i}", "text": "y" * 50}) + "\n" for i in range(40))
    for i in range(5):
        (tmp_path / f"t{i}.txt").write_text(f"text file {i}")
    corpus = list_corpus(str(tmp_path))
    parts = plan_parts(corpus, 1200)
    kinds = [(s.kind, s.stop - s.start) for p in parts for s in p.slices]
    assert all(n <= 3 for k, n in kinds if k == "parquet")  # runs of whole row groups of ~500 bytes each
    assert [n for k, n in kinds if k == "jsonl"] == [(tmp_path / "b.jsonl.gz").stat().st_size]  # one slice
    small = [[s for s in p.slices if s.kind == "text"] for p in parts]
    assert sorted(len(s) for s in small if s) == [5]  # small files share a part
    ids = [d["doc_id"] for d in read_all(corpus, parts)]
    assert sorted(ids) == sorted([f"p{i}" for i in range(100)] + [f"g{i}" for i in range(40)]
                                 + [f"t{i}.txt" for i in range(5)])
    assert [p.part for p in parts] == list(range(len(parts)))
    assert len({p.fingerprint() for p in parts}) == len(parts)


def test_plans_are_stable_and_part_size_follows_actors():
    assert target_part_bytes(10**9, part_size_mb=64, actors=2, num_parts=None) == -(-10**9 // (2 * PARTS_PER_ACTOR))
    assert target_part_bytes(10**12, part_size_mb=64, actors=2, num_parts=None) == 64 * 2**20
    assert target_part_bytes(1000, part_size_mb=64, actors=2, num_parts=None) == MIN_PART_BYTES
    assert target_part_bytes(1000, part_size_mb=64, actors=2, num_parts=4) == 250


def test_a_20k_chunk_single_file_corpus_gives_every_actor_several_parts(tmp_path):
    """The case of the issue: one JSONL file, 2 actors: many more parts than actors, of nearly equal size."""
    write_jsonl(tmp_path / "c.jsonl", 5000, np.random.default_rng(0))
    corpus = list_corpus(str(tmp_path / "c.jsonl"))
    parts = plan_parts(corpus, target_part_bytes(corpus.total_bytes, part_size_mb=64, actors=2, num_parts=None))
    assert len(parts) >= 2 * PARTS_PER_ACTOR - 1
    sizes = [p.bytes for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert plan_parts(corpus, 10**5) == plan_parts(list_corpus(str(tmp_path / "c.jsonl")), 10**5)


def test_compressed_jsonl_reads_as_the_plain_file_and_a_misnamed_one_is_refused(tmp_path):
    """gzip and zstd JSON Lines (a BOM inside too) give the plain file's documents, in the embed job's reading and
    in this process's (``ragtune index add``); compressed bytes under a plain .jsonl name are refused with the
    rename that fixes it, not read as text."""
    from sharding.corpus import CorpusError, read_documents_local

    write_jsonl(tmp_path / "plain.jsonl", 60, np.random.default_rng(3))
    data = (tmp_path / "plain.jsonl").read_bytes()
    want = read_all(list_corpus(str(tmp_path / "plain.jsonl")), plan_parts(list_corpus(str(tmp_path / "plain.jsonl")),
                                                                           10**6))
    assert [d["doc_id"] for d in want] == [f"d{i}" for i in range(60)]
    (tmp_path / "gz").mkdir()
    (tmp_path / "gz" / "c.jsonl.gz").write_bytes(gzip.compress(data))
    (tmp_path / "bom").mkdir()
    (tmp_path / "bom" / "c.jsonl.gz").write_bytes(gzip.compress(b"\xef\xbb\xbf" + data))
    (tmp_path / "zst").mkdir()
    with pa.output_stream(str(tmp_path / "zst" / "c.jsonl.zst"), compression="zstd") as out:
        out.write(data)
    for folder in ("gz", "bom", "zst"):
        corpus = list_corpus(str(tmp_path / folder))
        assert preflight(corpus, "text", "id") is None, folder
        for target in (200, 10**6):  # never cut: one slice whatever the target
            assert read_all(corpus, plan_parts(corpus, target)) == want, folder
        assert read_documents_local(str(tmp_path / folder), **FIELDS).to_pylist() == want, folder

    (tmp_path / "misnamed").mkdir()
    (tmp_path / "misnamed" / "c.jsonl").write_bytes(gzip.compress(data))
    with pytest.raises(CorpusError, match=r"c.jsonl: gzip-compressed, but its name does not end in .gz. Fix: rename "
                                          r"it c.jsonl.gz"):
        preflight(list_corpus(str(tmp_path / "misnamed")), "text", "id")
