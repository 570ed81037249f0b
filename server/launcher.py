"""launcher — built-in runs started from the dashboard, as child processes (DESIGN §1).

Owns: ``POST /api/runs`` (validate an experiment config, keep the files it names
inside the data roots, cap concurrent launches, create the run, spawn
``python -m layerscope.trainer train`` with the trainer token and its output in
``runs/<id>/trainer.log``), ``POST /api/runs/{id}/stop``
(the ``stop`` command, then SIGTERM, then SIGKILL), reaping every child (a
non-zero exit of a run that has not ended marks it ``failed``: the log's last
line, then its tail; a child that cannot be spawned fails its run at once), and
terminating children when the server shuts down, before their sockets close (serving.py;
a server killed with SIGKILL
cannot: its children, in their own sessions, train on and reconnect to the next
server on the same address).

Never: imports torch or trainer code beyond ``wire`` (the child does the
training), blocks the event loop on a child, or leaves a child unreaped.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Body, HTTPException, Request
from layerscope.server.commands import CommandRefused, origin_of, relay_command
from layerscope.server.hub import Hub, cut_message
from layerscope.server.settings import Settings, local_host
from layerscope.trainer import wire

log = logging.getLogger("layerscope.launcher")

STOP_GRACE_S = 10.0  # after `stop`, the trainer gets this long to finish its step and exit
TERM_GRACE_S = 5.0  # after SIGTERM, this long before SIGKILL
END_GRACE_S = 3.0  # a run being deleted: its trainer, off the server, gets this long to exit
LOG_TAIL_LINES = 20
SHUTDOWN_REASON = "the server shut down"


class LaunchRefused(Exception):
    """``detail``: a message, or a list of ``{loc, msg}``; each message and field name cut
    (hub.cut_message): a config quoting a huge value or key got the whole of it back."""

    def __init__(self, status: int, detail: Any) -> None:
        if isinstance(detail, str):
            detail = cut_message(detail)
        elif isinstance(detail, list):
            detail = [_cut_error(error) for error in detail]
        super().__init__(str(detail))
        self.status = status
        self.detail = detail


def _cut_error(error: Any) -> Any:
    if not isinstance(error, dict):
        return error
    out = dict(error)
    if isinstance(out.get("msg"), str):
        out["msg"] = cut_message(out["msg"])
    if isinstance(out.get("loc"), list):
        out["loc"] = [cut_message(x) if isinstance(x, str) else x for x in out["loc"]]
    return out


@dataclass
class Child:
    run_id: str
    process: asyncio.subprocess.Process
    log_path: Path
    stopping: bool = False
    stop_reason: str = "stopped from the dashboard"
    reaper: asyncio.Task[None] | None = None
    stopper: asyncio.Task[None] | None = field(default=None, repr=False)


def run_id_for(name: str | None) -> str:
    """``'demo: digits mlp'`` -> ``'demo-digits-mlp-3fa2c1'``: readable, unique, URL-safe."""
    slug = re.sub(r"[^a-z0-9]+", "-", (name or "run").lower()).strip("-")[:40] or "run"
    return f"{slug}-{wire.new_id()[:6]}"


NUMBERED = re.compile(r"(?P<base>.*) #(?P<n>[1-9][0-9]{0,8})", re.DOTALL)  # fullmatch
MAX_SUFFIX = len(" #999999999")


def numbered(base: str, n: int) -> str:
    """``'base #n'``, ``base`` cut to keep it within wire.MAX_NAME_LEN."""
    suffix = f" #{n}"
    return base[: wire.MAX_NAME_LEN - len(suffix)] + suffix


def distinct_name(name: str, taken: list[str]) -> str:
    """``name``, or where a run in ``taken`` already has it, ``name`` numbered past the
    others: the second run from one form or preset is ``'demo: digits mlp tanh xavier #2'``
    (three were listed under one name, told apart by nothing). ``taken``: at least every
    name starting with ``family(name)``."""
    if name not in taken:
        return name
    base = family_of(name)  # 'x #2' again is 'x #3', not 'x #2 #2'
    highest = 1
    for other in taken:
        match = NUMBERED.fullmatch(other)
        if match and other == numbered(base, int(match.group("n"))):
            highest = max(highest, int(match.group("n")))
    return numbered(base, highest + 1)


def family_of(name: str) -> str:
    """The name a numbered name was numbered from: ``'x #2'`` -> ``'x'``."""
    match = NUMBERED.fullmatch(name)
    return match.group("base") if match else name


# The config fields that name a file or folder on the server's machine.
PATH_FIELDS = (("data", "path"), ("finetune", "from_checkpoint"))


def confine_paths(body: Any, roots: tuple[Path, ...]) -> tuple[Any, list[dict[str, Any]]]:
    """``body`` with each path field resolved (symlinks too; a relative path against the
    server's working directory, as ``validate_experiment`` makes it absolute for the child)
    and one error per field outside ``roots``, that field set to None. The message does not
    depend on whether the file exists: the New-run form is no oracle for the server's disk,
    and a refused path never reaches the child (whose log tail the run's status shows)."""
    if not isinstance(body, dict):
        return body, []
    body = dict(body)
    errors: list[dict[str, Any]] = []
    where = ", ".join(str(root) for root in roots)
    for section, key in PATH_FIELDS:
        fields = body.get(section)
        if not isinstance(fields, dict) or not isinstance(fields.get(key), str):
            continue
        path = fields[key]
        if not path or "\0" in path or wire.lone_surrogate(path) is not None:
            # No file's name, which validate_experiment refuses by name: "" resolved to the
            # working directory ("no such file: <cwd>"), a NUL raised in realpath (a 500).
            continue
        real = os.path.realpath(path)
        inside = any(os.path.commonpath([real, str(root)]) == str(root) for root in roots)
        body[section] = {**fields, key: real if inside else None}
        if not inside:
            msg = (
                f"{section}.{key} must be inside {where}; start the server with "
                "--data-root DIR to allow another folder"
            )
            errors.append({"loc": [section, key], "msg": msg})
    return body, errors


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with path.open("r", errors="replace") as f:
            return "".join(deque(f, maxlen=lines)).strip()
    except OSError:
        return ""


def failure_reason(code: int, tail: str) -> str:
    """A failed child's reason: its exit code and its log's last line (the error a clean
    exit prints, a traceback's exception) first, where the event log shows it at once,
    then the tail before it."""
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    if not lines:
        return f"trainer exited with code {code}"
    head = f"trainer exited with code {code}: {lines[-1]}"
    return head if len(lines) == 1 else f"{head}\n{tail}"


class Launcher:
    def __init__(
        self,
        settings: Settings,
        store: Any,
        hub: Hub,
        *,
        stop_grace_s: float = STOP_GRACE_S,
        term_grace_s: float = TERM_GRACE_S,
    ) -> None:
        self.settings = settings
        self.store = store
        self.hub = hub
        self.stop_grace_s = stop_grace_s
        self.term_grace_s = term_grace_s
        self.port = settings.port  # the bound port; serving sets it before the first launch
        self.children: dict[str, Child] = {}
        # Names given to launches whose runs are not stored yet: two at once of one
        # preset are numbered apart (the store shows neither until it commits).
        self._naming: set[str] = set()
        # Launches checked against the cap but not yet in ``children`` (a launch awaits the
        # store and the process start): counted, so concurrent requests cannot all pass.
        self._held = 0
        self.exit_codes: dict[str, int] = {}
        self.closing = False  # the server is shutting down: no more launches
        # Where a launched config may name files: the data roots, and the launched runs'
        # folders (the checkpoints the dashboard's Checkpoint command wrote, to fine-tune from).
        runs = Path(os.path.realpath(settings.data_dir / "runs"))
        self.path_roots = (*settings.data_roots, runs)

    def exit_code(self, run_id: str) -> int | None:
        return self.exit_codes.get(run_id)

    def command_line(self, config_path: Path, run_id: str, run_dir: Path) -> list[str]:
        return [
            sys.executable,
            "-m",
            "layerscope.trainer",
            "train",
            "--config",
            str(config_path),
            "--run-id",
            run_id,
            "--server",
            # An address the server listens on: 127.0.0.1 reached nothing when it was bound
            # to ::1 or to one LAN address.
            f"ws://{local_host(self.settings.host)}:{self.port}/ws/trainer",
            "--no-progress",
            "--run-dir",
            str(run_dir),
        ]

    def busy(self) -> int:
        """Launched trainers running, plus launches under way (held, not yet started)."""
        return self._held + sum(1 for c in self.children.values() if c.process.returncode is None)

    def hold(self, n: int) -> None:
        """Count n launches against the cap before awaiting anything (the caller checked
        ``busy()`` in the same synchronous stretch); each ``launch(held=True)`` lets one go."""
        self._held += n

    def release(self, n: int) -> None:
        self._held -= n

    async def launch(self, body: Any, *, held: bool = False) -> str:
        """Start a built-in run; ``held``: the caller has counted it (``hold``), and this
        launch lets that share go whatever happens."""
        if not held:
            self.hold(1)
        try:
            config = self._checked(body, held)
            return await self._start(config)
        finally:
            self.release(1)  # started (now in children), refused or failed

    def _checked(self, body: Any, held: bool) -> dict[str, Any]:
        body, outside = confine_paths(body, self.path_roots)
        refused = [error["loc"] for error in outside]
        try:
            config = wire.validate_experiment(body)
        except wire.ExperimentError as exc:
            others = [error for error in exc.errors if error["loc"] not in refused]
            raise LaunchRefused(422, outside + others) from None
        if outside:
            raise LaunchRefused(422, outside)
        if self.closing:
            raise LaunchRefused(
                503, "the server is shutting down; launch the run after it restarts"
            )
        busy = self.busy() - 1  # the others: this launch is held already
        if not held and busy >= self.settings.max_launched:
            raise LaunchRefused(
                429,
                f"{busy} launched runs are already running (limit "
                f"{self.settings.max_launched}); stop one first",
            )
        return config

    def _name(self, name: str) -> str:
        """``name`` made distinct from every stored run's and every launch's under way
        (distinct_name); reserved in ``_naming`` until the run is stored."""
        prefix = family_of(name)[: wire.MAX_NAME_LEN - MAX_SUFFIX]
        stored = self.store.run_names_starting(prefix)
        given = distinct_name(name, [*stored, *self._naming])
        self._naming.add(given)
        return given

    async def _start(self, config: dict[str, Any]) -> str:
        run_id = run_id_for(config.get("name"))  # from the name asked for, as before
        name = self._name(str(config.get("name") or run_id))
        # In the config the child reads: its hello names the run, and renames it otherwise.
        config = {**config, "name": name}
        try:
            run_dir = (self.settings.data_dir / "runs" / run_id).absolute()  # the child's cwd
            run_dir.mkdir(parents=True, exist_ok=True)
            config_path = run_dir / "config.json"
            config_path.write_text(json.dumps(config, indent=2))
            await self.store.create_run(run_id, name, config, status="starting", launched=True)
        finally:
            self._naming.discard(name)
        env = dict(os.environ)
        # The child gets the trainer token only: the viewer token (in the server's
        # environment when set there) would let it act as a browser.
        env.pop("LAYERSCOPE_TOKEN", None)
        env.pop("LAYERSCOPE_TRAINER_TOKEN", None)
        if self.settings.trainer_token:
            env["LAYERSCOPE_TRAINER_TOKEN"] = self.settings.trainer_token
        log_path = run_dir / "trainer.log"
        try:
            with log_path.open("ab") as out:
                process = await asyncio.create_subprocess_exec(
                    *self.command_line(config_path, run_id, run_dir),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=out,
                    stderr=asyncio.subprocess.STDOUT,
                    env=env,
                    cwd=str(run_dir),
                    start_new_session=True,  # a Ctrl-C in the server's terminal is the server's
                )
        except OSError as exc:
            # Nothing would ever end the run (no child to reap, no trainer to connect): it
            # stayed "starting" and the form got a bare 500.
            reason = f"could not start the trainer process: {exc}"
            await self.store.set_status(run_id, "failed", reason=reason)
            self.hub.publish_status(run_id, "failed", reason=reason)
            raise LaunchRefused(500, f"run {run_id}: {reason}") from None
        child = Child(run_id, process, log_path)
        child.reaper = asyncio.get_running_loop().create_task(self._reap(child))
        self.children[run_id] = child
        self.hub.publish_status(run_id, "starting")
        return run_id

    async def _reap(self, child: Child) -> None:
        code = await child.process.wait()
        self.exit_codes[child.run_id] = code
        self.children.pop(child.run_id, None)
        run = self.store.run(child.run_id)
        if run is None or run["status"] in wire.ENDED_STATUSES:
            return
        if child.stopping:
            status, reason = "stopped", child.stop_reason
        elif code != 0:
            status, reason = "failed", failure_reason(code, log_tail(child.log_path))
        elif self.hub.is_connected(child.run_id):
            return  # still saying goodbye: its final status, or liveness, ends the run
        else:
            # A clean exit that never told the server how the run ended (it never reached
            # it, say): nothing would end the run otherwise; liveness watches connections.
            status = "lost"
            reason = "the trainer exited (code 0) without reporting the run's end to the server"
        try:
            await self.store.set_status(child.run_id, status, reason=reason)
        except Exception:
            log.exception("could not record the end of run %s", child.run_id)
            return
        self.hub.publish_status(child.run_id, status, reason=reason)

    async def stop(self, run_id: str, *, origin: str) -> str:
        """Ask the trainer to stop; a launched child is terminated if it does not."""
        run = self.store.run(run_id)
        if run is None:
            raise LaunchRefused(404, f"run {run_id!r} not found")
        child = self.children.get(run_id)
        if run["status"] in wire.ENDED_STATUSES and child is None:
            raise LaunchRefused(409, f"run {run_id!r} has already ended ({run['status']})")
        if child is None and not self.hub.is_connected(run_id):
            raise LaunchRefused(409, f"run {run_id!r} has no trainer connected to stop")
        # Stored and logged like any command, also before a launched trainer has connected
        # (its welcome delivers it; it was dropped, and the trainer trained until SIGTERM).
        try:
            await relay_command(
                self.store,
                self.hub,
                run_id,
                {"name": "stop", "source": "api"},
                origin=origin,
                while_away=child is not None,
            )
        except CommandRefused as exc:
            if child is None:
                raise LaunchRefused(exc.status, exc.reason) from None
        if child is not None and child.stopper is None:
            child.stopping = True
            child.stopper = asyncio.get_running_loop().create_task(self._terminate(child))
        return "stopping"

    async def end(self, run_id: str) -> None:
        """No launched trainer runs for the run once this returns (before its deletion):
        one that has left the server is given END_GRACE_S to exit by itself, then
        terminated; the reaper has recorded its exit."""
        child = self.children.get(run_id)
        if child is None:
            return
        if child.process.returncode is None and child.stopper is None:
            child.stopping = True
            child.stopper = asyncio.get_running_loop().create_task(
                self._terminate(child, grace_s=END_GRACE_S)
            )
        if child.stopper is not None:
            await child.stopper
        elif child.reaper is not None:
            await child.reaper

    async def _terminate(self, child: Child, grace_s: float | None = None) -> None:
        """Wait for a clean exit, then SIGTERM, then SIGKILL; the reaper records the end."""
        process = child.process
        for sig, wait_s in (
            (None, self.stop_grace_s if grace_s is None else grace_s),
            (signal.SIGTERM, self.term_grace_s),
            (signal.SIGKILL, None),
        ):
            if process.returncode is not None:
                break
            if sig is not None:
                try:
                    process.send_signal(sig)
                except ProcessLookupError:
                    break
            if wait_s is None:
                await process.wait()
                break
            try:
                await asyncio.wait_for(asyncio.shield(process.wait()), wait_s)
                break
            except TimeoutError:
                continue
        if child.reaper is not None:
            await child.reaper

    async def close(self) -> None:
        """Server shutdown, while trainers' sockets are still open (serving.Server): every
        child gets SIGTERM at once (it closes its run as stopped, sending what it has and
        waiting for the acks) and is reaped; no launch starts after this is called. A run
        its trainer closed as stopped keeps its reason: the server shut down."""
        self.closing = True
        children = list(self.children.values())
        for child in children:
            child.stopping = True
            child.stop_reason = SHUTDOWN_REASON
        await asyncio.gather(
            *(self._terminate(c, grace_s=0.0) for c in children), return_exceptions=True
        )
        for child in children:
            run = self.store.run(child.run_id)
            if run is None or run["status"] != "stopped" or run["status_reason"]:
                continue  # the reaper recorded it (or the run ended otherwise)
            try:
                await self.store.set_status(child.run_id, "stopped", reason=SHUTDOWN_REASON)
            except Exception:
                log.exception("could not record why run %s stopped", child.run_id)
                continue
            self.hub.publish_status(child.run_id, "stopped", reason=SHUTDOWN_REASON)


router = APIRouter()


@router.post("/api/runs", status_code=201)
async def launch_run(request: Request, body: Annotated[Any, Body()]) -> dict[str, Any]:
    """Launch a built-in experiment; 422 lists every bad field as {loc, msg}."""
    launcher: Launcher = request.app.state.launcher
    try:
        run_id = await launcher.launch(body)
    except LaunchRefused as exc:
        raise HTTPException(exc.status, exc.detail) from None
    return {"id": run_id, "status": "starting"}


@router.post("/api/runs/{run_id}/stop", status_code=202)
async def stop_run(request: Request, run_id: str) -> dict[str, Any]:
    launcher: Launcher = request.app.state.launcher
    try:
        status = await launcher.stop(run_id, origin=origin_of(request, "api"))
    except LaunchRefused as exc:
        raise HTTPException(exc.status, exc.detail) from None
    return {"id": run_id, "status": status}
