"""commands — the control relay: a viewer's or script's command to the run's trainer (DESIGN §4).

Owns: validating a command (its args at most MAX_ARGS_CHARS as JSON, so that its result
fits in one event), refusing it when it cannot take effect (unknown run, run ended, no
trainer connected, the run's connection is a spool's upload), storing it with its origin
(which gives it its
``cmd_seq`` and puts it in the run's event log) and relaying it to the trainer
socket; the viewer socket and ``POST /api/runs/{id}/commands`` share this path.

Never: relays a command it has not stored first (a trainer that reconnects gets
every stored command it has not applied, so storage is the source of truth),
assigns a second ``cmd_seq`` to a repeated id (a repeat is answered as a duplicate;
the id reused for another name or args is refused, 409), or reports a command as applied:
the trainer's ``command_result`` event does that.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Body, HTTPException, Request
from layerscope.server.hub import Hub, cut_message
from layerscope.trainer import wire
from starlette.requests import HTTPConnection

RUN_FINISHED = "run finished"
NO_TRAINER = "no trainer connected"
UPLOADING = "the run is being uploaded from its spool; nothing can apply commands"
MAX_ID_CHARS = 64  # wire.validate_command's limit on a command id
# A command's args, as JSON (measured as wire.validate_event measures an event's data). The
# trainer's command_result echoes them beside its control state and any error, in one event
# of at most wire.MAX_CONFIG_BYTES (64 KiB): a set_frozen naming 2,048 bogus layers of 256
# characters (530 KB, inside every other limit) was relayed, its result refused by this
# server, and the run's acks stopped there. A quarter of the event limit leaves room for the
# state and an error quoting the args (an older trainer quotes every unknown layer).
MAX_ARGS_CHARS = wire.MAX_CONFIG_BYTES // 4


class CommandRefused(Exception):
    """A command that cannot be relayed; ``status`` is the HTTP status the API answers.
    ``reason`` is cut (hub.cut_message): one quoting a huge field is not echoed whole."""

    def __init__(self, status: int, reason: str, cmd_id: str | None = None) -> None:
        reason = cut_message(reason)
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.cmd_id = cmd_id


def command_frame(row: dict[str, Any]) -> dict[str, Any]:
    """The server -> trainer ``command`` frame for a stored command row."""
    return {
        "type": "command",
        "id": row["id"],
        "cmd_seq": row["cmd_seq"],
        "name": row["name"],
        "args": row.get("args") or {},
        "source": row.get("source", "user"),
    }


def origin_of(conn: HTTPConnection, channel: str) -> str:
    """Who sent a command, as written to the event log: channel and client address."""
    client = conn.client
    where = f"{client.host}:{client.port}" if client else "unknown"
    return f"{channel} {where}"


def same_command(stored: dict[str, Any], cmd: dict[str, Any]) -> dict[str, Any]:
    """``stored`` if ``cmd`` repeats it (same name and args: a harmless resend); a reused
    id naming another command is refused, 409, not answered as a duplicate while the
    new command was silently dropped."""
    if stored["name"] != cmd["name"] or (stored.get("args") or {}) != cmd["args"]:
        raise CommandRefused(
            409,
            f"command id {cmd['id']!r} is already used by another command "
            f"({stored['name']} {json.dumps(stored.get('args') or {})}); "
            "send a new id for a new command",
            cmd["id"],
        )
    return stored


def args_too_big(cmd: dict[str, Any]) -> str | None:
    """Why a validated command's args are too big to relay (MAX_ARGS_CHARS), or None."""
    size = len(json.dumps(cmd["args"], default=str))
    if size <= MAX_ARGS_CHARS:
        return None
    names, hint = "", ""
    if cmd["name"] == "set_frozen":
        names = f" ({len(cmd['args']['layers']):,} layer names)"
        hint = ": name fewer layers (a parent module's name freezes every layer inside it)"
    return (
        f"{cmd['name']} args are {size:,} characters as JSON{names}; a command's args are at"
        f" most {MAX_ARGS_CHARS:,}, so that its trainer's result, which echoes them, fits in"
        f" one event of {wire.MAX_CONFIG_BYTES:,} bytes{hint}"
    )


