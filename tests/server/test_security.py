"""DESIGN §7 as an attacker and a user meet it: Host and Origin checks, the viewer token
(cookie, header, query), the trainer token, and no token needed on plain loopback."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from layerscope.server.security import Denied, Guard
from layerscope.server.settings import Settings, SettingsError
from server_harness import FakeTrainer, LiveServer, make_settings, running_server
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

pytestmark = pytest.mark.anyio

VIEWER = "viewer-secret-0123456789"
TRAINER = "trainer-secret-0123456789"


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    settings = make_settings(
        tmp_path_factory.mktemp("guarded"),
        viewer_token=VIEWER,
        trainer_token=TRAINER,
        allowed_origins=("https://lab.example.org",),
    )
    with running_server(settings) as server:
        yield server


def viewer_cookie(server: LiveServer) -> str:
    """The Cookie header a browser sends after opening ``server`` with ``?token=``."""
    answer = httpx.get(f"{server}/api/runs?token={VIEWER}")
    return answer.headers["set-cookie"].split(";")[0]


async def refused(url: str, **kwargs: object) -> tuple[int, str]:
    """A websocket refused before accept: (HTTP status, reason body)."""
    with pytest.raises(InvalidStatus) as exc:
        async with connect(url, **kwargs):  # type: ignore[arg-type]
            pass
    response = exc.value.response
    return response.status_code, response.body.decode(errors="replace")


def test_a_wrong_host_header_is_refused(shared_server: LiveServer) -> None:
    # DNS rebinding: a page on evil.example resolves its name to 127.0.0.1.
    response = httpx.get(
        f"{shared_server}/api/runs", headers={"Host": f"evil.example:{shared_server.port}"}
    )
    assert response.status_code == 403
    assert "Host" in response.json()["detail"]
    wrong_port = httpx.get(f"{shared_server}/api/runs", headers={"Host": "127.0.0.1:1"})
    assert wrong_port.status_code == 403
    for host in (f"localhost:{shared_server.port}", f"127.0.0.1:{shared_server.port}"):
        assert httpx.get(f"{shared_server}/healthz", headers={"Host": host}).status_code == 200


def test_a_wrong_host_is_refused_on_websockets_too(shared_server: LiveServer) -> None:
    # By hand: a websocket handshake whose only Host header is the attacker's name.
    handshake = (
        "GET /ws/trainer HTTP/1.1\r\n"
        f"Host: evil.example:{shared_server.port}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", shared_server.port), timeout=10) as sock:
        sock.sendall(handshake.encode())
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 403")


async def test_a_foreign_origin_is_refused_before_accept(
    shared_server: LiveServer, run_id: str
) -> None:
    trainer = await FakeTrainer.connect(shared_server, run_id)
    status, body = await refused(
        shared_server.ws(f"/ws/runs/{run_id}"), origin="https://evil.example"
    )
    assert status == 403 and "Origin" in body
    status, _ = await refused(shared_server.ws("/ws/trainer"), origin="http://evil.example")
    assert status == 403
    # The dashboard's own origin and a non-browser client (no Origin) are fine.
    own = f"http://localhost:{shared_server.port}"
    async with connect(shared_server.ws(f"/ws/runs/{run_id}"), origin=own) as ws:  # type: ignore[arg-type]
        assert json.loads(await ws.recv())["type"] == "snapshot"
    await trainer.close()


def test_a_cross_origin_post_is_refused(shared_server: LiveServer) -> None:
    response = httpx.post(
        f"{shared_server}/api/runs", json={}, headers={"Origin": "https://evil.example"}
    )
    assert response.status_code == 403 and "Origin" in response.json()["detail"]


def test_the_viewer_token_is_required_and_accepted_three_ways(guarded: LiveServer) -> None:
    assert httpx.get(f"{guarded}/api/runs").status_code == 403
    assert (
        httpx.get(f"{guarded}/api/runs", headers={"Authorization": "Bearer wrong"}).status_code
        == 403
    )
    assert (
        httpx.get(f"{guarded}/api/runs", headers={"Authorization": f"Bearer {VIEWER}"}).status_code
        == 200
    )
    assert httpx.get(f"{guarded}/api/runs?token={VIEWER}").status_code == 200
    # The trainer token is not a viewer token.
    assert httpx.get(f"{guarded}/api/runs?token={TRAINER}").status_code == 403
    # The health probe carries no token.
    assert httpx.get(f"{guarded}/healthz").json()["ok"] is True


def test_a_token_page_load_sets_the_cookie_the_browser_then_uses(guarded: LiveServer) -> None:
    with httpx.Client() as browser:
        first = browser.get(f"{guarded}/api/runs?token={VIEWER}")
        assert first.status_code == 200
        cookie = first.headers["set-cookie"]
        assert cookie.startswith(f"layerscope_{guarded.port}=") and "HttpOnly" in cookie
        assert VIEWER not in cookie
        assert browser.get(f"{guarded}/api/runs").status_code == 200  # the cookie alone


async def test_trainer_and_viewer_tokens_do_not_open_each_others_sockets(
    guarded: LiveServer,
) -> None:
    status, body = await refused(guarded.ws("/ws/trainer"))
    assert status == 403 and "trainer token" in body
    status, _ = await refused(
        guarded.ws("/ws/trainer"), additional_headers={"Authorization": f"Bearer {VIEWER}"}
    )
    assert status == 403
    trainer = await FakeTrainer.connect(
        guarded, "guarded-run", headers={"Authorization": f"Bearer {TRAINER}"}
    )
    status, body = await refused(guarded.ws(f"/ws/runs/guarded-run?token={TRAINER}"))
    assert status == 403 and "viewer token" in body
    async with connect(guarded.ws(f"/ws/runs/guarded-run?token={VIEWER}")) as ws:
        assert json.loads(await ws.recv())["type"] == "snapshot"
    async with connect(
        guarded.ws("/ws/runs/guarded-run"), additional_headers={"Cookie": viewer_cookie(guarded)}
    ) as ws:
        assert json.loads(await ws.recv())["type"] == "snapshot"
    await trainer.close()


async def test_the_trainer_token_works_as_a_query_parameter(guarded: LiveServer) -> None:
    async with connect(guarded.ws(f"/ws/trainer?token={TRAINER}")) as ws:
        await ws.send(json.dumps({"type": "hello", "v": 1, "run_id": "by-query"}))
        assert json.loads(await ws.recv())["type"] == "welcome"


async def test_an_allowed_extra_origin_may_connect(guarded: LiveServer) -> None:
    async with connect(
        guarded.ws(f"/ws/runs/guarded-run?token={VIEWER}"),
        origin="https://lab.example.org",  # type: ignore[arg-type]
    ) as ws:
        assert json.loads(await ws.recv())["type"] in ("snapshot",)


def test_a_non_loopback_bind_without_tokens_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="--token"):
        Settings(host="0.0.0.0", data_dir=tmp_path)
    with pytest.raises(SettingsError):
        Settings(host="192.168.1.20", data_dir=tmp_path, viewer_token=VIEWER)
    Settings(host="0.0.0.0", data_dir=tmp_path, viewer_token=VIEWER, trainer_token=TRAINER)
    Settings(host="::1", data_dir=tmp_path)  # loopback: no token needed


def _handshake_status(server: LiveServer, host: str, origin: str | None = None) -> bytes:
    """A viewer-socket handshake written by hand, so its Host header is exactly ``host``."""
    handshake = (
        f"GET /ws/runs/none?token={VIEWER} HTTP/1.1\r\n"
        f"Host: {host}\r\n"
        + (f"Origin: {origin}\r\n" if origin else "")
        + "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(handshake.encode())
        answer = b""
        while b"\r\n" not in answer:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    return answer.split(b"\r\n", 1)[0]


def test_allowed_hosts_are_accepted_and_others_refused(tmp_path: Path) -> None:
    """--allow-host (LAYERSCOPE_ALLOWED_HOSTS) was never read: the compose service name
    was refused on a loopback bind, and any name at all was accepted on a wildcard one."""
    settings = make_settings(tmp_path / "data", allowed_hosts=("Dash.Example",))
    with running_server(settings) as server:
        port = server.port
        ok = httpx.get(f"{server}/api/runs", headers={"Host": f"dash.example:{port}"})
        assert ok.status_code == 200
        refused = httpx.get(f"{server}/api/runs", headers={"Host": f"evil.example:{port}"})
        assert refused.status_code == 403
        assert f"use http://127.0.0.1:{port}/" in refused.json()["detail"]  # loopback: say so
        # Origins on an allowed name are this server's own pages.
        origin = f"http://dash.example:{port}"
        posted = httpx.post(
            f"{server}/api/runs",
            json={"model": {"depth": 0}},
            headers={"Host": f"dash.example:{port}", "Origin": origin},
        )
        assert posted.status_code == 422  # past the checks, to the config's validation
        assert b" 101 " in _handshake_status(server, f"dash.example:{port}", origin)
        assert b" 403 " in _handshake_status(
            server, f"127.0.0.1:{port}", f"http://evil.example:{port}"
        )


def test_a_wildcard_bind_accepts_this_machines_names_not_any_name(tmp_path: Path) -> None:
    """Bound to 0.0.0.0 the Host check compared only the port: a page on evil.example
    that its owner pointed at this machine (DNS rebinding) passed everything but the token."""
    settings = make_settings(
        tmp_path / "data",
        host="0.0.0.0",
        viewer_token=VIEWER,
        trainer_token=TRAINER,
        allowed_hosts=("server",),
    )
    auth = {"Authorization": f"Bearer {VIEWER}"}
    with running_server(settings) as server:
        port = server.port
        for name in ("evil.example", "attacker.rebind.example"):
            response = httpx.get(f"{server}/api/runs", headers={**auth, "Host": f"{name}:{port}"})
            assert response.status_code == 403, name
            detail = response.json()["detail"]
            assert "127.0.0.1" not in detail and "--allow-host" in detail
            assert b" 403 " in _handshake_status(server, f"{name}:{port}", f"http://{name}:{port}")
        for name in ("127.0.0.1", "localhost", "server", socket.gethostname()):
            response = httpx.get(f"{server}/api/runs", headers={**auth, "Host": f"{name}:{port}"})
            assert response.status_code == 200, name
        assert b" 101 " in _handshake_status(server, f"server:{port}", f"http://server:{port}")


def test_a_refused_host_on_a_lan_address_is_not_sent_to_127_0_0_1(tmp_path: Path) -> None:
    guard = Guard(
        Settings(host="192.0.2.7", data_dir=tmp_path, viewer_token=VIEWER, trainer_token=TRAINER)
    )
    assert guard.check_host("192.0.2.7:8765") == "192.0.2.7:8765"
    with pytest.raises(Denied) as refused:
        guard.check_host("evil.example:8765")
    assert "use http://192.0.2.7:8765/" in str(refused.value)
    assert "127.0.0.1" not in str(refused.value)


def test_allowed_hosts_come_from_the_environment_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LAYERSCOPE_ALLOWED_HOSTS", "vm,dash.example")
    guard = Guard(Settings.from_env(data_dir=tmp_path))
    assert guard.check_host("dash.example:8765") == "dash.example:8765"
    with pytest.raises(Denied):
        guard.check_host("evil.example:8765")


def test_one_token_alone_or_the_same_token_twice_is_refused_at_startup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With only --token set, /ws/trainer needed nothing: a local process could take a live
    run's trainer socket and report it finished. Either token now needs the other."""
    monkeypatch.delenv("LAYERSCOPE_TOKEN", raising=False)
    monkeypatch.delenv("LAYERSCOPE_TRAINER_TOKEN", raising=False)
    with pytest.raises(SettingsError, match=r"needs a trainer token: set --trainer-token"):
        Settings.from_env(data_dir=tmp_path, viewer_token=VIEWER)
    with pytest.raises(SettingsError, match=r"needs a viewer token: set --token"):
        Settings.from_env(data_dir=tmp_path, trainer_token=TRAINER)
    monkeypatch.setenv("LAYERSCOPE_TOKEN", VIEWER)
    with pytest.raises(SettingsError, match="LAYERSCOPE_TRAINER_TOKEN"):
        Settings.from_env(data_dir=tmp_path)
    monkeypatch.setenv("LAYERSCOPE_TRAINER_TOKEN", VIEWER)
    with pytest.raises(SettingsError, match="are the same"):
        Settings.from_env(data_dir=tmp_path)
    with pytest.raises(SettingsError, match="are the same"):
        Settings(data_dir=tmp_path, viewer_token=VIEWER, trainer_token=VIEWER)
    monkeypatch.setenv("LAYERSCOPE_TRAINER_TOKEN", TRAINER)
    assert Settings.from_env(data_dir=tmp_path).trainer_token == TRAINER
    monkeypatch.delenv("LAYERSCOPE_TOKEN")
    monkeypatch.delenv("LAYERSCOPE_TRAINER_TOKEN")
    assert Settings.from_env(data_dir=tmp_path).viewer_token is None  # plain loopback


