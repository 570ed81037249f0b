"""hub — who is connected, and the fan-out of live frames to viewers (DESIGN §1, STYLE item 6).

Owns: the registry of trainer connections (one per run; ``is_attached``: any, a
``layerscope sync`` upload included; ``is_connected``: a trainer that applies commands,
not an upload), the
per-run record of which seqs were already broadcast (a frame resent after a
reconnect is not shown twice), the per-run window of frames received but not yet
committed (a joining viewer reads everything older from the store), showing the
server's own events (a command someone sent, a status the server set) to the run's
viewers as the store commits them, and one
queue, bounded in frames and in bytes, plus one sender task per viewer,
including the ``/ws/runs/{run_id}`` socket; one timer that sends a quiet viewer a
``tick`` every ``TICK_S`` (a page that hears nothing for longer knows the server
stalled), closing a deleted run's viewers (1008 "run deleted"), and each run's pace
(``pace``: how long it has been running with its trainer connected and its training
loop's step unchanged, the trainer's latest raw step times and its longest healthy gap
between steps; a joining viewer's snapshot or catch-up carries them as
``step_quiet_s``, ``step_times_s``, ``step_gap_max_s``, so the run page can warn of a
stuck training loop at once, not only after watching it for a while).

Never: awaits a viewer while broadcasting (``publish`` only appends), lets one
slow viewer delay the trainer or another viewer, or silently drops a metrics or
event frame: probe frames coalesce (newest wins) for a viewer that is behind; a
viewer whose queue still overflows is closed with 1013 and reconnects with
``?after_seq=N`` to get every stored frame it missed (or, past the catch-up's limits,
a fresh snapshot); never reads, builds or encodes a snapshot or catch-up on the event
loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections import deque
from functools import partial
from typing import Any, Protocol

from fastapi import APIRouter, WebSocket
from layerscope.server.checks import StoreError
from layerscope.trainer import wire
from starlette.concurrency import run_in_threadpool

log = logging.getLogger("layerscope.hub")

COALESCE_AFTER = 16  # a viewer this many frames behind keeps only the newest probe frame
RECENT_FRAMES = 512  # per run, at most: frames received but not yet committed (one commit's worth)
# Per viewer; a tab this far behind reloads faster than it reads.
VIEWER_QUEUE_BYTES = 8 * 1024 * 1024
# A catch-up (?after_seq=N) carries at most this much; a viewer further behind gets a
# fresh snapshot instead (a tab back after hours, or after_seq=0 on a long run: 110k
# frames, 130 MB read and encoded at once took the server from 53 MB to 1.15 GB).
CATCHUP_MAX_FRAMES = 5000
CATCHUP_MAX_BYTES = VIEWER_QUEUE_BYTES
CLOSE_SERVER_ERROR = 1011  # RFC 6455: the server failed on the frame, not the viewer
CLOSE_TIMEOUT_S = 10.0  # a viewer that reads nothing cannot receive its close frame either
# A viewer sent nothing for half of this gets a `tick` every TICK_S: a page hears from a
# live server at least every ~3 s, so one that hears nothing for longer (socket.js: 7 s) knows
# the server stalled (stopped, a laptop asleep, a dead link), which the browser's own
# pings never tell a page's script: a quiet or paused run looked live while commands queued.
TICK_S = 2.0
DELETED_REASON = "run deleted"
SLOW_VIEWER_REASON = "viewer too slow; reconnect with after_seq"
# An error's message is cut to this: one quoting a field (an unknown message type or
# command name of a megabyte) was as big as the message it refused.
MAX_ERROR_CHARS = 2000


def close_reason(text: str) -> str:
    """A websocket close reason is at most 123 bytes of UTF-8."""
    return text.encode()[:120].decode(errors="ignore")


def cut_message(message: str, limit: int = MAX_ERROR_CHARS) -> str:
    """An error message of at most about ``limit`` characters: past it, its head and tail
    (the field it quotes, and the rule), with how much was cut between them."""
    if len(message) <= limit:
        return message
    half = limit // 2
    cut = len(message) - 2 * half
    return f"{message[:half]} ... ({cut} characters cut) ... {message[-half:]}"


class TrainerPeer(Protocol):
    """What the hub needs of a trainer connection (ingest.TrainerLink implements it)."""

    def send(self, message: dict[str, Any]) -> None: ...

    # (optional) upload: True for a `layerscope sync` connection; read with getattr

    async def close(self, code: int, reason: str) -> None: ...


class _Item:
    """One outbound frame, encoded at most once however many viewers get it (and only if
    some viewer does); once encoded, only the text is kept."""

    __slots__ = ("seq", "kind", "key", "_message", "_text")

    def __init__(
        self,
        seq: int | None,
        kind: str,
        message: dict[str, Any] | str,
        key: tuple[Any, ...] | None = None,
    ) -> None:
        """``message``: a dict, encoded when first sent, or its JSON text already. ``key``:
        a server event's ``event_key`` (a viewer whose snapshot holds it skips it)."""
        self.seq = seq
        self.kind = kind
        self.key = key
        self._message: dict[str, Any] | None = None if isinstance(message, str) else message
        self._text: str | None = message if isinstance(message, str) else None

    @property
    def text(self) -> str:
        if self._text is None:
            self._text = wire.encode(self._message or {})
            self._message = None
        return self._text


