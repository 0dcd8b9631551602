"""Settings of the training engine, shared by every stage."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from models.base.configlib import ConfigError, build, dotted, merge, option, to_dict
from training.stages import STAGE_NAMES

# DeepSpeed keys derived from our own settings; passing them raw would contradict those.
OWNED_DEEPSPEED_KEYS = {
    "train_micro_batch_size_per_gpu": "train.batch_size",
    "train_batch_size": "train.batch_size and train.grad_accum",
    "gradient_accumulation_steps": "train.grad_accum",
    "gradient_clipping": "train.grad_clip",
    "optimizer": "train.optim",
    "scheduler": "train.optim",
}


@dataclass
class OptimConfig:
    lr: float = option(1e-3, gt=0)
    weight_decay: float = option(0.0, ge=0)
    betas: list[float] = option(factory=lambda: [0.9, 0.999])
    eps: float = option(1e-8, gt=0)
    warmup_steps: int = option(20, ge=0)
    schedule: Literal["constant", "cosine"] = "cosine"
    min_lr_ratio: float = option(0.1, ge=0, le=1)
    fused: Literal["auto", "on", "off"] = option(
        "auto",
        doc="torch's fused AdamW kernel: auto uses it on a GPU; ZeRO-0 always does "
        "(it skips non-finite steps on the device)",
    )

    def validate(self) -> None:
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"config key 'train.optim.betas': expected two numbers in [0, 1), got {self.betas}")


@dataclass
class EmaConfig:
    decay: float = option(0.999, ge=0, lt=1)
    warmup: int = option(10, ge=1, doc="decay at update n is min(decay, (1 + n) / (warmup + n))")
    on_cpu: bool = option(
        False,
        doc="keep the fp32 average in host memory (saves 4 bytes/parameter of accelerator memory, costs a copy per "
        "step; previews then run on the CPU)",
    )


@dataclass
class FaultInjection:
    """Deliberate faults, for the tests of failure handling; never set in a real run."""

    nan_loss_steps: list[int] = option(factory=list, doc="steps whose loss is made NaN on every rank")
    hang_rank: int | None = option(None, ge=0, doc="this rank stops answering collectives at hang_step")
    hang_step: int = option(0, ge=0)
    kill_rank: int | None = option(
        None, ge=0, doc="this rank SIGKILLs itself at kill_step, unless the run resumed (a node lost once)"
    )
    kill_step: int = option(0, ge=0)
    crash_in_checkpoint_step: int | None = option(None, ge=1, doc="rank 1 dies mid-save of this step's checkpoint")


@dataclass
class TrainConfig:
    run: str = option("main", doc="run name: checkpoints go to ROOT/runs/<stage>/<run>/")
    steps: int = option(300, ge=1, doc="optimizer steps in total (a resumed run stops at the same step)")
    batch_size: int = option(32, ge=1, doc="samples per rank per micro-step")
    grad_accum: int = option(1, ge=1)
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: Literal["none", "cpu", "nvme"] = "none"
    offload_params: Literal["none", "cpu", "nvme"] = option("none", doc="ZeRO-3 only")
    nvme_path: str | None = option(None, doc="local NVMe folder for offload to nvme")
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    fp16_initial_scale_power: int = option(16, ge=0, le=32, doc="fp16: dynamic loss scale starts at 2**this")
    grad_clip: float = option(1.0, ge=0, doc="0 disables clipping")
    optim: OptimConfig = option(factory=OptimConfig)
    ema: EmaConfig = option(factory=EmaConfig)
    checkpoint_every: int = option(100, ge=1)
    keep_last: int = option(3, ge=1)
    verify_checkpoints: bool = option(True, doc="check every file's sha256 before resuming from a checkpoint")
    max_skipped_steps: int = option(
        10,
        ge=1,
        doc="stop after this many non-finite steps in a row (ZeRO-0: counted at log steps, where the device's count "
        "is read)",
    )
    collective_timeout_s: int = option(1800, ge=1, doc="a collective waiting longer fails the run")
    preemption_grace_s: int = option(600, ge=1, doc="after SIGTERM, time ranks get to reach a step boundary and save")
    log_every: int = option(10, ge=1)
    preview_every: int = option(0, ge=0, doc="preview samples every N steps (PNG + TensorBoard); 0: never")
    progress_bar: Literal["auto", "always", "never"] = option("auto", doc="auto: when stderr is a terminal")
    prefetch: int = option(4, ge=1, doc="batches the loader reads ahead")
    seed: int = 0
    nproc: int | Literal["auto"] = option(
        "auto",
        doc="ranks `unclip train` starts on this machine (torchrun); auto: one per visible GPU, or on CPUs two (one "
        "if one "
        "core), the cores the process may use shared among them as threads (launch/environment.py)",
    )
    activation_checkpointing: Literal["off", "blocks", "selective"] = option(
        "off",
        doc="blocks: recompute each block's activations in the backward pass (diffusers' gradient checkpointing for "
        "the "
        "UNets, each transformer block of the prior): less memory for more compute; selective: not the UNets' deepest "
        "level, which holds the fewest activations for its compute (training/performance.py)",
    )
    compile: Literal["off", "blocks", "whole"] = option(
        "off",
        doc="torch.compile each network's blocks (as torchtitan: the repeated blocks compile once each) or the whole "
        "network; weights and checkpoints stay those of the eager network. ZeRO 0-2",
    )
    compile_cache: str | None = option(
        None,
        doc="a local folder for torch.compile's caches (TORCHINDUCTOR_CACHE_DIR), shared by this machine's ranks and "
        "reused by "
        "restarts; null: torch's default",
    )
    channels_last: bool = option(
        False, doc="the convolutional stages' UNets take their inputs channels-last (faster convolutions on GPUs)"
    )
    deepspeed: dict[str, Any] = field(default_factory=dict)
    fault_injection: FaultInjection = option(factory=FaultInjection)
    stages: dict[str, dict[str, Any]] = option(
        factory=dict,
        doc="train.* settings per stage over the ones above, e.g. {ldm: {batch_size: 16, optim: {lr: 2e-3}}}",
    )

    def for_stage(self, stage: str) -> TrainConfig:
        """These settings with `stages[stage]` applied (each given key replaces one value; the rest of
        a section, e.g. optim.warmup_steps, stays), and no per-stage settings left."""
        data = to_dict(self)
        data["stages"] = {}
        for key, value in dotted(self.stages.get(stage, {})).items():
            merge(data, key.split("."), value)
        try:
            return build(TrainConfig, data, prefix="train")
        except ConfigError as err:
            raise ConfigError(f"{err} (with train.stages.{stage} applied)") from None

    def validate(self) -> None:
        for stage, settings in self.stages.items():
            if stage not in STAGE_NAMES:
                raise ValueError(f"config key 'train.stages.{stage}': expected a stage ({', '.join(STAGE_NAMES)})")
            if "stages" in settings:
                raise ValueError(f"config key 'train.stages.{stage}.stages': per-stage settings do not nest")
            self.for_stage(stage)  # each stage's settings, checked as a whole
        if self.nproc != "auto" and self.nproc < 1:
            raise ValueError(f"config key 'train.nproc': expected auto or a number >= 1, got {self.nproc}")
        if self.compile != "off" and self.zero_stage == 3:
            raise ValueError(
                "config key 'train.compile': not with train.zero_stage=3, whose parameter gathering DeepSpeed does "
                "in module "
                "hooks that graph capture would cut through; use ZeRO 0-2, or compile off"
            )
        if self.offload_params != "none" and self.zero_stage != 3:
            raise ValueError(
                f"config key 'train.offload_params': parameter offload needs train.zero_stage=3, got {self.zero_stage}"
            )
        if self.offload_optimizer != "none" and self.zero_stage == 0:
            raise ValueError(
                "config key 'train.offload_optimizer': optimizer offload needs train.zero_stage of 1, 2 or 3"
            )
        if "nvme" in (self.offload_optimizer, self.offload_params) and not self.nvme_path:
            raise ValueError("config key 'train.nvme_path': offload to nvme needs a local NVMe folder")
        for key, ours in OWNED_DEEPSPEED_KEYS.items():
            if key in self.deepspeed:
                raise ValueError(f"config key 'train.deepspeed.{key}': set {ours} instead (unclip derives it)")
        for key in ("fp16", "bf16"):
            enabled = self.deepspeed.get(key, {}).get("enabled")
            if enabled is not None and enabled != (self.precision == key):
                raise ValueError(
                    f"config key 'train.deepspeed.{key}.enabled': contradicts train.precision={self.precision}"
                )
        stage = self.deepspeed.get("zero_optimization", {}).get("stage")
        if stage is not None and stage != self.zero_stage:
            raise ValueError(
                f"config key 'train.deepspeed.zero_optimization.stage': contradicts train.zero_stage={self.zero_stage}"
            )
