"""What goes wrong in month-long runs, handled in one place: preemption, non-finite steps, and the
faults the tests inject on purpose."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import torch
import torch.distributed as dist

from models.base.errors import JobFailed
from training.config import FaultInjection


class NonFiniteStreak(JobFailed):
    pass


class Preempted(Exception):
    """Raised after the preemption checkpoint is saved; the rank then exits 0."""


class Preemption:
    """SIGTERM sets a flag; ranks agree on it at the next step boundary (one tiny all-reduce).

    The all-reduce goes over the host (gloo), so that agreeing at every step never makes the host
    wait for the accelerator's queue: an all-reduce on the GPU would put the flag behind the step's
    kernels, and reading it would wait for them all."""

    def __init__(self) -> None:
        self.requested = False
        self._group: Any = None
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._handle)
        # else the engine runs inside a host (Ray Train runs it in a worker thread) that owns the
        # signals and restarts the worker group after a preemption; the run resumes from `latest`

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def agreed(self) -> bool:
        flag = torch.tensor([1.0 if self.requested else 0.0])
        if dist.is_initialized():
            if self._group is None:  # every rank gets here at the same step: a collective call
                self._group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return bool(flag.numpy()[0])  # host memory: numpy() refuses a device tensor


class SkipTracker:
    """Counts steps the optimizer refused (non-finite loss or gradients); too many in a row stop the run."""

    def __init__(self, limit: int, total: int = 0):
        self.limit, self.total, self.streak = limit, total, 0

    def record(self, skipped: bool, step: int, last_checkpoint: str | None) -> None:
        if not skipped:
            self.streak = 0
            return
        self.total += 1
        self.streak += 1
        self._check(step, last_checkpoint)

    def record_window(self, skipped: int, steps: int, step: int, last_checkpoint: str | None) -> None:
        """`skipped` of the last `steps` steps (up to `step`), counted on the device and read at a log
        step, which steps not known: a window skipped whole continues the streak; else the streak is
        taken as its skipped steps, as if they came last (the longest it can be)."""
        self.total += skipped
        self.streak = self.streak + skipped if skipped == steps else skipped
        self._check(step, last_checkpoint)

    def _check(self, step: int, last_checkpoint: str | None) -> None:
        if self.streak >= self.limit:
            raise NonFiniteStreak(
                f"{self.streak} steps in a row had a non-finite loss or gradients (the last at step {step}); "
                f"stopping. The newest checkpoint, {last_checkpoint or 'none yet'}, holds finite weights: "
                "lower train.optim.lr, raise train.grad_clip, or use bf16 instead of fp16"
            )


def inject(faults: FaultInjection, loss: torch.Tensor, step: int, rank: int, resumed: bool = False) -> torch.Tensor:
    """Apply the configured deliberate faults at `step` (1-based, the step being taken)."""
    if faults.kill_rank == rank and step == faults.kill_step and not resumed:
        os.kill(os.getpid(), signal.SIGKILL)
    if faults.hang_rank == rank and step == faults.hang_step:
        # SIGTERM ends it: torchrun, once the other ranks failed, would otherwise wait its fixed 30 s
        # before the SIGKILL (the preemption handler only sets a flag); what is tested is the timeout
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        while True:  # stops answering collectives, as a wedged node does
            time.sleep(3600)
    if step in faults.nan_loss_steps:
        return loss * float("nan")
    return loss
