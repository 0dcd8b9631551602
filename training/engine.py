"""The training engine under every stage: DeepSpeed ZeRO, deterministic data, checkpoints, EMA.

`train` runs on every rank of a process group some launcher started (launch/rank.py is the entry
point they share): set-up, then the loop, which reads at once: `train_step` takes a step, and the
bookkeeping around it (losses summed on the device, skipped steps) is in training/bookkeeping.py.
It gets its train settings, the stage, the store and the run folder, and knows nothing of
launchers or of the rest of the configuration. A stage (training/stages/, its contract in
training/stage.py) supplies its network, its store columns, its loss and its previews; everything
else is here.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d

from data_pipeline.store import Store
from models.assembly import rebuild
from models.base import storage
from models.public import find_public
from training.bookkeeping import LossWindow, OptimizerSkips
from training.checkpoint import (
    Checkpointer,
    CheckpointError,
    choose,
    load_ema_checkpoint,
    read_stage_info,
    read_trainer_state,
)
from training.config import TrainConfig
from training.data import StoreLoader
from training.ds_config import deepspeed_config, lr_factor, make_optimizer
from training.ema import EMA
from training.failures import Preempted, Preemption, SkipTracker, inject
from training.observe import RunLog, memory_stats
from training.partitions import across_ranks, full_numel, gathered, weights_are_finite, weights_checksum
from training.performance import prepare
from training.stage import Stage
from training.verify import verify_store

SUMMARY = "train_summary.json"


def step_generator(seed: int, rank: int, step: int, micro: int) -> torch.Generator:
    """Noise, timesteps and dropout of a micro-step are a function of where it is in the run."""
    state = np.random.SeedSequence([seed, rank, step, micro]).generate_state(2, np.uint64)
    return torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))


def init_distributed(timeout_s: int) -> tuple[int, int, int, torch.device]:
    """Join the process group the launcher described in the environment (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT, LOCAL_RANK)."""
    import deepspeed  # lazy: DeepSpeed picks its accelerator on import, after apply_in_rank set DS_ACCELERATOR

    cuda = torch.cuda.is_available()
    local_rank = int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local_rank)
    # A collective that waits longer than this raises on every rank instead of hanging forever. The
    # groups DeepSpeed creates later (data parallel, ZeRO) take torch's default timeout, not the
    # world group's, so the default itself is set first.
    timeout = datetime.timedelta(seconds=timeout_s)
    distributed_c10d.default_pg_timeout = timeout
    distributed_c10d.default_pg_nccl_timeout = timeout  # pyright: ignore[reportPrivateImportUsage] (not in __all__)
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", timeout=timeout, verbose=False)
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), local_rank, device


def from_rank0(make: Callable[[], Any], rank: int) -> Any:
    """Compute on rank 0, share with all (errors on rank 0 reach every rank as the same error)."""
    box: list[Any] = [None]
    if rank == 0:
        try:
            box[0] = ("ok", make())
        except Exception as err:  # re-raised below on every rank, so none waits forever
            box[0] = ("error", err)
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise value
    return value


def ema_model(stage_info: dict[str, Any], weights: dict[str, torch.Tensor], device: torch.device) -> torch.nn.Module:
    """The averaged weights as a network of their own, for previews, on the device where the average
    lives: on a GPU run, previewing a full-size network on the CPU would take minutes while the other
    ranks wait for rank 0 at the next collective."""
    model = rebuild(stage_info).to(device)
    model.load_state_dict(weights)
    return model.eval().requires_grad_(False)


def initial_model(
    stage: Stage, folder: str | None, init_from: str | None, say: Callable[[str], None]
) -> torch.nn.Module:
    """The network a run starts from. Resuming (`folder`): the architecture its checkpoint
    records, whose state DeepSpeed then loads. Else from `init_from`: public diffusers weights
    (models/public.py), or one of our checkpoints, each network built from the weights' own config
    with those weights; the optimizer and the data order start fresh, the EMA from these weights.
    Else the stage's own network, from its settings."""
    if folder:
        return stage.hold_fixed(rebuild(read_stage_info(folder)))
    if not init_from:
        return stage.hold_fixed(stage.build_model())
    public = find_public(init_from, stage.name)
    if public:
        model = stage.model_from_public(public)
        say(
            f"{stage.name}: weights from {init_from}: {public.describe()}, built from their own configs; "
            "optimizer and data order start fresh"
        )
        return model
    info, weights = load_ema_checkpoint(init_from)
    if info["stage"] != stage.name:
        raise CheckpointError(f"--init-from '{init_from}': a checkpoint of stage {info['stage']}, not {stage.name}")
    model = stage.hold_fixed(rebuild(info))
    model.load_state_dict(weights)
    say(f"{stage.name}: weights from {init_from} (EMA); optimizer and data order start fresh")
    return model


