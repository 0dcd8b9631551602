"""The training loop's bookkeeping (training/engine.py), kept out of the step's way: what the steps
since the last log step add up to, and which steps the optimizer skipped.

Neither makes the host wait for the device during a step (on a GPU each such read waits for all
the work queued before it; tests/support/count_syncs.py counts them): losses add up on the device and are
read once per log step; DeepSpeed counts its skipped steps on the host, and ZeRO-0's optimizer,
which counts them on the device, is read at log steps too.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import torch

from training.failures import SkipTracker


class LossWindow:
    """The steps since the last log step: their losses, summed on the device (where they are
    computed), the micro-steps taken, and the seconds since the window began and spent waiting
    for data. `mean_loss` is the window's one read of the device."""

    def __init__(self, device: torch.device) -> None:
        self.loss_sum = torch.zeros((), device=device)
        self.finite_losses = torch.zeros((), device=device)
        self.micro_steps, self.data_wait_s, self.began = 0, 0.0, time.time()

    @contextlib.contextmanager
    def waiting_for_data(self) -> Iterator[None]:
        """Counts the block's seconds as time spent waiting for a batch."""
        began = time.time()
        yield
        self.data_wait_s += time.time() - began

    def add(self, loss: torch.Tensor) -> None:
        """One micro-step's loss; a non-finite one (its step is skipped) is left out of the mean."""
        finite = torch.isfinite(loss.detach())
        self.loss_sum += torch.where(finite, loss.detach().float(), 0.0)
        self.finite_losses += finite
        self.micro_steps += 1

    def elapsed_s(self) -> float:
        return time.time() - self.began

    def mean_loss(self) -> float:
        """This rank's mean finite loss over the window; NaN when none was finite."""
        total, count = torch.stack([self.loss_sum, self.finite_losses]).tolist()
        return total / count if count else float("nan")

    def restart(self) -> None:
        """Begin the next window (after the log step is written, so that its writing counts in neither)."""
        self.loss_sum.zero_()
        self.finite_losses.zero_()
        self.micro_steps, self.data_wait_s, self.began = 0, 0.0, time.time()


class OptimizerSkips:
    """Which steps the optimizer refused (a non-finite loss or gradients), told to a SkipTracker
    (which stops the run after too many in a row) as each step ends.

    DeepSpeed counts the steps it skips in a host integer, `engine.skipped_steps`, known at once.
    ZeRO-0's optimizer (GuardedAdamW, training/ds_config.py) counts them in a device tensor, which
    is read only at log steps: the tracker then learns how many of the window's steps were skipped,
    not which."""

    def __init__(self, engine: Any, optimizer: torch.optim.Optimizer, tracker: SkipTracker, start_step: int) -> None:
        self.engine, self.tracker = engine, tracker
        self.seen = engine.skipped_steps
        # updated in place by the optimizer's step, so this reference stays current
        self.on_device: torch.Tensor | None = getattr(optimizer, "skipped", None)
        self.read, self.window_start = 0, start_step

    @property
    def total(self) -> int:
        return self.tracker.total

    def step_ended(self, done: int, log_step: bool, last_checkpoint: str | None) -> bool:
        """Record the step that just ended (`done` steps taken in all); returns whether DeepSpeed
        skipped it (a skip counted on the device is known only as part of a window). Raises
        NonFiniteStreak after too many skipped steps in a row, naming `last_checkpoint`."""
        skipped = self.engine.skipped_steps > self.seen
        self.seen = self.engine.skipped_steps
        if self.on_device is None:
            self.tracker.record(skipped, done, last_checkpoint)
        elif log_step:
            now = int(self.on_device)
            self.tracker.record_window(now - self.read, done - self.window_start, done, last_checkpoint)
            self.read, self.window_start = now, done
        return skipped
