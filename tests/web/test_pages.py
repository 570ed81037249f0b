"""pages.py over real HTTP: the shells, the offline Plotly bundle, static files, the schema."""

from __future__ import annotations

import re

from conftest import LiveServer
from layerscope.server import pages
from layerscope.trainer import wire
from layerscope.web import STATIC_DIR, TEMPLATES_DIR


def test_plotly_is_served_from_the_installed_package_with_long_cache(server: LiveServer) -> None:
    response = server.api("GET", "/static/plotly.min.js")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/javascript")
    assert "immutable" in response.headers["cache-control"]
    assert response.content == pages.plotly_js_path().read_bytes()
    again = server.api(
        "GET", "/static/plotly.min.js", headers={"If-None-Match": response.headers["etag"]}
    )
    assert again.status_code == 304
    assert again.content == b""


def test_static_files_revalidate_and_never_leave_the_static_folder(server: LiveServer) -> None:
    response = server.api("GET", "/static/js/run.js")
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-cache"
    assert response.text == (STATIC_DIR / "js" / "run.js").read_text()
    for sneaky in ("/static/../__init__.py", "/static/%2e%2e/__init__.py", "/static/js/nope.js"):
        assert server.api("GET", sneaky).status_code == 404, sneaky


def test_pages_render_their_shells(server: LiveServer) -> None:
    runs = server.api("GET", "/")
    assert runs.status_code == 200 and 'src="/static/js/runs.js"' in runs.text
    run = server.api("GET", "/runs/some-run")
    assert run.status_code == 200
    assert 'data-run-id="some-run"' in run.text
    assert "/static/plotly.min.js" in run.text
    compare = server.api("GET", "/compare", params={"ids": "a,b"})
    assert compare.status_code == 200 and 'data-run-ids="a,b"' in compare.text


def test_run_ids_are_escaped_in_the_page(server: LiveServer) -> None:
    response = server.api("GET", '/runs/"><img src=x onerror=alert(1)>')
    assert response.status_code == 200
    assert "<img src=x" not in response.text
    assert "&lt;img src=x onerror=alert(1)&gt;" in response.text


def test_experiment_schema_is_the_trainers(server: LiveServer) -> None:
    response = server.api("GET", "/api/experiment_schema")
    assert response.status_code == 200
    assert response.json() == wire.EXPERIMENT_SCHEMA


def test_no_page_or_script_names_a_remote_host() -> None:
    remote = re.compile(r"""(src|href)\s*=\s*["']?(https?:)?//""", re.IGNORECASE)
    imports = re.compile(r"""(import|from)\s*["'](https?:)?//""")
    for path in [
        *TEMPLATES_DIR.glob("*.html"),
        *STATIC_DIR.rglob("*.js"),
        *STATIC_DIR.rglob("*.css"),
    ]:
        text = path.read_text()
        assert not remote.search(text), f"{path} links a remote resource"
        assert not imports.search(text), f"{path} imports a remote module"
        assert "url(http" not in text, f"{path} loads a remote asset"