# A run's recent step times kept for the run page's stuck-loop threshold (its median):
# the trainer's own, as they came (the snapshot's chart series is min/max per bucket,
# whose median leaned slow: 40 s for a run stepping every second).
PACE_SAMPLES = 64
# Statuses after which a run's pace is forgotten (a "lost" run's trainer may come back:
# whether its loop moved meanwhile is told by its step, so that is kept).
_PACE_ENDS = wire.ENDED_STATUSES - {"lost"}


class _Pace:
    """One run's pace, for the run page's stuck-loop warning (Hub.pace). Times are
    time.monotonic(). A stuck training loop (a hung data loader, a deadlock, a blocked
    collective) is invisible otherwise: the trainer's link thread keeps heartbeating, and
    each heartbeat says the training thread's step, which then stays the same."""

    __slots__ = (
        "status",
        "running_since",
        "moved",
        "beat_step",
        "frame_step",
        "times",
        "gap_max",
        "skip_next",
        "last_row",
    )

    def __init__(self) -> None:
        self.status: str | None = None  # as last published
        # Since when it has been running: set by a start or a resume (a status other than
        # running or lost before it, or the trainer's own status event "running", sent by
        # each watch() and each resume); kept while its trainer comes and goes, so a link
        # that reconnects more often than the threshold does not hide a stuck loop.
        # After a server restart the server cannot know how long the loop was stuck
        # before: it counts from the first status it publishes (the trainer's connection),
        # and the first heartbeats tell whether the loop moves.
        self.running_since: float | None = None
        self.moved: float | None = None  # when the step last changed
        self.beat_step: int | None = None  # the step the latest heartbeat said
        self.frame_step: int | None = None  # the highest step a frame brought
        self.times: deque[float] = deque(maxlen=PACE_SAMPLES)
        self.gap_max = 0.0  # the longest healthy step time seen (a validation, a checkpoint)
        # The next row's time spans something other than a step: the trainer's start (a
        # new process's first step counts from watch(): data loading, compiling) or a
        # pause (a step after a resume, or a step_once, counts the paused time).
        self.skip_next = True
        # the last row's (step, time_s), for rows without step_time_s
        self.last_row: tuple[int, float] | None = None

    def note_rows(self, rows: Any) -> None:
        for row in rows or ():
            step = row.get("step")
            if not isinstance(step, int):
                continue
            time_s = row.get("time_s")
            seconds = (row.get("values") or {}).get("step_time_s")
            sample: float | None = None
            if isinstance(seconds, (int, float)) and math.isfinite(seconds) and seconds >= 0:
                sample = float(seconds)
            elif (
                self.last_row is not None
                and step > self.last_row[0]
                and isinstance(time_s, (int, float))
                and time_s > self.last_row[1]
            ):
                sample = (time_s - self.last_row[1]) / (step - self.last_row[0])
            if isinstance(time_s, (int, float)) and (
                self.last_row is None or step > self.last_row[0]
            ):
                self.last_row = (step, float(time_s))
            if sample is None:
                continue
            if self.status == "paused":
                self.skip_next = True  # a step_once: this and the one after the resume
            elif self.skip_next:
                self.skip_next = False
            elif step > 1:  # step 1 counts from watch()
                self.times.append(sample)
                self.gap_max = max(self.gap_max, sample)

    def note_step(self, step: int, now: float, *, beat: bool) -> None:
        if beat:
            if self.beat_step is not None and step != self.beat_step:
                self.moved = now
            self.beat_step = step
        elif self.frame_step is None or step > self.frame_step:
            self.frame_step = step
            self.moved = now


