"""DeepSpeed from our configuration: the config dict, the optimizer and the learning-rate schedule."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from models.base.configlib import ConfigError
from models.schedules import warmup_then_decay
from training.config import OptimConfig, TrainConfig


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _offload(device: str, train: TrainConfig) -> dict[str, Any]:
    return {"device": device, "nvme_path": train.nvme_path} if device == "nvme" else {"device": device}


def deepspeed_config(train: TrainConfig, load_universal: bool = False) -> dict[str, Any]:
    """Our settings as a DeepSpeed config; `train.deepspeed` keys are merged over it verbatim."""
    zero: dict[str, Any] = {"stage": train.zero_stage}
    if train.offload_optimizer != "none":
        zero["offload_optimizer"] = _offload(train.offload_optimizer, train)
    if train.offload_params != "none":
        zero["offload_param"] = _offload(train.offload_params, train)
    derived: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "zero_optimization": zero,
        "bf16": {"enabled": train.precision == "bf16"},
        "fp16": {
            "enabled": train.precision == "fp16",
            "loss_scale": 0,  # dynamic: overflowing steps are skipped and the scale lowered
            "initial_scale_power": train.fp16_initial_scale_power,
        },
        "zero_allow_untested_optimizer": True,  # our AdamW below, which ZeRO wraps
        "steps_per_print": 1 << 30,
        "checkpoint": {"load_universal": load_universal},
    }
    if train.grad_clip > 0:
        derived["gradient_clipping"] = train.grad_clip
    return deep_merge(derived, train.deepspeed)


class GuardedAdamW(torch.optim.AdamW):
    """torch's fused AdamW that skips a step with non-finite gradients, without the host waiting
    for the device: the fused kernel reads `found_inf` (as torch's GradScaler drives it) and then
    leaves weights, moments and step counts as they were. `skipped` counts such steps on the
    device; the engine reads it at log steps.

    For ZeRO-0 only: ZeRO 1-3 and fp16 skip such steps in DeepSpeed, which counts them itself.
    DeepSpeed is not told of a skip here (it would need the host to know at once), so the
    learning-rate schedule still advances on one.
    """

    def __init__(self, params, **kwargs):
        super().__init__(params, fused=True, **kwargs)
        device = next(p.device for group in self.param_groups for p in group["params"])
        self.skipped = torch.zeros((), device=device)

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        if grads:
            self.found_inf = (~torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()).float()  # pyright: ignore[reportPrivateImportUsage]
            self.skipped += self.found_inf
        return super().step(closure)


def make_optimizer(
    params: list[torch.nn.Parameter], train: TrainConfig, device: torch.device | None = None
) -> torch.optim.Optimizer:
    """AdamW: DeepSpeed's CPU Adam with optimizer offload; without ZeRO our GuardedAdamW; else
    torch's, fused on a GPU (train.optim.fused: auto) or as asked."""
    o = train.optim
    kwargs = {"lr": o.lr, "betas": tuple(o.betas), "eps": o.eps, "weight_decay": o.weight_decay}
    if train.offload_optimizer != "none":
        # ZeRO-Offload steps on the CPU with DeepSpeed's vectorised Adam (compiled once, then cached).
        from deepspeed.ops.adam import (
            DeepSpeedCPUAdam,
        )  # lazy: DeepSpeed picks its accelerator when imported, in a rank after apply_in_rank

        return DeepSpeedCPUAdam(params, adamw_mode=True, **kwargs)
    if train.zero_stage == 0:
        return GuardedAdamW(params, **kwargs)
    fused = o.fused == "on" or (o.fused == "auto" and device is not None and device.type == "cuda")
    return torch.optim.AdamW(params, fused=fused, **kwargs)


def lr_factor(optim: OptimConfig, total_steps: int) -> Callable[[int], float]:
    """Linear warm-up, then constant or cosine decay to min_lr_ratio."""
    return lambda step: warmup_then_decay(step, optim.warmup_steps, total_steps, optim.schedule, optim.min_lr_ratio)


def check_runtime(train: TrainConfig) -> None:
    """Refuse, before any rank starts, what this machine's accelerator cannot do."""
    import deepspeed  # lazy: DeepSpeed picks its accelerator when imported, in a rank after apply_in_rank

    accelerator = deepspeed.get_accelerator()
    assert accelerator is not None  # DeepSpeed falls back to its CPU accelerator; typed Optional only
    if train.precision == "fp16" and not accelerator.is_fp16_supported():
        raise ConfigError(
            f"config key 'train.precision': fp16 is not supported by DeepSpeed's {accelerator.device_name()} "
            "accelerator here; use bf16 or fp32"
        )
    if train.precision == "bf16" and not accelerator.is_bf16_supported():
        raise ConfigError(
            f"config key 'train.precision': bf16 is not supported by DeepSpeed's {accelerator.device_name()} "
            "accelerator here"
        )
