"""api — the read side of the REST API (http_api.md): runs, series, probes, histograms,
events, commands, export, and DELETE of a run.

Owns: the routes, their query-parameter limits, and the response models that keep
the OpenAPI document accurate. Each route is a thin call into Store; routes are
plain ``def`` so FastAPI runs them on its thread pool, off the event loop.

Never: writes anything but DELETE (commands, stop and run launches are POST routes in
app.py's other routers), never imports torch, never returns NaN/Inf.
"""

from __future__ import annotations

import pathlib
import re
import shutil
from collections.abc import Iterator
from typing import Annotated, Any, Protocol, TypeVar

import orjson
from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request, Response
from fastapi.responses import StreamingResponse
from layerscope.server import queries
from layerscope.server.store import RunNotFound, Store
from layerscope.trainer import wire
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

MAX_POINTS = 20_000
MAX_RUNS_PAGE = 1000  # GET /api/runs?limit=
SPARK_DIGITS = 4  # significant digits of the run list's sparkline values
MAX_STEPS = 2_000
STATS_PATTERN = "^({0})(,({0}))*$".format("|".join(wire.PROBE_STATS))
STAT_PATTERN = "^({})$".format("|".join(wire.PROBE_STATS))
# What a run's events are: the trainer's, and the server's own (a command sent, a status set).
EVENT_KINDS = wire.EVENT_KINDS | {"command", "command_result", "status"}


class Hub(Protocol):
    def is_connected(self, run_id: str) -> bool: ...

    def is_attached(self, run_id: str) -> bool: ...

    def is_uploading(self, run_id: str) -> bool: ...

    def forget_run(self, run_id: str) -> None: ...


def get_store(request: Request) -> Store:
    store: Store = request.app.state.store
    return store


def get_hub(request: Request) -> Hub | None:
    """The app's hub, or None in an app that runs no trainer socket (nothing is connected)."""
    return getattr(request.app.state, "hub", None)


StoreDep = Annotated[Store, Depends(get_store)]
HubDep = Annotated[Hub | None, Depends(get_hub)]
RunId = Annotated[str, Path(description="the run id", max_length=wire.MAX_NAME_LEN)]
Start = Annotated[int | None, Query(ge=0, le=wire.MAX_INT, description="first step, inclusive")]
End = Annotated[int | None, Query(ge=0, le=wire.MAX_INT, description="last step, inclusive")]

# ---- response models (documentation of the JSON bodies; http_api.md is the contract) ----


class ErrorBody(BaseModel):
    detail: str


class Last(BaseModel):
    loss: float | None
    val_loss: float | None
    acc: float | None
    val_acc: float | None


class RunSummary(BaseModel):
    id: str
    name: str
    status: str = Field(description="starting/running/paused/finished/failed/stopped/lost")
    status_reason: str | None
    config: dict[str, Any]
    launched: bool = Field(description="started by this server's launcher")
    created_at: float = Field(description="Unix time, seconds")
    updated_at: float = Field(description="Unix time, seconds")
    first_step: int | None
    last_step: int | None
    last: Last = Field(description="latest value of each series by step; null if non-finite")
    sparkline: list[float | None] = Field(description="mean loss per bucket, at most 50")
    trainer_connected: bool


class Layer(BaseModel):
    name: str
    kind: str
    units: int | None


class Clock(BaseModel):
    first_step: int
    first_time_s: float
    last_step: int
    last_time_s: float


class RunDetail(RunSummary):
    layers: list[Layer]
    control: dict[str, Any] | None = Field(
        description="last control state the trainer acknowledged"
    )
    series_names: list[str]
    device: str
    world_size: int
    acked_seq: int = Field(description="highest contiguous stored frame seq")
    last_seq: int = Field(description="highest stored frame seq")
    clock: Clock | None = Field(
        description="the trainer's own clock (its rows' time_s: seconds since its watch "
        "started) at the first and last stored step of the loss series (the run's first "
        "series if it has no loss); null when no row carries time_s. Unlike created_at and "
        "updated_at, which time the upload for a run sent by layerscope sync, it says how "
        "fast training went: the replay's x1 pace"
    )


class Series(BaseModel):
    steps: list[int]
    values: list[float | None]


class ProbeSeries(BaseModel):
    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={"description": "plus one list per requested stat, aligned with steps"},
    )
    layer: str
    steps: list[int]


class Matrix(BaseModel):
    stat: str
    layers: list[str]
    steps: list[int]
    z: list[list[float | None]] = Field(description="z[layer][step]")


class HistogramsOverTime(BaseModel):
    layer: str
    steps: list[int]
    edges: list[float] = Field(description="bins + 1 common edges")
    z: list[list[float] | None] = Field(description="z[step][bin]; null where no histogram")


