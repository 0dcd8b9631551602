"""The engine's step time versus a plain PyTorch loop on the same model and batch, one run.

Engine: `training.engine.train` on one rank (DeepSpeed ZeRO-2, the store loader with its
background prefetch, EMA, metrics). Plain: the same UNet (checkpointed and compiled as the
engine's), loss, AdamW, clipping and schedule, one batch held in memory, nothing else. Rounds
alternate; prints the per-step time of each and
their ratio (target <= 1.10), samples/s and FLOPs per step, and model FLOPs utilisation on a GPU
it knows the peak of (or given --peak-tflops).

--compile blocks|whole compiles both (train.compile) and adds an eager engine arm: the compiled
engine against the eager one (target: no slower), and its logged losses against the eager
engine's, which reads the same batches (target: the same, to float tolerance). The first logged
window, which holds the compilation, is left out of the times. --activation-checkpointing blocks
(or selective) turns it on for every arm.

    python benchmarks/train_step.py --steps 60 --rounds 3
    python benchmarks/train_step.py --compile blocks                  # inductor on the CPU
    python benchmarks/train_step.py --model sd --precision bf16 --batch-size 64 --compile blocks \
        --activation-checkpointing blocks                            # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Peak dense bf16 TFLOP/s for MFU, by device name (override with --peak-tflops).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}
MODELS = {
    "small": ["ldm.block_channels=[64, 128]", "ldm.layers_per_block=1"],
    # Stable Diffusion's UNet widths and depth: 841M parameters on the benchmark store's 16-wide
    # text tokens (870M at SD 2's 1,024; SD-2-base has 865M), a GPU-sized step
    "sd": ["ldm.block_channels=[320, 640, 1280, 1280]", "ldm.layers_per_block=2", "ldm.heads=8"],
}


def plain_loop(
    cfg, steps: int, device, activation_checkpointing: str = "off", compile: str = "off"
) -> tuple[float, object]:
    """Seconds per step of a bare loop over the network treated as the engine treats it
    (checkpointed, compiled); also returns the stage, an eager copy of its network and the batch
    (for FLOP counting: the model's FLOPs, not the recomputation's)."""
    import torch

    from data_pipeline.store import open_store
    from launch.rank import stage_for
    from training.ds_config import lr_factor
    from training.engine import step_generator
    from training.performance import checkpoint_activations, compile_networks

    torch.manual_seed(0)
    stage = stage_for(cfg, "ldm", open_store(cfg.store_url))
    model = stage.build_model().to(device)
    eager = stage.build_model().to(device)
    if activation_checkpointing != "off":
        checkpoint_activations(model, activation_checkpointing)
    if compile != "off":
        compile_networks(model, compile, None)
    t = cfg.train
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.optim.lr, betas=tuple(t.optim.betas), eps=t.optim.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(t.optim, t.steps))
    data = stage.store.read(list(stage.columns))
    batch = {k: torch.from_numpy(v[: t.batch_size].copy()).to(device) for k, v in data.items()}
    # the plain recipe for bf16 is autocast around the forward pass, fp32 weights
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=t.precision == "bf16")
    times = []
    for step in range(steps):
        started = time.time()
        with autocast:
            loss = stage.loss(model, batch, step_generator(0, 0, step, 0))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.time() - started)
    return statistics.mean(times[10:]), (stage, eager, batch)


def engine_steps(cfg, steps: int, run: str, **settings) -> tuple[float, list[float]]:
    """Seconds per step after the first logged window, and the losses logged."""
    from launch.rank import run_rank
    from models.base.configlib import replace

    # metrics every 10 steps, as a real run logs; the first window (warm-up) is left out
    cfg = replace(
        cfg,
        **{
            "train.steps": steps,
            "train.run": run,
            "train.checkpoint_every": steps + 1,
            "train.log_every": 10,
            **settings,
        },
    )
    run_rank(cfg, "ldm", log=lambda _: None)
    records = [json.loads(line) for line in open(os.path.join(cfg.run_url("ldm"), "logs", "metrics.jsonl"))]
    shutil.rmtree(cfg.run_url("ldm"))  # the final checkpoint of a GPU-sized model is many GB
    return statistics.mean(r["step_time_s"] for r in records[1:]), [r["loss"] for r in records]


def model_flops(stage_model_batch) -> float:
    """FLOPs of one training step (forward and backward), counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    from training.engine import step_generator

    stage, model, batch = stage_model_batch
    with FlopCounterMode(display=False) as counter:
        stage.loss(model, batch, step_generator(0, 0, 0, 0)).backward()
    return float(counter.get_total_flops())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--model", choices=sorted(MODELS), default="small")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--peak-tflops", type=float, help="accelerator peak for MFU (default: by device name)")
    parser.add_argument(
        "--compile", choices=["off", "blocks", "whole"], default="off", help="train.compile for the engine"
    )
    parser.add_argument("--activation-checkpointing", choices=["off", "blocks", "selective"], default="off")
    parser.add_argument("--json")
    args = parser.parse_args()

    import torch

    from launch import config
    from tests.support.storefactory import make_store

    work = tempfile.mkdtemp(prefix="unclip-bench-step-")
    # SD-like proportions: latents 4x32x32 (256 px images), so compute, not bookkeeping, dominates
    make_store(os.path.join(work, "store"), (256, 256), latent=(4, 32, 32))
    cfg = config.load(
        None,
        [
            f"root={work}",
            f"train.batch_size={args.batch_size}",
            "train.nproc=1",
            "train.progress_bar=never",
            f"train.precision={args.precision}",
            *MODELS[args.model],
        ],
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    engine_settings = {"train.compile": args.compile, "train.activation_checkpointing": args.activation_checkpointing}
    compiled = args.compile != "off"
    seconds: dict[str, list[float]] = {"engine": [], "plain PyTorch": [], **({"eager engine": []} if compiled else {})}
    losses: dict[str, list[float]] = {}
    probe = None
    for round_ in range(args.rounds):
        took, losses["engine"] = engine_steps(cfg, args.steps, f"bench-{round_}", **engine_settings)
        seconds["engine"].append(took)
        if compiled:
            took, losses["eager engine"] = engine_steps(
                cfg, args.steps, f"bench-eager-{round_}", **{**engine_settings, "train.compile": "off"}
            )
            seconds["eager engine"].append(took)
        plain, probe = plain_loop(cfg, args.steps, device, args.activation_checkpointing, args.compile)
        seconds["plain PyTorch"].append(plain)
        print(
            f"round {round_ + 1}: " + ", ".join(f"{k} {v[-1] * 1000:.1f} ms/step" for k, v in seconds.items()),
            flush=True,
        )
    step = {name: statistics.median(v) for name, v in seconds.items()}
    ratio = step["engine"] / step["plain PyTorch"]
    result = {
        "device": str(device),
        "model": args.model,
        "precision": args.precision,
        "batch_size": args.batch_size,
        **engine_settings,
        "ms_per_step": {k: v * 1000 for k, v in step.items()},
        "ratio": ratio,
    }
    print(f"\nengine / plain step time: {ratio:.3f} (target <= {'1.05 on a GPU' if device.type == 'cuda' else '1.10'})")
    if compiled:
        result["compiled_over_eager_engine"] = step["engine"] / step["eager engine"]
        result["max_relative_loss_difference"] = max(
            abs(a - b) / abs(b) for a, b in zip(losses["engine"], losses["eager engine"], strict=True)
        )
        print(
            f"compiled / eager engine step time: {result['compiled_over_eager_engine']:.3f} (target <= 1.00); "
            f"logged losses differ by at most {result['max_relative_loss_difference']:.1e} (relative)"
        )
    # counted on every device, so the GPU figures' code runs wherever the benchmark does
    flops = model_flops(probe)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    result["samples_per_s"] = args.batch_size / step["engine"]
    result["tflops_per_step"] = flops / 1e12
    print(f"{name}: {result['samples_per_s']:.1f} samples/s, {flops / 1e12:.4f} TFLOP per step")
    if peak:
        result["mfu"] = flops / step["engine"] / (peak * 1e12)
        print(f"model FLOPs utilisation: {100 * result['mfu']:.1f}% of {peak:g} TFLOP/s")
    if args.json:
        from models.base import storage

        storage.write_json(args.json, result)


if __name__ == "__main__":
    main()
