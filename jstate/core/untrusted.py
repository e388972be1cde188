"""Parsing JSON that came from a file jstate did not necessarily write (a manifest, a safetensors
header, Orbax's metadata and JSON items)."""

from __future__ import annotations

import json
from typing import Any


def parse_json(data: bytes | str) -> Any:
    """`data` decoded as JSON, with every way it can fail a `ValueError`.

    `json.loads` raises `RecursionError` (a `RuntimeError`) on a few kilobytes of nested
    brackets; every reader already reports a `ValueError` as a damaged file naming that file,
    so the one conversion lives here rather than in each reader's ``except``.

    Args:
      data: the bytes (UTF-8, -16 or -32, as `json.loads` takes them) or text.

    Returns:
      The decoded value.

    Raises:
      ValueError: `data` is no JSON (`json.JSONDecodeError`, `UnicodeDecodeError`) or nests
        deeper than Python can decode.

    >>> parse_json(b'{"a": [1, 2]}')
    {'a': [1, 2]}
    >>> parse_json(b"[" * 100_000 + b"]" * 100_000)
    Traceback (most recent call last):
    ...
    ValueError: JSON nested deeper than Python can decode
    """
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("JSON nested deeper than Python can decode") from None
