"""The architecture's boundaries (DESIGN §2): server never imports torch, trainer never
imports server, and wire.py — the one shared module — needs only the standard library."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules_loaded_by(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_importing_every_server_module_does_not_import_torch() -> None:
    names = sorted(p.stem for p in (ROOT / "server").glob("*.py") if p.stem != "__main__")
    code = "\n".join(f"import layerscope.server.{n}" for n in names)
    loaded = _modules_loaded_by(code)
    assert "layerscope.server.app" in loaded or "app" not in names
    assert "torch" not in loaded, "layerscope.server pulled in torch"


def test_wire_imports_only_the_standard_library() -> None:
    before = _modules_loaded_by("")
    after = _modules_loaded_by("import layerscope.trainer.wire")
    extra = {
        m.split(".")[0]
        for m in after - before
        if not m.startswith("layerscope") and m.split(".")[0] not in sys.stdlib_module_names
    }
    extra.discard("_distutils_hack")  # setuptools' .pth shim, present before user code
    assert not extra, f"wire.py imports non-stdlib modules: {sorted(extra)}"
    assert "torch" not in after


def test_trainer_never_imports_server() -> None:
    offenders = []
    for path in (ROOT / "trainer").rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [
                f"{path.name}: {n}" for n in names if n.startswith(("layerscope.server", "server"))
            ]
    assert not offenders, offenders