def store_loader(
    stage: Stage, store: Store, train_cfg: TrainConfig, rank: int, world: int, device: torch.device
) -> StoreLoader:
    """This rank's batches of the stage's columns, in an order that is a function of the seed."""
    return StoreLoader(
        store,
        stage.columns,
        train_cfg.batch_size,
        train_cfg.seed,
        rank,
        world,
        train_cfg.prefetch,
        transform=stage.prepare,
        pin_memory=device.type == "cuda",
    )


class Copies(NamedTuple):
    """The checkpoint a run resumes from, its local copy, the copy DeepSpeed loads, and whether
    that one is a universal checkpoint (made when the world size or the ZeRO stage changed)."""

    folder: str
    local: str
    deepspeed: str
    universal: bool


def checkpoint_copies(checkpointer: Checkpointer, folder: str, world: int, zero_stage: int) -> Copies:
    saved = read_trainer_state(folder)
    local = checkpointer.local_copy(folder)
    if (saved["world_size"], saved["zero_stage"]) != (world, zero_stage) and (saved["zero_stage"] or zero_stage):
        return Copies(folder, local, checkpointer.universal_copy(local), True)
    return Copies(folder, local, local, False)


def start_engine(
    model: torch.nn.Module, train_cfg: TrainConfig, device: torch.device, universal: bool
) -> tuple[Any, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """DeepSpeed's engine around `model`, with its optimizer and learning-rate schedule."""
    import deepspeed  # lazy: as in init_distributed

    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], train_cfg, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(train_cfg.optim, train_cfg.steps))
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,  # pyright: ignore[reportArgumentType] (annotated as torch's older _LRScheduler)
        config=deepspeed_config(train_cfg, universal),
    )
    return engine, optimizer, scheduler


def make_ema(module: torch.nn.Module, train_cfg: TrainConfig, device: torch.device) -> tuple[EMA, int]:
    """The average of `module`'s weights, and the ZeRO stage `gathered` takes around each update.
    Under ZeRO-3 each rank averages its own partitions (training/ema.py), except with parameters
    on NVMe, where a partition may be swapped out between steps: those are gathered to average."""
    gather = 3 if train_cfg.zero_stage == 3 and train_cfg.offload_params == "nvme" else 0
    with gathered(module, gather):
        ema = EMA(
            module,
            train_cfg.ema.decay,
            train_cfg.ema.warmup,
            "cpu" if train_cfg.ema.on_cpu else device,
            read_partitions=train_cfg.zero_stage == 3 and not gather,
            comm_device=device,
        )
    return ema, gather


@dataclass
class Start:
    """Where a run starts: at step 0, or where its checkpoint left off."""

    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)  # step and loss of earlier log steps
    skipped_steps: int = 0
    resume: dict[str, Any] | None = None  # what train_summary.json says of the resume


def resume(
    checkpointer: Checkpointer,
    copies: Copies,
    engine: Any,
    loader: StoreLoader,
    ema: EMA,
    world: int,
    device: torch.device,
    say: Callable[[str], None],
    stage_name: str,
) -> Start:
    """Load the checkpoint into the engine, the loader and the average; where the run goes on."""
    state, ema_file = checkpointer.load(engine, copies.local, copies.deepspeed)
    loader.load_state_dict(state["loader"])
    ema.load_file(ema_file, state["ema_updates"])
    checkpointer.release_copies()
    info = {
        "from": copies.folder,
        "step": state["step"],
        "world_size_before": state["world_size"],
        "world_size_after": world,
        "universal": copies.universal,
        "weights_checksum": weights_checksum(engine.module, device),
    }
    say(
        f"{stage_name}: resumed from {copies.folder} at step {state['step']} ({state['world_size']} -> {world} ranks"
        f"{', via a universal checkpoint' if copies.universal else ''})"
    )
    return Start(state["step"], state.get("history", []), state.get("skipped_steps", 0), info)


