"""What a person sees: ragtune's lines and one progress display per stage on the terminal (rich on a terminal,
plain lines otherwise), Ray's and the libraries' output in the run's log file, a failure's paragraph with the log's
tail and path (jobs/console.py)."""

from __future__ import annotations

import fcntl
import io
import json
import logging
import os
import re
import select
import struct
import subprocess
import sys
import termios
import textwrap
import time
import warnings
from pathlib import Path

import pytest

from jobs import console, progress
from jobs.console import Console

ROOT = Path(__file__).resolve().parents[2]
# lines of Ray and the libraries that must not reach the terminal (issue 18 counted them in the demo's output)
NOISE = re.compile(r"\(pid=|pid=\d+\)|PlacementGroupCleaner|logging_progress\.py|streaming_executor\.py|Loading weights"
                   r"|Running Dataset|Started a local Ray|sentence_transformers")


def _console(live: bool = False) -> tuple[Console, io.StringIO, io.StringIO]:
    out, err = io.StringIO(), io.StringIO()
    return Console(out, err, Path("x.log"), live=live), out, err


def test_plain_lines_say_stage_rate_elapsed_eta_and_figure_at_a_sensible_rate():
    c, _, err = _console()
    for done in range(0, 101, 10):  # eleven updates within a second: the first and the last are shown
        c.update("embed", done, 100, "chunks", elapsed=2.0 + done / 10, figure=f"{done / 2:.1f} chunks/s",
                 to_log=False)
    lines = err.getvalue().splitlines()
    assert lines[0] == "embed: 0/100 chunks (0%), 0.0 chunks/s, elapsed 2s, ETA ?; 0.0 chunks/s"
    assert lines[-1] == "embed: 100/100 chunks (100%), 8.3 chunks/s, elapsed 12s, ETA 0s; 50.0 chunks/s"
    assert len(lines) == 2
    c.update("embed", 100, 100, "chunks", elapsed=13, to_log=False)  # a finished stage says nothing more
    assert len(err.getvalue().splitlines()) == 2
    c.update("embed", 1, 50, "chunks", elapsed=1, to_log=False)  # the stage runs again (another job of the demo)
    assert err.getvalue().splitlines()[-1].startswith("embed: 1/50 chunks (2%)")


def test_rate_from_the_units_of_this_attempt():
    c, _, err = _console()
    c.update("train", 60, 80, "steps", elapsed=10, figure="loss 1.2345", start_done=40, to_log=False)
    assert err.getvalue() == "train: 60/80 steps (75%), 2.0 steps/s, elapsed 10s, ETA 10s; loss 1.2345\n"


def test_live_display_draws_a_bar_with_rate_times_and_figure():
    c, out, err = _console(live=True)
    c.update("train", 30, 80, "steps", elapsed=15, figure="loss 2.5000", to_log=False)
    c.line("06:00:00 a line of ragtune's, above the bar")
    c.out("the result")  # stops the display first
    text = err.getvalue()
    assert "\x1b[" in text and "━" in text  # rich's control codes and bar
    for fact in ("train", "30/80 steps", "2.0/s", "15s ETA 25s", "loss 2.5000", "a line of ragtune's"):
        assert fact in text
    assert out.getvalue() == "the result\n"


def test_a_rate_with_a_stage_goes_to_the_display_and_its_line_to_the_log(caplog):
    c, _, err = _console()
    progress.SINK, console._current = console._rate_sink, c
    try:
        rate = progress.Rate(10, "shards", stage="index")
        rate.add(5)
        with caplog.at_level(logging.INFO, logger="ragtune"):
            rate.log(logging.getLogger("ragtune.index"), "shard-1 written; ", figure="5/10 shards")
            progress.Rate(3, "rows").log(logging.getLogger("ragtune.x"))  # no stage: a log line, as before
    finally:
        progress.SINK, console._current = None, None
    assert err.getvalue().startswith("index: 5/10 shards (50%)")
    assert [(r.name, r.getMessage().split(";")[0]) for r in caplog.records] == [
        ("ragtune.progress", "shard-1 written"), ("ragtune.x", "0/3 rows (0%), 0.0 rows/s, elapsed 0s, ETA ?")]


def test_log_path_under_a_local_output_else_the_local_runs_folder():
    now = time.mktime((2026, 12, 6, 7, 8, 9, 0, 0, -1))
    assert console.log_path("embed", "runs/x/emb", now) == Path("runs/x/emb/_logs/embed-20261206-070809.log")
    assert console.log_path("embed", "file:///data/emb", now) == Path("/data/emb/_logs/embed-20261206-070809.log")
    assert console.log_path("index", "s3://bucket/ix", now) == Path("runs/logs/index-20261206-070809.log")
    assert console.log_path("demo", None, now) == Path("runs/logs/demo-20261206-070809.log")


