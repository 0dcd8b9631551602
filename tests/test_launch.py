"""`unclip launch` and infra/: every backend's rendered commands parse with the launcher's own
parser, every manifest and template validates, and the launches run for real on this machine:
two torchrun agents as two "nodes" on 127.0.0.1, a Ray Jobs submission to a `ray start --head`,
and Ray Train workers that resume after one of them is SIGKILLed."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from launch import cli
from launch import config as config_mod
from models.base.ports import free_port
from tests.support.site import serve
from tests.support.storefactory import make_store

REPO = Path(__file__).resolve().parents[1]
SMALL = [
    "prior.layers=2",
    "prior.heads=2",
    "train.batch_size=8",
    "train.log_every=1",
    "train.optim.warmup_steps=2",
    "train.progress_bar=never",
]


def dry_run(capsys, *args: str) -> str:
    assert cli.main(["launch", *args, "--dry-run", "root=s3://bucket/unclip"]) == 0
    return capsys.readouterr().out


def commands(output: str) -> list[list[str]]:
    """The command lines of a dry run (not comments, not DeepSpeed's log lines), split as a shell would."""
    return [shlex.split(line) for line in output.splitlines() if line.strip() and not line.startswith(("#", "["))]


def without_env(argv: list[str]) -> list[str]:
    while argv and "=" in argv[0] and not argv[0].startswith("-"):
        argv = argv[1:]
    return argv


def after_module(argv: list[str], module: str) -> list[str]:
    i = argv.index(module)
    assert argv[i - 1] == "-m", argv
    return argv[i + 1 :]


def parse_rank_args(argv: list[str], stage: str, config_url: str) -> None:
    from launch.rank import parser

    args = parser().parse_args(argv)
    assert (args.stage, args.config) == (stage, config_url)


def test_torchrun_dry_run_is_what_each_node_runs(capsys):
    from torch.distributed.run import get_args_parser

    out = dry_run(
        capsys,
        "train",
        "ldm",
        "--backend",
        "torchrun",
        "--nodes",
        "3",
        "--gpus-per-node",
        "8",
        "--master-addr",
        "10.0.0.1",
        "launch.env.NCCL_SOCKET_IFNAME=eth0",
    )
    lines = commands(out)
    assert len(lines) == 3 and lines[0] == lines[2]
    assert "NCCL_SOCKET_IFNAME=eth0" in lines[0] and "TORCH_NCCL_ASYNC_ERROR_HANDLING=1" in lines[0]
    args = get_args_parser().parse_args(after_module(without_env(lines[0]), "launch.agent"))  # torchrun's arguments
    assert (args.nnodes, args.nproc_per_node, args.rdzv_backend, args.rdzv_endpoint) == (
        "3",
        "8",
        "c10d",
        "10.0.0.1:29500",
    )
    assert args.rdzv_id == "ldm-main" and args.module and args.training_script == "launch.rank"
    parse_rank_args(args.training_script_args, "ldm", "s3://bucket/unclip/runs/ldm/main/launch.yaml")


def test_deepspeed_dry_run_names_every_node(capsys, monkeypatch):
    from deepspeed.launcher import launch as ds_launch
    from deepspeed.launcher import runner

    out = dry_run(
        capsys,
        "train",
        "prior",
        "--backend",
        "deepspeed",
        "--nodes",
        "2",
        "--gpus-per-node",
        "4",
        "launch.hosts=[gpu-a, gpu-b]",
    )
    assert "gpu-a slots=4\ngpu-b slots=4" in out  # the hostfile it writes
    head, *nodes = [without_env(line) for line in commands(out) if not line[-1].startswith("slots=")]
    args = runner.parse_args(after_module(head, "deepspeed.launcher.runner"))
    assert (args.num_nodes, args.num_gpus, args.master_addr, args.module, args.no_local_rank) == (
        2,
        4,
        "gpu-a",
        True,
        True,
    )
    assert len(nodes) == 2
    for rank, node in enumerate(nodes):
        monkeypatch.setattr(sys, "argv", ["launch", *after_module(node, "deepspeed.launcher.launch")])
        node_args = ds_launch.parse_args()  # it reads sys.argv
        world = json.loads(__import__("base64").urlsafe_b64decode(node_args.world_info))
        assert world == {"gpu-a": [0, 1, 2, 3], "gpu-b": [0, 1, 2, 3]} and node_args.node_rank == rank
        parse_rank_args(node_args.training_script_args, "prior", "s3://bucket/unclip/runs/prior/main/launch.yaml")


def test_slurm_script_is_valid_bash_with_a_parseable_launch(capsys, tmp_path):
    from torch.distributed.run import get_args_parser

    out = dry_run(
        capsys,
        "train",
        "decoder",
        "--backend",
        "slurm",
        "--nodes",
        "4",
        "--gpus-per-node",
        "8",
        "launch.slurm.partition=gpu",
        "launch.slurm.account=vision",
        "launch.env.NCCL_IB_HCA=mlx5",
    )
    script = out[out.index("#!/bin/bash") :].split("\n# not submitted")[0]
    path = tmp_path / "train.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    directives = dict(
        line[len("#SBATCH --") :].split("=", 1)
        for line in script.splitlines()
        if line.startswith("#SBATCH --") and "=" in line
    )
    assert directives["nodes"] == "4" and directives["gpus-per-node"] == "8" and directives["partition"] == "gpu"
    assert directives["account"] == "vision" and directives["signal"] == "TERM@180" and "#SBATCH --requeue" in script
    assert "export NCCL_IB_HCA=mlx5" in script
    srun = script[script.index("srun ") :].replace("\\\n", " ")
    srun = (
        srun.replace('"$SLURM_NNODES"', "4")
        .replace('"$head_node:29500"', "node0:29500")
        .replace('"$SLURM_JOB_ID"', "42")
    )
    args = get_args_parser().parse_args(after_module(shlex.split(srun), "torch.distributed.run"))
    assert (args.nnodes, args.nproc_per_node, args.rdzv_endpoint, args.rdzv_id) == ("4", "8", "node0:29500", "42")
    parse_rank_args(args.training_script_args, "decoder", "s3://bucket/unclip/runs/decoder/main/launch.yaml")


