"""The index job's schema: memory sizes, kinds and the all-at-once error report."""

import pytest

from configs.schema import ConfigError, IndexJobConfig, load_config
from configs.schema.index import parse_bytes


@pytest.mark.parametrize("text, n", [("4GiB", 4 * 2**30), ("512MiB", 512 * 2**20), ("16GB", 16 * 10**9),
                                     ("1.5 TiB", int(1.5 * 2**40)), ("1000", 1000), (2048, 2048)])
def test_memory_sizes(text, n):
    assert parse_bytes(text) == n


def test_bad_values_are_reported_together(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("embeddings:\n  path: e\nindex:\n  path: i\n  max_memory: 4 gigs\n  target_recall: 1.5\n"
                 "  kind: ' '\n  shards: 0\n")
    with pytest.raises(ConfigError) as e:
        load_config(IndexJobConfig, p)
    problems = {pr.field: pr for pr in e.value.problems}
    assert set(problems) == {"index.max_memory", "index.target_recall", "index.kind", "index.shards"}
    assert problems["index.max_memory"].fix.startswith("write a number and a unit, e.g. 4GiB")
    assert "auto, or a FAISS factory string" in problems["index.kind"].fix


def test_defaults(tmp_path):
    cfg = IndexJobConfig.model_validate({"embeddings": {"path": "e"}, "index": {"path": "i"}})
    assert (cfg.index.kind, cfg.index.max_memory_bytes, cfg.index.target_recall) == ("auto", 4 * 2**30, 0.95)
