"""The filter language of ragtune: which chunks a search filter (the API's ``filter``) or ``ragtune index delete
--where`` selects.

A filter maps fields to allowed values, ``{"source": "wiki", "year": [2020, 2021]}``: every field must hold its
value, or one of its list of values. ``doc_id`` and ``title`` are the docstore's columns; any other field is a key
of the chunk's metadata (kept as JSON text in the docstore).

Two evaluators of the same language: :func:`matches` on one row (a dict), and :func:`filter_mask` on a batch of
docstore rows (pyarrow), which ``ragtune index delete --where`` streams through: column fields and the metadata
JSON text are screened with pyarrow compute, and only the rows that pass the screen are parsed and checked by
:func:`matches`, so both give the same answer.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
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


def _literal(s: Any) -> str | None:
    """``s`` as it appears in JSON text when the text has no backslash (``"s"``), or None when it cannot be
    screened that way (not a string, or one that JSON escapes)."""
    if not isinstance(s, str):
        return None
    quoted = json.dumps(s, ensure_ascii=False)
    return quoted if quoted[1:-1] == s else None


def _wanted(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list) else [value]


def filter_mask(rows: pa.Table | pa.RecordBatch, filter: Filter) -> pa.Array:
    """Which of ``rows`` (docstore columns: doc_id, title, metadata as JSON text) ``filter`` selects: the same
    answer as :func:`matches` row by row.

    ``doc_id`` and ``title`` are compared by ``is_in``. A metadata field is screened on the JSON text first: a
    row whose metadata holds no backslash (so every string in it is written literally) can match only if it
    contains ``"field"`` and, when every wanted value is a plain string, one of ``"value"``; the rows that pass
    (and those with backslashes, or a wanted null, which a missing key also matches) are parsed by
    :func:`matches`.
    """
    n = rows.num_rows
    mask = pa.array([True] * n, pa.bool_())
    meta_keys = [k for k in filter if k not in COLUMNS]
    for key in (k for k in filter if k in COLUMNS):
        want = _wanted(filter[key])
        col = rows[key] if key in rows.column_names else pa.nulls(n, pa.string())
        if not pa.types.is_string(col.type):  # e.g. a column of nulls only
            col = pc.cast(col, pa.string())
        hit = pc.fill_null(pc.is_in(col, value_set=pa.array([w for w in want if isinstance(w, str)], pa.string())),
                           False)
        if None in want:
            hit = pc.or_(hit, pc.is_null(col))
        mask = pc.and_(mask, hit)
    if not meta_keys:
        return mask
    meta = rows["metadata"] if "metadata" in rows.column_names else pa.nulls(n, pa.string())
    if pa.types.is_null(meta.type):
        meta = pc.cast(meta, pa.string())
    if pa.types.is_string(meta.type) or pa.types.is_large_string(meta.type):  # else: every row is checked below
        text = pc.fill_null(meta, "")
        escaped = pc.match_substring(text, "\\")
        for key in meta_keys:
            want = _wanted(filter[key])
            lit = _literal(key)
            if lit is None or None in want:
                continue  # a missing key matches a wanted null: every row stays a candidate
            screen = pc.match_substring(text, lit)
            values = [_literal(w) for w in want]
            if all(v is not None for v in values):
                any_value = pa.array([False] * n, pa.bool_())
                for v in values:
                    any_value = pc.or_(any_value, pc.match_substring(text, v))
                screen = pc.and_(screen, any_value)
            mask = pc.and_(mask, pc.or_(screen, escaped))
    candidates = mask.to_numpy(zero_copy_only=False).nonzero()[0]
    if not len(candidates):
        return mask
    cols = [c for c in ("doc_id", "title", "metadata") if c in rows.column_names]
    subset = rows.select(cols).take(pa.array(candidates))
    out = mask.to_numpy(zero_copy_only=False).copy()
    check = _row_matcher(filter)
    out[candidates] = [check(r) for r in subset.to_pylist()]
    return pa.array(out, pa.bool_())


def _row_matcher(filter: Filter) -> Any:
    """:func:`matches` for many rows: each field's values as a set (``x in set`` is ``x in list`` for the
    hashable values JSON and YAML give: equal values hash alike), the list kept for unhashable ones."""
    wants = {k: (v, {h for h in v if _hashable(h)}) for k, v in ((k, _wanted(w)) for k, w in filter.items())}
    need_meta = any(k not in COLUMNS for k in filter)

    def check(row: Mapping[str, Any]) -> bool:
        meta = metadata_of(row) if need_meta else {}
        for key, (want, fast) in wants.items():
            value = row.get(key) if key in COLUMNS else meta.get(key)
            if not (value in fast if _hashable(value) else value in want):  # a scalar never equals a list/dict
                return False
        return True

    return check


def _hashable(x: Any) -> bool:
    try:
        hash(x)
    except TypeError:
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
