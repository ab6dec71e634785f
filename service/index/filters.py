"""Metadata filters for ``/similar``: a JSON object of equalities, e.g. ``{"label": "sneaker"}``.

An item matches when, for every key, its metadata holds that key at the top level with an equal
value of the same kind (a string equals a string, a number a number: ``1`` equals ``1.0``, a
boolean a boolean). Both backends apply the same rule: SQLite's JSON functions for the embedded
index, ``jsonb @>`` (top-level scalars only, where containment is equality) for PostgreSQL.

Filters come from the network, so they are bounded: at most ``MAX_KEYS`` keys of a plain
character set, scalar values only, ``MAX_FILTER_BYTES`` of JSON. Anything else is an
``InvalidItemError`` (HTTP 422) saying what to change.
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
from typing import Any

import numpy as np

from service.index.errors import InvalidItemError

MAX_FILTER_BYTES = 4096
MAX_KEYS = 16
MAX_VALUE_CHARS = 512
KEY_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,63}")
Filter = dict[str, str | int | float | bool]


def parse_filter(text: str | None) -> Filter | None:
    """The filter from a query string or form field (None or blank: no filter)."""
    if text is None or not text.strip():
        return None
    if len(text.encode("utf-8", "surrogatepass")) > MAX_FILTER_BYTES:
        raise InvalidItemError(f"filter is longer than {MAX_FILTER_BYTES} bytes")
    try:
        value = json.loads(text)
    except RecursionError:
        raise InvalidItemError("filter is nested too deeply; use a flat JSON object") from None
    except ValueError as exc:  # JSONDecodeError, or an integer of thousands of digits
        raise InvalidItemError(
            f'filter is not valid JSON ({exc}); e.g. {{"label": "cat"}}'
        ) from None
    return check_filter(value)


def check_filter(value: Any) -> Filter | None:
    """Validate an already-decoded filter (the Python API takes dicts)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidItemError(
            f'filter must be a JSON object of metadata equalities such as {{"label": "cat"}}, '
            f"got {type(value).__name__}"
        )
    if len(value) > MAX_KEYS:
        raise InvalidItemError(f"filter has {len(value)} keys; at most {MAX_KEYS}")
    out: Filter = {}
    for key, val in value.items():
        if not isinstance(key, str) or not KEY_RE.fullmatch(key):
            raise InvalidItemError(
                f"filter key {str(key)[:80]!r} is not allowed: 1-64 characters of letters, "
                "digits, '_', '.', ':' or '-'"
            )
        out[key] = _check_value(key, val)
    return out or None


def _check_value(key: str, val: Any) -> str | int | float | bool:
    if isinstance(val, bool | str):
        if isinstance(val, str) and len(val) > MAX_VALUE_CHARS:
            raise InvalidItemError(f"filter value of {key!r} is over {MAX_VALUE_CHARS} characters")
        if isinstance(val, str) and not _utf8(val):
            raise InvalidItemError(
                f"filter value of {key!r} is not valid text (a NUL character or a lone surrogate)"
            )
        return val
    if isinstance(val, int):
        if not -(2**63) <= val < 2**63:
            raise InvalidItemError(f"filter value of {key!r} is outside the 64-bit integer range")
        return val
    if isinstance(val, float) and math.isfinite(val):
        return val
    kind = "null" if val is None else type(val).__name__
    raise InvalidItemError(
        f"filter value of {key!r} is a {kind}; values must be strings, numbers or booleans "
        "(equality on top-level metadata keys)"
    )


def _utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:  # a lone surrogate, which JSON can spell as \\ud800
        return False
    return "\x00" not in text  # PostgreSQL text cannot hold NUL


def matches(metadata: dict, flt: Filter | None) -> bool:
    """The rule in Python (for tests and small in-memory checks)."""
    if not flt:
        return True
    for key, want in flt.items():
        if key not in metadata:
            return False
        got = metadata[key]
        if isinstance(want, bool) or isinstance(got, bool):
            if not (isinstance(want, bool) and isinstance(got, bool) and want == got):
                return False
        elif (
            not isinstance(got, str | int | float)
            or isinstance(want, str) != isinstance(got, str)
            or got != want
        ):
            return False
    return True


def _path(key: str) -> str:
    return f'$."{key}"'  # quoted: a '.' in the key is part of the name, not a nested path


def sqlite_where(flt: Filter) -> tuple[str, list[object]]:
    """A WHERE clause over the embedded index's ``metadata`` TEXT column, and its parameters."""
    parts: list[str] = []
    args: list[object] = []
    for key, want in flt.items():
        path = _path(key)
        if isinstance(want, bool):
            parts.append("json_type(metadata, ?) = ?")
            args += [path, "true" if want else "false"]
        elif isinstance(want, str):
            parts.append("json_type(metadata, ?) = 'text' AND json_extract(metadata, ?) = ?")
            args += [path, path, want]
        else:
            parts.append(
                "json_type(metadata, ?) IN ('integer', 'real') AND json_extract(metadata, ?) = ?"
            )
            args += [path, path, want]
    return " AND ".join(f"({p})" for p in parts), args


def sqlite_rows(conn: sqlite3.Connection, flt: Filter) -> np.ndarray:
    """The FAISS rows of the items that match, ascending."""
    where, args = sqlite_where(flt)
    rows = conn.execute(f"SELECT row FROM items WHERE {where} ORDER BY row", args).fetchall()
    return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))


def pg_containment(flt: Filter) -> str:
    """The JSON for ``metadata @> %s::jsonb`` (top-level scalars: containment is equality)."""
    return json.dumps(flt)
