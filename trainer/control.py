"""control — steering a running optimizer from outside (DESIGN §4).

Owns: the run's control state (paused, lr scale, weight decay on/off, frozen
layers, stopping, the rules' live switches), applying each relayed command exactly
once at a step boundary, the optimizer step pre/post hooks that make the state take
effect, blocking while paused, and checkpoints on demand (their file format is ``checkpoint``'s).

Never: touches the network (commands arrive on a thread-safe queue the link
fills; results leave through the ``emit`` callback), applies a command off the
training thread, or changes what the user's code sees in ``param_groups``
between steps: every change is made in the step pre-hook and undone in the
post-hook, so a scheduler or a loop assigning ``group["lr"]`` cannot undo it. A
step that raises skips the post-hook, so ``optimizer.step`` is wrapped (as torch's
LR schedulers wrap it) to undo the changes as the exception leaves it, before the
user's code (a chainable scheduler computing from ``group["lr"]``) can see them.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from layerscope.trainer import wire
from layerscope.trainer.checkpoint import (
    CHECKPOINT_FORMAT,
    check_extras,
    clone_tensors,
    plain_name,
    unwrapped,
    write_checkpoint,
)
from layerscope.trainer.rules import RULE_NAMES, Rules
from torch import nn

log = logging.getLogger(__name__)

# How long one wait for a command lasts while paused; bounds how late a paused loop
# notices that the watch was closed from another thread.
PAUSED_POLL_S = 0.25

Emit = Callable[[str, dict[str, Any]], None]

# A command_result is one event frame, whose data the server refuses over
# wire.MAX_CONFIG_BYTES (64 KiB) as JSON: one echoing a set_frozen of 2,048 bogus 256-character
# names, with an error quoting every one, was 1 MB; refused, it left the run's acks stuck
# below it. So a result names at most NAMES_SHOWN layers in an error ("and 2,043 more"),
# echoes at most MAX_ECHO_ARGS_CHARS of args (a list cut, ``<key>_omitted`` counting the
# rest), cuts its error to MAX_ERROR_CHARS, and as a last resort its state's frozen list
# (``frozen_omitted``) to fit MAX_RESULT_CHARS. The terminal's warning is one line of at
# most MAX_WARNING_CHARS.
NAMES_SHOWN = 5
MAX_ECHO_ARGS_CHARS = 4096
MAX_ERROR_CHARS = 2000
MAX_RESULT_CHARS = wire.MAX_CONFIG_BYTES - 4096
MAX_WARNING_CHARS = 300

# The optimizers an open Control steers, and its run directory: a second one's hooks would
# each put back the lr the other scaled (the user's lr halving step after step, wrong after
# both closed), so it is refused until the first closes.
_steered: weakref.WeakKeyDictionary[torch.optim.Optimizer, str] = weakref.WeakKeyDictionary()
_steered_lock = threading.Lock()


def _host_float(value: Any) -> float | None:
    """A group's lr/weight_decay as a float without a device sync (None for device tensors)."""
    if isinstance(value, torch.Tensor):
        return float(value) if value.device.type == "cpu" and value.numel() == 1 else None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _outside_trace(hook: Callable[..., None]) -> Callable[..., None]:
    """``hook`` run eagerly when a ``torch.compile``d function calls ``optimizer.step()``
    (PyTorch's compiled-optimizer recipe, an lr tensor stepped by a scheduler): traced,
    the hooks' bookkeeping (the lr used, read as a float) broke the graph with a
    19-line 'Graph break from Tensor.item()' warning pointing into this module, on every
    compile. Eager steps skip this (``torch.compiler.disable`` costs ~1.5 us a call)."""
    return torch.compiler.disable(hook)


