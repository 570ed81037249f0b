"""experiment — builds and runs one built-in experiment from a validated config.

Owns: turning an experiment config (``wire.EXPERIMENT_SCHEMA``) into data, model,
init, optimizer and device, the training loop instrumented with ``watch()``
(cross-entropy, train accuracy, validation every ``eval_every`` steps in eval
mode), the config's diagnostic-rule settings, fine-tuning (weights loaded from a
checkpoint, layers frozen before the first step), resuming (``--resume``: a checkpoint
of a built-in run holds its config and RNG state, ``ExperimentState``; the run goes on
from it), the ``overfit`` sanity check's pass/fail (a ``sanity`` event), and the
normalisation of a server URL to the trainer socket (``ws://host:port`` -> ``.../ws/trainer``).

Never: syncs with the device inside the loop (loss and accuracy stay tensors;
the only host reads are for the summary after training), talks to the server
itself (``watch`` does), or imports ``layerscope.server``.
"""

from __future__ import annotations

import copy
import itertools
import os
import re
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from layerscope.trainer import wire
from layerscope.trainer.alerts import LAST_GOOD_NAME
from layerscope.trainer.checkpoint import (
    CheckpointError,
    ReadCheckpoint,
    load_model_weights,
    newest_checkpoint,
    read_checkpoint,
)
from layerscope.trainer.control import layer_names_hint, unknown_layers
from layerscope.trainer.data import Batches, DataError, Dataset, add_input_noise, load_dataset
from layerscope.trainer.distributed import (
    data_parallel,
    end_process_group,
    shard,
    shard_size,
    start_process_group,
)
from layerscope.trainer.experiment_config import validate_resumed
from layerscope.trainer.inits import init_weights
from layerscope.trainer.link import trainer_url
from layerscope.trainer.models import build_model
from torch import nn

MOMENTUM = 0.9  # the "momentum" optimizer choice: SGD with classical momentum
HISTOGRAM_BINS = 64
EVAL_CHUNK = 4096  # validation batch; bounds memory on a large npz data set
# The longest list of a .npz's labels the run's config shows (it travels in the hello,
# at most wire.MAX_CONFIG_BYTES, and is one line on the run page).
MAX_LABELS_CONFIG_CHARS = 500


# The checkpoint_extras name a built-in run's checkpoints keep its ExperimentState under.
EXPERIMENT_EXTRA = "experiment"
EXPERIMENT_STATE_FORMAT = "layerscope-experiment-1"


class ExperimentSetupError(RuntimeError):
    """The config is valid but this machine cannot run it (e.g. cuda without a GPU)."""


class ExperimentState:
    """A built-in run's ``checkpoint_extras[EXPERIMENT_EXTRA]``: every checkpoint it
    writes (the dashboard's Checkpoint, ``last-good.pt``) holds the experiment's config,
    so ``layerscope train --resume`` needs no flags, and the global RNG state at the
    checkpoint's step (the input noise and dropout draw on as they would have); loading
    it (``watch(resume=...)``) puts that RNG state back. Its ``state_dict`` runs on the
    training thread at each checkpoint: a host copy of the RNG state (on CUDA the
    generator's seed and offset, host values: no device sync)."""

    def __init__(self, cfg: dict[str, Any], device: torch.device) -> None:
        self.cfg = cfg
        self.device = device

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "format": EXPERIMENT_STATE_FORMAT,
            "config": copy.deepcopy(self.cfg),
            "rng": torch.get_rng_state(),
        }
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not _is_experiment_state(state):
            raise ValueError("not a built-in experiment's state")
        torch.set_rng_state(state["rng"])
        cuda_rng = state.get("cuda_rng")
        if isinstance(cuda_rng, torch.Tensor) and self.device.type == "cuda":
            torch.cuda.set_rng_state(cuda_rng, self.device)


def _is_experiment_state(state: Any) -> bool:
    return (
        isinstance(state, dict)
        and state.get("format") == EXPERIMENT_STATE_FORMAT
        and isinstance(state.get("config"), dict)
        and isinstance(state.get("rng"), torch.Tensor)
    )


