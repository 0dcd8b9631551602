"""`unclip train <stage>` on this machine: validate, then start `train.nproc` ranks with torchrun
(auto: one per GPU, or two sharing the CPU cores as threads; launch/environment.local_ranks).

Inside an existing launch (torchrun, deepspeed, srun and Ray set WORLD_SIZE) it trains in-process.
SIGTERM (preemption) is passed to the ranks, which save at the next step boundary; the command
then exits 0.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
from typing import Any

from data_pipeline.store import Store, StoreError, open_store
from launch import config as config_mod
from launch.config import Config
from launch.environment import local_ranks, rank_environment
from launch.rank import run_rank, stage_for
from launch.rank_failures import RANK_ERRORS, summary
from models.base import storage
from models.base.configlib import to_yaml
from models.base.errors import JobFailed
from models.encoders import RECORDED_BEFORE
from models.public import find_public
from training.checkpoint import STAGING_DIR, read_latest, read_trainer_state
from training.ds_config import check_runtime
from training.engine import SUMMARY


class RanksFailed(JobFailed):
    """The ranks exited with an error: the line launch/rank_failures.py makes of what the ranks and
    the agent left (the rank that failed first, its host and why), with its kind."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def check_before_launch(cfg: Config, stage: str, init_from: str | None = None) -> Config:
    """Everything that can be refused before a rank starts; returns the configuration the ranks
    get (the stage's own train settings applied). Public weights to start from are checked
    against the store from their configs (a run that already has checkpoints resumes instead,
    but its command usually still names them)."""
    cfg = config_mod.for_stage(cfg, stage)
    check_runtime(cfg.train)
    if "WORLD_SIZE" not in os.environ:
        local_ranks(cfg.train.nproc)  # refuses more ranks than GPUs
    store = open_store(cfg.store_url)
    check_text_conditioning(cfg, store)
    built = stage_for(cfg, stage, store)  # refuses an unsuitable store
    public = find_public(init_from, stage) if init_from else None
    if public:
        built.check_public(public)
    return cfg


def check_text_conditioning(cfg: Config, store: Store) -> None:
    """The text conditioning the config asks for (`encoders.clip.text_layer`, `text_padding`) is
    the one the store's text columns were embedded with: a stage trained on another would be
    sampled with text states unlike the ones it learnt from."""
    recorded = {**RECORDED_BEFORE, **store.manifest["encoders"]["clip"]}
    for key in RECORDED_BEFORE:
        wanted = getattr(cfg.encoders.clip, key)
        if recorded[key] != wanted:
            raise StoreError(
                f"store '{store.url}': manifest field 'encoders.clip.{key}' is {recorded[key]!r}, but "
                f"encoders.clip.{key} is {wanted!r}: embed a store with it, or train with the store's"
            )


def config_url(cfg: Config, stage: str) -> str:
    """Where `unclip launch` writes the configuration every rank of a multi-node run reads."""
    return storage.join(cfg.run_url(stage), "launch.yaml")


def train_local(
    cfg: Config, stage: str, resume_from: str | None = None, init_from: str | None = None, log=print
) -> dict[str, Any]:
    cfg = check_before_launch(cfg, stage, init_from)
    run_url = cfg.run_url(stage)
    config_yaml = to_yaml(cfg)
    if "WORLD_SIZE" in os.environ:
        return run_rank(cfg, stage, resume_from, init_from, log=log)
    with (
        tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix=f"unclip-{stage}-") as f,
        tempfile.TemporaryDirectory(prefix="unclip-rank-errors-") as errors,
        tempfile.TemporaryDirectory(prefix="unclip-staging-") as staging,
    ):  # removed however the ranks end
        f.write(config_yaml)
        f.flush()
        ranks, threads = local_ranks(cfg.train.nproc)
        threads = int(os.environ.get("OMP_NUM_THREADS", threads))
        command = [
            sys.executable,
            "-m",
            "launch.agent",
            "--standalone",
            f"--nproc_per_node={ranks}",
            f"--shutdown-timeout={cfg.train.preemption_grace_s}",
            *rank_command(stage, f.name, resume_from, init_from),
        ]
        log(f"train {stage}: {ranks} ranks x {threads} threads -> {run_url}")
        env = rank_environment({RANK_ERRORS: errors, STAGING_DIR: staging, "OMP_NUM_THREADS": str(threads)})
        returncode, preempted = run_forwarding_sigterm(command, env, quiet_after=errors)
        return outcome(cfg, stage, returncode, preempted, log, errors)


def rank_command(
    stage: str, config_url: str, resume_from: str | None = None, init_from: str | None = None
) -> list[str]:
    """What every launcher starts once per rank, after its own arguments."""
    return [
        "-m",
        "launch.rank",
        "--stage",
        stage,
        "--config",
        config_url,
        *(["--resume-from", resume_from] if resume_from else []),
        *(["--init-from", init_from] if init_from else []),
    ]


def outcome(
    cfg: Config, stage: str, returncode: int, preempted: bool, log=print, errors: str | None = None
) -> dict[str, Any]:
    """The run's summary, or the preemption checkpoint; RanksFailed when the ranks failed (with
    the one line launch/rank_failures.py makes of what they and the agent left in `errors`)."""
    run_url = cfg.run_url(stage)
    if preempted and returncode != 0:
        # a launcher reports the signal it forwarded as a failure; what matters is the saved state
        latest = read_latest(run_url)
        if latest and read_trainer_state(latest).get("reason") == "preempted":
            log(f"train {stage}: preempted; checkpoint {latest}")
            return {"stage": stage, "preempted": True, "checkpoint": latest}
    if returncode != 0:
        said = summary(stage, errors) if errors else None
        if said:
            raise RanksFailed(*said)
        raise RanksFailed(f"ranks exited with status {returncode} (their output is above)")
    if preempted:
        return {"stage": stage, "preempted": True}
    return storage.read_json(storage.join(run_url, SUMMARY))


def _pass_stderr(stream, quiet_after: str) -> None:
    for line in iter(stream.readline, b""):
        if not os.listdir(quiet_after):
            sys.stderr.buffer.write(line)
            sys.stderr.flush()


def run_forwarding_sigterm(
    command: list[str], env: dict[str, str] | None = None, quiet_after: str | None = None
) -> tuple[int, bool]:
    """Run a launcher (torchrun, deepspeed); SIGTERM to us goes to it, and is reported.

    `quiet_after`: a folder where a failing rank leaves its line; from then on the launcher's and
    the other ranks' stderr (torchrun's failure report, aborted collectives) is not repeated,
    because the line says what happened. Before that, stderr passes through as it comes."""
    proc = subprocess.Popen(command, env=env or rank_environment(), stderr=subprocess.PIPE if quiet_after else None)
    passing = (
        threading.Thread(target=_pass_stderr, args=(proc.stderr, quiet_after), daemon=True) if quiet_after else None
    )
    if passing:
        passing.start()
    got: list[int] = []

    def forward(signum, frame) -> None:
        got.append(signum)
        proc.send_signal(signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        returncode = proc.wait()
        if passing:
            passing.join(timeout=10)  # what the launcher wrote last is not lost
        return returncode, bool(got)
    finally:
        signal.signal(signal.SIGTERM, previous)
