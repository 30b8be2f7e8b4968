"""JSONL files that one job writes for another to read (the compare job's training records, the demo's world and
reader records): written whole or not at all, so that a rerun never reads half a file."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sharding.storage import atomic_write_bytes, resolve


def write_jsonl(path: Path, records: Sequence[Mapping[str, Any]]) -> str:
    """Write records as JSONL atomically, creating the folder; returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(resolve(str(path)), "".join(json.dumps(r) + "\n" for r in records).encode())
    return str(path)
