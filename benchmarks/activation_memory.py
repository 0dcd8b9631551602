"""Peak memory of a training step with activation checkpointing against without, same batch, one run.

Each arm runs in a process of its own (peak RSS is per process): it builds the ldm UNet at
SD-like proportions (4x32x32 latents), applies `train.activation_checkpointing` as the engine
does (training/performance.py; blocks, and selective), and takes forward-and-backward passes of the stage's loss on one
batch. Reported per arm: the peak resident memory above what the process held before its first
pass (the activations and gradients a step adds; the allocator's own figure is not kept on the
CPU), and the median seconds of the later passes. Rounds alternate the arms. Targets: memory
<= 0.6x, step time <= 1.35x.

    python benchmarks/activation_memory.py --batch-size 32 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
MODEL = ["ldm.block_channels=[64, 128, 256]", "ldm.layers_per_block=2"]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def arm(work: str, checkpointing: str, batch_size: int, passes: int) -> dict:
    """Runs in the arm's own process."""
    import torch

    from data_pipeline.store import open_store
    from launch import config
    from launch.rank import stage_for
    from training.engine import step_generator
    from training.performance import checkpoint_activations

    cfg = config.load(None, [f"root={work}", *MODEL])
    stage = stage_for(cfg, "ldm", open_store(cfg.store_url))
    torch.manual_seed(0)
    model = stage.build_model().train()
    if checkpointing != "off":
        checkpoint_activations(model, checkpointing)
    data = stage.store.read(list(stage.columns))
    batch = {k: torch.from_numpy(v[:batch_size].copy()) for k, v in data.items()}
    before = rss_bytes()
    times, losses = [], []
    for _ in range(passes):
        started = time.perf_counter()
        loss = stage.loss(model, batch, step_generator(0, 0, 0, 0))
        loss.backward()
        times.append(time.perf_counter() - started)
        losses.append(loss.item())
        model.zero_grad(set_to_none=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {
        "peak_above_start_bytes": peak - before,
        "seconds_per_pass": statistics.median(times[1:]),
        "loss": losses[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--passes", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json")
    parser.add_argument("--arm", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:
        from models.base import storage

        print(storage.strict_json(arm(args.work, args.arm, args.batch_size, args.passes)))
        return

    from tests.support.storefactory import make_store

    work = tempfile.mkdtemp(prefix="unclip-bench-activations-")
    make_store(os.path.join(work, "store"), (args.batch_size,), latent=(4, 32, 32))
    runs: dict[str, list[dict]] = {"off": [], "blocks": [], "selective": []}
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(len(os.sched_getaffinity(0))))}
    for round_ in range(args.rounds):
        for which in runs:
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--arm",
                    which,
                    "--work",
                    work,
                    "--batch-size",
                    str(args.batch_size),
                    "--passes",
                    str(args.passes),
                ],
                capture_output=True,
                text=True,
                env=env,
                check=True,
            )
            runs[which].append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = runs[which][-1]
            print(
                f"round {round_ + 1} {which:>6}: {r['peak_above_start_bytes'] / 2**20:7.1f} MiB above start, "
                f"{r['seconds_per_pass'] * 1000:7.1f} ms per forward+backward, loss {r['loss']:.6f}",
                flush=True,
            )
    median = lambda which, key: statistics.median(r[key] for r in runs[which])  # noqa: E731
    result = {"batch_size": args.batch_size, "model": MODEL, "runs": runs}
    print()
    for which in ("blocks", "selective"):
        memory = median(which, "peak_above_start_bytes") / median("off", "peak_above_start_bytes")
        seconds = median(which, "seconds_per_pass") / median("off", "seconds_per_pass")
        same = all(a["loss"] == b["loss"] for a, b in zip(runs["off"], runs[which], strict=True))
        result[which] = {"memory_ratio": memory, "time_ratio": seconds, "same_loss": same}
        print(
            f"{which} / without: peak memory {memory:.2f}x (target <= 0.6), "
            f"step time {seconds:.2f}x (target <= 1.35); same first loss: {same}"
        )
    if args.json:
        from models.base import storage

        storage.write_json(args.json, result)


if __name__ == "__main__":
    main()
