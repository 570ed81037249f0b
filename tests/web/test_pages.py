"""pages.py over real HTTP: the shells, the offline Plotly bundle, static files, the schema."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest
from conftest import (
    LiveServer,
    chart_points,
    guarded_page,
    open_ready,
    serve,
    server_settings,
    write_recorded_run,
)
from layerscope.server import pages
from layerscope.trainer import wire
from layerscope.web import STATIC_DIR, TEMPLATES_DIR
from playwright.sync_api import Browser, expect


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
    # a NUL, or a name past the file system's limit: 404 as well, not a 500
    for odd in ("/static/%00", "/static/js/" + "x" * 300 + ".js"):
        assert server.api("GET", odd).status_code == 404, odd


def test_pages_render_their_shells(server: LiveServer) -> None:
    runs = server.api("GET", "/")
    assert runs.status_code == 200 and 'src="/static/js/runs.js"' in runs.text
    run = server.api("GET", "/runs/some-run")
    assert run.status_code == 200
    assert 'data-run-id="some-run"' in run.text
    assert "/static/plotly.min.js" in run.text
    compare = server.api("GET", "/compare", params={"ids": "a,b"})  # the older form: split
    assert (
        compare.status_code == 200 and 'data-run-ids="[&#34;a&#34;, &#34;b&#34;]"' in compare.text
    )
    compare = server.api("GET", "/compare", params=[("ids", "a,b"), ("ids", "c")])  # one id each
    assert 'data-run-ids="[&#34;a,b&#34;, &#34;c&#34;]"' in compare.text


def test_run_page_preloads_its_whole_module_graph_and_runs_plotly_itself(
    server: LiveServer,
) -> None:
    html = server.api("GET", "/runs/some-run").text
    preloaded = set(re.findall(r'<link rel="modulepreload" href="/static/js/([\w.-]+)"', html))
    wanted: set[str] = set()
    todo = ["run.js"]
    while todo:
        source = (STATIC_DIR / "js" / todo.pop()).read_text()
        for name in re.findall(r"""from\s+["']\./([\w.-]+)["']""", source):
            if name not in wanted:
                wanted.add(name)
                todo.append(name)
    assert "heatmaps.js" in wanted and preloaded == wanted
    for name in preloaded:
        assert server.api("GET", f"/static/js/{name}").status_code == 200
    # Plotly is fetched at once but run by run.js, after the run's requests have gone out.
    assert re.search(r'<link rel="preload" as="script" href="/static/plotly\.min\.js\?v=', html)
    assert not re.search(r"<script[^>]*plotly\.min\.js", html)


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


@pytest.mark.browser
def test_dashboard_works_with_a_viewer_token(browser: Browser, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    write_recorded_run(data_dir, "recorded", steps=400, layers=4, every=20)
    for server in serve(
        server_settings(data_dir, viewer_token="s3cret-token", trainer_token="trainer-s3cret")
    ):
        anonymous = httpx.get(f"{server.url}/api/runs")
        assert anonymous.status_code == 403

        page, guard = guarded_page(browser)
        try:
            open_ready(page, f"{server.url}/?token=s3cret-token")
            expect(page.locator("#runs tr[data-run-id='recorded'] .pill")).to_have_text("finished")
            page.click("#runs tr[data-run-id='recorded'] a")
            page.wait_for_function("document.body.dataset.ready !== undefined")
            assert page.evaluate("document.body.dataset.ready") == "1"
            page.wait_for_function("document.body.dataset.socket === 'open'")
            assert chart_points(page, "chart-loss")[0] == 400
            expect(page.locator("#multiples .multiple")).to_have_count(4)
            expect(page.locator("#banner")).to_be_hidden()
        finally:
            page.context.close()
        assert not guard.errors, guard.errors
        assert not guard.remote, guard.remote
