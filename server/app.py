"""app — ``create_app(settings)``: the FastAPI application and the lifespan that owns its parts.

Owns: building the app from one Settings value; the lifespan that claims the data
directory (data_lock.claim: its lock, and a database there that is layerscope's), opens the
Store, creates the Hub (listening to the store's server events from the start),
Launcher and Ingest, puts them on ``app.state``
(``settings``, ``store``, ``hub``, ``launcher``, ``ingest``) and closes them in
reverse order; request bodies over security.MAX_BODY_BYTES refused with 413
(BodyLimitMiddleware); a startup the data directory refuses reported to the ASGI server in one
line (``StartupMessage``), not as a traceback; the security middleware around
everything; ``GET /healthz`` (503 while the store cannot store what trainers send:
Store.write_problem); a read that meets a damaged database answered 503 with why
(DatabaseDamaged), and an export cut short by one ended without its last chunk
(``CutShort``: a client sees a failed transfer, not a complete-looking file); a 404 on the
dashboard's page paths (anything outside ``/api``, ``/ws``, ``/static`` and ``/healthz``:
``/runs/...``, ``/labs/...``, ``/compare...``) answered as an HTML page (``404.html``:
what was not found, escaped, and a link back to the runs page) where the API keeps its
JSON ``{"detail": ...}``; FastAPI's own 422 for a parameter or body it refuses, in its
shape, with each message and quoted value cut (hub.cut_message), not echoed whole.

Never: reads settings or creates state at import time (tests build as many apps
as they like, each on its own ``tmp_path``), or imports torch.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from layerscope.server import (
    __version__,
    api,
    commands,
    data_lock,
    hub,
    ingest,
    labs,
    launcher,
    pages,
)
from layerscope.server.checks import StoreError
from layerscope.server.schema import SchemaError
from layerscope.server.security import BodyLimitMiddleware, SecurityMiddleware
from layerscope.server.settings import Settings
from layerscope.server.store import DatabaseDamaged, ExportCutShort, Store
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Paths that are not the dashboard's pages: their 404s stay JSON (what scripts and the
# pages' own fetches read), and a missing static file is not a page either.
NOT_PAGES = ("/api", "/ws", "/static", "/healthz")
NOT_FOUND_PATH_SHOWN = 200  # characters of a missing page's path the 404 page repeats


def is_page_path(path: str) -> bool:
    """A path a browser opens as a page (``/runs/x``, ``/labs/x``, ``/compare``, a mistyped
    one): not under the API, websocket, static or health paths."""
    return not any(path == p or path.startswith(p + "/") for p in NOT_PAGES)


async def not_found_page(request: Request, exc: Exception) -> Response:
    """An HTTP error: a 404 on a page path is an HTML page saying what was not found (the
    path and the route's reason, escaped by the template) with a link back to the runs;
    anything else is FastAPI's JSON answer, as before."""
    if not isinstance(exc, StarletteHTTPException):  # registered for HTTPException only
        raise exc
    if exc.status_code != 404 or request.method not in ("GET", "HEAD"):
        return await http_exception_handler(request, exc)
    if not is_page_path(request.url.path):
        return await http_exception_handler(request, exc)
    detail = str(exc.detail)
    return pages.templates.TemplateResponse(
        request,
        "404.html",
        {
            "page": "not-found",
            "version": __version__,
            "message": "This page does not exist."
            if detail == "Not Found"
            else detail[:1].upper() + detail[1:] + ".",
            "path": request.url.path[:NOT_FOUND_PATH_SHOWN],
        },
        status_code=404,
        headers=exc.headers,
    )


def cut_value(value: Any) -> Any:
    """A value a validation error quotes, at most about hub.MAX_ERROR_CHARS long: a string
    cut by hub.cut_message (head and tail); anything else whose JSON is longer (a huge
    list or object) is replaced by its JSON, cut the same way."""
    value = jsonable_encoder(value)
    if isinstance(value, str):
        return hub.cut_message(value)
    if isinstance(value, (dict, list)):
        text = json.dumps(value)
        if len(text) > hub.MAX_ERROR_CHARS:
            return hub.cut_message(text)
    return value


def cut_error(error: dict[str, Any]) -> dict[str, Any]:
    """One of FastAPI's validation errors, same keys, each part that can quote the request
    (``msg``, ``input``, a ``loc`` name, a ``ctx`` value) cut (cut_value)."""
    out = dict(error)
    for key in ("msg", "input"):
        if key in out:
            out[key] = cut_value(out[key])
    if isinstance(out.get("loc"), (list, tuple)):
        out["loc"] = [cut_value(part) for part in out["loc"]]
    if isinstance(out.get("ctx"), dict):
        out["ctx"] = {key: cut_value(value) for key, value in out["ctx"].items()}
    return out


async def validation_error(request: Request, exc: Exception) -> Response:
    """FastAPI's 422 for a request its parameters refuse (``{"detail": [{"loc", "msg",
    "type", "input", ...}]}``, the same shape), with each quoted part cut (cut_error): it
    echoed the value whole, a 100 kB query string a 100 kB answer, a JSON body's
    field of a megabyte a megabyte one (hub.cut_message, as the sockets' errors and
    the routes' own refusals are)."""
    if not isinstance(exc, RequestValidationError):  # registered for it only
        raise exc
    return JSONResponse(
        status_code=422,
        content={"detail": [cut_error(error) for error in jsonable_encoder(exc.errors())]},
    )


class StartupMessage:
    """ASGI middleware: when the lifespan fails because the data directory refuses the
    server (``app.state.startup_problem``), the ASGI server is told that one line, prefixed
    ``layerscope:``, instead of the traceback Starlette sends (uvicorn logs it)."""

    def __init__(self, app: ASGIApp, *, state: Any) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def say(message: Message) -> None:
            problem = getattr(self.state, "startup_problem", None)
            if message["type"] == "lifespan.startup.failed" and problem:
                message = {**message, "message": f"layerscope: {problem}"}
            await send(message)

        await self.app(scope, receive, say)


class CutShort:
    """ASGI middleware: a streamed response whose body raised ExportCutShort (it has sent its
    error line and logged why) ends without the final empty chunk, so the client sees a
    transfer cut off (curl: exit 18; a browser: a failed download), not a clean end; no
    traceback is logged for it (the ASGI server says in one line that the response did
    not complete)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        except ExportCutShort:
            return  # the response started and never finished: uvicorn closes the connection


async def damaged_database(request: Request, exc: Exception) -> Response:
    """A read that met a damaged database (DatabaseDamaged): 503 with why, not a 500 and a
    traceback; the store refuses writes from then on."""
    return JSONResponse({"detail": str(exc)}, status_code=503)


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Claimed first (a no-op check when `layerscope serve` has claimed it already): a
        # program that builds the app itself gets the same refusals, and another program's
        # SQLite file is never given layerscope's tables.
        problem = data_lock.claim(settings.data_dir)
        store = Store(settings.data_dir, commit_interval_s=settings.commit_interval_s)
        try:
            if problem is not None:
                raise StoreError(problem)
            await store.open()  # takes over the claimed lock
        except (StoreError, SchemaError, OSError) as exc:
            data_lock.drop_claim(settings.data_dir)
            app.state.startup_problem = str(exc)
            raise
        the_hub = hub.Hub(queue_frames=settings.viewer_queue_frames)
        store.listen(the_hub.publish_event)  # the server's own events reach live viewers
        the_launcher = launcher.Launcher(settings, store, the_hub)
        the_ingest = ingest.Ingest(settings, store, the_hub, exit_code=the_launcher.exit_code)
        app.state.settings = settings
        app.state.store = store
        app.state.hub = the_hub
        app.state.launcher = the_launcher
        app.state.ingest = the_ingest
        await the_ingest.start()
        try:
            yield
        finally:
            await the_launcher.close()
            await the_ingest.close()
            await the_hub.close()
            await store.close()

    app = FastAPI(
        title="layerscope",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url="/api/openapi.json",
    )
    app.state.settings = settings

    @app.get("/healthz", response_model=None)
    async def healthz() -> dict[str, Any] | JSONResponse:
        """200 while the server can store what trainers send; 503 naming why while it
        cannot (Store.write_problem: its writer process died and another has not started
        yet; its commits fail, ``cannot store: database or disk is full at <data dir>``,
        until one commits again; the database is damaged), so a supervisor's health check
        sees it."""
        store = getattr(app.state, "store", None)
        problem = "the store is not open" if store is None else store.write_problem
        if problem is not None:
            return JSONResponse(
                {"ok": False, "version": __version__, "store": problem}, status_code=503
            )
        return {"ok": True, "version": __version__}

    app.add_exception_handler(StarletteHTTPException, not_found_page)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(DatabaseDamaged, damaged_database)
    app.include_router(ingest.router)
    app.include_router(hub.router)
    app.include_router(commands.router)
    app.include_router(launcher.router)
    app.include_router(labs.router)
    app.include_router(api.router)
    app.include_router(pages.router)
    # Inside the security checks: a request they refuse is answered before its body is read.
    app.add_middleware(BodyLimitMiddleware)
    app.add_middleware(SecurityMiddleware, settings=settings)
    app.add_middleware(CutShort)
    app.add_middleware(StartupMessage, state=app.state)
    return app
