"""What ships: the wheel carries the pages, and the container files agree with the CLI."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from layerscope.server.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_contains_templates_and_static_files(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(ROOT),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],
        check=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("layerscope-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {
        "layerscope/" + str(p.relative_to(ROOT))
        for p in (ROOT / "web").rglob("*")
        if p.is_file() and p.suffix in {".html", ".js", ".css", ".png"}
    }
    assert any(n.endswith(".html") for n in shipped), "no templates in web/"
    assert any(n.endswith(".js") for n in shipped), "no scripts in web/static/js"
    assert shipped <= names, f"missing from the wheel: {sorted(shipped - names)}"
    assert "layerscope/trainer/wire.py" in names
    assert "layerscope/server/app.py" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert (
        "layerscope = layerscope.server.cli:main"
        in zipfile.ZipFile(wheel).read(entry_points).decode()
    )


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_server_command_matches_the_cli() -> None:
    server = _compose()["services"]["server"]
    cmd = server["command"]
    assert cmd[:2] == ["layerscope", "serve"]
    args = build_parser().parse_args(cmd[1:])  # raises SystemExit on an unknown flag
    assert args.host == "0.0.0.0"
    published = server["ports"][0]
    assert published.startswith("127.0.0.1:"), "publish on loopback only"
    assert published.rsplit(":", 1)[1] == str(args.port)
    assert f":{args.port}/healthz" in " ".join(server["healthcheck"]["test"])
    mounts = {v.split(":")[1] for v in server["volumes"]}
    assert args.data_dir in mounts, "data dir must live on the named volume"
    assert {"LAYERSCOPE_TOKEN", "LAYERSCOPE_TRAINER_TOKEN"} <= set(server["environment"])


def test_compose_trainers_wait_for_a_healthy_server_and_gpu_profile_reserves_a_device() -> None:
    services = _compose()["services"]
    for name in ("trainer", "trainer-gpu"):
        svc = services[name]
        assert svc["depends_on"]["server"]["condition"] == "service_healthy"
        assert svc["command"][:2] == ["layerscope", "train"]
        url = svc["command"][svc["command"].index("--server") + 1]
        assert url == "ws://server:8765/ws/trainer"
        assert "LAYERSCOPE_TRAINER_TOKEN" in svc["environment"]
    gpu = services["trainer-gpu"]
    assert gpu["profiles"] == ["gpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"]
    assert "--allow-host" in services["server"]["command"]


def test_compose_commands_exist() -> None:
    for name, svc in _compose()["services"].items():
        cmd = svc["command"]
        out = subprocess.run(
            [sys.executable, "-m", "layerscope.server", cmd[1], "--help"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, f"{name}: `{' '.join(cmd[:2])} --help` failed: {out.stderr}"
        for flag in [a for a in cmd[2:] if a.startswith("--")]:
            assert flag in out.stdout, f"{name}: {flag} is not an option of `{cmd[1]}`"


def test_dockerfile_installs_like_the_readme() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "pip install torch==2.13.0" in dockerfile and "pip install torch==2.13.0" in readme
    assert re.search(r"pip install \.\s*$", dockerfile, re.M)
    assert "EXPOSE 8765" in dockerfile


def test_every_compose_volume_mount_exists_in_the_image_owned_by_its_user() -> None:
    """A named volume mounted where the image has no folder is created owned by root, and
    the compose trainers (user layerscope) could not write their run folder there."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    dockerfile = (ROOT / "Dockerfile").read_text()
    mounts = {
        volume.split(":")[1]
        for service in compose["services"].values()
        for volume in service.get("volumes", [])
        if isinstance(volume, str) and not volume.startswith((".", "/"))
    }
    assert mounts, "the compose file mounts named volumes"
    chowned = " ".join(
        line for line in dockerfile.splitlines() if "chown" in line or "mkdir" in line
    )
    for mount in mounts:
        assert mount in dockerfile and mount in chowned, f"{mount} is not made in the image"
