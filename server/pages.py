"""pages — the dashboard's HTML shells, its static files and the experiment schema.

Owns: ``router`` (included by ``create_app``): ``/`` (runs list), ``/runs/{id}``
(live and replay view), ``/compare?ids=a&ids=b``, ``/labs/{id}`` (the init lab's comparison), ``/static/plotly.min.js`` (served from
the installed ``plotly`` package, so the dashboard works offline), ``/static/...``
(``layerscope.web``'s files), ``/api/experiment_schema`` (the New-run form is
generated from it) and the run page's preload list (its ES module graph, read from the
modules' static imports).

A page for something that is not stored (a run id no run has, a deleted run's URL
included; a lab with no record; a comparison none of whose runs exists) is a 404,
which app.py renders as the HTML not-found page with a link back to the runs, rather
than a shell whose script then fails to load it. A comparison of more runs than it can
show (MAX_COMPARE_RUNS) is a 422 page saying so, with the same link.

Never: renders data into the pages (the browser fetches it through the REST and
websocket contract in ``http_api.md``; a page checks only that what it shows exists),
loads anything from a CDN, or serves a file outside the static directory.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, Response
from fastapi.templating import Jinja2Templates
from layerscope.server import __version__
from layerscope.server.labs import Labs
from layerscope.server.store import Store
from layerscope.trainer import wire
from layerscope.web import STATIC_DIR, TEMPLATES_DIR

router = APIRouter()
templates = Jinja2Templates(directory=str(TEMPLATES_DIR))

# Plotly's bundle never changes for an installed version, and its URL carries that
# version, so browsers may keep it for a long time. Our own files change with the
# code, so they are revalidated on every load (a 304 costs one round trip).
PLOTLY_CACHE = "public, max-age=31536000, immutable"
STATIC_CACHE = "no-cache"
MEDIA_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
    ".ico": "image/x-icon",
}


@lru_cache(maxsize=1)
def plotly_js_path() -> Path:
    """Where the installed ``plotly`` package keeps plotly.min.js.

    Found without importing plotly (its import costs ~80 ms and the server never
    needs its Python side).
    """
    spec = importlib.util.find_spec("plotly")
    folders = list(spec.submodule_search_locations or []) if spec else []
    path = Path(folders[0] if folders else ".") / "package_data" / "plotly.min.js"
    if not path.is_file():
        raise RuntimeError(f"plotly.min.js not found at {path}; reinstall the plotly package")
    return path


@lru_cache(maxsize=1)
def plotly_version() -> str:
    return importlib.metadata.version("plotly")


STATIC_IMPORT = re.compile(
    r"""^\s*(?:import|export)\b[^;]*?\bfrom\s*["']\./([\w.-]+\.js)["']""", re.M
)


@lru_cache(maxsize=64)
def _imports(path: Path, mtime_ns: int) -> tuple[str, ...]:
    return tuple(STATIC_IMPORT.findall(path.read_text(encoding="utf-8")))


def module_graph(entry: str) -> list[str]:
    """Every module under static/js that `entry` imports, directly or not (for
    modulepreload links: the browser then fetches them all at once instead of one
    import level after another)."""
    root = STATIC_DIR / "js"
    seen: list[str] = []
    todo = [entry]
    while todo:
        name = todo.pop()
        path = root / name
        if not path.is_file():
            continue
        for child in _imports(path, path.stat().st_mtime_ns):
            if child not in seen and child != entry:
                seen.append(child)
                todo.append(child)
    return sorted(seen)


def _context(request: Request, **extra: Any) -> dict[str, Any]:
    return {
        "request": request,
        "version": __version__,
        "plotly_version": plotly_version(),
        **extra,
    }


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def runs_page(request: Request) -> Response:
    return templates.TemplateResponse(request, "runs.html", _context(request, page="runs"))


def _store(request: Request) -> Store:
    store: Store = request.app.state.store
    return store


def _stored(store: Store, run_id: str) -> bool:
    return 0 < len(run_id) <= wire.MAX_NAME_LEN and store.has_run(run_id)


@router.get("/runs/{run_id}", response_class=HTMLResponse, include_in_schema=False)
def run_page(request: Request, run_id: str) -> Response:
    """404 for a run id no stored run has (a typo, or a deleted run's page: its URL goes
    with it); a launched run is stored before its id is answered, so its page opens."""
    if not _stored(_store(request), run_id):
        raise HTTPException(
            404, f"run {run_id[:64]!r} not found; it may have been deleted, or the id mistyped"
        )
    return templates.TemplateResponse(
        request,
        "run.html",
        _context(request, page="run", run_id=run_id, run_modules=module_graph("run.js")),
    )