@dataclass
class Resume:
    """A built-in run's checkpoint to go on from (``read_resume``)."""

    path: Path
    step: int
    config: dict[str, Any]  # the experiment it ran, as stored (validated when it ran)
    run_id: str | None  # the run it continues
    # the file as read_resume read it, until watch() takes it (take_checkpoint)
    checkpoint: ReadCheckpoint | None = field(default=None, repr=False, compare=False)

    def take_checkpoint(self) -> ReadCheckpoint | str:
        """What ``watch(resume=...)`` loads: the checkpoint as ``read_resume`` read it, so
        the file is read once (its path once taken: the content, a host copy of the model
        and optimizer state, is not kept for the whole run)."""
        read, self.checkpoint = self.checkpoint, None
        return read if read is not None else str(self.path)


def read_resume(source: str | os.PathLike[str]) -> Resume:
    """The checkpoint ``layerscope train --resume SOURCE`` goes on from: a
    ``checkpoint-<step>.pt`` of a built-in run, or a run folder (its newest such file).
    Every refusal is an ExperimentSetupError of one line, raised before anything is
    written: no such file or folder, not a checkpoint, or one without an experiment (a
    user's own loop's, or one written before checkpoints held their experiment)."""
    path = Path(source)
    if path.is_dir():
        found = newest_checkpoint(path)
        if found is None:
            good = path / LAST_GOOD_NAME
            hint = (
                f"; it holds {LAST_GOOD_NAME}, the last state whose numbers were all finite: "
                f"--resume {good} goes on from that"
                if good.is_file()
                else ""
            )
            raise ExperimentSetupError(
                f"--resume {source}: no checkpoint-<step>.pt in this folder (the dashboard's "
                f"Checkpoint writes one into the run's folder){hint}"
            )
        path = found
    try:
        content, _ = read_checkpoint(path)
    except CheckpointError as exc:
        raise ExperimentSetupError(f"--resume: {exc}") from None
    extras = content.get("extras")
    state = extras.get(EXPERIMENT_EXTRA) if isinstance(extras, dict) else None
    if not _is_experiment_state(state) or not isinstance(content.get("model"), dict):
        raise ExperimentSetupError(
            f"--resume {path}: not a checkpoint of a built-in experiment (`layerscope train`): "
            "one from watch() in your own training loop resumes there with watch(resume=...); "
            "one from a layerscope older than --resume holds no experiment config (start "
            "from its weights with --from and the run's flags)"
        )
    assert state is not None
    run_id = content.get("run_id")
    return Resume(
        path,
        content["step"],
        state["config"],
        run_id if isinstance(run_id, str) else None,
        ReadCheckpoint(path, content),
    )


def trainer_socket_url(server: str) -> str:
    """A server base URL (``ws://host:port``, ``http://host:port``) or a full trainer
    socket URL, as the full ``ws(s)://host:port/.../ws/trainer`` URL ``watch`` connects to:
    ``link.trainer_url``, the one reading of a server URL."""
    return trainer_url(server)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ExperimentSetupError("device cuda was asked for but torch sees no CUDA device")
    return torch.device(name)


def build_optimizer(
    name: str, params: Any, lr: float, weight_decay: float
) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    if name == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=MOMENTUM, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}")


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy and accuracy over (x, y) in eval mode, as device tensors."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device)
    for i in range(0, len(x), EVAL_CHUNK):
        logits = model(x[i : i + EVAL_CHUNK])
        target = y[i : i + EVAL_CHUNK]
        loss_sum += nn.functional.cross_entropy(logits, target, reduction="sum")
        correct += (logits.argmax(dim=1) == target).sum()
    model.train(was_training)
    n = max(len(x), 1)
    return loss_sum / n, correct / n


