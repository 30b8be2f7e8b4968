"""Rate and ETA of long work: a stage of the console's display in a ``ragtune`` driver (``jobs.console``), else
plain lines for logs where a bar cannot redraw (Ray workers, job logs, CI)."""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable

# set by jobs.console during a session: shows a Rate that has a stage (returns True when it did)
SINK: Callable[[Rate, str], bool] | None = None


def fmt_seconds(s: float) -> str:
    s = max(0, int(round(s)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Rate:
    """Counts units done out of a total and says how fast and how long is left; with a ``stage`` name, a
    ``ragtune`` driver shows it as that stage's progress display."""

    def __init__(self, total: int, unit: str = "rows", stage: str | None = None):
        self.total = total
        self.unit = unit
        self.stage = stage
        self.done = 0
        self.start = time.perf_counter()

    def add(self, n: int) -> None:
        self.done += n

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    @property
    def per_second(self) -> float:
        return self.done / self.elapsed if self.elapsed > 0 else 0.0

    def line(self) -> str:
        rate = self.per_second
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        eta_s = fmt_seconds(eta) if rate > 0 else "?"
        return (f"{self.done:,}/{self.total:,} {self.unit} ({100 * self.done / max(self.total, 1):.0f}%), "
                f"{rate:,.1f} {self.unit}/s, elapsed {fmt_seconds(self.elapsed)}, ETA {eta_s}")

    def log(self, logger: logging.Logger, prefix: str = "", figure: str = "") -> None:
        """The progress so far: the stage's display in a ``ragtune`` driver (the line to its log file), else a
        log line. ``prefix`` says what just finished; ``figure`` is the stage's key number (e.g. chunks/s)."""
        if SINK is not None and SINK(self, figure):  # the terminal shows the display; the log file the line
            logging.getLogger("ragtune.progress").info("%s%s%s", prefix, self.line(), f"; {figure}" if figure else "")
            return
        logger.info("%s%s%s", prefix, self.line(), f"; {figure}" if figure else "")


# known harmless warnings of the libraries, by exact message and module (nothing else is silenced)
KNOWN_WARNINGS: list[tuple[str, type[Warning], str]] = [
    (r"`torch\.distributed\.reduce_scatter_tensor` is deprecated\. Please use "
     r"`torch\.distributed\.reduce_scatter_single` instead\.", FutureWarning, r"torch\.distributed\.c10d_logger"),
    (r"`torch\.distributed\.all_gather_into_tensor` is deprecated\. Please use "
     r"`torch\.distributed\.all_gather_single` instead\.", FutureWarning, r"torch\.distributed\.c10d_logger"),
    (r"`is_gradient_checkpointing` is deprecated and will be removed in v6\. Use `is_activation_checkpointing` "
     r"instead\.", FutureWarning, r"transformers\.modeling_utils"),
]


def filter_known_warnings() -> None:
    """Ignore ``KNOWN_WARNINGS`` in this process (a ``ragtune`` driver, and every worker through
    ``ensure_logging``)."""
    for message, category, module in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


def ensure_logging() -> None:
    """Show ragtune's INFO lines in a process that set up no logging (a Ray worker or actor); known harmless
    library warnings filtered."""
    filter_known_warnings()
    logger = logging.getLogger("ragtune")
    if not logger.handlers and not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
