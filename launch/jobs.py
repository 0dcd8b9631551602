"""`unclip launch ingest|embed|status|stop`: data jobs on a Ray cluster, through the Ray Jobs API.

The configuration is resolved and validated here, before anything is submitted, then written to
`ROOT/jobs/<job id>.yaml`; the job's entrypoint is `unclip <command> --config <that URL>`, run by
the cluster's own Python (the image built from infra/Dockerfile), and its tasks join the cluster
the job runs on (`ray.address=auto`). `root` must therefore be storage the cluster can read.
"""

from __future__ import annotations

import os
import secrets
import shlex
import time
from typing import Any

from ray.job_submission import JobSubmissionClient

from data_pipeline.ray_runtime import forwarded_env, masked
from launch.config import Config
from models.base import storage
from models.base.configlib import ConfigError, replace, to_yaml

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def jobs_address(cfg: Config) -> str:
    address = cfg.launch.address or os.environ.get("RAY_API_SERVER_ADDRESS")
    if not address:
        raise ConfigError(
            "config key 'launch.address': the Ray Jobs API of the cluster is needed (--address http://HEAD:8265)"
        )
    return address if "://" in address else f"http://{address}"


def _client(cfg: Config):
    address = jobs_address(cfg)
    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError) as err:
        raise ConfigError(f"config key 'launch.address': no Ray Jobs API answers at {address} ({err})") from None


def runtime_env(cfg: Config) -> dict[str, Any]:
    env: dict[str, Any] = {"env_vars": forwarded_env(cfg.ray.forward_env)}
    if cfg.launch.working_dir:
        if not os.path.isdir(cfg.launch.working_dir):
            raise ConfigError(f"config key 'launch.working_dir': '{cfg.launch.working_dir}' is not a folder")
        env["working_dir"] = cfg.launch.working_dir
    if cfg.launch.pip:
        env["pip"] = list(cfg.launch.pip)
    return env


def submit(cfg: Config, command: str, wait: bool = False, dry_run: bool = False, log=print) -> dict[str, Any]:
    job_id = f"unclip-{command}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    config_url = storage.join(cfg.root, "jobs", f"{job_id}.yaml")
    entrypoint = f"unclip {command} --config {shlex.quote(config_url)}"
    job_cfg = replace(cfg, **{"ray.address": "auto"})
    if dry_run:
        env = runtime_env(cfg)
        shown = {**env, "env_vars": masked(env["env_vars"])}
        log(f"# Ray Jobs API {jobs_address(cfg)}: job {job_id}\n# runtime env {shown}\n{entrypoint}")
        log(f"# {config_url} (written at submission):\n{to_yaml(job_cfg)}")
        return {"job_id": job_id, "entrypoint": entrypoint}
    client = _client(cfg)
    storage.write_text(config_url, to_yaml(job_cfg))
    _submit_when_ready(
        client,
        entrypoint=entrypoint,
        submission_id=job_id,
        runtime_env=runtime_env(cfg),
        metadata={"unclip_command": command, "config": config_url},
    )
    log(f"submitted {job_id}: {entrypoint}")
    log(f"follow it: unclip launch status {job_id} launch.address={jobs_address(cfg)}")
    result = {"job_id": job_id, "entrypoint": entrypoint, "config": config_url}
    if wait:
        result["status"] = follow(client, job_id, log)
    return result


def _submit_when_ready(client, wait_s: float = 120.0, **job: Any) -> None:
    """A head that just started answers 'No available agent to submit job, please try again later'
    until its job agent is up; try again for a while before giving up."""
    deadline = time.time() + wait_s
    while True:
        try:
            client.submit_job(**job)
            return
        except RuntimeError as err:
            if "try again later" not in str(err) or time.time() > deadline:
                raise
            time.sleep(2)


def follow(client, job_id: str, log=print, poll_s: float = 2.0) -> str:
    """Print the job's log as it grows; return its final status."""
    printed = 0
    while True:
        status = str(client.get_job_status(job_id).value)
        logs = client.get_job_logs(job_id)
        if len(logs) > printed:
            log(logs[printed:].rstrip("\n"))
            printed = len(logs)
        if status in TERMINAL:
            info = client.get_job_info(job_id)
            log(f"job {job_id}: {status}{f' ({info.message})' if info.message else ''}")
            return status
        time.sleep(poll_s)


def status(cfg: Config, job_id: str, log=print) -> str:
    client = _client(cfg)
    try:
        info = client.get_job_info(job_id)
    except RuntimeError as err:
        raise ConfigError(f"job '{job_id}': not known to {jobs_address(cfg)} ({str(err).splitlines()[0]})") from None
    log(f"job {job_id}: {info.status.value}; {info.entrypoint}")
    if info.message:
        log(f"  {info.message}")
    return str(info.status.value)


def stop(cfg: Config, job_id: str, log=print) -> bool:
    stopped = _client(cfg).stop_job(job_id)
    log(f"job {job_id}: {'stop requested' if stopped else 'already finished'}")
    return stopped
