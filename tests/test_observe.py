"""A run's logs (training/observe.py): after a resume, metrics.jsonl holds each step once, in the
run folder and in the copy uploaded beside a remote run's checkpoints."""

from __future__ import annotations

import json
import os
import uuid

from models.base import storage
from training.observe import RunLog

# what a run killed after logging step 4 left, its last line cut short by the kill
KILLED = "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 5)) + '{"step": 5, "lo'


def steps(text: str) -> list[int]:
    return [json.loads(line)["step"] for line in text.splitlines()]


def test_a_resumed_local_run_logs_each_step_once(tmp_path):
    run = tmp_path / "run"
    logs = run / "logs"
    logs.mkdir(parents=True)
    (logs / "metrics.jsonl").write_text(KILLED)
    runlog = RunLog(str(run), str(logs), True, 6, "never", print, start_step=2)  # resumed from step 2
    try:
        assert steps((logs / "metrics.jsonl").read_text()) == [1, 2]
        for step in (3, 4):
            runlog.scalars({"step": step, "loss": 0.5})
    finally:
        runlog.close()
    assert steps((logs / "metrics.jsonl").read_text()) == [1, 2, 3, 4]


def test_a_resumed_remote_run_cuts_its_uploaded_log_at_once(tmp_path):
    run = f"memory://runs/{uuid.uuid4().hex}"
    metrics = storage.join(run, "logs", "metrics.jsonl")
    storage.write_text(metrics, KILLED)
    staging = os.path.join(tmp_path, "staging")
    runlog = RunLog(run, staging, True, 6, "never", print, start_step=2)
    try:
        # before any checkpoint: a run stopped now leaves no step twice there either
        assert steps(storage.read_text(metrics)) == [1, 2]
        runlog.scalars({"step": 3, "loss": 0.5})
        runlog.upload()
    finally:
        runlog.close()
    assert steps(storage.read_text(metrics)) == [1, 2, 3]


def test_a_run_that_starts_afresh_drops_what_an_unsaved_attempt_logged(tmp_path):
    logs = tmp_path / "run" / "logs"
    logs.mkdir(parents=True)
    (logs / "metrics.jsonl").write_text(KILLED)
    RunLog(str(tmp_path / "run"), str(logs), True, 6, "never", print).close()
    assert (logs / "metrics.jsonl").read_text() == ""