async def relay_command(
    store: Any,
    hub: Hub,
    run_id: str,
    body: dict[str, Any],
    *,
    origin: str,
    while_away: bool = False,
) -> tuple[dict[str, Any], bool]:
    """Validate, store and relay one command; returns (stored row, was it a repeat).
    ``while_away``: store it even with no trainer connected (a launched run's trainer
    that has not connected yet gets it in its welcome)."""
    raw_id = body.get("id") if isinstance(body, dict) else None
    # Echoed in a refusal only if it can be a command's id (a megabyte one was echoed whole).
    cmd_id = raw_id if isinstance(raw_id, str) and len(raw_id) <= MAX_ID_CHARS else None
    run = store.run(run_id)
    if run is None:
        raise CommandRefused(404, f"run {run_id!r} not found", cmd_id)
    try:
        cmd = wire.validate_command(body, sources=wire.CLIENT_COMMAND_SOURCES)
    except wire.WireError as exc:
        raise CommandRefused(422, str(exc), cmd_id) from None
    too_big = args_too_big(cmd)
    if too_big is not None:
        raise CommandRefused(422, too_big, cmd_id)
    # A repeat of a stored command (a page resending after its socket dropped) is answered
    # as what it is, even while no trainer is connected: the first copy is delivered when
    # the trainer comes back, so refusing the repeat would tell the page a lie.
    known = store.command(run_id, cmd["id"])
    if known is not None:
        return same_command(known, cmd), True
    if run["status"] in wire.ENDED_STATUSES:
        raise CommandRefused(409, RUN_FINISHED, cmd["id"])
    if hub.is_uploading(run_id) and not while_away:
        # `layerscope sync` holds the run's connection: it would be stored and relayed,
        # then stay pending until the run ended, never applied.
        raise CommandRefused(409, UPLOADING, cmd["id"])
    if not hub.is_connected(run_id) and not while_away:
        raise CommandRefused(409, NO_TRAINER, cmd["id"])
    row, duplicate = await store.add_command(run_id, cmd, origin=origin)
    if duplicate:  # stored meanwhile by another request with the same id
        same_command(row, cmd)
    # A repeated id is only reported: the first copy was relayed, and a trainer that
    # reconnects before applying it gets it again in the welcome step. With no trainer
    # connected (while_away) the welcome delivers it; one that connected while the
    # command was being stored may get it twice and applies its cmd_seq once.
    if not duplicate and row.get("status") == "pending":  # not settled: the run ended meanwhile
        hub.send_to_trainer(run_id, command_frame(row))
    return row, duplicate


async def relay_viewer_message(
    ws: HTTPConnection, run_id: str, data: dict[str, Any]
) -> dict[str, Any]:
    """A viewer socket's message -> the reply for that viewer (never raises on bad input)."""
    if data.get("type") != "command":
        return {
            "type": "error",
            "message": cut_message(
                f"unknown message type {data.get('type')!r}; a viewer sends only 'command'"
            ),
        }
    state = ws.app.state
    try:
        row, duplicate = await relay_command(
            state.store, state.hub, run_id, data, origin=origin_of(ws, "viewer")
        )
    except CommandRefused as exc:
        return {"type": "command_result", "id": exc.cmd_id, "ok": False, "reason": exc.reason}
    return {
        "type": "command_result",
        "id": row["id"],
        "cmd_seq": row["cmd_seq"],
        "ok": True,
        "pending": row.get("status") == "pending",
        "duplicate": duplicate,
        "status": row.get("status"),
    }


router = APIRouter()


@router.post("/api/runs/{run_id}/commands", status_code=202)
async def post_command(
    request: Request, run_id: str, body: Annotated[Any, Body()]
) -> dict[str, Any]:
    """Same path as the viewer socket: 202 relayed, 409 cannot take effect, 422 bad command."""
    if not isinstance(body, dict):  # FastAPI's own 422 quoted the whole body back
        raise HTTPException(
            422, f"the body must be a JSON object (a command), got {type(body).__name__}"
        )
    state = request.app.state
    body = {**body, "source": body.get("source", "api")}
    try:
        row, duplicate = await relay_command(
            state.store, state.hub, run_id, body, origin=origin_of(request, "api")
        )
    except CommandRefused as exc:
        raise HTTPException(exc.status, exc.reason) from None
    return {"id": row["id"], "cmd_seq": row["cmd_seq"], "duplicate": duplicate}
