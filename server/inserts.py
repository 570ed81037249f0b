"""inserts — many rows per INSERT statement, the way the store writer writes every batch.

Owns: ``insert_many`` (a list of rows as a few multi-row statements, with an optional
``ON CONFLICT`` tail) and the statement sizes it uses.

Why many rows per statement: Python's sqlite3 releases the GIL around each step and
takes it back after. An ``executemany`` steps once per row, about 100 times per
50-layer probe frame, and while the event loop's thread decodes frames each retake
waits for it to yield (up to the switch interval, see serving.py): the writer fell
behind the socket. One statement of n rows is one step, in which SQLite does all n
inserts without the GIL, in parallel with the event loop. (Measured when the writer
was a thread of the server's process; in its own process one step per statement still
costs less Python per row.)

Never: commits (the writer process does), never builds SQL from values (only from the
caller's fixed statement text and row counts; values are bound parameters).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from functools import lru_cache
from itertools import chain
from typing import Any

# Rows per statement, largest first: n rows take at most a few statements of each size,
# so each table needs only these few compiled statements (sqlite3 caches them by text).
# 256 rows x 15 columns stays far below SQLite's 32,766 bound parameters.
INSERT_SIZES = (256, 64, 16, 4, 1)


@lru_cache(maxsize=64)
def _values_sql(head: str, width: int, rows: int, tail: str) -> str:
    row = "(" + ", ".join("?" * width) + ")"
    return f"{head} VALUES {', '.join([row] * rows)} {tail}"


def insert_many(
    conn: sqlite3.Connection,
    head: str,
    width: int,
    rows: Sequence[tuple[Any, ...]],
    tail: str = "",
) -> None:
    """``head`` (``INSERT ... INTO t (cols)``) for every row, in order, a few statements
    in all; ``tail`` follows the VALUES (an ``ON CONFLICT ... DO UPDATE`` clause, which
    SQLite applies row by row, so a later row sees an earlier one's effect). Rows later
    in the list win a conflict, as they would one row at a time."""
    at, total = 0, len(rows)
    for size in INSERT_SIZES:
        while total - at >= size:
            conn.execute(
                _values_sql(head, width, size, tail),
                list(chain.from_iterable(rows[at : at + size])),
            )
            at += size
