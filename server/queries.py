"""queries — the SQL of every read of layerscope.db, shaped as http_api.md's JSON bodies.

Owns: run list/detail rows and the run list's search (GET /api/runs?q=: words matched
in SQL against each run's id, name, status and stored config text), series (their
downsampling is scalars.py's), probe reads, heatmap matrices, histograms over time,
events, commands and stored frames.

Never: writes (read connections are query_only), never returns NaN/Inf (non-finite
values are stored as NULL and come back as None), never loads a whole long series
into Python when a chart asked for 1,500 points of it.
"""

from __future__ import annotations

import json
import sqlite3
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import orjson
from layerscope.server.checks import WIRE_BODY, RunNotFound, json_bytes, json_value
from layerscope.server.downsample import (
    minmax_rows,
    pick_even,
)
from layerscope.server.histograms import Hist, common_edges, resample, unpack_counts
from layerscope.server.scalars import LAST_KEYS, bounds, scalar_points, sparkline
from layerscope.server.schema import PROBE_COLUMNS
from layerscope.server.writes import command_row
from layerscope.trainer import wire

_STAT_SQL = ", ".join(f'"{s}"' for s in PROBE_COLUMNS)

_RUN_COLUMNS = (
    "rk, id, name, config, status, status_reason, launched, device, world_size, control,"
    " created_at, updated_at, first_step, last_step, acked_seq, max_seq, last_values"
)


def run_key(conn: sqlite3.Connection, run_id: str) -> int:
    row = conn.execute("SELECT rk FROM runs WHERE id = ?", (run_id,)).fetchone()
    if row is None:
        raise RunNotFound(run_id)
    return int(row[0])


# ---- runs ----


def _summary(
    row: tuple[Any, ...], sparkline: list[float | None], config: dict[str, Any] | None = None
) -> dict[str, Any]:
    (
        _rk,
        run_id,
        name,
        _config,
        status,
        reason,
        launched,
        device,
        world_size,
        _control,
        created_at,
        updated_at,
        first_step,
        last_step,
        acked,
        max_seq,
        last_values,
    ) = row
    last = json.loads(last_values)
    return {
        "id": run_id,
        "name": name,
        "status": status,
        "status_reason": reason,
        "config": json.loads(row[3]) if config is None else config,
        "launched": bool(launched),
        "created_at": created_at,
        "updated_at": updated_at,
        "first_step": first_step,
        "last_step": last_step,
        "last": {k: last[k][1] if k in last else None for k in LAST_KEYS},
        "sparkline": sparkline,
    }


def run_rows(
    conn: sqlite3.Connection,
    limit: int | None = None,
    offset: int = 0,
    words: Sequence[str] = (),
) -> list[tuple[Any, ...]]:
    """Runs, newest first: ``limit`` of them (all when None) after the first ``offset``;
    with ``words`` (search_words'), only the runs that match every one of them."""
    where, params = _search_sql(words)
    return conn.execute(
        f"SELECT {_RUN_COLUMNS} FROM runs {where}"
        " ORDER BY created_at DESC, rk DESC LIMIT ? OFFSET ?",
        (*params, -1 if limit is None else limit, offset),
    ).fetchall()


def run_count(conn: sqlite3.Connection, words: Sequence[str] = ()) -> int:
    """How many runs there are (with ``words``: how many match them)."""
    where, params = _search_sql(words)
    return int(conn.execute(f"SELECT COUNT(*) FROM runs {where}", params).fetchone()[0])


# ---- run search (GET /api/runs?q=) ----

MAX_SEARCH_LEN = 200  # characters of q
MAX_SEARCH_WORDS = 16


class SearchError(ValueError):
    """A search the run list cannot run (too many words); the message says why."""


def search_words(q: str | None) -> list[str]:
    """q's whitespace-separated words, lowercased; none for an empty or blank q."""
    words = (q or "").lower().split()
    if len(words) > MAX_SEARCH_WORDS:
        raise SearchError(f"at most {MAX_SEARCH_WORDS} words, got {len(words)}")
    return words


def _search_sql(words: Sequence[str]) -> tuple[str, list[str]]:
    """A WHERE clause keeping the runs that hold every word: each one a substring
    (ASCII letters matched case-insensitively) of the run's id, name or status, or of its
    whole stored config as JSON text (its keys and values; the runs page's search read
    the JSON of the trimmed config the list carries, found nothing trimmed from it). A
    word is looked for in the config also as JSON writes it inside a string (the stored
    text escapes quotes, backslashes and every non-ASCII character)."""
    clauses: list[str] = []
    params: list[str] = []
    for word in words:
        escaped = json.dumps(word)[1:-1]
        clauses.append(
            "(instr(lower(id), ?) OR instr(lower(name), ?) OR instr(lower(status), ?)"
            " OR instr(lower(config), ?) OR instr(lower(config), ?))"
        )
        params += [word, word, word, word, escaped]
    return ("WHERE " + " AND ".join(clauses) if clauses else ""), params


