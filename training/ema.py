"""Exponential moving average of the trained weights, in fp32, with a warm-up of its decay.

Each rank averages only its share of every parameter, 1/world of its elements as ZeRO-3 deals
them: under ZeRO-3 its own partition (DeepSpeed's `ds_tensor`), so no step all-gathers the model;
under ZeRO 0-2 the same elements of its full copy, so no rank holds more than 4/world bytes per
parameter of average. The full average is assembled on rank 0 only to save or preview it, and a
saved one is cut into this world size's shares on resume: `ema.safetensors` is the same full
average whatever the world size or ZeRO stage.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from safetensors import safe_open

from training.partitions import full_shape, share, span, world_and_rank


class EMA:
    def __init__(
        self,
        model: torch.nn.Module,
        decay: float,
        warmup: int = 10,
        device: torch.device | str = "cpu",
        read_partitions: bool = False,
        comm_device: torch.device | str = "cpu",
    ):
        """`read_partitions`: the model is ZeRO-3's and its partitions are to be read (else full
        parameters, gathered by the caller under ZeRO-3). `comm_device`: where the collective
        backend takes tensors (the GPU for NCCL)."""
        self.decay, self.warmup = decay, warmup
        self.updates = 0
        # Beside the trained weights by default: an average kept across the PCIe bus costs a copy
        # of the model per step, which dominates the step of a large model on a GPU.
        self.device, self.comm_device = torch.device(device), torch.device(comm_device)
        self.read_partitions = read_partitions
        self.shapes = {n: full_shape(p) for n, p in model.named_parameters()}
        self.shadow = {
            n: share(p, read_partitions).to(self.device, torch.float32, copy=True) for n, p in model.named_parameters()
        }

    def current_decay(self) -> float:
        # Early averages would be dominated by the random init: (1 + n) / (warmup + n) ramps up.
        return min(self.decay, (1 + self.updates) / (self.warmup + self.updates))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        decay = self.current_decay()
        names, params = zip(*model.named_parameters(), strict=True)
        current = [
            share(p, self.read_partitions).to(self.shadow[n].device, torch.float32)
            for n, p in zip(names, params, strict=True)
        ]
        torch._foreach_lerp_(  # pyright: ignore[reportPrivateImportUsage]
            [self.shadow[n] for n in names], current, 1 - decay
        )  # one fused pass
        self.updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The full average, on the CPU. With several ranks every rank must call it (it gathers
        the shares); rank 0 gets the average, the other ranks an empty dict."""
        world, rank = world_and_rank()
        if world == 1:
            return {n: v.cpu().view(self.shapes[n]) for n, v in self.shadow.items()}
        full = {}
        for n, mine in self.shadow.items():
            numel = math.prod(self.shapes[n])
            _, size = span(numel)
            padded = torch.zeros(size, device=self.comm_device)
            padded[: len(mine)] = mine
            parts = [torch.empty_like(padded) for _ in range(world)] if rank == 0 else None
            dist.gather(padded, parts, dst=0)  # one parameter at a time: rank 0 never holds two copies
            if parts is not None:
                full[n] = torch.cat(parts)[:numel].view(self.shapes[n]).cpu()
        return full

    def load_state_dict(self, state: dict[str, torch.Tensor], updates: int) -> None:
        """`state`: the full average (as saved); each rank keeps its share."""
        self._load(
            {n: tuple(state[n].shape) for n in state},
            lambda n, first, last: state[n][first:last],
            lambda n: state[n],
            updates,
        )

    def load_file(self, path: str, updates: int) -> None:
        """The saved full average (ema.safetensors), each rank reading only the rows that hold its
        share: the ranks of a node resuming a large model never hold the whole average each."""
        with safe_open(path, "pt") as f:
            shapes = {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()}
            self._load(shapes, lambda n, first, last: f.get_slice(n)[first:last], f.get_tensor, updates, f"'{path}'")

    def _load(
        self, shapes: dict[str, tuple[int, ...]], rows, whole, updates: int, source: str = "the EMA state"
    ) -> None:
        """`rows(name, first, last)`: rows first..last-1 of a saved weight; `whole(name)`: all of it."""
        missing = set(self.shadow) - set(shapes)
        if missing:
            raise KeyError(f"{source} lacks {sorted(missing)[0]!r}")
        shadow = {}
        for n, shape in self.shapes.items():
            if shapes[n] != shape:
                raise ValueError(f"{source}: {n!r} has shape {tuple(shapes[n])}, the network's is {shape}")
            numel = math.prod(shape)
            start, size = span(numel)
            stop = min(start + size, numel)
            if not shape or stop <= start:
                flat, offset = whole(n).reshape(-1), 0
            else:
                row = numel // shape[0]
                flat, offset = rows(n, start // row, -(-stop // row)).reshape(-1), (start // row) * row
            shadow[n] = flat[max(0, start - offset) : max(0, stop - offset)].to(self.device, torch.float32, copy=True)
        self.shadow, self.updates = shadow, updates
