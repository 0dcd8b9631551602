"""Waiting on a data job's Ray work: a progress line while nothing comes back, and one line
(Stalled, a JobFailed: exit 1, what was committed kept) when what the job waits for can no longer
be scheduled.

Ray keeps a task that no node can run pending for ever (an autoscaler might yet add a node), and
Ray's `wait` cannot tell it from a task that runs slowly. The cluster can: the alive nodes'
resources (Ray's `nodes()`, from the GCS; Ray's state API would need the dashboard, which a local
Ray here runs without) less what this job's own actors hold, against what one waiting task asks
for. When no node could start even one of them, none of them is running; when the cluster has not
that much free either, and that lasts `ray.stall_timeout_s` with nothing coming back, the job
stops. Work waiting on resources that another job holds is not a stall (it goes on once that job
is done); the progress lines say what is free.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
from ray import ObjectRef

from data_pipeline.ray_runtime import stall_timeout_s
from models.base.errors import JobFailed

MAX_POLL_S = 5.0  # between looks at the cluster while nothing comes back (each is two GCS calls)
_OPTION = {"CPU": "num_cpus", "GPU": "num_gpus", "memory": "memory"}


class Stalled(JobFailed):
    """Work that no node of the cluster can run waited longer than `ray.stall_timeout_s`."""


@dataclass(frozen=True)
class Need:
    """What one task or actor of a kind asks Ray for: CPU, GPU, memory (bytes), custom resources."""

    what: str  # "shard task", "encoder actor": as the lines name them
    resources: dict[str, float] = field(default_factory=dict)

    def options(self) -> dict[str, Any]:
        """The request as options of Ray's `remote`: what runs asks for exactly what is checked."""
        out: dict[str, Any] = {_OPTION[k]: v for k, v in self.resources.items() if k in _OPTION}
        custom = {k: v for k, v in self.resources.items() if k not in _OPTION}
        return {**out, "resources": custom} if custom else out

    def wanted(self) -> dict[str, float]:
        return {k: v for k, v in self.resources.items() if v > 0}