class Control:
    """Target state for one run plus the hooks that apply it to ``optimizer``."""

    def __init__(
        self,
        model: nn.Module | None,
        optimizer: torch.optim.Optimizer | None,
        *,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        emit: Emit | None = None,
        rules: Rules | None = None,
        extras: dict[str, Any] | None = None,
        run_id: str | None = None,
    ) -> None:
        self.model = model
        self.rules = rules
        self.optimizer = optimizer
        # Objects whose state_dict() each checkpoint also holds (a scheduler, a GradScaler)
        self.extras = check_extras(extras)
        self.run_id = run_id
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.emit: Emit = emit or (lambda kind, data: None)
        self.commands: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()

        self.paused = False
        self.lr_scale = 1.0
        self.weight_decay_enabled = True
        self.frozen: set[str] = set()
        self.stopping = False
        # the first applied stop: {"source": user|api|rule, "reason": ...} (who ended the run)
        self.stopped_by: dict[str, Any] | None = None
        self.closed = False

        self._frozen_params: set[int] = set()
        self._applied_seqs: set[int] = set()
        self._applied_ids: set[str] = set()
        self._release_one = False
        # What the last optimizer step actually used, per param group: read by the metrics.
        self.used_lr: list[float | None] = []
        self.used_weight_decay: list[float | None] = []
        # Per param group, what the pre-step hook replaced and what it put there (see
        # _pre_step); empty between steps unless a step raised before its post-hook ran.
        self._saved: list[tuple[Any, Any, list[Any] | None, Any, Any, Any, int | None]] = []
        self._handles: list[Any] = []
        self._steers = False
        # The wrapper _guard_step puts on optimizer.step, and what it replaced there
        # (None: the optimizer's class's own step).
        self._step_guard: Any = None
        self._step_before: Any = None
        # optimizer.step() calls made through it: under torch.distributed, compared across
        # the ranks at each w.step() (``distributed``)
        self.optimizer_steps = 0
        if optimizer is not None:
            self._claim(optimizer)
            self._handles.append(optimizer.register_step_pre_hook(self._pre_step_hook))
            self._handles.append(optimizer.register_step_post_hook(self._post_step_hook))
            self._guard_step(optimizer)
            self.used_lr = [_host_float(g.get("lr")) for g in optimizer.param_groups]
            self.used_weight_decay = [
                _host_float(g.get("weight_decay")) for g in optimizer.param_groups
            ]
        # Whether set_weight_decay on changes anything: some group's own weight decay is not
        # 0 (see decay_settable). Kept current by the pre-step hook, for the link thread
        # (Overfit's advice), which must not read the groups while a step has them changed.
        self.weight_decay_settable: bool | None = (
            decay_settable(optimizer.param_groups) if optimizer is not None else None
        )

    def _claim(self, optimizer: torch.optim.Optimizer) -> None:
        with _steered_lock:
            other = _steered.get(optimizer)
            if other is not None:
                raise ValueError(
                    f"this {type(optimizer).__name__} is already steered by an open watch()"
                    f"{other}: two would each put back the lr the other scaled. Close that "
                    "one first (w.close(), or end its with block)"
                )
            where = self.checkpoint_dir
            _steered[optimizer] = f" (run_dir {where})" if where is not None else ""
            self._steers = True

    def _guard_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Wrap ``optimizer.step`` so that a step that raises is undone as the exception
        leaves it (``restore_after_raise``), not only at the next step: a chainable
        scheduler (ExponentialLR, StepLR, ReduceLROnPlateau) stepped in between would
        compute the next lr from the scaled one, baking the scale into the schedule
        (halved twice after a resume, halved still after set_lr_scale(1)).

        Made as torch's LR schedulers make theirs, so the two chain either way round: an
        instance attribute (the class's step, or a scheduler's wrapper, stays inside), a
        bound method (a scheduler created later wraps it through ``__func__``), marked
        ``_wrapped_by_lr_sched`` when what it wraps was (else such a scheduler would warn
        that the step was overridden). It holds the Control weakly; ``close()`` puts back
        what it replaced, or leaves it passing straight through when something wrapped
        it since. The normal path costs one Python call and a count (``optimizer_steps``)."""
        before = vars(optimizer).get("step")
        control = weakref.ref(self)

        def step(opt: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
            owner = control()
            if owner is not None:
                owner.optimizer_steps += 1
            try:
                if before is None:
                    return type(opt).step(opt, *args, **kwargs)
                return before(*args, **kwargs)
            except BaseException:
                if owner is not None:
                    owner.restore_after_raise()
                raise

        inner = before if before is not None else type(optimizer).step
        for attr in ("__name__", "__qualname__", "__doc__"):
            setattr(step, attr, getattr(inner, attr, None) or getattr(step, attr))
        if getattr(inner, "_wrapped_by_lr_sched", False):
            step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
        self._step_before = before
        self._step_guard = step.__get__(optimizer, type(optimizer))
        vars(optimizer)["step"] = self._step_guard

    def _unguard_step(self) -> None:
        optimizer, guard = self.optimizer, self._step_guard
        self._step_guard = None
        if optimizer is None or guard is None or vars(optimizer).get("step") is not guard:
            return  # wrapped since (a scheduler created later): ours stays, passing through
        if self._step_before is None:
            del vars(optimizer)["step"]
        else:
            vars(optimizer)["step"] = self._step_before
        self._step_before = None

    # ---- state ----

    def state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "paused": self.paused,
            "lr_scale": self.lr_scale,
            "weight_decay_enabled": self.weight_decay_enabled,
            "frozen": sorted(self.frozen),
            "stopping": self.stopping,
        }
        if self.rules is not None:
            state["rules"] = self.rules.state()
        return state

    @property
    def status(self) -> str:
        return "paused" if self.paused else "running"

    # ---- optimizer hooks (run inside optimizer.step on the training thread) ----

    def _pre_step_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if torch.compiler.is_compiling():
            _outside_trace(self._pre_step)(optimizer, args, kwargs)
        else:
            self._pre_step(optimizer, args, kwargs)

    def _post_step_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if torch.compiler.is_compiling():
            _outside_trace(self._post_step)(optimizer, args, kwargs)
        else:
            self._post_step(optimizer, args, kwargs)

    def _pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.restore_after_raise()
        self.used_lr = []
        self.used_weight_decay = []
        self.weight_decay_settable = decay_settable(optimizer.param_groups)
        for group in optimizer.param_groups:
            lr, wd = group.get("lr"), group.get("weight_decay")
            params: list[Any] | None = None
            lr_set = wd_set = kept = None
            lr_version: int | None = None
            if lr is not None and self.lr_scale != 1.0:
                group["lr"] = lr_set = lr * self.lr_scale
                if isinstance(lr_set, torch.Tensor):
                    lr_version = lr_set._version  # a later in-place write is not the hook's
            if wd is not None and not self.weight_decay_enabled:
                group["weight_decay"] = wd_set = _NO_DECAY
            if self._frozen_params:
                params = group["params"]
                kept = []
                for p in params:
                    if id(p) in self._frozen_params:
                        p.grad = None
                    else:
                        kept.append(p)
                # Taking the params out of the group for this one step also stops momentum,
                # Adam's moments and decoupled weight decay from moving them.
                group["params"] = kept
            self._saved.append((lr, wd, params, lr_set, wd_set, kept, lr_version))
            self.used_lr.append(_host_float(group.get("lr")))
            self.used_weight_decay.append(_host_float(group.get("weight_decay")))

    def _post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        # Only what the pre-step hook changed: an optimizer that sets its own group["lr"]
        # inside step() keeps that value whenever no scale was applied.
        self._restore(optimizer, only_unchanged=False)

    def restore_after_raise(self) -> None:
        """Undo what the pre-step hook changed when ``optimizer.step()`` raised before its
        post-hook (a caught CUDA out-of-memory, a bad batch, Ctrl-C): else the scaled lr,
        the switched-off decay and the frozen layers' absence would stay in the groups,
        and the next step would take them for the user's values (an lr scale compounding
        step after step). Called as the exception leaves ``optimizer.step`` (see
        ``_guard_step``), and again by the next pre-step hook, the next step boundary and
        ``close()`` (for a step called past that wrapper); nothing to do after a step that
        returned. A value set since the hook ran (by the optimizer inside its step, or by
        the user's code when the wrapper was bypassed) is not the hook's and stays. A
        scheduler writes a tensor lr (capturable or fused optimizers) in place
        (``fill_``), so the scaled tensor is still the group's, now holding the
        scheduler's value: that value is copied into the user's own tensor, which goes
        back in the group (put back unchanged, as it was, it lost the scheduler's step)."""
        if self._saved and self.optimizer is not None:
            self._restore(self.optimizer, only_unchanged=True)
        self._saved = []

    def _restore(self, optimizer: torch.optim.Optimizer, *, only_unchanged: bool) -> None:
        """Put back what the pre-step hook replaced in each group; ``only_unchanged``:
        only where the group still holds what the hook put there."""
        saved, self._saved = self._saved, []
        for group, (lr, wd, params, lr_set, wd_set, kept, lr_version) in zip(
            optimizer.param_groups, saved, strict=False
        ):
            if (
                only_unchanged
                and lr_version is not None
                and group.get("lr") is lr_set
                and isinstance(lr_set, torch.Tensor)
                and lr_set._version != lr_version
                and isinstance(lr, torch.Tensor)
            ):
                with torch.no_grad():
                    lr.copy_(lr_set)  # written in place since the hook: the user's value
            for key, old, new in (
                ("lr", lr, lr_set),
                ("weight_decay", wd, wd_set),
                ("params", params, kept),
            ):
                if new is not None and (not only_unchanged or group.get(key) is new):
                    group[key] = old

    # ---- commands ----

    def submit(self, command: dict[str, Any]) -> None:
        """Queue a validated command frame (any thread); applied at the next step boundary."""
        self.commands.put(command)

    def at_step_boundary(self, step: int, before_block: Callable[[], None] | None = None) -> None:
        """Apply queued commands; while paused, block here until resume, step_once or stop."""
        if self._saved:
            self.restore_after_raise()
        self._drain(step)
        blocked = False
        while self.paused and not self.stopping and not self.closed:
            if self._release_one:
                self._release_one = False
                return
            if not blocked and before_block is not None:
                before_block()
            blocked = True
            try:
                command = self.commands.get(timeout=PAUSED_POLL_S)
            except queue.Empty:
                continue
            self.apply(command, step)

    def take_release_one(self) -> bool:
        """True once after a ``step_once`` while paused: the paused wait lets one step run.
        (``distributed`` runs its own paused wait, shared by every rank.)"""
        release, self._release_one = self._release_one, False
        return release

    def apply_queued(self, step: int) -> None:
        """Apply the commands queued so far as at step ``step``'s boundary, without blocking
        on a pause (``Watch.settle``, at the end of a loop)."""
        self._drain(step)

    def _drain(self, step: int) -> None:
        # SimpleQueue.empty() is a lock-free check: the common no-command step costs one call.
        while not self.commands.empty():
            try:
                command = self.commands.get_nowait()
            except queue.Empty:
                return
            self.apply(command, step)

    def apply(self, command: dict[str, Any], step: int) -> dict[str, Any] | None:
        """Apply one command at ``step``; emits and returns its result, None for a repeat."""
        cmd_seq = command.get("cmd_seq")
        cmd_id = command.get("id")
        if cmd_seq in self._applied_seqs or cmd_id in self._applied_ids:
            log.debug("command %s (cmd_seq %s) already applied; ignored", cmd_id, cmd_seq)
            return None
        if isinstance(cmd_seq, int):
            self._applied_seqs.add(cmd_seq)
        if isinstance(cmd_id, str):
            self._applied_ids.add(cmd_id)
        name = command.get("name")
        args = command.get("args") or {}
        error: str | None = None
        try:
            self._apply_named(str(name), args, step)
        except (ValueError, KeyError, TypeError, OSError, RuntimeError) as exc:
            error = cut_text(str(exc) or type(exc).__name__, MAX_ERROR_CHARS)
            log.warning("command %s failed: %s", name, one_line(error, MAX_WARNING_CHARS))
        result: dict[str, Any] = {
            "id": cmd_id,
            "cmd_seq": cmd_seq,
            "name": name,
            "args": echoed_args(args),
            "ok": error is None,
            "applied_at_step": step,
            "state": self.state(),
            # Who asked and why, so charts and the event log can mark rule-made changes.
            "source": command.get("source", "user"),
        }
        if "reason" in command:
            result["reason"] = command["reason"]
        if error is not None:
            result["error"] = error
        elif name == "stop" and self.stopped_by is None:
            self.stopped_by = {"source": result["source"], "reason": command.get("reason")}
        result = fit_result(result)
        self.emit("command_result", result)
        return result

    def _apply_named(self, name: str, args: dict[str, Any], step: int) -> None:
        if name == "pause":
            if not self.paused:
                self.paused = True
                self.emit("status", {"status": "paused"})
        elif name == "resume":
            self._release_one = False
            if self.paused:
                self.paused = False
                self.emit("status", {"status": "running"})
        elif name == "step_once":
            if self.paused:
                self._release_one = True
        elif name == "set_lr_scale":
            self._need_optimizer(name)
            value = float(args["value"])
            if not value >= 0.0:
                raise ValueError(f"lr scale must be a number >= 0, got {value}")
            self.lr_scale = value
        elif name == "set_weight_decay":
            self._need_optimizer(name)
            enabled = args["enabled"]
            if not isinstance(enabled, bool):
                raise TypeError("set_weight_decay needs enabled: true or false")
            assert self.optimizer is not None
            if enabled and not decay_settable(self.optimizer.param_groups):
                # DESIGN §4: a group whose weight decay is 0 stays 0. Acknowledged, "on"
                # would claim an effect the run never had (its used weight decay stays 0).
                raise ValueError(
                    "this run's weight decay is 0 in every param group: switching it on "
                    "changes nothing. To add weight decay, restart with one (layerscope "
                    "train --weight-decay 1e-3 --auto-weight-decay holds it off until "
                    "Overfit fires; with watch(), give the optimizer a weight_decay and pass "
                    "auto_weight_decay=True)"
                )
            self.weight_decay_enabled = enabled
        elif name == "set_frozen":
            self._need_optimizer(name)
            self._set_frozen(list(args["layers"]), bool(args["frozen"]))
        elif name == "set_rules":
            self._set_rules(args)
        elif name == "checkpoint":
            self.checkpoint(step)
        elif name == "stop":
            self.stopping = True
            if self.paused:  # a stopped run is not paused: the loop runs on to its should_stop
                self.paused = False
                self.emit("status", {"status": "running"})
        else:
            raise ValueError(f"unknown command {name!r}")

    def _need_optimizer(self, name: str) -> None:
        if self.optimizer is None:
            raise ValueError(f"{name} needs an optimizer; none was given to watch()")

    def _set_frozen(self, layers: list[str], frozen: bool) -> None:
        """Freeze or unfreeze ``layers``: each layer's own parameters and every child's
        (prefix match on the name), under every name a parameter has.

        A weight tied between two layers (an embedding and its output head,
        ``head.weight = embed.weight``) is one parameter: freezing either layer freezes it
        in both, unfreezing either unfreezes it in both. The acknowledged ``frozen`` list
        says what trains and what does not: the layers named (while all their parameters
        stay frozen) and every other layer whose parameters are now all frozen through
        such a weight (freezing ``embed`` lists ``head`` too when the tied weight is all
        it has). A layer sharing only some of its parameters is not listed: its others
        still train. Unfreezing a layer drops from the list every layer that then has a
        parameter training again (``embed`` with ``head``; ``encoder`` with ``encoder.0``),
        and lists what stays frozen under it (``encoder.1``)."""
        if self.model is None:
            raise ValueError("set_frozen needs the model; none was given to watch()")
        layers = [plain_name(name) for name in layers]  # "module.fc1" as the model names it
        unknown = unknown_layers(self.model, layers)
        if unknown:
            raise ValueError(
                f"unknown layer(s) {names_text(unknown)}; {layer_names_hint(self.model)}"
            )
        if frozen and getattr(self.optimizer, "_params", None) is not None:
            # LBFGS keeps the parameter list it was built with: taking parameters out of
            # the group for a step would not stop it updating them.
            raise ValueError(
                f"{type(self.optimizer).__name__} keeps its own parameter list, so layers "
                "cannot be frozen through its param groups; set requires_grad_(False) on "
                "them in the training script instead"
            )
        if frozen:
            self._check_owned(layers)
        # named_parameters() lists a tied weight once, under its first name: every name
        # (remove_duplicate=False) so that the second layer's reaches it too
        named = list(self.model.named_parameters(remove_duplicate=False))
        touched = {id(p) for pname, p in named if any(pname.startswith(f"{n}.") for n in layers)}
        if frozen:
            params = self._frozen_params | touched
            names = self.frozen | set(layers)
        else:
            params = self._frozen_params - touched
            names = self.frozen - set(layers)
        before, self.frozen = self.frozen, _frozen_layers(named, params, names)
        self._frozen_params = params
        if self.rules is not None:
            self.rules.set_frozen(sorted(self.frozen - before), True)
            self.rules.set_frozen(sorted(before - self.frozen), False)

    def _check_owned(self, layers: list[str]) -> None:
        """Refuse to freeze a layer with a trained parameter the watched optimizer does not
        hold (a GAN watched with its generator's optimizer: the discriminator's is another):
        freezing works through this optimizer's param groups, so that parameter would keep
        training while the state said frozen. A parameter without requires_grad that no
        optimizer holds (the script froze it) does not train: nothing to refuse."""
        assert self.model is not None and self.optimizer is not None
        owned = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        # a step that raised may have left this step's frozen parameters out of the groups
        owned.update(id(p) for saved in self._saved if saved[2] is not None for p in saved[2])
        outside = [
            layer
            for layer in layers
            if any(
                p.requires_grad and id(p) not in owned
                for pname, p in self.model.named_parameters(remove_duplicate=False)
                if pname.startswith(layer + ".")
            )
        ]
        if outside:
            raise ValueError(
                f"layer(s) {names_text(outside)} have parameters that are not in the watched "
                f"optimizer ({type(self.optimizer).__name__}), which freezes through its own param "
                "groups: another optimizer would keep training them. Freeze them in the "
                "training script instead (requires_grad_(False)), or watch the optimizer "
                "that trains them"
            )

    def _set_rules(self, args: dict[str, Any]) -> None:
        if self.rules is None:
            raise ValueError("set_rules needs the rules; this run has none")
        if "silenced" in args:
            silenced = set(args["silenced"])
            # Only changes: un-silencing forgets a rule's onsets, so a no-op must not.
            for rule in RULE_NAMES:
                if (rule in silenced) != (rule in self.rules.silenced):
                    self.rules.set_silenced(rule, rule in silenced)
        self.rules.set_auto(
            halve_lr=args.get("auto_halve_lr"), weight_decay=args.get("auto_weight_decay")
        )

    # ---- checkpoints ----

    def checkpoint(self, step: int) -> Path:
        """Write model, optimizer, step, control state, the rules' history and the extras'
        states to ``checkpoint-<step>.pt`` (``watch(resume=...)`` reads it back)."""
        if self.checkpoint_dir is None:
            raise ValueError("no run directory to write checkpoints to")
        path = self.checkpoint_dir / f"checkpoint-{step}.pt"
        write_checkpoint(self.snapshot(step, copy=False), path)
        self.emit("checkpoint", {"path": str(path), "step": step})
        return path

    def snapshot(self, step: int, *, copy: bool = True) -> dict[str, Any]:
        """The checkpoint contents at ``step``. ``copy``: copy every tensor to host memory
        so the file can be written later from another thread. From a GPU the copy goes
        into pinned memory, non-blocking (no sync: the flush's event, recorded after it,
        is what the writer waits on), so device memory gains nothing; host memory holds
        one copy of the model and the optimizer state until it is written. Each extra's
        ``state_dict()`` runs here, on the training thread (a CUDA GradScaler's reads its
        scale: one device sync per snapshot, for last-good.pt at most one per 30 s).

        ``rules``: the diagnostic rules' history (``Rules.state_dict``: a plateau's count,
        Overfit's streak, the loss windows, the open onsets), at the top level rather than
        among the extras, whose names a resume requires on both sides; as of the flushes
        the link thread has evaluated, so it may miss the last one before ``step``.
        Absent without rules and in checkpoints written before it: a resume then starts
        the rules afresh."""
        content: dict[str, Any] = {
            "format": CHECKPOINT_FORMAT,
            "model": self.model.state_dict() if self.model is not None else None,
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "step": step,
            "control": self.state(),
            # each checkpoint_extras object's state_dict(), by the name watch() was given
            "extras": {name: obj.state_dict() for name, obj in self.extras.items()},
            "run_id": self.run_id,
        }
        if self.rules is not None:
            content["rules"] = self.rules.state_dict()
        return clone_tensors(content) if copy else content

    def close(self) -> None:
        """Remove the hooks; the optimizer is left exactly as the user's code set it."""
        self.restore_after_raise()
        self.closed = True
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._unguard_step()
        if self._steers and self.optimizer is not None:
            with _steered_lock:
                _steered.pop(self.optimizer, None)
            self._steers = False


def _frozen_layers(
    named: list[tuple[str, nn.Parameter]], params: set[int], names: set[str]
) -> set[str]:
    """The layers to acknowledge as frozen, given the frozen parameters (``params``, by id)
    and the layers named so far: those of ``names`` whose parameters are all in ``params``
    (one without parameters, as named), plus every other layer whose parameters are all
    in it, unless a layer listed contains it or is inside it (``encoder`` frozen says
    ``encoder.0`` is; ``encoder.0`` and ``encoder.1`` named stay two names).
    ``named``: ``model.named_parameters(remove_duplicate=False)``."""
    by_layer: dict[str, list[int]] = {}
    for pname, p in named:
        parts = pname.split(".")[:-1]
        for depth in range(1, len(parts) + 1):  # the parameter is in each enclosing layer
            by_layer.setdefault(".".join(parts[:depth]), []).append(id(p))

    def all_frozen(layer: str) -> bool:
        return all(i in params for i in by_layer.get(layer, ()))

    out = {n for n in names if all_frozen(n)}
    for layer in by_layer:  # parents before children: the outermost frozen layer is named
        if not all_frozen(layer):
            continue
        if any(layer == n or layer.startswith(f"{n}.") or n.startswith(f"{layer}.") for n in out):
            continue
        out.add(layer)
    return out


def decay_settable(groups: list[dict[str, Any]]) -> bool:
    """Whether switching weight decay on changes anything for these param groups: some
    group's ``weight_decay`` is not 0 (a device tensor counts: it is not read, which would
    sync). A group without the key (an optimizer with no weight decay) has none to switch."""
    for group in groups:
        wd = group.get("weight_decay")
        if isinstance(wd, torch.Tensor) and _host_float(wd) is None:
            return True
        if _host_float(wd) not in (None, 0.0):
            return True
    return False


def names_text(names: list[str], most: int = NAMES_SHOWN) -> str:
    """``['a', 'b']``, or past ``most`` names the first ``most`` and ``and 2,043 more``."""
    if len(names) <= most:
        return repr(list(names))
    return f"{names[:most]!r} and {len(names) - most:,} more"


def cut_text(text: str, most: int) -> str:
    """``text``, or its first ``most`` characters and how many were cut."""
    if len(text) <= most:
        return text
    return f"{text[:most]} ... ({len(text) - most:,} characters cut)"


def one_line(text: str, most: int) -> str:
    """``text`` as one terminal line of at most about ``most`` characters."""
    return cut_text(" ".join(text.split()), most)


def _json_len(value: Any) -> int:
    return len(json.dumps(value, default=str))  # as wire.validate_event measures event data


def echoed_args(args: dict[str, Any], most: int = MAX_ECHO_ARGS_CHARS) -> dict[str, Any]:
    """A command's args as its result echoes them: whole when their JSON is at most ``most``
    characters, else each list cut to what fits (``<key>_omitted``: how many were left out)
    and any other value over the bound replaced by ``<key>_omitted: "N characters"``."""
    if _json_len(args) <= most:
        return args
    out: dict[str, Any] = {}
    room = most
    for key, value in args.items():
        if not isinstance(value, list) and _json_len(value) <= min(room, most // 4):
            out[key] = value
            room -= _json_len(value) + len(key) + 6
    for key, value in args.items():
        if key in out:
            continue
        if isinstance(value, list):
            kept: list[Any] = []
            for item in value:
                size = _json_len(item) + 2
                if size > room:
                    break
                kept.append(item)
                room -= size
            out[key] = kept
            out[f"{key}_omitted"] = len(value) - len(kept)
        else:
            out[f"{key}_omitted"] = f"{_json_len(value):,} characters"
    return out


def fit_result(result: dict[str, Any], most: int = MAX_RESULT_CHARS) -> dict[str, Any]:
    """``result`` whole when its JSON is at most ``most`` characters; else its state's
    ``frozen`` list cut to fit (``frozen_omitted``: how many layers were left out), so the
    server stores it (a refused result said nothing of what the command did)."""
    size = _json_len(result)
    state = result.get("state")
    if size <= most or not isinstance(state, dict) or not state.get("frozen"):
        return result
    frozen = list(state["frozen"])
    over = size - most + len('"frozen_omitted": 1000000, ')
    kept = list(frozen)
    while kept and over > 0:
        over -= _json_len(kept.pop()) + 2
    return {**result, "state": {**state, "frozen": kept, "frozen_omitted": len(frozen) - len(kept)}}


def unknown_layers(model: nn.Module, names: list[str]) -> list[str]:
    """The names among ``names`` that are no module of ``model`` (wrapper prefixes such as
    ``module.`` or ``_orig_mod.`` ignored on both sides)."""
    known = {plain_name(name) for name, _ in model.named_modules() if name}
    return [name for name in names if plain_name(name) not in known]


def layer_names_hint(model: nn.Module, most: int = 6) -> str:
    """What a layer name may be, from ``model``'s own (for an unknown-layer message): its
    modules holding parameters, ``net.0, net.2, net.4``, else any named module."""
    model = unwrapped(model)
    named = [
        n
        for n, m in model.named_modules()
        if n and next(m.parameters(recurse=False), None) is not None
    ]
    names = named or [n for n, _ in model.named_modules() if n]
    if not names:
        return "this model has no named sub-modules, so no layer can be frozen by name"
    shown = ", ".join(names[:most]) + (f", ... ({len(names)} in all)" if len(names) > most else "")
    return f"this model's layers{' with parameters' if named else ''} are {shown}"


# The weight decay a switched-off group steps with: one object, so that after a raising
# step restore_after_raise tells it from a 0.0 the user's code assigned since.
_NO_DECAY = float("0")
