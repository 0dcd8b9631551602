"""The training engine under every stage: DeepSpeed ZeRO, deterministic data, checkpoints, EMA.

`train` runs on every rank of a process group some launcher started (launch/rank.py is the entry
point they share); the loop is in that one function so a reader sees it at once. It gets its train
settings, the stage, the store and the run folder, and knows nothing of launchers or of the rest
of the configuration. A stage (training/stages/) supplies its network, its store columns, its
loss and its previews; everything else is here.
"""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d

from data_pipeline.store import Store
from models.assembly import rebuild
from models.base import storage
from models.public import find_public
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
    distributed_c10d.default_pg_nccl_timeout = timeout
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
            f"{stage.name}: weights from {init_from}: {public.describe()}, built from their own configs; optimizer and data order start fresh"
        )
        return model
    info, weights = load_ema_checkpoint(init_from)
    if info["stage"] != stage.name:
        raise CheckpointError(f"--init-from '{init_from}': a checkpoint of stage {info['stage']}, not {stage.name}")
    model = stage.hold_fixed(rebuild(info))
    model.load_state_dict(weights)
    say(f"{stage.name}: weights from {init_from} (EMA); optimizer and data order start fresh")
    return model


def train(
    t: TrainConfig,
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
    import deepspeed  # lazy: as in init_distributed

    stage_name = stage.name
    rank, world, local_rank, device = init_distributed(t.collective_timeout_s)
    say = log if rank == 0 else (lambda *_: None)
    preemption = Preemption()
    checkpointer = Checkpointer(run_url, t.keep_last, rank, world, local_rank)
    folder = from_rank0(lambda: choose(run_url, resume_from, t.verify_checkpoints, say), rank)
    if init_from and folder:
        say(f"{stage_name}: the run already has checkpoints; resuming from {folder}, not initialising from {init_from}")
    torch.manual_seed(t.seed)  # identical initial weights on every rank
    model = initial_model(stage, folder, None if folder else init_from, say)
    stage_info = stage.describe(model)
    for done in prepare(model, t):  # after describe: stage.json records the network, not how it runs
        say(f"{stage_name}: {done}")
    verify_store(store, run_url, rank, world)
    loader = StoreLoader(
        store,
        stage.columns,
        t.batch_size,
        t.seed,
        rank,
        world,
        t.prefetch,
        transform=stage.prepare,
        pin_memory=device.type == "cuda",
    )

    universal = False
    if folder:
        saved = read_trainer_state(folder)
        local_folder = deepspeed_folder = checkpointer.local_copy(folder)
        if (saved["world_size"], saved["zero_stage"]) != (world, t.zero_stage) and (
            saved["zero_stage"] or t.zero_stage
        ):
            deepspeed_folder, universal = checkpointer.universal_copy(local_folder), True
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(trainable, t, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(t.optim, t.steps))
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(t, universal)
    )
    # Under ZeRO-3 each rank averages its own partitions (training/ema.py), except with parameters
    # on NVMe, where a partition may be swapped out between steps: those are gathered to average.
    ema_gathers = t.zero_stage == 3 and t.offload_params == "nvme"
    with gathered(engine.module, 3 if ema_gathers else 0):
        ema = EMA(
            engine.module,
            t.ema.decay,
            t.ema.warmup,
            "cpu" if t.ema.on_cpu else device,
            read_partitions=t.zero_stage == 3 and not ema_gathers,
            comm_device=device,
        )

    start_step, history, skipped_total, resume_info = 0, [], 0, None
    if folder:
        state, ema_file = checkpointer.load(engine, local_folder, deepspeed_folder)
        loader.load_state_dict(state["loader"])
        ema.load_file(ema_file, state["ema_updates"])
        checkpointer.release_copies()
        start_step, history, skipped_total = state["step"], state.get("history", []), state.get("skipped_steps", 0)
        resume_info = {
            "from": folder,
            "step": start_step,
            "world_size_before": state["world_size"],
            "world_size_after": world,
            "universal": universal,
            "weights_checksum": weights_checksum(engine.module, device),
        }
        say(
            f"{stage_name}: resumed from {folder} at step {start_step} ({state['world_size']} -> {world} ranks"
            f"{', via a universal checkpoint' if universal else ''})"
        )
    if rank == 0:
        storage.write_text(storage.join(run_url, "config.yaml"), config_yaml)
    runlog = RunLog(run_url, os.path.join(checkpointer.staging_root, "logs"), rank == 0, t.steps, t.progress_bar, say)
    runlog.start_at(start_step)
    n_params = sum(full_numel(p) for p in trainable)  # under ZeRO-3 a partitioned parameter's numel() is 0
    say(
        f"{stage_name}: {n_params / 1e6:.2f}M trainable parameters, {store.manifest['totals']['rows']} rows, {world} ranks x "
        f"{t.batch_size} x {t.grad_accum} accum, ZeRO-{t.zero_stage}, {t.precision}"
    )

    skips = SkipTracker(t.max_skipped_steps, skipped_total)

    def save(step: int, reason: str) -> str:
        if not weights_are_finite(engine.module, device):
            raise CheckpointError(f"refusing to checkpoint non-finite weights at step {step}")
        state = {
            "loader": loader.state_dict(),
            "ema_updates": ema.updates,
            "history": history,
            "reason": reason,
            "skipped_steps": skips.total,
            "zero_stage": t.zero_stage,
        }
        runlog.upload()  # first: once `latest` names this step, the logs up to it are there too
        path = checkpointer.save(
            engine,
            step,
            ema.state_dict(),
            stage_info,
            state,
            config_yaml,
            crash_rank1=t.fault_injection.crash_in_checkpoint_step == step,
        )
        say(f"{stage_name}: checkpoint {path} ({reason})")
        return path

    last_checkpoint = folder
    # The step never waits for the device: losses add up there and are read at log steps, the
    # preemption flag is agreed on over the host (training/failures.py), and DeepSpeed's skip
    # count is a host integer. ZeRO-0's optimizer counts its skipped steps on the device too.
    loss_sum, finite_losses = torch.zeros((), device=device), torch.zeros((), device=device)
    micro_steps, shown = 0, ""
    data_wait = 0.0
    tick = time.time()
    skipped_seen = engine.skipped_steps
    counted_on_device = getattr(optimizer, "skipped", None) is not None  # ZeRO-0: GuardedAdamW
    skipped_read, window_start = 0, start_step
    try:
        for step in range(start_step, t.steps):
            if preemption.agreed():
                if last_checkpoint is None or read_trainer_state(last_checkpoint)["step"] != step:
                    last_checkpoint = save(step, "preempted")
                raise Preempted(f"{stage_name}: preempted at step {step}; checkpoint {last_checkpoint}")
            for micro in range(t.grad_accum):
                fetch = time.time()
                batch = {k: v.to(device, non_blocking=True) for k, v in next(loader).items()}
                data_wait += time.time() - fetch
                loss = stage.loss(engine, batch, step_generator(t.seed, rank, step, micro))
                loss = inject(t.fault_injection, loss, step + 1, rank, resumed=start_step > 0)
                engine.backward(loss)
                engine.step()
                finite = torch.isfinite(loss.detach())
                loss_sum += torch.where(finite, loss.detach().float(), 0.0)
                finite_losses += finite
                micro_steps += 1
            skipped = engine.skipped_steps > skipped_seen
            skipped_seen = engine.skipped_steps
            done = step + 1
            log_step = done % t.log_every == 0 or done == t.steps
            if counted_on_device:
                # ZeRO-0 skips on the device; its count is read with the losses, at log steps
                if log_step:
                    now = int(optimizer.skipped)
                    skips.record_window(now - skipped_read, done - window_start, done, last_checkpoint)
                    skipped_read, window_start = now, done
            else:
                skips.record(skipped, done, last_checkpoint)
            if skipped:
                say(f"{stage_name} step {done}: non-finite loss or gradients, step skipped ({skips.total} so far)")
            else:
                with gathered(engine.module, 3 if ema_gathers else 0):
                    ema.update(engine.module)
            runlog.advance(shown)
            if log_step:
                elapsed = time.time() - tick
                total, count = torch.stack([loss_sum, finite_losses]).tolist()  # the window's one read of the device
                grad_norm = engine.get_global_grad_norm()
                record = {
                    "step": done,
                    "loss": across_ranks(total / count if count else float("nan"), dist.ReduceOp.SUM, device) / world,
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": float(grad_norm) if grad_norm is not None else None,
                    "samples_per_s": micro_steps * t.batch_size * world / elapsed,
                    "step_time_s": elapsed / (micro_steps / t.grad_accum),
                    "data_wait_s": data_wait,
                    "skipped_steps": skips.total,
                    "epoch": loader.epoch,
                    **memory_stats(device),
                }
                if np.isfinite(record["loss"]):
                    history.append({"step": done, "loss": record["loss"]})
                runlog.scalars(record)
                if runlog.bar is None:
                    say(
                        f"{stage_name} step {done}/{t.steps}  loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
                        f"{record['samples_per_s']:.0f} samples/s  data wait {data_wait:.2f}s"
                    )
                shown = f"loss {record['loss']:.4f}"
                loss_sum.zero_()
                finite_losses.zero_()
                micro_steps, data_wait, tick = 0, 0.0, time.time()
            if t.preview_every and done % t.preview_every == 0:
                weights = ema.state_dict()  # every rank: the ranks' shares are gathered
                if rank == 0:
                    runlog.images(done, stage.preview(ema_model(stage_info, weights, ema.device)))
            if done % t.checkpoint_every == 0 or done == t.steps:
                last_checkpoint = save(done, "scheduled")
    finally:
        loader.close()
        runlog.close()
        checkpointer.close()

    summary = {
        "stage": stage_name,
        "steps": t.steps,
        "resumed_from_step": start_step,
        "resume": resume_info,
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
