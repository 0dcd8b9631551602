"""Launching training runs for the engine tests: DeepSpeed on 2 CPU ranks (torchrun, gloo).

Runs share a small store and, where they can, each other's checkpoints: every launch costs ~10 s.
tests/test_engine.py (resume and faults) and tests/test_training_options.py (ZeRO stages,
precisions, checkpointing, compile, host reads) use these; each module that imports the fixtures
`root` and `straight` makes its own store and reference run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from models.base import storage
from tests.support.storefactory import make_store

# eps prediction, uniformly weighted: its loss falls from ~1 within a few steps, which the resume
# tests read as "the curve continues"; min-SNR v losses wander too much over 8 steps to tell.
SMALL = [
    "ldm.block_channels=[32, 64]",
    "ldm.diffusion.prediction=eps",
    "ldm.diffusion.loss_weighting=uniform",
    "prior.layers=2",
    "prior.heads=2",
    "train.batch_size=8",
    "train.log_every=1",
    "train.optim.warmup_steps=2",
    "train.progress_bar=never",
]


def command(root, *overrides, stage="ldm", nproc=2, flags=()):
    """nproc None: train.nproc's default (auto)."""
    ranks = [f"train.nproc={nproc}"] if nproc is not None else []
    return [sys.executable, "-m", "launch.cli", "train", stage, f"root={root}", *ranks, *SMALL, *overrides, *flags]


def launch(root, *overrides, stage="ldm", nproc=2, flags=(), check=True, tmpdir=None):
    env = {**os.environ, "TMPDIR": str(tmpdir)} if tmpdir else None
    result = subprocess.run(
        command(root, *overrides, stage=stage, nproc=nproc, flags=flags), capture_output=True, text=True, env=env
    )
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def run_dir(root, run="main", stage="ldm"):
    return os.path.join(root, "runs", stage, run)


def metrics(root, run="main", stage="ldm") -> dict[int, dict]:
    """The last record logged for each step (each is logged once, a resumed run included)."""
    out = {}
    with open(os.path.join(run_dir(root, run, stage), "logs", "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            out[record["step"]] = record
    return out


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (torchrun starts ranks in sessions of their own)."""
    import psutil

    parent = psutil.Process(pid)
    for process in [parent, *parent.children(recursive=True)]:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


def leftovers(tmpdir) -> list[str]:
    """What a run left in its TMPDIR (the launcher's and every rank's temporaries)."""
    return sorted(name for name in os.listdir(tmpdir) if "unclip" in name or name.startswith(storage.TMP_PREFIX))


def trainer_state(folder) -> dict:
    with open(os.path.join(folder, "trainer_state.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module", name="root")
def root_fixture(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    make_store(str(root / "store"), (40, 30, 50, 24))
    return str(root)


_short_runs: dict[tuple, dict[int, dict]] = {}


def short_run(root, run: str, *settings: str) -> dict[int, dict]:
    """Run `run` for 4 steps with a checkpoint every 2, once per session: tests share it."""
    key = (root, run, settings)
    if key not in _short_runs:
        launch(root, "train.steps=4", "train.checkpoint_every=2", f"train.run={run}", *settings)
        _short_runs[key] = metrics(root, run)
    return _short_runs[key]


@pytest.fixture(scope="module", name="straight")
def straight_fixture(root):
    """The uninterrupted reference run: 2 ranks, ZeRO-2, 24 steps, a checkpoint every 4."""
    launch(root, "train.steps=24", "train.checkpoint_every=4", "train.keep_last=10")
    return metrics(root)


def launch_together(*runs: tuple[tuple, dict]) -> list[subprocess.CompletedProcess]:
    """Several launches at once (args and keywords of `command` each): a launch is mostly its
    ranks' start-up, one core each, so two at a time take about the time of one."""
    procs = [
        subprocess.Popen(command(*args, **kw), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for args, kw in runs
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=900)
        if proc.returncode != 0:
            raise AssertionError(f"exit {proc.returncode}\n{out[-3000:]}\n{err[-3000:]}")
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results
