"""What a stage gives the engine: its store columns, its network, its loss.

The engine (training/engine.py) owns everything else: DeepSpeed, data order, checkpoints, EMA,
logging. A stage is a small subclass in training/stages/.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from data_pipeline.store import Store
from launch.config import Config


class Stage:
    name: ClassVar[str]
    columns: ClassVar[tuple[str, ...]]

    def __init__(self, cfg: Config, store: Store):
        self.cfg, self.store = cfg, store
        store.require(self.columns)
        self.check_store()

    def check_store(self) -> None:
        """Refuse a store this stage cannot train on (raise StoreError naming the field)."""

    def build_model(self) -> torch.nn.Module:
        raise NotImplementedError

    def loss(self, model: Any, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def extras(self) -> dict[str, Any]:
        """What sampling needs besides the network (saved in stage.json)."""
        return {}

    def preview(self, model: torch.nn.Module, count: int = 4) -> list[tuple[str, Any]]:
        """(name, PIL image) previews of `model` (the EMA weights) on the store's first captions."""
        return []

    def preview_rows(self, columns: list[str], count: int) -> dict[str, Any]:
        first = next(f for f, s in zip(self.store.files, self.store.manifest["shards"]) if s["rows"])
        data = self.store.read(columns, [first])
        return {k: v[:count] for k, v in data.items()}

    def describe(self, model: torch.nn.Module) -> dict[str, Any]:
        from models.assembly import describe

        return describe(self.name, model, self.extras())

    # Called by the loader's thread on each batch of numpy columns (e.g. to decode images), with
    # randomness that is a function of the batch's place in the run; None: batches pass as read.
    prepare: Any = None