def run_summary(
    row: tuple[Any, ...], spark: list[float | None], config: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The run list's row; ``config`` in place of the stored one (list_config's part)."""
    return _summary(row, spark, config)


# What the runs page (web/static/js/runs.js) shows of a run's config: these dotted
# fields, or (a config with none of them: a watch() run's) its first few plain values,
# and whether it runs the overfit sanity check. The two lists go together.
LIST_CONFIG_KEYS = (
    "model.arch",
    "model.depth",
    "model.width",
    "model.activation",
    "model.init",
    "model.init_std",  # only beside init "normal" (list_config): the others ignore it
    "model.batch_norm",
    "data.dataset",
    "solver.optimizer",
    "solver.lr",
    "solver.batch_size",
)
LIST_CONFIG_FALLBACK = 6
LIST_CONFIG_ALSO = ("overfit",)


def _leaves(
    config: dict[str, Any], prefix: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], Any]]:
    """(path, value) of every leaf, in order; a list is a leaf, as runs.js's flatConfig has it."""
    for key, value in config.items():
        if isinstance(value, dict):
            yield from _leaves(value, (*prefix, key))
        else:
            yield (*prefix, key), value


def list_config(config: Any) -> dict[str, Any]:
    """The part of a run's config the runs page shows, nested as in the config."""
    if not isinstance(config, dict):
        return {}
    leaves = list(_leaves(config))
    wanted = {tuple(k.split(".")) for k in LIST_CONFIG_KEYS}
    kept = [(path, value) for path, value in leaves if path in wanted]
    model = config.get("model")
    if not isinstance(model, dict) or model.get("init") != "normal":
        # every built-in config holds init_std; only a normal init uses it
        kept = [(path, value) for path, value in kept if path != ("model", "init_std")]
    if not kept:
        plain = (str, int, float, bool)
        kept = [(p, v) for p, v in leaves if isinstance(v, plain)][:LIST_CONFIG_FALLBACK]
    out: dict[str, Any] = {}
    for path, value in kept:
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    for key in LIST_CONFIG_ALSO:
        if key in config:
            out[key] = config[key]
    return out


def run_detail(conn: sqlite3.Connection, run_id: str) -> dict[str, Any] | None:
    row = conn.execute(f"SELECT {_RUN_COLUMNS} FROM runs WHERE id = ?", (run_id,)).fetchone()
    if row is None:
        return None
    rk = row[0]
    out = _summary(row, sparkline(conn, rk))
    out["layers"] = [
        {"name": n, "kind": k, "units": u}
        for n, k, u in conn.execute(
            "SELECT name, kind, units FROM layers WHERE rk = ? ORDER BY ord, lid", (rk,)
        )
    ]
    out["control"] = None if row[9] is None else json.loads(row[9])
    out["series_names"] = [
        n for (n,) in conn.execute("SELECT name FROM series WHERE rk = ? ORDER BY sid", (rk,))
    ]
    out["device"] = row[7]
    out["world_size"] = row[8]
    out["acked_seq"] = row[14]
    out["last_seq"] = row[15]
    return out


def clock(conn: sqlite3.Connection, run_id: str) -> dict[str, Any] | None:
    """The trainer's own clock (its rows' time_s: seconds since its watch started) at the
    first and last stored step of the loss series (the run's first series if it has no
    loss), as ``{first_step, first_time_s, last_step, last_time_s}``; None for an unknown
    run, a run with no series, or one whose series' rows carry no time_s. Two walks of the
    scalars' (sid, step) key, each ending at its first row with a time_s."""
    found = conn.execute(
        "SELECT s.sid FROM series s JOIN runs r ON s.rk = r.rk WHERE r.id = ?"
        " ORDER BY s.name != 'loss', s.sid LIMIT 1",
        (run_id,),
    ).fetchone()
    if found is None:
        return None
    ends = [
        conn.execute(
            "SELECT step, time_s FROM scalars WHERE sid = ? AND time_s IS NOT NULL"
            f" ORDER BY step {order} LIMIT 1",
            found,
        ).fetchone()
        for order in ("ASC", "DESC")
    ]
    if ends[0] is None or ends[1] is None:
        return None
    (first_step, first_time), (last_step, last_time) = ends
    return {
        "first_step": first_step,
        "first_time_s": first_time,
        "last_step": last_step,
        "last_time_s": last_time,
    }


