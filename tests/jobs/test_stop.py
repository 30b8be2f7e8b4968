"""Stopping the real commands with the signals that process managers send (Kubernetes, Docker and systemd send
SIGTERM): a clean exit, the embedded Ray shut down with every process it started, nothing left running."""

import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest
import requests

from tests.conftest import REPO
from tests.serving.test_app import free_port

pytestmark = pytest.mark.integration


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


@contextlib.contextmanager
def command(args: list[str], log: Path) -> Iterator[Callable[..., tuple[int, str]]]:
    """Start ``python args`` (output to ``log``); yields ``stop(ready, sig)``: wait until ``ready()``, send ``sig``
    (SIGTERM), wait
    for the exit, check that every process the command had started is gone, return (status, output). Whatever is
    still running at the end is killed."""
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)

    def stop(ready: Callable[[], bool], sig: int = signal.SIGTERM) -> tuple[int, str]:
        deadline = time.monotonic() + 300
        while not ready():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        ray_procs = descendants(proc.pid)  # gcs_server, raylet, its agents and workers (Serve's actors too)
        assert len(ray_procs) >= 3, [p.name() for p in ray_procs]
        proc.send_signal(sig)
        rc = proc.wait(120)
        _, alive = psutil.wait_procs(ray_procs, timeout=30)
        assert not alive, [" ".join(p.cmdline())[:120] for p in alive]
        return rc, log.read_text()

    try:
        yield stop
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in descendants(proc.pid):
            p.kill()


@pytest.mark.timeout(900)
def test_sigterm_stops_ragtune_serve_with_status_0_and_leaves_no_ray_process(squad_flat_index, tiny_model_dir,
                                                                              tmp_path):
    root, summary = squad_flat_index
    port = free_port()
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(f"index:\n  path: {root / summary.version}\n  poll_interval_s: null\n"
                   f"generator:\n  model: {tiny_model_dir}\nhttp:\n  port: {port}\ncluster:\n  num_cpus: 2\n")
    log = tmp_path / "serve.log"

    def ready() -> bool:  # answering, and the command has seen it (it logs "ready in")
        try:
            return (requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
                    and "ready in" in log.read_text())
        except requests.RequestException:
            return False

    with command(["-m", "jobs.serve", "--config", str(cfg)], log) as stop:
        rc, text = stop(ready)
    assert rc == 0, text[-3000:]
    assert "stopping (SIGTERM)" in text, text[-3000:]
    after = text[text.index("stopping (SIGTERM)"):]  # (replicas may log cancelled health checks at start)
    assert "Traceback" not in after and "served ragtune at" in after, after[-3000:]


@pytest.mark.timeout(900)
def test_sigterm_stops_a_job_with_143_and_the_rerun_resumes_from_its_finished_parts(squad_retrieval, tmp_path):
    out = tmp_path / "emb"
    cfg = tmp_path / "embed.yaml"
    cfg.write_text(f"corpus:\n  path: {squad_retrieval / 'corpus.jsonl'}\n  id_field: _id\n"
                   "chunk:\n  size: null\n  overlap: 32\n"  # as the session's squad_embeddings: 2,257 chunks
                   f"output:\n  path: {out}\n  num_parts: 16\ncluster:\n  num_cpus: 2\n")
    args = ["-m", "jobs.embed", "--config", str(cfg)]
    with command(args, tmp_path / "embed.log") as stop:  # stopped once a part is finished: a resume has work
        rc, text = stop(lambda: bool(list((out / "_parts").glob("part-*.json"))))
    assert rc == 128 + signal.SIGTERM, text[-3000:]
    assert "interrupted (SIGTERM)" in text, text[-3000:]
    done = len(list((out / "_parts").glob("part-*.json")))
    rerun = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=420)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert summary["parts_skipped"] >= done >= 1 and summary["parts_written"] + summary["parts_skipped"] == 16
    ids = np.concatenate([pq.read_table(f, columns=["chunk_id"])["chunk_id"].to_numpy()  # every chunk once
                          for f in sorted(out.glob("part-*.parquet"))])
    assert len(ids) == len(set(ids.tolist())) == 2257


@pytest.mark.timeout(300)
def test_a_sigterm_while_the_driver_waits_in_ray_get_is_named_and_ends_with_143(tmp_path):
    """A driver blocked in ``ray.get`` (fine-tuning waits so for Ray Train's controller) gets its SIGTERM through
    Ray's core worker, which raises a plain KeyboardInterrupt in place of the handler's Stopped: the command must
    still say SIGTERM and end with 143, not 130."""
    script = tmp_path / "wait.py"
    script.write_text(
        "import time\nimport ray\n"
        "from cluster.runtime import init_ray\nfrom configs.schema.cluster import ClusterConfig\n"
        "from jobs.commands import guarded\n\n\n"
        "@ray.remote(num_cpus=0)\ndef sleep():\n    time.sleep(600)\n\n\n"
        "def main():\n    init_ray(ClusterConfig(num_cpus=1))\n    print('waiting', flush=True)\n"
        "    ray.get(sleep.remote())\n    return 0\n\n\nraise SystemExit(guarded(main))\n")
    log = tmp_path / "wait.log"
    with command([str(script)], log) as stop:
        rc, text = stop(lambda: "waiting" in log.read_text())
    assert rc == 128 + signal.SIGTERM, text[-3000:]
    assert "interrupted (SIGTERM)" in text and "SIGINT" not in text, text[-3000:]


@pytest.mark.timeout(600)
def test_ctrl_c_during_training_ends_with_130_and_keeps_the_checkpoints(tmp_path):
    """Ray Train's own Ctrl-C handler aborts the run and calls sys.exit from the handler: the job must still say
    it was interrupted and end with 130 (it ended with a silent 1), its checkpoints kept for the rerun."""
    runs = tmp_path / "runs"
    args = ["-m", "jobs.finetune", "--config", str(REPO / "configs/finetune/tiny.yaml"), f"run.storage_path={runs}",
            f"data.train={REPO / 'configs/finetune/data/capitals.jsonl'}", "train.steps=2000", "cluster.num_cpus=2"]
    log = tmp_path / "finetune.log"
    with command(args, log) as stop:  # stopped after its first checkpoint
        rc, text = stop(lambda: bool(list(runs.glob("tiny-capitals/checkpoint_*"))), signal.SIGINT)
    assert rc == 128 + signal.SIGINT, text[-3000:]
    assert "interrupted (SIGINT)" in text and "Traceback" not in text, text[-3000:]
    assert list(runs.glob("tiny-capitals/checkpoint_*/trainer_state.json")), sorted(runs.rglob("*"))[:20]
