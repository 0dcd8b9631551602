"""The training engine under every stage: DeepSpeed ZeRO, deterministic data, checkpoints, EMA.

`train` runs on every rank (torchrun, the deepspeed launcher, SLURM or Ray start the ranks);
the whole loop is in that one function so a reader sees it at once.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from data_pipeline import storage
from data_pipeline.store import open_store
from launch.config import Config
from training.checkpoint import Checkpointer, read_latest
from training.config import OptimConfig, TrainConfig
from training.data import StoreLoader
from training.ema import EMA
from training.stages import get_stage

METRICS = "metrics.jsonl"
SUMMARY = "train_summary.json"


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def deepspeed_config(train: TrainConfig) -> dict[str, Any]:
    """Our settings as a DeepSpeed config; `train.deepspeed` keys are merged over it verbatim."""
    derived: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "zero_optimization": {"stage": train.zero_stage},
        "bf16": {"enabled": train.precision == "bf16"},
        "fp16": {"enabled": train.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,  # torch.optim.AdamW, which ZeRO wraps
        "steps_per_print": 1 << 30,
    }
    if train.grad_clip > 0:
        derived["gradient_clipping"] = train.grad_clip
    return deep_merge(derived, train.deepspeed)


def lr_factor(optim: OptimConfig, total_steps: int):
    """Linear warm-up, then constant or cosine decay to min_lr_ratio."""

    def factor(step: int) -> float:
        if step < optim.warmup_steps:
            return (step + 1) / optim.warmup_steps
        if optim.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - optim.warmup_steps) / max(1, total_steps - optim.warmup_steps))
        return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def step_generator(seed: int, rank: int, step: int, micro: int) -> torch.Generator:
    """Noise, timesteps and dropout of a micro-step are a function of where it is in the run."""
    state = np.random.SeedSequence([seed, rank, step, micro]).generate_state(2, np.uint64)
    return torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))


def init_distributed() -> tuple[int, int, torch.device]:
    import deepspeed

    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        from launch.ports import free_port

        os.environ["MASTER_PORT"] = str(free_port())
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def _mean_across_ranks(value: float, device: torch.device) -> float:
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.item() / dist.get_world_size()


def train(cfg: Config, stage_name: str, config_yaml: str, log=print) -> dict[str, Any]:
    import deepspeed

    rank, world, device = init_distributed()
    say = log if rank == 0 else (lambda *_: None)
    t = cfg.train
    torch.manual_seed(t.seed)  # identical initial weights on every rank
    store = open_store(cfg.store_url)
    stage = get_stage(stage_name)(cfg, store)
    model = stage.build_model()
    ema = EMA(model, t.ema_decay)
    loader = StoreLoader(store, stage.columns, t.batch_size, t.seed, rank, world)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable, lr=t.optim.lr, betas=tuple(t.optim.betas), eps=t.optim.eps, weight_decay=t.optim.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(t.optim, t.steps))
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(t)
    )
    run_url = cfg.run_url(stage_name)
    checkpointer = Checkpointer(run_url, t.keep_last, rank, world)
    stage_info = stage.describe(model)

    start_step, history = 0, []
    latest = read_latest(run_url)
    if latest:
        state, ema_state = checkpointer.load(engine, latest)
        loader.load_state_dict(state["loader"])
        ema.load_state_dict(ema_state, state["ema_updates"])
        start_step, history = state["step"], state.get("history", [])
        say(f"{stage_name}: resumed from {latest} at step {start_step} ({state['world_size']} -> {world} ranks)")
    if rank == 0:
        storage.makedirs(run_url)
        storage.write_text(storage.join(run_url, "config.yaml"), config_yaml)
    n_params = sum(p.numel() for p in trainable)
    say(f"{stage_name}: {n_params / 1e6:.2f}M trainable parameters, {store.manifest['totals']['rows']} rows, "
        f"{world} ranks x {t.batch_size} x {t.grad_accum} accum, ZeRO-{t.zero_stage}, {t.precision}")  # fmt: skip

    window: list[float] = []
    data_wait = 0.0
    tick = time.time()
    last_checkpoint = latest
    for step in range(start_step, t.steps):
        for micro in range(t.grad_accum):
            fetch = time.time()
            batch = {k: v.to(device, non_blocking=True) for k, v in next(loader).items()}
            data_wait += time.time() - fetch
            loss = stage.loss(engine, batch, step_generator(t.seed, rank, step, micro))
            engine.backward(loss)
            engine.step()
            window.append(loss.item())
        ema.update(engine.module)
        done = step + 1
        if done % t.log_every == 0 or done == t.steps:
            elapsed = time.time() - tick
            record = {
                "step": done,
                "loss": _mean_across_ranks(float(np.mean(window)), device),
                "lr": scheduler.get_last_lr()[0],
                "samples_per_s": len(window) * t.batch_size * world / elapsed,
                "step_time_s": elapsed / (len(window) / t.grad_accum),
                "data_wait_s": data_wait,
                "epoch": loader.epoch,
            }
            history.append({"step": done, "loss": record["loss"]})
            if rank == 0:
                with open(os.path.join(storage.local_path(run_url), METRICS), "a") as f:
                    f.write(json.dumps(record) + "\n")
            say(f"{stage_name} step {done}/{t.steps}  loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
                f"{record['samples_per_s']:.0f} samples/s")  # fmt: skip
            window, data_wait, tick = [], 0.0, time.time()
        if done % t.checkpoint_every == 0 or done == t.steps:
            trainer_state = {"loader": loader.state_dict(), "ema_updates": ema.updates, "history": history}
            last_checkpoint = checkpointer.save(engine, done, ema.state_dict(), stage_info, trainer_state, config_yaml)
            say(f"{stage_name}: checkpoint {last_checkpoint}")

    summary = {
        "stage": stage_name,
        "steps": t.steps,
        "resumed_from_step": start_step,
        "first_loss": history[0]["loss"] if history else None,
        "last_loss": history[-1]["loss"] if history else None,
        "checkpoint": last_checkpoint,
        "world_size": world,
    }
    if rank == 0:
        storage.write_json(storage.join(run_url, SUMMARY), summary)
    dist.barrier()
    return summary
