"""The `ray` backend of `unclip launch train`: Ray Train's TorchTrainer runs the engine, one worker
per GPU (per process on CPU clusters).

Ray Train places the workers, sets up their process group and, when a worker or its node dies,
restarts the whole group (up to `launch.ray.max_failures` times). It holds none of our state: each
worker runs the same engine a torchrun rank runs, checkpoints go to the run folder, and a restarted
group resumes from its `latest`, so a restart loses at most the steps since the last checkpoint.
"""

from __future__ import annotations

from typing import Any

from data_pipeline.ray_runtime import ray_session
from launch import config as config_mod
from launch.config import Config
from launch.rank import run_rank, skip_unused_imports
from launch.train import RanksFailed, config_url
from models.base import storage
from models.base.configlib import read_yaml
from training.engine import SUMMARY
from training.failures import Preempted


def _settings(cfg: Config, stage: str) -> dict[str, Any]:
    launch = cfg.launch
    return {
        "num_workers": launch.nodes * launch.gpus_per_node,
        "cpus_per_worker": launch.ray.cpus_per_worker,
        "max_failures": launch.ray.max_failures,
        "name": f"unclip-{stage}-{cfg.train.run}",
        "storage_path": launch.ray.storage_path or storage.join(cfg.run_url(stage), "ray"),
        "timeout_s": cfg.train.collective_timeout_s,
    }


def describe(cfg: Config, stage: str, resume_from: str | None, init_from: str | None) -> list[str]:
    """A readable rendering of the trainer `run` builds (for --dry-run)."""
    s = _settings(cfg, stage)
    return [
        "ray.train.torch.TorchTrainer",
        f"workers={s['num_workers']}",
        f"cpus_per_worker={s['cpus_per_worker']}",
        "use_gpu=<cluster has GPUs>",
        f"max_failures={s['max_failures']}",
        f"storage_path={s['storage_path']}",
        f"each worker: launch.rank.run_rank(stage={stage}, config={config_url(cfg, stage)}"
        f"{f', resume_from={resume_from}' if resume_from else ''}{f', init_from={init_from}' if init_from else ''})",
    ]


def _worker(loop_config: dict[str, Any]) -> None:
    """Runs in every Ray Train worker (Ray has set RANK, WORLD_SIZE and the process group), a
    process that is a rank and nothing else."""
    skip_unused_imports()
    cfg = config_mod.from_dict(read_yaml(loop_config["config_url"]))
    try:
        run_rank(
            cfg,
            loop_config["stage"],
            loop_config["resume_from"],
            loop_config["init_from"],
            log=lambda msg: print(msg, flush=True),
        )
    except Preempted as done:
        print(str(done), flush=True)


def run(cfg: Config, stage: str, resume_from: str | None, init_from: str | None, log=print) -> dict[str, Any]:
    import ray  # lazy: Ray Train (seconds to import) for the ray backend only
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    s = _settings(cfg, stage)
    with ray_session(cfg.ray) as dashboard:
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0
        log(
            f"train {stage}: Ray Train, {s['num_workers']} workers{' on GPUs' if use_gpu else ''}"
            f"{f' (dashboard {dashboard})' if dashboard else ''}; up to {s['max_failures']} restarts from latest"
        )
        trainer = TorchTrainer(
            _worker,
            train_loop_config={
                "stage": stage,
                "config_url": config_url(cfg, stage),
                "resume_from": resume_from,
                "init_from": init_from,
            },
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo", timeout_s=s["timeout_s"]),
            scaling_config=ScalingConfig(
                num_workers=s["num_workers"], use_gpu=use_gpu, resources_per_worker={"CPU": s["cpus_per_worker"]}
            ),
            run_config=RunConfig(
                name=s["name"],
                storage_path=s["storage_path"],
                failure_config=FailureConfig(max_failures=s["max_failures"]),
            ),
        )
        try:
            trainer.fit()
        except Exception as err:  # Ray wraps the workers' error; its text names the cause
            raise RanksFailed(f"Ray Train gave up after {s['max_failures']} restarts: {err}") from err
    return storage.read_json(storage.join(cfg.run_url(stage), SUMMARY))
