"""The command line: cheap to start, clear errors, and `python -m jobs.<job>` equal to `ragtune <job>`."""

import json
import os
import subprocess
import sys

import pytest

from configs.schema import JOB_SCHEMAS, load_config
from jobs.commands import JOBS
from tests.conftest import REPO


def run(*args, **kw):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, timeout=120, **kw)


def test_help_and_validate_import_neither_torch_nor_ray():
    code = ("import sys; from jobs.cli import main\n"
            "rc = main(['validate', 'configs/embed/sample.yaml'])\n"
            "heavy = sorted(m for m in ('torch', 'ray', 'deepspeed', 'faiss', 'transformers') if m in sys.modules)\n"
            "print('RESULT', rc, heavy)")
    out = run("-c", code)
    assert "RESULT 0 []" in out.stdout, out.stdout + out.stderr
    assert run("-m", "jobs.cli", "--help").returncode == 0


def test_validate_reports_problems_and_exit_code(tmp_path):
    bad = tmp_path / "embed" / "bad.yaml"
    bad.parent.mkdir()
    bad.write_text("corpus:\n  path: docs/\noutput:\n  path: x\nembed:\n  batch_size: 0\n  modle: x\n")
    out = run("-m", "jobs.cli", "validate", str(bad), "configs/embed/sample.yaml")
    assert out.returncode == 1
    assert "2 problems" in out.stdout
    assert "embed.batch_size = 0: Input should be greater than or equal to 1" in out.stdout
    assert "embed.modle = 'x': unknown field. Fix: did you mean `model`?" in out.stdout
    assert "ok: configs/embed/sample.yaml (embed)" in out.stdout


def test_validate_checks_inputs_unless_schema_only(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"corpus:\n  path: {tmp_path}/missing.jsonl\noutput:\n  path: {tmp_path}/out\n")
    out = run("-m", "jobs.cli", "validate", "--job", "embed", str(cfg))
    assert out.returncode == 1 and "missing.jsonl' does not exist" in out.stdout
    assert run("-m", "jobs.cli", "validate", "--job", "embed", "--schema-only", str(cfg)).returncode == 0
    out = run("-m", "jobs.cli", "validate", str(cfg))
    assert out.returncode == 1 and "cannot tell which job" in out.stdout


def test_job_errors_are_one_line_without_a_traceback(tmp_path):
    out = run("-m", "jobs.embed", "--config", "configs/embed/sample.yaml", f"corpus.path={tmp_path}/nope",
              f"output.path={tmp_path}/out")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("error: corpus.path")
    assert "Traceback" not in out.stderr


@pytest.mark.integration
def test_sample_config_runs_as_module_on_a_local_ray(tmp_path):
    """What the README's first command runs, as `ray job submit` would call it."""
    out = run("-m", "jobs.embed", "--config", "configs/embed/sample.yaml", f"output.path={tmp_path}/emb")
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["chunks"] > 10 and summary["dim"] == 384 and summary["parts_written"] >= 1
    assert (tmp_path / "emb" / "_manifest.json").is_file()


def test_storage_that_cannot_be_reached_is_one_line_with_the_fix(tmp_path):
    # an S3-compatible endpoint where nothing listens: pyarrow raises OSError("... AWS Error NETWORK_CONNECTION ...")
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("index:\n  path: s3://ragtune-ci/index?endpoint_override=127.0.0.1:9&scheme=http&region=us-east-1\n"
                   "generator:\n  model: gpt2\n")
    out = run("-m", "jobs.cli", "validate", "--job", "serve", str(cfg), env={**os.environ, "AWS_MAX_ATTEMPTS": "1"})
    assert out.returncode == 1, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and "Traceback" not in out.stdout
    line = out.stdout.strip().splitlines()[-1]
    assert line.startswith(f"{cfg}: object storage: the storage cannot be reached or read (When ")
    assert "AWS Error NETWORK_CONNECTION" in line and "Fix: check the network" in line


@pytest.mark.parametrize("name", sorted(JOBS))
def test_each_commands_help_names_a_config_that_exists_and_an_override_it_takes(name, capsys):
    from jobs.cli import main

    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    config, override = JOBS[name].example
    assert f"e.g. {override}" in text and config in text, text
    assert (REPO / config).is_file()
    load_config(JOB_SCHEMAS[name], REPO / config, [override])  # the override is a field of that job's config
