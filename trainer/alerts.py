"""alerts — runs the diagnostic rules on each flush's host values (the link thread).

Owns: feeding a flush's decoded numbers to ``rules.Rules`` in the order the
rules expect (every training loss as the raw float and validation rows, in step
order, with the probe step's layer entries in depth order before that step's
rows, so a step gone NaN/Inf is named after its first bad layer, not the loss
it reached), turning each finding into an
``alert`` event frame, submitting a finding's action to ``Control`` as an
ordinary command (``source: rule``, with its reason), and keeping the last good
checkpoint: a snapshot taken on the training thread at a probe step is written
to ``run_dir/last-good.pt`` once that step's numbers proved all finite.

Never: runs on the training thread or touches the model or optimizer (commands
are applied by ``Control`` at the next ``w.step()``; snapshots arrive already
copied), syncs with the device (it only sees host numbers), or talks to the
network (frames go back to the link that called it).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from layerscope.trainer.checkpoint import write_checkpoint
from layerscope.trainer.control import Control
from layerscope.trainer.rules import PAUSING, STOPPING, Finding, Rules
from layerscope.trainer.wire import escape_surrogates

log = logging.getLogger(__name__)

LAST_GOOD_NAME = "last-good.pt"
# Every N-th probe step (counting step 1's) snapshots the model for the last good checkpoint,
DEFAULT_GOOD_CHECKPOINT_EVERY = 10
# ... at most one per GOOD_CHECKPOINT_MIN_S of wall time: a fast loop would otherwise copy
# and write the whole model and optimizer state several times a second.
GOOD_CHECKPOINT_MIN_S = 30.0


class Alerts:
    """The rule evaluation of one run; called by the link thread, one flush at a time."""

    def __init__(
        self,
        rules: Rules,
        control: Control,
        run_dir: Path,
        params: Mapping[str, int],
        *,
        steerable: bool | Callable[[], bool] = True,
    ) -> None:
        self.rules = rules
        self.control = control
        # False with no server, or none reachable when a finding comes (asked then): nothing
        # can resume a pause, and no dashboard shows alerts (each is logged; a rule's pause
        # becomes a stop, which the loop's should_stop sees).
        self.steerable = steerable
        self.last_good_path = run_dir / LAST_GOOD_NAME
        self.last_good_step: int | None = None
        self.params = dict(params)  # parameter count per probed layer
        # Said after a rule's stop in the log line, for watch() in the user's own loop;
        # ``layerscope train`` sets "" (its user has no w.should_stop to read).
        self.stop_note = " (w.should_stop is now True)."
        # The weight decay per param group key ("weight_decay", "weight_decay/1", ...) as the
        # latest row that carried it said: the optimizer's steps' rows carry it, evaluation
        # rows (w.eval) do not, and Overfit's advice needs it at an evaluation.
        self.weight_decay: dict[str, float] = {}

    def evaluate(
        self,
        rows: Sequence[Mapping[str, Any]],
        probe: tuple[int, list[dict[str, Any]], Mapping[str, Any]] | None,
        snapshot: dict[str, Any] | None,
    ) -> list[dict[str, Any]]:
        """Findings for one flush as event frames. ``rows``: metrics rows with raw floats
        (NaN not yet turned into null); ``probe``: (step, decoded layer entries, decoded
        run scalars); ``snapshot``: the probe step's checkpoint contents, if one was taken."""
        findings: list[Finding] = []
        losses: dict[int, float] = {}
        # The rows of the probe step and after come after its probe values: a step whose
        # activations and loss both went NaN/Inf is named after the layer where it began, not
        # the loss it reached (per-row order, which the loss window needs, is kept).
        at = probe[0] if probe is not None else None
        findings += self._rows([r for r in rows if at is None or r["step"] < at], losses)
        if probe is not None:
            step, layers, scalars = probe
            grad_norm = _raw(scalars.get("grad_norm"))
            raw_scalars = {} if grad_norm is None else {"grad_norm": grad_norm}
            findings += self.rules.on_probe(step, layers, raw_scalars)
        findings += self._rows([r for r in rows if at is not None and r["step"] >= at], losses)
        if probe is not None:
            loss = losses.get(step)
            finite = (
                not self._nonfinite_weights(layers)
                and not any((_raw(e.get("nonfinite")) or 0.0) > 0 for e in layers)
                and not any(_nonfinite(e.get(k)) for e in layers for k in _PARAM_NORMS)
                and not _nonfinite(grad_norm)
                and not _nonfinite(loss)
            )
            if snapshot is not None and finite:
                self._keep_good(snapshot, step)
        frames = []
        for finding in findings:
            command = finding.to_command(self.control.lr_scale)
            if not (self.steerable() if callable(self.steerable) else self.steerable):
                finding, command = self._unattended(finding, command)
            frames.append(self._frame(finding))
            if command is not None:
                self.control.submit(command)
        return frames

    def _rows(self, rows: Sequence[Mapping[str, Any]], losses: dict[int, float]) -> list[Finding]:
        """Feed metrics rows' training and validation losses; ``losses`` gets each loss."""
        findings: list[Finding] = []
        for row in rows:
            values = row["values"]
            for key, value in values.items():
                decay = _raw(value) if key.split("/")[0] == "weight_decay" else None
                if decay is not None and math.isfinite(decay):
                    self.weight_decay[key] = decay
            loss = _raw(values.get("loss"))
            if loss is not None:
                losses[row["step"]] = loss
                findings += self.rules.on_loss(row["step"], loss)
            if "val_loss" in values:
                # As the steps up to this evaluation used it (a rule's or the user's switch
                # shows in the rows of the steps after it was applied); None: no row said.
                decays = self.weight_decay.values()
                findings += self.rules.on_eval(
                    row["step"],
                    _raw(values["val_loss"]),
                    weight_decay_on=any(d > 0 for d in decays) if decays else None,
                    weight_decay_settable=self.control.weight_decay_settable,
                )
        return findings

    def _unattended(
        self, finding: Finding, command: dict[str, Any] | None
    ) -> tuple[Finding, dict[str, Any] | None]:
        """With no server reachable: the alert goes to the log (stderr), and a pause, which
        nothing could resume, becomes a stop (a paused loop would wait forever); the alert
        as recorded says so (its message and action), not the pause it would have been."""
        stopping = command is not None and command["name"] == "pause"
        if stopping:
            assert command is not None
            message = finding.message.replace(PAUSING, STOPPING)
            if message == finding.message:
                message += " " + STOPPING[2:].capitalize() + "."
            reason = f"{command.get('reason', finding.message)}; no server to resume it: stopped"
            command = {**command, "name": "stop", "args": {}, "reason": reason}
            action = {"name": "stop", "args": {}, "source": "rule", "reason": reason}
            finding = dataclasses.replace(finding, message=message, action=action)
        log.warning(
            "layerscope: [%s] %s%s",
            finding.rule,
            finding.message,
            self.stop_note if stopping else "",
        )
        return finding, command

    def _nonfinite_weights(self, layers: Sequence[Mapping[str, Any]]) -> list[str]:
        # A parameterised layer's weight_norm is NaN/Inf as the flush hands it over, or None
        # where a decoder hid the NaN/Inf (it is never None otherwise).
        return [
            e["name"]
            for e in layers
            if self.params.get(e["name"], 0) > 0
            and "weight_norm" in e
            and (e["weight_norm"] is None or _nonfinite(e["weight_norm"]))
        ]

    def _keep_good(self, snapshot: dict[str, Any], step: int) -> None:
        try:
            write_checkpoint(snapshot, self.last_good_path)
        except (OSError, RuntimeError) as exc:
            log.warning("layerscope: could not write the last good checkpoint: %s", exc)
            return
        self.last_good_step = step

    def _frame(self, finding: Finding) -> dict[str, Any]:
        data = finding.to_event_data()
        if finding.rule == "ExplodingTensor":
            good = self.last_good_step is not None
            # a run_dir from a file name that is not UTF-8 holds a lone surrogate, which the
            # server refuses (the alert was lost): sent as \xNN, as watch() sends the config
            path = escape_surrogates(str(self.last_good_path))
            data["last_good_checkpoint"] = path if good else None
            data["last_good_step"] = self.last_good_step
        return {"type": "event", "step": finding.step, "kind": "alert", "data": data}


# Per-layer parameter norms: a NaN/Inf one here means the step's numbers are not all finite.
_PARAM_NORMS = ("grad_norm", "weight_norm", "update_ratio")


def _nonfinite(value: Any) -> bool:
    raw = _raw(value)
    return raw is not None and not math.isfinite(raw)


def _raw(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)
