"""`ragtune submit` against a real Ray head started with `ray start --head` on 127.0.0.1.

The head gets its own free ports and temp dir, and is stopped by the pids of its own processes at the end
(never `ray stop`, which would kill every Ray on the machine).
"""

import json
import os
import socket
import subprocess
import sys
import time

import psutil
import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    temp = tmp_path_factory.mktemp("rayhead")
    gcs, dash, client, nm, om, agent, agent_grpc, rt_env, metrics = free_ports(9)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--node-ip-address=127.0.0.1",
           f"--port={gcs}", f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
           f"--node-manager-port={nm}", f"--object-manager-port={om}", f"--dashboard-agent-listen-port={agent}",
           f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={rt_env}",
           f"--metrics-export-port={metrics}", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
           f"--temp-dir={temp}", "--num-cpus=2", "--disable-usage-stats"]
    subprocess.run(cmd, check=True, capture_output=True, env=env, timeout=120)
    try:
        yield f"http://127.0.0.1:{dash}"
    finally:
        for p in psutil.process_iter(["cmdline"]):
            try:
                if any(str(temp) in a or f"{gcs}" in a.split(":")[-1:] for a in (p.info["cmdline"] or [])):
                    p.kill()
            except psutil.Error:
                pass


def ragtune(*args, timeout=300):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_submit_wait_runs_the_embed_job_to_success(ray_head, tmp_path):
    out = tmp_path / "emb"
    r = ragtune("submit", "--address", ray_head, "--wait", "--", "embed", "-c", "configs/embed/sample.yaml",
                f"output.path={out}")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "submitted embed as" in r.stdout and "SUCCEEDED" in r.stdout.splitlines()[-1]
    summary = json.loads([line for line in r.stdout.splitlines() if line.startswith('{"output"')][-1])
    assert summary["chunks"] > 10 and (out / "_manifest.json").is_file()
    job_id = r.stdout.split("submitted embed as ")[1].split()[0]
    listed = ragtune("jobs", "list", "--address", ray_head)
    assert job_id in listed.stdout and "SUCCEEDED" in listed.stdout
    status = ragtune("jobs", "status", job_id, "--address", ray_head)
    assert status.stdout.startswith(f"{job_id} SUCCEEDED")


def test_bad_config_is_refused_before_submission(ray_head, tmp_path):
    r = ragtune("submit", "--address", ray_head, "--", "embed", "-c", "configs/embed/sample.yaml",
                "embed.batch_size=0", f"output.path={tmp_path}/o")
    assert r.returncode == 2 and "embed.batch_size = 0" in r.stderr and "submitted" not in r.stdout


def test_bad_config_fails_fast_on_the_cluster_with_the_message_in_its_logs(ray_head, tmp_path):
    t0 = time.time()
    r = ragtune("submit", "--address", ray_head, "--wait", "--no-check", "--", "embed", "-c",
                "configs/embed/sample.yaml", "embed.batch_size=0", f"output.path={tmp_path}/o")
    assert r.returncode == 1 and "FAILED" in r.stdout.splitlines()[-1]
    assert "embed.batch_size = 0: Input should be greater than or equal to 1" in r.stdout
    assert time.time() - t0 < 120
    assert not (tmp_path / "o").exists()


def test_wrong_token_is_a_clear_error(ray_head, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-token")
    r = ragtune("jobs", "list", "--address", ray_head)
    assert r.returncode == 2 and "cannot reach the Ray job server" in r.stderr and "Traceback" not in r.stderr
