"""distributed — one run across the ranks of a torch.distributed process group (DESIGN §4).

Owns: detecting an initialised process group (``Distributed.detect()``; without one a
no-op ``Distributed`` that calls no collective), which rank talks to the server (rank
0), the per-step exchange (rank 0's pending commands, every rank's step time and
samples/s, every rank's probe layout and optimizer.step() count), applying the same
commands at the same step on every rank, stopping every rank with one clear error when
a rank's w.step() calls stop matching its training steps (``StepMismatch``), holding every rank while paused without tripping the process group's
timeout, the two collectives behind ``probes.Reducer`` (MAX and SUM), and what a
built-in experiment needs under torchrun: the process group from the environment,
DistributedDataParallel, and each rank's shard of a batch.

Never: talks to the server or reads the user's data, applies a command on one rank
only (a checkpoint is the exception: rank 0 writes it, once), or issues a collective
that the other ranks do not issue in the same order with tensors of the same shape.

Each rank's step time (``step_time_s/rankN``, ``step_time_s/max``, ``slowest_rank``) is
its wall time between w.step() calls less its own wait inside w.step(): the exchange's
collective and the step-boundary work (commands, a pause). Every rank meets in the
exchange, so a fast rank waits there for a slow one: counted, that wait made every
rank's time the slowest's and ``slowest_rank`` a coin toss. A wait inside the user's
own collectives still hides a straggler: with DDP, the fast rank waits in backward's
gradient all-reduce, which is inside its step, so there the ranks' times come out
alike. ``step_time_s`` itself stays rank 0's wall step time, and ``samples_per_s`` the
run's: the sum of every rank's batch over its wall step time (``samples_per_s/rankN``).

Cost: one small all_reduce per step on a gloo group of CPU tensors (about 8 KiB; a
host-level barrier, never a device sync: with NCCL as the default backend a separate
gloo group carries it), plus, on probe steps, two all_reduces of the probe sections on
the default group, on the model's device (no host read). While paused every rank
calls the exchange every ``keepalive_s`` (at most 1 s, a quarter of the timeout).
"""

from __future__ import annotations

import atexit
import datetime
import gc
import json
import logging
import math
import os
import queue
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from layerscope.trainer.control import Control
from layerscope.trainer.probes import Probes
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

log = logging.getLogger(__name__)

COMMAND_BYTES = 1024  # commands that fit ride in the per-step tensor; more costs a 2nd broadcast
KEEPALIVE_MAX_S = 1.0
MAX_RANK_SERIES = 8  # per-rank series up to this world size (a row holds 256 values)
_DEFAULT_TIMEOUT = datetime.timedelta(minutes=30)  # torch's default process group timeout
# The exchange tensor: [command byte count, leave-pause flag, COMMAND_BYTES bytes,
# world step times, world samples/s, world probe layouts, world optimizer.step() counts];
# summed, so each rank fills only its own slots (rank 0 the command part), the rest 0.
_HEAD = 2
_SHARED = 4  # values each rank shares per exchange


class StepMismatch(RuntimeError):
    """A rank called w.step() without an optimizer step while the others made one: its
    w.step() calls no longer pair with theirs. Raised on every rank at the same step."""


class Distributed:
    """A single process: rank 0 of 1, no collective. ``detect()`` returns this when no
    process group is initialised, so ``watch()`` behaves exactly as without this module."""

    rank = 0
    world_size = 1
    active = False

    @staticmethod
    def detect() -> Distributed:
        """The run's process group: ``ProcessGroupRun`` when torch.distributed is
        initialised with more than one rank, else a no-op ``Distributed``."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return ProcessGroupRun()
        return Distributed()

    @property
    def is_primary(self) -> bool:
        """The one rank that talks to the server, writes checkpoints and acknowledges."""
        return self.rank == 0

    def attach(self, control: Control, probes: Probes | None) -> None:
        """Take rank 0's commands from ``control``'s queue (the link fills it) and reduce
        ``probes``' statistics across ranks (no-op here)."""

    def exchange(
        self,
        values: dict[str, float | None],
        step_time_s: float,
        batch_size: int | None,
        *,
        probe_step: bool = False,
        step: int = 0,
    ) -> None:
        """At each ``w.step()`` (``step``), before the flush: share commands, step times,
        optimizer.step() counts and, on a probe step, the probe layout; rank 0 adds every
        rank's step time and samples/s, and the run's samples/s (their sum), to ``values``
        (no-op here). ``step_time_s`` is the wall time since the previous ``w.step()``."""

    def at_step_boundary(
        self, control: Control, step: int, before_block: Callable[[], None] | None = None
    ) -> None:
        """Apply this step's commands; while paused, block here (every rank)."""
        control.at_step_boundary(step, before_block=before_block)


