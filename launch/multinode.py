"""`unclip launch train STAGE`: one training job across nodes, by torchrun, deepspeed, SLURM or Ray.

Every backend starts the same rank entry point, `python -m launch.rank --stage S --config URL`,
and every rank sets the same environment (launch/environment.py). The resolved configuration is
written once, to `<run folder>/launch.yaml`, and every rank reads it from there: with more than
one node, `root` must be storage every node sees (s3://, gs://, a shared file system).

The launchers themselves are the well-kept ones (torchrun's c10d rendezvous, DeepSpeed's pdsh
runner, sbatch + srun, Ray Train); this module only renders their command lines, so `--dry-run`
can print exactly what each node will run.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from data_pipeline.ray_runtime import SECRET_NAME, masked
from launch import config as config_mod
from launch import ray_train
from launch.config import Config
from launch.environment import rank_environment, rank_variables
from launch.rank_failures import RANK_ERRORS
from launch.train import check_before_launch, config_url, outcome, rank_command, run_forwarding_sigterm
from models.base import storage
from models.base.configlib import ConfigError, to_yaml

REPO = Path(__file__).resolve().parents[1]
SLURM_TEMPLATE = REPO / "infra" / "slurm" / "train.sbatch"


@dataclasses.dataclass
class NodeCommand:
    where: str  # "node 0", "every node (2)", "submit host", ...
    argv: list[str]
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    script: str | None = None  # a batch script the command submits

    def shell(self) -> str:
        """The command as a dry run prints it: secrets' values masked."""
        variables = " ".join(f"{k}={shlex.quote(str(v))}" for k, v in masked(self.env).items())
        return f"{variables} {shlex.join(self.argv)}".strip()


def torchrun_argv(cfg: Config, stage: str, resume_from: str | None = None, init_from: str | None = None) -> list[str]:
    """The command every node runs: torchrun's c10d rendezvous assigns node ranks on its own. Its
    agent is torchrun's, with torchrun's arguments, ending a failed launch in one line (launch/agent.py)."""
    launch = cfg.launch
    return [
        sys.executable,
        "-m",
        "launch.agent",
        f"--nnodes={launch.nodes}",
        f"--nproc-per-node={launch.gpus_per_node}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={launch.master_addr}:{launch.master_port}",
        f"--rdzv-id={launch.rdzv_id or f'{stage}-{cfg.train.run}'}",
        f"--rdzv-conf=join_timeout={launch.rendezvous_timeout_s}",
        f"--max-restarts={launch.max_restarts}",
        f"--shutdown-timeout={cfg.train.preemption_grace_s}",
        *rank_command(stage, config_url(cfg, stage), resume_from, init_from),
    ]


def hostfile_text(cfg: Config) -> str:
    return "".join(f"{host} slots={cfg.launch.gpus_per_node}\n" for host in cfg.launch.hosts)


def deepspeed_argv(
    cfg: Config, stage: str, hostfile: str | None, resume_from: str | None = None, init_from: str | None = None
) -> list[str]:
    """DeepSpeed's runner on node 0; it reaches the other nodes over pdsh/ssh (one node: no hostfile,
    so it starts the local ranks itself instead of going through ssh to localhost)."""
    launch = cfg.launch
    return [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        *([f"--hostfile={hostfile}"] if hostfile else []),
        f"--master_addr={deepspeed_master(cfg)}",
        f"--master_port={launch.master_port}",
        f"--num_nodes={launch.nodes}",
        f"--num_gpus={launch.gpus_per_node}",
        "--no_local_rank",
        "--module",
        *rank_command(stage, config_url(cfg, stage), resume_from, init_from)[1:],
    ]


def deepspeed_master(cfg: Config) -> str:
    """Node 0: the first host, unless launch.master_addr names another address of it."""
    launch = cfg.launch
    return launch.hosts[0] if launch.hosts and launch.master_addr == "127.0.0.1" else launch.master_addr