def _frame_step(frame: dict[str, Any]) -> int | None:
    """The newest step a trainer frame reports (validated by wire: ints): a metrics frame's
    highest row step, a probe's step; None for others (an event says nothing of the loop)."""
    kind = frame.get("type")
    if kind == "probe":
        step = frame.get("step")
        return step if isinstance(step, int) else None
    if kind == "metrics":
        steps = [row["step"] for row in frame.get("rows") or () if isinstance(row.get("step"), int)]
        return max(steps) if steps else None
    return None


def event_key(event: dict[str, Any]) -> tuple[Any, ...]:
    """What tells one server event (no seq) from another, as the store hands it on and
    as a snapshot lists it: several settled in one write share kind, step and time."""
    return (
        event.get("kind"),
        event.get("step"),
        event.get("created_at"),
        json.dumps(event.get("data"), sort_keys=True),
    )


class _SeqSet:
    """Seqs seen for one run: a contiguous floor plus the few above it."""

    __slots__ = ("floor", "above")

    def __init__(self) -> None:
        self.floor = 0
        self.above: set[int] = set()

    def add(self, seq: int) -> bool:
        if seq <= self.floor or seq in self.above:
            return False
        self.above.add(seq)
        while self.floor + 1 in self.above:
            self.floor += 1
            self.above.discard(self.floor)
        return True

    def raise_floor(self, seq: int) -> None:
        if seq > self.floor:
            self.floor = seq
            self.above = {s for s in self.above if s > seq}
            while self.floor + 1 in self.above:
                self.floor += 1
                self.above.discard(self.floor)


class Viewer:
    """One browser socket: a bounded queue drained by its own sender task."""

    def __init__(
        self,
        hub: Hub,
        ws: WebSocket,
        run_id: str,
        bound: int,
        bound_bytes: int = VIEWER_QUEUE_BYTES,
    ) -> None:
        self.hub = hub
        self.ws = ws
        self.run_id = run_id
        self.bound = max(bound, COALESCE_AFTER + 1)
        self.bound_bytes = bound_bytes
        self.queue: deque[_Item] = deque()
        self.queued_bytes = 0  # of the live frames in the queue (not the snapshot ahead of them)
        self.wake = asyncio.Event()
        self.done = asyncio.Event()
        self.pending_probe: _Item | None = None
        self.closing = False
        self.floor = 0
        self.skip: frozenset[int] = frozenset()
        self.shown_events: frozenset[tuple[Any, ...]] = frozenset()
        self.backlog: list[_Item] = []
        self.sender: asyncio.Task[None] | None = None
        self.last_sent = 0.0  # loop time of the last message handed to the socket

    def offer(self, item: _Item) -> None:
        """Never blocks. Coalesces probes when behind; overflows -> close 1013."""
        if self.closing:
            return
        size = len(item.text)
        if (
            item.kind == "probe"
            and self.pending_probe is not None
            and len(self.queue) >= COALESCE_AFTER
        ):
            with contextlib.suppress(ValueError):  # O(queue), and the queue is bounded
                self.queue.remove(self.pending_probe)
                self.queued_bytes -= len(self.pending_probe.text)
            self.pending_probe = None
        if len(self.queue) >= self.bound or self.queued_bytes + size > self.bound_bytes:
            self.drop(wire.CLOSE_TRY_AGAIN, SLOW_VIEWER_REASON)
            return
        self.queue.append(item)
        self.queued_bytes += size
        if item.kind == "probe":
            self.pending_probe = item
        self.wake.set()

    def send_direct(self, message: dict[str, Any]) -> None:
        """A reply to this viewer alone (command_result, error), in order with the live frames."""
        self.offer(_Item(None, "direct", message))

    def start(
        self,
        first: dict[str, Any] | str,
        *,
        floor: int,
        skip: frozenset[int],
        shown_events: frozenset[tuple[Any, ...]] = frozenset(),
    ) -> None:
        """Send ``first`` (snapshot or catchup, as a dict or its JSON text), then the frames
        it does not already hold. ``shown_events``: the ``event_key`` of each server event
        ``first`` holds; one published while it was read (the viewer was registered
        before) is not sent again."""
        self.floor = floor
        self.skip = skip
        self.shown_events = shown_events
        self.queue.appendleft(_Item(None, "head", first))
        for item in reversed(self.backlog):
            if not self._covered(item):
                self.queue.insert(1, item)
                self.queued_bytes += len(item.text)
        self.backlog = []
        self.wake.set()
        loop = asyncio.get_running_loop()
        self.last_sent = loop.time()
        self.sender = loop.create_task(self._send_loop())

    def _covered(self, item: _Item) -> bool:
        if item.seq is None:
            return item.key is not None and item.key in self.shown_events
        return item.seq <= self.floor or item.seq in self.skip

    async def _send_loop(self) -> None:
        try:
            while True:
                if not self.queue:
                    self.wake.clear()
                    await self.wake.wait()
                    continue
                item = self.queue.popleft()
                if item.kind != "head":
                    self.queued_bytes -= len(item.text)
                if item is self.pending_probe:
                    self.pending_probe = None
                if self._covered(item):
                    continue
                await self.ws.send_text(item.text)
                self.last_sent = asyncio.get_running_loop().time()
        except asyncio.CancelledError:
            raise
        except Exception:  # the socket went away under us: the handler sees the disconnect
            self.closing = True
            self.done.set()

    def drop(self, code: int, reason: str) -> None:
        """Stop sending and close; safe to call from a broadcast (schedules, never awaits)."""
        if self.closing:
            return
        self.closing = True
        self.queue.clear()
        self.queued_bytes = 0
        self.pending_probe = None
        self.hub.remove_viewer(self)
        self.hub.spawn(self._close(code, reason))

    async def _close(self, code: int, reason: str) -> None:
        if self.sender is not None:
            self.sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.sender
        # Already closed, or the peer reads nothing: the handler returns either way.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(code, close_reason(reason)), CLOSE_TIMEOUT_S)
        self.done.set()

    async def stop(self) -> None:
        if self.sender is not None:
            self.sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.sender


