"""Every YAML under configs/ is a valid, runnable example; bad values are reported all at once."""

from pathlib import Path

import pytest

from configs import CONFIG_DIR
from configs.schema import JOB_SCHEMAS, ConfigError, EmbedJobConfig, load_config
from configs.schema.base import apply_overrides
from jobs.commands import job_of

ALL_CONFIGS = sorted(p for p in CONFIG_DIR.rglob("*.yaml") if p.parent.name in JOB_SCHEMAS)


def test_there_is_a_config_for_every_job():
    assert {p.parent.name for p in ALL_CONFIGS} == set(JOB_SCHEMAS)


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_every_config_validates_and_says_how_to_run_it(path: Path):
    job = job_of(str(path), None)
    load_config(JOB_SCHEMAS[job], path)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and ("ragtune" in first or "python -m jobs." in first), first


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


GOOD = "corpus:\n  path: docs/\noutput:\n  path: out/\n"


def test_overrides_are_parsed_as_yaml_values(tmp_path):
    cfg = load_config(EmbedJobConfig, write(tmp_path, GOOD),
                      ["embed.batch_size=128", "chunk.prepend_title=false", "corpus.path=[a.jsonl, b.jsonl]",
                       "cluster.address=ray://h:10001"])
    assert cfg.embed.batch_size == 128
    assert cfg.chunk.prepend_title is False
    assert cfg.corpus.path == ["a.jsonl", "b.jsonl"]
    assert cfg.cluster.address == "ray://h:10001"


def test_every_problem_is_reported_at_once_with_field_value_and_fix(tmp_path):
    p = write(tmp_path, GOOD + "chunk:\n  size: 64\n  overlap: 100\nembed:\n  batchsize: 3\n  metric: cosine\n")
    with pytest.raises(ConfigError) as e:
        load_config(EmbedJobConfig, p, ["embed.actors=0", "nonsense"])
    problems = {pr.field: pr for pr in e.value.problems}
    assert set(problems) == {"nonsense", "chunk", "embed.batchsize", "embed.metric", "embed.actors"}
    assert problems["embed.batchsize"].message == "unknown field"
    assert problems["embed.batchsize"].fix == "did you mean `batch_size`?"
    assert problems["embed.metric"].value == "cosine"
    assert "'inner_product' or 'l2'" in problems["embed.metric"].message
    assert problems["embed.actors"].value == 0 and "greater than or equal to 1" in problems["embed.actors"].message
    assert "chunk.overlap (100) must be smaller than chunk.size (64)" in problems["chunk"].message
    assert problems["chunk"].fix == "set chunk.overlap below 64, e.g. 8"
    text = str(e.value)
    assert text.startswith(f"{p}: 5 problems:")
    assert "embed.metric = 'cosine'" in text


def test_missing_required_sections_say_what_to_add(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(EmbedJobConfig, write(tmp_path, "chunk:\n  size: 64\n"))
    fields = {pr.field: pr for pr in e.value.problems}
    assert set(fields) == {"corpus", "output"}
    assert fields["corpus"].fix.startswith("add `corpus`")


def test_yaml_syntax_errors_and_wrong_shapes(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(EmbedJobConfig, write(tmp_path, "corpus: [unclosed\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(EmbedJobConfig, write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(EmbedJobConfig, tmp_path / "missing.yaml")


def test_override_into_a_value_is_an_error():
    _, problems = apply_overrides({"embed": {"model": "x"}}, ["embed.model.name=y"])
    assert problems and "`model` is a value, not a section" in problems[0].message
