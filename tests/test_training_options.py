"""Training options across real processes (2 CPU ranks, torchrun, gloo): ZeRO stages, precisions
and offload, activation checkpointing, channels-last, compile, and the step loop's host reads.
Options that change no arithmetic are held to the losses of the same run without them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.support.engine_runs import launch, launch_together, metrics, root_fixture, run_dir, short_run  # noqa: F401 (the fixture root)

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    "settings",
    [
        ["train.zero_stage=0"],
        ["train.zero_stage=1", "train.precision=bf16"],
        ["train.zero_stage=3"],
        ["train.zero_stage=3", "train.offload_params=cpu", "train.offload_optimizer=cpu", "train.grad_accum=2"],
    ],
    ids=["zero0", "zero1-bf16", "zero3", "zero3-offload-accum"],
)
def test_zero_stages_precisions_and_offload_train(root, settings):
    run = "-".join(s.split("=")[1] for s in settings).replace("/", "")
    log = short_run(root, run, *settings)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log.values())
    assert os.path.exists(os.path.join(run_dir(root, run), "step_0000004", "_COMMITTED"))
    ema = load_file(os.path.join(run_dir(root, run), "step_0000004", "ema.safetensors"))
    assert all(torch.isfinite(v).all() for v in ema.values())


def test_the_step_loop_reads_nothing_from_the_device_outside_log_steps(root, tmp_path):
    """Each stage trained N and 2N steps (one log step, at the end) makes as many host reads of
    tensors from our code (tests/support/count_syncs.py): none comes once a step. On a GPU each would
    wait for the step's kernels. Before the losses stayed on the device, an ldm step made 6."""
    shutil.copytree(os.path.join(root, "store"), tmp_path / "store")
    specs = [
        "ldm:train.zero_stage=0",
        "upsampler",
    ]  # ZeRO-0: our optimizer's path; ZeRO 1-3 leave the step to DeepSpeed
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(os.path.dirname(__file__), "support", "count_syncs.py"),
            str(tmp_path),
            "2",
            *specs,
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    counts = json.loads(result.stdout.strip().splitlines()[-1])
    for spec in specs:
        short, long = counts[spec]
        assert short > 0, spec  # the counter sees reads: the last log step's and the checkpoint's
        assert long == short, f"{spec}: {long - short} more host reads in 2 more steps"


def test_activation_checkpointing_and_channels_last_give_the_losses_without(root):
    """Checkpointed blocks under ZeRO-0 (with channels-last inputs and train.nproc=auto, the
    default) and selective ones under ZeRO-3 give the losses of the same runs without; the ZeRO-3
    run resumes, its blocks recomputed. Channels-last inputs are also checked alone against the
    ZeRO-0 run (the same first two steps: warmup's learning rates)."""
    from launch.environment import local_ranks

    off = {
        zero: short_run(root, str(zero), f"train.zero_stage={zero}") for zero in (0, 3)
    }  # test_zero_stages_precisions_and_offload_train's
    short = ("train.steps=4", "train.checkpoint_every=2")
    auto, _, _ = launch_together(
        (
            (
                root,
                *short,
                "train.run=0-ckpt",
                "train.zero_stage=0",
                "train.activation_checkpointing=blocks",
                "train.channels_last=true",
            ),
            {"nproc": None},
        ),
        ((root, *short, "train.run=3-ckpt", "train.zero_stage=3", "train.activation_checkpointing=selective"), {}),
        (
            (
                root,
                "train.steps=2",
                "train.checkpoint_every=2",
                "train.run=channels-last",
                "train.zero_stage=0",
                "train.channels_last=true",
            ),
            {},
        ),
    )
    ranks, threads = local_ranks("auto")
    assert f"{ranks} ranks x {os.environ.get('OMP_NUM_THREADS', threads)} threads" in auto.stdout
    assert "channels-last inputs to 1 networks" in auto.stdout
    for zero, run in ((0, "0-ckpt"), (3, "3-ckpt")):
        if zero == 0 and ranks != 2:
            continue  # auto chose another world size than the reference's: other batches
        on = metrics(root, run)
        for step, record in off[zero].items():
            assert on[step]["loss"] == pytest.approx(record["loss"], rel=1e-5, abs=1e-7), (run, step)
    for step in (1, 2):
        assert metrics(root, "channels-last")[step]["loss"] == pytest.approx(off[0][step]["loss"], rel=1e-5), step
    result = launch(
        root,
        "train.steps=6",
        "train.checkpoint_every=2",
        "train.run=3-ckpt",
        "train.zero_stage=3",
        "train.activation_checkpointing=selective",
    )
    # the ldm's UNet of two levels: 2 down, mid, 2 up blocks; selective leaves the deepest level's 3
    assert (
        "resumed from" in result.stdout
        and "at step 4" in result.stdout
        and "activation checkpointing of 2 blocks" in result.stdout
    )
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in metrics(root, "3-ckpt").values())


def prior_run(root, run: str, *settings: str, steps: int = 4, flags=()) -> tuple[tuple, dict]:
    return (root, f"train.steps={steps}", "train.checkpoint_every=2", f"train.run={run}", *settings), {
        "stage": "prior",
        "flags": flags,
    }


def test_compiled_runs_train_as_eager_ones_and_their_checkpoints_interchange(root, tmp_path):
    """The prior compiled block by block (ZeRO-2, 2 ranks, one compile cache) and eager: the same
    losses within float tolerance (inductor orders sums its own way); a compiled run resumes
    eager and an eager one compiled, with the same losses; saved names carry no `_orig_mod.`.
    The prior's blocks repeat, so it compiles in seconds. Its blocks checkpointed under ZeRO-3
    give the eager run's losses too."""
    cache = str(tmp_path / "compile-cache")
    compiling = ("train.compile=blocks", f"train.compile_cache={cache}")
    launch_together(prior_run(root, "eager"), prior_run(root, "compiled", *compiling, steps=2))
    eager, compiled = metrics(root, "eager", "prior"), metrics(root, "compiled", "prior")
    for step in (1, 2):
        assert compiled[step]["loss"] == pytest.approx(eager[step]["loss"], rel=1e-4), step
    assert os.listdir(cache)  # inductor's caches went where they were told
    eager_step2 = os.path.join(run_dir(root, "eager", "prior"), "step_0000002")
    launch_together(
        prior_run(root, "compiled"),  # the same run, resumed without compile
        prior_run(root, "from-eager", *compiling, flags=["--resume-from", eager_step2]),
        prior_run(root, "prior-ckpt", "train.zero_stage=3", "train.activation_checkpointing=blocks", steps=2),
    )
    as_eager, as_compiled = metrics(root, "compiled", "prior"), metrics(root, "from-eager", "prior")
    for step in (3, 4):
        assert as_eager[step]["loss"] == pytest.approx(eager[step]["loss"], rel=1e-4), step
        assert as_compiled[step]["loss"] == pytest.approx(eager[step]["loss"], rel=1e-4), step
    names = set(load_file(os.path.join(run_dir(root, "compiled", "prior"), "step_0000002", "ema.safetensors")))
    assert names == set(load_file(os.path.join(eager_step2, "ema.safetensors"))) and not any(
        "_orig_mod" in n for n in names
    )
    checkpointed = metrics(root, "prior-ckpt", "prior")
    for step in (1, 2):  # against the eager ZeRO-2 run: the same fp32 arithmetic, partitioned otherwise
        assert checkpointed[step]["loss"] == pytest.approx(eager[step]["loss"], rel=1e-5), step
