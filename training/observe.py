"""What a run shows while it runs: metrics.jsonl, TensorBoard, a progress bar, preview images.

Rank 0 writes everything into `logs/` of the run folder (for a remote run folder, into a local
folder that is uploaded with every checkpoint, since object stores cannot append).
"""

from __future__ import annotations

import json
import os
import sys
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


class RunLog:
    def __init__(self, run_url: str, local_dir: str, enabled: bool, total_steps: int, progress_bar: str, log):
        self.run_url, self.dir, self.enabled, self.log = run_url, local_dir, enabled, log
        self.tb = None
        self.bar = None
        if not enabled:
            return
        os.makedirs(self.dir, exist_ok=True)
        logs_url = storage.join(run_url, "logs")
        if not storage.is_local(run_url) and storage.exists(storage.join(logs_url, "metrics.jsonl")):
            # a resumed remote run: `upload` replaces the logs there, so what the earlier runs logged comes first
            storage.download_dir(logs_url, self.dir)
        from torch.utils.tensorboard import SummaryWriter  # lazy: TensorBoard's writer, on rank 0 only

        self.tb = SummaryWriter(os.path.join(self.dir, "tensorboard"))
        if progress_bar == "always" or (progress_bar == "auto" and sys.stderr.isatty()):
            self.bar = tqdm(total=total_steps, dynamic_ncols=True, desc="train")

    def start_at(self, step: int) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.refresh()

    def advance(self, text: str) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(text, refresh=False)

    def scalars(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(os.path.join(self.dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and value is not None:
                self.tb.add_scalar(f"train/{key}", value, record["step"])
        self.tb.flush()

    def images(self, step: int, previews: list[tuple[str, Image.Image]]) -> list[str]:
        if not self.enabled or not previews:
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