def runs_with_status(conn: sqlite3.Connection, statuses: set[str]) -> list[str]:
    if not statuses:
        return []
    marks = ", ".join("?" * len(statuses))
    return [
        r
        for (r,) in conn.execute(
            f"SELECT id FROM runs WHERE status IN ({marks}) ORDER BY rk", sorted(statuses)
        )
    ]


def names_starting(conn: sqlite3.Connection, prefix: str) -> list[str]:
    """The run names that start with ``prefix`` (launcher.distinct_name's candidates)."""
    return [
        name
        for (name,) in conn.execute(
            "SELECT name FROM runs WHERE substr(name, 1, ?) = ?", (len(prefix), prefix)
        )
    ]


def has_run(conn: sqlite3.Connection, run_id: str) -> bool:
    return conn.execute("SELECT 1 FROM runs WHERE id = ?", (run_id,)).fetchone() is not None


def acked_seq(conn: sqlite3.Connection, run_id: str) -> int:
    row = conn.execute("SELECT acked_seq FROM runs WHERE id = ?", (run_id,)).fetchone()
    return 0 if row is None else int(row[0])


# ---- commands, events, frames ----


def commands(conn: sqlite3.Connection, run_id: str, after_cmd_seq: int) -> list[dict[str, Any]]:
    rk = run_key(conn, run_id)
    return [
        command_row(r)
        for r in conn.execute(
            "SELECT * FROM commands WHERE rk = ? AND cmd_seq > ? ORDER BY cmd_seq",
            (rk, after_cmd_seq),
        )
    ]


def command(conn: sqlite3.Connection, run_id: str, cmd_id: str) -> dict[str, Any] | None:
    """The stored command with this id, or None."""
    row = conn.execute(
        "SELECT * FROM commands WHERE rk = ? AND id = ?", (run_key(conn, run_id), cmd_id)
    ).fetchone()
    return command_row(row) if row is not None else None


def events(
    conn: sqlite3.Connection, run_id: str, kind: str | None, limit: int | None
) -> list[dict[str, Any]]:
    """The run's events in the order they were stored; with limit, the newest `limit` of them."""
    rk = run_key(conn, run_id)
    where = "rk = ?"
    params: list[Any] = [rk]
    if kind is not None:
        where += " AND kind = ?"
        params.append(kind)
    rows = conn.execute(
        f"SELECT seq, step, kind, origin, data, created_at FROM events WHERE {where}"
        f" ORDER BY eid DESC LIMIT ?",
        (*params, -1 if limit is None else limit),
    ).fetchall()
    rows.reverse()
    return [
        {"seq": s, "step": st, "kind": k, "origin": o, "data": json.loads(d), "created_at": t}
        for s, st, k, o, d, t in rows
    ]


def decode_frame(body: bytes) -> dict[str, Any]:
    if body[:1] == WIRE_BODY:
        # Validating again is what turned the wire text into the stored frame (ints to
        # floats, inf to null, unknown keys dropped); it costs about a json.loads more.
        return wire.parse_trainer_frame(zlib.decompress(body[1:]).decode(), orjson.loads)
    frame: dict[str, Any] = json_value(zlib.decompress(body))
    return frame


def frame_json(body: bytes) -> bytes:
    """A stored frame as strict JSON text of one object, without decoding it where it was
    stored so (a body of wire text is validated again, as decode_frame does)."""
    if body[:1] == WIRE_BODY:
        return json_bytes(decode_frame(body))
    return zlib.decompress(body)


def catchup_text(
    conn: sqlite3.Connection, run_id: str, seq: int, max_frames: int, max_bytes: int
) -> tuple[str, list[int]] | None:
    """The viewer's catch-up message, ``{"v":1,"type":"catchup","run_id","frames":[...]}``
    with every stored frame after ``seq`` (each with the run's id, as live frames carry
    it), as JSON text built from the stored text (nothing decoded and encoded again), and
    the seqs it holds; None when more than ``max_frames`` frames or ``max_bytes`` bytes of
    them are stored: more than a catch-up should carry."""
    rk = run_key(conn, run_id)
    (count,) = conn.execute(
        "SELECT COUNT(*) FROM frames WHERE rk = ? AND seq > ?", (rk, seq)
    ).fetchone()
    if count > max_frames:
        return None
    tag = json_bytes({"run_id": run_id})[:-1] + b","  # '{"run_id":"...",'
    parts: list[bytes] = []
    seqs: list[int] = []
    size = 0
    for frame_seq, body in conn.execute(
        "SELECT seq, body FROM frames WHERE rk = ? AND seq > ? ORDER BY seq", (rk, seq)
    ):
        text = frame_json(body)
        size += len(text)
        if size > max_bytes:
            return None
        # A stored frame is an object with a type and a seq: '{' then its members.
        parts.append(tag + text[1:])
        seqs.append(frame_seq)
    head = json_bytes({"v": wire.VERSION, "type": "catchup", "run_id": run_id})[:-1]
    return (head + b',"frames":[' + b",".join(parts) + b"]}").decode(), seqs


