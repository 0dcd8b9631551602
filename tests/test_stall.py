"""Data jobs whose remaining work the cluster can no longer schedule stop in one line, after
`ray.stall_timeout_s`, with what they committed kept; slow work that runs is not a stall
(data_pipeline/ray_wait.py). Real local Rays: one of one CPU (tests/support/stall_cases.py, a process of its
own) and `unclip embed`'s own."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from data_pipeline import synthetic
from data_pipeline.config import SyntheticConfig
from launch import cli, config
from models.base.configlib import ConfigError
from models.encoders import write_tiny_encoders

REPO = Path(__file__).resolve().parents[1]


def test_the_stall_settings_are_checked():
    for key in ("ray.stall_timeout_s", "embed.progress_every_s"):
        with pytest.raises(ConfigError, match=rf"config key '{key}': expected a number > 0, got 0"):
            config.load(None, [f"{key}=0"])
    assert config.load(None, []).ray.stall_timeout_s == 300  # at most 5 minutes unless asked


@pytest.mark.slow
def test_work_that_cannot_be_scheduled_stops_and_slow_work_does_not(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "tests.support.stall_cases", str(tmp_path / "scan")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    cases = {c["case"]: c for c in map(json.loads, done.stdout.splitlines())}

    slow = cases["slow"]  # two 3 s tasks on the one CPU, the second behind the first: 6 s > 3 s
    assert slow["stalled"] is None and slow["after_s"] >= 5.5, slow
    assert "embed: slow; 2 shard tasks in flight, free now: 0 of 1 CPU" in slow["lines"], slow["lines"]

    actor = cases["actor"]  # an encoder actor holds the one CPU; a shard task waits for one
    assert actor["stalled"] == (
        "embed: 1 shard task needs 1 CPU, and for 3 s (ray.stall_timeout_s) no node could start one: the cluster "
        "(1 node alive) has 1 CPU, 1 CPU of it held by this job's 1 encoder actor; the parts written are kept"
    )
    assert actor["exit_code"] == 1 and 3 <= actor["after_s"] < 30, actor
    assert "embed: 0/1 parts written; 1 shard task in flight, free now: 0 of 1 CPU" in actor["lines"], actor["lines"]

    step = cases["step"]  # an ingest step's tasks ask for 2 CPUs; the session's ray.stall_timeout_s=3 applies
    assert step["stalled"] == (
        "ingest: plan: scan: 1 task needs 2 CPUs, and for 3 s (ray.stall_timeout_s) no node could start one: the "
        "cluster (1 node alive) has 1 CPU in all; what the tasks committed is kept: rerun `unclip ingest` once the "
        "cluster can run the rest"
    )


@pytest.mark.slow
def test_embed_whose_tasks_no_node_can_run_stops_in_one_line(tmp_path, local_ray, capsys):
    """The shard tasks ask for more memory than any node has (as after the nodes that had it were
    lost): `unclip embed` (in this process, on the session's Ray of 2 CPUs) says what waits for
    what, then stops with exit 1."""
    site, wds = tmp_path / "site", str(tmp_path / "wds")
    records = synthetic.generate(str(site), SyntheticConfig(count=16, broken=False, seed=3))
    synthetic.write_shards(records, str(site), wds, 8)
    args = [
        f"root={tmp_path}",
        f"embed.input={wds}",
        "embed.batch_size=4",
        f"encoders.clip.model=local-dir:{tmp_path}/encoders/clip",
        f"encoders.vae.path={tmp_path}/encoders/vae",
        "ray.stall_timeout_s=5",
        "embed.decode_memory_gb=1000000",
        "embed.progress_every_s=1",
    ]
    write_tiny_encoders(config.load(None, args).encoders)
    assert cli.main(["embed", *args]) == 1
    out, err = capsys.readouterr()
    last = err.strip().splitlines()[-1]
    assert last.startswith(
        "unclip embed: error: embed: 2 shard tasks need 1 CPU and 1,000,000 GiB of memory each, and for 5 s "
        "(ray.stall_timeout_s) no node could start one: the cluster (1 node alive) has "
    ), last
    assert last.endswith(
        " GiB of memory in all; the 0 parts written in this run and those before it are kept: rerun `unclip embed` "
        "once the cluster can run them"
    ), last
    assert "embed: 0/2 parts written; 2 shard tasks in flight, free now: " in out, out