def test_ray_dry_runs_and_refusals(capsys):
    out = dry_run(
        capsys, "train", "upsampler", "--backend", "ray", "--nodes", "2", "--gpus-per-node", "8", "--address", "auto"
    )
    assert "workers=16" in out and "max_failures=3" in out
    job = dry_run(capsys, "ingest", "--address", "http://10.0.0.1:8265", "launch.pip=[extra-package]")
    entry = next(line for line in job.splitlines() if line.startswith("unclip "))
    args = cli._parse(shlex.split(entry)[1:])
    assert args.command == "ingest" and args.config.startswith("s3://bucket/unclip/jobs/unclip-ingest-")
    assert "address: auto" in job and "'pip': ['extra-package']" in job
    # refused before anything starts, with the key named
    assert cli.main(["launch", "ingest", "--dry-run", "root=/tmp/x"]) == 2
    assert "launch.address" in capsys.readouterr().err
    assert cli.main(["launch", "train", "ldm", "--backend", "deepspeed", "--nodes", "2", "--dry-run"]) == 2
    assert "launch.hosts" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["launch", "train", "--backend", "torchrun"])  # no stage


def _containers(pod_template: dict) -> list[dict]:
    containers = pod_template["spec"]["containers"]
    assert containers and all(c.get("image") and c.get("name") for c in containers)
    return containers


def _check_ray_cluster_spec(spec: dict, where: str) -> set[str]:
    assert spec["rayVersion"] == __import__("ray").__version__, f"{where}: rayVersion differs from the pinned Ray"
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    _containers(head["template"])
    groups = set()
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], f"{where}: {group['groupName']}"
        assert isinstance(group["rayStartParams"], dict)
        for container in _containers(group["template"]):
            limits = container["resources"]["limits"]
            if "nvidia.com/gpu" in limits:
                assert limits["nvidia.com/gpu"] == container["resources"]["requests"]["nvidia.com/gpu"]
        groups.add(group["groupName"])
    return groups


