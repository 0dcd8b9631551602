"""The training engine across real processes (DeepSpeed on 2 CPU ranks, torchrun, gloo): an
uninterrupted run, and what resume makes of kills, crashes, preemption, corrupt checkpoints,
other world sizes, hung collectives and S3 outages. The runs are tests/support/engine_runs.py's."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from models.base import storage
from tests.support.engine_runs import (  # noqa: F401 (the fixtures root and straight)
    command,
    kill_tree,
    launch,
    leftovers,
    metrics,
    root_fixture,
    run_dir,
    short_run,
    straight_fixture,
    trainer_state,
)
from tests.support.storefactory import make_store

pytestmark = pytest.mark.slow


def test_uninterrupted_run_logs_everything(root, straight):
    assert sorted(straight) == list(range(1, 25))
    record = straight[24]
    for key in (
        "loss",
        "lr",
        "grad_norm",
        "samples_per_s",
        "step_time_s",
        "data_wait_s",
        "rss_gb",
        "skipped_steps",
        "epoch",
    ):
        assert record[key] is not None, key
    assert straight[24]["loss"] < straight[1]["loss"]
    logs = os.path.join(run_dir(root), "logs", "tensorboard")
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(logs))
    latest = os.path.join(run_dir(root), "step_0000024")
    files = json.load(open(os.path.join(latest, "checksums.json")))
    assert {
        "ema.safetensors",
        "stage.json",
        "trainer_state.json",
        "config.yaml",
        "rng-rank00000.pt",
        "rng-rank00001.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    } <= set(files)
    assert open(os.path.join(run_dir(root), "latest")).read().strip() == "step_0000024"


def test_sigkill_then_resume_gives_the_same_losses(root, straight):
    proc = subprocess.Popen(
        command(root, "train.steps=24", "train.checkpoint_every=4", "train.run=killed"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    metrics_file = os.path.join(run_dir(root, "killed"), "logs", "metrics.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(metrics_file) and sum(1 for _ in open(metrics_file)) >= 10:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    kill_tree(proc.pid)  # every rank and the launchers at once, as when a node dies
    proc.wait()
    killed_at = max(metrics(root, "killed"))
    assert killed_at < 24
    launch(root, "train.steps=24", "train.checkpoint_every=4", "train.run=killed")
    resumed = metrics(root, "killed")
    summary = json.load(open(os.path.join(run_dir(root, "killed"), "train_summary.json")))
    start = summary["resumed_from_step"]
    assert 8 <= start <= killed_at
    with open(metrics_file) as f:  # each step once: what the killed run logged after `start` was dropped
        assert [json.loads(line)["step"] for line in f] == list(range(1, 25))
    for step in range(start + 1, 25):
        assert abs(resumed[step]["loss"] - straight[step]["loss"]) <= 1e-6, step
    # the average too: each rank's share saved, gathered, cut again on resume and averaged on
    ours, theirs = (
        load_file(os.path.join(run_dir(root, run), "step_0000024", "ema.safetensors")) for run in ("killed", "main")
    )
    assert max((ours[n] - theirs[n]).abs().max().item() for n in theirs) <= 1e-6


def test_interrupted_checkpoint_write_leaves_the_previous_in_use(root, tmp_path):
    failed = launch(
        root,
        "train.steps=12",
        "train.checkpoint_every=4",
        "train.run=crash",
        "train.fault_injection.crash_in_checkpoint_step=8",
        check=False,
        tmpdir=tmp_path,
    )
    assert failed.returncode == 1
    # rank 1 was SIGKILLed mid-save; rank 0's aborted barrier and torchrun's failure report do not
    # end the output in tracebacks: one line names the rank, its host and the signal
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith("unclip train: error: train ldm: rank 1 (local rank 1, pid "), failed.stderr[-3000:]
    assert f"on {socket.gethostname()} was killed (SIGKILL)" in last and "rerun" in last, last
    assert "Traceback" not in failed.stderr and "ChildFailedError" not in failed.stderr, failed.stderr[-3000:]
    assert leftovers(tmp_path) == []  # a failed run leaves no temporary behind either
    names = os.listdir(run_dir(root, "crash"))
    assert (
        "step_0000008" not in names
        and open(os.path.join(run_dir(root, "crash"), "latest")).read().strip() == "step_0000004"
    )
    done = launch(root, "train.steps=12", "train.checkpoint_every=4", "train.run=crash")
    assert "resumed from" in done.stdout and "step_0000004 at step 4" in done.stdout
    assert not any(n.startswith(storage.TMP_PREFIX) for n in os.listdir(run_dir(root, "crash")))


def _checksum(folder) -> float:
    module = torch.load(os.path.join(folder, "mp_rank_00_model_states.pt"), weights_only=False)["module"]
    return sum(v.double().sum().item() for v in module.values())


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_resume_on_another_world_size(root, straight, before, after):
    run = f"ws{before}to{after}"
    if before == 2:  # reuse the reference run's step 4
        os.makedirs(run_dir(root, run))
        shutil.copytree(os.path.join(run_dir(root), "step_0000004"), os.path.join(run_dir(root, run), "step_0000004"))
    else:
        launch(root, "train.steps=4", "train.checkpoint_every=4", f"train.run={run}", nproc=1)
    before_losses = metrics(root, run) if before == 1 else straight
    launch(root, "train.steps=8", "train.checkpoint_every=4", f"train.run={run}", nproc=after)
    summary = json.load(open(os.path.join(run_dir(root, run), "train_summary.json")))
    resume = summary["resume"]
    assert (resume["world_size_before"], resume["world_size_after"], resume["universal"], resume["step"]) == (
        before,
        after,
        True,
        4,
    )
    assert resume["weights_checksum"] == pytest.approx(
        _checksum(os.path.join(run_dir(root, run), "step_0000004")), abs=1e-9
    )
    after_losses = metrics(root, run)
    assert (
        abs(after_losses[5]["loss"] - before_losses[4]["loss"]) < 0.3 * before_losses[1]["loss"]
    )  # the curve continues
    state = trainer_state(os.path.join(run_dir(root, run), "step_0000008"))
    assert state["loader"]["world_size"] == after and state["loader"]["epoch"] == 0


def test_nan_step_is_skipped_and_a_streak_stops_the_run(root):
    result = launch(
        root,
        "train.steps=12",
        "train.checkpoint_every=2",
        "train.run=nan",
        "train.max_skipped_steps=3",
        "train.fault_injection.nan_loss_steps=[3, 6, 7, 8]",
        "train.preview_every=2",
        stage="prior",
        check=False,
    )
    assert result.returncode != 0
    assert "3 steps in a row had a non-finite loss or gradients (the last at step 8)" in result.stderr
    log = metrics(root, "nan", "prior")
    assert log[3]["skipped_steps"] == 1 and log[5]["skipped_steps"] == 1 and max(log) == 7
    folder = run_dir(root, "nan", "prior")
    steps = sorted(n for n in os.listdir(folder) if n.startswith("step_"))
    assert steps[-1] == "step_0000006"  # nothing saved once the streak began to break the run
    for name in steps:
        ema = load_file(os.path.join(folder, name, "ema.safetensors"))
        assert all(torch.isfinite(v).all() for v in ema.values())
    previews = os.listdir(os.path.join(folder, "logs", "previews"))
    assert "step_0000002-prior_true_vs_nearest.png" in previews


def test_sigterm_saves_at_the_next_step_and_exits_zero(root):
    proc = subprocess.Popen(
        command(root, "train.steps=500", "train.checkpoint_every=1000", "train.run=preempt"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    metrics_file = os.path.join(run_dir(root, "preempt"), "logs", "metrics.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.exists(metrics_file) and sum(1 for _ in open(metrics_file)) >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    folder = os.path.join(
        run_dir(root, "preempt"), open(os.path.join(run_dir(root, "preempt"), "latest")).read().strip()
    )
    state = trainer_state(folder)
    assert state["reason"] == "preempted" and state["step"] == max(metrics(root, "preempt")) < 500
    assert "preempted" in out


def test_a_corrupt_checkpoint_is_named_and_the_previous_used(root, straight):
    run = run_dir(root, "corrupt")
    os.makedirs(run)
    for step in ("step_0000004", "step_0000008"):
        shutil.copytree(os.path.join(run_dir(root), step), os.path.join(run, step))
    victim = os.path.join(run, "step_0000008", "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with open(victim, "r+b") as f:
        f.seek(100)
        f.write(b"\x00" * 16)
    result = launch(root, "train.steps=10", "train.run=corrupt")
    assert "file 'zero_pp_rank_0_mp_rank_00_optim_states.pt' is corrupt" in result.stdout
    assert "resumed from" in result.stdout and "step_0000004 at step 4" in result.stdout
    explicit = launch(
        root,
        "train.steps=10",
        "train.run=corrupt",
        flags=["--resume-from", os.path.join(run, "step_0000008")],
        check=False,
    )
    assert explicit.returncode != 0 and "file 'zero_pp_rank_0_mp_rank_00_optim_states.pt' is corrupt" in explicit.stderr


def test_a_hung_collective_fails_loudly(root):
    started = time.time()
    result = launch(
        root,
        "train.steps=10",
        "train.run=hang",
        "train.collective_timeout_s=5",
        "train.preemption_grace_s=5",
        "train.fault_injection.hang_rank=1",
        "train.fault_injection.hang_step=3",
        check=False,
    )
    assert result.returncode != 0 and time.time() - started < 150  # 5 s timeout, launch and teardown
    assert "a collective timed out after train.collective_timeout_s=5s" in result.stderr


def test_zero3_resumes_on_more_ranks_with_its_average(root):
    """Each ZeRO-3 rank keeps the average of its own partitions: saved whole from 1 rank, cut into
    2 ranks' partitions on resume, it goes on averaging (decay 0.999 from the start, so 2 more
    steps move it by about 0.2% of its distance to the weights; a misplaced partition moves it far)."""
    settings = [
        "train.zero_stage=3",
        "train.ema.decay=0.999",
        "train.ema.warmup=1",
        "train.run=z3",
        "train.checkpoint_every=4",
    ]
    first = launch(root, "train.steps=4", *settings, nproc=1)
    launch(root, "train.steps=6", *settings, nproc=2)
    assert (
        float(re.search(r"ldm: ([\d.]+)M trainable parameters", first.stdout).group(1)) > 0.1
    )  # counted whole under ZeRO-3
    assert "M trainable parameters, 144 training rows, 0 held-out rows, 1 ranks x" in first.stdout  # the store's split
    resume = json.load(open(os.path.join(run_dir(root, "z3"), "train_summary.json")))["resume"]
    assert (resume["world_size_before"], resume["world_size_after"], resume["universal"]) == (1, 2, True)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    saved = get_fp32_state_dict_from_zero_checkpoint(run_dir(root, "z3"), tag="step_0000004")  # DeepSpeed's own reading
    assert resume["weights_checksum"] == pytest.approx(sum(v.double().sum().item() for v in saved.values()), abs=1e-6)
    before, after = (
        load_file(os.path.join(run_dir(root, "z3"), step, "ema.safetensors"))
        for step in ("step_0000004", "step_0000006")
    )
    assert before.keys() == after.keys()
    norm = lambda tensors: torch.sqrt(sum((t.double() ** 2).sum() for t in tensors)).item()  # noqa: E731
    moved = norm(after[n] - before[n] for n in before) / norm(before.values())
    assert 0 < moved < 0.01, moved


def test_init_from_starts_a_new_run_from_trained_weights(root, straight):
    result = launch(root, "train.steps=2", "train.run=finetune", flags=["--init-from", run_dir(root)])
    assert "weights from" in result.stdout
    log = metrics(root, "finetune")
    assert log[1]["loss"] < straight[1]["loss"]


def test_checkpoints_on_s3_with_faults_and_an_outage(root, tmp_path, s3_prefix, faults):
    """Store, run folder and checkpoints on S3, through a proxy failing a tenth of requests: an
    outage after the first checkpoint stops the ranks in one line naming the URL with `latest`
    kept, and a resume (faults still on) ends with the losses of the same run fault-free."""
    from tests.conftest import FAULT_SETTINGS
    from tests.support.faultproxy import upstream_keys

    reference = {step: r["loss"] for step, r in short_run(root, "0", "train.zero_stage=0").items()}
    make_store(storage.join(s3_prefix, "store"), (40, 30, 50, 24))  # the store of `root`, on S3
    run = storage.join(s3_prefix, "runs", "ldm", "faulty")
    # a rank that outlives the one the outage stopped is given 5 s to go, not the default grace
    settings = [
        "train.steps=4",
        "train.checkpoint_every=2",
        "train.run=faulty",
        "train.zero_stage=0",
        "train.preemption_grace_s=5",
        *FAULT_SETTINGS,
    ]
    faults.schedule(0.1, seed=31)
    proc = subprocess.Popen(
        command(s3_prefix, *settings),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    deadline = time.time() + 300
    while (
        proc.poll() is None
        and time.time() < deadline
        and not any(k.endswith("faulty/latest") for k in upstream_keys(faults, run))
    ):
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before the outage could begin"
    faults.outage("slowdown")
    began = time.time()
    _, err = proc.communicate(timeout=240)
    seconds, failed_tries = (
        time.time() - began,
        faults.counts["slowdown"] + faults.counts["reset"] + faults.counts["stall"],
    )
    faults.schedule(0.1, seed=32)
    lines = err.strip().splitlines()
    assert proc.returncode == 1 and seconds < 120, (proc.returncode, seconds, lines[-5:])
    assert (
        lines[-1].startswith("unclip train: error: train ldm: storage unavailable: ")
        and s3_prefix.removeprefix("s3://") in lines[-1]
    ), lines[-3:]
    latest = lambda: storage.read_text(storage.join(run, "latest")).strip()  # noqa: E731
    assert latest() == "step_0000002" and storage.is_committed(storage.join(run, "step_0000002"))
    result = launch(s3_prefix, *settings, tmpdir=tmp_path)
    assert "step_0000002 at step 2" in result.stdout  # downloaded: the checkpoint the outage left in use
    failed_tries += sum(faults.counts[kind] for kind in ("slowdown", "reset", "stall"))
    faults.schedule(0.0)
    assert failed_tries >= 3 and latest() == "step_0000004" and storage.is_committed(storage.join(run, "step_0000004"))
    assert {step: r["loss"] for step, r in s3_metrics(run).items()} == reference
    logged = storage.read_text(storage.join(run, "logs", "metrics.jsonl")).splitlines()
    assert [json.loads(line)["step"] for line in logged] == [1, 2, 3, 4]  # each step once
    assert leftovers(tmp_path) == []  # the staging of a remote run and its resume copy are gone with it


def s3_metrics(run_url: str) -> dict[int, dict]:
    out = {}
    for line in storage.read_text(storage.join(run_url, "logs", "metrics.jsonl")).splitlines():
        record = json.loads(line)
        out[record["step"]] = record
    return out