def log_record(
    done: int,
    window: LossWindow,
    engine: Any,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loader: StoreLoader,
    skips: OptimizerSkips,
    train_cfg: TrainConfig,
    world: int,
    device: torch.device,
) -> dict[str, Any]:
    """The record of the log step after `done` steps, for the window since the previous one; its
    loss is averaged over the ranks (a collective: every rank calls this)."""
    elapsed_s = window.elapsed_s()
    mean_loss = window.mean_loss()
    grad_norm = engine.get_global_grad_norm()
    return {
        "step": done,
        "loss": across_ranks(mean_loss, dist.ReduceOp.SUM, device) / world,
        "lr": scheduler.get_last_lr()[0],
        "grad_norm": float(grad_norm) if grad_norm is not None else None,
        "samples_per_s": window.micro_steps * train_cfg.batch_size * world / elapsed_s,
        "step_time_s": elapsed_s / (window.micro_steps / train_cfg.grad_accum),
        "data_wait_s": window.data_wait_s,
        "skipped_steps": skips.total,
        "epoch": loader.epoch,
        **memory_stats(device),
    }


def train_step(
    engine: Any,
    stage: Stage,
    loader: StoreLoader,
    window: LossWindow,
    train_cfg: TrainConfig,
    step: int,
    rank: int,
    resumed: bool,
    device: torch.device,
) -> None:
    """Optimizer step `step` (0-based): `grad_accum` micro-steps, each a batch, its loss and its
    backward; DeepSpeed steps the optimizer at the last. The host never waits for the device."""
    for micro in range(train_cfg.grad_accum):
        with window.waiting_for_data():
            batch = {k: v.to(device, non_blocking=True) for k, v in next(loader).items()}
        loss = stage.loss(engine, batch, step_generator(train_cfg.seed, rank, step, micro))
        loss = inject(train_cfg.fault_injection, loss, step + 1, rank, resumed=resumed)
        engine.backward(loss)
        engine.step()
        window.add(loss)


