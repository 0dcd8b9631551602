"""The training loader's throughput versus a bare pyarrow scan of the same columns, one run.

Bare: read every part's columns with pyarrow and turn them into numpy arrays, in file order.
Loader: one epoch of `training.data.StoreLoader` (row-group order, in-group shuffle, batches as
tensors, background prefetch). Rounds alternate; prints rows/s of each and the ratio (target >= 0.8).

    python benchmarks/loader.py --rows 40000 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

COLUMNS = ["vae_latent", "clip_text_tokens"]  # the ldm stage's columns, less clip_text_emb (0.5 of its 24 kB a row)


def bare_scan(store) -> int:
    import pyarrow.parquet as pq

    from data_pipeline.store import column_numpy
    from models.base import storage

    rows = 0
    for file in store.files:
        fs, path = storage.url_to_fs(file)
        with fs.open(path, "rb") as f:
            table = pq.read_table(f, columns=COLUMNS)
        for name in COLUMNS:
            column_numpy(table, name, store.shape(name))
        rows += len(table)
    return rows


def loader_epoch(store, batch_size: int) -> int:
    from training.data import StoreLoader

    loader = StoreLoader(store, COLUMNS, batch_size, seed=0)
    rows = 0
    for _ in range(loader.steps_in_epoch):
        rows += len(next(loader)["vae_latent"])
    loader.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=40000)
    parser.add_argument("--part-rows", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args()

    from data_pipeline.store import open_store
    from tests.support.storefactory import make_store
    from training import data  # noqa: F401 - imports torch now, not inside the first timed epoch

    work = tempfile.mkdtemp(prefix="unclip-bench-loader-")
    make_store(os.path.join(work, "store"), [args.part_rows] * (args.rows // args.part_rows), columns=COLUMNS)
    store = open_store(os.path.join(work, "store"))
    rates: dict[str, list[float]] = {"bare pyarrow scan": [], "StoreLoader": []}
    for round_ in range(args.rounds):
        for name, fn in (
            ("bare pyarrow scan", lambda: bare_scan(store)),
            ("StoreLoader", lambda: loader_epoch(store, args.batch_size)),
        ):
            started = time.time()
            rows = fn()
            rates[name].append(rows / (time.time() - started))
        print(f"round {round_ + 1}: " + ", ".join(f"{k} {v[-1]:,.0f} rows/s" for k, v in rates.items()), flush=True)
    shutil.rmtree(work, ignore_errors=True)
    rate = {k: statistics.median(v) for k, v in rates.items()}
    ratio = rate["StoreLoader"] / rate["bare pyarrow scan"]
    print(f"\nloader / bare scan: {ratio:.3f} (target >= 0.8)")
    if args.json:
        from models.base import storage

        storage.write_json(args.json, {"rows_per_s": rate, "ratio": ratio, "columns": COLUMNS})


if __name__ == "__main__":
    main()