def frames_after(
    conn: sqlite3.Connection, run_id: str, seq: int, limit: int | None
) -> list[dict[str, Any]]:
    rk = run_key(conn, run_id)
    return [
        decode_frame(b)
        for (b,) in conn.execute(
            "SELECT body FROM frames WHERE rk = ? AND seq > ? ORDER BY seq LIMIT ?",
            (rk, seq, -1 if limit is None else limit),
        )
    ]


def last_probe_frame(conn: sqlite3.Connection, rk: int) -> dict[str, Any] | None:
    row = conn.execute(
        "SELECT f.body FROM probe_steps p JOIN frames f ON f.rk = p.rk AND f.seq = p.seq"
        " WHERE p.rk = ? ORDER BY p.step DESC LIMIT 1",
        (rk,),
    ).fetchone()
    return None if row is None else decode_frame(row[0])


# ---- scalar series ----


def series(
    conn: sqlite3.Connection,
    run_id: str,
    names: list[str] | None,
    start: int | None,
    end: int | None,
    max_points: int,
) -> dict[str, dict[str, list[Any]]]:
    rk = run_key(conn, run_id)
    sids = dict(
        conn.execute("SELECT name, sid FROM series WHERE rk = ? ORDER BY sid", (rk,)).fetchall()
    )
    out: dict[str, dict[str, list[Any]]] = {}
    for name in sids if names is None else names:
        if name not in sids:
            out[name] = {"steps": [], "values": []}
            continue
        steps, values = scalar_points(conn, sids[name], start, end, max_points)
        out[name] = {"steps": steps, "values": values}
    return out


# ---- probes ----


def _layer_id(conn: sqlite3.Connection, rk: int, layer: str) -> int | None:
    row = conn.execute("SELECT lid FROM layers WHERE rk = ? AND name = ?", (rk, layer)).fetchone()
    return None if row is None else int(row[0])


def probe_steps(
    conn: sqlite3.Connection, run_id: str, start: int | None = None, end: int | None = None
) -> list[int]:
    rk = run_key(conn, run_id)
    lo, hi = bounds(start, end)
    return [
        s
        for (s,) in conn.execute(
            "SELECT step FROM probe_steps WHERE rk = ? AND step BETWEEN ? AND ? ORDER BY step",
            (rk, lo, hi),
        )
    ]


def probe_series(
    conn: sqlite3.Connection,
    run_id: str,
    layer: str,
    stats: list[str],
    start: int | None,
    end: int | None,
    max_points: int,
) -> dict[str, Any]:
    """Stats of one layer over steps; rows kept by the union of every stat's extremes.

    Rows are read into Python (a probe every 10 steps makes 10,000 of them for a
    100k-step run, a few milliseconds) so the extremes of all stats share one step axis.
    """
    rk = run_key(conn, run_id)
    for s in stats:
        if s not in PROBE_COLUMNS:
            raise ValueError(f"unknown probe stat {s!r}; expected one of {list(PROBE_COLUMNS)}")
    out: dict[str, Any] = {"layer": layer, "steps": []}
    for s in stats:
        out[s] = []
    lid = _layer_id(conn, rk, layer)
    if lid is None:
        return out
    lo, hi = bounds(start, end)
    cols = ", ".join(f'"{s}"' for s in stats)
    rows = conn.execute(
        f"SELECT step, {cols} FROM probes WHERE lid = ? AND step BETWEEN ? AND ? ORDER BY step",
        (lid, lo, hi),
    ).fetchall()
    steps = [r[0] for r in rows]
    columns = [[r[i + 1] for r in rows] for i in range(len(stats))]
    keep = minmax_rows(steps, columns, max_points)
    out["steps"] = [steps[i] for i in keep]
    for s, column in zip(stats, columns, strict=True):
        out[s] = [column[i] for i in keep]
    return out