class Hub:
    def __init__(self, *, queue_frames: int = 512) -> None:
        self.queue_frames = queue_frames
        self.catchup_max_frames = CATCHUP_MAX_FRAMES
        self.catchup_max_bytes = CATCHUP_MAX_BYTES
        self.trainers: dict[str, TrainerPeer] = {}
        self._viewers: dict[str, set[Viewer]] = {}
        self._seen: dict[str, _SeqSet] = {}
        self._recent: dict[str, deque[_Item]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.tick_s = TICK_S
        self._ticker: asyncio.Task[None] | None = None
        # Each run's pace (_Pace): a few attribute writes a frame or heartbeat, nothing a
        # viewer; read only when a viewer joins (pace).
        self._paces: dict[str, _Pace] = {}

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        """A background task the hub keeps a reference to (asyncio holds only weak ones)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ---- trainers ----

    def is_attached(self, run_id: str) -> bool:
        """A connection sends the run's frames: its trainer, or a spool's upload."""
        return run_id in self.trainers

    def is_uploading(self, run_id: str) -> bool:
        """The run's connection is ``layerscope sync`` uploading its spool: nothing on it
        applies commands."""
        peer = self.trainers.get(run_id)
        return peer is not None and bool(getattr(peer, "upload", False))

    def is_connected(self, run_id: str) -> bool:
        """The run's trainer is connected: something that applies commands (an upload is not)."""
        return run_id in self.trainers and not self.is_uploading(run_id)

    def attach_trainer(self, run_id: str, peer: TrainerPeer) -> TrainerPeer | None:
        """Register ``peer`` as the run's trainer; returns the one it replaces."""
        old = self.trainers.get(run_id)
        self.trainers[run_id] = peer
        return old

    def detach_trainer(self, run_id: str, peer: TrainerPeer) -> bool:
        if self.trainers.get(run_id) is peer:
            del self.trainers[run_id]
            return True
        return False

    def send_to_trainer(self, run_id: str, message: dict[str, Any]) -> bool:
        peer = self.trainers.get(run_id)
        if peer is None:
            return False
        peer.send(message)
        return True

    # ---- frames ----

    def mark_stored(self, run_id: str, seq: int) -> None:
        """Seqs up to ``seq`` are stored (and were shown when they arrived): never rebroadcast."""
        self._seen.setdefault(run_id, _SeqSet()).raise_floor(seq)

    def publish(self, run_id: str, frame: dict[str, Any]) -> bool:
        """Fan a trainer frame (with seq) out to the run's viewers; False if already shown."""
        seq = int(frame["seq"])
        if not self._seen.setdefault(run_id, _SeqSet()).add(seq):
            return False
        self._note_frame(run_id, frame)
        item = _Item(seq, str(frame["type"]), {**frame, "run_id": run_id})
        recent = self._recent.get(run_id)
        if recent is None:
            recent = self._recent[run_id] = deque(maxlen=RECENT_FRAMES)
        recent.append(item)
        for viewer in list(self._viewers.get(run_id, ())):
            viewer.offer(item)
        return True

    def _note_frame(self, run_id: str, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind not in ("metrics", "probe", "event") or self.is_uploading(run_id):
            return  # (an upload has no loop to time, and sends rows by the thousand)
        pace = self._pace(run_id)
        now = time.monotonic()
        if kind == "event":
            # the trainer's own word that it (re)starts: a watch() or a resume
            if (
                frame.get("kind") == "status"
                and (frame.get("data") or {}).get("status") == "running"
            ):
                pace.running_since = now
                pace.skip_next = True
            return
        if kind == "metrics":
            pace.note_rows(frame.get("rows"))
        step = _frame_step(frame)
        if step is not None:
            pace.note_step(step, now, beat=False)

    def note_heartbeat(self, run_id: str, step: int) -> None:
        """A trainer's heartbeat (about every second, from its link thread): the training
        thread's step, which a stuck loop leaves unchanged."""
        self._pace(run_id).note_step(step, time.monotonic(), beat=True)

    def _pace(self, run_id: str) -> _Pace:
        # get first: setdefault built (and threw away) a _Pace and its deque on every frame
        # and heartbeat
        pace = self._paces.get(run_id)
        if pace is None:
            pace = self._paces[run_id] = _Pace()
        return pace

    def publish_status(self, run_id: str, status: str, **extra: Any) -> None:
        # Every status change, a trainer's coming and going included, passes here.
        if status in _PACE_ENDS:
            self._paces.pop(run_id, None)
        else:
            pace = self._pace(run_id)
            if status == "running":
                if pace.running_since is None:  # a start, a resume (or this server's start)
                    pace.running_since = time.monotonic()
            elif status != "lost":  # paused, starting: a resume starts the count again
                pace.running_since = None
            pace.status = status
            pace.skip_next = True
        message = {
            "type": "status",
            "run_id": run_id,
            "status": status,
            "trainer_connected": self.is_connected(run_id),
            "uploading": self.is_uploading(run_id),
            **extra,
        }
        item = _Item(None, "status", message)
        for viewer in list(self._viewers.get(run_id, ())):
            viewer.offer(item)

    def publish_event(self, run_id: str, event: dict[str, Any]) -> None:
        """A server event (no seq: a command stored, a status the server set), as the store
        recorded it, to the run's viewers; the same step, data and created_at as GET
        /events gives, so a page that also reads it there shows it once. Not kept for a
        joining viewer: the store has it already (its snapshot holds it), and one published
        while a joining viewer's snapshot was read is sent only if the snapshot lacks it."""
        item = _Item(
            None, "event", {"type": "event", "run_id": run_id, **event}, key=event_key(event)
        )
        for viewer in list(self._viewers.get(run_id, ())):
            viewer.offer(item)

    def mark_committed(self, run_id: str, acked_seq: int) -> None:
        """Frames up to ``acked_seq`` are in the store, so a joining viewer reads them there;
        the recent window keeps only what is not (it holds big frames: keep it short)."""
        recent = self._recent.get(run_id)
        while recent and recent[0].seq is not None and recent[0].seq <= acked_seq:
            recent.popleft()

    def forget_recent(self, run_id: str) -> None:
        """Called once a run's trainer is gone and its frames are committed."""
        self._recent.pop(run_id, None)

    def forget_run(self, run_id: str) -> None:
        """The run was deleted: a new run under its id starts from seq 1 again, and its
        frames must reach viewers (the old run's shown seqs would hide them all). Its
        viewers are closed with 1008 "run deleted" (a page open on it kept showing it as
        if it existed, and after a restart retried its refused socket forever)."""
        self._seen.pop(run_id, None)
        self._recent.pop(run_id, None)
        self._paces.pop(run_id, None)
        for viewer in list(self._viewers.get(run_id, ())):
            viewer.drop(wire.CLOSE_POLICY, DELETED_REASON)

    def quiet_s(self, run_id: str) -> float | None:
        """Seconds the run has been running with its trainer connected and its step
        unchanged (the step its trainer's heartbeats say, or a frame's new step): since
        the later of its last change and the run's last start or resume; kept while its
        trainer comes and goes. None while it is not running with its trainer connected
        (paused, ended, starting, no trainer, an upload)."""
        pace = self._paces.get(run_id)
        if pace is None or pace.status != "running" or pace.running_since is None:
            return None
        if not self.is_connected(run_id):
            return None
        since = pace.running_since if pace.moved is None else max(pace.running_since, pace.moved)
        return round(time.monotonic() - since, 3)

    def pace(self, run_id: str) -> dict[str, Any]:
        """What a joining viewer's snapshot or catch-up says of the run's pace:
        ``step_quiet_s`` (quiet_s), ``step_times_s`` (the trainer's latest step times,
        oldest first, less step 1's and those spanning a pause), ``step_gap_max_s`` (the
        longest of those this server saw; null: none)."""
        pace = self._paces.get(run_id)
        times = list(pace.times) if pace is not None else []
        gap = pace.gap_max if pace is not None and pace.times else None
        return {"step_quiet_s": self.quiet_s(run_id), "step_times_s": times, "step_gap_max_s": gap}

    # ---- viewers ----

    def add_viewer(self, run_id: str, ws: WebSocket) -> Viewer:
        """Registers before the snapshot is read, so no frame falls between the two."""
        viewer = Viewer(self, ws, run_id, self.queue_frames)
        viewer.backlog = list(self._recent.get(run_id, ()))
        self._viewers.setdefault(run_id, set()).add(viewer)
        if self._ticker is None or self._ticker.done():
            self._ticker = asyncio.get_running_loop().create_task(self._tick())
        return viewer

    async def _tick(self) -> None:
        """One timer for every viewer: each started one that has nothing queued and was
        sent nothing for half a tick gets ``{"type": "tick"}`` (one encoded text for all).
        Ends when no viewer is left (the next one starts it again)."""
        loop = asyncio.get_running_loop()
        while self._viewers:
            await asyncio.sleep(self.tick_s)
            now = loop.time()
            item: _Item | None = None
            for viewers in list(self._viewers.values()):
                for viewer in list(viewers):
                    if (
                        viewer.sender is None
                        or viewer.closing
                        or viewer.queue
                        or now - viewer.last_sent < self.tick_s / 2
                    ):
                        continue
                    if item is None:
                        item = _Item(None, "tick", {"type": "tick"})
                    viewer.offer(item)

    def remove_viewer(self, viewer: Viewer) -> None:
        viewers = self._viewers.get(viewer.run_id)
        if viewers is not None:
            viewers.discard(viewer)
            if not viewers:
                del self._viewers[viewer.run_id]

    def viewer_count(self, run_id: str | None = None) -> int:
        if run_id is not None:
            return len(self._viewers.get(run_id, ()))
        return sum(len(v) for v in self._viewers.values())

    async def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        for viewers in list(self._viewers.values()):
            for viewer in list(viewers):
                viewer.drop(1001, "server shutting down")
        tasks = list(self._tasks)
        if tasks:
            await asyncio.wait(tasks, timeout=CLOSE_TIMEOUT_S + 1)
        for task in tasks:
            task.cancel()


# ---- the viewer socket ----

router = APIRouter()


def _after_seq(ws: WebSocket) -> int | None:
    raw = ws.query_params.get("after_seq")
    if raw is None or raw == "":
        return None
    value = int(raw)  # ValueError is reported by the caller
    if not 0 <= value <= wire.MAX_INT:  # past SQLite's integers: refused, not an error
        raise ValueError(raw)
    return value


@router.websocket("/ws/runs/{run_id}")
async def viewer_socket(websocket: WebSocket, run_id: str) -> None:
    """Snapshot (or catch-up), then live frames; the viewer may send commands."""
    from layerscope.server.commands import relay_viewer_message

    state = websocket.app.state
    hub: Hub = state.hub
    store = state.store
    await websocket.accept()
    try:
        after_seq = _after_seq(websocket)
    except ValueError:
        await websocket.close(wire.CLOSE_POLICY, "after_seq must be a non-negative integer")
        return
    try:
        run = store.run(run_id)
    except StoreError as exc:  # a damaged database met reading the run: say so, no traceback
        await _cannot_read(websocket, run_id, exc)
        return
    if run is None:
        # a fixed reason: a close reason is cut to 123 bytes, and a long run id in it cut
        # away the "not found" the page stops reconnecting on (it retried every 5 s)
        await websocket.close(wire.CLOSE_POLICY, "run not found")
        return
    viewer = hub.add_viewer(run_id, websocket)
    try:
        catchup = None
        if after_seq is not None:
            # Read and built in a thread, as JSON text from the stored text; None past
            # the limits: then a snapshot, as a new connection gets (the viewer's
            # after_seq becomes its last_seq).
            catchup = await run_in_threadpool(
                partial(
                    store.catchup_text,
                    max_frames=hub.catchup_max_frames,
                    max_bytes=hub.catchup_max_bytes,
                ),
                run_id,
                after_seq,
            )
        if catchup is not None:
            text, seqs = catchup
            # the run's pace, read now (after its frames), appended to the object (the
            # text ends with its closing brace); a copy of up to 8 MiB: not on the loop
            pace = json.dumps(hub.pace(run_id))
            text = await run_in_threadpool(lambda: text[:-1] + "," + pace[1:])
            viewer.start(text, floor=after_seq or 0, skip=frozenset(seqs))
        else:
            snap = await run_in_threadpool(store.snapshot, run_id)
            connected = hub.is_connected(run_id)
            if isinstance(snap.get("run"), dict):
                snap["run"]["trainer_connected"] = connected
            first = {
                **snap,
                "type": "snapshot",
                "run_id": run_id,
                "trainer_connected": connected,
                "uploading": hub.is_uploading(run_id),
                **hub.pace(run_id),
            }
            text = await run_in_threadpool(wire.encode, first)  # not on the event loop either
            shown = frozenset(
                event_key(e) for e in snap.get("events") or () if e.get("seq") is None
            )
            viewer.start(
                text, floor=int(snap.get("last_seq") or 0), skip=frozenset(), shown_events=shown
            )
        reader = asyncio.create_task(_read_viewer(websocket, viewer, relay_viewer_message))
        dropped = asyncio.create_task(viewer.done.wait())
        await asyncio.wait({reader, dropped}, return_when=asyncio.FIRST_COMPLETED)
        failed = reader.exception() if reader.done() and not reader.cancelled() else None
        if failed is not None:
            # Swallowed by the gather below, it dropped the socket with no close frame
            # and no word in the log (a 5,000-digit integer did, before wire.decode named it).
            log.error("viewer of run %s: reading its frame failed", ascii(run_id), exc_info=failed)
            viewer.drop(CLOSE_SERVER_ERROR, "server error reading the frame")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(viewer.done.wait(), CLOSE_TIMEOUT_S + 1)
        for task in (reader, dropped):
            task.cancel()
        await asyncio.gather(reader, dropped, return_exceptions=True)
    except StoreError as exc:  # reading its snapshot or catch-up met a damaged database
        await _cannot_read(websocket, run_id, exc)
    finally:
        hub.remove_viewer(viewer)
        await viewer.stop()


async def _cannot_read(websocket: WebSocket, run_id: str, exc: StoreError) -> None:
    """Close a viewer whose run the store cannot read (a damaged database: the store
    refuses writes and /healthz says why) with 1011 and the reason, not a traceback and
    a 1006 the page can only retry."""
    log.error("viewer of run %s: cannot read the run: %s", ascii(run_id), exc)
    with contextlib.suppress(Exception):
        await websocket.close(CLOSE_SERVER_ERROR, close_reason(f"cannot read this run: {exc}"))


async def _read_viewer(ws: WebSocket, viewer: Viewer, relay: Any) -> None:
    while True:
        message = await ws.receive()
        if message["type"] == "websocket.disconnect":
            return
        text = message.get("text")
        if text is None:
            viewer.drop(wire.CLOSE_UNSUPPORTED, "binary frames are not accepted; send JSON text")
            return
        try:
            data = wire.decode(text)
        except wire.WireError as exc:
            if exc.close_code is not None:
                viewer.drop(exc.close_code, str(exc))
                return
            viewer.send_direct({"type": "error", "message": cut_message(str(exc))})
            continue
        viewer.send_direct(await relay(ws, viewer.run_id, data))