class LayerHistogram(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"description": "plus every probe stat (null when absent)"},
        extra="allow",
    )
    name: str
    lo: float | None
    hi: float | None
    counts: list[int]


class HistogramAt(BaseModel):
    step: int | None = Field(description="the probe step shown; null when the run has none")
    layers: list[LayerHistogram]


class ProbeSteps(BaseModel):
    steps: list[int]


class Event(BaseModel):
    seq: int | None = Field(description="the trainer frame's seq; null for server events")
    step: int | None
    kind: str
    origin: str = Field(description="trainer or server")
    data: dict[str, Any]
    created_at: float


class Command(BaseModel):
    id: str
    cmd_seq: int
    name: str
    args: dict[str, Any]
    source: str
    origin: str
    reason: str | None
    created_at: float
    status: str = Field(description="pending, applied or failed")
    applied_at_step: int | None
    state: dict[str, Any] | None
    error: str | None


NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorBody, "description": "no such run"}
}


def _query_error(name: str, msg: str) -> HTTPException:
    return HTTPException(422, detail=[{"loc": ["query", name], "msg": msg, "type": "value_error"}])


def known_query(request: Request) -> None:
    """A query parameter the route does not take is refused (422), not ignored:
    ``/api/runs?limt=5`` listed every run and ``/series?name=loss`` every series, as if
    asked for. ``token`` (the viewer token, security.py's) is taken everywhere."""
    dependant = getattr(request.scope.get("route"), "dependant", None)
    if dependant is None:
        return
    takes = sorted({f.alias for f in dependant.query_params})
    unknown = sorted(set(request.query_params) - {*takes, "token"})
    if unknown:
        name = unknown[0][:64]
        raise _query_error(
            name,
            f"unknown query parameter {name!r}; this route takes "
            + (", ".join(takes) if takes else "none"),
        )


router = APIRouter(prefix="/api", tags=["runs"], dependencies=[Depends(known_query)])


T = TypeVar("T")


def _text(value: T) -> T:
    """``value`` as stored, or where it holds a lone surrogate (a string a run's hello,
    launch or command stored before they were refused at the door, wire.lone_surrogate)
    with it escaped (wire.escape_surrogates): such a string failed the answer (a 500 for
    the whole runs list, every run, until that run was deleted). orjson, which refuses
    one, looks first: a stored value without one costs that check alone."""
    try:
        orjson.dumps(value)
    except orjson.JSONEncodeError:  # or an integer past 64 bits, which this leaves as it is
        escaped: T = wire.escape_surrogates(value)
        return escaped
    return value


def _missing(run_id: str) -> HTTPException:
    return HTTPException(404, detail=f"run '{run_id}' not found")


def _connected(hub: Hub | None, run_id: str) -> bool:
    return hub is not None and hub.is_connected(run_id)


@router.get(
    "/runs",
    response_model=list[RunSummary],
    summary="Runs, newest first",
    description="Every run, or a page of them with limit and offset; with q, only the runs "
    "matching every word of q; the X-Total-Count header says how many there are (that "
    "match). Each config is what the runs page shows of it (its key fields) unless full=true.",
)
def list_runs(
    store: StoreDep,
    hub: HubDep,
    response: Response,
    limit: Annotated[
        int | None, Query(ge=1, le=MAX_RUNS_PAGE, description="at most this many runs")
    ] = None,
    offset: Annotated[
        int, Query(ge=0, le=wire.MAX_INT, description="skip this many of the newest")
    ] = 0,
    full: Annotated[bool, Query(description="each run's whole config")] = False,
    q: Annotated[
        str | None,
        Query(
            max_length=queries.MAX_SEARCH_LEN,
            description="only runs holding every word of q (case-insensitive substrings of "
            "the id, name, status or whole stored config)",
        ),
    ] = None,
) -> list[dict[str, Any]]:
    try:
        words = queries.search_words(q)
    except queries.SearchError as exc:
        raise HTTPException(
            422, detail=[{"loc": ["query", "q"], "msg": str(exc), "type": "value_error"}]
        ) from None
    runs, total = store.run_page(limit, offset, full_config=full, words=words)
    response.headers["X-Total-Count"] = str(total)
    for run in runs:
        run["trainer_connected"] = _connected(hub, run["id"])
        # a 120-pixel line: 4 significant digits, not 17 (half of a polled row's bytes)
        run["sparkline"] = [
            None if v is None else float(f"{v:.{SPARK_DIGITS}g}") for v in run["sparkline"]
        ]
    return _text(runs)


@router.get(
    "/runs/{run_id}", response_model=RunDetail, responses=NOT_FOUND, summary="One run's detail"
)
def get_run(run_id: RunId, store: StoreDep, hub: HubDep) -> dict[str, Any]:
    run = store.run(run_id)
    if run is None:
        raise _missing(run_id)
    run["trainer_connected"] = _connected(hub, run_id)
    run["clock"] = store.clock(run_id)
    return _text(run)