# The most runs a comparison shows: the charts' colours (charts.js COLORS, one per run;
# an eleventh run drew in the first one's colour), and each run costs the page three
# requests every few seconds. /compare?ids= with thousands of ids answered a page that
# carried all of them and then asked the server for each.
MAX_COMPARE_RUNS = 10
# The page a comparison of too many runs gets (422): said in the dashboard's layout,
# with a way back, as the not-found page does (404.html).
TOO_MANY_PAGE = templates.env.from_string(
    """{% extends "base.html" %}
{% block title %}Too many runs · layerscope{% endblock %}
{% block main %}
<section class="panel not-found">
  <h1>Too many runs to compare</h1>
  <p>A comparison shows at most {{ most }} runs (one colour each); this link names {{ count }}.</p>
  <p><a href="/">Back to the runs</a> to pick at most {{ most }}.</p>
</section>
{% endblock %}
"""
)


@router.get("/compare", response_class=HTMLResponse, include_in_schema=False)
def compare_page(request: Request, ids: Annotated[list[str], Query()] = []) -> Response:  # noqa: B006
    """``?ids=a&ids=b``: each value one run id, verbatim (an id may hold a comma); a single
    ``?ids=a,b`` is split on commas (the older links' form). More than MAX_COMPARE_RUNS
    distinct ids: a 422 page saying so (nothing is looked up)."""
    parts = ids[0].split(",") if len(ids) == 1 else ids
    run_ids = list(dict.fromkeys(x for x in (part.strip() for part in parts) if x))
    if len(run_ids) > MAX_COMPARE_RUNS:
        return HTMLResponse(
            TOO_MANY_PAGE.render(
                _context(request, page="compare", most=MAX_COMPARE_RUNS, count=len(run_ids))
            ),
            status_code=422,
        )
    # The page says which of its runs it could not load; with none of them there is
    # nothing to compare (no ids at all: the page says to pick some on the runs page).
    store = _store(request)
    if run_ids and not any(_stored(store, run_id) for run_id in run_ids):
        named = ", ".join(repr(run_id[:64]) for run_id in run_ids[:5])
        more = f" and {len(run_ids) - 5} more" if len(run_ids) > 5 else ""
        raise HTTPException(
            404,
            f"none of the runs to compare was found ({named}{more}); they may have been "
            "deleted, or the ids mistyped",
        )
    return templates.TemplateResponse(
        request, "compare.html", _context(request, page="compare", run_ids=run_ids)
    )


@router.get("/labs/{lab_id}", response_class=HTMLResponse, include_in_schema=False)
def lab_page(request: Request, lab_id: str) -> Response:
    """404 for a lab with no record under ``data_dir/labs`` (a malformed name has none)."""
    path = Labs(request.app.state.settings.data_dir).path(lab_id)
    if path is None or not path.is_file():
        raise HTTPException(404, f"lab {lab_id[:64]!r} not found")
    return templates.TemplateResponse(
        request, "lab.html", _context(request, page="lab", lab_id=lab_id)
    )


@router.get("/api/experiment_schema")
def experiment_schema() -> Any:
    """The built-in experiments' knobs, as the trainer declares them."""
    return wire.EXPERIMENT_SCHEMA


def _etag(path: Path) -> str:
    st = path.stat()
    digest = hashlib.blake2s(f"{path}:{st.st_mtime_ns}:{st.st_size}".encode(), digest_size=8)
    return f'"{digest.hexdigest()}"'


def _file(request: Request, path: Path, cache_control: str) -> Response:
    etag = _etag(path)
    headers = {"Cache-Control": cache_control, "ETag": etag}
    if etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    media_type = MEDIA_TYPES.get(path.suffix, "application/octet-stream")
    return FileResponse(path, media_type=media_type, headers=headers)


@router.get("/static/plotly.min.js", include_in_schema=False)
def plotly_js(request: Request) -> Response:
    return _file(request, plotly_js_path(), PLOTLY_CACHE)


@router.get("/static/{file_path:path}", include_in_schema=False)
def static_file(request: Request, file_path: str) -> Response:
    root = STATIC_DIR.resolve()
    try:  # a NUL in the name, or a name past the file system's length limit
        path = (root / file_path).resolve()
        found = path.is_relative_to(root) and path.is_file()
    except (OSError, ValueError):
        found = False
    if not found:
        raise HTTPException(404, f"no static file {file_path[:200]!r}")
    return _file(request, path, STATIC_CACHE)