def deepspeed_node_argv(
    cfg: Config, stage: str, hosts: list[str], node_rank: int, resume_from=None, init_from=None
) -> list[str]:
    """What DeepSpeed's runner starts on node `node_rank` (its own encoding of the world)."""
    from deepspeed.launcher.runner import (
        encode_world_info,
    )  # lazy: DeepSpeed (seconds to import) for its own backend only

    launch = cfg.launch
    world = {host: list(range(launch.gpus_per_node)) for host in hosts}
    return [
        sys.executable,
        "-u",
        "-m",
        "deepspeed.launcher.launch",
        f"--world_info={encode_world_info(world)}",
        f"--node_rank={node_rank}",
        f"--master_addr={deepspeed_master(cfg)}",
        f"--master_port={launch.master_port}",
        "--module",
        "--no_local_rank",
        *rank_command(stage, config_url(cfg, stage), resume_from, init_from)[1:],
    ]


def render_template(text: str, values: dict[str, Any], source: str) -> str:
    """`{{ name }}` placeholders; an unknown or missing one is an error naming the template."""
    names = set(re.findall(r"{{\s*(\w+)\s*}}", text))
    missing = names - set(values)
    if missing:
        raise ConfigError(f"template '{source}': no value for {{{{ {sorted(missing)[0]} }}}}")
    return re.sub(r"{{\s*(\w+)\s*}}", lambda m: str(values[m.group(1)]), text)


def sbatch_script(cfg: Config, stage: str, resume_from: str | None = None, init_from: str | None = None) -> str:
    launch, slurm = cfg.launch, cfg.launch.slurm
    template = Path(slurm.template) if slurm.template else SLURM_TEMPLATE
    if not template.is_file():
        raise ConfigError(f"config key 'launch.slurm.template': '{template}' is not a file")
    rank = shlex.join(["python", *rank_command(stage, config_url(cfg, stage), resume_from, init_from)][1:])
    directives = [f"#SBATCH --partition={slurm.partition}"] if slurm.partition else []
    directives += [f"#SBATCH --account={slurm.account}"] if slurm.account else []
    directives += ["#SBATCH --requeue"] if slurm.requeue else []
    values = {
        "job_name": f"unclip-{stage}-{cfg.train.run}",
        "nodes": launch.nodes,
        "gpus_per_node": launch.gpus_per_node,
        "cpus_per_task": slurm.cpus_per_task,
        "time": slurm.time,
        "signal_grace_s": slurm.signal_grace_s,
        "directives": "\n".join(directives),
        "exports": "\n".join(f"export {k}={shlex.quote(v)}" for k, v in rank_variables(launch.env).items()),
        "master_port": launch.master_port,
        "rendezvous_timeout_s": launch.rendezvous_timeout_s,
        "max_restarts": launch.max_restarts,
        "shutdown_timeout_s": cfg.train.preemption_grace_s,
        "rank_args": rank,
        "python": slurm.python or sys.executable,
    }
    return render_template(template.read_text(), values, str(template))


def plan(cfg: Config, stage: str, resume_from: str | None = None, init_from: str | None = None) -> list[NodeCommand]:
    """What each node runs, for the configured backend."""
    launch = cfg.launch
    env = rank_variables(launch.env)
    if launch.backend == "torchrun":
        argv = torchrun_argv(cfg, stage, resume_from, init_from)
        return [NodeCommand(f"node {i} of {launch.nodes}", argv, env) for i in range(launch.nodes)]
    if launch.backend == "deepspeed":
        if launch.nodes == 1 and not (launch.hosts or launch.hostfile):
            return [NodeCommand("node 0", deepspeed_argv(cfg, stage, None, resume_from, init_from), env)]
        hosts = launch.hosts or _read_hostfile(launch.hostfile)
        hostfile = launch.hostfile or "<written at launch>"
        written = None if launch.hostfile else f"# hostfile written at launch:\n{hostfile_text(cfg)}"
        steps = [
            NodeCommand("node 0 (runner)", deepspeed_argv(cfg, stage, hostfile, resume_from, init_from), env, written)
        ]
        return steps + [
            NodeCommand(
                f"node {i} ({host}, via pdsh)", deepspeed_node_argv(cfg, stage, hosts, i, resume_from, init_from), env
            )
            for i, host in enumerate(hosts)
        ]
    if launch.backend == "slurm":
        script = sbatch_script(cfg, stage, resume_from, init_from)
        return [NodeCommand("submit host", ["sbatch", "<script below>"], {}, script)]
    return [
        NodeCommand(
            f"Ray cluster {cfg.ray.address or '(local)'}", ray_train.describe(cfg, stage, resume_from, init_from), env
        )
    ]


