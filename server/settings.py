"""settings — everything the server is configured with, in one frozen value.

Built from CLI flags and ``LAYERSCOPE_*`` environment variables by the CLI, or
directly by tests (``Settings(data_dir=tmp_path)``). Never read at import time.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlsplit

DEFAULT_PORT = 8765
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")  # uvicorn's
MIN_TOKEN_LENGTH = 16  # a token is a password: a short one is guessed
MAKE_TOKEN = 'python -c "import secrets; print(secrets.token_urlsafe(24))"'


class SettingsError(ValueError):
    """A configuration the server refuses to start with."""


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def local_host(host: str) -> str:
    """The address a process on this machine reaches a server bound to ``host`` at, ready
    for a URL (IPv6 bracketed): loopback for a wildcard bind (IPv4 when an IPv6 wildcard
    also takes IPv4, as ``serving.bind_socket`` asks it to), else the bound address."""
    bare = host.strip().strip("[]")
    if bare in ("0.0.0.0", "") or bare.lower() == "localhost":
        return "127.0.0.1"
    if bare == "::":
        return "127.0.0.1" if socket.has_dualstack_ipv6() else "[::1]"
    return f"[{bare}]" if ":" in bare else bare


def too_wide_for_default_root(folder: Path) -> bool:
    """Whether ``folder`` (a working directory) is too wide to be the default data root:
    ``/`` (systemd's, cron's and many supervisors' default working directory) or any
    folder above the user's home (``/home``): every file of the machine, or of every user,
    could be named by the New-run form."""
    real = Path(os.path.realpath(folder))
    if real == Path(real.anchor):
        return True
    try:
        home = Path(os.path.realpath(Path.home()))
    except (KeyError, RuntimeError):  # no home directory known
        return False
    return home != real and real in home.parents


def require_token_pair(viewer_token: str | None, trainer_token: str | None) -> None:
    """The CLI's message for one token without the other (flag and env names). One alone left
    the other side open to any local process (with only a viewer token, one could take a live
    run's trainer socket and report it finished); Settings itself refuses it too."""
    missing = None
    if viewer_token and not trainer_token:
        missing = "a trainer token: set --trainer-token (LAYERSCOPE_TRAINER_TOKEN)"
    elif trainer_token and not viewer_token:
        missing = "a viewer token: set --token (LAYERSCOPE_TOKEN)"
    if missing:
        raise SettingsError(
            f"one token is set but not the other; the server needs {missing} too, "
            "different from the first"
        )


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    data_dir: Path = field(default_factory=lambda: Path("layerscope-data"))
    viewer_token: str | None = None
    trainer_token: str | None = None
    allowed_origins: tuple[str, ...] = ()
    # Extra Host header names accepted besides the bound host and loopback names
    # (e.g. "server" for a docker-compose service name).
    allowed_hosts: tuple[str, ...] = ()
    # Folders a config sent over HTTP (the New-run form) may name files in (data.path,
    # finetune.from_checkpoint); default (empty): the working directory the server started
    # in, or the data dir where that is / or above the user's home (data_root_note says so).
    data_roots: tuple[Path, ...] = ()
    data_root_note: str = ""
    max_launched: int = 6  # the init lab's five runs and one more (the demo's)
    heartbeat_timeout_s: float = 15.0  # a trainer silent this long is `lost`
    reconnect_grace_s: float = 30.0  # after a restart, runs left "running" wait this long
    commit_interval_s: float = 0.1  # group commit period of the store's writer
    viewer_queue_frames: int = 512  # per-viewer bound before coalescing / dropping
    log_level: str = "warning"

    def __post_init__(self) -> None:
        # Absolute from here on: launched trainers run in their run's folder, and a relative
        # data dir (the default, layerscope-data) named paths they could not find.
        object.__setattr__(self, "data_dir", Path(self.data_dir).absolute())
        # Resolved once (symlinks too), as the paths checked against them will be.
        data_dir_real = Path(os.path.realpath(self.data_dir))
        given_roots = self.data_roots
        if not given_roots:
            cwd = Path.cwd()
            given_roots = (cwd,)
            if too_wide_for_default_root(cwd):
                given_roots = (data_dir_real,)
                object.__setattr__(
                    self,
                    "data_root_note",
                    f"the working directory {cwd} is / or above your home, too wide to be "
                    f"the default data root: the New-run form may name files in "
                    f"{data_dir_real} only (start with --data-root DIR to allow a folder)",
                )
        roots = []
        for given in given_roots:
            root = Path(os.path.realpath(given))
            # The data dir may not exist yet: the server creates it as it starts.
            if root != data_dir_real and not root.is_dir():
                what = "not a directory" if root.exists() else "no such directory"
                raise SettingsError(
                    f"--data-root {given}: {what} (data roots come from --data-root and "
                    "LAYERSCOPE_DATA_ROOTS)"
                )
            roots.append(root)
        object.__setattr__(self, "data_roots", tuple(roots))
        for origin in self.allowed_origins:
            parts = urlsplit(origin.strip().rstrip("/"))
            if parts.scheme not in ("http", "https") or not parts.netloc or parts.path:
                # A browser sends scheme://host[:port]; anything else never matched, and
                # the pages it was meant for were refused with no hint at the cause.
                raise SettingsError(
                    f"--allow-origin {origin}: an origin is scheme://host[:port] as a browser "
                    "sends it, e.g. https://lab.example.org or http://10.0.0.5:8080"
                )
        if not (0 <= self.port <= 65535):
            raise SettingsError(f"port {self.port} is out of range 0-65535")
        if self.max_launched < 0:
            raise SettingsError(f"--max-launched must be >= 0, got {self.max_launched}")
        if self.log_level.lower() not in LOG_LEVELS:
            raise SettingsError(
                f"--log-level {self.log_level}: choose one of {', '.join(LOG_LEVELS)}"
            )
        if not is_loopback(self.host) and not (self.viewer_token and self.trainer_token):
            raise SettingsError(
                f"refusing to bind {self.host}: a non-loopback address is a control plane "
                "open to the network; set --token and --trainer-token "
                "(LAYERSCOPE_TOKEN, LAYERSCOPE_TRAINER_TOKEN)"
            )
        for name, flag, token in (
            ("viewer token", "--token, LAYERSCOPE_TOKEN", self.viewer_token),
            ("trainer token", "--trainer-token, LAYERSCOPE_TRAINER_TOKEN", self.trainer_token),
        ):
            if token and token != token.strip():
                raise SettingsError(
                    f"the {name} ({flag}) starts or ends with whitespace (a newline or a "
                    "carriage return read from a file?); tokens are compared exactly, so no "
                    "client would match it: remove it"
                )
            if token and len(token) < MIN_TOKEN_LENGTH:
                raise SettingsError(
                    f"the {name} ({flag}) is {len(token)} characters; a token needs at least "
                    f"{MIN_TOKEN_LENGTH}, make one with: {MAKE_TOKEN}"
                )
        if bool(self.viewer_token) != bool(self.trainer_token):
            one, other = (
                ("viewer_token", "trainer_token")
                if self.viewer_token
                else ("trainer_token", "viewer_token")
            )
            raise SettingsError(
                f"{one} is set but {other} is not: the server needs both tokens or neither "
                "(viewer_token: --token, LAYERSCOPE_TOKEN; trainer_token: --trainer-token, "
                "LAYERSCOPE_TRAINER_TOKEN), different from each other; with one alone every "
                "trainer would be refused"
            )
        if self.viewer_token and self.viewer_token == self.trainer_token:
            raise SettingsError(
                "the viewer token (--token) and the trainer token (--trainer-token) are the "
                "same; give them different values, or every browser could act as a trainer"
            )

    @classmethod
    def from_env(
        cls,
        *,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        data_dir: str | Path | None = None,
        viewer_token: str | None = None,
        trainer_token: str | None = None,
        allowed_origins: tuple[str, ...] = (),
        allowed_hosts: tuple[str, ...] = (),
        data_roots: tuple[str, ...] = (),
        max_launched: int | None = None,
        log_level: str = "warning",
    ) -> Settings:
        env = os.environ
        roots = data_roots or tuple(
            r for r in env.get("LAYERSCOPE_DATA_ROOTS", "").split(os.pathsep) if r
        )
        viewer_token = viewer_token or env.get("LAYERSCOPE_TOKEN") or None
        trainer_token = trainer_token or env.get("LAYERSCOPE_TRAINER_TOKEN") or None
        if is_loopback(host):  # off loopback, the bind refusal below names both tokens
            require_token_pair(viewer_token, trainer_token)
        return cls(
            host=host,
            port=port,
            data_dir=Path(data_dir or env.get("LAYERSCOPE_DATA_DIR") or "layerscope-data"),
            viewer_token=viewer_token,
            trainer_token=trainer_token,
            allowed_origins=allowed_origins,
            allowed_hosts=allowed_hosts
            or tuple(h for h in env.get("LAYERSCOPE_ALLOWED_HOSTS", "").split(",") if h),
            data_roots=tuple(Path(r) for r in roots),
            max_launched=max_launched if max_launched is not None else 6,
            log_level=log_level,
        )

    def with_port(self, port: int) -> Settings:
        return replace(self, port=port)
