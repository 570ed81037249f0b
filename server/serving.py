"""serving — run the app under uvicorn: ``layerscope serve`` and ``layerscope demo``.

Owns: binding the listening socket before the app is built (so ``--port 0``
yields the real port everywhere: the Host check, the launcher's trainer URL, the
printed dashboard URL), the uvicorn configuration (websocket frame limit,
keepalive pings, graceful shutdown, token values masked in its log lines), Ctrl-C/SIGTERM handling, the
startup notes on stderr once serving (a default data root too wide to use, a data dir
other users may read: startup_notes), and the demo:
server plus one built-in run, both stopped together. A startup the app refuses ends
in its one logged line and exit code 1 (uvicorn's sys.exit(3) is caught).

Never: leaves a launched trainer running after a clean shutdown, closes a launched
trainer's websocket before that trainer has stopped (its last frames would stay in its
spool), prints a URL
before the server accepts connections, or starts on a data directory another server
holds (one line says so; data_lock.py).
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import signal
import socket
import stat
import sys
from collections.abc import Generator
from contextlib import contextmanager
from urllib.parse import quote

import uvicorn
from fastapi import FastAPI
from layerscope.server.app import create_app
from layerscope.server.data_lock import holder_message
from layerscope.server.security import mask_tokens_in_logs
from layerscope.server.settings import Settings, local_host
from layerscope.server.store_writer import tune_gc
from layerscope.trainer import wire

WS_PING_INTERVAL_S = 10.0  # a viewer that stops answering pings is dropped after interval + timeout
WS_PING_TIMEOUT_S = 10.0
GRACEFUL_SHUTDOWN_S = 5
# uvicorn refuses bigger frames itself (close 1009); between the two, wire.decode names the limit.
WS_MAX_SIZE = 4 * wire.MAX_FRAME_BYTES
FORCE_EXIT_POLL_S = 0.1  # while the launched trainers stop, how often a second Ctrl-C is looked for
SWITCH_INTERVAL_S = 0.0005  # how long a thread waiting for the GIL waits (default 5 ms)


def bind_socket(host: str, port: int) -> socket.socket:
    """Listen on host:port (port 0 picks a free one) before the app needs to know it."""
    bare = host.strip("[]")
    family = socket.AF_INET6 if ":" in bare else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if bare == "::" and socket.has_dualstack_ipv6():
        # IPv4 too, whatever the system's default: local_host() sends this machine's own
        # clients (launched trainers, the printed URL) to 127.0.0.1.
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    # Accepted sockets inherit it; asyncio sets it only on sockets created with
    # proto=IPPROTO_TCP, and without it every keep-alive response stalls ~40 ms
    # (Nagle against delayed ACK).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((bare, port))
    except OSError:
        sock.close()
        raise
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


UVICORN_STARTUP_FAILED = "Application startup failed. Exiting."


class StartupFailureSaid(logging.Filter):
    """Drops uvicorn's "Application startup failed. Exiting." right after the one line
    (``layerscope: <why>``, app.StartupMessage) that already said so; after a traceback
    (an unexpected failure) it stays."""

    def __init__(self) -> None:
        super().__init__()
        self.said = False

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message == UVICORN_STARTUP_FAILED:
            said, self.said = self.said, False
            return not said
        self.said = record.levelno >= logging.ERROR and message.startswith("layerscope: ")
        return True


def quiet_startup_failure() -> None:
    """Install StartupFailureSaid on uvicorn's lifespan logger (once)."""
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, StartupFailureSaid) for f in logger.filters):
        logger.addFilter(StartupFailureSaid())


