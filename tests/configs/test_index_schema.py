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


@pytest.mark.parametrize("value, parsed", [("auto", "auto"), ("AUTO", "auto"), (1, 1), (16, 16), ("4", 4)])
def test_max_nodes_is_auto_or_a_node_count(value, parsed):
    cfg = IndexJobConfig.model_validate({"embeddings": {"path": "e"}, "index": {"path": "i", "max_nodes": value}})
    assert cfg.index.max_nodes == parsed


@pytest.mark.parametrize("value", [0, -2, 4097, 2.5, True, "many", None])
def test_a_bad_max_nodes_names_the_field_the_value_and_the_fix(tmp_path, value):
    p = tmp_path / "c.yaml"
    p.write_text("embeddings:\n  path: e\nindex:\n  path: i\n")
    with pytest.raises(ConfigError) as e:
        load_config(IndexJobConfig, p, [f"index.max_nodes={'null' if value is None else value}"])
    [problem] = e.value.problems
    assert (problem.field, problem.value) == ("index.max_nodes", value)
    assert problem.fix.startswith("write auto (the Ray cluster's alive nodes when the job runs) or a whole number "
                                  "from 1 to 4096")
    assert f"index.max_nodes = {value!r}: " in str(e.value)


def test_max_nodes_defaults_to_the_cluster(tmp_path):
    cfg = IndexJobConfig.model_validate({"embeddings": {"path": "e"}, "index": {"path": "i"}})
    assert cfg.index.max_nodes == "auto"  # one machine: 1 node, today's choice; a cluster: its alive nodes
