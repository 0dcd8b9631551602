"""Joining a Ray cluster, or starting a local one, the same way for every data job."""

from __future__ import annotations

import contextlib
import json
import os
from typing import Iterator

from data_pipeline.config import RayConfig

# Environment every Ray worker needs: img2dataset's albumentations calls out at import without
# the first; the second keeps open_clip/diffusers from trying a model hub the cluster may lack.
WORKER_ENV = {"NO_ALBUMENTATIONS_UPDATE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
# credentials and endpoints workers (and submitted jobs) need to reach the same storage as this process
FORWARDED = ("HF_HUB_OFFLINE", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
             "AWS_DEFAULT_REGION", "AWS_PROFILE", "GOOGLE_APPLICATION_CREDENTIALS")  # fmt: skip


def forwarded_env() -> dict[str, str]:
    """WORKER_ENV (as set here, or its defaults) and whichever FORWARDED variables are set."""
    return {**WORKER_ENV, **{k: os.environ[k] for k in (*WORKER_ENV, *FORWARDED) if k in os.environ}}


@contextlib.contextmanager
def ray_session(cfg: RayConfig) -> Iterator[str | None]:
    """Yield the dashboard URL (or None) of a connected Ray; shut down only what we started."""
    import ray

    if ray.is_initialized():
        yield None
        return
    for key, value in WORKER_ENV.items():
        os.environ.setdefault(key, value)
    env_vars = forwarded_env()
    # Inside a Ray job (`unclip launch ingest`, a RayJob) Ray refuses a driver runtime env that
    # sets a variable the job's own runtime env sets too: add only what the job lacks.
    job_env = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("runtime_env") or {}
    env_vars = {k: v for k, v in env_vars.items() if k not in (job_env.get("env_vars") or {})}
    if cfg.address:
        context = ray.init(address=cfg.address, runtime_env={"env_vars": env_vars} if env_vars else None, log_to_driver=False)
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        context = ray.init(
            num_cpus=cfg.num_cpus,
            include_dashboard=cfg.dashboard,
            _node_ip_address="127.0.0.1",
            runtime_env={"env_vars": env_vars},
            log_to_driver=False,
            configure_logging=True,
            logging_level="WARNING",
        )
    dashboard = getattr(context, "dashboard_url", None) or None
    try:
        yield f"http://{dashboard}" if dashboard and not dashboard.startswith("http") else dashboard
    finally:
        ray.shutdown()
