"""Joining a Ray cluster, or starting a local one, the same way for every data job."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
from collections.abc import Iterator
from typing import Any

import ray

from data_pipeline.config import RayConfig
from models.base import storage

# Environment every Ray worker needs: img2dataset's albumentations calls out at import without
# the first; the second keeps open_clip/diffusers from trying a model hub the cluster may lack.
WORKER_ENV = {"NO_ALBUMENTATIONS_UPDATE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
# Settings (never secrets) that workers and submitted jobs need to reach the same storage as this process.
SETTINGS = ("HF_HUB_OFFLINE", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", *storage.S3_SETTINGS_ENV)
# Anything whose value is a secret by its name: never printed, logged or written by us.
SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|(^|_)KEY($|_)|API_?KEY|ACCESS_KEY", re.I)
_warned: set[str] = set()
# `ray.stall_timeout_s` of the session this process is in (innermost last: sessions nest, a job's
# inside a test's): a setting of the session, so that every step that waits on Ray inside it
# (data_pipeline/ray_wait.py) uses it without each step being handed it.
_stall_timeout_s = [RayConfig().stall_timeout_s]


def stall_timeout_s() -> float:
    """How long work that no node can run may wait before the job stops (`ray.stall_timeout_s`)."""
    return _stall_timeout_s[-1]


def forwarded_env(names: tuple[str, ...] | list[str] = ()) -> dict[str, str]:
    """WORKER_ENV (as set here, or its defaults), whichever SETTINGS are set, and the variables
    `names` (`ray.forward_env`) asks for.

    Credentials go only where `names` sends them: a cluster should use its own identity
    (infra/README.md). Ray has no secret variables (ray-project/ray#39502; the `secret_env_vars`
    pull request #40549 was closed unmerged): what a runtime env carries, its dashboard shows."""
    wanted = [n for n in names if n in os.environ and n not in _warned]
    if wanted:
        _warned.update(wanted)
        print(
            f"unclip: ray.forward_env sends {', '.join(wanted)} to the cluster in the clear: anyone who can reach its "
            "dashboard can read them (Ray has no secret variables); prefer the cluster's own identity "
            "(infra/README.md)",
            file=sys.stderr,
            flush=True,
        )
    return {**WORKER_ENV, **{k: os.environ[k] for k in (*WORKER_ENV, *SETTINGS, *names) if k in os.environ}}


def masked(env: dict[str, Any]) -> dict[str, Any]:
    """`env` for printing: the value of every variable whose name says it is a secret becomes ***."""
    return {k: "***" if SECRET_NAME.search(k) else v for k, v in env.items()}


@contextlib.contextmanager
def ray_session(cfg: RayConfig) -> Iterator[str | None]:
    """Yield the dashboard URL (or None) of a connected Ray; shut down only what we started."""
    _stall_timeout_s.append(cfg.stall_timeout_s)
    try:
        with _connected(cfg) as dashboard:
            yield dashboard
    finally:
        _stall_timeout_s.pop()


@contextlib.contextmanager
def _connected(cfg: RayConfig) -> Iterator[str | None]:
    if ray.is_initialized():
        yield None
        return
    for key, value in WORKER_ENV.items():
        os.environ.setdefault(key, value)
    # a local Ray's workers inherit this process's environment: nothing secret travels in its runtime env
    env_vars = forwarded_env(cfg.forward_env if cfg.address else ())
    # Inside a Ray job (`unclip launch ingest`, a RayJob) Ray refuses a driver runtime env that
    # sets a variable the job's own runtime env sets too: add only what the job lacks.
    job_env = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("runtime_env") or {}
    env_vars = {k: v for k, v in env_vars.items() if k not in (job_env.get("env_vars") or {})}
    if cfg.address:
        context = ray.init(
            address=cfg.address, runtime_env={"env_vars": env_vars} if env_vars else None, log_to_driver=False
        )
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        context = ray.init(
            num_cpus=cfg.num_cpus,
            include_dashboard=cfg.dashboard,
            _node_ip_address="127.0.0.1",
            runtime_env={"env_vars": env_vars},
            log_to_driver=False,
            configure_logging=True,
            logging_level=logging.WARNING,
        )
    dashboard = getattr(context, "dashboard_url", None) or None
    try:
        yield f"http://{dashboard}" if dashboard and not dashboard.startswith("http") else dashboard
    finally:
        ray.shutdown()
