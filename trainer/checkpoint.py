"""checkpoint — the checkpoint file format: what ``Control.checkpoint`` and the last good
checkpoint write, and what fine-tuning (``load_model_weights``) and ``watch(resume=...)``
read back; and the model as checkpoints name it, inside ``torch.compile``'s and
(Distributed)DataParallel's wrappers (``unwrapped``, ``plain_name``), which probes and
``set_frozen`` share.

Owns: the format (model, optimizer, step, control state, checkpoint_extras' states, run
id, and the diagnostic rules' state under "rules", which ``watch(resume=...)`` hands to
``rules.Rules.load_state_dict``; a file without it resumes with the rules afresh), writing it atomically, loading and checking it (every tensor and shape, every piece
on both sides before anything loads), the commands that bring a resumed run's control
state back (``restore_commands``), and a run folder's newest checkpoint (``newest_checkpoint``).

Never: loads a file with ``weights_only=False`` itself (a caller who trusts a file passes
the dict), or loads part of a checkpoint when another part is refused.
"""

from __future__ import annotations

import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

CHECKPOINT_FORMAT = "layerscope-checkpoint-1"


class CheckpointError(ValueError):
    """A file that is missing, not a layerscope checkpoint, or for another model."""


def unwrapped(model: nn.Module) -> nn.Module:
    """The user's own model inside ``torch.compile``'s and (Distributed)DataParallel's
    wrappers: its layers keep the names the user knows (``0``, ``fc1``; not
    ``_orig_mod.0`` or ``module.fc1``), in the probes, ``set_frozen`` and checkpoints
    alike. The wrappers call it, so its hooks fire as usual."""
    while True:
        inner = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
        if isinstance(inner, nn.Module):
            model = inner
        elif isinstance(model, nn.DataParallel | nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


_WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def plain_name(name: str) -> str:
    """A module or parameter name without the wrappers' leading ``_orig_mod.`` (torch.compile)
    and ``module.`` ((Distributed)DataParallel) segments: as the unwrapped model names it."""
    while name.startswith(_WRAPPER_PREFIXES):
        name = name.split(".", 1)[1]
    return name


def load_model_weights(model: nn.Module, path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load the model weights of a checkpoint written by ``Control.checkpoint`` into
    ``model`` (the optimizer state is not loaded); a compiled or DataParallel model loads
    into the model it wraps. Returns {path, step, tensors}."""
    path = Path(path)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    content = _load_file(path, device)
    if not isinstance(content.get("model"), dict):
        raise CheckpointError(
            f"checkpoint {path}: not a layerscope checkpoint (expected model, optimizer, step)"
        )
    tensors = _load_model(model, content["model"], f"checkpoint {path}")
    return {"path": str(path), "step": content["step"], "tensors": tensors}


def _load_file(path: Path, device: torch.device | str) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    try:
        content = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as exc:
        refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        if refused is None:
            raise CheckpointError(
                f"checkpoint {path}: not a layerscope checkpoint (UnpicklingError)"
            ) from None
        # weights_only refuses an object it does not know (a checkpoint_extras state
        # holding, say, a numpy array): name it, and the way round for a trusted file
        raise CheckpointError(
            f"checkpoint {path}: holds a {refused.group(1)}, which torch.load(weights_only="
            "True) refuses; if you trust the file, pass watch(resume=torch.load(path, "
            "weights_only=False))"
        ) from None
    except Exception as exc:  # zip and other errors all mean "not ours"
        raise CheckpointError(
            f"checkpoint {path}: not a layerscope checkpoint ({type(exc).__name__})"
        ) from None
    if not isinstance(content, dict) or not isinstance(content.get("step"), int):
        raise CheckpointError(
            f"checkpoint {path}: not a layerscope checkpoint (expected model, optimizer, step)"
        )
    return content


def _load_model(model: nn.Module, saved: dict[str, Any], where: str) -> int:
    """Load ``saved`` into ``model`` (the one inside any wrapper) after checking that every
    tensor is there with its shape; returns the count. ``where`` starts each error."""
    model = unwrapped(model)  # watch() saves the model inside compile / DataParallel wrappers
    own = model.state_dict()
    if any(name not in saved for name in own):  # one saved from a wrapper (older checkpoints)
        plain = {plain_name(name): tensor for name, tensor in saved.items()}
        if len(plain) == len(saved):
            saved = plain
    for name, tensor in own.items():
        if name not in saved:
            raise CheckpointError(f"{where}: has no tensor {name}; is it this model?")
        other = saved[name]
        if not isinstance(other, torch.Tensor) or other.shape != tensor.shape:
            shape = tuple(other.shape) if isinstance(other, torch.Tensor) else type(other).__name__
            raise CheckpointError(
                f"{where}: tensor {name} has shape {shape}, the model needs {tuple(tensor.shape)}"
            )
    extra = sorted(set(saved) - set(own))
    if extra:
        raise CheckpointError(f"{where}: tensor {extra[0]} is not in this model")
    model.load_state_dict(saved)
    return len(own)


def check_extras(extras: dict[str, Any] | None) -> dict[str, Any]:
    """``watch(checkpoint_extras=...)``: names to objects with ``state_dict()`` and
    ``load_state_dict()`` (an LR scheduler, a GradScaler, a stateful data loader)."""
    if extras is None:
        return {}
    if not isinstance(extras, dict):
        raise TypeError(
            "checkpoint_extras must be a dict of names to objects with state_dict(), e.g. "
            f'{{"scheduler": scheduler}}; got {type(extras).__name__}'
        )
    for name, obj in extras.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"checkpoint_extras: each name must be a non-empty str, got {name!r}")
        missing = [
            m for m in ("state_dict", "load_state_dict") if not callable(getattr(obj, m, None))
        ]
        if missing:
            raise TypeError(
                f"checkpoint_extras[{name!r}]: a {type(obj).__name__} has no "
                f"{' or '.join(m + '()' for m in missing)}"
            )
    return dict(extras)


@dataclass(frozen=True)
class ReadCheckpoint:
    """A checkpoint file ``read_checkpoint`` has read (``content``) from ``path``: passed
    to ``watch(resume=...)`` in place of the path, it resumes as the path would (the same
    names in its messages and its config's ``resumed_from``) without reading the file
    again (``layerscope train --resume`` reads it first for the experiment it holds)."""

    path: Path
    content: dict[str, Any]


def read_checkpoint(
    source: str | os.PathLike[str] | dict[str, Any] | ReadCheckpoint,
) -> tuple[dict[str, Any], str]:
    """What ``watch(resume=source)`` resumes from: a checkpoint's path (loaded to host
    memory: ``load_state_dict`` puts each tensor on its parameter's device), the dict a
    ``torch.load`` of it returned, or a ``ReadCheckpoint``. Returns the content and how to
    name it (``checkpoint-500.pt``)."""
    if isinstance(source, ReadCheckpoint):
        content, label = source.content, source.path.name
    elif isinstance(source, dict):
        content, label = source, None
        if not isinstance(content.get("step"), int) or content.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(
                "resume: this dict is not a layerscope checkpoint (no format "
                f"{CHECKPOINT_FORMAT!r} and step)"
            )
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        content, label = _load_file(path, "cpu"), path.name
    else:
        raise TypeError(
            f"resume must be a checkpoint's path or the dict torch.load returned, got "
            f"{type(source).__name__}"
        )
    step = content["step"]
    if step < 0:
        raise CheckpointError(f"resume: the checkpoint's step is {step}; a step count is >= 0")
    control = content.get("control")
    if control is not None and not isinstance(control, dict):
        raise CheckpointError("resume: the checkpoint's control state is not a dict")
    return content, label or f"a checkpoint at step {step}"


def load_training_state(
    content: dict[str, Any],
    label: str,
    model: nn.Module | None,
    optimizer: torch.optim.Optimizer | None,
    extras: dict[str, Any],
) -> None:
    """Load a checkpoint's model weights, optimizer state and each extra's state into the
    objects ``watch()`` was given. All or nothing per kind, each checked first: a piece on
    one side only is an error naming it, since resuming without it (a scheduler left at
    its start, an optimizer without its moments) silently trains another run."""
    where = f"resume from {label}"
    pairs = (
        ("model", model, content.get("model")),
        ("optimizer", optimizer, content.get("optimizer")),
    )
    for what, given, saved in pairs:
        if given is not None and saved is None:
            raise CheckpointError(f"{where}: the checkpoint holds no {what} state")
        if given is None and saved is not None:
            raise CheckpointError(
                f"{where}: the checkpoint holds {what} state but watch() was given no {what}"
            )
        if saved is not None and not isinstance(saved, dict):
            raise CheckpointError(f"{where}: its {what} state is not a state dict")
    saved_extras = content.get("extras") or {}
    if not isinstance(saved_extras, dict):
        raise CheckpointError(f"{where}: its extras are not a dict")
    unsaved = sorted(set(extras) - set(saved_extras))
    if unsaved:
        raise CheckpointError(
            f"{where}: the checkpoint holds no state for checkpoint_extras {unsaved} (it "
            f"holds {sorted(saved_extras) or 'none'})"
        )
    unnamed = sorted(set(saved_extras) - set(extras))
    if unnamed:
        raise CheckpointError(
            f"{where}: the checkpoint holds state for {unnamed}; pass the object(s) as "
            f"checkpoint_extras={{{unnamed[0]!r}: ...}} so they resume too"
        )
    if model is not None:
        _load_model(model, content["model"], where)
    if optimizer is not None:
        try:
            optimizer.load_state_dict(content["optimizer"])
        except (ValueError, KeyError, RuntimeError, TypeError) as exc:
            raise CheckpointError(f"{where}: optimizer: {exc}") from None
    for name, obj in extras.items():
        try:
            obj.load_state_dict(saved_extras[name])
        except (ValueError, KeyError, RuntimeError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{where}: checkpoint_extras[{name!r}]: {exc}") from None


def restore_commands(control: dict[str, Any] | None) -> list[tuple[str, dict[str, Any]]]:
    """The commands that bring a fresh run's control state to a checkpoint's: the lr
    scale, weight decay off, the frozen layers (what changes the training). Not paused or
    stopping (resuming is to train), nor the rules' switches (this watch()'s arguments)."""
    if not control:
        return []
    out: list[tuple[str, dict[str, Any]]] = []
    scale = control.get("lr_scale", 1.0)
    if scale != 1.0:
        out.append(("set_lr_scale", {"value": scale}))
    if control.get("weight_decay_enabled") is False:
        out.append(("set_weight_decay", {"enabled": False}))
    frozen = control.get("frozen") or []
    if frozen:
        out.append(("set_frozen", {"layers": list(frozen), "frozen": True}))
    return out


def write_checkpoint(content: dict[str, Any], path: Path) -> None:
    """``torch.save`` to a temporary file renamed last, so a crash mid-write never leaves a
    truncated checkpoint under ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".pt.tmp")
    torch.save(content, tmp)
    os.replace(tmp, path)


def clone_tensors(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        if value.device.type == "cpu":
            return value.detach().clone()
        host = torch.empty(value.shape, dtype=value.dtype, device="cpu", pin_memory=True)
        return host.copy_(value.detach(), non_blocking=True)
    if isinstance(value, dict):
        return {k: clone_tensors(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(clone_tensors(v) for v in value)
    return value


CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)\.pt")  # what Control.checkpoint names a file


def newest_checkpoint(folder: str | os.PathLike[str]) -> Path | None:
    """A run folder's ``checkpoint-<step>.pt`` with the highest step (not ``last-good.pt``,
    the rules' automatic one: name it to resume from it), or None when it holds none."""
    found = [
        (int(m.group(1)), path)
        for path in Path(folder).iterdir()
        if (m := CHECKPOINT_NAME.fullmatch(path.name)) is not None and path.is_file()
    ]
    return max(found)[1] if found else None
