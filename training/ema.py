"""Exponential moving average of the trained weights, in fp32, with a warm-up of its decay.

Under ZeRO-3 (`partitioned`) each rank averages only its own partition of every parameter
(DeepSpeed's `ds_tensor`): averaging the full weights would all-gather the whole model on every
rank at every step, the memory and traffic ZeRO-3 exists to avoid. The full average is assembled on
rank 0 only when it is saved or previewed, and a saved one is cut back into this world size's
partitions on resume, so the checkpoint file is the same full `ema.safetensors` at every stage.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from training.partitions import partition_start


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float, warmup: int = 10, device: torch.device | str = "cpu",
                 partitioned: bool = False, comm_device: torch.device | str = "cpu"):  # fmt: skip
        self.decay, self.warmup = decay, warmup
        self.updates = 0
        # Beside the trained weights by default: an average kept across the PCIe bus costs a full
        # copy of the model per step, which dominates the step of a large model on a GPU.
        self.device = torch.device(device)
        self.partitioned = partitioned
        self.comm_device = torch.device(comm_device)  # where the collective backend takes tensors (cuda for NCCL)
        # name -> (full shape, this rank's first element in the flattened parameter)
        self.layout = {n: (tuple(p.ds_shape), partition_start(p)) for n, p in model.named_parameters()} if partitioned else {}
        self.shadow = {n: self._local(p).detach().to(self.device, torch.float32, copy=True) for n, p in model.named_parameters()}

    def _local(self, p: torch.nn.Parameter) -> torch.Tensor:
        return p.ds_tensor if self.partitioned else p

    def current_decay(self) -> float:
        # Early averages would be dominated by the random init: (1 + n) / (warmup + n) ramps up.
        return min(self.decay, (1 + self.updates) / (self.warmup + self.updates))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        decay = self.current_decay()
        names, params = zip(*model.named_parameters())
        current = [self._local(p).detach().to(self.shadow[n].device, torch.float32) for n, p in zip(names, params)]
        torch._foreach_lerp_([self.shadow[n] for n in names], current, 1 - decay)  # one fused pass
        self.updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The full average, on the CPU. Partitioned, every rank must call it (it gathers the
        partitions); rank 0 gets the average, the other ranks an empty dict."""
        if not self.partitioned:
            return {n: v.cpu() for n, v in self.shadow.items()}
        world, rank, full = dist.get_world_size(), dist.get_rank(), {}
        for n, shard in self.shadow.items():
            shape, _ = self.layout[n]
            shard = shard.to(self.comm_device)
            parts = [torch.empty_like(shard) for _ in range(world)] if rank == 0 else None
            dist.gather(shard, parts, dst=0)  # one parameter at a time: rank 0 never holds two copies
            if rank == 0:
                full[n] = torch.cat(parts)[: math.prod(shape)].view(shape).cpu()
        return full

    def load_state_dict(self, state: dict[str, torch.Tensor], updates: int) -> None:
        """`state`: the full average (as saved), on every rank; partitioned, each rank keeps its part."""
        missing = set(self.shadow) - set(state)
        if missing:
            raise KeyError(f"EMA weights lack {sorted(missing)[0]!r}")
        if self.partitioned:
            state = {n: self._partition(n, state[n]) for n in self.shadow}
        self.shadow = {n: state[n].to(self.device, torch.float32, copy=True) for n in self.shadow}
        self.updates = updates

    def _partition(self, name: str, full: torch.Tensor) -> torch.Tensor:
        shape, start = self.layout[name]
        if tuple(full.shape) != shape:
            raise ValueError(f"EMA weights: {name!r} has shape {tuple(full.shape)}, the network's is {shape}")
        size = len(self.shadow[name])
        flat = full.reshape(-1)
        shard = torch.zeros(size, dtype=flat.dtype)  # the last partition is padded, as DeepSpeed pads it
        shard[: max(0, min(size, len(flat) - start))] = flat[start : start + size]
        return shard
