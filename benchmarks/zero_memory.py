"""Per-rank optimizer-state memory of ZeRO-2 at world size 2 versus 1, one run.

Starts the same DeepSpeed ZeRO-2 engine (the ldm UNet, our AdamW) with torchrun on 1 and on 2
ranks, takes one step, and has each rank count the bytes of its optimizer state (fp32 master
partition, exp_avg, exp_avg_sq) and of its EMA share. Prints both and the ratios (target about 0.5).

    python benchmarks/zero_memory.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from typing import cast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
MODEL = ["ldm.block_channels=[64, 128, 128]", "ldm.layers_per_block=1"]


def rank_main(out: str) -> None:
    """Runs inside each rank: build the engine, take a step, report optimizer-state bytes."""
    import deepspeed
    import torch
    import torch.distributed as dist
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    from data_pipeline.store import open_store
    from launch import config
    from launch.rank import stage_for
    from models.base import storage
    from training.ds_config import deepspeed_config, make_optimizer
    from training.ema import EMA
    from training.engine import init_distributed, step_generator

    rank, world, _, _ = init_distributed(600)
    cfg = config.load(None, [f"root={out}", "train.zero_stage=2", "train.batch_size=4", *MODEL])
    stage = stage_for(cfg, "ldm", open_store(cfg.store_url))
    torch.manual_seed(0)
    model = stage.build_model()
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=make_optimizer(list(model.parameters()), cfg.train), config=deepspeed_config(cfg.train)
    )
    data = stage.store.read(list(stage.columns))
    batch = {k: torch.from_numpy(v[:4].copy()) for k, v in data.items()}
    engine.backward(stage.loss(engine, batch, step_generator(0, rank, 0, 0)))
    engine.step()
    # zero_stage=2 above: DeepSpeed wraps our optimizer in its ZeRO stage 1/2 optimizer
    zero = cast(DeepSpeedZeroOptimizer, engine.optimizer)
    state_bytes = sum(
        t.numel() * t.element_size() for s in zero.optimizer.state.values() for t in s.values() if torch.is_tensor(t)
    )
    master_bytes = sum(t.numel() * t.element_size() for t in zero.single_partition_of_fp32_groups)
    params = sum(p.numel() for p in model.parameters())
    # DeepSpeed puts the model into the engine's __dict__ as `module`, which pyright reads through
    # nn.Module.__getattr__ (Tensor | Module)
    module = cast(torch.nn.Module, engine.module)
    ema = EMA(module, cfg.train.ema.decay)  # as the engine keeps it: this rank's share of every weight
    ema_bytes = sum(v.numel() * v.element_size() for v in ema.shadow.values())
    report = {
        "rank": rank,
        "world_size": world,
        "optimizer_state_bytes": state_bytes + master_bytes,
        "ema_bytes": ema_bytes,
        "parameters": params,
    }
    gathered: list[dict[str, int] | None] = [None] * world
    dist.all_gather_object(gathered, report)
    if rank == 0:
        storage.write_json(os.path.join(out, f"memory-{world}.json"), gathered)
    dist.barrier()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rank-main", help=argparse.SUPPRESS)
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.rank_main:
        return rank_main(args.rank_main)

    from tests.support.storefactory import make_store

    work = tempfile.mkdtemp(prefix="unclip-bench-zero-")
    make_store(os.path.join(work, "store"), (64,))
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"),
        "PYTHONPATH": ROOT,
    }
    per_rank, ema_per_rank = {}, {}
    for world in (1, 2):
        subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc_per_node={world}",
                os.path.abspath(__file__),
                "--rank-main",
                work,
            ],
            check=True,
            env=env,
            capture_output=True,
        )
        reports = json.load(open(os.path.join(work, f"memory-{world}.json")))
        per_rank[world] = max(r["optimizer_state_bytes"] for r in reports)
        ema_per_rank[world] = max(r["ema_bytes"] for r in reports)
        print(
            f"world size {world}: {per_rank[world] / 2**20:.2f} MiB of optimizer state per rank "
            f"({reports[0]['parameters'] / 1e6:.2f}M parameters)"
        )
    ratio, ema_ratio = per_rank[2] / per_rank[1], ema_per_rank[2] / ema_per_rank[1]
    print(f"\nZeRO-2 per-rank optimizer state, world 2 / world 1: {ratio:.3f} (target about 0.5)")
    print(
        f"per-rank EMA ({ema_per_rank[1] / 2**20:.2f} vs {ema_per_rank[2] / 2**20:.2f} MiB), "
        f"world 2 / world 1: {ema_ratio:.3f}"
    )
    if args.json:
        from models.base import storage

        storage.write_json(
            args.json,
            {"bytes_per_rank": per_rank, "ratio": ratio, "ema_bytes_per_rank": ema_per_rank, "ema_ratio": ema_ratio},
        )


if __name__ == "__main__":
    main()