@router.delete(
    "/runs/{run_id}",
    status_code=204,
    response_class=Response,
    responses={
        **NOT_FOUND,
        409: {
            "model": ErrorBody,
            "description": "a trainer is connected (stop the run first) or `layerscope sync` "
            "is uploading it",
        },
    },
    summary="Delete a run and everything stored for it",
)
async def delete_run(run_id: RunId, store: StoreDep, hub: HubDep, request: Request) -> Response:
    if hub is not None and hub.is_attached(run_id):
        # an upload (layerscope sync) too: deleted midway, its next reconnect would
        # recreate the run from the rest of its spool
        if hub.is_uploading(run_id):
            raise HTTPException(
                409, detail=f"run '{run_id}' is being uploaded by layerscope sync; wait for it"
            )
        raise HTTPException(409, detail=f"run '{run_id}' has a trainer connected; stop it first")
    launcher = getattr(request.app.state, "launcher", None)
    if launcher is not None and store.run(run_id) is not None:
        # a launched trainer not (or no longer) connected, still running: it ends first,
        # so nothing writes the run's folder or records its end once the run is gone
        await launcher.end(run_id)
    if not await store.delete_run(run_id):
        raise _missing(run_id)
    if hub is not None:
        hub.forget_run(run_id)
    settings = getattr(request.app.state, "settings", None)
    if settings is not None:
        await run_in_threadpool(_remove_run_folder, settings.data_dir, run_id)
    return Response(status_code=204)


def _remove_run_folder(data_dir: pathlib.Path, run_id: str) -> None:
    """A launched run's folder (data_dir/runs/<id>: its spool, checkpoints, trainer log)
    goes with the run; only a folder directly under data_dir/runs, whatever the id says."""
    root = (data_dir / "runs").resolve()
    try:
        folder = (root / run_id).resolve()
        if folder.parent != root or not folder.is_dir():
            return
    except OSError:  # a name no folder can have (over 255 bytes of UTF-8): there is none
        return
    shutil.rmtree(folder, ignore_errors=True)


