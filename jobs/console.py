"""What a person sees while a job runs: ragtune's lines and one progress display per stage on the terminal; Ray's
and the libraries' output in a log file.

``session(job, output)`` (``jobs.commands.run_config_job`` opens it) points the process's stdout and stderr (file
descriptors 1 and 2: Python's streams, Ray's C++ core, the workers' lines that ``log_to_driver`` forwards, Ray
Data's executor dumps, tqdm bars) at ``<output>/_logs/<job>-<time>.log`` (``runs/logs/`` when the output is not a
local folder) and keeps the terminal for:

- ragtune's own log lines (the ``ragtune`` logger, INFO and up), short: ``06:07:41 started a local Ray ...``;
- a progress display per stage (``jobs.progress.Rate`` and the training workers' steps, through a ``Board``
  actor the driver polls): on a terminal a live ``rich`` bar with the rate, elapsed time, ETA and the stage's key
  figure; otherwise a plain line with the same facts at most every ``PLAIN_EVERY_S`` seconds per stage;
- the job's result (``out``);
- on a failure, the error as one paragraph with its fix, the last relevant lines of the log and its path
  (``failure``).

``-v``/``--verbose`` or ``RAGTUNE_LOG_LEVEL`` (e.g. ``DEBUG``) shows everything on the terminal, as before; under
``ray job submit`` the job's own log already holds everything, so nothing is redirected there either.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from jobs import progress
from jobs.progress import fmt_seconds

log = logging.getLogger("ragtune")
PROGRESS_LOGGER = "ragtune.progress"  # progress lines: to the log file; the terminal shows the display instead
PLAIN_EVERY_S = 10.0  # a non-terminal gets a stage's line at most this often (and its first and last)
TAIL_LINES = 12  # log lines shown after a failure
LOCAL_RUNS = Path("runs") / "logs"  # where the log goes when the job's output is not a local folder

_current: Console | None = None
last_log: Path | None = None  # the log file of the last session in this process (a failure's paragraph names it)


def verbose_wanted(flag: bool = False) -> bool:
    """-v/--verbose, or RAGTUNE_LOG_LEVEL set: everything on the terminal, as without a console."""
    return flag or bool(os.environ.get("RAGTUNE_LOG_LEVEL"))


def under_job_submit() -> bool:
    """This driver was started by ``ray job submit`` (its log is the job's log, which holds everything)."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ or "RAY_JOB_ID" in os.environ


def log_level() -> int:
    name = os.environ.get("RAGTUNE_LOG_LEVEL", "INFO").upper()
    level = logging.getLevelName(name)
    return level if isinstance(level, int) else logging.INFO


def log_path(job: str, output: str | None, now: float | None = None) -> Path:
    """``<output>/_logs/<job>-<YYYYmmdd-HHMMSS>.log`` when the job's output is a local folder, else
    ``runs/logs/<job>-<...>.log`` (relative to the working directory)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    local = output is not None and ("://" not in output or output.startswith("file://"))
    folder = Path(output.removeprefix("file://")) / "_logs" if local and output else LOCAL_RUNS
    return folder / f"{job}-{stamp}.log"


def output_of(cfg: Any) -> str | None:
    """The folder a job config writes to: its field marked ``storage: output`` (``run.storage_path``/``run.name``
    for a fine-tuning run)."""
    run = getattr(cfg, "run", None)
    if run is not None and hasattr(run, "storage_path"):
        return f"{str(run.storage_path).rstrip('/')}/{run.name}"
    for name, f in type(cfg).model_fields.items():
        value = getattr(cfg, name)
        extra = f.json_schema_extra if isinstance(f.json_schema_extra, dict) else {}
        if extra.get("storage") == "output" and isinstance(value, str):
            return value
        if hasattr(type(value), "model_fields"):
            found = output_of(value)
            if found is not None:
                return found
    return None


@dataclass
class _Stage:
    task: Any = None  # the rich task id
    last_line: float = 0.0
    done: float = 0
    total: float = 0
    figure: str = ""
    ended: bool = False


@dataclass
class Console:
    """The terminal of a session: its two streams (the process's stdout/stderr before the redirection) and the
    stages' displays."""

    out_stream: TextIO
    err_stream: TextIO
    path: Path
    live: bool  # stderr is a terminal: a rich live display, else plain lines
    stages: dict[str, _Stage] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    rich: Any = None
    bars: Any = None  # rich.progress.Progress, started with the first stage

    def __post_init__(self) -> None:
        if self.live:
            import rich.console

            try:  # fds 1 and 2 are the log file now: ask the terminal itself
                width: int | None = os.get_terminal_size(self.err_stream.fileno()).columns or None
            except (OSError, ValueError, AttributeError):
                width = None  # rich then reads COLUMNS, else 80
            self.rich = rich.console.Console(file=self.err_stream, force_terminal=True, highlight=False, width=width)

    def line(self, text: str) -> None:
        """A line of ragtune's on the terminal (above the live display)."""
        with self.lock:
            if self.rich is not None:
                self.rich.print(text, markup=False, highlight=False, soft_wrap=True)
            else:
                self.err_stream.write(text + "\n")
                self.err_stream.flush()

    def out(self, text: str) -> None:
        """The job's result, on stdout."""
        self.stop_display()
        self.out_stream.write(text + "\n")
        self.out_stream.flush()

    def update(self, stage: str, done: float, total: float, unit: str, elapsed: float, figure: str = "",
               start_done: float = 0, to_log: bool = True) -> None:
        """Show ``stage`` at ``done`` of ``total`` ``unit`` after ``elapsed`` seconds (rate and ETA from the units
        done since ``start_done``); ``figure`` is the stage's key number (loss, chunks/s, recall)."""
        rate = (done - start_done) / elapsed if elapsed > 0 else 0.0
        eta = fmt_seconds((total - done) / rate) if rate > 0 and done < total else ("0s" if done >= total else "?")
        finished = done >= total
        text = (f"{stage}: {done:,.0f}/{total:,.0f} {unit} ({100 * done / max(total, 1):.0f}%), {rate:,.1f} "
                f"{unit}/s, elapsed {fmt_seconds(elapsed)}, ETA {eta}" + (f"; {figure}" if figure else ""))
        if to_log:
            logging.getLogger(PROGRESS_LOGGER).info("%s", text)
        with self.lock:
            st = self.stages.get(stage)
            if st is None or (st.ended and not finished):  # a new stage, or one that runs again (the demo's trainings)
                st = self.stages[stage] = _Stage()
            elif st.ended:  # the same last report again
                return
            st.done, st.total, st.figure, st.ended = done, total, figure, finished
            if self.live:
                self._bar(stage, st, unit, rate, eta, elapsed)
                return
            now = time.monotonic()
            if st.last_line and now - st.last_line < PLAIN_EVERY_S and not finished:
                return
            st.last_line = now
            self.err_stream.write(text + "\n")
            self.err_stream.flush()

    def _bar(self, stage: str, st: _Stage, unit: str, rate: float, eta: str, elapsed: float) -> None:
        from rich.progress import BarColumn, Progress, TextColumn

        if self.bars is None:
            self.bars = Progress(TextColumn("{task.description}"), BarColumn(bar_width=24),
                                 TextColumn("{task.completed:,.0f}/{task.total:,.0f} {task.fields[unit]}"),
                                 TextColumn("{task.fields[rate]}"), TextColumn("{task.fields[times]}"),
                                 TextColumn("{task.fields[figure]}"), console=self.rich, transient=False,
                                 redirect_stdout=False, redirect_stderr=False)  # sys.stdout/err: the log file
            self.bars.start()
        fields = {"unit": unit, "rate": f"{rate:,.1f}/s", "times": f"{fmt_seconds(elapsed)} ETA {eta}",
                  "figure": st.figure}
        if st.task is None:
            st.task = self.bars.add_task(stage, total=st.total, completed=st.done, **fields)
        else:
            self.bars.update(st.task, total=st.total, completed=st.done, **fields)

    def stop_display(self) -> None:
        with self.lock:
            if self.bars is not None:
                self.bars.stop()
                self.bars = None
                for st in self.stages.values():
                    st.task = None


class _TerminalHandler(logging.Handler):
    """ragtune's log lines, short, on the session's terminal (progress lines are shown by the display)."""

    def __init__(self, console: Console):
        super().__init__(logging.INFO)
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        if record.name == PROGRESS_LOGGER:
            return
        try:
            level = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
            stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
            self.console.line(f"{stamp} {level}{record.getMessage()}")
        except Exception:
            self.handleError(record)


def current() -> Console | None:
    """The session's console in this process (the driver of a ``ragtune`` job), else None (a worker, a test)."""
    return _current


def out(text: str) -> None:
    """Print a job's result: on the terminal during a session, else on stdout."""
    if _current is not None:
        _current.out(text)
    else:
        print(text, flush=True)


def _rate_sink(rate: progress.Rate, figure: str) -> bool:
    if _current is None or rate.stage is None:
        return False
    _current.update(rate.stage, rate.done, rate.total, rate.unit, rate.elapsed, figure, to_log=False)
    return True


@contextlib.contextmanager
def session(job: str, output: str | None, verbose: bool = False) -> Iterator[Console | None]:
    """Run a job's driver with its console (see the module's docstring). Yields None (nothing redirected) with
    ``verbose``, ``RAGTUNE_LOG_LEVEL``, under ``ray job submit``, or inside another session."""
    global _current, last_log
    logging.getLogger().setLevel(log_level())
    progress.filter_known_warnings()
    if verbose_wanted(verbose) or under_job_submit() or _current is not None:
        yield None
        return
    path = log_path(job, output)
    path.parent.mkdir(parents=True, exist_ok=True)
    ray_before = _ray_running()  # a Ray this process had already (a notebook's, a test's) is not ours to stop
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    out_stream, own_out = _terminal_stream(sys.stdout, 1, saved[0])
    err_stream, own_err = _terminal_stream(sys.stderr, 2, saved[1])
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    console = Console(out_stream, err_stream, path, live=err_stream.isatty())
    handler = _TerminalHandler(console)
    logging.getLogger("ragtune").addHandler(handler)
    _current, last_log = console, path
    progress.SINK = _rate_sink
    console.line(f"log: {path} (Ray's and the libraries' output; -v shows it here)")
    try:
        yield console
    finally:
        console.stop_display()
        if not ray_before:
            _shutdown_ray()  # Ray's last forwarded lines (at shutdown) go to the log too, not after the result
        progress.SINK = None
        _current = None
        logging.getLogger("ragtune").removeHandler(handler)
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for f in saved:
            os.close(f)
        for stream, own in ((out_stream, own_out), (err_stream, own_err)):
            if own:
                stream.close()
        if path.stat().st_size == 0:  # nothing ran (e.g. a config refused at its check): no log to keep
            path.unlink()
            with contextlib.suppress(OSError):
                path.parent.rmdir()
            last_log = None


def _terminal_stream(stream: TextIO, fd: int, saved: int) -> tuple[TextIO, bool]:
    """Where the session writes what was for ``stream`` (sys.stdout or sys.stderr, file descriptor ``fd``), and
    whether the session opened it: a copy of the descriptor as it was (``saved``) when ``stream`` writes to
    ``fd``; else ``stream`` itself, which a caller put there (pytest's capsys, a notebook) and reads."""
    try:
        writes_to_fd = stream.fileno() == fd
    except (OSError, ValueError, AttributeError):  # io.UnsupportedOperation is an OSError and a ValueError
        writes_to_fd = False
    if not writes_to_fd:
        return stream, False
    return open(os.dup(saved), "w", buffering=1, encoding="utf-8", errors="replace"), True  # noqa: SIM115


def _ray_running() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and bool(ray.is_initialized())


def _shutdown_ray() -> None:
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        with contextlib.suppress(Exception):
            ray.shutdown()


# --- after a failure ------------------------------------------------------------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_NOISE = re.compile(r"logging_progress\.py|Loading weights|PlacementGroupCleaner|^=+$|^\s*$|ragtune\.progress: "
                    r"|\[repeated \d+x across cluster\]|Active & requested resources|Total Progress")


def log_tail(path: Path, n: int = TAIL_LINES) -> list[str]:
    """The last ``n`` relevant lines of a log: without colour codes, progress dumps and blank lines."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 256 * 1024))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    lines = [_ANSI.sub("", line).rstrip() for line in text.replace("\r", "\n").splitlines()]
    return [line for line in lines if not _NOISE.search(line)][-n:]


def failure(message: str) -> str:
    """What a failed command ends with: the error with its fix as one paragraph (one line, which the terminal
    wraps: paths in it stay whole for a copy), then the last lines of the session's log and its path (when the
    command had a session whose log holds anything)."""
    width = max(60, min(shutil.get_terminal_size((100, 24)).columns, 100))
    parts = [f"error: {message}"]
    if last_log is not None:
        tail = log_tail(last_log)
        if tail:
            parts.append(f"the last lines of the log ({last_log}):\n"
                         + "\n".join(f"  | {line[:width * 2]}" for line in tail))
        parts.append(f"the whole log: {last_log}")
    return "\n\n".join(parts)


# --- training workers' progress -------------------------------------------------------------------------------------

class Board:
    """A Ray actor the training workers report their progress to and the driver polls (its display)."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {}

    def put(self, stage: str, row: dict[str, Any]) -> None:
        self.rows[stage] = row

    def get(self) -> dict[str, dict[str, Any]]:
        return self.rows


