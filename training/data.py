"""Batches over the embedding store whose order is a pure function of (seed, epoch, position).

The position is counted in samples of the global order, not in steps of one world size, so a
run resumed from a checkpoint continues with exactly the next unseen samples, whatever the
number of ranks. Each epoch is a fresh permutation; the tail shorter than one global batch is
left out of that epoch (it is in the next permutation).
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np
import torch

from data_pipeline.store import Store


class StoreLoader:
    def __init__(
        self,
        store: Store,
        columns: Sequence[str],
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.columns = list(columns)
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        # Only the stage's columns are read; the whole selection is held in memory.
        self.arrays = store.read(self.columns)
        self.rows = len(next(iter(self.arrays.values())))
        self.global_batch = batch_size * world_size
        if self.rows < self.global_batch:
            raise ValueError(
                f"store '{store.url}' has {self.rows} rows, fewer than one global batch "
                f"({batch_size} per rank x {world_size} ranks); lower train.batch_size"
            )
        self.epoch, self.position = 0, 0
        self._order: tuple[int, np.ndarray] | None = None

    def order(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._order = (epoch, rng.permutation(self.rows))
        return self._order[1]

    def next_indices(self) -> np.ndarray:
        if self.position + self.global_batch > self.rows:
            self.epoch, self.position = self.epoch + 1, 0
        start = self.position + self.rank * self.batch_size
        indices = self.order(self.epoch)[start : start + self.batch_size]
        self.position += self.global_batch
        return indices

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        indices = np.sort(self.next_indices())
        return {name: torch.from_numpy(np.ascontiguousarray(self.arrays[name][indices])) for name in self.columns}

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position, "rows": self.rows}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["rows"] != self.rows or state["seed"] != self.seed:
            raise ValueError(
                f"loader state is for {state['rows']} rows with seed {state['seed']}; "
                f"this store has {self.rows} rows and the seed is {self.seed}"
            )
        self.epoch, self.position = state["epoch"], state["position"]
