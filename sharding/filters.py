"""The filter language of ragtune: which chunks a search filter (the API's ``filter``) or ``ragtune index delete
--where`` selects.

A filter maps fields to allowed values, ``{"source": "wiki", "year": [2020, 2021]}``: every field must hold its
value, or one of its list of values. ``doc_id`` and ``title`` are the docstore's columns; any other field is a key
of the chunk's metadata (kept as JSON text in the docstore).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from configs.errors import RagtuneError

Scalar = str | int | float | bool
Filter = Mapping[str, Scalar | list[Scalar]]
COLUMNS = ("doc_id", "title")  # fields that are docstore columns, not metadata keys


def metadata_of(row: Mapping[str, Any]) -> dict[str, Any]:
    """The chunk's metadata as a dict (the docstore keeps it as JSON text); {} when it is absent or unreadable."""
    meta = row.get("metadata")
    if isinstance(meta, dict):
        return meta
    try:
        value = json.loads(meta) if meta else {}
    except (TypeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def matches(row: Mapping[str, Any], filter: Filter) -> bool:
    """Every field of ``filter`` holds its value, or one of its list of values."""
    meta = metadata_of(row) if any(k not in COLUMNS for k in filter) else {}
    for key, want in filter.items():
        value = row.get(key) if key in COLUMNS else meta.get(key)
        if value not in (want if isinstance(want, list) else [want]):
            return False
    return True


def parse_where(items: Sequence[str]) -> dict[str, list[Any]]:
    """``--where`` values -> a filter, {field: allowed values}. Each item is ``field=value`` (``value1,value2``: either)
    or a JSON object ``{"field": value | [values]}`` (the serving API's ``filter``); items are ANDed. Fields are
    ``doc_id``, ``title`` or a key of the documents' metadata. Values are YAML scalars (``year=2020`` is the
    number 2020, ``year='2020'`` the string)."""
    out: dict[str, list[Any]] = {}
    fix = ("Fix: write field=value (e.g. --where source=wiki, --where year=2020,2021) or a JSON object "
           "(--where '{\"source\": [\"wiki\", \"news\"]}')")
    for item in items:
        text = item.strip()
        if text.startswith("{"):
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise RagtuneError(f"--where {item!r}: not a JSON object ({e.msg}). {fix}") from None
            if not isinstance(obj, dict) or not obj:
                raise RagtuneError(f"--where {item!r}: an empty or non-object filter. {fix}")
            for key, v in obj.items():
                out.setdefault(str(key), []).extend(v if isinstance(v, list) else [v])
            continue
        key, sep, raw = text.partition("=")
        if not sep or not key.strip() or not raw.strip():
            raise RagtuneError(f"--where {item!r}: expected field=value. {fix}")
        values = []
        for part in raw.split(","):
            try:
                values.append(yaml.safe_load(part.strip()))
            except yaml.YAMLError:
                values.append(part.strip())
        out.setdefault(key.strip(), []).extend(values)
    if not out:
        raise RagtuneError(f"--where: no condition given. {fix}")
    return out
