"""The docstore: lookups read only the row groups that can hold the ids asked for."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from configs.errors import RagtuneError
from sharding.docstore import ROW_GROUP_ROWS, Docstore, write_docstore
from sharding.storage import resolve


def rows(ids):
    return pa.table({"chunk_id": pa.array(ids, pa.int64()), "doc_id": [f"doc{i % 97}" for i in range(len(ids))],
                     "chunk_index": pa.array([0] * len(ids), pa.int32()), "title": ["t"] * len(ids),
                     "text": [f"text of {c}" for c in ids], "metadata": ["{}"] * len(ids),
                     "n_tokens": pa.array([3] * len(ids), pa.int32())})


@pytest.fixture
def store(tmp_path):
    rng = np.random.default_rng(0)
    ids = [rng.integers(0, 2**63 - 1, size=n).tolist() for n in (5000, 3000)]
    locs, sizes = [], []
    for i, part in enumerate(ids):
        loc = resolve(str(tmp_path / f"shard-{i:05d}.parquet"))
        _, size = write_docstore(rows(part), loc)
        locs.append(loc)
        sizes.append(size)
    return Docstore(locs, sizes), ids, tmp_path


def test_file_is_sorted_with_small_row_groups(store):
    _, ids, tmp = store
    f = pq.ParquetFile(tmp / "shard-00000.parquet")
    assert f.metadata.num_row_groups == -(-5000 // ROW_GROUP_ROWS)
    col = f.read(columns=["chunk_id"])["chunk_id"].to_numpy()
    assert (np.diff(col) > 0).all() and sorted(col.tolist()) == sorted(ids[0])


def test_lookup_of_k_ids_reads_at_most_k_row_groups_per_file(store):
    ds, ids, _ = store
    want = ids[0][:7] + ids[1][:3]
    got = ds.lookup(want + [12345])  # an unknown id is left out
    assert set(got) == set(want)
    assert all(got[c]["text"] == f"text of {c}" for c in want)
    assert ds.row_groups_read <= len(want) * 2  # at most one row group per id and file
    ds.row_groups_read = 0
    one = ds.lookup([ids[1][5]], columns=["doc_id"])
    assert set(one[ids[1][5]]) == {"chunk_id", "doc_id"} and ds.row_groups_read <= 2


def test_column_and_len(store):
    ds, ids, _ = store
    chunk_ids, docs = ds.column("doc_id")
    assert len(ds) == len(chunk_ids) == 8000 and (np.diff(chunk_ids) > 0).all()


def test_missing_or_truncated_files_are_named(store):
    ds, _, tmp = store
    with pytest.raises(RagtuneError, match=r"shard-00009.parquet: docstore file listed in the index manifest is "
                                           r"missing"):
        Docstore([resolve(str(tmp / "shard-00009.parquet"))])
    f = tmp / "shard-00001.parquet"
    f.write_bytes(f.read_bytes()[:-50])
    with pytest.raises(RagtuneError, match=r"shard-00001.parquet: unreadable docstore file"):
        Docstore([resolve(str(f))])
