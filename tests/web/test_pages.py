"""pages.py over real HTTP: the shells, the offline Plotly bundle, static files, the schema,
and a 404 page for a run, lab or comparison that is not stored."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
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
from layerscope.server.labs import Labs
from layerscope.trainer import wire
from layerscope.web import STATIC_DIR, TEMPLATES_DIR
from playwright.sync_api import Browser, expect
from websockets.sync.client import connect as ws_connect

HTML_ID = '"><img src=x onerror=alert(1)>'


def say_hello(server: LiveServer, run_id: str) -> None:
    """A run stored as a trainer's hello stores it; the trainer then goes away."""
    hello = {"type": "hello", "v": 1, "run_id": run_id, "layers": [], "last_cmd_seq": 0}
    with ws_connect(server.url.replace("http://", "ws://") + "/ws/trainer") as ws:
        ws.send(json.dumps(hello))
        assert json.loads(ws.recv(timeout=10))["type"] == "welcome"


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A server of its own holding the runs some-run, a, c and one with HTML in its id, and
    the lab 'lab0001' (a page opens only for what is stored)."""
    data_dir = tmp_path_factory.mktemp("pages") / "data"
    Labs(data_dir).save(
        {"id": "lab0001", "kind": "init", "created_at": 1.0, "params": {}, "runs": []}
    )
    for server in serve(server_settings(data_dir)):
        for run_id in ("some-run", "a", "c", HTML_ID):
            say_hello(server, run_id)
        yield server


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


def test_pages_render_their_shells(stored: LiveServer) -> None:
    server = stored
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
    stored: LiveServer,
) -> None:
    html = stored.api("GET", "/runs/some-run").text
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
        assert stored.api("GET", f"/static/js/{name}").status_code == 200
    # Plotly is fetched at once but run by run.js, after the run's requests have gone out.
    assert re.search(r'<link rel="preload" as="script" href="/static/plotly\.min\.js\?v=', html)
    assert not re.search(r"<script[^>]*plotly\.min\.js", html)


def test_run_ids_are_escaped_in_the_page(stored: LiveServer) -> None:
    for path in (f"/runs/{HTML_ID}", "/runs/<img src=x>ghost"):  # stored, and a 404 page
        response = stored.api("GET", path)
        assert response.status_code == (200 if HTML_ID in path else 404), path
        assert "<img src=x" not in response.text, path
        assert "&lt;img src=x" in response.text, path


def test_a_page_for_what_is_not_stored_is_an_html_404_with_a_link_back(
    stored: LiveServer,
) -> None:
    """A well-formed lab name with no lab (/labs/abcdef12), a run id no run has, a deleted
    run's page and a comparison of runs none of which exists answered 200 with the page's
    shell, whose script then failed to load what it shows. Each is now the 404 page saying
    what is missing, with a link back to the runs; a lab that is recorded, a comparison
    with any of its runs stored and one of no runs still open."""
    say_hello(stored, "doomed")
    assert stored.api("GET", "/runs/doomed").status_code == 200
    deadline = time.monotonic() + 10
    while (gone := stored.api("DELETE", "/api/runs/doomed")).status_code == 409:
        assert time.monotonic() < deadline, gone.text  # until its trainer has gone
        time.sleep(0.02)
    assert gone.status_code == 204
    for path, says in [
        ("/labs/abcdef12", "Lab &#39;abcdef12&#39; not found."),
        ("/runs/ghost", "Run &#39;ghost&#39; not found; it may have been deleted"),
        ("/runs/doomed", "Run &#39;doomed&#39; not found; it may have been deleted"),
        (
            "/compare?ids=ghost&ids=doomed",
            "None of the runs to compare was found (&#39;ghost&#39;, &#39;doomed&#39;)",
        ),
        ("/compare?ids=" + ",".join("uvwxyz") + ",ghost", "&#39;y&#39; and 2 more)"),
    ]:
        response = stored.api("GET", path)
        assert response.status_code == 404, path
        assert response.headers["content-type"].startswith("text/html"), path
        assert says in response.text, (path, response.text)
        assert '<a href="/">Back to the runs</a>' in response.text, path
    for path in ("/labs/lab0001", "/compare?ids=ghost&ids=a", "/compare"):
        response = stored.api("GET", path)
        assert response.status_code == 200, path
        assert response.headers["content-type"].startswith("text/html"), path
    # the API keeps its JSON for the same run
    assert stored.api("GET", "/api/runs/doomed").json() == {"detail": "run 'doomed' not found"}


def test_a_comparison_of_more_runs_than_it_can_show_is_refused(stored: LiveServer) -> None:
    """/compare?ids= took any number of ids: 6,000 answered a 100 kB page that then asked
    the server for each run, and an eleventh run drew in the first one's colour. More than
    MAX_COMPARE_RUNS (the charts' colours) distinct ids is now a 422 page saying so, with
    a link back to the runs; that many still open, repeated ids counted once."""
    colors = re.search(r"COLORS = \[([^\]]*)\]", (STATIC_DIR / "js" / "charts.js").read_text())
    assert colors is not None
    assert len(re.findall(r'"#[0-9a-f]{6}"', colors.group(1))) == pages.MAX_COMPARE_RUNS
    most = pages.MAX_COMPARE_RUNS
    fits = ["a", "c", *(f"ghost{i}" for i in range(most - 2))]
    response = stored.api("GET", "/compare", params=[("ids", x) for x in [*fits, "a"]])
    assert response.status_code == 200
    for ids, count in [
        ([*fits, "one-more"], most + 1),
        ([",".join(f"r{i}" for i in range(6_000))], 6_000),  # the older form, split
    ]:
        response = stored.api("GET", "/compare", params=[("ids", x) for x in ids])
        assert response.status_code == 422
        assert response.headers["content-type"].startswith("text/html")
        assert f"A comparison shows at most {most} runs (one colour each)" in response.text
        assert f"this link names {count}." in response.text
        assert '<a href="/">Back to the runs</a>' in response.text
        assert "data-run-ids" not in response.text


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
        server_settings(
            data_dir,
            viewer_token="s3cret-token-0123456789",
            trainer_token="trainer-s3cret-0123456789",
        )
    ):
        anonymous = httpx.get(f"{server.url}/api/runs")
        assert anonymous.status_code == 403

        page, guard = guarded_page(browser)
        try:
            open_ready(page, f"{server.url}/?token=s3cret-token-0123456789")
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