class Server(uvicorn.Server):
    """uvicorn's server with signal handling that ends in a clean return, not a re-raised
    signal, and a shutdown that stops the launched trainers before it closes any socket."""

    def __init__(self, config: uvicorn.Config, app: FastAPI | None = None) -> None:
        super().__init__(config)
        self.app = app

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """Launched trainers first (SIGTERM: each closes cleanly, sending what it has and
        waiting for the acks, Launcher.close bounds it), then uvicorn's shutdown. uvicorn
        closed every websocket first, so the frames a child sent between that and its
        SIGTERM stayed in its spool folder and the run's tail never reached the server.
        A second Ctrl-C stops waiting for them (the lifespan's Launcher.close is skipped
        then too: the children have had their SIGTERM)."""
        launcher = getattr(self.app.state, "launcher", None) if self.app is not None else None
        if launcher is not None and not self.force_exit:
            closing = asyncio.ensure_future(launcher.close())
            while not closing.done() and not self.force_exit:
                await asyncio.wait({closing}, timeout=FORCE_EXIT_POLL_S)
            if closing.done():
                closing.result()
        await super().shutdown(sockets=sockets)

    @contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        loop = asyncio.get_running_loop()
        installed = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, self._on_signal, sig)
                installed.append(sig)
            except (NotImplementedError, RuntimeError, ValueError):  # not the main thread (tests)
                pass
        try:
            yield
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's startup, where a lifespan that refuses ends in a return: uvicorn
        calls sys.exit(3) inside the server task, which escaped ``serve()`` and
        ``demo()`` as "Task exception was never retrieved ... SystemExit: 3" and its
        traceback, after the one line that says why (app.StartupMessage)."""
        try:
            await super().startup(sockets=sockets)
        except SystemExit:
            self.should_exit = True  # not started: serve() and demo() return 1

    def _on_signal(self, sig: int) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        self.should_exit = True


def make_server(settings: Settings) -> tuple[Server, socket.socket, Settings, FastAPI]:
    """The uvicorn server, its bound socket, settings with the real port, and the app."""
    sock = bind_socket(settings.host, settings.port)
    settings = settings.with_port(sock.getsockname()[1])
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        # For Server.run() (the tests' harness): asyncio's own loop, the one serve() and
        # demo() get from asyncio.run. With "auto" uvicorn takes uvloop wherever it is
        # installed; on a GPU image that had it, the suite's slow-viewer test closed the
        # fast viewer too and loop shutdown left sockets open. uvloop is not a dependency.
        loop="asyncio",
        log_level=settings.log_level,
        ws_max_size=WS_MAX_SIZE,
        ws_ping_interval=WS_PING_INTERVAL_S,
        ws_ping_timeout=WS_PING_TIMEOUT_S,
        # Off: a per-viewer zlib context costs CPU per frame per viewer (and broke the 50-viewer
        # latency budget in benchmarks/latency.py); live frames are small and mostly local.
        ws_per_message_deflate=False,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        proxy_headers=False,
        server_header=False,
        lifespan="on",
    )
    mask_tokens_in_logs()  # after uvicorn.Config, which configures its loggers
    quiet_startup_failure()
    return Server(config, app), sock, settings, app


def tune_runtime() -> None:
    """For a serving process, once its app is built: the interpreter settings ingest needs.

    GC: a 50-layer probe frame is a few hundred dicts and lists that live until their
    commit (100 ms or more); with the default thresholds the cyclic collector walked each
    of them several times, and every full collection walked every frame not yet
    committed, so it cost more the further ingest fell behind: about 0.6 ms per probe
    frame, a fifth of the server's CPU. Freezing moves the framework's objects (about
    60,000) out of every later collection; a young generation of 50,000 allocations
    lets most frames be freed by their reference counts before any collection sees them.

    Switch interval: a thread beside the event loop (the store's feeder, which hands
    writes to the writer process, and HTTP reads in the thread pool) that gives up the
    GIL for I/O then waits for the loop, which decodes frames without yielding it, for up
    to this interval (5 ms by default) each time. Measured when the store writer was still
    a thread here: at 0.5 ms the probe phase of benchmarks/ingest.py acked 2-3x as many
    frames while sending (3 rounds alternated, load 5-7), for the same CPU per frame."""
    tune_gc()
    sys.setswitchinterval(SWITCH_INTERVAL_S)


def base_url(settings: Settings) -> str:
    return f"http://{local_host(settings.host)}:{settings.port}"


def _token_query(settings: Settings) -> str:
    return f"?token={quote(settings.viewer_token)}" if settings.viewer_token else ""


def _data_dir_taken(settings: Settings) -> bool:
    """Another server holds the data dir: say so in one line (the store's own lock, taken
    as the app starts, is what keeps two servers apart; this is the message for it)."""
    message = holder_message(settings.data_dir)
    if message is not None:
        print(f"layerscope: {message}", file=sys.stderr)
    return message is not None


def startup_notes(settings: Settings) -> list[str]:
    """Lines a started server says (on stderr, after it serves) about its configuration: a default data root too wide
    to use (Settings.data_root_note), a data dir other users may read (its mode is left
    alone: it may be shared on purpose)."""
    notes = [settings.data_root_note] if settings.data_root_note else []
    try:
        mode = stat.S_IMODE(os.stat(settings.data_dir).st_mode)
    except OSError:  # not there yet: it is created owner-only
        mode = 0
    if mode & 0o077:
        notes.append(
            f"the data dir {settings.data_dir} is mode {mode:04o}: other users of this "
            f"machine may read its runs and database (chmod 700 {settings.data_dir} to stop it)"
        )
    return notes


def _say_startup_notes(settings: Settings) -> None:
    for note in startup_notes(settings):
        print(f"layerscope: {note}", file=sys.stderr, flush=True)


def serve(settings: Settings) -> int:
    if _data_dir_taken(settings):
        return 1
    try:
        server, sock, settings, app = make_server(settings)
    except OSError as exc:
        print(
            f"layerscope: cannot listen on {settings.host}:{settings.port}: {exc}", file=sys.stderr
        )
        return 1

    async def main() -> None:
        task = asyncio.create_task(server.serve(sockets=[sock]))
        if await _started(server, task):
            tune_runtime()
            print(
                f"layerscope: serving {base_url(settings)}/{_token_query(settings)} "
                f"(data in {settings.data_dir})",
                flush=True,
            )
            _say_startup_notes(settings)
        await task

    try:
        asyncio.run(main())
    finally:
        sock.close()  # uvicorn closed it where it started; not where startup was refused
    return 0 if server.started else 1


async def _started(server: Server, task: asyncio.Task[None]) -> bool:
    while not server.started:
        if task.done():
            return False
        await asyncio.sleep(0.02)
    return True


def demo(settings: Settings, steps: int) -> int:
    """The server plus one built-in run; Ctrl-C or SIGTERM stops both."""
    config = copy.deepcopy(wire.DEMO_EXPERIMENT)
    config.setdefault("solver", {})["steps"] = steps
    try:
        wire.validate_experiment(config)
    except wire.ExperimentError as exc:
        print(f"layerscope demo: {exc}", file=sys.stderr)
        return 2
    if _data_dir_taken(settings):
        return 1
    try:
        server, sock, settings, app = make_server(settings)
    except OSError as exc:
        print(
            f"layerscope: cannot listen on {settings.host}:{settings.port}: {exc}", file=sys.stderr
        )
        return 1
    failed = False

    async def main() -> None:
        nonlocal failed
        task = asyncio.create_task(server.serve(sockets=[sock]))
        if not await _started(server, task):
            failed = True
            await task
            return
        tune_runtime()
        _say_startup_notes(settings)
        launcher = app.state.launcher
        try:
            run_id = await launcher.launch(config)
        except Exception as exc:
            print(f"layerscope demo: could not launch the demo run: {exc}", file=sys.stderr)
            failed = True
            server.should_exit = True
            await task
            return
        url = base_url(settings)
        query = _token_query(settings)
        print(f"layerscope demo: dashboard at {url}/runs/{run_id}{query}", flush=True)
        print(f"layerscope demo: all runs at {url}/{query}", flush=True)
        print("layerscope demo: Ctrl-C stops the server and the run", flush=True)
        await task

    try:
        asyncio.run(main())
    finally:
        sock.close()
    return 1 if failed or not server.started else 0
