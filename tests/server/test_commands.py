"""The control relay end to end: a viewer's (or script's) command reaches the trainer once,
with one cmd_seq, is logged with its origin, is refused with a reason when it cannot take
effect, and its result comes back to every viewer."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from server_harness import (
    FakeTrainer,
    LiveServer,
    event_frame,
    make_settings,
    open_viewer,
    recv_until,
    running_server,
    wait_detached,
    wait_status,
)

pytestmark = pytest.mark.anyio


def commands_of(server: str, run_id: str) -> list[dict[str, object]]:
    response = httpx.get(f"{server}/api/runs/{run_id}/commands")
    response.raise_for_status()
    rows: list[dict[str, object]] = response.json()
    return rows


async def test_a_viewer_command_reaches_the_trainer_once_and_its_result_reaches_every_viewer(
    shared_server: LiveServer, run_id: str
) -> None:
    trainer = await FakeTrainer.connect(shared_server, run_id)
    viewer, _ = await open_viewer(shared_server, run_id)
    other, _ = await open_viewer(shared_server, run_id)
    command = {"type": "command", "id": "c-1", "name": "set_lr_scale", "args": {"value": 0.5}}
    await viewer.send(json.dumps(command))
    reply = (await recv_until(viewer, lambda m: m["type"] == "command_result"))[-1]
    assert reply["ok"] is True and reply["pending"] is True
    assert reply["id"] == "c-1" and reply["cmd_seq"] == 1
    await viewer.send(json.dumps(command))  # the same id again: a retry after a flaky network
    again = (await recv_until(viewer, lambda m: m["type"] == "command_result"))[-1]
    assert again["ok"] is True and again["cmd_seq"] == 1 and again["duplicate"] is True

    relayed = await trainer.wait_for(lambda m: m["type"] == "command")
    assert relayed == {
        "v": 1,
        "type": "command",
        "id": "c-1",
        "cmd_seq": 1,
        "name": "set_lr_scale",
        "args": {"value": 0.5},
        "source": "user",
    }
    state = {
        "paused": False,
        "lr_scale": 0.5,
        "weight_decay_enabled": True,
        "frozen": [],
        "stopping": False,
    }
    result = {
        "id": "c-1",
        "cmd_seq": 1,
        "name": "set_lr_scale",
        "ok": True,
        "applied_at_step": 7,
        "state": state,
    }
    await trainer.send(event_frame(1, 7, "command_result", **result))
    await trainer.wait_acked(1)
    for ws in (viewer, other):
        got = await recv_until(ws, lambda m: m["type"] == "event" and m["kind"] == "command_result")
        assert got[-1]["data"] == result
    assert [m["id"] for m in trainer.commands] == ["c-1"]  # one command frame, one cmd_seq

    rows = commands_of(shared_server, run_id)
    assert len(rows) == 1
    assert rows[0]["status"] == "applied" and rows[0]["applied_at_step"] == 7
    assert str(rows[0]["origin"]).startswith("viewer 127.0.0.1:")
    await viewer.close()
    await other.close()
    await trainer.close()


async def test_the_rest_endpoint_relays_with_the_same_rules(
    shared_server: LiveServer, run_id: str
) -> None:
    trainer = await FakeTrainer.connect(shared_server, run_id)
    url = f"{shared_server}/api/runs/{run_id}/commands"
    first = httpx.post(
        url, json={"id": "c-9", "name": "set_weight_decay", "args": {"enabled": False}}
    )
    assert first.status_code == 202
    assert first.json() == {"id": "c-9", "cmd_seq": 1, "duplicate": False}
    repeat = httpx.post(
        url, json={"id": "c-9", "name": "set_weight_decay", "args": {"enabled": False}}
    )
    assert repeat.status_code == 202 and repeat.json()["duplicate"] is True
    second = httpx.post(url, json={"name": "pause"})
    assert second.status_code == 202 and second.json()["cmd_seq"] == 2
    await trainer.wait_for(lambda m: m["type"] == "command" and m["cmd_seq"] == 2)
    assert [(m["cmd_seq"], m["name"], m["source"]) for m in trainer.commands] == [
        (1, "set_weight_decay", "api"),
        (2, "pause", "api"),
    ]
    rows = commands_of(shared_server, run_id)
    assert all(str(r["origin"]).startswith("api 127.0.0.1") for r in rows)
    # Every command is in the run's event log too.
    events = httpx.get(f"{shared_server}/api/runs/{run_id}/events").json()
    assert sum(1 for e in events if e["kind"] == "command") == 2
    await trainer.close()


async def test_commands_are_refused_without_a_trainer(
    shared_server: LiveServer, run_id: str
) -> None:
    trainer = await FakeTrainer.connect(shared_server, run_id)
    await trainer.close()
    await wait_detached(shared_server, run_id)  # else the command may reach the closing link
    viewer, _ = await open_viewer(shared_server, run_id)
    await viewer.send(json.dumps({"type": "command", "id": "c-2", "name": "pause"}))
    reply = (await recv_until(viewer, lambda m: m["type"] == "command_result"))[-1]
    assert reply == {
        "v": 1,
        "type": "command_result",
        "id": "c-2",
        "ok": False,
        "reason": "no trainer connected",
    }
    response = httpx.post(f"{shared_server}/api/runs/{run_id}/commands", json={"name": "pause"})
    assert response.status_code == 409 and response.json()["detail"] == "no trainer connected"
    assert commands_of(shared_server, run_id) == []
    await viewer.close()


async def test_a_repeated_command_is_answered_as_stored_while_the_trainer_is_away(
    shared_server: LiveServer, run_id: str
) -> None:
    """A page resends its pending commands after its socket drops; a repeat of one the
    server stored is answered as that command (a duplicate, still pending), not refused
    for want of a trainer: the stored copy reaches the trainer when it comes back."""
    trainer = await FakeTrainer.connect(shared_server, run_id)
    viewer, _ = await open_viewer(shared_server, run_id)
    cmd = {
        "type": "command",
        "id": "c-kept",
        "name": "set_weight_decay",
        "args": {"enabled": False},
    }
    await viewer.send(json.dumps(cmd))
    first = (await recv_until(viewer, lambda m: m["type"] == "command_result"))[-1]
    assert first["ok"] is True and first["duplicate"] is False
    await viewer.close()
    await trainer.close()
    await wait_detached(shared_server, run_id)
    again, _ = await open_viewer(shared_server, run_id)
    await again.send(json.dumps(cmd))
    reply = (await recv_until(again, lambda m: m["type"] == "command_result"))[-1]
    assert (
        reply["ok"] is True and reply["duplicate"] is True and reply["cmd_seq"] == first["cmd_seq"]
    )
    await again.send(json.dumps({**cmd, "id": "c-new"}))  # a new one is still refused
    refused = (await recv_until(again, lambda m: m["type"] == "command_result"))[-1]
    assert refused["ok"] is False and refused["reason"] == "no trainer connected"
    assert [(r["id"], r["status"]) for r in commands_of(shared_server, run_id)] == [
        ("c-kept", "pending")
    ]
    await again.close()


async def test_a_command_id_reused_for_another_command_is_refused(
    shared_server: LiveServer, run_id: str
) -> None:
    """An id sent again with another name or args was answered ok+duplicate while the new
    command was dropped: the page showed a command that would never be applied."""
    trainer = await FakeTrainer.connect(shared_server, run_id)
    url = f"{shared_server}/api/runs/{run_id}/commands"
    first = httpx.post(url, json={"id": "c-used", "name": "set_lr_scale", "args": {"value": 0.5}})
    assert first.status_code == 202
    for other in ({"name": "pause"}, {"name": "set_lr_scale", "args": {"value": 0.25}}):
        reused = httpx.post(url, json={"id": "c-used", **other})
        assert reused.status_code == 409
        assert "command id 'c-used' is already used by another command" in reused.json()["detail"]
    viewer, _ = await open_viewer(shared_server, run_id)
    await viewer.send(json.dumps({"type": "command", "id": "c-used", "name": "resume"}))
    reply = (await recv_until(viewer, lambda m: m["type"] == "command_result"))[-1]
    assert reply["ok"] is False and reply["id"] == "c-used"
    assert "already used by another command (set_lr_scale" in reply["reason"]
    # The same command again stays a harmless duplicate, on either path.
    again = {"id": "c-used", "name": "set_lr_scale", "args": {"value": 0.5}}
    assert httpx.post(url, json=again).json()["duplicate"] is True
    await viewer.send(json.dumps({"type": "command", **again}))
    reply = (await recv_until(viewer, lambda m: m["type"] == "command_result"))[-1]
    assert reply["ok"] is True and reply["duplicate"] is True
    rows = commands_of(shared_server, run_id)
    assert [(r["id"], r["name"], r["args"]) for r in rows] == [
        ("c-used", "set_lr_scale", {"value": 0.5})
    ]
    await trainer.wait_for(lambda m: m["type"] == "command")
    assert [m["id"] for m in trainer.commands] == ["c-used"]  # what arrived, in order
    await viewer.close()
    await trainer.close()


async def test_commands_are_refused_once_the_run_has_finished(
    shared_server: LiveServer, run_id: str
) -> None:
    trainer = await FakeTrainer.connect(shared_server, run_id)
    await trainer.send(event_frame(1, 100, "status", status="finished"))
    await trainer.wait_acked(1)
    viewer, _ = await open_viewer(shared_server, run_id)
    await viewer.send(json.dumps({"type": "command", "name": "resume"}))
    reply = (await recv_until(viewer, lambda m: m["type"] == "command_result"))[-1]
    assert reply["ok"] is False and reply["reason"] == "run finished"
    response = httpx.post(f"{shared_server}/api/runs/{run_id}/commands", json={"name": "resume"})
    assert response.status_code == 409 and response.json()["detail"] == "run finished"
    assert trainer.commands == []
    await viewer.close()
    await trainer.close()


@pytest.mark.parametrize(
    ("command", "named"),
    [
        ({"name": "self_destruct"}, "unknown command 'self_destruct'"),
        ({"name": "set_lr_scale", "args": {"value": -1}}, "set_lr_scale needs args.value"),
        ({"name": "set_lr_scale", "args": {"value": "half"}}, "must be a number"),
        ({"name": "set_frozen", "args": {"layers": [], "frozen": True}}, "non-empty list"),
        ({"name": "pause", "id": "x" * 100}, "at most 64 characters"),
        # A client claiming to be a rule: the event log showed it as an automatic action.
        (
            {
                "name": "set_weight_decay",
                "args": {"enabled": False},
                "source": "rule",
                "reason": "DeadUnits fired (not really)",
            },
            "source 'rule' is the trainer's own",
        ),  # fmt: skip
    ],
)
async def test_bad_commands_are_refused_with_the_reason(
    shared_server: LiveServer, run_id: str, command: dict[str, object], named: str
) -> None:
    trainer = await FakeTrainer.connect(shared_server, run_id)
    viewer, _ = await open_viewer(shared_server, run_id)
    await viewer.send(json.dumps({"type": "command", **command}))
    reply = (await recv_until(viewer, lambda m: m["type"] == "command_result"))[-1]
    assert reply["ok"] is False and named in reply["reason"]
    response = httpx.post(f"{shared_server}/api/runs/{run_id}/commands", json=command)
    assert response.status_code == 422 and named in response.json()["detail"]
    assert trainer.commands == [] and commands_of(shared_server, run_id) == []
    await viewer.close()
    await trainer.close()


async def test_a_refusal_quoting_a_huge_field_is_cut_and_a_huge_id_not_echoed(
    shared_server: LiveServer, run_id: str
) -> None:
    # Each reply below was as big as the field it quoted (half a megabyte).
    trainer = await FakeTrainer.connect(shared_server, run_id)
    viewer, _ = await open_viewer(shared_server, run_id)
    huge = "x" * 500_000
    for command, named in (
        ({"id": "c-1", "name": huge}, "unknown command 'xx"),
        ({"id": "c-2", "name": "pause", "source": huge}, "unknown command source 'xx"),
    ):
        await viewer.send(json.dumps({"type": "command", **command}))
        reply = (await recv_until(viewer, lambda m: m["type"] == "command_result"))[-1]
        assert reply["ok"] is False and reply["id"] == command["id"]
        assert reply["reason"].startswith(named) and "characters cut" in reply["reason"]
        assert len(reply["reason"]) < 2100
        response = httpx.post(f"{shared_server}/api/runs/{run_id}/commands", json=command)
        detail = response.json()["detail"]
        assert response.status_code == 422 and detail.startswith(named) and len(detail) < 2100
    response = httpx.post(f"{shared_server}/api/runs/{run_id}/commands", json=huge)
    assert response.status_code == 422 and len(response.text) < 200  # a body, not an object
    await viewer.send(json.dumps({"type": "command", "id": huge, "name": "pause"}))
    reply = (await recv_until(viewer, lambda m: m["type"] == "command_result"))[-1]
    assert reply["ok"] is False and reply["id"] is None and "at most 64" in reply["reason"]
    assert trainer.commands == [] and commands_of(shared_server, run_id) == []
    await viewer.close()
    await trainer.close()


async def test_a_command_too_big_for_its_result_to_round_trip_is_refused_up_front(
    shared_server: LiveServer, run_id: str
) -> None:
    """set_frozen naming 2,048 bogus layers of 256 characters (530 KB, inside the body, layer
    and name limits) was relayed (202); its trainer's command_result echoing them was then
    over the 64 KiB event limit, refused by the server, and the run's acks stopped there.
    Refused before it is stored: 422, and ok:false on the viewer socket, naming the bound."""
    trainer = await FakeTrainer.connect(shared_server, run_id)
    viewer, _ = await open_viewer(shared_server, run_id)
    names = [f"{k:04d}" + "x" * 252 for k in range(2048)]
    command = {"id": "big-1", "name": "set_frozen", "args": {"layers": names, "frozen": True}}
    response = httpx.post(f"{shared_server}/api/runs/{run_id}/commands", json=command)
    detail = response.json()["detail"]
    assert response.status_code == 422, detail
    assert detail.startswith("set_frozen args are 532,508 characters as JSON (2,048 layer names)")
    assert "a command's args are at most 16,384" in detail
    assert detail.endswith(
        "name fewer layers (a parent module's name freezes every layer inside it)"
    )
    await viewer.send(json.dumps({"type": "command", **command}))
    reply = (await recv_until(viewer, lambda m: m["type"] == "command_result"))[-1]
    assert reply == {"v": 1, "type": "command_result", "id": "big-1", "ok": False, "reason": detail}
    # Just under the bound: relayed.
    fits = {"name": "set_frozen", "args": {"layers": names[:60], "frozen": True}}
    response = httpx.post(f"{shared_server}/api/runs/{run_id}/commands", json=fits)
    assert response.status_code == 202, response.text
    await trainer.wait_for(lambda m: m["type"] == "command")
    assert [len(m["args"]["layers"]) for m in trainer.commands] == [60]
    assert [r["args"] for r in commands_of(shared_server, run_id)] == [fits["args"]]
    await viewer.close()
    await trainer.close()


async def test_a_command_for_an_unknown_run_is_404(shared_server: LiveServer) -> None:
    response = httpx.post(f"{shared_server}/api/runs/no-such-run/commands", json={"name": "pause"})
    assert response.status_code == 404
    assert response.json()["detail"] == "run 'no-such-run' not found"


async def test_commands_not_yet_seen_are_resent_when_the_trainer_reconnects(
    shared_server: LiveServer, run_id: str
) -> None:
    trainer = await FakeTrainer.connect(shared_server, run_id)
    url = f"{shared_server}/api/runs/{run_id}/commands"
    for name in ("pause", "step_once", "resume"):
        assert httpx.post(url, json={"name": name}).status_code == 202
    await trainer.wait_for(lambda m: m["type"] == "command" and m["cmd_seq"] == 3)
    await trainer.close()
    # The trainer applied cmd_seq 1 before the connection dropped; 2 and 3 come again.
    trainer = await FakeTrainer.connect(shared_server, run_id, last_cmd_seq=1)
    await trainer.wait_for(lambda m: m["type"] == "command" and m["cmd_seq"] == 3)
    assert [(m["cmd_seq"], m["name"]) for m in trainer.commands] == [
        (2, "step_once"),
        (3, "resume"),
    ]
    await trainer.close()


async def test_a_rule_made_command_is_listed_with_origin_trainer(live_server: LiveServer) -> None:
    """command_result events for commands the trainer made itself get a commands row."""
    trainer = await FakeTrainer.connect(live_server, "rule-run")
    state = {
        "paused": False,
        "lr_scale": 0.5,
        "weight_decay_enabled": True,
        "frozen": [],
        "stopping": False,
    }
    result = {
        "id": "r-1",
        "cmd_seq": None,
        "name": "set_lr_scale",
        "args": {"value": 0.5},
        "ok": True,
        "applied_at_step": 40,
        "state": state,
        "source": "rule",
        "reason": "val loss plateau",
    }
    await trainer.send(event_frame(1, 40, "command_result", **result))
    await trainer.send(event_frame(2, 40, "command_result", **result))  # a repeat adds nothing
    await trainer.wait_acked(2)
    rows = httpx.get(f"{live_server}/api/runs/rule-run/commands").json()
    assert len(rows) == 1
    row = rows[0]
    assert (row["id"], row["name"], row["source"], row["origin"]) == (
        "r-1",
        "set_lr_scale",
        "rule",
        "trainer",
    )
    assert (row["status"], row["applied_at_step"], row["reason"]) == (
        "applied",
        40,
        "val loss plateau",
    )
    assert row["args"] == {"value": 0.5} and row["state"] == state
    await trainer.close()


async def test_a_command_pending_when_the_run_finishes_is_settled_as_never_applied(
    shared_server: LiveServer, run_id: str
) -> None:
    """A command relayed to a trainer that ended without applying it (a finished run, or a
    `layerscope sync` upload that nothing applies commands on) stayed "pending" forever in
    GET /commands; it is failed, with why, and the run's log says so."""
    trainer = await FakeTrainer.connect(shared_server, run_id)
    url = f"{shared_server}/api/runs/{run_id}/commands"
    assert httpx.post(url, json={"id": "c-late", "name": "pause"}).status_code == 202
    state = {
        "paused": False,
        "lr_scale": 0.5,
        "weight_decay_enabled": True,
        "frozen": [],
        "stopping": False,
    }
    assert (
        httpx.post(
            url, json={"id": "c-done", "name": "set_lr_scale", "args": {"value": 0.5}}
        ).status_code
        == 202
    )
    await trainer.send(
        event_frame(
            1,
            9,
            "command_result",
            id="c-done",
            cmd_seq=2,
            name="set_lr_scale",
            ok=True,
            applied_at_step=9,
            state=state,
        )
    )
    await trainer.send(event_frame(2, 10, "status", status="finished"))
    await trainer.wait_acked(2)
    rows = {r["id"]: r for r in commands_of(shared_server, run_id)}
    assert (rows["c-late"]["status"], rows["c-late"]["error"]) == (
        "failed",
        "the run ended before its trainer applied it",
    )
    assert rows["c-late"]["applied_at_step"] is None
    assert (rows["c-done"]["status"], rows["c-done"]["applied_at_step"]) == (
        "applied",
        9,
    )  # left as it was
    events = httpx.get(
        f"{shared_server}/api/runs/{run_id}/events", params={"kind": "command_result"}
    ).json()
    settled = [e for e in events if e["origin"] == "server"]
    assert [(e["data"]["id"], e["data"]["ok"], e["data"]["error"]) for e in settled] == [
        ("c-late", False, "the run ended before its trainer applied it")
    ]
    await trainer.close()


