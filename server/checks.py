"""checks — what the store refuses and how it says so.

Owns: StoreError, RunIdTaken and RunNotFound (the exceptions Store raises), the field checks
every write runs (a finite number or null, a step), strict JSON for stored text (and
its fast bytes form, with reading it back), and
the tag of a frame body stored as its wire text (by earlier versions).

Never: touches SQLite; never lets NaN/Inf through (they become None).
"""

from __future__ import annotations

import json
from math import isfinite
from typing import Any

import orjson
from layerscope.trainer import wire

# A frames.body is zlib of the frame's JSON as stored. Databases written before the
# writer became a process may also hold WIRE_BODY then zlib of the wire text the frame
# was validated from; reads validate those again.
WIRE_BODY = b"W"


class StoreError(ValueError):
    """A write the store refuses (bad frame, duplicate run, bad status); nothing of it is kept."""


class RunIdTaken(StoreError):
    """A hello from another trainer process for a run id that already holds a run."""

    def __init__(self, run_id: str) -> None:
        super().__init__(
            f"run id {run_id} already holds a run recorded by another trainer process; choose"
            " another run id (watch(run_id=...), --run-id) or delete that run"
        )
        self.run_id = run_id


class RunNotFound(LookupError):
    """The run id names no stored run."""

    def __init__(self, run_id: str) -> None:
        super().__init__(f"run '{run_id}' not found")
        self.run_id = run_id

    def __str__(self) -> str:
        return str(self.args[0])


def dumps(value: Any) -> str:
    """Strict JSON (no NaN/Inf) for anything stored as text."""
    try:
        return json.dumps(value, separators=(",", ":"), allow_nan=False)
    except ValueError:
        return json.dumps(wire._clean(value), separators=(",", ":"), allow_nan=False)


def json_bytes(value: Any) -> bytes:
    """Strict JSON as bytes, fast: orjson, or ``dumps`` where orjson refuses (an integer
    past 64 bits). For a validated frame (a 50-layer probe frame: ~0.06 ms)."""
    try:
        return orjson.dumps(value)
    except (TypeError, orjson.JSONEncodeError):
        return dumps(value).encode()


def json_value(text: bytes | str) -> Any:
    """The value of JSON this server stored or encoded: orjson, or json for what orjson
    refuses to read (an integer past 64 bits)."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


def finite(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise StoreError(f"{where} must be a number or null, got {type(value).__name__}")
    return float(value) if isfinite(value) else None


def step(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise StoreError(f"{where} must be an integer >= 0, got {value!r}")
    return value
