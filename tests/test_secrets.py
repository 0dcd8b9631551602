"""Secrets stay secret: canary credentials sit in the environment of every command a user runs;
none of them may reach anything printed, anything written under ROOT, or a Ray job's recorded
runtime env."""

from __future__ import annotations

import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.support.site import serve
from tests.test_launch import ray_head  # noqa: F401 - a fixture

pytestmark = pytest.mark.slow

CANARIES = {
    "AWS_ACCESS_KEY_ID": "AKIACANARYUNCLIP0001",
    "AWS_SECRET_ACCESS_KEY": "canary-secret-unclip-7f3a",
    "AWS_SESSION_TOKEN": "canary-token-unclip-91c2",
    "AWS_PROFILE": "canary-profile-unclip",
    "GOOGLE_APPLICATION_CREDENTIALS": "/canary/unclip-gcp-key.json",
    "HF_TOKEN": "hf_canaryunclip5e1d",
}
SMALL = [
    "prior.layers=2",
    "prior.heads=2",
    "train.batch_size=4",
    "train.steps=2",
    "train.checkpoint_every=2",
    "train.progress_bar=never",
    "train.preview_every=2",
]


def unclip(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **CANARIES}
    result = subprocess.run(
        [sys.executable, "-m", "launch.cli", *args], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, (args, result.stdout[-2000:], result.stderr[-2000:])
    return result


def hits(text: str | bytes, where: str) -> list[str]:
    data = text.encode() if isinstance(text, str) else text
    return [f"{name} in {where}" for name, value in CANARIES.items() if value.encode() in data]


def test_no_credential_reaches_an_output(tmp_path, ray_head):  # noqa: F811
    root = tmp_path / "root"
    found: list[str] = []
    with serve() as site:
        rows = [{"url": f"{site}/ok/{i}.png", "caption": f"picture number {i}"} for i in range(48)]
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "urls.parquet")
        # the ingest is a real submission, on a Ray head: what the Jobs API recorded of it is checked too
        job = unclip(
            "launch",
            "ingest",
            "--wait",
            f"root={root}",
            f"launch.address={ray_head}",
            f"ingest.url_list={tmp_path / 'urls.parquet'}",
            "ingest.allow_networks=[127.0.0.1]",
            "ingest.shard_size=8",
        )
        found += hits(job.stdout + job.stderr, "the output of `unclip launch ingest`")
        runs = [
            ("encoders", "init", f"root={root}"),
            ("embed", f"root={root}", "ray.num_cpus=2", "embed.holdout_fraction=0.2"),
            ("train", "prior", f"root={root}", "train.nproc=1", *SMALL),
            ("export", "--out", str(root / "export"), f"root={root}"),
        ]
        for args in runs:
            result = unclip(*args)
            found += hits(result.stdout + result.stderr, f"the output of `unclip {' '.join(args[:2])}`")
    job_id = next(line.split()[1].rstrip(":") for line in job.stdout.splitlines() if line.startswith("submitted "))
    from ray.job_submission import JobSubmissionClient

    info = JobSubmissionClient(ray_head).get_job_info(job_id)
    assert info.status.value == "SUCCEEDED"
    found += hits(repr(info.runtime_env) + repr(info.metadata) + info.entrypoint, "the job's recorded runtime env")
    written = [p for p in root.rglob("*") if p.is_file()]
    assert any(p.name == "metrics.jsonl" for p in written) and any(
        p.name.startswith("events.out.tfevents") for p in written
    )
    assert any(p.name == "README.md" and "export" in str(p) for p in written) and any(
        p.name == "manifest.json" for p in written
    )
    for path in written:
        found += hits(path.read_bytes(), str(path.relative_to(tmp_path)))
    assert found == []

    # asked for by name, a credential travels, with a warning that names it and never its value
    dry = unclip(
        "launch",
        "ingest",
        "--dry-run",
        f"root={root}",
        "launch.address=http://127.0.0.1:9",
        "ray.forward_env=[AWS_SECRET_ACCESS_KEY]",
    )
    assert (
        "'AWS_SECRET_ACCESS_KEY': '***'" in dry.stdout and "ray.forward_env sends AWS_SECRET_ACCESS_KEY" in dry.stderr
    )
    assert hits(dry.stdout + dry.stderr, "a dry run") == []
