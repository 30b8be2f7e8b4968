import shlex

import pytest

from cluster import submit as cs
from configs.errors import RagtuneError
from configs.schema import EmbedJobConfig


def embed_cfg(corpus="docs/", out="/data/out"):
    return EmbedJobConfig.model_validate({"corpus": {"path": corpus}, "output": {"path": out}})


def test_auth_token_comes_from_env_then_path_then_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    assert cs.auth_token() is None and cs.auth_headers() == {}
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("home-token\n")
    assert cs.auth_headers() == {"Authorization": "Bearer home-token"}
    (tmp_path / "t").write_text("file-token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "t"))
    assert cs.auth_token() == "file-token"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "env-token")
    assert cs.auth_token() == "env-token"
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(RagtuneError, match="RAY_AUTH_TOKEN_PATH = .*missing.*no such file"):
        cs.auth_token()


def test_dashboard_address_is_normalised_and_client_addresses_refused(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    assert cs.dashboard_address("head:8265") == "http://head:8265"
    assert cs.dashboard_address("https://head:8265/") == "https://head:8265"
    monkeypatch.setenv("RAY_ADDRESS", "http://from-env:8265")
    assert cs.dashboard_address(None) == "http://from-env:8265"
    for bad in ("ray://head:10001", "head:6379", "auto"):
        with pytest.raises(RagtuneError, match="is a Ray client or GCS address"):
            cs.dashboard_address(bad)
    monkeypatch.delenv("RAY_ADDRESS")
    with pytest.raises(RagtuneError, match="no cluster address"):
        cs.dashboard_address(None)


def test_storage_fields_are_found_in_the_schema():
    found = {(sp.field, sp.value, sp.kind) for sp in cs.storage_paths(embed_cfg(["a/", "s3://b/c"], "/o"))}
    assert found == {("corpus.path", "a/", "input"), ("corpus.path", "s3://b/c", "input"),
                     ("output.path", "/o", "output")}


def test_local_storage_on_a_multi_node_cluster_is_an_error():
    errors, _ = cs.storage_problems(embed_cfg("docs/", "/data/out"), nodes=3, shared_fs=False)
    assert len(errors) == 1 and errors[0].startswith("output.path = '/data/out' is a local path but the cluster "
                                                     "has 3 nodes")
    errors, _ = cs.storage_problems(embed_cfg("/mnt/corpus", "s3://bucket/emb"), nodes=3, shared_fs=False)
    assert len(errors) == 1 and errors[0].startswith("corpus.path = '/mnt/corpus'")
    assert cs.storage_problems(embed_cfg("docs/", "s3://bucket/emb"), nodes=3, shared_fs=False) == ([], [])
    assert cs.storage_problems(embed_cfg("/mnt/c", "/mnt/o"), nodes=3, shared_fs=True) == ([], [])
    # one node: local paths are fine; a relative output is kept only inside the job's working directory copy
    errors, warnings = cs.storage_problems(embed_cfg("docs/", "runs/out"), nodes=1, shared_fs=False)
    assert errors == [] and len(warnings) == 1 and "output.path = 'runs/out' is relative" in warnings[0]


def test_entrypoint_and_runtime_env():
    ep = cs.entrypoint("embed", "configs/embed/my config.yaml", ["embed.batch_size=8", "output.path=s3://b/x y"])
    assert shlex.split(ep) == ["python", "-m", "jobs.embed", "--config", "configs/embed/my config.yaml",
                               "embed.batch_size=8", "output.path=s3://b/x y"]
    env = cs.runtime_env(".", {"A": "1"}, pip=["ray==2.60.0"])
    assert env["working_dir"] == "." and env["env_vars"]["A"] == "1" and env["pip"] == ["ray==2.60.0"]
    assert ".venv/" in env["excludes"] and "runs/" in env["excludes"]
    assert "pip" not in cs.runtime_env(".", {})


def test_config_must_be_inside_the_working_dir(tmp_path):
    (tmp_path / "wd" / "configs").mkdir(parents=True)
    (tmp_path / "wd" / "configs" / "a.yaml").write_text("")
    (tmp_path / "b.yaml").write_text("")
    assert cs.config_in_working_dir(str(tmp_path / "wd" / "configs" / "a.yaml"), str(tmp_path / "wd")) == \
        "configs/a.yaml"
    with pytest.raises(RagtuneError, match="is outside the working directory"):
        cs.config_in_working_dir(str(tmp_path / "b.yaml"), str(tmp_path / "wd"))


def test_pinned_requirements_are_the_projects_own():
    reqs = cs.pinned_requirements()
    assert "ray[data,serve,train]==2.60.0" in reqs and "torch==2.13.0" in reqs
    assert not any("extra ==" in r for r in reqs)


def test_a_job_server_that_is_not_ready_is_retried_for_a_bounded_time_then_explained():
    from cluster.submit import submit_retrying

    not_ready = RuntimeError("Request failed with status code 500: No available agent to submit job, please try "
                             "again later..")
    answers = [not_ready, not_ready, "raysubmit_123"]
    waits: list[float] = []

    def submit():
        a = answers.pop(0)
        if isinstance(a, Exception):
            raise a
        return a

    assert submit_retrying(submit, "http://head:8265", retry_s=60, sleep=waits.append) == "raysubmit_123"
    assert waits == [1.0, 2.0]  # backing off

    calls = []

    def never_ready():
        calls.append(1)
        raise not_ready

    with pytest.raises(RagtuneError, match=r"http://head:8265 is not ready to take jobs: after \d+ tries over 3 s "
                                           r"it still answers: .*No available agent.*`ray stop --force`"):
        submit_retrying(never_ready, "http://head:8265", retry_s=3, sleep=lambda s: None)
    assert len(calls) >= 2  # bounded by time, not one try

    other = RuntimeError("Request failed with status code 400: runtime_env working_dir is too large.")
    tries = []

    def bad():
        tries.append(1)
        raise other

    with pytest.raises(RuntimeError, match="status code 400"):  # not the server's readiness: raised at once
        submit_retrying(bad, "http://head:8265", sleep=lambda s: None)
    assert len(tries) == 1
