"""labs — the init lab: one network, data and seed launched under five initialisations.

Owns: ``POST /api/labs/init`` (build five experiment configs from one base that
differ only in ``model.init`` / ``model.init_std`` — zero, small normal (std 0.01),
large normal (std 1.0), Xavier, He — validate every one before launching any, check
the launch cap has room for all five, launch them through ``app.state.launcher``),
``GET /api/labs`` and ``GET /api/labs/{id}``, and the lab record that groups the
runs: ``<data_dir>/labs/<lab_id>.json`` (the run configs stay exactly what the
trainer's schema accepts, so grouping lives beside the store, not in it).

Never: imports torch or trainer code beyond ``wire``, launches a partial lab when a
config is bad or the cap is short, or reads a lab file outside ``data_dir/labs``.
"""

from __future__ import annotations

import copy
import json
import re
import time
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Body, HTTPException, Request
from layerscope.server.launcher import Launcher, LaunchRefused
from layerscope.trainer import wire

LAB_RUNS = 5
# (scheme key, label, model fields): the five initialisations PRACTICES.md contrasts.
SCHEMES: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("zero", "zero", {"init": "zero"}),
    ("small_normal", "normal 0.01", {"init": "normal", "init_std": 0.01}),
    ("large_normal", "normal 1.0", {"init": "normal", "init_std": 1.0}),
    ("xavier", "xavier", {"init": "xavier"}),
    ("he", "he", {"init": "he"}),
)
# Deep enough that small normal init visibly shrinks activations layer by layer,
# small enough that five runs train side by side on a laptop CPU.
DEFAULTS: dict[str, Any] = {
    "activation": "tanh",
    "batch_norm": False,
    "depth": 6,
    "width": 64,
    "steps": 500,
    "every": 10,
    "dataset": "digits",
    "seed": 0,
    "lr": 0.01,
    "device": "auto",
}
BODY_TYPES: dict[str, tuple[type, ...]] = {
    "activation": (str,),
    "batch_norm": (bool,),
    "depth": (int,),
    "width": (int,),
    "steps": (int,),
    "every": (int,),
    "dataset": (str,),
    "seed": (int,),
    "lr": (int, float),
    "device": (str,),
}
LAB_ID = re.compile(r"^[a-z0-9]{6,32}$")


def _error(loc: list[str], msg: str) -> dict[str, Any]:
    return {"loc": loc, "msg": msg}


def lab_body(body: Any) -> dict[str, Any]:
    """The request body with defaults filled; raises LaunchRefused(422) naming each bad key."""
    if not isinstance(body, dict):
        raise LaunchRefused(422, [_error([], f"body must be an object, got {type(body).__name__}")])
    # A lone surrogate ("\\udc80") in a key or value: named, not quoted back raw in an
    # "unknown field" error the answer could not encode (a 500).
    errors = wire.surrogate_errors(body)
    if errors:
        raise LaunchRefused(422, errors)
    for key, value in body.items():
        types = BODY_TYPES.get(key)
        if types is None:
            errors.append(_error([key], f"unknown field; expected {', '.join(BODY_TYPES)}"))
        elif isinstance(value, bool) and bool not in types or not isinstance(value, types):
            names = " or ".join(t.__name__ for t in types)
            errors.append(_error([key], f"must be {names}, got {type(value).__name__} {value!r}"))
    if errors:
        raise LaunchRefused(422, errors)
    return {**DEFAULTS, **body}


def lab_configs(params: dict[str, Any], lab_id: str) -> list[tuple[str, str, dict[str, Any]]]:
    """Five validated configs (scheme, label, config); raises LaunchRefused(422) if any is bad."""
    base = {
        "every": params["every"],
        "model": {
            "arch": "mlp",
            "depth": params["depth"],
            "width": params["width"],
            "activation": params["activation"],
            "batch_norm": params["batch_norm"],
        },
        "data": {"dataset": params["dataset"], "preprocess": "per_pixel"}
        if params["dataset"] in wire.IMAGE_DATASETS
        else {"dataset": params["dataset"]},
        "solver": {
            "optimizer": "sgd",
            "lr": params["lr"],
            "batch_size": 32,
            "steps": params["steps"],
            "eval_every": max(params["every"], 50),
            "seed": params["seed"],
            "device": params["device"],
        },
    }
    out = []
    for scheme, label, model in SCHEMES:
        cfg = copy.deepcopy(base)
        cfg["model"].update(model)
        bn = " bn" if params["batch_norm"] else ""
        cfg["name"] = f"init lab {lab_id}: {label} ({params['activation']}{bn})"
        try:
            out.append((scheme, label, wire.validate_experiment(cfg)))
        except wire.ExperimentError as exc:
            raise LaunchRefused(422, exc.errors) from None
    return out


