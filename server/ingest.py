"""ingest — the trainer socket ``/ws/trainer`` and run liveness (DESIGN §5, http_api.md).

Owns: the hello/welcome handshake (with the resend of stored commands the
trainer has not seen; a hello from another trainer process under a stored run's id
is refused), validating every frame (a frame refused for what it holds is recorded in
its seq's place, so that acks go on past it: refusal_record), batching frames into the store
while the socket keeps being read, acking the highest contiguous committed seq
after each commit, handing new frames to the hub as they arrive, one trainer
connection per run (a newer one replaces the older), taking the status (running or
paused) a trainer's heartbeats report when it differs from the run's, and deciding
that a run whose trainer went silent is ``lost`` (or ``failed``, when its launched
process exited non-zero).

Never: acks a frame before the commit that holds it, awaits one commit per
frame, crashes on a bad frame (it answers an error or closes with the frame's
close code), or stores a heartbeat (only a change in the status it reports).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, MutableMapping
from typing import Any

import orjson
from fastapi import APIRouter, WebSocket
from layerscope.server.checks import RunIdTaken, StoreError
from layerscope.server.commands import command_frame
from layerscope.server.hub import Hub, close_reason, cut_message
from layerscope.server.settings import Settings
from layerscope.server.writes import NOT_APPLIED
from layerscope.trainer import wire

log = logging.getLogger("layerscope.ingest")

MAX_UNCOMMITTED = 4096  # frames read but not yet committed; past this the socket is not read
MAX_BATCH = 256  # frames per store.append: a backlog is committed (and acked) in steps
CLOSE_SERVER_ERROR = 1011
# Error frames queued for a trainer but not yet written: one that sends bad frames and
# reads none of the answers grew the server by 59 MB per 200k frames (until the ping
# timeout). Past either bound the connection is closed (1008); what it sent before is stored.
MAX_UNREAD_ERRORS = 1000
MAX_UNREAD_ERROR_CHARS = 1024 * 1024
UNREAD_ERRORS_REASON = "too many error frames unread; read the server's answers and reconnect"
LIVE_STATUSES = frozenset({"starting", "running", "paused"})
# What a heartbeat's status may change a run to (it says "starting" before the trainer's
# first status event; how a run ends is its status event's to say, in seq order).
HEARTBEAT_STATUSES = frozenset({"running", "paused"})
# A run with one of these is not changed by a heartbeat.
_FINAL_STATUSES = frozenset({"finished", "stopped", "failed"})


class TrainerLink:
    """One trainer connection: outbound messages go through a queue and one writer task."""

    def __init__(self, ws: WebSocket, run_id: str, client: str, upload: bool = False) -> None:
        self.ws = ws
        self.run_id = run_id
        self.client = client
        # `layerscope sync` uploading a spool (its hello says so): it applies no commands,
        # so none is relayed to it and the run is not shown as having a trainer.
        self.upload = upload
        self.last_seen = asyncio.get_running_loop().time()
        self.closed = False
        # The run's status as this connection last stored or read it (None: unknown, so
        # the next heartbeat's is stored): a heartbeat that says otherwise is stored.
        self.status: str | None = None
        # The names the run holds (stored, or admitted on this connection): a new one past
        # wire.MAX_SERIES / wire.MAX_LAYERS is dropped from its frame (limit_names).
        self.series: set[str] = set()
        self.layers: set[str] = set()
        # The trainer's step as its heartbeats and frames say (a refusal record's step when
        # the refused frame names none), and the seqs recorded as refused on this connection.
        self.step = 0
        self.refused: set[int] = set()
        self._out: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self.unsent_errors = 0  # error frames queued, not yet written to the socket
        self.unsent_error_chars = 0  # and their messages' length
        self._ack: dict[str, Any] | None = None  # an ack queued, not yet written

    def send(self, message: dict[str, Any]) -> None:
        if self.closed:
            return
        kind = message.get("type")
        if kind == "ack":
            # Acks say the highest contiguous committed seq: a newer one makes a queued
            # one moot, so a trainer that reads slowly has one ack waiting, not one a commit.
            if self._ack is not None:
                self._ack["seq"] = max(self._ack["seq"], message["seq"])
                return
            message = self._ack = dict(message)
        elif kind == "error":
            self.unsent_errors += 1
            self.unsent_error_chars += len(message["message"])
        self._out.put_nowait(message)

    def start(self) -> None:
        self._writer = asyncio.get_running_loop().create_task(self._write_loop())

    async def _write_loop(self) -> None:
        try:
            while True:
                message = await self._out.get()
                if message is self._ack:
                    self._ack = None
                await self.ws.send_text(wire.encode(message))
                if message.get("type") == "error":
                    self.unsent_errors -= 1
                    self.unsent_error_chars -= len(message["message"])
        except asyncio.CancelledError:
            raise
        except Exception:  # the socket is gone; the reader sees the disconnect
            self.closed = True

    async def close(self, code: int, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(Exception):  # already closing from the other side
            await self.ws.close(code, close_reason(reason))

    async def stop(self) -> None:
        self.closed = True
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer


class _Committer:
    """Frames read from one connection, committed in batches while reading goes on."""

    def __init__(self, store: Any, hub: Hub, run_id: str, link: TrainerLink) -> None:
        self.store = store
        self.hub = hub
        self.run_id = run_id
        self.link = link
        self.pending: list[dict[str, Any]] = []
        self.wake = asyncio.Event()
        self.room = asyncio.Event()
        self.room.set()
        self.finishing = False
        self.added = 0  # frames read so far
        self.committed = 0  # of those, committed
        self.acked = 0  # the last ack sent
        # A status a heartbeat reported, and how many frames were read before it: it is
        # stored once those are committed and before any read after it, so a status event
        # read later (newer) is stored later too.
        self.reported: tuple[str, int] | None = None
        self.task = asyncio.get_running_loop().create_task(self._loop())

    def add(self, frame: dict[str, Any]) -> None:
        self.pending.append(frame)
        self.added += 1
        if len(self.pending) >= MAX_UNCOMMITTED:
            self.room.clear()
        self.wake.set()

    def report_status(self, status: str) -> None:
        self.reported = (status, self.added)
        self.wake.set()

    async def _store_reported(self, status: str) -> None:
        self.reported = None
        try:
            await self.store.set_status(self.run_id, status)
        except Exception:
            log.exception("storing run %s's status %s failed", self.run_id, status)
            self.link.status = None  # the next heartbeat tries again

    async def _loop(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            if self.reported is not None and self.reported[1] <= self.committed:
                await self._store_reported(self.reported[0])
            if not self.pending:
                if self.finishing:
                    return
                continue
            size = MAX_BATCH
            if self.reported is not None:  # only frames read before it go ahead of it
                size = min(size, self.reported[1] - self.committed)
            # Taken from the front in place: slicing off the rest copied the whole backlog
            # (thousands of frames when behind) once per batch.
            batch = self.pending[:size]
            del self.pending[:size]
            if len(self.pending) < MAX_UNCOMMITTED:
                self.room.set()
            try:
                acked = await self.store.append(self.run_id, batch, validated=True)
            except Exception as exc:
                if isinstance(exc, StoreError):  # it says why; no traceback per batch
                    log.error("storing frames for run %s failed: %s", self.run_id, exc)
                else:
                    log.exception("storing frames for run %s failed", self.run_id)
                self.room.set()
                # Nothing in the batch was acked, so the trainer resends it after reconnecting.
                await self.link.close(
                    CLOSE_SERVER_ERROR,
                    _store_failed("server could not store frames", self.store.write_problem),
                )
                return
            self.committed += len(batch)
            self.acked = max(self.acked, acked)
            self.link.send({"type": "ack", "seq": acked})
            # A trainer waiting on our commit is not silent: its silence counts from the ack.
            self.link.last_seen = asyncio.get_running_loop().time()
            self.hub.mark_committed(self.run_id, acked)
            self.wake.set()

    async def finish(self) -> None:
        """Commit what was read (the trainer may be gone, but its frames are kept)."""
        self.finishing = True
        self.wake.set()
        await self.task


class Ingest:
    """The trainer side of the server; one per app, on ``app.state.ingest``."""

    def __init__(
        self,
        settings: Settings,
        store: Any,
        hub: Hub,
        exit_code: Callable[[str], int | None] = lambda run_id: None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.hub = hub
        self.exit_code = exit_code
        self.max_unread_errors = MAX_UNREAD_ERRORS
        # run -> (when it is lost without a trainer, the wait that deadline gave it)
        self._deadlines: dict[str, tuple[float, float]] = {}
        self._watch: asyncio.Task[None] | None = None

    # ---- lifecycle ----

    async def start(self) -> None:
        """Runs left live by a previous server get ``reconnect_grace_s`` to come back."""
        now = asyncio.get_running_loop().time()
        for run_id in self.store.runs_with_status(set(LIVE_STATUSES)):
            grace = self.settings.reconnect_grace_s
            self._deadlines[run_id] = (now + grace, grace)
        self._watch = asyncio.get_running_loop().create_task(self._watch_loop())

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch

    def expect_reconnect(self, run_id: str, within_s: float) -> None:
        self._deadlines[run_id] = (asyncio.get_running_loop().time() + within_s, within_s)

    # ---- liveness ----

    async def _watch_loop(self) -> None:
        timeout = self.settings.heartbeat_timeout_s
        period = min(0.5, timeout / 4)
        while True:
            await asyncio.sleep(period)
            try:
                await self._check_liveness(timeout)
            except StoreError as exc:  # the store refuses writes for now (it says why)
                log.error("liveness check failed: %s", exc)
            except Exception:  # a failed check must not end the watchdog
                log.exception("liveness check failed")

    async def _check_liveness(self, timeout: float) -> None:
        now = asyncio.get_running_loop().time()
        for run_id, peer in list(self.hub.trainers.items()):
            if isinstance(peer, TrainerLink) and now - peer.last_seen > timeout:
                await self.mark_gone(run_id, f"trainer silent for {timeout:g} s")
                await peer.close(CLOSE_SERVER_ERROR, "no heartbeat; reconnect")
        for run_id, (deadline, waited) in list(self._deadlines.items()):
            if now >= deadline:
                del self._deadlines[run_id]
                if not self.hub.is_attached(run_id):
                    # the wait it was given (a restarted server's grace is not the heartbeat's)
                    await self.mark_gone(run_id, f"no trainer connection for {waited:g} s")

    async def mark_gone(self, run_id: str, why: str) -> None:
        """lost, or failed when the launched trainer process exited non-zero."""
        run = self.store.run(run_id)
        if run is None or run["status"] in wire.ENDED_STATUSES:
            return
        code = self.exit_code(run_id)
        if code not in (None, 0):
            status, why = "failed", f"trainer process exited with code {code}"
        else:
            status = "lost"
        await self.store.set_status(run_id, status, reason=why)
        self.hub.publish_status(run_id, status, reason=why)

    # ---- the socket ----

    async def serve(self, ws: WebSocket) -> None:
        client = f"{ws.client.host}:{ws.client.port}" if ws.client else "unknown"
        await ws.accept()
        message = await ws.receive()
        if message["type"] == "websocket.disconnect":
            return
        try:
            hello = wire.parse_trainer_frame(_payload(message), orjson.loads)
        except wire.WireError as exc:
            await _refuse(ws, exc.close_code or wire.CLOSE_POLICY, f"bad hello: {exc}")
            return
        if hello["type"] != "hello":
            await _refuse(ws, wire.CLOSE_POLICY, f"send hello first; got {hello['type']!r}")
            return
        run_id = hello["run_id"]
        try:
            trimmed = self._limit_hello_layers(hello)
            acked = await self.store.hello(hello)
        except RunIdTaken as exc:
            # Another process under a stored run's id: its frames would be spliced into
            # that run (its seqs repeat the stored ones). Refused; nothing was stored.
            log.warning("refused a trainer (%s): %s", client, exc)
            with contextlib.suppress(Exception):
                await ws.send_text(wire.encode({"type": "error", "message": str(exc)}))
                await ws.close(wire.CLOSE_POLICY, close_reason(str(exc)))
            return
        except StoreError as exc:  # the store refuses writes for now: no traceback each time
            log.error("hello for run %s failed: %s", run_id, exc)
            await ws.close(
                CLOSE_SERVER_ERROR,
                _store_failed("server could not record hello", self.store.write_problem),
            )
            return
        except Exception:
            log.exception("hello for run %s failed", run_id)
            await ws.close(CLOSE_SERVER_ERROR, "server could not record hello; reconnect")
            return
        link = TrainerLink(ws, run_id, client, upload=bool(hello.get("upload")))
        # From here to start() nothing awaits: a command stored meanwhile is relayed to this
        # link after the resend below (possibly twice; the trainer applies a cmd_seq once).
        old = self.hub.attach_trainer(run_id, link)
        self._deadlines.pop(run_id, None)
        self.hub.mark_stored(run_id, acked)
        run = self.store.run(run_id) or {}
        status = str(run.get("status", "running"))
        link.status = status
        link.series = set(run.get("series_names") or ())
        link.layers = {str(layer["name"]) for layer in run.get("layers") or ()}
        link.send({"type": "welcome", "run_id": run_id, "acked_seq": acked, "status": status})
        if trimmed:
            link.send({"type": "error", "message": _over_limit("hello", None, "layers", trimmed)})
        # An upload applies nothing: stored commands are for the trainer when it is back.
        resend = (
            [] if link.upload else self.store.commands(run_id, after_cmd_seq=hello["last_cmd_seq"])
        )
        for row in resend:
            if not settled_unapplied(row):  # the page was told it never would be applied
                link.send(command_frame(row))
        link.start()
        if old is not None:
            self.hub.spawn(
                old.close(wire.CLOSE_POLICY, "replaced by a newer connection for this run")
            )
        self.hub.publish_status(run_id, status)
        committer = _Committer(self.store, self.hub, run_id, link)
        try:
            await self._read_frames(link, committer, acked)
        finally:
            await committer.finish()
            await link.stop()
            if self.hub.detach_trainer(run_id, link):
                self.hub.forget_recent(run_id)
                run = self.store.run(run_id) or {}
                status = str(run.get("status", "lost"))
                if status not in wire.ENDED_STATUSES:
                    self.expect_reconnect(run_id, self.settings.heartbeat_timeout_s)
                self.hub.publish_status(run_id, status)

    async def _read_frames(self, link: TrainerLink, committer: _Committer, acked: int) -> None:
        """``acked``: what the store held at the hello (a resent frame up to it is a no-op)."""
        ws, run_id = link.ws, link.run_id
        loop = asyncio.get_running_loop()
        while not link.closed:
            if not committer.room.is_set():
                await committer.room.wait()
                link.last_seen = loop.time()  # we were not reading; it was not silent
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            link.last_seen = loop.time()
            payload = _payload(message)
            try:
                frame = wire.parse_trainer_frame(payload, orjson.loads, run_id=run_id)
            except wire.WireError as exc:
                if exc.close_code is not None:
                    await link.close(exc.close_code, str(exc))
                    return
                if not await self._refuse_frame(link, committer, payload, exc, acked):
                    return
                continue
            kind = frame["type"]
            if kind == "heartbeat":
                link.step = frame["step"]
                self.hub.note_heartbeat(run_id, frame["step"])  # the training loop's progress
                # The trainer's own word on whether it runs: after a reconnect or a server
                # restart a paused run is paused, whatever the server last stored. Stored
                # (and shown) only when it differs, so a heartbeat costs nothing otherwise.
                status = frame["status"]
                if (
                    status in HEARTBEAT_STATUSES
                    and status != link.status
                    and link.status not in _FINAL_STATUSES
                ):
                    link.status = status
                    committer.report_status(status)
                    self.hub.publish_status(run_id, status)
                continue
            if kind == "hello":
                if not await self._answer(
                    link, "hello frame ignored: hello already received on this connection"
                ):
                    return
                continue
            if kind != "metrics":
                link.step = max(link.step, frame["step"])
            elif frame["rows"]:
                link.step = max(link.step, frame["rows"][-1]["step"])
            over = limit_names(link, frame)
            if over is not None and not await self._answer(link, over):
                return
            committer.add(frame)
            shown = self.hub.publish(run_id, frame)
            if kind == "event" and frame["kind"] == "status":
                status = frame["data"].get("status")
                if status in wire.RUN_STATUSES:
                    if frame["seq"] > acked:  # stored by this commit, not a resent no-op
                        link.status = status
                    if shown:
                        self.hub.publish_status(run_id, status)

    async def _refuse_frame(
        self,
        link: TrainerLink,
        committer: _Committer,
        payload: str | bytes,
        exc: wire.WireError,
        acked: int,
    ) -> bool:
        """Answer a frame refused for what it holds; False when the link was closed.

        The same frame is refused again on every resend, and acks are the highest
        contiguous seq: a refused seq stopped them for the rest of the run (the trainer's
        close waited, ``layerscope sync`` timed out, a command's result refused as too big
        left it "never applied"). So a refused frame with a seq of this run's is recorded
        in its place, a ``log`` event naming the frame and why (a ``command_result``'s as a
        command_result settling its command with the trainer's own word and error), and
        acked with the rest; the error frame says so and carries ``refused_seq``."""
        msg = _loads(payload)
        message = _refused(msg, exc)
        record = refusal_record(msg, message, link.run_id, link.step, len(payload))
        if (
            record is None
            or record["seq"] in link.refused
            or record["seq"] <= max(acked, committer.acked)
        ):
            return await self._answer(link, message)  # nothing to record: its seq is stored
        link.refused.add(record["seq"])
        committer.add(record)
        self.hub.publish(link.run_id, record)
        return await self._answer(link, message + REFUSAL_RECORDED, refused_seq=record["seq"])

    async def _answer(
        self, link: TrainerLink, message: str, refused_seq: int | None = None
    ) -> bool:
        """Queue an error frame for the trainer (its message cut: hub.cut_message); False
        (the link is closed, 1008) when ``max_unread_errors`` error frames, or
        MAX_UNREAD_ERROR_CHARS of them, are already queued unwritten: it reads none."""
        if (
            link.unsent_errors >= self.max_unread_errors
            or link.unsent_error_chars >= MAX_UNREAD_ERROR_CHARS
        ):
            log.warning(
                "closing trainer %s of run %s: %d error frames unread",
                link.client,
                ascii(link.run_id),
                link.unsent_errors,
            )
            await link.close(wire.CLOSE_POLICY, UNREAD_ERRORS_REASON)
            return False
        # One quoting a field (an unknown frame type or event kind of a megabyte) was as big
        # as the frame it refused: its head and tail, the field and the rule.
        error: dict[str, Any] = {"type": "error", "message": cut_message(message)}
        if refused_seq is not None:
            error["refused_seq"] = refused_seq
        link.send(error)
        return True

    def _limit_hello_layers(self, hello: dict[str, Any]) -> list[str]:
        """Drops from a hello the new layers that would take its run past wire.MAX_LAYERS
        (a hello may list that many, but each reconnect could list others); returns them."""
        layers = hello["layers"]
        if not layers:
            return []
        run = self.store.run(hello["run_id"]) or {}
        known = {str(layer["name"]) for layer in run.get("layers") or ()}
        keep, dropped = _within(known, layers, lambda layer: layer["name"], wire.MAX_LAYERS)
        hello["layers"] = keep
        return dropped


def _within(
    known: set[str], items: list[Any], name: Callable[[Any], str], limit: int
) -> tuple[list[Any], list[str]]:
    """``items`` split into those whose name is in ``known`` or fits under ``limit`` (added
    to ``known``) and the names of the rest."""
    keep: list[Any] = []
    dropped: list[str] = []
    for item in items:
        key = name(item)
        if key in known or len(known) < limit:
            known.add(key)
            keep.append(item)
        else:
            dropped.append(key)
    return keep, dropped


def limit_names(link: TrainerLink, frame: dict[str, Any]) -> str | None:
    """Drops from a metrics (probe) frame the series (layers) new to its run past
    wire.MAX_SERIES (wire.MAX_LAYERS): a trainer naming a new one every step made 100k
    series, which every snapshot read. The rest of the frame is stored. Returns the error
    frame's message naming what was dropped, or None when nothing was."""
    kind = frame["type"]
    if kind == "metrics":
        known = link.series
        dropped: list[str] = []
        for row in frame["rows"]:
            values = row["values"]
            if known.issuperset(values):  # the common case: one C-level walk
                continue
            keep, gone = _within(known, list(values), str, wire.MAX_SERIES)
            if gone:
                row["values"] = {key: values[key] for key in keep}
                dropped.extend(gone)
        return _over_limit(kind, frame["seq"], "series", dropped) if dropped else None
    if kind == "probe":
        layers = frame["layers"]
        if link.layers.issuperset(layer["name"] for layer in layers):
            return None
        keep, dropped = _within(link.layers, layers, lambda layer: layer["name"], wire.MAX_LAYERS)
        frame["layers"] = keep
        return _over_limit(kind, frame["seq"], "layers", dropped) if dropped else None
    return None


def _over_limit(kind: str, seq: int | None, what: str, names: list[str]) -> str:
    names = list(dict.fromkeys(names))  # a series dropped from many rows is named once
    limit = wire.MAX_SERIES if what == "series" else wire.MAX_LAYERS
    shown = ", ".join(f"{name!r:.60}" for name in names[:5])
    if len(names) > 5:
        shown += f" and {len(names) - 5} more"
    frame = f"{kind} frame" if seq is None else f"{kind} frame seq {seq}"
    return (
        f"{frame}: {what} {shown} not stored: a run holds at most {limit} {what}"
        f" (wire.MAX_{what.upper()}); the rest of the frame was stored"
    )


def _loads(payload: str | bytes) -> Any:
    """A refused frame's JSON (anything), or None when it is not JSON: what names the
    frame (its type and seq) and what its refusal record keeps of it (refusal_record).

    orjson refuses some JSON that wire.decode reads and then refuses without a close: a
    lone surrogate (``"\\udce9"``), an integer literal of more than 4300 digits. Those
    frames lost their seq (not recorded in its place, so acks stopped
    below it for the rest of the run, and the error named no frame): ``json`` reads them,
    such an integer as None and each lone surrogate escaped (wire.escape_surrogates: the
    record is stored text), what lies deeper than the record looks dropped."""
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError:
        pass
    try:
        msg = json.loads(payload, parse_int=_int_or_none, parse_constant=lambda _: None)
    except (ValueError, RecursionError):  # not JSON, or nested too deeply to read
        return None
    return wire.escape_surrogates(_shallow(msg, 3))


def _int_or_none(literal: str) -> int | None:
    """An integer literal, or None past what Python converts (4300 digits)."""
    try:
        return int(literal)
    except ValueError:
        return None


def _shallow(value: Any, depth: int) -> Any:
    """``value`` without the objects and lists nested in it more than ``depth`` deep
    (None in their place): a frame's type, seq, ``data`` fields and first row's step are
    all a refusal record keeps, and escape_surrogates recurses."""
    if isinstance(value, dict):
        return {k: _shallow(v, depth - 1) for k, v in value.items()} if depth > 0 else None
    if isinstance(value, list):
        return [_shallow(v, depth - 1) for v in value] if depth > 0 else None
    return value


def _kind_text(kind: str) -> str:
    """A frame type as an error names it: a type that is not plain text is shown escaped."""
    return kind[:40] if kind.isascii() and kind.isprintable() else f"{ascii(kind):.40}"


def _refused(msg: Any, exc: wire.WireError) -> str:
    """An error frame's message for a frame refused mid-stream (``msg``: its JSON, None
    when it has none): which frame (its type, and its seq when it has one, or a
    heartbeat's step: frames are sent without waiting, so the error alone named a field
    of some earlier frame), that it was not stored (a heartbeat: ignored), and why."""
    if not isinstance(msg, dict):
        return str(exc)
    kind, seq = msg.get("type"), msg.get("seq")
    if not isinstance(kind, str):
        return str(exc)
    kind = _kind_text(kind)
    if kind == "heartbeat":
        step = msg.get("step")
        at = f" at step {step}" if type(step) is int else ""
        return f"heartbeat frame{at} ignored: {exc}"
    if type(seq) is not int:
        return f"{kind} frame not stored: {exc}"
    return f"{kind} frame seq {seq} not stored: {exc}"


# Appended to a refused frame's error when its seq was recorded as refused (refusal_record).
REFUSAL_RECORDED = (
    "; recorded in its place as refused (in the run's event log) and acked, so the frames"
    " after it are stored"
)


def _counter(value: Any) -> int | None:
    return value if type(value) is int and 0 <= value <= wire.MAX_INT else None


def refusal_record(
    msg: Any, message: str, run_id: str, step: int, size: int
) -> dict[str, Any] | None:
    """The event stored in place of a frame refused for what it holds (see
    ``Ingest._refuse_frame``), or None when it has no seq of this run's to hold: no seq,
    a hello or heartbeat (no seq of their own), a frame naming another run, or another
    schema version. ``step``: the trainer's last known step, for a frame naming none.

    A ``log`` event, ``data: {message, refused: {type, seq, bytes}}``; for a refused
    ``command_result`` a ``command_result`` with the trainer's own fields that fit (id,
    cmd_seq, name, source, ok, applied_at_step, its error cut, then the refusal), no args
    and no state (the acknowledged state stays the last stored), so the command is listed
    as the trainer settled it, with its reason, not as "never applied" when its run ends."""
    if not isinstance(msg, dict) or msg.get("v", wire.VERSION) != wire.VERSION:
        return None
    kind, seq = msg.get("type"), msg.get("seq")
    if not isinstance(kind, str) or kind in ("hello", "heartbeat"):
        return None
    if type(seq) is not int or not 1 <= seq <= wire.MAX_INT:
        return None
    if msg.get("run_id", run_id) != run_id:
        return None  # another run's frame: its seq is not this run's
    rows = msg.get("rows")
    if _counter(msg.get("step")) is not None:
        step = msg["step"]
    elif isinstance(rows, list) and rows and isinstance(rows[0], dict):
        step = _counter(rows[0].get("step")) or step
    said = cut_message(f"server: {message}")
    data: dict[str, Any] = {
        "message": said,
        "refused": {"type": _kind_text(kind), "seq": seq, "bytes": size},
    }
    event_kind = "log"
    result = msg.get("data")
    if kind == "event" and msg.get("kind") == "command_result" and isinstance(result, dict):
        cmd_id, cmd_seq = result.get("id"), _counter(result.get("cmd_seq"))
        if (isinstance(cmd_id, str) and 0 < len(cmd_id) <= 64) or cmd_seq is not None:
            event_kind = "command_result"
            error = result.get("error")
            data.update(
                {
                    "id": cmd_id if isinstance(cmd_id, str) and len(cmd_id) <= 64 else None,
                    "cmd_seq": cmd_seq,
                    "name": result.get("name") if result.get("name") in wire.COMMANDS else None,
                    "source": result.get("source")
                    if result.get("source") in wire.COMMAND_SOURCES
                    else None,
                    # as the trainer said: a command applied is not reported as failed
                    "ok": result.get("ok") is True,
                    "applied_at_step": _counter(result.get("applied_at_step")),
                    "error": (cut_message(error) + "; " if isinstance(error, str) else "")
                    + f"its result was not stored whole ({said})",
                }
            )
    frame = {"type": "event", "seq": seq, "step": step, "kind": event_kind, "data": data}
    return wire.validate_event(frame)


async def _refuse(ws: WebSocket, code: int, message: str) -> None:
    """Refuse a connection before its welcome: an error frame with the whole message (a
    close reason holds 123 bytes, which cut off what a long field value left after it),
    then the close."""
    with contextlib.suppress(Exception):  # already closing from the other side
        await ws.send_text(wire.encode({"type": "error", "message": message}))
        await ws.close(code, close_reason(message))


def settled_unapplied(row: dict[str, Any]) -> bool:
    """A command the server settled as never applied when its run ended (a lost run's
    trainer that reconnects is not sent it: it would apply a pause the user was told failed)."""
    return row.get("status") == "failed" and row.get("error") == NOT_APPLIED


def _payload(message: MutableMapping[str, Any]) -> str | bytes:
    text = message.get("text")
    if text is not None:
        return str(text)
    return bytes(message.get("bytes") or b"")


router = APIRouter()


@router.websocket("/ws/trainer")
async def trainer_socket(websocket: WebSocket) -> None:
    await websocket.app.state.ingest.serve(websocket)


def _store_failed(what: str, problem: str | None) -> str:
    """The close reason for a trainer whose frames the store could not take: with the
    store's own reason when it knows one (a full disk, a damaged database), so the trainer
    says why, not only that it will reconnect; cut to a close reason's 120 bytes."""
    return close_reason(f"{what} ({problem}); reconnect" if problem else f"{what}; reconnect")
