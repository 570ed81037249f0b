"""cli — the one console script, ``layerscope``.

Owns argument parsing for ``serve`` and ``demo`` (and their umask, 077, set before
anything is created) and hands ``train``, ``sync`` and
``lab`` to the trainer's own command line (imported only then, so ``serve`` never
imports torch).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import os
import signal
import socket
import sys
from collections.abc import Sequence

from layerscope.server import __version__
from layerscope.server.settings import DEFAULT_PORT, Settings, SettingsError
from layerscope.trainer import wire

SERVER_UMASK = 0o077  # `serve` and `demo` create files without group or other bits

TRAINER_COMMANDS = {
    "train": "run a built-in experiment (see `layerscope train --help`)",
    "sync": "upload a spool file recorded while no server was reachable",
    "lab": "launch a training-lab comparison (e.g. `layerscope lab init`)",
}


def _add_server_options(p: argparse.ArgumentParser, *, demo: bool = False) -> None:
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0 picks one)"
    )
    p.add_argument(
        "--data-dir",
        default=None,
        help="where runs are stored (default ./layerscope-data, env LAYERSCOPE_DATA_DIR)",
    )
    p.add_argument(
        "--token",
        default=None,
        help="viewer token for browsers and REST (env LAYERSCOPE_TOKEN); required off loopback",
    )
    p.add_argument(
        "--trainer-token",
        default=None,
        help="token trainers present (env LAYERSCOPE_TRAINER_TOKEN); required off loopback",
    )
    p.add_argument(
        "--allow-origin",
        action="append",
        default=[],
        help="extra Origin allowed on websockets (repeatable)",
    )
    p.add_argument(
        "--allow-host",
        action="append",
        default=[],
        help="extra Host name accepted, e.g. a compose service name (repeatable; "
        "env LAYERSCOPE_ALLOWED_HOSTS, comma-separated)",
    )
    p.add_argument(
        "--data-root",
        action="append",
        default=[],
        metavar="DIR",
        help="a folder whose files the New-run form may name as data.path or "
        "finetune.from_checkpoint (repeatable; default: the working directory, unless that "
        "is / or above your home: then the data dir; env LAYERSCOPE_DATA_ROOTS, "
        "os.pathsep-separated)",
    )
    p.add_argument(
        "--max-launched",
        type=int,
        default=None,
        help="cap on concurrently launched built-in runs (default 6: the init lab's five and one more)",
    )
    p.add_argument("--log-level", default="warning", help="uvicorn log level (default warning)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="layerscope",
        description="A live, steerable microscope for neural-network training.",
    )
    parser.add_argument("--version", action="version", version=f"layerscope {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the dashboard server", description="Run the server.")
    serve.add_argument("--version", action="version", version=f"layerscope {__version__}")
    _add_server_options(serve)

    demo = sub.add_parser(
        "demo",
        help="run the server plus one built-in demo run; prints the dashboard URL",
        description="Start the server and a built-in demo run in the background. Ctrl-C stops both.",
    )
    demo.add_argument("--version", action="version", version=f"layerscope {__version__}")
    _add_server_options(demo, demo=True)
    demo.add_argument("--steps", type=int, default=20000, help="steps of the demo run")

    for name, help_text in TRAINER_COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _hangup_stops_the_server() -> None:
    """A closed terminal (SIGHUP) stops the server as Ctrl-C and SIGTERM do: it is passed on
    as SIGTERM, which serving handles. By default SIGHUP killed the server on the spot, and
    its launched trainers (in sessions of their own) trained on with no server to stop
    them. A server started with SIGHUP ignored (``nohup``) keeps ignoring it."""
    if signal.getsignal(signal.SIGHUP) is signal.SIG_DFL:
        signal.signal(signal.SIGHUP, lambda *_: os.kill(os.getpid(), signal.SIGTERM))


def _host_problem(host: str) -> str | None:
    """Why ``--host`` names no address to listen on (a typo, a name that does not resolve),
    before the loopback guard answers it with advice about tokens."""
    if not host:  # every interface, as "0.0.0.0" (the loopback guard still applies)
        return None
    try:
        socket.getaddrinfo(host.strip("[]"), None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, socket.gaierror) else str(exc)
        return f"--host {host}: not an address this machine can listen on ({reason})"
    return None


def _settings_from(args: argparse.Namespace) -> Settings:
    return Settings.from_env(
        host=args.host,
        port=args.port,
        data_dir=args.data_dir,
        viewer_token=args.token,
        trainer_token=args.trainer_token,
        allowed_origins=tuple(args.allow_origin),
        allowed_hosts=tuple(args.allow_host),
        data_roots=tuple(args.data_root),
        max_launched=args.max_launched,
        log_level=args.log_level,
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in TRAINER_COMMANDS:
        # Handed over whole, so `layerscope train --help` shows the trainer's options.
        trainer_cli = importlib.import_module("layerscope.trainer.cli")
        return int(trainer_cli.main(argv) or 0)

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    # Before anything is created: the data dir, the database, the runs' configs, logs,
    # spools and checkpoints (the launched trainers inherit it) are the owner's alone.
    os.umask(SERVER_UMASK)
    problem = _host_problem(args.host)
    if problem is not None:
        print(f"layerscope: {problem}", file=sys.stderr)
        return 2
    try:
        settings = _settings_from(args)
    except SettingsError as exc:
        print(f"layerscope: {exc}", file=sys.stderr)
        return 2

    from layerscope.server import data_lock, serving

    if args.command == "demo":  # refused before the data dir is created
        demo_config = copy.deepcopy(wire.DEMO_EXPERIMENT)
        demo_config.setdefault("solver", {})["steps"] = args.steps
        try:
            wire.validate_experiment(demo_config)
        except wire.ExperimentError as exc:
            print(f"layerscope demo: {exc}", file=sys.stderr)
            return 2
    # Before anything starts: the data dir is usable and this process holds its lock (the
    # store takes it over), so of two servers started together the loser says why in one
    # line; a check made later, inside the app's startup, failed with uvicorn's traceback.
    problem = data_lock.claim(settings.data_dir)
    if problem is not None:
        print(f"layerscope: {problem}", file=sys.stderr)
        return 1
    _hangup_stops_the_server()
    try:
        if args.command == "serve":
            return serving.serve(settings)
        return serving.demo(settings, steps=args.steps)
    finally:
        data_lock.drop_claim(settings.data_dir)