class Waiter:
    """Waits on one job's results, a few at a time (see the module's docstring).

    `progress`: the job's progress line (done/total), said every `progress_every_s` while nothing
    comes back, and by `report_if_due` between results; `kept`: what a stop keeps and how to go on;
    `actors`: this job's actors, with how many of each, whose resources its tasks cannot have."""

    def __init__(
        self,
        job: str,
        log: Callable[[str], None],
        progress: Callable[[], str],
        kept: Callable[[], str],
        progress_every_s: float,
        actors: Sequence[tuple[Need, int]] = (),
        stall_timeout: float | None = None,
    ) -> None:
        self.job, self.log, self.progress, self.kept = job, log, progress, kept
        self.progress_every_s = progress_every_s
        self.actors = [(need, count) for need, count in actors if count > 0]
        self.stall_timeout = stall_timeout if stall_timeout is not None else stall_timeout_s()
        self.last_line = time.monotonic()
        self.blocked_since: float | None = None

    def wait(self, refs: Collection[ObjectRef[Any]], need: Need | None, queued: int = 0) -> list[ObjectRef[Any]]:
        """Block until one of `refs` is ready; returns the ready ones. `need`: what each of them asks
        for (None: they are calls to this job's actors); `queued`: more like them not yet submitted."""
        poll = min(MAX_POLL_S, self.progress_every_s, self.stall_timeout / 5)
        while True:
            ready, _ = ray.wait(list(refs), num_returns=1, timeout=poll)
            if ready:
                self.blocked_since = None
                return ready
            now = time.monotonic()
            blocked = self.blocked(need, len(refs) + queued)
            if blocked is None:
                self.blocked_since = None
            elif self.blocked_since is None:
                self.blocked_since = now
            elif now - self.blocked_since >= self.stall_timeout:
                raise Stalled(
                    f"{self.job}: {blocked[0]}, and for {self.stall_timeout:g} s (ray.stall_timeout_s) no node could "
                    f"start one: {blocked[1]}; {self.kept()}"
                )
            if now - self.last_line >= self.progress_every_s:
                self.report(self._waiting(need, len(refs)))

    def report(self, detail: str = "") -> None:
        self.log(self.progress() + detail)
        self.last_line = time.monotonic()

    def report_if_due(self) -> None:
        if time.monotonic() - self.last_line >= self.progress_every_s:
            self.report()

    def blocked(self, need: Need | None, count: int) -> tuple[str, str] | None:
        """(what waits, why no node can run it) when this job's actors, or else one of `count`
        tasks asking for `need`, fit no alive node; None when one could be running."""
        nodes = [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
        totals = _sum(nodes)
        free = ray.available_resources()
        held: dict[str, float] = {}
        for actor, number in self.actors:  # placed first-fit, as they came first
            for placed in range(number):
                node = next((r for r in nodes if _fits(r, actor.wanted())), None)
                if node is None:
                    if _fits(free, actor.wanted()):
                        break  # placed differently from our guess: Ray finds it room
                    return _head(actor, number - placed), _why(actor, nodes, totals, held, actor.what)
                for k, v in actor.wanted().items():
                    node[k] -= v
                    held[k] = held.get(k, 0.0) + v
        if need is None or any(_fits(r, need.wanted()) for r in nodes) or _fits(free, need.wanted()):
            return None
        return _head(need, count), _why(need, nodes, totals, held, self._holders())

    def _holders(self) -> str:
        return " and ".join(_plural(count, need.what) for need, count in self.actors)

    def _waiting(self, need: Need | None, count: int) -> str:
        if need is None:
            return f"; waiting on this job's {self._holders() or 'actors'}"
        totals, free = ray.cluster_resources(), ray.available_resources()
        now = ", ".join(
            f"{_number(free.get(k, 0.0) / (2**30 if k == 'memory' else 1))} of {_amount(k, totals.get(k, 0.0))}"
            for k in need.wanted()
        )
        return f"; {_plural(count, need.what)} in flight, free now: {now}"


def _fits(room: Mapping[str, float], wanted: Mapping[str, float]) -> bool:
    return all(room.get(k, 0.0) >= v for k, v in wanted.items())


def _sum(nodes: list[dict[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for resources in nodes:
        for k, v in resources.items():
            out[k] = out.get(k, 0.0) + v
    return out


def _head(need: Need, count: int) -> str:
    asked = " and ".join(_amount(k, v) for k, v in need.wanted().items())
    return f"{_plural(count, need.what)} need{'s' if count == 1 else ''} {asked} {'each' if count > 1 else ''}".rstrip()


def _why(
    need: Need, nodes: list[dict[str, float]], totals: dict[str, float], held: dict[str, float], holders: str
) -> str:
    """Which resource no node has enough of for `need`, and where the cluster's went."""
    alive = f"the cluster ({_plural(len(nodes), 'node')} alive)"
    reasons = []
    for k, v in need.wanted().items():
        most = max((r.get(k, 0.0) for r in nodes), default=0.0)
        if most >= v:
            continue
        total = totals.get(k, 0.0)
        if total <= 0:
            reasons.append(f"{alive} has no {_noun(k)}")
        elif held.get(k, 0.0) > 0:
            reasons.append(f"{alive} has {_amount(k, total)}, {_amount(k, held[k])} of it held by this job's {holders}")
        elif total < v:
            reasons.append(f"{alive} has {_amount(k, total)} in all")
        else:
            reasons.append(f"{alive} has {_amount(k, total)}, but no node more than {_amount(k, most)}")
    return "; ".join(reasons) or f"{alive} cannot place it"


def _number(x: float) -> str:
    return f"{x:,.2f}".rstrip("0").rstrip(".")


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _noun(resource: str) -> str:
    return {"CPU": "CPUs", "GPU": "GPUs", "memory": "memory"}.get(resource, resource)


def _amount(resource: str, value: float) -> str:
    """1 CPU, 2 CPUs, 0.5 GiB of memory, 4 x accelerator_type:A100."""
    if resource == "memory":
        return f"{_number(value / 2**30)} GiB of memory"
    if resource in ("CPU", "GPU"):
        return f"{_number(value)} {resource if value == 1 else _noun(resource)}"
    return f"{_number(value)} x {resource}"
