"""The learning-rate schedule every optimiser of the project follows: linear warm-up, then constant
or a cosine decay to a floor (training's stages and the small encoders' fit)."""

from __future__ import annotations

import math
from typing import Literal


def warmup_then_decay(
    step: int,
    warmup_steps: int,
    total_steps: int,
    schedule: Literal["constant", "cosine"] = "cosine",
    min_ratio: float = 0.0,
) -> float:
    """The factor on the base learning rate at optimizer step `step` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