def test_output_of_each_job_config():
    from configs.schema import JOB_SCHEMAS, load_config

    cfg = load_config(JOB_SCHEMAS["embed"], str(ROOT / "configs/embed/sample.yaml"), ["output.path=/o/emb"])
    assert console.output_of(cfg) == "/o/emb"
    cfg = load_config(JOB_SCHEMAS["finetune"], str(ROOT / "configs/finetune/tiny.yaml"),
                      ["run.storage_path=/o/runs", "run.name=r1"])
    assert console.output_of(cfg) == "/o/runs/r1"
    cfg = load_config(JOB_SCHEMAS["demo"], str(ROOT / "configs/demo/default.yaml"), ["output.path=/o/demo"])
    assert console.output_of(cfg) == "/o/demo"


def test_failure_paragraph_has_the_fix_the_relevant_tail_and_the_path(tmp_path, monkeypatch):
    log = tmp_path / "embed.log"
    log.write_text("\n".join([
        "2026-12-06 06:07:41 INFO ragtune: started a local Ray",
        "2026-12-06 06:07:42\tINFO logging_progress.py:225 -- Total Progress: 0/?",
        "\x1b[36m(MapWorker pid=2036)\x1b[0m Loading weights:   0%|          | 0/103",
        "",
        "\x1b[36m(MapWorker pid=2036)\x1b[0m ValueError: line 3 is not JSON",
        "2026-12-06 06:07:50\tINFO logging_progress.py:192 -- =====",
    ]) + "\n")
    monkeypatch.setattr(console, "last_log", log)
    text = console.failure("embedding part-00000.parquet failed: a long message " * 4 + "Fix: repair the file")
    paragraph, tail, where = text.split("\n\n")
    assert paragraph.startswith("error: embedding part-00000.parquet failed") and "Fix: repair the file" in paragraph
    assert "\n" not in paragraph  # one paragraph: one line, whole paths
    assert tail.splitlines() == [f"the last lines of the log ({log}):",
                                 "  | 2026-12-06 06:07:41 INFO ragtune: started a local Ray",
                                 "  | (MapWorker pid=2036) ValueError: line 3 is not JSON"]
    assert where == f"the whole log: {log}"
    monkeypatch.setattr(console, "last_log", None)
    assert console.failure("bad value. Fix: another") == "error: bad value. Fix: another"


def test_known_library_warnings_are_filtered_by_message_and_module_only():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        progress.filter_known_warnings()
        known = ("`torch.distributed.reduce_scatter_tensor` is deprecated. Please use "
                 "`torch.distributed.reduce_scatter_single` instead.")
        warnings.warn_explicit(known, FutureWarning, "c10d_logger.py", 83, module="torch.distributed.c10d_logger")
        warnings.warn_explicit(known, FutureWarning, "mine.py", 1, module="ragtune_mine")  # another module
        warnings.warn_explicit("something else is deprecated", FutureWarning, "c10d_logger.py", 90,
                               module="torch.distributed.c10d_logger")
    assert [(str(w.message)[:20], w.filename) for w in seen] == [(known[:20], "mine.py"),
                                                                 ("something else is de", "c10d_logger.py")]


SESSION = textwrap.dedent("""
    import logging, os, sys
    from jobs import console
    logging.basicConfig(level=logging.INFO)
    with console.session("embed", sys.argv[1], verbose=len(sys.argv) > 2):
        os.write(2, b"(MapWorker pid=1) a worker's line, forwarded by Ray\\n")
        print("a library's print")
        logging.getLogger("ray.data").info("Starting execution of Dataset")
        logging.getLogger("ragtune.embed").info("8 parts to embed")
        console.out("the result")
""")