def train(
    train_cfg: TrainConfig,
    stage: Stage,
    store: Store,
    run_url: str,
    config_yaml: str,
    resume_from: str | None = None,
    init_from: str | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train `stage` on `store` into the run folder `run_url` as one rank; `config_yaml` is the
    resolved configuration, recorded beside the checkpoints. Returns the run's summary."""
    rank, world, local_rank, device = init_distributed(train_cfg.collective_timeout_s)
    say = log if rank == 0 else (lambda *_: None)
    preemption = Preemption()
    checkpointer = Checkpointer(run_url, train_cfg.keep_last, rank, world, local_rank)
    folder = from_rank0(lambda: choose(run_url, resume_from, train_cfg.verify_checkpoints, say), rank)
    if init_from and folder:
        say(f"{stage.name}: the run already has checkpoints; resuming from {folder}, not initialising from {init_from}")
    torch.manual_seed(train_cfg.seed)  # identical initial weights on every rank
    model = initial_model(stage, folder, None if folder else init_from, say)
    stage_info = stage.describe(model)
    for done in prepare(model, train_cfg):  # after describe: stage.json records the network, not how it runs
        say(f"{stage.name}: {done}")
    verify_store(store, run_url, rank, world)
    loader = store_loader(stage, store, train_cfg, rank, world, device)
    copies = checkpoint_copies(checkpointer, folder, world, train_cfg.zero_stage) if folder else None
    engine, optimizer, scheduler = start_engine(model, train_cfg, device, universal=bool(copies and copies.universal))
    ema, ema_gather = make_ema(engine.module, train_cfg, device)
    start = Start()
    if copies:
        start = resume(checkpointer, copies, engine, loader, ema, world, device, say, stage.name)
    if rank == 0:
        storage.write_text(storage.join(run_url, "config.yaml"), config_yaml)
    logs = os.path.join(checkpointer.staging_root, "logs")
    runlog = RunLog(run_url, logs, rank == 0, train_cfg.steps, train_cfg.progress_bar, say, start_step=start.step)
    n_params = sum(full_numel(p) for p in model.parameters() if p.requires_grad)  # partitioned: numel() is 0
    say(
        f"{stage.name}: {n_params / 1e6:.2f}M trainable parameters, {loader.rows_line()}, "
        f"{world} ranks x {train_cfg.batch_size} x {train_cfg.grad_accum} accum, ZeRO-{train_cfg.zero_stage}, "
        f"{train_cfg.precision}"
    )
    history = start.history
    skips = OptimizerSkips(engine, optimizer, SkipTracker(train_cfg.max_skipped_steps, start.skipped_steps), start.step)

    def save(step: int, reason: str) -> str:
        if not weights_are_finite(engine.module, device):
            raise CheckpointError(f"refusing to checkpoint non-finite weights at step {step}")
        state = {
            "loader": loader.state_dict(),
            "ema_updates": ema.updates,
            "history": history,
            "reason": reason,
            "skipped_steps": skips.total,
            "zero_stage": train_cfg.zero_stage,
        }
        runlog.upload()  # first: once `latest` names this step, the logs up to it are there too
        crash = train_cfg.fault_injection.crash_in_checkpoint_step == step
        path = checkpointer.save(engine, step, ema.state_dict(), stage_info, state, config_yaml, crash_rank1=crash)
        say(f"{stage.name}: checkpoint {path} ({reason})")
        return path

    last_checkpoint, shown = folder, ""  # shown: the last log step's loss, beside the progress bar
    window = LossWindow(device)
    try:
        for step in range(start.step, train_cfg.steps):
            if preemption.agreed():
                if last_checkpoint is None or read_trainer_state(last_checkpoint)["step"] != step:
                    last_checkpoint = save(step, "preempted")
                raise Preempted(f"{stage.name}: preempted at step {step}; checkpoint {last_checkpoint}")
            train_step(engine, stage, loader, window, train_cfg, step, rank, start.step > 0, device)
            done = step + 1
            log_step = done % train_cfg.log_every == 0 or done == train_cfg.steps
            if skips.step_ended(done, log_step, last_checkpoint):
                say(f"{stage.name} step {done}: non-finite loss or gradients, step skipped ({skips.total} so far)")
            else:
                with gathered(engine.module, ema_gather):
                    ema.update(engine.module)
            runlog.advance(shown)
            if log_step:
                record = log_record(done, window, engine, scheduler, loader, skips, train_cfg, world, device)
                if np.isfinite(record["loss"]):
                    history.append({"step": done, "loss": record["loss"]})
                runlog.scalars(record)
                if runlog.bar is None:
                    say(
                        f"{stage.name} step {done}/{train_cfg.steps}  loss {record['loss']:.4f}  "
                        f"lr {record['lr']:.2e}  {record['samples_per_s']:.0f} samples/s  "
                        f"data wait {record['data_wait_s']:.2f}s"
                    )
                shown = f"loss {record['loss']:.4f}"
                window.restart()
            if train_cfg.preview_every and done % train_cfg.preview_every == 0:
                weights = ema.state_dict()  # every rank: the ranks' shares are gathered
                if rank == 0:
                    runlog.images(done, stage.preview(ema_model(stage_info, weights, ema.device)))
            if done % train_cfg.checkpoint_every == 0 or done == train_cfg.steps:
                last_checkpoint = save(done, "scheduled")
    finally:
        loader.close()
        runlog.close()
        checkpointer.close()

    summary = {
        "stage": stage.name,
        "steps": train_cfg.steps,
        "resumed_from_step": start.step,
        "resume": start.resume,
        "first_loss": history[0]["loss"] if history else None,
        "last_loss": history[-1]["loss"] if history else None,
        "skipped_steps": skips.total,
        "checkpoint": last_checkpoint,
        "world_size": world,
    }
    if rank == 0:
        storage.write_json(storage.join(run_url, SUMMARY), summary)
    dist.barrier()
    return summary
