"""Batches over the embedding store: rank-local row groups, exact resume on any world size.

Order. An epoch is a permutation of the store's row groups (seeded by (seed, epoch)), each row
group's rows in their own permutation (seeded by (seed, epoch, group)). The row groups, or what is
left of them, are dealt to the ranks (each to the least loaded): each rank reads only its own row groups, in the
background, and cuts its stream into batches. All ranks step together, so every rank can compute
every other rank's position without talking to it; the epoch ends when one rank's stream cannot
fill a batch (the rows left over come back in the next epoch's permutation).

Layout. What a rank holds grows with the row groups, not the rows: four numbers a group, from the
parts index (no part's footer is read). The held-out rows of a group are found when it is read.

Position. The state is (epoch, steps taken) while the epoch's fragments are its fresh permutation,
and the fragments dealt as well after a re-deal. Resuming on the same world size and batch size
continues exactly where the run stopped; on another one, the unconsumed remainder of every row
group is dealt anew, so no sample is repeated or skipped.
"""

from __future__ import annotations

import heapq
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from data_pipeline.store import Store, StoreError, column_numpy, heldout_mask
from models.base import storage


@dataclass(frozen=True)
class Layout:
    """The store's row groups that hold training rows, as arrays in store order."""

    part: np.ndarray  # int32: the part's position in the parts index
    group: np.ndarray  # int32: the row group within its part
    first_row: np.ndarray  # int64: the group's first row within its part
    sizes: np.ndarray  # int64: the group's training rows (held-out ones left out)

    def __len__(self) -> int:
        return len(self.sizes)


def layout(store: Store) -> Layout:
    """Every row group with the rows trainers may read, from the parts index alone."""
    index = store.index
    keep = np.flatnonzero(index.group_train_rows > 0)
    part = (np.searchsorted(index.group_start, keep, side="right") - 1).astype(np.int32)
    ends = np.cumsum(index.group_rows, dtype=np.int64)  # rows before each group's end, store-wide
    part_first = np.concatenate([[0], ends])[index.group_start[part]]
    first_row = ends[keep] - index.group_rows[keep] - part_first
    group = (keep - index.group_start[part]).astype(np.int32)
    return Layout(part, group, first_row, index.group_train_rows[keep].astype(np.int64))


def in_group_order(seed: int, epoch: int, group: int, rows: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, group]).permutation(rows)


def deal(fragments: np.ndarray, sizes: np.ndarray, world_size: int) -> np.ndarray:
    """The rank of each fragment (group, first unconsumed row), in order: each to the rank with
    the fewest rows so far (ties to the lowest rank), so streams end nearly together."""
    owner = np.empty(len(fragments), np.int32)
    loads = [(0, rank) for rank in range(world_size)]  # a heap: (rows so far, rank)
    left = sizes[fragments[:, 0]] - fragments[:, 1] if len(fragments) else np.zeros(0, np.int64)
    for i, rows in enumerate(left.tolist()):
        load, rank = heapq.heappop(loads)
        owner[i] = rank
        heapq.heappush(loads, (load + rows, rank))
    return owner


def consumed(fragments: np.ndarray, owner: np.ndarray, sizes: np.ndarray, world_size: int, taken: int) -> np.ndarray:
    """Each fragment's first unconsumed row once every rank's stream has given `taken` rows."""
    starts = fragments[:, 1].astype(np.int64)
    for rank in range(world_size):
        mine = np.flatnonzero(owner == rank)
        left = sizes[fragments[mine, 0]] - fragments[mine, 1]
        before = np.cumsum(left) - left  # rows the stream gave before reaching each fragment
        starts[mine] += np.clip(taken - before, 0, left)
    return starts


