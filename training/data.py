"""Batches over the embedding store: rank-local row groups, exact resume on any world size.

Order. An epoch is a permutation of the store's row groups (seeded by (seed, epoch)), each row
group's rows in their own permutation (seeded by (seed, epoch, group)). The row groups, or what is
left of them, are dealt to the ranks (each to the least loaded): each rank reads only its own row groups, in the
background, and cuts its stream into batches. All ranks step together, so every rank can compute
every other rank's position without talking to it; the epoch ends when one rank's stream cannot
fill a batch (the rows left over come back in the next epoch's permutation).

Position. The state is (epoch, the fragments dealt, steps taken since they were dealt). Resuming on
the same world size and batch size continues exactly where the run stopped; on another one, the
unconsumed remainder of every row group is dealt anew, so no sample is repeated or skipped.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pyarrow.parquet as pq
import torch

from data_pipeline import storage
from data_pipeline.store import Store, column_numpy


@dataclass(frozen=True)
class RowGroup:
    file: str
    index: int  # row group within the file
    usable: np.ndarray  # rows within the group that training may use (not held out)

    @property
    def rows(self) -> int:
        return len(self.usable)


def row_groups(store: Store) -> list[RowGroup]:
    """Every row group with the rows trainers may read (the store's held-out rows left out).

    From the manifest, which records each part's row groups: every rank of every node lays out the
    whole store at start-up, and reading each part's footer instead would cost ranks x parts
    requests to object storage before the first step. Parts from stores made before the manifest
    kept them are read."""
    groups = []
    for file, shard in zip(store.files, store.manifest["shards"]):
        sizes = shard.get("row_groups") or _row_group_sizes(file)
        heldout = store.heldout(file, sum(sizes))
        start = 0
        for i, n in enumerate(sizes):
            groups.append(RowGroup(file, i, np.flatnonzero(~heldout[start : start + n])))
            start += n
    return [g for g in groups if g.rows]


def _row_group_sizes(file: str) -> list[int]:
    fs, path = storage.url_to_fs(file)
    with fs.open(path, "rb") as f:
        meta = pq.ParquetFile(f).metadata
    return [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]


def in_group_order(seed: int, epoch: int, group: int, rows: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, group]).permutation(rows)


def deal(fragments: list[tuple[int, int]], sizes: Sequence[int], world_size: int) -> list[list[tuple[int, int]]]:
    """Fragments (group, first unconsumed row), in order, each to the rank with the fewest rows so
    far (ties to the lowest rank), so streams end nearly together."""
    streams: list[list[tuple[int, int]]] = [[] for _ in range(world_size)]
    loads = [0] * world_size
    for group, start in fragments:
        rank = loads.index(min(loads))
        streams[rank].append((group, start))
        loads[rank] += sizes[group] - start
    return streams


def consumed_rows(streams: list[list[tuple[int, int]]], sizes: Sequence[int], taken: int) -> dict[int, int]:
    """For each group touched, how far into it the streams have read after `taken` rows each."""
    progress: dict[int, int] = {}
    for stream in streams:
        left = taken
        for group, start in stream:
            if left <= 0:
                break
            use = min(left, sizes[group] - start)
            progress[group] = start + use
            left -= use
    return progress


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
        self.groups = row_groups(store)
        self.sizes = [g.rows for g in self.groups]
        self.rows = sum(self.sizes)
        if self.rows < batch_size * world_size:
            raise ValueError(
                f"store '{store.url}' has {self.rows} rows, fewer than one global batch "
                f"({batch_size} per rank x {world_size} ranks); lower train.batch_size"
            )
        self.prefetch, self.readers, self.transform, self.pin_memory = prefetch, readers, transform, pin_memory
        self.shapes = {c: store.shape(c) if store.manifest["columns"][c].get("dtype") != "png" else [] for c in self.columns}
        self._start_epoch(0)

    # -- order -------------------------------------------------------------------------------
    def _start_epoch(self, epoch: int, fragments: list[tuple[int, int]] | None = None, steps: int = 0) -> None:
        self.epoch = epoch
        if fragments is None:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.groups))
            fragments = [(int(g), 0) for g in order]
        self.fragments = fragments
        self.streams = deal(fragments, self.sizes, self.world_size)
        lengths = [sum(self.sizes[g] - s for g, s in stream) for stream in self.streams]
        self.steps_in_epoch = min(lengths) // self.batch_size
        self.steps = steps
        self._reader = None

    def _stream_rows(self, skip: int) -> Iterator[tuple[int, np.ndarray]]:
        """(group, row indices within it) of this rank's stream, past the first `skip` rows."""
        for group, start in self.streams[self.rank]:
            order = in_group_order(self.seed, self.epoch, group, self.sizes[group])[start:]
            rows = self.groups[group].usable[order]
            if skip >= len(rows):
                skip -= len(rows)
                continue
            yield group, rows[skip:]
            skip = 0

    # -- reading -------------------------------------------------------------------------------
    def _read(self, group: int) -> dict[str, np.ndarray]:
        g = self.groups[group]
        if storage.is_local(g.file):  # pyarrow's own file reader: faster than a Python file object
            table = pq.ParquetFile(storage.local_path(g.file)).read_row_group(g.index, columns=self.columns)
        else:
            fs, path = storage.url_to_fs(g.file)
            with fs.open(path, "rb") as f:
                table = pq.ParquetFile(f).read_row_group(g.index, columns=self.columns)
        return {c: self._column(table, c) for c in self.columns}

    def _column(self, table, name: str) -> np.ndarray:
        if self.shapes[name]:  # a fixed-size array column
            return column_numpy(table, name, self.shapes[name])
        values = np.empty(len(table), dtype=object)  # encoded images: the stage's transform decodes them
        values[:] = table[name].to_pylist()
        return values

    def _read_ahead(self, stream: Iterator[tuple[int, np.ndarray]]) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
        """(rows, group data) in stream order, with the next few groups read in parallel:
        one row group at a time would leave the reading (I/O and decoding) far from saturated."""
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(self.readers, thread_name_prefix=f"loader-read-rank{self.rank}") as pool:
            ahead: deque = deque()
            for group, rows in stream:
                ahead.append((rows, pool.submit(self._read, group)))
                if len(ahead) > self.readers:
                    rows_done, future = ahead.popleft()
                    yield rows_done, future.result()
            while ahead:
                rows_done, future = ahead.popleft()
                yield rows_done, future.result()

    def _produce(self, out: queue.Queue, stop: threading.Event, skip: int, target: int) -> None:
        """Background thread: read this rank's row groups ahead and cut them into `target` batches."""

        def put(batch: dict[str, np.ndarray]) -> bool:
            while not stop.is_set():
                try:
                    out.put(batch, timeout=0.1)
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
                        batch = self.transform(batch, np.random.default_rng([self.seed, self.epoch, self.rank, skip // self.batch_size + made]))
                    if not put(self._tensors(batch)):
                        return
                    made += 1
            out.put(None)
        except BaseException as err:  # surfaces in the training loop, not lost in a thread
            out.put(err)

    def _tensors(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        tensors = {c: torch.from_numpy(np.ascontiguousarray(v)) for c, v in batch.items()}
        if self.pin_memory:
            # page-locked here, off the training thread, so its copy to the GPU (non_blocking)
            # runs beside the compute instead of staging through pageable memory first
            tensors = {c: t.pin_memory() for c, t in tensors.items()}
        return tensors

    def _ensure_reader(self) -> None:
        if self._reader is None:
            out: queue.Queue = queue.Queue(maxsize=self.prefetch)
            stop = threading.Event()
            skip, target = self.steps * self.batch_size, self.steps_in_epoch - self.steps
            thread = threading.Thread(target=self._produce, args=(out, stop, skip, target), daemon=True, name=f"loader-rank{self.rank}")
            thread.start()
            self._reader = (out, stop, thread)

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
        self._ensure_reader()
        item = self._reader[0].get()
        if isinstance(item, BaseException):
            raise item
        if item is None:  # the stream ended early: cannot happen with consistent sizes
            raise RuntimeError(f"loader rank {self.rank}: stream ended at step {self.steps} of {self.steps_in_epoch}")
        self.steps += 1
        return item

    # -- position ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "rows": self.rows,
            "epoch": self.epoch,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "fragments": [list(f) for f in self.fragments],
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["rows"] != self.rows or state["seed"] != self.seed:
            raise ValueError(
                f"loader state is for {state['rows']} rows with seed {state['seed']}; "
                f"this store has {self.rows} rows and the seed is {self.seed}"
            )
        self.close()
        fragments = [tuple(f) for f in state["fragments"]]
        if state["world_size"] == self.world_size and state["batch_size"] == self.batch_size:
            self._start_epoch(state["epoch"], fragments, state["steps"])
            return
        # Another world size or batch size: deal what is left of every group anew.
        streams = deal(fragments, self.sizes, state["world_size"])
        progress = consumed_rows(streams, self.sizes, state["steps"] * state["batch_size"])
        remaining = [(g, progress.get(g, s)) for g, s in fragments if progress.get(g, s) < self.sizes[g]]
        self._start_epoch(state["epoch"], remaining, 0)
        if self.steps_in_epoch == 0:  # too little left for one global batch: next epoch
            self._start_epoch(state["epoch"] + 1)

    def consumed_in_epoch(self) -> int:
        """Rows of the current epoch taken by all ranks together (for reports)."""
        return self.steps * self.batch_size * self.world_size
