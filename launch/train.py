"""`unclip train <stage>` on this machine: validate, then start `train.nproc` ranks with torchrun.

Inside an existing launch (torchrun, deepspeed, srun, Ray set WORLD_SIZE) it trains in-process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from typing import Any

from data_pipeline import storage
from data_pipeline.store import open_store
from launch.config import Config
from launch.configlib import to_yaml


def rank_environment() -> dict[str, str]:
    """Environment every rank gets; one place, so multi-node launchers reuse it."""
    import torch

    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # ranks share the cores; more threads only contend
    env.setdefault("PYTHONUNBUFFERED", "1")
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    return env


def train_local(cfg: Config, stage: str, log=print) -> dict[str, Any]:
    from training.engine import SUMMARY, train
    from training.stages import get_stage

    stage_cls = get_stage(stage)
    stage_cls(cfg, open_store(cfg.store_url))  # refuses an unsuitable store before any rank starts
    run_url = cfg.run_url(stage)
    config_yaml = to_yaml(cfg)
    if "WORLD_SIZE" in os.environ or cfg.train.nproc == 1:
        return train(cfg, stage, config_yaml, log=log)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix=f"unclip-{stage}-") as f:
        f.write(config_yaml)
        f.flush()
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cfg.train.nproc}",
            "-m", "training.main", "--stage", stage, "--config", f.name,
        ]  # fmt: skip
        log(f"train {stage}: {cfg.train.nproc} ranks -> {run_url}")
        result = subprocess.run(command, env=rank_environment())
    if result.returncode != 0:
        raise RuntimeError(f"train {stage}: ranks exited with status {result.returncode} (their output is above)")
    return storage.read_json(storage.join(run_url, SUMMARY))