class StoreLoader:
    """Iterates batches (dicts of tensors) for one rank; `state_dict` is the same on every rank."""

    def __init__(
        self,
        store: Store,
        columns: Sequence[str],
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        prefetch: int = 4,
        readers: int = 2,
        transform: Callable[[dict[str, np.ndarray], np.random.Generator], dict[str, np.ndarray]] | None = None,
        pin_memory: bool = False,
    ):
        self.store, self.columns = store, list(columns)
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.layout = layout(store)
        self.sizes = self.layout.sizes
        self.rows = int(self.sizes.sum())
        if self.rows < batch_size * world_size:
            raise StoreError(
                f"store '{store.url}' has {self.rows} rows, fewer than one global batch "
                f"({batch_size} per rank x {world_size} ranks); lower train.batch_size"
            )
        self.prefetch, self.readers, self.transform, self.pin_memory = prefetch, readers, transform, pin_memory
        self.shapes = {
            c: store.shape(c) if store.manifest["columns"][c].get("dtype") != "png" else [] for c in self.columns
        }
        self._start_epoch(0)
        if self.steps_in_epoch == 0:  # a rank's row groups hold less than a batch: it could never step
            raise StoreError(
                f"store '{store.url}': its {len(self.sizes)} row groups ({self.rows} rows) dealt to {world_size} "
                "ranks leave a rank "
                f"fewer than train.batch_size={batch_size} rows; lower train.batch_size or use fewer ranks"
            )

    def rows_line(self) -> str:
        """What the run trains on, in words: the store's total would count its held-out rows too,
        which no trainer reads (they are eval's)."""
        heldout = int(self.store.manifest["totals"]["rows"]) - self.rows
        return f"{self.rows:,} training rows, {heldout:,} held-out rows"

    # -- order -------------------------------------------------------------------------------
    def _start_epoch(self, epoch: int, fragments: np.ndarray | None = None, steps: int = 0) -> None:
        """Deal `fragments` (rows (group, first unconsumed row)); None: the epoch's permutation."""
        self.epoch = epoch
        self.fresh = fragments is None  # the position then needs no list of fragments
        self.fragments = (
            self._permutation(epoch) if fragments is None else np.asarray(fragments, np.int32).reshape(-1, 2)
        )
        self.owner = deal(self.fragments, self.sizes, self.world_size)
        left = self.sizes[self.fragments[:, 0]] - self.fragments[:, 1]
        lengths = np.bincount(self.owner, weights=left, minlength=self.world_size)
        self.steps_in_epoch = int(lengths.min()) // self.batch_size
        self.steps = steps
        self._reader = None

    def _permutation(self, epoch: int) -> np.ndarray:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.sizes))
        return np.stack([order, np.zeros_like(order)], axis=1).astype(np.int32)  # (group, first row): both < 2**31

    def stream(self, rank: int) -> np.ndarray:
        """Rank `rank`'s fragments this epoch, in order."""
        return self.fragments[self.owner == rank]

    def _stream_rows(self, skip: int) -> Iterator[tuple[int, int]]:
        """(group, first position in its in-group order) of this rank's stream, past its first `skip` rows."""
        for group, start in self.stream(self.rank).tolist():
            left = int(self.sizes[group]) - start
            if skip >= left:
                skip -= left
                continue
            yield group, start + skip
            skip = 0

    # -- reading -------------------------------------------------------------------------------
    def _read(self, group: int, first: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """A row group's columns, and which of its rows come next in this epoch's order (its
        held-out rows found here, from its part's mask)."""
        lay = self.layout
        file = storage.join(self.store.url, self.store.index.file_of(int(lay.part[group])))
        if storage.is_local(file):  # pyarrow's own file reader: faster than a Python file object
            table = pq.ParquetFile(storage.local_path(file)).read_row_group(int(lay.group[group]), columns=self.columns)
        else:
            fs, path = storage.url_to_fs(file)
            with fs.open(path, "rb") as f:
                table = pq.ParquetFile(f).read_row_group(int(lay.group[group]), columns=self.columns)
        part_rows = int(self.store.index.rows[lay.part[group]])
        heldout = heldout_mask(int(self.store.index.part[lay.part[group]]), part_rows, self.store.holdout_fraction)
        usable = np.flatnonzero(~heldout[lay.first_row[group] : lay.first_row[group] + len(table)])
        if len(usable) != self.sizes[group]:
            raise RuntimeError(
                f"store '{self.store.url}': {file} row group {lay.group[group]} has {len(usable)} training rows, "
                f"the parts index says {self.sizes[group]}; rebuild it with `unclip manifest`"
            )
        order = in_group_order(self.seed, self.epoch, group, len(usable))[first:]
        return usable[order], {c: self._column(table, c) for c in self.columns}

    def _column(self, table, name: str) -> np.ndarray:
        if self.shapes[name]:  # a fixed-size array column
            return column_numpy(table, name, self.shapes[name])
        values = np.empty(len(table), dtype=object)  # encoded images: the stage's transform decodes them
        values[:] = table[name].to_pylist()
        return values

    def _read_ahead(self, stream: Iterator[tuple[int, int]]) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
        """(rows, group data) in stream order, with the next few groups read in parallel:
        one row group at a time would leave the reading (I/O and decoding) far from saturated."""
        with ThreadPoolExecutor(self.readers, thread_name_prefix=f"loader-read-rank{self.rank}") as pool:
            ahead: deque = deque()
            for group, first in stream:
                ahead.append(pool.submit(self._read, group, first))
                if len(ahead) > self.readers:
                    yield ahead.popleft().result()
            while ahead:
                yield ahead.popleft().result()

    def _produce(self, out: queue.Queue, stop: threading.Event, skip: int, target: int) -> None:
        """Background thread: read this rank's row groups ahead and cut them into `target` batches."""

        def put(item: dict[str, torch.Tensor] | BaseException | None) -> bool:
            # never a blocking put: a run that ends mid-epoch stops consuming with the queue full,
            # and `close` must find this thread gone, not waiting for room
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            made = 0
            pieces: list[dict[str, np.ndarray]] = []  # the start of a batch that spans two groups
            have = 0
            for rows, group_data in self._read_ahead(self._stream_rows(skip)):
                if made >= target:
                    break
                data = {c: v[rows] for c, v in group_data.items()}  # this epoch's in-group order
                at = 0
                while at < len(rows) and made < target:
                    take = min(self.batch_size - have, len(rows) - at)
                    piece = {c: v[at : at + take] for c, v in data.items()}
                    at += take
                    if not pieces and take == self.batch_size:
                        batch = piece  # the common case: a view, no copy
                    else:
                        pieces.append(piece)
                        have += take
                        if have < self.batch_size:
                            continue
                        batch = {c: np.concatenate([p[c] for p in pieces]) for c in self.columns}
                        pieces, have = [], 0
                    if self.transform is not None:
                        # decoding and augmentation run here, off the training thread; their
                        # randomness is a function of the batch's place in the run
                        batch = self.transform(
                            batch,
                            np.random.default_rng([self.seed, self.epoch, self.rank, skip // self.batch_size + made]),
                        )
                    if not put(self._tensors(batch)):
                        return
                    made += 1
            put(None)
        except BaseException as err:  # surfaces in the training loop, not lost in a thread
            put(err)

    def _tensors(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        tensors = {c: torch.from_numpy(np.ascontiguousarray(v)) for c, v in batch.items()}
        if self.pin_memory:
            # page-locked here, off the training thread, so its copy to the GPU (non_blocking)
            # runs beside the compute instead of staging through pageable memory first
            tensors = {c: t.pin_memory() for c, t in tensors.items()}
        return tensors

    def _ensure_reader(self) -> queue.Queue:
        """The reader thread's queue of batches, the thread started when there is none."""
        if self._reader is None:
            out: queue.Queue = queue.Queue(maxsize=self.prefetch)
            stop = threading.Event()
            skip, target = self.steps * self.batch_size, self.steps_in_epoch - self.steps
            thread = threading.Thread(
                target=self._produce, args=(out, stop, skip, target), daemon=True, name=f"loader-rank{self.rank}"
            )
            thread.start()
            self._reader = (out, stop, thread)
        return self._reader[0]

    def close(self) -> None:
        if self._reader is not None:
            _, stop, thread = self._reader
            stop.set()
            thread.join(timeout=5)
            self._reader = None

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.steps >= self.steps_in_epoch:
            self.close()
            self._start_epoch(self.epoch + 1)
        item = self._ensure_reader().get()
        if isinstance(item, BaseException):
            raise item
        if item is None:  # the stream ended early: cannot happen with consistent sizes
            raise RuntimeError(f"loader rank {self.rank}: stream ended at step {self.steps} of {self.steps_in_epoch}")
        self.steps += 1
        return item

    # -- position ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "seed": self.seed,
            "rows": self.rows,
            "epoch": self.epoch,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "steps": self.steps,
        }
        if not self.fresh:  # after a re-deal: what is left of each group, one pair a fragment
            state["fragments"] = self.fragments.tolist()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["rows"] != self.rows or state["seed"] != self.seed:
            raise ValueError(
                f"loader state is for {state['rows']} rows with seed {state['seed']}; "
                f"this store has {self.rows} rows and the seed is {self.seed}"
            )
        self.close()
        fragments = np.asarray(state["fragments"], np.int32).reshape(-1, 2) if "fragments" in state else None
        if state["world_size"] == self.world_size and state["batch_size"] == self.batch_size:
            self._start_epoch(state["epoch"], fragments, state["steps"])
            return
        # Another world size or batch size: deal what is left of every group anew.
        dealt = self._permutation(state["epoch"]) if fragments is None else fragments
        was = deal(dealt, self.sizes, state["world_size"])
        starts = consumed(dealt, was, self.sizes, state["world_size"], state["steps"] * state["batch_size"])
        remaining = np.stack([dealt[:, 0], starts], axis=1)[starts < self.sizes[dealt[:, 0]]]
        self._start_epoch(state["epoch"], remaining, 0)
        if self.steps_in_epoch == 0:  # too little left for one global batch: next epoch
            self._start_epoch(state["epoch"] + 1)
