"""A training launch that lost a rank says so in one line: which rank, on which host, and why.

A rank that knows why it stops (launch/rank.py `report`) leaves its line in the RANK_ERRORS folder.
One that cannot know, killed by a signal (the OOM killer's SIGKILL, a node lost with it), is known
only to torchrun's agent, whose ChildFailedError holds every failed rank's exit code (negative: the
signal); launch/agent.py leaves those beside the ranks' lines. The ranks that were talking to a
killed one report a lost peer, which is an effect: the line names the cause first.

The agent imports it: it imports nothing heavy.
"""

from __future__ import annotations

import json
import os
import re
import socket
from typing import Any

from models.base import storage

RANK_ERRORS = "UNCLIP_RANK_ERRORS"  # a folder where a failing rank leaves its one line for `unclip train`
LOST_PEER = "lost_peer"  # the kind of a rank's line that says its connection to another rank broke
KEPT = "the newest checkpoint is kept: rerun the same command to resume from it"
# gloo's words when the other end of a collective's connection is gone (its host and port follow)
_PEER = re.compile(r"(connection (?:closed|reset) by peer|broken pipe)(?:\s*(\[[^\]\s]+\](?::\d+)?))?", re.I)


def host() -> str:
    return socket.gethostname()


def lost_peer(text: str) -> str | None:
    """'connection closed by peer [10.0.0.2]:41234' when a collective's error says another rank's end
    of the connection went away; None for any other error."""
    found = _PEER.search(text)
    if not found:
        return None
    return found.group(1)[0].lower() + found.group(1)[1:] + (f" {found.group(2)}" if found.group(2) else "")


def write_agent_failures(folder: str, failures: list[dict[str, Any]], error: str | None = None) -> None:
    """What this node's agent knows: every failed rank's exit (see `failures_of`), or why it stopped."""
    with open(os.path.join(folder, f"agent-{host()}-{os.getpid()}.json"), "w") as f:
        f.write(storage.strict_json({"host": host(), "failures": failures, "error": error}))


def failures_of(err: Any) -> list[dict[str, Any]]:
    """The failed ranks of torchrun's ChildFailedError, by global rank, with this node's name."""
    return [
        {
            "rank": rank,
            "local_rank": failure.local_rank,
            "pid": failure.pid,
            "exitcode": failure.exitcode,
            "signal": failure.signal_name() if failure.exitcode < 0 else None,
            "host": host(),
        }
        for rank, failure in sorted(err.failures.items())
    ]


def summary(stage: str, folder: str) -> tuple[str, int] | None:
    """The one line a failed launch ends with, and its exit code, from what the ranks and this node's
    agent left in `folder`; None when they left nothing. Causes come first: a rank killed by a signal,
    then a rank's own reason, then a rank that exited without one (its traceback is above); a lost
    peer is said alone only when nothing here caused it (on a node whose peer node was lost)."""
    if not os.path.isdir(folder):
        return None
    records: dict[str, list[dict[str, Any]]] = {"rank": [], "agent": []}
    for name in sorted(os.listdir(folder)):
        kind = name.split("-", 1)[0]
        if kind in records and name.endswith(".json"):
            with open(os.path.join(folder, name)) as f:
                records[kind].append(json.load(f))
    lost = [r for r in records["rank"] if r.get("kind") == LOST_PEER]
    own = [r for r in records["rank"] if r.get("kind") != LOST_PEER]
    reported = {r["rank"] for r in records["rank"]}
    failures = [f for agent in records["agent"] for f in agent["failures"] if f["rank"] not in reported]
    then = f"; rank {lost[0]['rank']} on {lost[0]['host']} then lost its peer ({lost[0]['peer']})" if lost else ""
    # a SIGTERM a rank dies of is one its preemption handler was not there to take: no better a cause than its own line
    killed = [f for f in failures if f["signal"] and f["signal"] not in ("SIGTERM", "SIGINT")]
    if killed:
        return f"train {stage}: {_ended(killed[0])}{then}; {KEPT}", 1
    if own:
        return own[0]["message"], own[0]["exit_code"]
    if failures:
        return f"train {stage}: {_ended(failures[0])}{then}; {KEPT}", 1
    if lost:
        return lost[0]["message"], lost[0]["exit_code"]
    errors = [(agent["host"], agent["error"]) for agent in records["agent"] if agent["error"]]
    if errors:
        return f"train {stage}: torchrun's agent on {errors[0][0]} stopped: {errors[0][1]}; {KEPT}", 1
    return None


def _ended(failure: dict[str, Any]) -> str:
    who = f"rank {failure['rank']} (local rank {failure['local_rank']}, pid {failure['pid']}) on {failure['host']}"
    if failure["signal"]:
        return f"{who} was killed ({failure['signal']})"
    return f"{who} exited with status {failure['exitcode']} (its output is above)"
