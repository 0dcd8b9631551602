"""Counts, for tests/test_training_options.py, the calls our code makes that read a tensor on the
host (`.item()`, `.cpu()`, `.tolist()`, `bool()`, `float()`, `int()`): on a GPU each waits for
everything queued before it. Trains each named stage in this process, one rank, for N and 2N
steps with one log step at the end, and prints {stage: [calls in N steps, calls in 2N steps]}.
A call made every step shows as a difference; what runs once (set-up, the last log step, the
final checkpoint) is in both. Only calls from this repository's files on the training thread
count: DeepSpeed's own (its ZeRO 1-3 optimizers read an overflow flag or the gradient norm every
step) and the loader thread's (host-side batches) do not.

    python tests/support/count_syncs.py ROOT N STAGE[:override,...] ...
"""

from __future__ import annotations

import json
import os
import sys
import threading

import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
READS = ("item", "cpu", "tolist", "__bool__", "__float__", "__int__")
calls = {"n": 0}


def counting(name: str):
    original = getattr(torch.Tensor, name)

    def wrapper(self, *args, **kwargs):
        caller = sys._getframe(1).f_code.co_filename
        if (
            threading.current_thread() is threading.main_thread()
            and caller.startswith(REPO)
            and "/.venv/" not in caller
        ):
            calls["n"] += 1
        return original(self, *args, **kwargs)

    return wrapper


def main() -> None:
    root, steps, runs = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    sys.path.insert(0, REPO)
    from launch import config
    from launch.rank import run_rank

    for name in READS:
        setattr(torch.Tensor, name, counting(name))
    counts = {}
    for spec in runs:
        stage, _, overrides = spec.partition(":")
        counts[spec] = []
        for n in (steps, 2 * steps):
            run = f"syncs-{len(counts)}-{n}"
            cfg = config.load(
                None,
                [
                    f"root={root}",
                    f"train.steps={n}",
                    f"train.log_every={n}",
                    f"train.checkpoint_every={n}",
                    f"train.run={run}",
                    "train.batch_size=4",
                    "train.progress_bar=never",
                    "decoder.space=pixel",
                    *filter(None, overrides.split(",")),
                ],
            )
            calls["n"] = 0
            run_rank(cfg, stage, log=lambda _: None)
            counts[spec].append(calls["n"])
    print(json.dumps(counts))


if __name__ == "__main__":
    main()