def build(cfg: dict[str, Any]) -> tuple[Dataset, nn.Module, torch.optim.Optimizer, torch.device]:
    """Seeded data, initialised model and optimizer, everything on the chosen device.

    cuDNN is set to deterministic algorithms with its benchmark (per-shape algorithm
    search) off, so that the same seed gives the same CNN run on CUDA too: by default
    it may pick nondeterministic algorithms. A built-in run owns its process, so the
    global switch is ours to set."""
    model_cfg, solver = cfg["model"], cfg["solver"]
    device = resolve_device(solver["device"])
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.manual_seed(solver["seed"])
    data = load_dataset(cfg["data"], solver["seed"]).to(device)
    _check_batch_norm_examples(model_cfg, cfg["data"], data)
    model = build_model(model_cfg, data.input_shape, data.num_classes)
    init_weights(
        model, model_cfg["init"], activation=model_cfg["activation"], std=model_cfg["init_std"]
    )
    model.to(device)
    optimizer = build_optimizer(
        solver["optimizer"], model.parameters(), solver["lr"], solver["weight_decay"]
    )
    return data, model, optimizer, device


def _check_batch_norm_examples(
    model_cfg: dict[str, Any], data_cfg: dict[str, Any], data: Dataset
) -> None:
    """Batch norm cannot train on one example (its batch variance is undefined): a set the
    validation split leaves one training example of is refused before the run starts, as
    validation refuses ``subset``/``overfit`` 1 (a file's size is only known once read)."""
    n = len(data.x_train)
    if model_cfg["batch_norm"] and n < 2:
        total = n + len(data.x_val)
        source = data_cfg.get("path") or data.name
        raise DataError(
            f"data.val_fraction: batch norm needs at least 2 training examples; holding "
            f"out {data_cfg['val_fraction']} of the {total} samples in {source} for "
            f"validation leaves {n} (lower val_fraction, add data or turn batch norm off)"
        )