async def test_a_lost_runs_pending_command_is_settled_and_not_sent_when_its_trainer_returns(
    tmp_path: Path,
) -> None:
    """A run lost with a command pending: the command is failed (never applied), and the
    trainer that reconnects later is not sent it (a pause the page was told failed would
    otherwise pause the run minutes later)."""
    # Each trainer heartbeats on this loop until its command is in (a busy machine lost it
    # first), so nothing may block the loop meanwhile: the client is made (~0.1 s of SSL set-up,
    # more under load) before either connects, and posts without blocking. A blocking
    # httpx.post after the second hello took 0.5 s in about 3% of tries beside busy loops,
    # long enough for the server to lose the returning trainer before it (409).
    async with httpx.AsyncClient(timeout=30) as client:
        with running_server(make_settings(tmp_path, heartbeat_timeout_s=0.5)) as server:
            trainer = await FakeTrainer.connect(server, "r1", instance="proc1")
            trainer.heartbeat(0.1)
            url = f"{server}/api/runs/r1/commands"
            assert (
                await client.post(url, json={"id": "c-lost", "name": "pause"})
            ).status_code == 202
            await trainer.wait_for(lambda m: m["type"] == "command")
            assert trainer._beat is not None
            trainer._beat.cancel()
            await wait_status(server, "r1", "lost", timeout=10)  # silent: no heartbeats
            rows = commands_of(server, "r1")
            assert [(r["id"], r["status"], r["error"]) for r in rows] == [
                ("c-lost", "failed", "the run ended before its trainer applied it")
            ]
            await trainer.ws.close()
            back = await FakeTrainer.connect(server, "r1", instance="proc1")
            back.heartbeat(0.1)
            assert (
                await client.post(url, json={"id": "c-next", "name": "resume"})
            ).status_code == 202
            await back.wait_for(lambda m: m["type"] == "command")
            assert [m["id"] for m in back.commands] == ["c-next"]
            await back.close()