class ProcessGroupRun(Distributed):
    """The ranks of the default process group; see the module docstring."""

    active = True

    def __init__(self) -> None:
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        backend = str(dist.get_backend())
        self.timeout = _group_timeout(backend)
        self.keepalive_s = min(KEEPALIVE_MAX_S, self.timeout.total_seconds() / 4)
        # Commands and step times are host values: exchanging them as CPU tensors on a
        # gloo group costs no device sync. Creating the group is itself a collective,
        # so every rank does it here, in watch(), at the same point.
        self.group: Any = None if backend == "gloo" else _gloo_group(self.timeout)
        if backend != "gloo" and self.group is None:
            log.warning(
                "layerscope: no gloo group beside %s; the per-step exchange uses the default "
                "group on the GPU and reads it back (one device sync per step)",
                backend,
            )
        self.device = (
            torch.device("cuda", torch.cuda.current_device())
            if self.group is None and backend == "nccl"
            else torch.device("cpu")
        )
        self.probes: Probes | None = None
        self.control: Control | None = None
        self.queue: queue.SimpleQueue[dict[str, Any]] | None = None
        # every rank's optimizer.step() count at the last exchange of a w.step()
        self._optimizer_steps: list[int] = [0] * self.world_size
        self.commands: list[dict[str, Any]] = []
        self._agreed = False
        self._warned_layout = False
        # seconds spent in w.step()'s own exchange and step boundary since the last exchange
        self._waited_s = 0.0

    # ---- probes.Reducer ----

    def attach(self, control: Control, probes: Probes | None) -> None:
        self.queue = control.commands
        self.control = control
        self.probes = probes
        if probes is not None:
            probes.reducer = self

    def agreed(self) -> bool:
        return self._agreed

    def all_max(self, tensor: Tensor) -> Tensor:
        out = tensor.contiguous().clone()
        dist.all_reduce(out, op=dist.ReduceOp.MAX)
        return out

    def all_sum(self, tensor: Tensor) -> Tensor:
        out = tensor.contiguous().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    # ---- the per-step exchange ----

    def exchange(
        self,
        values: dict[str, float | None],
        step_time_s: float,
        batch_size: int | None,
        *,
        probe_step: bool = False,
        step: int = 0,
    ) -> None:
        layout = 0
        if self.probes is not None and (probe_step or self.probes.armed):
            # what the step recorded; the hooks may have come off already (MAX_PROBE_PASSES)
            layout = self.probes.layout_key()
        samples = batch_size / step_time_s if batch_size is not None and step_time_s > 0 else 0.0
        own_s = max(0.0, step_time_s - self._waited_s)  # less the previous step's waits
        commands = self._take_commands(None) if self.is_primary else []
        made = self.control.optimizer_steps if self.control is not None else 0
        started = time.perf_counter()
        received, _, shared = self._exchange(commands, False, (own_s, samples, layout, made), step)
        self._waited_s = time.perf_counter() - started
        self._check_in_step([int(n) for n in shared[3]], step)
        self.commands = received
        layouts = shared[2]
        self._agreed = layout != 0 and all(key == layouts[0] for key in layouts)
        if layout != 0 and not self._agreed and not self._warned_layout:
            self._warned_layout = True
            log.warning(
                "layerscope: the ranks recorded different layers or calls at a probe step; "
                "its statistics are rank 0's own batch, not the global one"
            )
        if self.is_primary:
            _add_rank_series(values, shared[0], shared[1] if batch_size is not None else None)

    def _check_in_step(self, counts: list[int], step: int) -> None:
        """Every rank's optimizer.step() calls since its previous w.step(): a rank with none
        while another made one called w.step() once more (a loop calling it twice on one
        rank, or after an early ``continue``). Its w.step() calls pair with the others'
        w.step() of the next training step from here on, and the run would fail later in a
        mismatched collective, or hang at its end, without saying why: every rank sees
        the same counts, so every rank raises here, naming the rank and the step. Ranks
        that all made none (a w.step() before the first optimizer step, a step every rank's
        GradScaler skipped) are in step."""
        made = [now - before for now, before in zip(counts, self._optimizer_steps, strict=True)]
        self._optimizer_steps = counts
        idle = [rank for rank, n in enumerate(made) if n == 0]
        if not idle or len(idle) == len(made):
            return
        ranks = ", ".join(map(str, idle))
        busy = next(rank for rank, n in enumerate(made) if n)
        raise StepMismatch(
            f"layerscope: at step {step}, rank{'s' if len(idle) > 1 else ''} {ranks} called "
            f"w.step() without an optimizer.step() since its previous w.step(), while rank "
            f"{busy} made {made[busy]}: the ranks' w.step() calls no longer match (one more "
            "on some ranks). Call w.step() once per optimizer step on every rank, the same "
            "number of times; every rank stops here"
        )

    def at_step_boundary(
        self, control: Control, step: int, before_block: Callable[[], None] | None = None
    ) -> None:
        started = time.perf_counter()
        try:
            self._at_step_boundary(control, step, before_block)
        finally:
            self._waited_s += time.perf_counter() - started

    def _at_step_boundary(
        self, control: Control, step: int, before_block: Callable[[], None] | None
    ) -> None:
        control.restore_after_raise()
        self._apply(control, self.commands, step)
        self.commands = []
        blocked = False
        while control.paused and not control.stopping:
            if control.take_release_one():
                return
            if not blocked and before_block is not None:
                before_block()
            blocked = True
            # Rank 0 waits up to keepalive_s for a command; every rank then meets in the
            # exchange, which keeps the process group's timeout from firing.
            commands = self._take_commands(self.keepalive_s) if self.is_primary else []
            leave = self.is_primary and control.closed
            received, left, _ = self._exchange(commands, leave, (0.0, 0.0, 0, 0), step)
            self._apply(control, received, step)
            if left:
                return

    def _take_commands(self, wait_s: float | None) -> list[dict[str, Any]]:
        """Rank 0: every command queued by the link (waiting up to ``wait_s`` for one)."""
        return _drain(self.queue, wait_s) if self.queue is not None else []

    def _apply(self, control: Control, commands: list[dict[str, Any]], step: int) -> None:
        for command in commands:
            name = command.get("name")
            if name == "checkpoint" and not self.is_primary:
                log.info(
                    "layerscope rank %d: checkpoint (cmd_seq %s) at step %d is rank 0's",
                    self.rank,
                    command.get("cmd_seq"),
                    step,
                )
                continue
            result = control.apply(command, step)
            if result is not None:
                log.info(
                    "layerscope rank %d: applied %s (cmd_seq %s) at step %d",
                    self.rank,
                    name,
                    command.get("cmd_seq"),
                    step,
                )

    def _exchange(
        self,
        commands: list[dict[str, Any]],
        leave: bool,
        mine: tuple[float, float, int, int],
        step: int,
    ) -> tuple[list[dict[str, Any]], bool, list[list[float]]]:
        """One SUM all_reduce of the exchange tensor (plus a broadcast of the overflow when
        rank 0's commands exceed COMMAND_BYTES). Returns (rank 0's commands, rank 0's
        leave flag, [step times, samples/s, layouts, optimizer.step() counts] of every
        rank). A collective that fails (another rank died, or met this exchange with
        another collective) raises a RuntimeError naming this rank and ``step``."""
        try:
            return self._all_reduce_exchange(commands, leave, mine)
        except RuntimeError as exc:
            raise RuntimeError(
                f"layerscope rank {self.rank}: the exchange of w.step() at step {step} "
                f"failed: {' '.join(str(exc).split())[:500]}. Another rank has failed or "
                "exited, or met this exchange with another collective: each rank must call "
                "w.step() once per optimizer step, the same number of times (see the other "
                "ranks' output)"
            ) from exc

    def _all_reduce_exchange(
        self, commands: list[dict[str, Any]], leave: bool, mine: tuple[float, float, int, int]
    ) -> tuple[list[dict[str, Any]], bool, list[list[float]]]:
        world = self.world_size
        payload = json.dumps(commands, separators=(",", ":")).encode() if commands else b""
        buffer = torch.zeros(_HEAD + COMMAND_BYTES + _SHARED * world, dtype=torch.float64)
        if self.is_primary:
            buffer[0] = len(payload)
            buffer[1] = 1.0 if leave else 0.0
            head = payload[:COMMAND_BYTES]
            if head:
                buffer[_HEAD : _HEAD + len(head)] = torch.frombuffer(
                    bytearray(head), dtype=torch.uint8
                ).to(torch.float64)
        at = _HEAD + COMMAND_BYTES
        for k, value in enumerate(mine):
            buffer[at + k * world + self.rank] = float(value)
        buffer = buffer.to(self.device)
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=self.group)
        host = buffer.cpu()  # a no-op for the gloo group's CPU tensor
        length, left = int(host[0]), bool(host[1] > 0)
        data = bytes(host[_HEAD : _HEAD + min(length, COMMAND_BYTES)].to(torch.uint8).tolist())
        if length > COMMAND_BYTES:
            rest = torch.zeros(length - COMMAND_BYTES, dtype=torch.uint8, device=self.device)
            if self.is_primary:
                rest.copy_(torch.frombuffer(bytearray(payload[COMMAND_BYTES:]), dtype=torch.uint8))
            dist.broadcast(rest, src=0, group=self.group)
            data += bytes(rest.cpu().tolist())
        received: list[dict[str, Any]] = json.loads(data) if data else []
        shared = host[at:].view(_SHARED, world).tolist()
        return received, left, shared


