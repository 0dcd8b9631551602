"""Exponential moving average of the trained weights, in fp32, with a warm-up of its decay."""

from __future__ import annotations

import torch


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float, warmup: int = 10, device: torch.device | str = "cpu"):
        self.decay, self.warmup = decay, warmup
        self.updates = 0
        # Beside the trained weights by default: an average kept across the PCIe bus costs a full
        # copy of the model per step, which dominates the step of a large model on a GPU.
        self.device = torch.device(device)
        self.shadow = {n: p.detach().to(self.device, torch.float32, copy=True) for n, p in model.named_parameters()}

    def current_decay(self) -> float:
        # Early averages would be dominated by the random init: (1 + n) / (warmup + n) ramps up.
        return min(self.decay, (1 + self.updates) / (self.warmup + self.updates))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        decay = self.current_decay()
        names, params = zip(*model.named_parameters())
        current = [p.detach().to(self.shadow[n].device, torch.float32) for n, p in zip(names, params)]
        torch._foreach_lerp_([self.shadow[n] for n in names], current, 1 - decay)  # one fused pass
        self.updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: v.cpu() for n, v in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor], updates: int) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise KeyError(f"EMA weights lack {sorted(missing)[0]!r}")
        self.shadow = {n: state[n].to(self.device, torch.float32, copy=True) for n in self.shadow}
        self.updates = updates
