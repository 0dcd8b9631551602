"""Which elements of a parameter a rank holds or looks after, and the checks that read only those.

ZeRO-3 keeps each parameter flattened and cut into equal partitions, one per rank of the
data-parallel group (the world here): `param.ds_tensor`, the last one padded with memory DeepSpeed
never initialises. The finite-weights check and the resume checksum read a rank's own elements
through here and combine ranks with one small all-reduce, so neither gathers the whole model
(which would need its full memory on every rank, what ZeRO-3 exists to avoid); the EMA keeps the
same share of every parameter at every ZeRO stage.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.distributed as dist


def world_and_rank() -> tuple[int, int]:
    return (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)


def is_partitioned(p: torch.Tensor) -> bool:
    return getattr(p, "ds_tensor", None) is not None


def _zero3(p: torch.Tensor) -> Any:
    """`p` with the attributes ZeRO-3 sets on it at run time (ds_shape, ds_numel, ds_tensor), which
    torch's Tensor type does not declare."""
    return p


def full_shape(p: torch.Tensor) -> tuple[int, ...]:
    return tuple(_zero3(p).ds_shape) if is_partitioned(p) else tuple(p.shape)


def full_numel(p: torch.Tensor) -> int:
    return _zero3(p).ds_numel if is_partitioned(p) else p.numel()


def span(numel: int) -> tuple[int, int]:
    """(first element, partition size) of this rank's share of a flattened parameter of `numel`
    elements, as ZeRO-3 deals them: equal parts of ceil(numel / world), the last one padded."""
    world, rank = world_and_rank()
    size = -(-numel // world)
    return size * rank, size


def own_elements(p: torch.Tensor) -> torch.Tensor:
    """This rank's elements of parameter `p` (the padding left out; the full tensor if not partitioned)."""
    if not is_partitioned(p):
        return p.detach().reshape(-1)
    zero3 = _zero3(p)
    start, _ = span(zero3.ds_numel)
    return zero3.ds_tensor.detach()[: max(0, min(len(zero3.ds_tensor), zero3.ds_numel - start))]


def share(p: torch.Tensor, read_partition: bool) -> torch.Tensor:
    """This rank's share of `p`'s elements: its ZeRO-3 partition (`read_partition`), or the same
    elements of the full parameter (replicated under ZeRO 0-2, or gathered)."""
    if read_partition:
        return own_elements(p)
    start, size = span(p.numel())
    return p.detach().reshape(-1)[start : start + size]


def gathered(module: torch.nn.Module, zero_stage: int):
    """Every parameter whole inside the block (a collective under ZeRO-3: every rank enters it)."""
    import deepspeed  # lazy: DeepSpeed picks its accelerator when imported, in a rank after apply_in_rank

    if zero_stage == 3:
        return deepspeed.zero.GatheredParameters(list(module.parameters()))
    return contextlib.nullcontext()


def across_ranks(value: float, op, device: torch.device) -> float:
    """`value` reduced over every rank by `op` (SUM, MIN, MAX); alone, the value itself."""
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(tensor, op=op)
    return tensor.item()


def weights_are_finite(module: torch.nn.Module, device: torch.device) -> bool:
    """Whether every weight on every rank is finite; every rank gets the same answer (under ZeRO-3
    a rank sees only its partitions, and a rank deciding alone would leave the others waiting)."""
    finite = all(bool(torch.isfinite(own_elements(p)).all()) for p in module.parameters())
    return across_ranks(1.0 if finite else 0.0, dist.ReduceOp.MIN, device) == 1.0


def weights_checksum(module: torch.nn.Module, device: torch.device) -> float:
    """A fingerprint of the full weights, their sum (reported on resume, so a load can be checked)."""
    local = sum(own_elements(p).double().sum().item() for p in module.parameters())
    if not any(is_partitioned(p) for p in module.parameters()):
        return float(local)  # every rank holds the full weights
    return across_ranks(local, dist.ReduceOp.SUM, device)