def test_the_cli_names_the_missing_token(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAYERSCOPE_")}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "layerscope.server",
            "serve",
            "--port",
            "0",
            "--token",
            VIEWER,
            "--data-dir",
            str(tmp_path / "data"),
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert out.returncode == 2
    assert "--trainer-token" in out.stderr
    assert not (tmp_path / "data").exists(), "nothing may be created when refusing to start"


def test_settings_built_by_a_program_refuse_one_token_alone(tmp_path: Path) -> None:
    """create_app(Settings(viewer_token=...)) (tests, an embedding program) started a server
    that refused every trainer and said why only to the trainer. Settings now refuses it
    itself, naming both settings and their flags and env variables."""
    for one in ({"viewer_token": VIEWER}, {"trainer_token": TRAINER}):
        with pytest.raises(ValueError, match="both tokens or neither") as refused_settings:
            Settings(data_dir=tmp_path, **one)  # type: ignore[arg-type]
        message = str(refused_settings.value)
        for name in ("viewer_token", "trainer_token", "--token", "--trainer-token",
                     "LAYERSCOPE_TOKEN", "LAYERSCOPE_TRAINER_TOKEN"):  # fmt: skip
            assert name in message
    with pytest.raises(SettingsError, match="both tokens or neither"):
        make_settings(tmp_path / "data", viewer_token=VIEWER)
    both = Settings(data_dir=tmp_path, viewer_token=VIEWER, trainer_token=TRAINER)
    with pytest.raises(SettingsError, match="both tokens or neither"):
        dataclasses.replace(both, trainer_token=None)


def test_a_token_page_load_is_redirected_to_the_page_without_the_token(guarded: LiveServer) -> None:
    """The token stayed in the address bar (and the history, and any link copied from it)
    after the cookie had taken over."""
    answer = httpx.get(f"{guarded}/runs/some-run?after=3&token={VIEWER}&x=%2F")
    assert answer.status_code == 303
    assert answer.headers["location"] == "/runs/some-run?after=3&x=%2F"
    assert answer.headers["set-cookie"].startswith(f"layerscope_{guarded.port}=")
    assert httpx.get(f"{guarded}/?token={VIEWER}").headers["location"] == "/"
    with httpx.Client(follow_redirects=True) as browser:
        page = browser.get(f"{guarded}/?token={VIEWER}")
        assert page.status_code == 200 and str(page.url) == f"{guarded}/"
        assert "<html" in page.text.lower()
    # REST clients keep their answer (a script need not follow a redirect).
    assert httpx.get(f"{guarded}/api/runs?token={VIEWER}").status_code == 200
    assert httpx.get(f"{guarded}/?token=wrong").status_code == 403


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


async def test_tokens_never_reach_the_server_log(tmp_path: Path) -> None:
    """With --log-level info, uvicorn logged 'GET /?token=<viewer token>' and
    'WebSocket /ws/trainer?token=<trainer token>' as they came."""
    settings = make_settings(
        tmp_path / "data", viewer_token=VIEWER, trainer_token=TRAINER, log_level="info"
    )
    lines = Lines()
    loggers = [logging.getLogger(name) for name in ("uvicorn.access", "uvicorn.error")]
    try:
        with running_server(settings) as server:
            for logger in loggers:  # after uvicorn's logging setup, which drops handlers
                logger.addHandler(lines)
            async with httpx.AsyncClient() as client:
                await client.get(f"{server}/?token={VIEWER}")
                await client.get(f"{server}/api/runs?x=1&token={VIEWER}")
                await client.get(f"{server}/api/runs?token=wrong-guess")
                # The server reads %74oken as token; the log masked only a literal token=.
                await client.get(f"{server}/api/runs?%74oken={VIEWER}&x=2")
                await client.get(f"{server}/api/runs?a=1&%74%6F%6B%65%6E=wrong-guess-2")
            async with connect(server.ws(f"/ws/trainer?token={TRAINER}")) as ws:
                await ws.send(json.dumps({"type": "hello", "v": 1, "run_id": "logged"}))
                assert json.loads(await ws.recv())["type"] == "welcome"
            await refused(server.ws("/ws/trainer?token=wrong-guess"))
    finally:
        for logger in loggers:
            logger.removeHandler(lines)
    text = "\n".join(lines.lines)
    assert "/api/runs?x=1&token=***" in text and "/ws/trainer?token=***" in text, text
    assert "/api/runs?%74oken=***&x=2" in text, text
    for secret in (VIEWER, TRAINER, "wrong-guess", "wrong-guess-2"):
        assert secret not in text


def _raw_answer(port: int, request: bytes, body: bytes = b"") -> tuple[int, dict[str, str]]:
    """Send ``request`` (and ``body``) on a fresh connection; the status and headers of the
    answer, read without sending anything more."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request + body)
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    head = answer.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    headers = {}
    for line in head[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(head[0].split()[1]), headers


FRAMING = {
    "x-frame-options": "DENY",
    "content-security-policy": "frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}


def test_no_answer_may_be_framed_or_leak_a_referrer(guarded: LiveServer) -> None:
    """Clickjacking: a page on another port of the host framed the dashboard, invisible,
    and the user's click landed on Pause. Every answer now forbids framing, sniffing and
    the Referer (which carried a ?token= address to whatever the page linked to)."""
    auth = {"Authorization": f"Bearer {VIEWER}"}
    answers = [
        httpx.get(f"{guarded}/", headers=auth),  # a page
        httpx.get(f"{guarded}/runs/nothing-here", headers=auth),  # the 404 page
        httpx.get(f"{guarded}/api/runs", headers=auth),  # the API
        httpx.get(f"{guarded}/api/runs"),  # a refusal
        httpx.get(f"{guarded}/?token={VIEWER}"),  # the token page load's redirect
        httpx.get(f"{guarded}/static/js/socket.js", headers=auth),
    ]
    assert [a.status_code for a in answers] == [200, 404, 200, 403, 303, 200]
    for answer in answers:
        for name, value in FRAMING.items():
            assert answer.headers.get(name) == value, (answer.request.url, name)


def test_the_viewer_cookie_is_this_servers_own_and_not_the_token(
    guarded: LiveServer, tmp_path: Path
) -> None:
    """The cookie held the raw token under one name for every server on the host: browsers
    send a host's cookies to every port, so any other service on 127.0.0.1 received the
    token, and two servers overwrote each other's cookie. Now it is named for the port and
    holds an HMAC of the token that only the server that set it accepts."""
    name, _, value = viewer_cookie(guarded).partition("=")
    assert name == f"layerscope_{guarded.port}" and VIEWER not in value and len(value) == 64
    ok = {"Cookie": f"{name}={value}"}
    assert httpx.get(f"{guarded}/api/runs", headers=ok).status_code == 200
    tampered = value[:-1] + ("1" if value[-1] == "0" else "0")  # never the value itself
    for cookie in (f"{name}={VIEWER}", f"layerscope_token={VIEWER}", f"{name}={tampered}"):
        assert httpx.get(f"{guarded}/api/runs", headers={"Cookie": cookie}).status_code == 403
    key = guarded.data_dir / "cookie.key"
    assert key.stat().st_mode & 0o077 == 0
    other_settings = make_settings(tmp_path / "other", viewer_token=VIEWER, trainer_token=TRAINER)
    with running_server(other_settings) as other:
        other_name, _, other_value = viewer_cookie(other).partition("=")
        assert other_name != name and other_value != value  # two servers, two cookies
        for cookie in (f"{name}={value}", f"{other_name}={value}"):
            assert httpx.get(f"{other}/api/runs", headers={"Cookie": cookie}).status_code == 403
        assert (
            httpx.get(
                f"{other}/api/runs", headers={"Cookie": f"{other_name}={other_value}"}
            ).status_code
            == 200
        )
    # A restart (same data dir and port) keeps the browsers' cookies valid.
    again = Guard(dataclasses.replace(guarded.settings))
    assert again.cookie_value() == value


def test_bodies_over_the_limit_are_refused_before_they_are_read(shared_server: LiveServer) -> None:
    """A 100 MB JSON body to POST /api/runs took the server from 62 MiB to 655 MiB. A body
    over MAX_BODY_BYTES is refused with 413: at once when its Content-Length says so (the
    body is never sent here), and as it passes the limit when it is chunked."""
    port = shared_server.port
    for path in ("/api/runs", "/api/labs/init", "/api/runs/x/commands"):
        head = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {100 * 1024 * 1024}\r\n\r\n"
        )
        status, _ = _raw_answer(port, head.encode())
        assert status == 413, path
    chunk = b"0" * (256 * 1024)
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(5))  # 1.25 MiB, unended
    head = (
        f"POST /api/runs HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    status, _ = _raw_answer(port, head.encode(), chunked)
    assert status == 413
    answer = httpx.post(f"{shared_server}/api/runs", content=b"0" * (2 * 1024 * 1024))
    assert answer.status_code == 413 and "limit is 1048576 bytes" in answer.json()["detail"]
    # A body within the limit reaches the route, chunked or not.
    assert httpx.post(f"{shared_server}/api/runs", json={"model": 1}).status_code == 422
    streamed = httpx.post(
        f"{shared_server}/api/runs", content=iter([b'{"model":', b" 1}"]),
        headers={"content-type": "application/json"},
    )  # fmt: skip
    assert streamed.status_code == 422 and "model" in streamed.text


def test_the_token_redirect_stays_on_this_server(guarded: LiveServer) -> None:
    """``GET //evil.example/x?token=T`` answered 303 to ``//evil.example/x``, which a browser
    reads as another host (so does ``/\\evil.example``): an open redirect."""
    for target, expected in (
        ("//evil.example/x", "/evil.example/x"),
        ("/\\evil.example", "/evil.example"),
        ("/\\/evil.example", "/evil.example"),
        ("///evil.example", "/evil.example"),
        ("/runs/a//b", "/runs/a//b"),
    ):
        request = (
            f"GET {target}?token={VIEWER}&x=1 HTTP/1.1\r\nHost: 127.0.0.1:{guarded.port}\r\n"
            "Connection: close\r\n\r\n"
        )
        status, headers = _raw_answer(guarded.port, request.encode())
        assert status == 303 and headers["location"] == f"{expected}?x=1", (target, headers)


def test_short_tokens_are_refused_with_how_to_make_one(tmp_path: Path) -> None:
    """A one-character token was accepted."""
    for short in ("v", "fifteen-chars-x"):
        with pytest.raises(SettingsError, match="at least 16") as refusal:
            Settings(data_dir=tmp_path, viewer_token=short, trainer_token=TRAINER)
        assert 'python -c "import secrets; print(secrets.token_urlsafe(24))"' in str(refusal.value)
        with pytest.raises(SettingsError, match=r"trainer token .* at least 16"):
            Settings(data_dir=tmp_path, viewer_token=VIEWER, trainer_token=short)
    Settings(data_dir=tmp_path, viewer_token="sixteen-chars-xx", trainer_token=TRAINER)
