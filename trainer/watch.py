"""watch — the three lines a training script adds (STYLE "The user's three lines").

Owns: ``watch(...)`` and the ``Watch`` it returns: numbering steps, keeping
per-step scalars on the device until a flush (``flush`` does the one host
copy and its decoding), deciding which steps are probe steps and which of them
snapshot the model for the last good checkpoint, and wiring probes, control,
the diagnostic rules (evaluated by ``alerts`` on the link thread), the link and,
under torch.distributed, the process group (``distributed``) together.

Never: syncs with the device per step (no ``.item()``, ``float(tensor)`` or
``.cpu()`` on the training thread: the link thread reads the host copy after
the event), touches the network or raises because a server is missing, or
leaves hooks behind after ``close()``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import threading
import time
import types as pytypes
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from layerscope.trainer import wire
from layerscope.trainer.alerts import DEFAULT_GOOD_CHECKPOINT_EVERY, GOOD_CHECKPOINT_MIN_S, Alerts
from layerscope.trainer.checkpoint import (
    CheckpointError,
    ReadCheckpoint,
    check_extras,
    load_training_state,
    plain_name,
    read_checkpoint,
    restore_commands,
    unwrapped,
)
from layerscope.trainer.control import Control
from layerscope.trainer.distributed import Distributed
from layerscope.trainer.flush import Flush, Row, on_one_device, to_host
from layerscope.trainer.link import Link, dashboard_url
from layerscope.trainer.probes import PendingStats, Probes
from layerscope.trainer.rules import AUTO_WEIGHT_DECAY_START, PATIENCE, Rules
from torch import nn

log = logging.getLogger(__name__)

DEFAULT_EVERY = 100  # probe cadence in steps: the largest per-probe-step cost measured by
# benchmarks/overhead.py (about 2.5 training steps, 10-layer tanh MLP on CPU) stays under 3%
FLUSH_INTERVAL_S = 0.5  # host wall time between flushes of buffered step values
MAX_ROWS_PER_FLUSH = 2_000  # bounds one metrics frame well under wire.MAX_FRAME_BYTES
# The most training forward passes (grad enabled) one probe step records. Each pass
# leaves its statistics on the device until the step's w.step(): a watch whose loop runs
# forward passes and never steps (inference without no_grad, a loop that forgot
# w.step()) grew by every pass, for as long as it ran. Past this many, the probes' forward
# hooks come off until the next probe step; the step describes its first passes (e.g.
# of a gradient accumulation over more micro-batches, then without update_ratio).
MAX_PROBE_PASSES = 64

Scalar = float | int | torch.Tensor


class Watch:
    """An instrumented training run; create it with :func:`watch`. (``dashboard_line``
    False: no dashboard line at start; ``layerscope train`` prints its own.)"""

    def __init__(
        self,
        model: nn.Module | None,
        optimizer: torch.optim.Optimizer | None,
        *,
        run: str | None,
        server: str | None,
        every: int,
        bins: int,
        layers: str | Iterable[str] | None,
        exclude: str | Iterable[str] | None,
        types: Iterable[type[nn.Module]] | None,
        activations: dict[str, str] | None,
        config: dict[str, Any] | None,
        run_id: str | None,
        token: str | None,
        run_dir: str | os.PathLike[str] | None,
        batch_size: int | None,
        progress: bool,
        rules: bool | Iterable[str] = True,
        silence: Iterable[str] = (),
        auto_halve_lr: bool = False,
        auto_weight_decay: bool = False,
        patience: int = PATIENCE,
        rule_thresholds: dict[str, Any] | None = None,
        good_checkpoint_every: int = DEFAULT_GOOD_CHECKPOINT_EVERY,
        checkpoint_extras: dict[str, Any] | None = None,
        resume: str | os.PathLike[str] | dict[str, Any] | ReadCheckpoint | None = None,
        dashboard_line: bool = True,
    ) -> None:
        outer = model  # as the loop calls it: Probes runs its compiled wrappers eagerly
        model = unwrapped(model) if model is not None else None
        _check_optimizer(optimizer)
        if model is not None:
            _check_initialized(model)
        if good_checkpoint_every < 0:
            raise ValueError(f"good_checkpoint_every must be >= 0, got {good_checkpoint_every}")
        if every < 0:
            raise ValueError(f"every must be >= 0 (0 turns probes off), got {every}")
        if batch_size is not None and batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        # it names the run's folder (./layerscope-runs/<run_id>): never a path elsewhere;
        # and the server refuses what its hello would refuse: said here, before training
        problem = wire.run_id_problem(run_id) if run_id else None
        if problem is not None:
            raise ValueError(f"run_id {run_id!r} {problem}")
        try:
            enabled = None if rules is True else [] if rules is False else list(rules)
            self.rules = Rules(
                enabled,
                silence,
                auto_halve_lr,
                auto_weight_decay,
                patience,
                **(rule_thresholds or {}),
            )
        except ValueError as exc:
            raise ValueError(f"watch(): {exc}") from None
        self.run_id = run_id or uuid.uuid4().hex
        self.model = model
        self.optimizer = optimizer
        self.every = every
        self.batch_size = batch_size
        extras = check_extras(checkpoint_extras)
        resumed: dict[str, Any] | None = None
        restore: list[tuple[str, dict[str, Any]]] = []
        label = ""
        if resume is not None:
            # Everything the checkpoint holds goes back before any hook exists (a refusal
            # leaves nothing behind); its control state is applied once the link runs, as
            # commands, so the run page's log and acknowledged state show it.
            content, label = read_checkpoint(resume)
            if content.get("rules") is not None:  # none in older checkpoints: start afresh
                try:
                    self.rules.load_state_dict(content["rules"])
                except ValueError as exc:
                    raise CheckpointError(f"resume from {label}: {exc}") from None
            load_training_state(content, label, model, optimizer, extras)
            restore = restore_commands(content.get("control"))
            where = label
            if isinstance(resume, (str, os.PathLike, ReadCheckpoint)):
                where = str(resume.path if isinstance(resume, ReadCheckpoint) else resume)
            resumed = {"checkpoint": where, "step": content["step"]}
            if isinstance(content.get("run_id"), str):
                resumed["run_id"] = content["run_id"]
        # Steps continue from a resumed checkpoint's (checkpoint-500.pt: the first
        # w.step() is step 501), so the charts, the compare view and the checkpoint names
        # line up with the run it continues.
        self.step_count = resumed["step"] if resumed is not None else 0
        self._first_step = self.step_count + 1
        self.run_dir = (
            Path(run_dir) if run_dir is not None else Path("layerscope-runs") / self.run_id
        )
        self._closed = False
        self._rows: list[Row] = []
        self._device_values: list[torch.Tensor] = []
        self._group_keys: list[tuple[str, str]] = []  # each param group's lr/decay series
        self._known_names: set[str] = set()
        self._device = _model_device(model)
        self._progress_enabled = progress
        self._progress_row: dict[str, Any] = {"step": self.step_count, "values": {}}
        # made once nothing can refuse this watch (below): a refused one left its filter on
        # the trainer's loggers for the rest of the process
        self._progress_line: ProgressLine | None = None
        self._good_every = good_checkpoint_every
        self._good_t = -math.inf  # when the last snapshot for it was taken
        self._probe_count = 0
        # While the probes are armed: a forward hook on the model counting its training
        # passes (see MAX_PROBE_PASSES), and the count.
        self._pass_hook: torch.utils.hooks.RemovableHandle | None = None
        self._count_hook: Any = None
        self._passes = 0
        self._told_passes = False  # the MAX_PROBE_PASSES notice was given
        self.alerts: Alerts | None = None

        server = os.environ.get("LAYERSCOPE_SERVER") if server is None else server
        token = token if token is not None else os.environ.get("LAYERSCOPE_TRAINER_TOKEN")
        self.dist = Distributed.detect()  # a no-op without a torch.distributed process group
        primary = self.dist.is_primary

        # Control's step hooks are registered first, so the probes' hooks see the step as
        # applied: frozen layers without gradients, the scaled lr's update.
        self.probes: Probes | None = None
        self.link: Link | None = None
        self.control = Control(
            model,
            optimizer,
            checkpoint_dir=self.run_dir,
            emit=self._emit,
            rules=self.rules,
            extras=extras,
            run_id=self.run_id,
        )
        try:
            if model is not None and every > 0:
                self.probes = Probes(
                    model,
                    optimizer,
                    bins=bins,
                    types=tuple(types) if types is not None else None,
                    names=layers if isinstance(layers, str) or layers is None else _plain(layers),
                    exclude=exclude
                    if isinstance(exclude, str) or exclude is None
                    else _plain(exclude),
                    activations={plain_name(k): v for k, v in activations.items()}
                    if activations
                    else activations,
                    outer=outer,
                )
            hello = {
                "type": "hello",
                "run_id": self.run_id,
                "name": wire.escape_surrogates(run or _default_name()),
                "config": _run_config(config, model, optimizer, batch_size, every, resumed),
                "layers": self.probes.layer_table() if self.probes is not None else [],
                "last_acked_seq": 0,
                "last_cmd_seq": 0,
                "device": _describe_device(self._device),
                "world_size": self.dist.world_size,  # the run's ranks, on its page
                # this process's own id: a server holding the run id from another process
                # refuses the hello instead of merging two trainings into one run
                "instance": uuid.uuid4().hex,
            }
            try:
                wire.validate_hello(hello)
            except wire.WireError as exc:
                raise ValueError(f"watch(): {exc}") from None
            if self.probes is not None:
                self._tell_rules_about_layers(model, self.probes)
            self.dist.attach(self.control, self.probes)
            if primary:
                self.alerts = Alerts(
                    self.rules,
                    self.control,
                    self.run_dir,
                    self.rules.params,
                    steerable=self._steerable,
                )
                self.link = Link(
                    hello,
                    spool_path=self.run_dir / "spool.bin",
                    server=server or None,
                    token=token or None,
                    on_command=self.control.submit,
                )
                self.link.step = self.step_count
        except BaseException:
            self._close_parts()  # a refused watch (bad argument, unwritable run_dir) leaves no hooks
            raise
        if progress:
            self._progress_line = ProgressLine()
        if self.link is not None:
            self.link.start()
            if progress and server and dashboard_line:
                # where to watch it, once, before the progress line (`layerscope train`
                # prints its own: dashboard_line False)
                page = dashboard_url(server, self.run_id)
                if page is not None:
                    print(
                        f"[layerscope] run {self.run_id}: dashboard at {page}",
                        file=sys.stderr,
                        flush=True,
                    )
        self._t0 = self._last_step_t = self._last_flush_t = time.perf_counter()
        # The initial control state (rules enabled/silenced/auto switches) for the UI to show
        # before any command has been acknowledged.
        self._emit("status", {"status": "running", "control": self.control.state()})
        if restore:
            self._restore(restore, label)
        elif auto_weight_decay and resumed is None and self.control.weight_decay_settable:
            # PRACTICES: start without weight decay (the model under-fits), switch it on
            # once it over-fits: the opt-in holds it off from the first step, and Overfit's
            # rule switches it on. A resumed run keeps its checkpoint's state.
            self.command("set_weight_decay", {"enabled": False}, reason=AUTO_WEIGHT_DECAY_START)
        if self.probes is not None:
            self._arm()  # the first step is always a probe step: the network as it starts

    # ---- the public surface ----

    @property
    def should_stop(self) -> bool:
        return self.control.stopping

    @property
    def control_state(self) -> dict[str, Any]:
        return self.control.state()

    def command(
        self, name: str, args: dict[str, Any] | None = None, *, reason: str | None = None
    ) -> dict[str, Any]:
        """Apply a command now, on the calling (training) thread, as an ordinary command
        with ``source: api``; e.g. freezing layers before the first step. Returns its
        result (``ok``, ``error``, the acknowledged ``state``), also sent as an event."""
        msg: dict[str, Any] = {"name": name, "args": args or {}, "source": "api"}
        if reason is not None:
            msg["reason"] = reason
        result = self.control.apply(wire.validate_command(msg), self.step_count)
        assert result is not None  # a fresh id is never a repeat
        return result

    def event(self, kind: str, data: dict[str, Any]) -> None:
        """Record an event (``log``, ``sanity``, ...) at the current step. Checked as the
        server checks it (kind, an object of at most 64 KiB as JSON): one it would refuse
        raises ValueError here, since a refused frame is never stored, and the server
        confirms frames only up to the first it lacks. A lone surrogate in ``data`` (a file
        name that is not UTF-8, as ``os.fsdecode`` gives it) is sent as a backslash escape
        (``caf\\xe9``), as the config is: the event is kept, every byte readable."""
        frame = {"seq": 1, "step": self.step_count, "kind": kind, "data": data}
        try:
            try:
                wire.validate_event(frame)
            except wire.WireError as exc:
                # validate_event names a lone surrogate after the nesting, so escaping's
                # recursion is bounded; any other problem is the event's own
                if str(exc) != wire.lone_surrogate(data, "data"):
                    raise
                data = _escaped(data)
                wire.validate_event({**frame, "data": data})
        except wire.WireError as exc:
            raise ValueError(f"event {kind!r}: {exc}") from None
        self._emit(kind, data)

    def step(self, loss: Scalar | None = None, **scalars: Scalar) -> None:
        """Call once per optimizer step, after ``optimizer.step()``."""
        if self._closed:
            raise RuntimeError("this watch is closed; step() after close() records nothing")
        step = self.step_count + 1
        now = time.perf_counter()
        row = Row(step, now - self._t0, {})
        if scalars:
            self._put_all(row, {"loss": loss, **scalars} if loss is not None else scalars)
        elif loss is not None:  # the usual call: one value, which raises before it is kept
            self._put(row, "loss", loss)
        self.step_count = step
        step_time_s = now - self._last_step_t
        self._last_step_t = now
        probe_step = self.probes is not None and self._is_probe_step(step)
        dist = self.dist
        if dist.active:  # (a single process's exchange and boundary are no-ops / the control's)
            # first: under a process group rank 0's samples_per_s is every rank's, summed
            dist.exchange(
                row.values, step_time_s, self.batch_size, probe_step=probe_step, step=step
            )
        self._add_run_values(row, step_time_s)
        self._rows.append(row)

        pending = None
        snapshot = None
        if self.probes is not None and probe_step:
            self._stop_counting()
            pending = self.probes.collect()
            good = self._good_every and self._probe_count % self._good_every == 0
            if good and self.alerts is not None and now - self._good_t >= GOOD_CHECKPOINT_MIN_S:
                # rank 0 alone keeps the last good one. Copied now (device clones, no
                # sync); written by the link thread only if this step's numbers turn out
                # all finite.
                snapshot = self.control.snapshot(step)
                self._good_t = now
            self._probe_count += 1
        if (
            pending is not None
            or now - self._last_flush_t >= FLUSH_INTERVAL_S
            or len(self._rows) >= MAX_ROWS_PER_FLUSH
        ):
            if self._device.type == "cuda":
                # Once per flush, not per step: torch.cuda.memory_allocated builds the
                # allocator's whole statistics dict (~0.3 ms of Python); no device sync.
                row.values.setdefault(
                    "cuda_mem_alloc_bytes", float(torch.cuda.memory_allocated(self._device))
                )
            self._flush(pending, step, snapshot)
        if self.link is not None:
            self.link.step = step
        if dist.active:
            dist.at_step_boundary(self.control, step, before_block=self._flush)
        else:
            self.control.at_step_boundary(step, before_block=self._flush)
        if self.probes is not None and self._is_probe_step(step + 1) and not self.probes.armed:
            self._arm()

    def settle(self, timeout_s: float = 2.0) -> None:
        """Let the rules judge every step so far and apply what they sent (at most
        ``timeout_s`` of waiting for the link thread): the end of a loop that must know
        whether a rule stopped it. The rules run on the link thread, a little after each
        flush, and their commands apply at the next ``w.step()``: a run whose numbers went
        NaN in its last steps ended before the NaN rule's stop arrived (``layerscope
        train`` then reported the overfit check's FAIL, exit 1, not the NaN stop, exit 3).
        Commands apply as at a step boundary, without blocking on a pause. Not under a
        process group (every rank would have to apply them at the same step)."""
        if self._closed or self.link is None or self.dist.active:
            return
        self._flush()
        self.link.settle(timeout_s)
        self.control.apply_queued(self.step_count)

    def eval(self, **scalars: Scalar) -> None:
        """Log validation results (``val_loss=``, ``val_acc=``, ...) at the current step."""
        if self._closed:
            raise RuntimeError("this watch is closed; eval() after close() records nothing")
        if not scalars:
            return
        row = Row(
            step=self.step_count,
            time_s=time.perf_counter() - self._t0,
            values={},
            evaluation=True,
        )
        self._put_all(row, scalars)
        self._rows.append(row)
        self._flush()

    def close(self, status: str = "finished", reason: str | None = None) -> None:
        """Flush, report the final status (``reason``: why, shown beside it), wait briefly
        for acks, remove every hook."""
        if status not in wire.ENDED_STATUSES:
            raise ValueError(f"status must be one of {sorted(wire.ENDED_STATUSES)}, got {status!r}")
        if self._closed:
            return
        self._closed = True
        if status == "finished" and self.control.stopping:
            status = "stopped"
        try:
            self._flush()
            self._emit("status", {"status": status, **({"reason": reason} if reason else {})})
            if self.link is not None:
                self.link.status = status
        finally:
            self._close_parts()
            if self.link is not None:
                self.link.close()
            if self._progress_line is not None:
                self._progress_line.close()

    def __enter__(self) -> Watch:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: pytypes.TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close("finished")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.close("stopped")
        else:  # the run page said "failed" and nothing more
            why = f"{exc_type.__name__}: {exc}" if str(exc) else exc_type.__name__
            self.close("failed", reason=why if len(why) <= 500 else why[:497] + "...")

    # ---- internals ----

    def _steerable(self) -> bool:
        """Whether a person could resume a rule's pause now (asked by the alerts when one
        fires, on the link thread): a server is configured and connected, or still on its
        first try. A server never reached (a wrong URL, a stale LAYERSCOPE_SERVER) or gone
        when the finding comes cannot: the pause would hold the loop forever."""
        return self.link is not None and self.link.steerable

    def _is_probe_step(self, step: int) -> bool:
        return step == self._first_step or step % self.every == 0

    def _restore(self, commands: list[tuple[str, dict[str, Any]]], label: str) -> None:
        """Re-apply a resumed checkpoint's control state as acknowledged commands (source
        ``api``, reason ``restored from checkpoint-N.pt``) at the checkpoint's step. One
        this model or optimizer refuses ends the watch (status failed) with its error:
        training on without it would not be the run the checkpoint continues."""
        for name, args in commands:
            result = self.command(name, args, reason=f"restored from {label}")
            if not result["ok"]:
                self.close("failed")
                raise ValueError(
                    f"watch(): resume from {label}: {name} {args} failed: {result.get('error')}"
                )

    def _arm(self) -> None:
        """Arm the probes for the next step, counting its training passes. Not once
        closed: a w.step() blocked while paused returns after a close() made on another
        thread, and arming then left the counting hook on the model for good (holding the
        closed watch, its probes and link, and costing each forward pass a call)."""
        assert self.probes is not None and self.model is not None
        if self._closed:
            return
        self.probes.arm()
        self._passes = 0
        if self._pass_hook is None:
            if self._count_hook is None:
                # Outside any torch.compile trace: traced, the count would be replayed as a
                # constant. The wrapper's ~2 us a pass is paid on probe steps only.
                self._count_hook = torch.compiler.disable(self._count_pass)
            self._pass_hook = self.model.register_forward_pre_hook(self._count_hook)
            if self._closed:  # closed on another thread meanwhile, after its own removal
                self._stop_counting()

    def _count_pass(self, module: nn.Module, args: Any) -> None:
        """Before each forward pass of the model while armed: the one past
        ``MAX_PROBE_PASSES`` training passes takes the probes' forward hooks off before
        its layers run (what they recorded stays for the step's collect(); the optimizer
        hooks stay on, so the step keeps its gradient norms and update ratios), and this
        hook too. Counted before the pass, not after it: counted after, the 64th pass took them
        off, so a step of exactly 64 micro-batches, all recorded, lost its update ratios
        with the probes' optimizer hooks. Evaluation passes (no_grad) are not counted: the
        probes keep only the last of those."""
        if not torch.is_grad_enabled():
            return
        self._passes += 1
        if self._passes > MAX_PROBE_PASSES and self.probes is not None:
            self.probes.stop_recording()  # its optimizer hooks stay on for this step
            self._stop_counting()
            if not self._told_passes:
                self._told_passes = True
                self._tell_passes_cut(self.step_count + 1)

    def _tell_passes_cut(self, step: int) -> None:
        """Once a run: say that a probe step stopped recording at MAX_PROBE_PASSES (a log
        line, and a ``log`` event on the run page). Else a gradient accumulation over more
        micro-batches read as a whole step's statistics."""
        message = (
            f"probe step {step}: more than {MAX_PROBE_PASSES} training forward passes "
            f"(gradient accumulation over more micro-batches, or forward passes without "
            f"w.step()); its activation statistics describe the first {MAX_PROBE_PASSES} "
            "(gradient norms and update ratios are the step's own). Said once a run"
        )
        if self.dist.is_primary:
            log.warning("%s", message)
        self._emit("log", {"message": message, "max_probe_passes": MAX_PROBE_PASSES})

    def _stop_counting(self) -> None:
        if self._pass_hook is not None:
            self._pass_hook.remove()
            self._pass_hook = None

    def _put_all(self, row: Row, scalars: dict[str, Scalar]) -> None:
        """Add every scalar to ``row``, or none of them: a bad one raises and leaves no trace."""
        mark = len(self._device_values)
        try:
            for name, value in scalars.items():
                self._put(row, name, value)
        except BaseException:  # a bad value, or a __float__ that raised anything else
            del self._device_values[mark:]
            raise

    def _put(self, row: Row, name: str, value: Scalar) -> None:
        if name not in self._known_names:
            if not isinstance(name, str) or not name or len(name) > wire.MAX_NAME_LEN:
                raise ValueError(f"series name {name!r} must be 1..{wire.MAX_NAME_LEN} characters")
            problem = wire.lone_surrogate(name, f"series name {name!r}")
            if problem is not None:  # the server refuses the frame: its seq never acked
                raise ValueError(
                    f"{problem}; name it with text, e.g."
                    ' os.fsencode(name).decode("utf-8", "backslashreplace")'
                )
            if len(self._known_names) >= wire.MAX_VALUES_PER_ROW - 16:
                raise ValueError(f"too many series; the limit is {wire.MAX_VALUES_PER_ROW - 16}")
            self._known_names.add(name)
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(f"{name} must be a scalar tensor, got shape {tuple(value.shape)}")
            # Kept on the device; read on the link thread after the flush's one host copy,
            # stacked there (a reshape per value per step was a third of w.step()'s own
            # time on the GPU). A value autograd did not make may be a tensor the loop
            # keeps updating in place (a running count): copied, so the row keeps this
            # step's value. A loss is a new tensor every step: kept as it is.
            row.on_device.append((name, len(self._device_values)))
            kept = value.detach()
            # not is_leaf: autograd made it (grad_fn, which builds a Python object a call).
            # A view (w00=model.weight[0, 0]) is autograd's too, but of a tensor the
            # optimizer updates in place: copied, or every row read the flush-time value.
            fresh = not value.is_leaf and value._base is None
            self._device_values.append(kept if fresh else kept.clone())
        elif (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            or hasattr(value, "__float__")
        ):
            row.values[name] = float(value)
        else:
            raise TypeError(
                f"{name} must be a number or a scalar tensor, got {type(value).__name__}"
            )

    def _add_run_values(self, row: Row, step_time_s: float) -> None:
        values = row.values
        used_lr, used_wd = self.control.used_lr, self.control.used_weight_decay
        keys = self._group_keys  # ("lr", "weight_decay"), ("lr/1", "weight_decay/1"), ...
        while len(keys) < len(used_lr):
            suffix = f"/{len(keys)}" if keys else ""
            keys.append((f"lr{suffix}", f"weight_decay{suffix}"))
        for (lr_key, wd_key), lr, wd in zip(keys, used_lr, used_wd, strict=False):
            if lr is not None:
                values.setdefault(lr_key, lr)
            if wd is not None:
                values.setdefault(wd_key, wd)
        values.setdefault("step_time_s", step_time_s)
        if self.batch_size is not None and step_time_s > 0:
            values.setdefault("samples_per_s", self.batch_size / step_time_s)

    def _tell_rules_about_layers(self, model: nn.Module | None, probes: Probes) -> None:
        modules = dict(model.named_modules()) if model is not None else {}
        for layer in probes.layer_table():
            self.rules.kinds[layer["name"]] = layer["kind"]
            module = modules.get(layer["name"])
            if module is not None:
                self.rules.params[layer["name"]] = sum(p.numel() for p in module.parameters())

    def _flush(
        self,
        pending: PendingStats | None = None,
        probe_step: int = 0,
        snapshot: dict[str, Any] | None = None,
    ) -> None:
        """Hand every buffered row to the link with one device-to-host copy."""
        self._last_flush_t = time.perf_counter()
        if not self._rows and pending is None:
            return
        rows, self._rows = self._rows, []
        values, self._device_values = self._device_values, []
        if self.link is None:
            return
        parts: list[torch.Tensor] = []
        wide = False
        if values:
            scalars = _scalars(values)
            # float64 values travel as pairs of float32 words, so the probe statistics
            # after them stay float32 in the same single host copy (Flush views them back)
            wide = scalars.dtype == torch.float64
            parts.append(scalars.view(torch.float32) if wide else scalars)
        probe: tuple[int, PendingStats, int, int] | None = None
        if pending is not None:
            offset = parts[0].numel() if parts else 0
            probe = (probe_step, pending, offset, pending.tensor.numel())
            parts.append(pending.tensor.reshape(-1).float())
        host, event = to_host(parts)
        progress = self._print_progress if self._progress_enabled else None
        self.link.submit(
            Flush(rows, host, event, probe, progress, self.alerts, snapshot, wide=wide)
        )

    def _emit(self, kind: str, data: dict[str, Any]) -> None:
        """Every event the run sends: w.event's, and the Control's (status, command
        results, checkpoints). A path or message holding a lone surrogate (a run_dir or
        file name that is not UTF-8: ``checkpoint``'s ``data.path``, an OSError quoted in
        a command's error) is escaped: the server refuses such a frame, and the event
        was lost (only a record of its refusal stored)."""
        if self.link is None:
            return
        data = _escaped(data)
        if kind == "status":
            self.link.status = data["status"]
            if self._progress_enabled and data["status"] in ("paused", "running"):
                self._print_progress(self._progress_row)  # show a pause without waiting for a row
        self.link.submit({"type": "event", "step": self.step_count, "kind": kind, "data": data})

    def _print_progress(self, row: dict[str, Any]) -> None:
        # Mostly runs on the link thread, from values already on the host.
        self._progress_row = row
        values = row["values"]
        parts = [f"step {row['step']}"]
        for name in ("loss", "lr"):
            value = values.get(name)
            if isinstance(value, float):  # a NaN loss shows as nan: the line must not hide it
                parts.append(f"{name} {value:.4g}")
        parts.append(self.control.status if not self.control.stopping else "stopping")
        if self._progress_line is not None:
            self._progress_line.draw("[layerscope] " + "  ".join(parts) + "   ")

    def _close_parts(self) -> None:
        self.control.close()
        self._stop_counting()
        if self.probes is not None:
            self.probes.close()


