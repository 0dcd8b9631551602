"""The cases of tests/test_stall.py that need a Ray of one CPU, in a process of their own (a process
joins one Ray, and the test session's has two CPUs): `python -m tests.support.stall_cases FOLDER` prints one
JSON line per case."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import ray

from data_pipeline import tasks
from data_pipeline.config import RayConfig
from data_pipeline.ray_runtime import ray_session
from data_pipeline.ray_wait import Need, Stalled, Waiter
from models.base.process import exit_now

ONE_CPU = Need("shard task", {"CPU": 1})


def nap(seconds: float) -> dict:
    time.sleep(seconds)
    return {}


def outcome(case: str, run, lines: list[str]) -> None:
    started = time.monotonic()
    try:
        run(lines)
        result = {"stalled": None}
    except Stalled as err:
        result = {"stalled": str(err), "exit_code": err.exit_code}
    print(json.dumps({"case": case, **result, "after_s": time.monotonic() - started, "lines": lines}), flush=True)


def slow_tasks(lines: list[str]) -> None:
    """Two tasks of 3 s on the one CPU, the second queued behind the first: slow, not stalled."""
    refs = [ray.remote(**ONE_CPU.options())(nap).remote(3) for _ in range(2)]
    waiter = Waiter("embed", lines.append, lambda: "embed: slow", lambda: "kept", progress_every_s=1)
    while refs:
        ready = waiter.wait(refs, ONE_CPU)
        refs = [r for r in refs if r != ready[0]]


def actor_holds_the_cpu(lines: list[str]) -> None:
    """An actor holds the one CPU (an encoder after its node's twin was lost); a task waits for a CPU."""
    holder_need = Need("encoder actor", {"CPU": 1})
    holder: Any = ray.remote(**holder_need.options())(Holder).remote()  # an ActorHandle, whatever ray's stubs say
    ray.get(holder.ready.remote())
    stuck = ray.remote(**ONE_CPU.options())(nap).remote(0)
    waiter = Waiter(
        "embed",
        lines.append,
        lambda: "embed: 0/1 parts written",
        lambda: "the parts written are kept",
        progress_every_s=1,
        actors=[(holder_need, 1)],
    )
    try:
        waiter.wait([stuck], ONE_CPU)
    finally:
        ray.cancel(stuck, force=True)
        ray.kill(holder)


def step_wider_than_the_cluster(folder: str, lines: list[str]) -> None:
    """An ingest step whose tasks ask for two CPUs of a one-CPU cluster (tasks.run_stage)."""
    tasks.run_stage("plan: scan", folder, nap, lambda i: (0,), 1, lines.append, progress_every_s=1, num_cpus=2)


class Holder:
    def ready(self) -> bool:
        return True


def main(folder: str) -> None:
    with ray_session(RayConfig(num_cpus=1, stall_timeout_s=3)):
        for case, run in (
            ("slow", slow_tasks),
            ("actor", actor_holds_the_cpu),
            ("step", lambda lines: step_wider_than_the_cluster(folder, lines)),
        ):
            outcome(case, run, [])


if __name__ == "__main__":
    main(sys.argv[1])
    exit_now(0)
