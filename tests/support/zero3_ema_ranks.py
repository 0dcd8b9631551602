"""The ranks of tests/test_ema.py's sharded-average test, started by torchrun: on a ZeRO-3 engine, an
average kept per partition and one kept per share of the full (gathered) weights, against a plain
average of the full weights; and the checks that read only a rank's partitions (checksum, finite
weights) against the gathered weights."""

from __future__ import annotations

import json
import os
import sys

import deepspeed
import torch
import torch.distributed as dist
from safetensors.torch import save_file

from launch import config
from models.base.process import exit_now
from training.ds_config import deepspeed_config, make_optimizer
from training.ema import EMA
from training.engine import init_distributed
from training.partitions import gathered, weights_are_finite, weights_checksum


def full_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    with gathered(module, 3):
        return {n: p.detach().float().cpu().clone() for n, p in module.named_parameters()}


def main(out: str) -> None:
    rank, world, _, device = init_distributed(120)
    cfg = config.load(None, ["train.zero_stage=3", "train.batch_size=2", "train.optim.lr=0.01"])
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(5, 7), torch.nn.GELU(), torch.nn.Linear(7, 3)
    )  # odd sizes: padded partitions
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=make_optimizer(list(model.parameters()), cfg.train), config=deepspeed_config(cfg.train)
    )
    partitions = EMA(engine.module, 0.9, 1, device, read_partitions=True, comm_device=device)
    with gathered(engine.module, 3):
        shares = EMA(engine.module, 0.9, 1, device, read_partitions=False, comm_device=device)  # as under ZeRO 0-2
    start = full_weights(engine.module)
    reference = {n: v.clone() for n, v in start.items()}
    inputs = torch.Generator().manual_seed(rank)
    for _ in range(4):
        engine.backward(engine(torch.randn(2, 5, generator=inputs).to(device)).pow(2).mean())
        engine.step()
        partitions.update(engine.module)
        with gathered(engine.module, 3):
            shares.update(engine.module)
        for n, w in full_weights(engine.module).items():
            reference[n].lerp_(w, 1 - 0.9)
    by_partition, by_share = partitions.state_dict(), shares.state_dict()
    # a resume: rank 0 saved the full average, every rank reads only its share of it
    saved = os.path.join(os.path.dirname(out), "ema.safetensors")
    if rank == 0:
        save_file(by_partition, saved)
    dist.barrier()
    restored = EMA(engine.module, 0.9, 1, device, read_partitions=True, comm_device=device)
    restored.load_file(saved, partitions.updates)
    round_trip = restored.state_dict()
    weights = full_weights(engine.module)
    checksum, finite = weights_checksum(engine.module, device), weights_are_finite(engine.module, device)
    if rank == 1:  # a non-finite weight in one rank's partition only
        engine.module[2].weight.ds_tensor.data[0] = float("nan")
    finite_after_nan = weights_are_finite(engine.module, device)
    if rank == 0:
        difference = lambda a, b: max((a[n] - b[n]).abs().max().item() for n in b)  # noqa: E731
        report = {
            "names": [sorted(by_partition), sorted(by_share)],
            "shapes_equal": all(by_partition[n].shape == by_share[n].shape == reference[n].shape for n in reference),
            "partitions_vs_reference": difference(by_partition, reference),
            "shares_vs_reference": difference(by_share, reference),
            "moved_from_start": difference(reference, start),
            "round_trip_difference": difference(round_trip, by_partition),
            "share_sizes": {n: len(v) for n, v in partitions.shadow.items()},
            "checksum_difference": abs(checksum - sum(w.double().sum().item() for w in weights.values())),
            "finite": finite,
            "finite_after_nan_on_rank1": finite_after_nan,
        }
        with open(out, "w") as f:
            json.dump(report, f)
    else:
        assert by_partition == by_share == round_trip == {}
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
    exit_now(0)  # as our ranks do: interpreter teardown after gloo sometimes aborts ("terminate called ...")
