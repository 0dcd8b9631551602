"""The one line a training launch that lost a rank ends with (launch/rank_failures.py), from what
the ranks and torchrun's agent leave; the real runs are in tests/test_engine.py."""

from __future__ import annotations

import json
import socket
import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from launch import agent
from launch.rank_failures import LOST_PEER, RANK_ERRORS, failures_of, lost_peer, write_agent_failures
from launch.rank_failures import summary as summary_or_none

GLOO = "[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:41234"


def child_failed(**exits: int) -> ChildFailedError:
    """torchrun's error for ranks that exited with these codes (rank_1=-9: SIGKILL), no error files."""
    failures = {
        int(name.split("_")[1]): ProcessFailure(
            local_rank=int(name.split("_")[1]), pid=4242, exitcode=code, error_file=""
        )
        for name, code in exits.items()
    }
    return ChildFailedError("launch.rank", failures)


def summary(stage: str, folder: str) -> tuple[str, int]:
    said = summary_or_none(stage, folder)
    assert said is not None
    return said


def rank_line(folder, rank: int, message: str, exit_code: int = 1, **facts) -> None:
    (folder / f"rank-{rank:05d}.json").write_text(
        json.dumps({"message": message, "exit_code": exit_code, "rank": rank, "host": "node-a", **facts})
    )


def lost(folder, rank: int) -> None:
    peer = lost_peer(GLOO)
    rank_line(folder, rank, f"train ldm: rank {rank} on node-a lost its peer ({peer}): ...", kind=LOST_PEER, peer=peer)


def test_a_lost_peer_is_read_from_the_collectives_error():
    assert lost_peer(GLOO) == "connection closed by peer [127.0.0.1]:41234"
    assert lost_peer("Read error [10.0.0.2]:5555: Connection reset by peer") == "connection reset by peer"
    assert lost_peer("Timed out waiting 5000ms for recv operation to complete") is None


def test_the_killed_rank_is_named_before_the_peer_that_lost_it(tmp_path):
    write_agent_failures(str(tmp_path), failures_of(child_failed(rank_1=-9)))
    lost(tmp_path, 0)
    line, code = summary("ldm", str(tmp_path))
    assert code == 1
    assert line.startswith(
        f"train ldm: rank 1 (local rank 1, pid 4242) on {socket.gethostname()} was killed (SIGKILL); "
        "rank 0 on node-a then lost its peer (connection closed by peer [127.0.0.1]:41234); "
        "the newest checkpoint is kept"
    ), line


def test_a_ranks_own_reason_then_a_silent_exit_then_a_lost_peer(tmp_path):
    rank_line(tmp_path, 1, "train ldm: storage unavailable: ...", exit_code=1)
    lost(tmp_path, 0)
    write_agent_failures(str(tmp_path), failures_of(child_failed(rank_0=3, rank_1=2)))
    assert summary("ldm", str(tmp_path)) == ("train ldm: storage unavailable: ...", 1)

    (tmp_path / "rank-00001.json").unlink()  # rank 1 died of an exception of its own: traceback above
    line, _ = summary("ldm", str(tmp_path))
    assert line.startswith("train ldm: rank 1 (local rank 1, pid 4242) on ") and "exited with status 2" in line

    for name in tmp_path.iterdir():  # the node that is left: only its rank's lost peer to tell
        name.unlink()
    lost(tmp_path, 0)
    write_agent_failures(str(tmp_path), failures_of(child_failed(rank_0=3)))
    assert summary("ldm", str(tmp_path))[0].startswith("train ldm: rank 0 on node-a lost its peer (connection closed")
    assert summary_or_none("ldm", str(tmp_path / "none")) is None


def test_the_agent_started_by_hand_says_the_line_itself(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(RANK_ERRORS, raising=False)
    monkeypatch.setattr(sys, "argv", ["launch.agent", "--nproc-per-node=2", "-m", "launch.rank", "--stage", "prior"])
    assert agent.failed(child_failed(rank_1=-9)) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: train prior: rank 1 (local rank 1, pid 4242) on ") and "killed (SIGKILL)" in err
    monkeypatch.setenv(RANK_ERRORS, str(tmp_path))  # started by `unclip`: the agent leaves its facts instead
    assert agent.failed(child_failed(rank_1=-9)) == 1 and capsys.readouterr().err == ""
    assert summary("prior", str(tmp_path))[0].endswith(
        "the newest checkpoint is kept: rerun the same command to resume from it"
    )
