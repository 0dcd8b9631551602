"""Shared fixtures: the real services tests run against (S3 on loopback, a local Ray)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Set before any test imports Ray, torch or img2dataset; every process a test starts inherits it.
os.environ.update(
    {
        "NO_ALBUMENTATIONS_UPDATE": "1",
        "HF_HUB_OFFLINE": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "disabled",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
)
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))


# What the S3 clients of the tests' local Ray and ranks wait through: short, so that a stall the
# fault proxy injects costs a second (its stall outlasts the read timeout by a second). With a
# tenth of requests failing, the default five tries leave one request in 10^5 failing every time
# (a fault run makes a few hundred); each try more would add up to 16 s to every outage test.
FAULT_TIMEOUT_S = 1.0
FAULT_ATTEMPTS = 5
FAULT_SETTINGS = [
    f"storage.read_timeout_s={FAULT_TIMEOUT_S}",
    f"storage.connect_timeout_s={FAULT_TIMEOUT_S}",
    f"storage.attempts={FAULT_ATTEMPTS}",
]


@pytest.fixture(scope="session")
def fault_proxy():
    """moto's S3 server on 127.0.0.1 behind a fault-injecting proxy (passing everything through
    until a test sets a schedule), with credentials and the proxy's endpoint in the environment."""
    import boto3
    from moto.server import ThreadedMotoServer

    from tests.support.faultproxy import FaultProxy

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    _, port = server.get_host_and_port()
    proxy = FaultProxy(f"http://127.0.0.1:{port}", stall_s=FAULT_TIMEOUT_S + 1)
    saved = {
        k: os.environ.get(k)
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")
    }
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=proxy.endpoint,
    )
    boto3.client("s3").create_bucket(Bucket="unclip-test")
    yield proxy
    proxy.stop()
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def s3_endpoint(fault_proxy) -> str:
    return fault_proxy.endpoint


@pytest.fixture
def faults(fault_proxy):
    """The proxy, handed back passing everything whatever the test left it doing."""
    yield fault_proxy
    fault_proxy.schedule(0.0)


@pytest.fixture
def s3_prefix(s3_endpoint) -> str:
    return f"s3://unclip-test/{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def local_ray(s3_endpoint):
    """One local Ray for the whole session (start-up costs seconds); jobs reuse it. It starts
    after the S3 server so its workers inherit the endpoint and credentials."""
    import ray

    from data_pipeline.config import RayConfig
    from data_pipeline.ray_runtime import ray_session
    from models.base import storage

    storage.configure_object_store(FAULT_ATTEMPTS, FAULT_TIMEOUT_S, FAULT_TIMEOUT_S)  # its workers keep these
    with ray_session(RayConfig(num_cpus=2)):
        yield ray


# The modules that take longest, longest first (as measured under `make test`'s two workers): xdist
# hands each worker two modules at a time in collection order, so a long module drawn last would
# leave one worker running it alone at the end. The rest follow in their usual order.
LONGEST_FIRST = [
    "test_engine.py",
    "test_training_options.py",
    "test_pipeline.py",
    "test_errors.py",
    "test_ingest.py",
    "test_embed.py",
    "test_launch.py",
    "test_secrets.py",
    "test_public_init.py",
    "test_stall.py",
]


@pytest.hookimpl(trylast=True)  # after -m and -k have deselected what does not run
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each module keeps its own order
    start_cpu_adam_build(items)


# DeepSpeed compiles its CPU Adam (ZeRO-Offload's optimizer) on first use: two minutes of both
# cores on a fresh machine, inside whichever test first offloads, on one of the two workers. Built
# from the start instead, it shares the cores with the suite's first minutes (which leave them idle
# a third of the time); the test then finds it built, or waits on the build's lock. At low
# priority it would starve, and the test would wait on it all the same (111 s measured).
_extension_build: subprocess.Popen | None = None


def start_cpu_adam_build(items: list[pytest.Item]) -> None:
    global _extension_build
    offloading = any("offload" in item.nodeid for item in items)
    built = os.path.exists(os.path.join(os.environ["TORCH_EXTENSIONS_DIR"], "cpu_adam", "cpu_adam.so"))
    if not offloading or built or os.environ.get("PYTEST_XDIST_WORKER", "gw0") != "gw0":  # one worker starts it
        return
    from launch.environment import rank_environment  # the accelerator the ranks get, so the build is the one they load

    build = (
        "from deepspeed.accelerator import get_accelerator; "
        "get_accelerator().create_op_builder('CPUAdamBuilder').load()"
    )
    _extension_build = subprocess.Popen(
        [sys.executable, "-c", build], env=rank_environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def pytest_unconfigure(config: pytest.Config) -> None:
    if _extension_build is not None:
        _extension_build.wait()  # not left running after the session (its lock is the OS's: a kill would be harmless)