def probe_matrix(
    conn: sqlite3.Connection,
    run_id: str,
    stat: str,
    start: int | None,
    end: int | None,
    max_steps: int,
) -> dict[str, Any]:
    """z[layer][step] of one stat over at most max_steps evenly chosen probe steps."""
    if stat not in PROBE_COLUMNS:
        raise ValueError(f"unknown probe stat {stat!r}; expected one of {list(PROBE_COLUMNS)}")
    rk = run_key(conn, run_id)
    steps = pick_even(probe_steps(conn, run_id, start, end), max_steps)
    layers = conn.execute(
        "SELECT lid, name FROM layers WHERE rk = ? ORDER BY ord, lid", (rk,)
    ).fetchall()
    column = {s: i for i, s in enumerate(steps)}
    row_of = {lid: i for i, (lid, _n) in enumerate(layers)}
    z: list[list[float | None]] = [[None] * len(steps) for _ in layers]
    if steps and layers:
        # lid IN x step IN: SQLite walks the primary key once per (layer, step) pair.
        lids = ", ".join("?" * len(layers))
        marks = ", ".join("?" * len(steps))
        for lid, step, value in conn.execute(
            f'SELECT lid, step, "{stat}" FROM probes WHERE lid IN ({lids}) AND step IN ({marks})',
            (*row_of, *steps),
        ):
            z[row_of[lid]][column[step]] = value
    return {"stat": stat, "layers": [n for _l, n in layers], "steps": steps, "z": z}


def histograms(
    conn: sqlite3.Connection,
    run_id: str,
    layer: str,
    start: int | None,
    end: int | None,
    max_steps: int,
    bins: int,
) -> dict[str, Any]:
    """One layer's histograms at <= max_steps probe steps, resampled onto shared edges."""
    rk = run_key(conn, run_id)
    lid = _layer_id(conn, rk, layer)
    lo, hi = bounds(start, end)
    rows: list[tuple[Any, ...]] = []
    if lid is not None:
        steps = pick_even(
            [
                st
                for (st,) in conn.execute(
                    "SELECT step FROM probe_hists WHERE lid = ? AND step BETWEEN ? AND ?"
                    " ORDER BY step",
                    (lid, lo, hi),
                )
            ],
            max_steps,
        )
        marks = ", ".join("?" * len(steps))
        rows = conn.execute(
            f"SELECT step, lo, hi, counts FROM probe_hists WHERE lid = ? AND step IN ({marks})"
            " ORDER BY step",
            (lid, *steps),
        ).fetchall()
    hists: list[Hist | None] = [
        None if blob is None or h_lo is None or h_hi is None else (h_lo, h_hi, unpack_counts(blob))
        for _s, h_lo, h_hi, blob in rows
    ]
    edges = common_edges(hists, bins)
    # 3 decimals: the split of a bin is display-grade, and full float reprs would
    # double the body of a 200 x 64 heatmap.
    z = [None if h is None else [round(v, 3) for v in resample(h, edges)] for h in hists]
    return {"layer": layer, "steps": [r[0] for r in rows], "edges": edges, "z": z}


def histogram_at(conn: sqlite3.Connection, run_id: str, step: int) -> dict[str, Any] | None:
    """Every layer at the nearest stored probe step <= step (else the first one);
    None when the run has no probe records."""
    rk = run_key(conn, run_id)
    row = conn.execute(
        "SELECT MAX(step) FROM probe_steps WHERE rk = ? AND step <= ?", (rk, step)
    ).fetchone()
    at = row[0]
    if at is None:
        at = conn.execute("SELECT MIN(step) FROM probe_steps WHERE rk = ?", (rk,)).fetchone()[0]
    if at is None:
        return None
    layers = []
    for name, h_lo, h_hi, blob, *stats in conn.execute(
        f"SELECT l.name, h.lo, h.hi, h.counts, {', '.join('p.' + c for c in _STAT_SQL.split(', '))}"
        " FROM layers l JOIN probes p ON p.lid = l.lid AND p.step = ?"
        " LEFT JOIN probe_hists h ON h.lid = l.lid AND h.step = ?"
        " WHERE l.rk = ? ORDER BY l.ord, l.lid",
        (at, at, rk),
    ):
        entry: dict[str, Any] = {
            "name": name,
            "lo": h_lo,
            "hi": h_hi,
            "counts": [] if blob is None else unpack_counts(blob),
        }
        entry.update(zip(PROBE_COLUMNS, stats, strict=True))
        layers.append(entry)
    return {"step": at, "layers": layers}