def test_session_keeps_the_terminal_for_ragtune_and_puts_the_rest_in_the_log(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAGTUNE_LOG_LEVEL", None)
    p = subprocess.run([sys.executable, "-c", SESSION, str(tmp_path / "out")], capture_output=True, text=True,
                       env=env, cwd=tmp_path, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout == "the result\n"
    first, second = p.stderr.splitlines()
    [log] = (tmp_path / "out" / "_logs").glob("embed-*.log")
    assert first == f"log: {log} (Ray's and the libraries' output; -v shows it here)"
    assert re.fullmatch(r"\d\d:\d\d:\d\d 8 parts to embed", second)
    held = log.read_text()
    for line in ("(MapWorker pid=1) a worker's line", "a library's print", "Starting execution of Dataset",
                 "8 parts to embed"):
        assert line in held
    # -v (or RAGTUNE_LOG_LEVEL): everything on the terminal, as before, and no log file
    p = subprocess.run([sys.executable, "-c", SESSION, str(tmp_path / "v"), "-v"], capture_output=True, text=True,
                       env=env, cwd=tmp_path, timeout=60)
    assert "a worker's line" in p.stderr and "Starting execution of Dataset" in p.stderr
    assert p.stdout == "a library's print\nthe result\n"
    assert not (tmp_path / "v").exists()


# --- a real job, on Ray -----------------------------------------------------------------------------------------

def _embed_cmd(tmp_path: Path, corpus: Path, out: str) -> list[str]:
    """``ragtune embed`` of ``corpus``, as a driver of the session's Ray (no Ray of its own to start)."""
    import ray

    return [sys.executable, "-m", "jobs.cli", "embed", "-c", str(ROOT / "configs/embed/sample.yaml"),
            f"corpus.path={corpus}", f"output.path={tmp_path / out}", "embed.actors=1",
            "--address", ray.get_runtime_context().gcs_address]


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "100", "TERM": "xterm-256color"}
    env.pop("RAGTUNE_LOG_LEVEL", None)
    return env


@pytest.mark.integration
def test_embed_piped_shows_stages_and_rates_and_no_noise(ray_2_cpus, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for name in ("a", "b"):
        (docs / f"{name}.md").write_text(f"# {name}\n\n" + f"Document {name} says something about ragtune. " * 200)
    p = subprocess.run(_embed_cmd(tmp_path, docs, "emb"), capture_output=True, text=True, env=_env(),
                       cwd=tmp_path, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    err = p.stderr.splitlines()
    [log] = (tmp_path / "emb" / "_logs").glob("embed-*.log")
    assert err[0].startswith(f"log: {log} ")
    assert any(re.match(r"\d\d:\d\d:\d\d joining the Ray cluster at ", line) for line in err)
    stage = [line for line in err if line.startswith("embed: ")]
    assert stage[-1].startswith("embed: ") and "(100%)" in stage[-1] and "KiB of input/s" in stage[-1]
    assert "elapsed" in stage[-1] and "ETA 0s" in stage[-1] and "chunks/s" in stage[-1]
    noisy = [line for line in p.stderr.splitlines() + p.stdout.splitlines() if NOISE.search(line)]
    assert noisy == []
    summary = json.loads(p.stdout.splitlines()[-1])
    assert summary["chunks"] > 0 and p.stdout.splitlines()[0].startswith("embedded 2 docs")
    held = log.read_text()
    assert "streaming_executor" in held and "pid=" in held  # Ray Data's lines and the workers' (log_to_driver)


@pytest.mark.integration
def test_embed_on_a_terminal_draws_the_live_display_and_a_failure_ends_with_paragraph_tail_and_path(ray_2_cpus,
                                                                                                    tmp_path):
    corpus = tmp_path / "broken.jsonl"
    good = [json.dumps({"id": f"d{i}", "text": f"Document {i} is fine. " * 50}) for i in range(40)]
    corpus.write_text("\n".join(good + ['{"id": "bad", "text": "cut off in the middle'] + good[:5]) + "\n")
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))  # 30 rows, 100 columns
    p = subprocess.Popen(_embed_cmd(tmp_path, corpus, "emb"), stdin=slave, stdout=slave, stderr=slave, env=_env(),
                         cwd=tmp_path)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + 600
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif p.poll() is not None:
            break
    os.close(master)
    text = b"".join(chunks).decode("utf-8", errors="replace")
    assert p.wait(timeout=60) == 2, text[-5000:]
    [log] = (tmp_path / "emb" / "_logs").glob("embed-*.log")
    assert f"log: {log}" in text
    assert "\x1b[" in text and "━" in text and "KiB of input" in text  # rich's live bar
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)
    assert "error: " in plain and "cannot be read as jsonl" in plain and "Fix:" in plain
    assert f"the last lines of the log ({log}):" in plain and f"the whole log: {log}" in plain
    tail = plain.split("the last lines of the log")[1].split("the whole log")[0]
    assert len([line for line in tail.splitlines() if line.startswith("  | ")]) >= 3
    assert not NOISE.search(plain.split("the last lines of the log")[0])


@pytest.mark.integration
def test_workers_report_steps_to_the_drivers_display_through_a_board(ray_2_cpus):
    c, _, err = _console()
    console._current = c
    try:
        with console.board(poll_s=0.2) as board:
            @ray_2_cpus.remote(num_cpus=0)
            def worker(board) -> None:  # what rank 0 of the training does (jobs.finetune.log_step)
                for step in range(1, 4):
                    console.report(board, "train", step, 3, "steps", elapsed=step * 2.0,
                                   figure=f"loss {1 / step:.4f}", start_done=0)

            ray_2_cpus.get(worker.remote(board))
    finally:
        console._current = None
    lines = err.getvalue().splitlines()
    assert lines[-1] == "train: 3/3 steps (100%), 0.5 steps/s, elapsed 6s, ETA 0s; loss 0.3333"
    assert all(line.startswith("train: ") for line in lines)
