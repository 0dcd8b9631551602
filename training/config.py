"""Settings of the training engine, shared by every stage."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from launch.configlib import option


@dataclass
class OptimConfig:
    lr: float = option(1e-3, gt=0)
    weight_decay: float = option(0.0, ge=0)
    betas: list[float] = option(factory=lambda: [0.9, 0.999])
    eps: float = option(1e-8, gt=0)
    warmup_steps: int = option(20, ge=0)
    schedule: Literal["constant", "cosine"] = "cosine"
    min_lr_ratio: float = option(0.1, ge=0, le=1)

    def validate(self) -> None:
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"config key 'train.optim.betas': expected two numbers in [0, 1), got {self.betas}")


@dataclass
class TrainConfig:
    run: str = option("main", doc="run name: checkpoints go to ROOT/runs/<stage>/<run>/")
    steps: int = option(300, ge=1, doc="optimizer steps in total (a resumed run stops at the same step)")
    batch_size: int = option(32, ge=1, doc="samples per process per micro-step")
    grad_accum: int = option(1, ge=1)
    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    grad_clip: float = option(1.0, ge=0, doc="0 disables clipping")
    optim: OptimConfig = option(factory=OptimConfig)
    ema_decay: float = option(0.999, ge=0, lt=1)
    checkpoint_every: int = option(100, ge=1)
    keep_last: int = option(3, ge=1)
    log_every: int = option(10, ge=1)
    seed: int = 0
    nproc: int = option(2, ge=1, doc="processes `unclip train` starts on this machine (torchrun)")
    deepspeed: dict[str, Any] = field(default_factory=dict)

