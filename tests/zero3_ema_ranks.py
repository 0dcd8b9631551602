"""The ranks of tests/test_ema.py's ZeRO-3 test, started by torchrun: an average kept per partition
against one of the full weights gathered every step (what the engine did before), and the checks
that read only a rank's partitions (checksum, finite weights) against the gathered weights."""

from __future__ import annotations

import json
import sys

import deepspeed
import torch
import torch.distributed as dist

from launch import config
from training.ds_config import deepspeed_config, make_optimizer
from training.ema import EMA
from training.engine import init_distributed
from training.partitions import gathered, weights_are_finite, weights_checksum


def main(out: str) -> None:
    rank, world, _, device = init_distributed(120)
    cfg = config.load(None, ["train.zero_stage=3", "train.batch_size=2", "train.optim.lr=0.01"])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.GELU(), torch.nn.Linear(7, 3))  # odd sizes: padded partitions
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=make_optimizer(list(model.parameters()), cfg.train),
                                           config=deepspeed_config(cfg.train))  # fmt: skip
    partitioned = EMA(engine.module, 0.9, 1, device, partitioned=True, comm_device=device)
    with gathered(engine.module, 3):
        full = EMA(engine.module, 0.9, 1, device)
    start = {n: v.clone() for n, v in full.state_dict().items()}  # on the CPU state_dict holds the live tensors
    inputs = torch.Generator().manual_seed(rank)
    for _ in range(4):
        engine.backward(engine(torch.randn(2, 5, generator=inputs).to(device)).pow(2).mean())
        engine.step()
        partitioned.update(engine.module)
        with gathered(engine.module, 3):
            full.update(engine.module)
    average, reference = partitioned.state_dict(), full.state_dict()
    # a resume: every rank reads the full average (ema.safetensors) and keeps its partitions
    shared = [average]
    dist.broadcast_object_list(shared, src=0)
    restored = EMA(engine.module, 0.9, 1, device, partitioned=True, comm_device=device)
    restored.load_state_dict(shared[0], partitioned.updates)
    round_trip = restored.state_dict()
    with gathered(engine.module, 3):
        full_sum = sum(p.detach().double().sum().item() for p in engine.module.parameters())
    checksum, finite = weights_checksum(engine.module, device), weights_are_finite(engine.module, device)
    if rank == 1:  # a non-finite weight in one rank's partition only
        engine.module[2].weight.ds_tensor.data[0] = float("nan")
    finite_after_nan = weights_are_finite(engine.module, device)
    if rank == 0:
        report = {
            "world_size": world,
            "names": sorted(average),
            "reference_names": sorted(reference),
            "shapes_equal": all(average[n].shape == reference[n].shape for n in reference),
            "max_difference": max((average[n] - reference[n]).abs().max().item() for n in reference),
            "moved_from_start": max((average[n] - start[n]).abs().max().item() for n in reference),
            "round_trip_difference": max((round_trip[n] - average[n]).abs().max().item() for n in reference),
            "partition_sizes": {n: len(v) for n, v in partitioned.shadow.items()},
            "checksum_difference": abs(checksum - full_sum),
            "finite": finite,
            "finite_after_nan_on_rank1": finite_after_nan,
        }
        with open(out, "w") as f:
            json.dump(report, f)
    else:
        assert average == {} and round_trip == {}
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
