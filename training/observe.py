"""What a run shows while it runs: metrics.jsonl, TensorBoard, a progress bar, preview images.

Rank 0 writes everything into `logs/` of the run folder (for a remote run folder, into a local
folder that is uploaded with every checkpoint, since object stores cannot append).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import psutil
import torch
from PIL import Image
from tqdm import tqdm

from models.base import storage


def memory_stats(device: torch.device) -> dict[str, float]:
    stats = {"rss_gb": psutil.Process().memory_info().rss / 2**30}
    if device.type == "cuda":
        stats["cuda_max_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return stats


METRICS = "metrics.jsonl"


class RunLog:
    """The logs of a run that starts at `start_step` (0, or the step of the checkpoint it resumed
    from), on rank 0 (`enabled`); every other rank's does nothing.

    The logs hold each step once: what an earlier attempt logged after `start_step` (a run killed
    after logging step 4 but checkpointed at step 2 logged steps 3 and 4, which the resumed run logs
    again) is dropped from metrics.jsonl, here and in the uploaded copy, and hidden from TensorBoard."""

    def __init__(
        self,
        run_url: str,
        local_dir: str,
        enabled: bool,
        total_steps: int,
        progress_bar: str,
        log: Callable[[str], None],
        start_step: int = 0,
    ) -> None:
        self.run_url, self.dir, self.enabled, self.log = run_url, local_dir, enabled, log
        self.tb = None
        self.bar = None
        if not enabled:
            return
        os.makedirs(self.dir, exist_ok=True)
        logs_url = storage.join(run_url, "logs")
        remote_metrics = not storage.is_local(run_url) and storage.exists(storage.join(logs_url, METRICS))
        if remote_metrics:
            # a resumed remote run: `upload` replaces the logs there, so what the earlier runs logged comes first
            storage.download_dir(logs_url, self.dir)
        if keep_steps_up_to(os.path.join(self.dir, METRICS), start_step) and remote_metrics:
            # now, not at the next checkpoint: a run stopped before it would leave the dropped steps there
            fs, root = storage.url_to_fs(logs_url)
            fs.put_file(os.path.join(self.dir, METRICS), f"{root}/{METRICS}")
        from torch.utils.tensorboard import SummaryWriter  # lazy: TensorBoard's writer, on rank 0 only

        # purge_step: TensorBoard hides the events of steps from there on that earlier attempts wrote
        self.tb = SummaryWriter(os.path.join(self.dir, "tensorboard"), purge_step=start_step + 1)
        if progress_bar == "always" or (progress_bar == "auto" and sys.stderr.isatty()):
            self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, desc="train")

    def advance(self, text: str) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(text, refresh=False)

    def scalars(self, record: dict[str, Any]) -> None:
        if self.tb is None:  # not rank 0
            return
        with open(os.path.join(self.dir, METRICS), "a") as f:
            f.write(storage.strict_json(record) + "\n")
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and value is not None:
                self.tb.add_scalar(f"train/{key}", value, record["step"])
        self.tb.flush()

    def images(self, step: int, previews: list[tuple[str, Image.Image]]) -> list[str]:
        if self.tb is None or not previews:
            return []
        paths = []
        for name, image in previews:
            path = os.path.join(self.dir, "previews", f"step_{step:07d}-{name}.png")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            image.save(path)
            paths.append(path)
            self.tb.add_image(f"preview/{name}", np.asarray(image.convert("RGB")), step, dataformats="HWC")
        self.tb.flush()
        return paths

    def upload(self) -> None:
        """Copy the logs next to the checkpoints when the run folder is remote."""
        if not self.enabled or storage.is_local(self.run_url):
            return
        fs, root = storage.url_to_fs(storage.join(self.run_url, "logs"))
        for folder, _, names in os.walk(self.dir):
            for name in names:
                rel = os.path.relpath(os.path.join(folder, name), self.dir).replace(os.sep, "/")
                fs.put_file(os.path.join(folder, name), f"{root}/{rel}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


def keep_steps_up_to(path: str, step: int) -> bool:
    """Drop the records of steps after `step` from the metrics.jsonl at `path`, and a last line a
    killed writer left incomplete; returns whether any line was dropped."""
    if not os.path.exists(path):
        return False
    with open(path) as f:
        lines = f.read().splitlines()
    kept = [line for line in lines if (logged := _step_of(line)) is not None and logged <= step]
    if len(kept) == len(lines):
        return False
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.writelines(line + "\n" for line in kept)
    os.replace(tmp, path)
    return True


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None