def _drain(
    commands: queue.SimpleQueue[dict[str, Any]], wait_s: float | None
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if wait_s is not None:
        try:
            out.append(commands.get(timeout=wait_s))
        except queue.Empty:
            return out
    while not commands.empty():
        try:
            out.append(commands.get_nowait())
        except queue.Empty:
            break
    return out


def _add_rank_series(
    values: dict[str, float | None], times: list[float], samples: list[float] | None
) -> None:
    """Every rank's step time (less its wait in w.step(), see the module docstring) and
    samples/s on rank 0's row, so a straggler shows, and the run's ``samples_per_s``,
    their sum (unless the step gave its own); past MAX_RANK_SERIES ranks only the slowest
    rank and its time."""
    slowest = max(range(len(times)), key=times.__getitem__)
    values["step_time_s/max"] = times[slowest]
    values["slowest_rank"] = float(slowest)
    if samples is not None:
        rates = [rate for rate in samples if math.isfinite(rate) and rate > 0]
        if len(rates) == len(samples):
            values.setdefault("samples_per_s", sum(rates))
    if len(times) > MAX_RANK_SERIES:
        return
    for rank, seconds in enumerate(times):
        values[f"step_time_s/rank{rank}"] = seconds
        if samples is not None:
            rate = samples[rank]
            values[f"samples_per_s/rank{rank}"] = rate if math.isfinite(rate) and rate > 0 else None


# ---- built-in experiments under torchrun (``layerscope train --nproc N``) ----


def start_process_group(device: str) -> tuple[int, int, bool]:
    """(rank, world size, whether this call initialised the group). Launched as one of
    several ranks (torchrun's WORLD_SIZE > 1), initialise the default group from the
    environment, nccl when the run uses CUDA (pinning this rank's GPU, LOCAL_RANK) and
    gloo on CPU; ``end_process_group`` ends it (and, as a fallback, exit). (0, 1, False)
    for a single process. ``device`` is the experiment's ``solver.device``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not dist.is_available():
        return 0, 1, False
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    atexit.register(_destroy_process_group)
    return dist.get_rank(), dist.get_world_size(), True


def end_process_group(owned: bool, finished: bool) -> None:
    """End the group ``start_process_group`` initialised (``owned``), while every object
    that used it is gone and the interpreter is fully alive: a group left to interpreter
    shutdown can abort the process (gloo's worker threads are torn down with it). After
    a ``finished`` run the ranks first meet in a barrier, so no rank tears its end down
    while another is still in a collective; after a failure they do not wait."""
    if not (owned and dist.is_available() and dist.is_initialized()):
        return
    gc.collect()  # DDP's reducer and any cycle holding the group
    if finished:
        dist.barrier()
    _destroy_process_group()


def _destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def data_parallel(model: nn.Module) -> nn.Module:
    """``model`` wrapped in DistributedDataParallel under a process group (gradients
    averaged over the ranks in backward); ``model`` itself otherwise. ``watch()`` gets the
    unwrapped model, so layer names and checkpoints are the same as a single process's."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return model
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    ids = [device.index] if device.type == "cuda" and device.index is not None else None
    return DistributedDataParallel(model, device_ids=ids)


def shard_size(batch_size: int, rank: int, world: int) -> int:
    """This rank's part of a global batch of ``batch_size`` (``shard``'s split)."""
    if batch_size < world:
        raise ValueError(
            f"a batch of {batch_size} examples cannot be split over {world} ranks; "
            "use --batch-size of at least --nproc"
        )
    return batch_size // world + (1 if rank < batch_size % world else 0)


def shard(indices: Tensor, rank: int, world: int) -> Tensor:
    """This rank's slice of one global batch: every rank draws the same seeded batch and
    keeps its own contiguous part, so the ranks together train on exactly the batches a
    single process would."""
    return indices.tensor_split(world)[rank] if world > 1 else indices


def _group_timeout(backend: str) -> datetime.timedelta:
    """The default group's collective timeout (how long a rank may wait in a collective)."""
    pg = dist.group.WORLD
    device = torch.device("cuda" if backend == "nccl" else "cpu")
    try:
        timeout = pg._get_backend(device).options._timeout  # type: ignore[union-attr]
    except (AttributeError, RuntimeError):
        return _DEFAULT_TIMEOUT
    return timeout if isinstance(timeout, datetime.timedelta) else _DEFAULT_TIMEOUT


def _gloo_group(timeout: datetime.timedelta) -> Any:
    try:
        return dist.new_group(backend="gloo", timeout=timeout)
    except (RuntimeError, ValueError):
        return None