def _filename(run_id: str) -> str:
    """The run id made safe for a header: anything but [A-Za-z0-9._-] becomes _."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", run_id)


def _names(raw: str | None) -> list[str] | None:
    """The series names asked for; a name no series can have (longer than a name may
    be), or more names than a run can hold, is refused (422): each was answered with an
    empty series under its name, a 5,000-character name echoed whole."""
    if raw is None:
        return None
    names = [n for n in (part.strip() for part in raw.split(",")) if n]
    if len(names) > wire.MAX_SERIES:
        raise _query_error("names", f"at most {wire.MAX_SERIES} names, got {len(names)}")
    long = next((n for n in names if len(n) > wire.MAX_NAME_LEN), None)
    if long is not None:
        raise _query_error(
            "names",
            f"a series name is at most {wire.MAX_NAME_LEN} characters; got one of {len(long)}"
            f" ({long[:40]!r}...)",
        )
    return names or None


def _check_range(start: int | None, end: int | None) -> None:
    if start is not None and end is not None and start > end:
        raise HTTPException(
            422,
            detail=[
                {
                    "loc": ["query", "start"],
                    "msg": f"start {start} is after end {end}",
                    "type": "value_error",
                }
            ],
        )


@router.get(
    "/runs/{run_id}/series",
    response_model=dict[str, Series],
    responses=NOT_FOUND,
    summary="Scalar series, min/max downsampled",
    description="Each bucket keeps its min and max point; the first and last points are "
    "always kept; at most max_points points per series. A name with no data gets empty lists.",
)
def get_series(
    run_id: RunId,
    store: StoreDep,
    names: Annotated[
        str | None, Query(description="comma-separated; all series when absent")
    ] = None,
    start: Start = None,
    end: End = None,
    max_points: Annotated[int, Query(ge=2, le=MAX_POINTS)] = 1500,
) -> Any:
    _check_range(start, end)
    try:
        return store.series(run_id, _names(names), start, end, max_points)
    except RunNotFound:
        raise _missing(run_id) from None


@router.get(
    "/runs/{run_id}/probes",
    response_model=ProbeSeries,
    responses=NOT_FOUND,
    summary="One layer's probe stats over steps, min/max downsampled",
)
def get_probes(
    run_id: RunId,
    store: StoreDep,
    layer: Annotated[str, Query(min_length=1, max_length=wire.MAX_NAME_LEN)],
    stats: Annotated[
        str, Query(pattern=STATS_PATTERN, description="comma-separated probe stats")
    ] = "dead_ratio",
    start: Start = None,
    end: End = None,
    max_points: Annotated[int, Query(ge=2, le=MAX_POINTS)] = 1500,
) -> Any:
    _check_range(start, end)
    try:
        return store.probe_series(run_id, layer, stats.split(","), start, end, max_points)
    except RunNotFound:
        raise _missing(run_id) from None


@router.get(
    "/runs/{run_id}/probes/matrix",
    response_model=Matrix,
    responses=NOT_FOUND,
    summary="One stat for every layer at evenly chosen probe steps (heatmap)",
)
def get_matrix(
    run_id: RunId,
    store: StoreDep,
    stat: Annotated[str, Query(pattern=STAT_PATTERN)] = "dead_ratio",
    start: Start = None,
    end: End = None,
    max_steps: Annotated[int, Query(ge=1, le=MAX_STEPS)] = 300,
) -> Any:
    _check_range(start, end)
    try:
        return store.probe_matrix(run_id, stat, start, end, max_steps)
    except RunNotFound:
        raise _missing(run_id) from None


@router.get(
    "/runs/{run_id}/histograms",
    response_model=HistogramsOverTime,
    responses=NOT_FOUND,
    summary="One layer's histograms over time on a common grid",
    description="Each stored histogram (own lo/hi) is resampled, mass-conserving, onto bins "
    "equal bins spanning the lowest lo to the highest hi of the chosen steps.",
)
def get_histograms(
    run_id: RunId,
    store: StoreDep,
    layer: Annotated[str, Query(min_length=1, max_length=wire.MAX_NAME_LEN)],
    start: Start = None,
    end: End = None,
    max_steps: Annotated[int, Query(ge=1, le=MAX_STEPS)] = 200,
    bins: Annotated[int, Query(ge=1, le=wire.MAX_BINS)] = 64,
) -> Any:
    _check_range(start, end)
    try:
        return store.histograms(run_id, layer, start, end, max_steps, bins)
    except RunNotFound:
        raise _missing(run_id) from None


@router.get(
    "/runs/{run_id}/histogram",
    response_model=HistogramAt,
    responses=NOT_FOUND,
    summary="Every layer's histogram and stats at one probe step",
    description="The nearest stored probe step <= step, else the first one.",
)
def get_histogram(
    run_id: RunId, store: StoreDep, step: Annotated[int, Query(ge=0, le=wire.MAX_INT)]
) -> Any:
    try:
        found = store.histogram_at(run_id, step)
    except RunNotFound:
        raise _missing(run_id) from None
    return found if found is not None else {"step": None, "layers": []}


@router.get(
    "/runs/{run_id}/probe_steps",
    response_model=ProbeSteps,
    responses=NOT_FOUND,
    summary="Every step with a stored probe record",
)
def get_probe_steps(run_id: RunId, store: StoreDep) -> Any:
    try:
        return {"steps": store.probe_steps(run_id)}
    except RunNotFound:
        raise _missing(run_id) from None


@router.get(
    "/runs/{run_id}/events",
    response_model=list[Event],
    responses=NOT_FOUND,
    summary="The run's event log (alerts, commands, results, status changes)",
)
def get_events(
    run_id: RunId,
    store: StoreDep,
    kind: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int | None, Query(ge=1, le=100_000, description="the newest N")] = None,
) -> Any:
    if kind is not None and kind not in EVENT_KINDS:  # 'alerts' listed none, as if none fired
        raise _query_error(
            "kind", f"unknown event kind {kind!r}; expected one of {', '.join(sorted(EVENT_KINDS))}"
        )
    try:
        return _text(store.events(run_id, kind, limit))
    except RunNotFound:
        raise _missing(run_id) from None


@router.get(
    "/runs/{run_id}/commands",
    response_model=list[Command],
    responses=NOT_FOUND,
    summary="Every command sent to the run, in cmd_seq order",
)
def get_commands(run_id: RunId, store: StoreDep) -> Any:
    try:
        return _text(store.commands(run_id))
    except RunNotFound:
        raise _missing(run_id) from None


@router.get(
    "/runs/{run_id}/export",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {"application/x-ndjson": {}},
            "description": "JSON Lines: a hello-like header with the run detail, then every "
            "stored frame in seq order",
        },
        **NOT_FOUND,
    },
    summary="Export the whole run as JSON Lines",
)
async def export_run(run_id: RunId, store: StoreDep) -> StreamingResponse:
    try:
        lines: Iterator[str] = await run_in_threadpool(store.export_lines, run_id)
    except RunNotFound:
        raise _missing(run_id) from None
    return StreamingResponse(
        lines,
        media_type="application/x-ndjson",
        headers={"Content-Disposition": f'attachment; filename="{_filename(run_id)}.jsonl"'},
    )