def run_experiment(
    cfg: dict[str, Any],
    *,
    server: str | None,
    run_id: str | None = None,
    token: str | None = None,
    run_dir: str | None = None,
    progress: bool = True,
    resume: Resume | None = None,
    announce: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train the experiment ``cfg`` describes under ``watch()``; returns a summary dict.

    ``server`` None records to the local spool only. The summary holds the steps
    done, final train/val loss and accuracy, whether it was stopped from the
    dashboard, and for ``overfit`` runs ``{"n", "train_acc", "passed"}``.

    The overfit check always runs the whole step budget (deciding earlier would need a
    host read inside the loop) and then measures accuracy on the whole training subset
    in eval mode; the verdict is also recorded as a ``sanity`` event. With
    ``finetune.from_checkpoint`` the model's weights come from a checkpoint file (the
    optimizer starts fresh: its state belongs to the old lr and the old frozen set);
    ``finetune.freeze`` is applied as a ``set_frozen`` command before the first step, so
    the acknowledged state shows the layers frozen and they can be unfrozen live.

    ``resume`` (``read_resume``; ``cfg`` is then ``resume_config``'s): the run goes on
    from that checkpoint as a new run (its own id; its config's ``resumed_from`` names
    the checkpoint): the model, the optimizer state and the RNG state are loaded, the
    checkpoint's lr scale, weight decay switch and frozen layers re-applied (as
    acknowledged commands; not ``finetune``'s load and freeze, nor auto weight decay's
    start: they happened before the checkpoint), and steps go on from its step to the
    config's total. The data order is the one the run would have had: the seeded
    shuffle is replayed up to the checkpoint's step (its permutations drawn and its
    batches sliced again: about 10 us a step skipped, 0.2 s for the demo's 20000 steps),
    and the global RNG (input noise, dropout) is put back as it was; on the same device
    the resumed run's numbers are the uninterrupted run's. The diagnostic rules go on
    from the checkpoint's history (auto-halve's plateau count, Overfit's streak and
    whether auto weight decay acted, the loss windows, the alerts already raised), as the
    link thread had evaluated it when the checkpoint was taken (the evaluation just
    before may be missing); a checkpoint without it (an older layerscope's) starts them
    afresh.

    ``announce``: called on rank 0 with the run's id (a new one when ``run_id`` is None)
    once the data and model are built, just before ``watch()`` starts (and draws its
    progress line): ``layerscope train`` prints the run's dashboard URL with it.
    """
    cfg = wire.validate_experiment(cfg) if resume is None else validate_resumed(cfg)
    url = trainer_socket_url(server) if server else None
    resolve_device(cfg["solver"]["device"])  # cuda without a GPU: one clear error, first
    # Under torchrun: every rank builds the same seeded model and data, trains on its
    # shard of each batch through DDP; rank 0 alone streams (watch decides).
    rank, world, owned = start_process_group(cfg["solver"]["device"])
    finished = False
    try:
        summary = _train(cfg, url, rank, world, run_id, token, run_dir, progress, resume, announce)
        finished = True
    finally:
        # _train has returned, so its DDP wrapper (which holds the group) is gone.
        end_process_group(owned, finished)
    return summary


def _train(
    cfg: dict[str, Any],
    url: str | None,
    rank: int,
    world: int,
    run_id: str | None,
    token: str | None,
    run_dir: str | None,
    progress: bool,
    resume: Resume | None = None,
    announce: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    from layerscope.trainer.watch import Watch

    solver = cfg["solver"]
    data, model, optimizer, device = build(cfg)
    finetune, rules = cfg["finetune"], cfg["rules"]
    loaded = None
    if finetune["from_checkpoint"] is not None and resume is None:
        try:
            loaded = load_model_weights(model, finetune["from_checkpoint"])
        except CheckpointError as exc:
            raise ExperimentSetupError(str(exc)) from None
    _check_freeze(model, finetune["freeze"])
    batches = Batches(len(data.x_train), solver["batch_size"], solver["seed"], device)
    rank_batch = shard_size(batches.size, rank, world)
    total_steps = solver["steps"] or solver["epochs"] * batches.steps_per_epoch
    steps_done = 0 if resume is None else resume.step  # steps go on from the checkpoint's
    if steps_done >= total_steps:
        assert resume is not None
        length = (
            f"solver.steps {total_steps}"
            if solver["steps"]
            else f"solver.epochs {solver['epochs']}: {total_steps} steps"
        )
        raise ExperimentSetupError(
            f"--resume {resume.path}: it is at step {steps_done}, the end of this run "
            f"({length}); pass --steps N with N > {steps_done} to train it further"
        )
    # The same batches in the same order as the run would have had: the seeded shuffle
    # replayed past the steps already trained.
    stream = itertools.islice(iter(batches), steps_done, None)
    trained = data_parallel(model)
    noise_std = cfg["data"]["input_noise"]
    has_val = len(data.x_val) > 0
    loss = acc = val_loss = val_acc = None
    started = time.monotonic()
    model.train()
    resumed = _resumed_message(resume, total_steps) if resume is not None else None
    if announce is not None and rank == 0:  # before watch() draws its progress line
        run_id = run_id or uuid.uuid4().hex  # watch() would make the same kind of id
        announce(run_id)
    if resumed is not None and rank == 0:
        print(f"layerscope train: {resumed}", file=sys.stderr, flush=True)
    # watch()'s arguments, and no dashboard line: announce printed the CLI's own
    with Watch(
        model,
        optimizer,
        run=cfg["name"],
        server=url,
        every=cfg["every"],
        bins=HISTOGRAM_BINS,
        layers=None,
        exclude=None,
        types=None,
        activations=None,
        config=_run_config(cfg, world, data),
        run_id=run_id,
        token=token,
        run_dir=run_dir,
        batch_size=rank_batch,
        progress=progress,
        rules=wire.experiment_rule_names(rules["enabled"]),
        silence=wire.experiment_rule_names(rules["silence"]),
        auto_halve_lr=rules["auto_halve_lr"],
        auto_weight_decay=rules["auto_weight_decay"],
        patience=rules["patience"],
        # every checkpoint holds the experiment (its config, the RNG state): --resume
        checkpoint_extras={EXPERIMENT_EXTRA: ExperimentState(cfg, device)},
        resume=resume.take_checkpoint() if resume is not None else None,  # read once
        dashboard_line=False,
    ) as w:
        if w.alerts is not None:  # a rule's stop is logged without "w.should_stop is now True"
            w.alerts.stop_note = ""
        if resume is None:
            _start(w, finetune, loaded)
        else:
            w.event(
                "log", {"message": resumed, "resumed_from": str(resume.path), "step": resume.step}
            )
        _note_full_batch(w, solver["batch_size"], batches.size, rank)
        stopped = False
        for batch in stream:
            idx = shard(batch, rank, world)
            x = add_input_noise(data.x_train[idx], noise_std)
            target = data.y_train[idx]
            logits = trained(x)
            loss = nn.functional.cross_entropy(logits, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss = loss.detach()
            acc = (logits.detach().argmax(dim=1) == target).float().mean()
            steps_done += 1
            w.step(loss=loss, acc=acc)
            if has_val and (steps_done % solver["eval_every"] == 0 or steps_done == total_steps):
                val_loss, val_acc = evaluate(model, data.x_val, data.y_val)
                w.eval(val_loss=val_loss, val_acc=val_acc)
            if w.should_stop:
                stopped = True
                break
            if steps_done >= total_steps:
                break
        if not stopped:
            # the rules' verdict on the last steps: a NaN there is a rule's stop (exit 3)
            w.settle()
            stopped = w.should_stop
        check = None
        if cfg["overfit"] is not None:
            check = _sanity_check(w, model, data, steps_done, total_steps)
    summary: dict[str, Any] = {
        "run_id": w.run_id,
        "run_dir": str(w.run_dir),
        "name": cfg["name"],
        "device": str(device),
        "steps": steps_done,
        "epochs": round(steps_done / batches.steps_per_epoch, 3),
        "train_examples": len(data.x_train),
        "rank": rank,
        "world_size": world,
        "stopped": stopped,
        "resumed_at": None if resume is None else resume.step,
        # Who stopped it: "user" (the dashboard's Stop), "rule" (the NaN rule with no server
        # to resume its pause), "api"; and the stop command's reason.
        "stopped_by": by["source"] if stopped and (by := w.control.stopped_by) else None,
        "stop_reason": by["reason"] if stopped and (by := w.control.stopped_by) else None,
        # Host reads happen here, once, after training.
        "train_loss": None if loss is None else float(loss),
        "train_acc": None if acc is None else float(acc),
        "val_loss": None if val_loss is None else float(val_loss),
        "val_acc": None if val_acc is None else float(val_acc),
        "elapsed_s": round(time.monotonic() - started, 3),
        "overfit": check,
    }
    return summary


def _run_config(cfg: dict[str, Any], world: int, data: Dataset) -> dict[str, Any]:
    """The config shown beside the run: the experiment's, plus the ranks under torchrun and,
    for a .npz whose labels are not 0..K-1, ``data.labels``: the file's label of each class
    index in order ({0, 255} trained as classes 0 and 1: ``"0, 255"``). A string, since
    the run page shows scalar settings; a long list is cut to its first labels, the last
    and the count."""
    out = cfg if world == 1 else {**cfg, "world_size": world}
    if data.labels is None:
        return out
    shown = ", ".join(str(v) for v in data.labels)
    if len(shown) > MAX_LABELS_CONFIG_CHARS:
        head = shown[:MAX_LABELS_CONFIG_CHARS].rsplit(", ", 1)[0]
        shown = f"{head}, ..., {data.labels[-1]} ({len(data.labels)} labels)"
    return {**out, "data": {**out["data"], "labels": shown}}


def _check_freeze(model: nn.Module, freeze: str | None) -> None:
    """``finetune.freeze`` names this model's layers: checked before the run is recorded,
    one message naming the layers it has (not a failed command as well)."""
    unknown = unknown_layers(model, [n for n in (freeze or "").split(",") if n])
    if unknown:
        raise ExperimentSetupError(
            f"finetune.freeze: unknown layer(s) {', '.join(unknown)}; {layer_names_hint(model)}"
        )


def _start(w: Any, finetune: dict[str, Any], loaded: dict[str, Any] | None) -> None:
    """Before the first step: say what was loaded, and freeze (watch() itself holds weight
    decay off under auto weight decay)."""
    freeze = [n for n in (finetune["freeze"] or "").split(",") if n]
    if freeze:
        result = w.command("set_frozen", {"layers": freeze, "frozen": True}, reason="--freeze")
        if not result["ok"]:
            raise ExperimentSetupError(f"finetune.freeze: {result['error']}")
    if loaded is not None or freeze:
        parts = []
        if loaded is not None:
            parts.append(
                f"loaded {loaded['tensors']} model tensors from {loaded['path']} (saved at "
                f"step {loaded['step']}); the optimizer starts fresh"
            )
        if freeze:
            parts.append(f"frozen: {', '.join(freeze)}")
        data = {"message": "; ".join(parts), "from_checkpoint": finetune["from_checkpoint"]}
        w.event("log", {**data, "frozen": freeze})


def _resumed_message(resume: Resume, total: int) -> str:
    """Where a resumed run goes on from: a line on rank 0's stderr and a ``log`` event on
    the dashboard (beside the restored commands' results)."""
    of = f" (run {resume.run_id})" if resume.run_id else ""
    return (
        f"resuming from {resume.path}{of} at step {resume.step}: model, optimizer, RNG and "
        f"steering restored, the data order goes on; training to step {total}"
    )


def _note_full_batch(w: Any, asked: int, size: int, rank: int) -> None:
    """A batch size above the training set's size trains full-batch on what there is:
    said once (a ``log`` event on the dashboard, a line on rank 0's stderr), since the config
    shown beside the run still holds the size that was asked for."""
    if asked <= size:
        return  # 0 (full batch by request) or a batch that fits
    message = (
        f"batch size {asked} is larger than the {size} training examples: every step "
        f"trains on all {size} (full-batch gradient descent)"
    )
    w.event("log", {"message": message, "batch_size": asked, "train_examples": size})
    if rank == 0:
        print(f"layerscope train: {message}", file=sys.stderr)


def _sanity_check(
    w: Any, model: nn.Module, data: Dataset, steps: int, budget: int
) -> dict[str, Any]:
    """The overfit check's verdict (100% on the training subset), also sent as an event."""
    _, fit_acc = evaluate(model, data.x_train, data.y_train)
    n = len(data.x_train)
    train_acc = float(fit_acc)  # the one host read, after training
    passed = round(train_acc * n) == n
    if passed:
        message = f"PASS: 100% training accuracy on {n} examples within {steps} steps"
    else:
        message = (
            f"FAIL: {train_acc:.2%} training accuracy on {n} examples after {steps} of "
            f"{budget} steps; with regularisation off a working network reaches 100%. Check "
            "the learning rate, the init and the code."
        )
    w.event(
        "sanity",
        {
            "passed": passed,
            "train_acc": train_acc,
            "steps": steps,
            "examples": n,
            "message": message,
        },
    )
    return {"n": n, "train_acc": train_acc, "passed": passed}


def describe(summary: dict[str, Any]) -> str:
    """The lines ``layerscope train`` prints when a run ends."""

    def fmt(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    stopped = ""
    if summary["stopped"]:
        by, reason = summary.get("stopped_by"), summary.get("stop_reason")
        # the rule's reason starts with what it saw ("NaN/Inf in the training loss at step 4")
        seen = re.match(r"[^:;]*? at step \d+", reason or "")
        cause = f": {seen.group(0)}" if seen else ""
        stopped = f" (stopped by a rule{cause})" if by == "rule" else " (stopped)"
    if summary.get("resumed_at") is not None:
        stopped = f" (resumed at step {summary['resumed_at']}){stopped}"
    lines = [
        f"run {summary['run_id']} ({summary['name']}) on {summary['device']}: "
        f"{summary['steps']} steps{stopped}",
        f"  train loss {fmt(summary['train_loss'])}  acc {fmt(summary['train_acc'])}"
        f"  |  val loss {fmt(summary['val_loss'])}  acc {fmt(summary['val_acc'])}",
    ]
    check = summary.get("overfit")
    if check is not None:
        verdict = "PASS" if check["passed"] else "FAIL"
        lines.append(
            f"  overfit check: {verdict} — train accuracy {check['train_acc']:.2%} on "
            f"{check['n']} examples (must be 100% with regularisation off)"
        )
    return "\n".join(lines)