class Labs:
    """Lab records as JSON files under ``data_dir/labs``."""

    def __init__(self, data_dir: Path) -> None:
        self.folder = data_dir / "labs"

    def path(self, lab_id: str) -> Path | None:
        return self.folder / f"{lab_id}.json" if LAB_ID.match(lab_id) else None

    def save(self, record: dict[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{record['id']}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=2))
        tmp.replace(path)  # a reader never sees half a record

    def load(self, lab_id: str) -> dict[str, Any] | None:
        path = self.path(lab_id)
        if path is None or not path.is_file():
            return None
        record: dict[str, Any] = json.loads(path.read_text())
        return record

    def all(self) -> list[dict[str, Any]]:
        if not self.folder.is_dir():
            return []
        records = [self.load(p.stem) for p in self.folder.glob("*.json")]
        return sorted((r for r in records if r), key=lambda r: -r["created_at"])


async def launch_init_lab(launcher: Launcher, body: Any) -> dict[str, Any]:
    params = lab_body(body)
    lab_id = wire.new_id()[:8]
    configs = lab_configs(params, lab_id)
    cap = launcher.settings.max_launched
    if cap < LAB_RUNS:
        raise LaunchRefused(
            429,
            f"the init lab launches {LAB_RUNS} runs but this server allows {cap} launched runs "
            f"at once; restart it with --max-launched {LAB_RUNS} or more",
        )
    running = launcher.busy()
    if running + LAB_RUNS > cap:
        raise LaunchRefused(
            429,
            f"{running} launched runs are running and the lab needs {LAB_RUNS} more "
            f"(limit {cap}); stop {running + LAB_RUNS - cap} first",
        )
    # Held at once, before any await: two labs (or a lab and single launches) at the same
    # moment cannot both pass the check and start part of their runs each.
    launcher.hold(LAB_RUNS)
    tried = 0
    runs: list[dict[str, Any]] = []
    record = {
        "id": lab_id,
        "kind": "init",
        "created_at": time.time(),
        "params": params,
        "runs": runs,
    }
    try:
        for scheme, label, config in configs:
            tried += 1
            run_id = await launcher.launch(config, held=True)
            runs.append({"id": run_id, "scheme": scheme, "label": label})
    finally:
        launcher.release(LAB_RUNS - tried)  # each launch tried let its own go
        # Even if a launch fails half-way (the OS refused a process), the runs that did
        # start stay findable as one lab.
        if runs:
            Labs(launcher.settings.data_dir).save(record)
    return record


router = APIRouter(prefix="/api/labs", tags=["labs"])


def _with_status(request: Request, record: dict[str, Any]) -> dict[str, Any]:
    store = request.app.state.store
    out = dict(record)
    out["runs"] = []
    for run in record["runs"]:
        detail = store.run(run["id"])
        out["runs"].append({**run, "status": detail["status"] if detail else "deleted"})
    out["url"] = f"/labs/{record['id']}"
    return out


@router.post("/init", status_code=201)
async def init_lab(request: Request, body: Annotated[Any, Body()]) -> dict[str, Any]:
    """Launch the five-scheme init lab; 422 lists bad fields, 429 when the cap has no room."""
    try:
        record = await launch_init_lab(request.app.state.launcher, body)
    except LaunchRefused as exc:
        raise HTTPException(exc.status, exc.detail) from None
    return {
        "lab_id": record["id"],
        "runs": [
            {"id": r["id"], "scheme": r["scheme"], "label": r["label"]} for r in record["runs"]
        ],
        "url": f"/labs/{record['id']}",
    }


@router.get("")
def list_labs(request: Request) -> list[dict[str, Any]]:
    return [_with_status(request, r) for r in Labs(request.app.state.settings.data_dir).all()]


@router.get("/{lab_id}")
def get_lab(request: Request, lab_id: str) -> dict[str, Any]:
    record = Labs(request.app.state.settings.data_dir).load(lab_id)
    if record is None:
        raise HTTPException(404, f"lab {lab_id[:64]!r} not found")
    return _with_status(request, record)