def test_infra_manifests_and_templates_validate():
    kuberay = REPO / "infra" / "kuberay"
    cluster = yaml.safe_load((kuberay / "raycluster.yaml").read_text())
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    assert _check_ray_cluster_spec(cluster["spec"], "raycluster.yaml") == {"cpu", "gpu"}
    expected_groups = {"ingest": {"cpu"}, "embed": {"cpu", "gpu"}, "train": {"gpu"}}
    for name, groups in expected_groups.items():
        job = yaml.safe_load((kuberay / f"rayjob-{name}.yaml").read_text())
        assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
        assert _check_ray_cluster_spec(job["spec"]["rayClusterSpec"], name) == groups
        yaml.safe_load(job["spec"].get("runtimeEnvYAML", "{}"))
        argv = shlex.split(job["spec"]["entrypoint"])
        assert argv[0] == "unclip"
        args = cli._parse(argv[1:])
        config_mod.load(None, args.overrides)  # the overrides it passes are valid keys and values
        assert (args.action if args.command == "launch" else args.command) == name

    from ray.autoscaler._private.util import prepare_config, validate_config

    launcher = yaml.safe_load((REPO / "infra" / "ray-cluster" / "aws.yaml").read_text())
    validate_config(prepare_config(launcher))  # Ray's own schema
    assert {"cpu_worker", "gpu_worker"} <= set(launcher["available_node_types"])

    dockerfile = (REPO / "infra" / "Dockerfile").read_text()
    instructions = [
        line.split()[0]
        for line in dockerfile.replace("\\\n", " ").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert instructions[0] == "FROM" and set(instructions) <= {
        "FROM",
        "ENV",
        "RUN",
        "WORKDIR",
        "COPY",
        "EXPOSE",
        "CMD",
        "ARG",
    }
    for line in dockerfile.splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (REPO / source).exists(), f"infra/Dockerfile copies {source}, which the repository lacks"
    assert "-c constraints.txt" in dockerfile

    # the operator guide names a command for every job on every kind of cluster
    guide = (REPO / "infra" / "README.md").read_text()
    for needle in (
        "--backend torchrun",
        "--backend deepspeed",
        "--backend slurm",
        "--backend ray",
        "launch ingest",
        "launch embed",
        "launch status",
        "rayjob-embed.yaml",
        "ray up",
        "8 GPUs",
        "64 GPUs",
        "512 GPUs",
    ):
        assert needle in guide, needle


# --- real launches -------------------------------------------------------------------------


def _unclip(*args: str, env: dict | None = None, timeout: int = 300, **popen) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "launch.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
        **popen,
    )