def report(board: Any, stage: str, done: int, total: int, unit: str, elapsed: float, figure: str = "",
           start_done: int = 0) -> None:
    """From a worker: ``stage`` is at ``done`` of ``total`` (fire and forget; nothing without a board). The last
    report (``done >= total``) is awaited: calls from different processes reach the actor in no set order, so
    the driver's final poll, once the workers have ended, could otherwise miss it."""
    if board is None:
        return
    ref = board.put.remote(stage, {"done": done, "total": total, "unit": unit, "elapsed": elapsed,
                                   "figure": figure, "start_done": start_done})
    if done >= total:
        import ray

        with contextlib.suppress(Exception):  # a board gone: the job goes on without its display
            ray.get(ref, timeout=10)


@contextlib.contextmanager
def board(poll_s: float = 1.0) -> Iterator[Any]:
    """A ``Board`` actor for the workers and a thread showing what they report, during a session; else None."""
    console = _current
    if console is None:
        yield None
        return
    import ray

    actor: Any = ray.remote(num_cpus=0)(Board).remote()
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(poll_s):
            with contextlib.suppress(Exception):  # a slow or gone actor: the next poll tries again
                for stage, row in ray.get(actor.get.remote(), timeout=10).items():
                    console.update(stage, **row)

    thread = threading.Thread(target=poll, name="ragtune-board", daemon=True)
    thread.start()
    try:
        yield actor
    finally:
        stop.set()
        thread.join(timeout=15)
        with contextlib.suppress(Exception):  # show the last report, then let the actor go
            for stage, row in ray.get(actor.get.remote(), timeout=10).items():
                console.update(stage, **row)
        with contextlib.suppress(Exception):
            ray.kill(actor)
