"""The environment every training rank gets, on one machine or many: the one place it is set.

- `OMP_NUM_THREADS`: in a local `unclip train`, the usable cores / ranks (`local_ranks`); else 1
  (unless set). Ranks share the node's cores.
- `PYTHONUNBUFFERED=1`: rank logs reach the launcher (and SLURM/Ray logs) as they are written.
- `TORCH_NCCL_ASYNC_ERROR_HANDLING=1`: a rank whose collective failed or timed out tears its
  process down, so the launcher sees a failure instead of a job that hangs.
- `TORCH_NCCL_DUMP_ON_TIMEOUT=1`: a timed-out collective leaves a flight-recorder trace of who
  waited on what.
- `NCCL_DEBUG=WARN`: NCCL names the failing peer and transport without per-step noise.
- `DS_ACCELERATOR=cpu`, on a node without CUDA (decided on the node): DeepSpeed would otherwise
  probe for accelerators it cannot use.
- `launch.env`: site settings (`NCCL_SOCKET_IFNAME`, `NCCL_IB_HCA`, `FI_PROVIDER`, ...).

The collective timeout itself is a training setting (`train.collective_timeout_s`) and the time nodes
wait for each other to join is `launch.rendezvous_timeout_s`; the address and port of node 0 are
`launch.master_addr` / `launch.master_port`.
"""

from __future__ import annotations

import os

import torch

from models.base.configlib import ConfigError

MULTINODE_DEFAULTS = {
    "OMP_NUM_THREADS": "1",
    "PYTHONUNBUFFERED": "1",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
    "NCCL_DEBUG": "WARN",
}


def rank_variables(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The variables above that a launch sets, the same on every node (what `--dry-run` prints and
    rendered scripts export): defaults where the launching environment has none, then `launch.env`."""
    chosen = {k: v for k, v in MULTINODE_DEFAULTS.items() if k not in os.environ}
    chosen.update(extra or {})
    return chosen


def _node_variables() -> dict[str, str]:
    return {} if torch.cuda.is_available() or "DS_ACCELERATOR" in os.environ else {"DS_ACCELERATOR": "cpu"}


def rank_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The full environment for a launcher or rank process started on this node."""
    return {**os.environ, **rank_variables(extra), **_node_variables()}


def usable_cores() -> int:
    """The cores this process may run on (its affinity: taskset, cgroups, SLURM's binding)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def local_ranks(nproc: int | str, gpus: int | None = None, cores: int | None = None) -> tuple[int, int]:
    """(ranks, threads per rank) a local `unclip train` starts for `train.nproc`. auto: one rank per
    visible GPU; on CPUs two ranks (one on one core), since train.batch_size is per rank and the
    shipped configs were tuned at a global batch of two ranks' (the demo trains the same batches on
    any machine); the usable cores are shared among the ranks as intra-op threads. More ranks than
    GPUs is refused (a second rank on one GPU would share it, or find none)."""
    gpus = torch.cuda.device_count() if gpus is None else gpus
    cores = usable_cores() if cores is None else cores
    if gpus and nproc != "auto" and int(nproc) > gpus:
        raise ConfigError(
            f"config key 'train.nproc' is {nproc}, but this machine has {gpus} GPU{'s' if gpus > 1 else ''}: "
            f"one rank per GPU, at most {gpus} (or train.nproc=auto)"
        )
    if nproc != "auto":
        ranks = int(nproc)
    else:
        ranks = gpus or min(2, cores)
    return ranks, max(1, cores // ranks)


def use_machine() -> int:
    """A command that computes in this process (encoder fitting, sample, eval, export) uses every
    usable core; returns how many. torch's default is the machine's physical cores, whatever this
    process may use."""
    cores = usable_cores()
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(cores)
    return cores


def apply_in_rank(extra: dict[str, str] | None = None) -> None:
    """Called first thing in every rank: launchers that do not pass our environment along
    (DeepSpeed's pdsh runner exports only some prefixes, srun and Ray workers their own) still get it.
    NCCL and torch read these when the process group starts, which is after this."""
    threads_unset = "OMP_NUM_THREADS" not in os.environ
    os.environ.update({**rank_variables(extra), **_node_variables()})
    if threads_unset:
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
