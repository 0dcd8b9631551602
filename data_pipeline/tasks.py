"""One step of a data job as idempotent Ray tasks that commit what they return: a killed job resumes.

Task i commits its output files, then, last, `FOLDER/NNNNN.json` holding what it returned (the
marker). A rerun lists FOLDER once, reads the markers it finds (in parallel) instead of running
their tasks again, and runs only the rest. What a task returns reaches the driver, so it must stay
small: counts and file names, never rows.

Plain Ray tasks rather than Ray Data: the unit of work and of resume is a file we name, and each
step needs every result of the step before it (a barrier), which Ray Data's streaming
execution does not give.
"""

from __future__ import annotations

import collections
import re
import resource
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray
import ray.exceptions

from data_pipeline import ray_wait
from models.base import storage

PEAK_RSS = "peak_rss_bytes"  # every marker carries its worker's peak resident memory
READ_THREADS = 16


def marker(folder: str, index: int) -> str:
    return storage.join(folder, f"{index:05d}.json")


def run_and_mark(fn: Callable[..., dict[str, Any]], marker_url: str, *args: Any) -> dict[str, Any]:
    """The body of every task: run, then commit the result as the marker."""
    result = dict(fn(*args))
    # ru_maxrss is this worker's peak so far: an upper bound on this task's, exact for the largest
    result[PEAK_RSS] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    storage.write_json(marker_url, result)
    return result


def committed(folder: str) -> dict[int, dict[str, Any]]:
    """index -> result of every task already committed under `folder` (one listing)."""
    ids = [int(m.group(1)) for n in storage.listdir(folder) if (m := re.fullmatch(r"(\d+)\.json", n))]
    with ThreadPoolExecutor(READ_THREADS) as pool:
        return dict(zip(ids, pool.map(lambda i: storage.read_json(marker(folder, i)), ids), strict=True))


def run_stage(
    name: str,
    folder: str,
    fn: Callable[..., dict[str, Any]],
    args: Callable[[int], tuple],
    count: int,
    log: Callable[[str], None],
    progress_every_s: float = 5.0,
    num_cpus: float = 1,
) -> dict[int, dict[str, Any]]:
    """Run fn(*args(i)) for i in range(count) as Ray tasks, skipping committed ones; returns
    every task's result by index. A task's own exception is raised here as it was raised there."""
    done = committed(folder)
    done = {i: r for i, r in done.items() if i < count}
    todo = collections.deque(i for i in range(count) if i not in done)
    need = ray_wait.Need("task", {"CPU": num_cpus})
    task = ray.remote(**need.options(), max_retries=2)(run_and_mark)
    limit = max(2, 2 * int(ray.cluster_resources().get("CPU", 1) / num_cpus))
    pending: dict[Any, int] = {}
    waiter = ray_wait.Waiter(
        f"ingest: {name}",
        log,
        progress=lambda: f"ingest: {name}: {len(done)}/{count} done",
        kept=lambda: "what the tasks committed is kept: rerun `unclip ingest` once the cluster can run the rest",
        progress_every_s=progress_every_s,
    )
    if todo:
        log(f"ingest: {name}: {len(todo)} of {count} tasks to run")
    while todo or pending:
        while todo and len(pending) < limit:
            i = todo.popleft()
            pending[task.remote(fn, marker(folder, i), *args(i))] = i
        for ref in waiter.wait(pending, need, queued=len(todo)):
            i = pending.pop(ref)
            try:
                done[i] = ray.get(ref)
            except ray.exceptions.RayTaskError as err:
                raise_cause(err)
        if todo or pending:
            waiter.report_if_due()
    return done


def raise_cause(err: Exception) -> None:
    """Raise a Ray task's own exception as it was raised there (its one-line message intact)."""
    cause = getattr(err, "cause", None)
    raise (cause if isinstance(cause, Exception) else err) from None


def peak_rss(results: dict[int, dict[str, Any]]) -> int:
    return max((r.get(PEAK_RSS, 0) for r in results.values()), default=0)
