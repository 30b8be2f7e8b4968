"""Rate and ETA lines for long work, for logs where a progress bar cannot redraw (Ray job logs, CI)."""

from __future__ import annotations

import logging
import time


def fmt_seconds(s: float) -> str:
    s = max(0, int(round(s)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Rate:
    """Counts units done out of a total and says how fast and how long is left."""

    def __init__(self, total: int, unit: str = "rows"):
        self.total = total
        self.unit = unit
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

    def log(self, logger: logging.Logger, prefix: str = "") -> None:
        logger.info("%s%s", prefix, self.line())


def ensure_logging() -> None:
    """Show ragtune's INFO lines in a process that set up no logging (a Ray worker or actor)."""
    logger = logging.getLogger("ragtune")
    if not logger.handlers and not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