def _finish(proc: subprocess.Popen, timeout: int = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def _summary(root: Path, stage: str = "prior") -> dict:
    return json.loads((root / "runs" / stage / "main" / "train_summary.json").read_text())


@pytest.mark.slow
def test_two_torchrun_nodes_train_and_resume(tmp_path):
    make_store(str(tmp_path / "store"), (40, 30, 50, 24))
    port = free_port()

    def both_nodes(steps: int) -> list[str]:
        args = [
            "launch",
            "train",
            "prior",
            "--backend",
            "torchrun",
            "--nodes",
            "2",
            "--gpus-per-node",
            "1",
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(port),
            f"root={tmp_path}",
            *SMALL,
            f"train.steps={steps}",
            "train.checkpoint_every=2",
            "launch.rendezvous_timeout_s=120",
        ]
        nodes = [_unclip(*args), _unclip(*args)]
        return [_finish(node) for node in nodes]

    both_nodes(4)
    first = _summary(tmp_path)
    assert first["world_size"] == 2 and first["steps"] == 4 and first["resume"] is None
    both_nodes(6)  # the same command again, with more steps: both nodes resume from latest
    second = _summary(tmp_path)
    assert second["resume"]["step"] == 4 and second["world_size"] == 2 and second["steps"] == 6
    assert (tmp_path / "runs" / "prior" / "main" / "launch.yaml").exists()
    steps = [
        json.loads(line)["step"] for line in (tmp_path / "runs" / "prior" / "main" / "logs" / "metrics.jsonl").open()
    ]
    assert steps == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_ray_train_backend_resumes_after_a_worker_is_killed(tmp_path):
    make_store(str(tmp_path / "store"), (40, 30, 50, 24))
    out = _finish(
        _unclip(
            "launch",
            "train",
            "prior",
            "--backend",
            "ray",
            "--nodes",
            "1",
            "--gpus-per-node",
            "2",
            f"root={tmp_path}",
            *SMALL,
            "train.steps=6",
            "train.checkpoint_every=2",
            "ray.num_cpus=3",
            "train.fault_injection.kill_rank=1",
            "train.fault_injection.kill_step=3",  # SIGKILL, once
        ),
        timeout=600,
    )
    summary = _summary(tmp_path)
    assert summary["world_size"] == 2 and summary["steps"] == 6
    assert summary["resume"]["step"] == 2, out[-3000:]  # the restarted group went on from the step-2 checkpoint
    assert (
        json.loads((tmp_path / "runs" / "prior" / "main" / "step_0000006" / "trainer_state.json").read_text())["step"]
        == 6
    )


@pytest.fixture
def ray_head():
    """`ray start --head` on 127.0.0.1 with the Jobs API; stopped by ending its --block process
    (never `ray stop`, which would end every Ray on the machine)."""
    port, dashboard = free_port(), free_port()
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay under 108 bytes
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(REPO),
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
    }
    head = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "ray"),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={port}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            "--num-cpus=2",
            # ports of their own: another Ray of the test session (the local_ray fixture) holds the defaults,
            # and a job agent that cannot bind leaves the Jobs API answering "No available agent"
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            "--include-dashboard=true",
            "--disable-usage-stats",
            f"--temp-dir={temp}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        cwd=REPO,
    )
    address = f"http://127.0.0.1:{dashboard}"
    from ray.job_submission import JobSubmissionClient

    deadline = time.time() + 120
    while True:
        try:
            JobSubmissionClient(address).list_jobs()
            break
        except Exception:
            if time.time() > deadline or head.poll() is not None:
                head.kill()
                raise AssertionError("ray start --head did not bring up the Jobs API") from None
            time.sleep(1)
    yield address
    head.terminate()
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        head.kill()
    shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_ingest_submitted_to_a_ray_head_completes(ray_head, tmp_path):
    with serve() as site:
        urls = [{"url": f"{site}/ok/{i}.png", "caption": f"picture number {i}"} for i in range(10)]
        urls.append({"url": f"{site}/404.png", "caption": "gone"})
        pq.write_table(pa.Table.from_pylist(urls), tmp_path / "urls.parquet")
        root = tmp_path / "root"
        common = [f"root={root}", f"launch.address={ray_head}"]
        out = _finish(
            _unclip(
                "launch",
                "ingest",
                "--wait",
                f"ingest.url_list={tmp_path / 'urls.parquet'}",
                "ingest.shard_size=4",
                "ingest.allow_networks=[127.0.0.1]",
                *common,
            ),
            timeout=400,
        )
    job_id = next(line.split()[1].rstrip(":") for line in out.splitlines() if line.startswith("submitted "))
    assert f"job {job_id}: SUCCEEDED" in out
    summary = json.loads((root / "raw" / "_summary.json").read_text())
    assert summary["kept"] == 10 and summary["input_rows"] == 11
    status = _finish(_unclip("launch", "status", job_id, *common))
    assert f"job {job_id}: SUCCEEDED" in status
    assert (root / "jobs" / f"{job_id}.yaml").exists()
    unknown = _unclip("launch", "status", "no-such-job", *common)
    out, _ = unknown.communicate(timeout=120)
    assert unknown.returncode == 2 and "no-such-job" in out

    with serve(delay_s=30) as slow_site:  # a job still downloading when it is stopped
        pq.write_table(
            pa.Table.from_pylist([{"url": f"{slow_site}/ok/{i}.png", "caption": "slow"} for i in range(4)]),
            tmp_path / "slow.parquet",
        )
        out = _finish(
            _unclip(
                "launch",
                "ingest",
                f"ingest.url_list={tmp_path / 'slow.parquet'}",
                "ingest.allow_networks=[127.0.0.1]",
                f"root={tmp_path / 'slow'}",
                f"launch.address={ray_head}",
            )
        )
        slow_job = next(line.split()[1].rstrip(":") for line in out.splitlines() if line.startswith("submitted "))
        assert "stop requested" in _finish(_unclip("launch", "stop", slow_job, *common))
        deadline = time.time() + 60
        while "STOPPED" not in (status := _unclip("launch", "status", slow_job, *common).communicate()[0]):
            assert time.time() < deadline, status
            time.sleep(1)


def test_nproc_auto_fits_the_machine_and_too_many_ranks_for_the_gpus_are_refused(tmp_path, monkeypatch):
    from launch.environment import local_ranks
    from launch.train import check_before_launch
    from models.base.configlib import ConfigError

    assert local_ranks("auto", gpus=8, cores=64) == (8, 8)  # one rank per GPU
    assert local_ranks("auto", gpus=0, cores=16) == (2, 8)  # two ranks, the cores shared as threads
    assert local_ranks("auto", gpus=0, cores=1) == (1, 1)
    assert local_ranks(3, gpus=0, cores=2) == (3, 1)
    with pytest.raises(
        ConfigError, match="'train.nproc' is 2, but this machine has 1 GPU: one rank per GPU, at most 1"
    ):
        local_ranks(2, gpus=1, cores=16)
    # before any rank starts: the command's own check
    make_store(str(tmp_path / "store"), (20,))
    cfg = config_mod.load(None, [f"root={tmp_path}", "train.nproc=4"])
    monkeypatch.setattr("torch.cuda.device_count", lambda: 2)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ConfigError, match="'train.nproc' is 4, but this machine has 2 GPUs"):
        check_before_launch(cfg, "ldm")