def _read_hostfile(path: str | None) -> list[str]:
    if not path:
        return []
    hosts = [
        line.split()[0] for line in storage.read_text(path).splitlines() if line.strip() and not line.startswith("#")
    ]
    if not hosts:
        raise ConfigError(f"config key 'launch.hostfile': '{path}' lists no hosts")
    return hosts


def launch_train(
    cfg: Config,
    stage: str,
    resume_from: str | None = None,
    init_from: str | None = None,
    dry_run: bool = False,
    log=print,
) -> dict[str, Any] | None:
    """Validate, write the resolved config to the run folder, start this node's part of the job.
    A dry run checks the configuration only: it may run where neither the store nor GPUs are."""
    cfg = config_mod.for_stage(cfg, stage)
    steps = plan(cfg, stage, resume_from, init_from)
    if dry_run:
        log(f"# configuration for every rank: {config_url(cfg, stage)} (written at launch)")
        for step in steps:
            log(f"# {step.where}\n{step.shell()}")
            if step.script:
                log(
                    re.sub(
                        r"^(export (\w+)=).*$",
                        lambda m: (
                            m.group(1) + ("***" if SECRET_NAME.search(m.group(2)) else m.group(0)[len(m.group(1)) :])
                        ),
                        step.script,
                        flags=re.M,
                    )
                )
        return None
    check_before_launch(cfg, stage, init_from)
    storage.write_text(config_url(cfg, stage), to_yaml(cfg))
    backend = cfg.launch.backend
    if backend == "torchrun":
        log(
            f"train {stage}: this node joins {cfg.launch.nodes} x {cfg.launch.gpus_per_node} ranks at "
            f"{cfg.launch.master_addr}:{cfg.launch.master_port}"
        )
        with tempfile.TemporaryDirectory(prefix="unclip-rank-errors-") as errors:
            env = rank_environment({**cfg.launch.env, RANK_ERRORS: errors})
            returncode, preempted = run_forwarding_sigterm(steps[0].argv, env, quiet_after=errors)
            return outcome(cfg, stage, returncode, preempted, log, errors)
    if backend == "deepspeed":
        with tempfile.TemporaryDirectory(prefix="unclip-ds-") as folder:
            hostfile = cfg.launch.hostfile
            if cfg.launch.hosts and not hostfile:
                hostfile = os.path.join(folder, "hostfile")
                Path(hostfile).write_text(hostfile_text(cfg))
            argv = deepspeed_argv(cfg, stage, hostfile, resume_from, init_from)
            returncode, preempted = run_forwarding_sigterm(argv, rank_environment(cfg.launch.env))
        return outcome(cfg, stage, returncode, preempted, log)
    if backend == "slurm":
        return submit_sbatch(steps[0].script or "", cfg.launch.slurm.submit, log)

    return ray_train.run(cfg, stage, resume_from, init_from, log)


def submit_sbatch(script: str, submit: bool, log=print) -> dict[str, Any] | None:
    if not submit:
        log(script)
        log("# not submitted (launch.slurm.submit=false or no --submit): pipe this to sbatch")
        return None
    if not shutil.which("sbatch"):
        raise ConfigError("config key 'launch.slurm.submit': sbatch is not on PATH here (run on a SLURM login node)")
    done = subprocess.run(["sbatch", "--parsable"], input=script, text=True, capture_output=True)
    if done.returncode != 0:
        raise ConfigError(f"sbatch refused the job: {done.stderr.strip()}")
    job = done.stdout.strip().split(";")[0]
    log(f"submitted SLURM job {job}")
    return {"slurm_job": job}
