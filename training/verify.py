"""Every part a run trains on matches its sha256 in the parts index before any rank reads a row.

The check is spread over the ranks (part i by rank i % world size, so the store is read once in
all), the ranks agree on the result before any of them goes on, and it is done once per parts
index: the run folder records the index it checked, so a resume of the same store skips it.
"""

from __future__ import annotations

import torch.distributed as dist

from data_pipeline.store import Store, StoreError, read_index
from models.base import storage

VERIFIED = "store_verified.json"


def verify_store(store: Store, run_url: str, rank: int, world: int) -> None:
    marker = storage.join(run_url, VERIFIED)
    index = store.manifest["index"]["folder"]
    if storage.exists(marker) and storage.read_json(marker).get("index") == index:
        return
    table = read_index(store.url, store.manifest, ["file", "sha256"])
    files, digests = table["file"].to_pylist(), table["sha256"].to_pylist()
    bad = [
        f
        for i, (f, d) in enumerate(zip(files, digests, strict=True))
        if f and i % world == rank and storage.sha256_file(storage.join(store.url, f)) != d
    ]
    everyone: list[list[str]] = [bad]
    if dist.is_initialized():
        everyone = [[] for _ in range(world)]
        dist.all_gather_object(everyone, bad)
    found = sorted(f for part in everyone for f in part)
    if found:
        more = f" ({len(found) - 1} more)" if len(found) > 1 else ""
        raise StoreError(
            f"store '{store.url}': {found[0]}{more} does not match its sha256 in the parts index "
            "(damaged or partly copied); "
            "remove it and its .json sidecar, rerun `unclip embed` to write it again"
        )
    if rank == 0:
        storage.write_json(marker, {"index": index, "parts": sum(1 for f in files if f)})