def _escaped(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with each lone surrogate written as a backslash escape
    (wire.escape_surrogates); ``data`` itself when it holds none (the common case: one
    walk, no copy)."""
    if wire.lone_surrogate(data) is None:
        return data
    escaped: dict[str, Any] = wire.escape_surrogates(data)
    return escaped


def _plain(names: Iterable[str]) -> list[str]:
    """Listed layer names as the unwrapped model has them (``module.fc1`` -> ``fc1``)."""
    return [plain_name(name) for name in names]


class ProgressLine(logging.Filter):
    """The terminal progress line, redrawn in place (``\\r``, no newline). A layerscope log
    record (an alert with no server, a lost connection) would be written onto its end and
    then overwritten by the next redraw: while the line is open, this filter (on the
    trainer's loggers) ends it first; the next row draws a fresh one below the message."""

    LOGGERS = ("alerts", "control", "distributed", "link", "spool", "sync", "watch")

    def __init__(self) -> None:
        super().__init__()
        self._open = False
        self._lock = threading.Lock()
        for name in self.LOGGERS:
            logging.getLogger(f"layerscope.trainer.{name}").addFilter(self)

    def filter(self, record: logging.LogRecord) -> bool:
        with self._lock:
            if self._open:
                self._open = False
                sys.stderr.write("\n")
                sys.stderr.flush()
        return True

    def draw(self, text: str) -> None:
        with self._lock:
            sys.stderr.write("\r" + text)
            sys.stderr.flush()
            self._open = True

    def close(self) -> None:
        for name in self.LOGGERS:
            logging.getLogger(f"layerscope.trainer.{name}").removeFilter(self)
        with self._lock:
            self._open = False
            sys.stderr.write("\n")
            sys.stderr.flush()


def _check_optimizer(optimizer: Any) -> None:
    """One ``torch.optim.Optimizer`` (or None): its step hooks are where the dashboard's
    commands take effect."""
    if optimizer is None or isinstance(optimizer, torch.optim.Optimizer):
        return
    if isinstance(optimizer, (list, tuple, set, dict)):
        raise TypeError(
            f"watch() takes one optimizer, got a {type(optimizer).__name__} of "
            f"{len(optimizer)}; with several (a GAN's generator and discriminator), watch "
            "the one whose lr the dashboard should steer: the others train as usual, "
            "unsteered, and set_frozen refuses the layers they train"
        )
    if not hasattr(optimizer, "register_step_pre_hook"):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )


def _check_initialized(model: nn.Module) -> None:
    """No lazy module (``nn.LazyLinear``...) still without its parameters: they have no
    shape until the first forward pass, so nothing could size or read them."""
    lazy = [
        name or "model"
        for name, module in model.named_modules()
        if any(
            nn.parameter.is_lazy(t)
            for t in (*module.parameters(recurse=False), *module.buffers(recurse=False))
        )
    ]
    if lazy:
        shown = ", ".join(lazy[:6]) + (f", ... ({len(lazy)} in all)" if len(lazy) > 6 else "")
        raise ValueError(
            f"watch(): the model has lazy modules not initialized yet ({shown}): run one "
            "forward pass (e.g. on a dummy batch) before watch(), so their parameters exist"
        )


def _model_device(model: nn.Module | None) -> torch.device:
    if model is not None:
        for p in model.parameters():
            return p.device
    return torch.device("cpu")


def _describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def _default_name() -> str:
    script = Path(sys.argv[0]).stem if sys.argv and sys.argv[0] else ""
    return script if script and script not in ("-c", "python") else "run"


def _run_config(
    config: dict[str, Any] | None,
    model: nn.Module | None,
    optimizer: torch.optim.Optimizer | None,
    batch_size: int | None,
    every: int,
    resumed: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The user's config made JSON-safe, plus what watch can tell about the run. A lone
    surrogate (a file name that is not UTF-8, as os.fsdecode gives it) is written as a
    backslash escape (wire.escape_surrogates): the server refuses a hello holding one."""
    if config is not None and not isinstance(config, dict):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    out: dict[str, Any] = json.loads(json.dumps(config or {}, default=str))
    if model is not None:
        out.setdefault("model", type(model).__name__)
        out.setdefault("params", sum(p.numel() for p in model.parameters()))
    if optimizer is not None:
        out.setdefault("optimizer", type(optimizer).__name__)
        lr = optimizer.param_groups[0].get("lr")
        if isinstance(lr, (int, float)):
            out.setdefault("lr", lr)
        # the weight decay each group starts with: the page's switch has nothing to turn
        # on or off where every group's is 0
        decays = [group.get("weight_decay", 0.0) for group in optimizer.param_groups]
        if all(isinstance(d, (int, float)) and not isinstance(d, bool) for d in decays):
            if len(set(decays)) == 1:
                out.setdefault("weight_decay", decays[0])
            else:
                out.setdefault("param_groups", [{"weight_decay": d} for d in decays])
    if batch_size is not None:
        out.setdefault("batch_size", batch_size)
    out.setdefault("every", every)
    if resumed is not None:
        out.setdefault("resumed_from", resumed)
    escaped: dict[str, Any] = wire.escape_surrogates(out)
    return escaped


def watch(
    model: nn.Module | None,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    run: str | None = None,
    server: str | None = None,
    every: int = DEFAULT_EVERY,
    bins: int = 64,
    layers: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    types: Iterable[type[nn.Module]] | None = None,
    activations: dict[str, str] | None = None,
    config: dict[str, Any] | None = None,
    run_id: str | None = None,
    token: str | None = None,
    run_dir: str | os.PathLike[str] | None = None,
    batch_size: int | None = None,
    progress: bool = False,
    rules: bool | Iterable[str] = True,
    silence: Iterable[str] = (),
    auto_halve_lr: bool = False,
    auto_weight_decay: bool = False,
    patience: int = PATIENCE,
    rule_thresholds: dict[str, Any] | None = None,
    good_checkpoint_every: int = DEFAULT_GOOD_CHECKPOINT_EVERY,
    checkpoint_extras: dict[str, Any] | None = None,
    resume: str | os.PathLike[str] | dict[str, Any] | ReadCheckpoint | None = None,
) -> Watch:
    """Instrument a training loop; use as ``with watch(model, optimizer, run=...) as w:``.

    Call ``w.step(loss=loss, **scalars)`` once per optimizer step, after
    ``optimizer.step()``; ``w.eval(val_loss=..., val_acc=...)`` after validation;
    break when ``w.should_stop``. Steps count from 1 (the n-th ``w.step()`` is step n;
    after ``resume``, from the checkpoint's step + 1).

    ``server`` defaults to ``$LAYERSCOPE_SERVER``; with neither (or ``server=""``) the
    run is recorded to the spool in ``run_dir`` only (``layerscope sync`` uploads it).
    ``progress``: a progress line on stderr, redrawn in place; with a server, first the
    line ``[layerscope] run <id>: dashboard at http://host:port/runs/<id>``.
    ``run`` (the name) and ``config`` are sent as text: a lone surrogate in them, which
    is how Python decodes a file name that is not UTF-8 (``os.fsdecode``, ``sys.argv``),
    is written as a backslash escape, ``caf\\xe9`` for ``os.fsdecode(b"caf\\xe9")``
    (``os.fsencode(s).decode("utf-8", "backslashreplace")``), since the server refuses
    what is not text; a ``run_id`` or series name holding one raises ValueError.
    ``token`` defaults to ``$LAYERSCOPE_TRAINER_TOKEN``. ``every`` is the probe cadence
    in steps (0 turns probes off; step 1 is always probed). ``layers``/``exclude`` are
    regex or name-list filters on module names, ``types`` module classes to probe.

    Each step's metrics row holds ``loss`` and the given scalars, ``lr`` and
    ``weight_decay`` as the optimizer actually used them (``lr/1``... for further
    param groups), ``step_time_s``, ``samples_per_s`` (with ``batch_size``),
    ``cuda_mem_alloc_bytes`` on a GPU (on the last step of each flush, about every
    ``FLUSH_INTERVAL_S`` and on probe steps), and ``grad_norm`` on probe steps; ``time_s`` is
    seconds since ``watch()`` began.

    Diagnostic rules (``rules.RULE_NAMES``) run on the link thread as flushes arrive;
    each finding becomes an ``alert`` event. ``rules``: True (all), False (none) or the
    names to evaluate; ``silence``: names evaluated but quiet; ``rule_thresholds``: flat
    ``<rule>_<field>`` overrides (``rules.threshold_names()``). ``auto_halve_lr`` halves
    the lr scale once per validation plateau of ``patience`` evaluations (needs
    ``w.eval(val_loss=...)``); ``auto_weight_decay`` holds weight decay off from the
    first step (a ``set_weight_decay`` command, where some param group has one; not on
    ``resume``, which restores the checkpoint's) and switches it on when Overfit fires. Each is sent as a command with ``source: rule`` and its reason, and
    can be switched live with the ``set_rules`` command. ExplodingTensor (NaN/Inf)
    pauses the run; every ``good_checkpoint_every``-th probe step whose numbers are all
    finite is kept as ``run_dir/last-good.pt``, at most one per ``GOOD_CHECKPOINT_MIN_S``
    (30 s) of wall time (0: never; each costs one device copy of the model and optimizer
    state until it is written).

    Checkpoints (the dashboard's Checkpoint, ``w.command("checkpoint")``, ``last-good.pt``)
    hold the model, the optimizer, the step, the control state and, for each
    ``checkpoint_extras={"scheduler": sched, "scaler": scaler}`` entry, its
    ``state_dict()``. ``resume=`` a checkpoint's path (or the dict ``torch.load``
    returned, or a ``checkpoint.ReadCheckpoint``: a file already read) continues that
    training in a new process: watch() loads the model weights, the optimizer state and
    every extra's state (the checkpoint's extras and this call's must name the same
    objects), re-applies its lr scale, weight decay off and frozen layers as acknowledged
    commands (``source: api``, reason ``restored from checkpoint-N.pt``) and numbers steps
    on from the checkpoint's. The diagnostic rules go on from the checkpoint's history
    (``Rules.state_dict``: a plateau's count and halvings, Overfit's streak, the loss
    windows, the alerts already raised, which are not raised again while their condition
    holds), so an auto-halve fires when it would have in the run never stopped. That
    history is as the link thread had evaluated it when the checkpoint was taken: it may
    miss the last flush before it (an evaluation made just before). A checkpoint without
    it (written by an older layerscope) starts the rules afresh. It is a new run, with its
    own id (a server refuses a run id another process wrote); its config's
    ``resumed_from`` names the checkpoint, its step and the run it continues.

    Under an initialised torch.distributed process group, call ``watch()`` and
    ``w.step()`` on every rank (the same number of times): rank 0 alone streams and
    spools the run and writes checkpoints; probe statistics describe the global batch;
    every command is applied on every rank at the same step; rows carry
    ``step_time_s/rankN`` (each rank's time less its wait in w.step(), so a straggler
    shows, unless its wait is in the user's own collectives, as in DDP's gradient
    all-reduce) and ``samples_per_s/rankN`` (``batch_size`` is each rank's batch), and
    ``samples_per_s`` is the global rate, their sum (see ``distributed``).
    """
    return Watch(
        model,
        optimizer,
        run=run,
        server=server,
        every=every,
        bins=bins,
        layers=layers,
        exclude=exclude,
        types=types,
        activations=activations,
        config=config,
        run_id=run_id,
        token=token,
        run_dir=run_dir,
        batch_size=batch_size,
        progress=progress,
        rules=rules,
        silence=silence,
        auto_halve_lr=auto_halve_lr,
        auto_weight_decay=auto_weight_decay,
        patience=patience,
        rule_thresholds=rule_thresholds,
        good_checkpoint_every=good_checkpoint_every,
        checkpoint_extras=checkpoint_extras,
        resume=resume,
    )


def _scalars(values: list[torch.Tensor]) -> torch.Tensor:
    """One vector of single-value tensors (0-d as a loss is, or any shape holding one
    value): one stack, reshaping only the few that are not 0-d, each value converted
    first unless all already have the vector's dtype (a stack of an int64 count with a
    bf16 loss would round the count to bf16); on several devices, see
    ``flush.on_one_device``. float32, or float64 when any value is wider than float32
    holds exactly (a float64 loss, an int64 or int32 running count past 2**24), so
    those arrive as given; MPS has no float64: float32 there."""
    flat = on_one_device([v if v.dim() == 0 else v.reshape(()) for v in values])
    dtype = torch.float32
    if flat[0].device.type != "mps" and any(_wide(v.dtype) for v in flat):
        dtype = torch.float64
    if any(v.dtype != dtype for v in flat):
        flat = [v.to(dtype) for v in flat]
    return torch.stack(flat)


def _wide(dtype: torch.dtype) -> bool:
    """A dtype with values float32 cannot hold exactly: float64, integers of 32 bits and more."""
    if dtype.is_floating_point:
        return dtype == torch.float64
    return not dtype.is_complex and dtype != torch.bool and dtype.itemsize >= 4
