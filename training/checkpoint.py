"""Checkpoints of a run: ROOT/runs/<stage>/<run>/step_NNNNNNN/ and a `latest` pointer.

A step folder holds the DeepSpeed state (model, optimizer, scheduler; DeepSpeed's own layout),
`ema.safetensors`, `stage.json` (how to rebuild the network without DeepSpeed), the trainer state
(step, loader position, counters), one RNG file per rank, the resolved `config.yaml`, and
`checksums.json` (sha256 of every other file).

Commit: every rank writes, then after a barrier rank 0 adds the checksums and `_COMMITTED`
(on local disk the folder is also renamed into place) and only then rewrites `latest`. A folder
without `_COMMITTED` is never used. On a remote run folder (any fsspec URL) ranks write to a local
staging folder, one process per node uploads it, and the marker goes up last.

Resume picks the newest committed checkpoint whose files all match their checksums; a missing or
corrupt file is reported by name and the previous good checkpoint is used instead. A checkpoint
written on another world size or ZeRO stage is converted to DeepSpeed's universal format first.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from models.assembly import rebuild
from models.base import storage
from models.base.errors import JobFailed

LATEST = "latest"
STAGING_DIR = "UNCLIP_STAGING_DIR"  # set by `unclip train`: where its ranks stage, removed when they exit
CHECKSUMS = "checksums.json"
TRAINER_STATE = "trainer_state.json"
STAGE_INFO = "stage.json"
STEP_DIR = re.compile(r"step_(\d{7,})")


class CheckpointError(JobFailed):
    pass


def step_tag(step: int) -> str:
    return f"step_{step:07d}"


def _files(folder: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, n), folder) for d, _, names in os.walk(folder) for n in names)


def verify(folder_url: str) -> list[str]:
    """Problems with a committed checkpoint (empty when every listed file matches its sha256)."""
    if not storage.is_committed(folder_url):
        return [f"'{folder_url}' is incomplete (no {storage.COMMIT_MARKER})"]
    if not storage.exists(storage.join(folder_url, CHECKSUMS)):
        return [f"'{folder_url}': {CHECKSUMS} is missing"]
    problems = []
    fs, root = storage.url_to_fs(folder_url)
    for name, expected in storage.read_json(storage.join(folder_url, CHECKSUMS)).items():
        path = root.rstrip("/") + "/" + name
        if not fs.exists(path):
            problems.append(f"'{folder_url}': file '{name}' is missing")
            continue
        if storage.sha256_file(storage.join(folder_url, name)) != expected:
            problems.append(f"'{folder_url}': file '{name}' is corrupt (sha256 differs from {CHECKSUMS})")
    return problems


def committed_steps(run_url: str) -> list[str]:
    """Committed step folders of a run, newest first."""
    names = [n for n in storage.listdir(run_url) if STEP_DIR.fullmatch(n)]
    return [
        storage.join(run_url, n) for n in sorted(names, reverse=True) if storage.is_committed(storage.join(run_url, n))
    ]


def choose(run_url: str, explicit: str | None, check: bool, log) -> str | None:
    """The checkpoint to resume from: `explicit` (which must be sound), else the newest sound one."""
    if explicit:
        folder = explicit if STEP_DIR.fullmatch(os.path.basename(explicit.rstrip("/"))) else _latest_of(explicit)
        problems = verify(folder) if check else ([] if storage.is_committed(folder) else [f"'{folder}' is incomplete"])
        if problems:
            raise CheckpointError("cannot resume: " + "; ".join(problems))
        return folder
    for folder in committed_steps(run_url):
        problems = verify(folder) if check else []
        if not problems:
            return folder
        for problem in problems:
            log(f"checkpoint: {problem}; trying the one before")
    if storage.exists(storage.join(run_url, LATEST)) and not committed_steps(run_url):
        raise CheckpointError(f"run '{run_url}': `latest` exists but no committed checkpoint does")
    if any(STEP_DIR.fullmatch(n) for n in storage.listdir(run_url)) and committed_steps(run_url):
        raise CheckpointError(f"run '{run_url}': no checkpoint passed verification (see above); refusing to start over")
    return None


def _latest_of(run_url: str) -> str:
    pointer = storage.join(run_url, LATEST)
    if not storage.exists(pointer):
        raise CheckpointError(f"'{run_url}' is neither a step_NNNNNNN folder nor a run with `latest`")
    return storage.join(run_url, storage.read_text(pointer).strip())


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@dataclass
class Checkpointer:
    run_url: str
    keep_last: int
    rank: int
    world_size: int
    local_rank: int = 0
    # `unclip train` hands its ranks a folder it removes when they exit, whatever the outcome;
    # started by another launcher, ranks stage under TMPDIR and remove what they made themselves
    cache_dir: str = field(
        default_factory=lambda: os.environ.get(STAGING_DIR) or os.path.join(tempfile.gettempdir(), "unclip-checkpoints")
    )

    def __post_init__(self) -> None:
        self.local = storage.is_local(self.run_url)
        digest = hashlib.sha1(self.run_url.encode()).hexdigest()[:12]
        self.staging_root = storage.local_path(self.run_url) if self.local else os.path.join(self.cache_dir, digest)
        self._copies: list[str] = []  # resume and universal copies, removed once loaded

    # -- save ---------------------------------------------------------------------------------
    def save(
        self,
        engine,
        step: int,
        ema_state: dict[str, torch.Tensor],
        stage_info: dict[str, Any],
        trainer_state: dict[str, Any],
        config_yaml: str,
        crash_rank1: bool = False,
    ) -> str:
        """Write and commit step `step`; a full disk leaves `latest` where it was, says which file
        and how much space was left, and takes its half-written folder away."""
        staging = os.path.join(self.staging_root, storage.TMP_PREFIX + step_tag(step))
        try:
            return self._save(engine, step, ema_state, stage_info, trainer_state, config_yaml, crash_rank1)
        except (OSError, RuntimeError) as err:
            # torch.save reports a full disk as a RuntimeError of its stream writer, without errno
            usage = shutil.disk_usage(self.staging_root)
            if getattr(err, "errno", None) != errno.ENOSPC and usage.free > max(1 << 20, usage.total // 1000):
                raise
            written = getattr(err, "filename", None) or _newest_file(staging) or staging
            shutil.rmtree(staging, ignore_errors=True)
            pointer = storage.join(self.run_url, LATEST)
            latest = storage.read_text(pointer).strip() if storage.exists(pointer) else "nothing"
            raise CheckpointError(
                f"checkpoint {step_tag(step)}: no space left on the device writing '{written}' "
                f"({usage.free:,} bytes free of {usage.total:,} in {self.staging_root}); `latest` stays at {latest}"
            ) from None

    def _save(
        self,
        engine,
        step: int,
        ema_state: dict[str, torch.Tensor],
        stage_info: dict[str, Any],
        trainer_state: dict[str, Any],
        config_yaml: str,
        crash_rank1: bool,
    ) -> str:
        tag = step_tag(step)
        tmp_tag = storage.TMP_PREFIX + tag
        staging = os.path.join(self.staging_root, tmp_tag)
        if self.local_rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
        _barrier()
        engine.save_checkpoint(self.staging_root, tag=tmp_tag, save_latest=False)
        torch.save(_rng_state(), os.path.join(staging, f"rng-rank{self.rank:05d}.pt"))
        if crash_rank1 and self.rank == 1:
            # fault injection: a rank dies with its files half committed, as the OOM killer ends it
            os.kill(os.getpid(), signal.SIGKILL)
        _barrier()
        if self.rank == 0:
            save_file({k: v.contiguous() for k, v in ema_state.items()}, os.path.join(staging, "ema.safetensors"))
            self._write_json(os.path.join(staging, STAGE_INFO), stage_info)
            self._write_json(
                os.path.join(staging, TRAINER_STATE), {**trainer_state, "step": step, "world_size": self.world_size}
            )
            with open(os.path.join(staging, "config.yaml"), "w") as f:
                f.write(config_yaml)
        _barrier()
        sums = (
            self._upload_and_hash(staging, tag)
            if not self.local
            else ({n: storage.sha256_file(os.path.join(staging, n)) for n in _files(staging)} if self.rank == 0 else {})
        )
        if self.rank == 0:
            final = storage.join(self.run_url, tag)
            if self.local:
                self._write_json(os.path.join(staging, CHECKSUMS), sums)
                storage.commit_folder(staging, final)
            else:  # the ranks uploaded their files already
                storage.write_json(storage.join(final, CHECKSUMS), sums)
                storage.mark_committed(final)
            storage.write_text(storage.join(self.run_url, LATEST), tag + "\n")
            self._prune()
        _barrier()
        if not self.local and self.local_rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
        return storage.join(self.run_url, tag)

    def _upload_and_hash(self, staging: str, tag: str) -> dict[str, str]:
        """Remote run: one process per node uploads its staging folder; rank 0 gets all hashes."""
        sums: dict[str, str] = {}
        if self.local_rank == 0:
            final = storage.join(self.run_url, tag)
            storage.remove(final)  # a leftover of a crash mid-upload: never committed
            fs, root = storage.url_to_fs(final)
            for name in _files(staging):
                sums[name] = storage.sha256_file(os.path.join(staging, name))
                fs.put_file(os.path.join(staging, name), root.rstrip("/") + "/" + name)
        gathered: list[dict[str, str]] = [{} for _ in range(self.world_size)] if dist.is_initialized() else [sums]
        if dist.is_initialized():
            dist.all_gather_object(gathered, sums)
        return {k: v for part in gathered for k, v in part.items()}

    @staticmethod
    def _write_json(path: str, obj: Any) -> None:
        with open(path, "w") as f:
            f.write(storage.strict_json(obj, indent=2, default=str))

    def _prune(self) -> None:
        for old in committed_steps(self.run_url)[self.keep_last :]:
            storage.remove(old)
        if self.local:
            for name in os.listdir(self.staging_root):
                if name.startswith(storage.TMP_PREFIX + "step_"):
                    shutil.rmtree(os.path.join(self.staging_root, name), ignore_errors=True)

    # -- load ---------------------------------------------------------------------------------
    def local_copy(self, folder_url: str) -> str:
        """An OS path of `folder_url` on this node (downloaded once per node when remote)."""
        if storage.is_local(folder_url):
            return storage.local_path(folder_url)
        target = os.path.join(self.staging_root, "resume", os.path.basename(folder_url.rstrip("/")))
        self._copies.append(os.path.dirname(target))
        if self.local_rank == 0:
            shutil.rmtree(target, ignore_errors=True)
            storage.download_dir(folder_url, target)
        _barrier()
        return target

    def universal_copy(self, local_folder: str) -> str:
        """DeepSpeed's universal (world-size and stage independent) form of a ZeRO checkpoint."""
        target = os.path.join(
            self.cache_dir,
            "universal",
            hashlib.sha1(local_folder.encode()).hexdigest()[:12],
            os.path.basename(local_folder),
        )
        self._copies.append(os.path.dirname(target))
        if self.local_rank == 0 and not os.path.exists(os.path.join(target, "zero")):
            shutil.rmtree(target, ignore_errors=True)
            command = [
                sys.executable,
                "-m",
                "deepspeed.checkpoint.ds_to_universal",
                "--input_folder",
                local_folder,
                "--output_folder",
                target,
                "--inject_missing_state",
                "--num_extract_workers",
                "1",
                "--num_merge_workers",
                "1",
            ]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                raise CheckpointError(
                    f"converting '{local_folder}' to a universal checkpoint failed:\n{result.stderr[-2000:]}"
                )
        _barrier()
        return target

    def release_copies(self) -> None:
        """Every rank has loaded: remove the node's resume and universal copies."""
        _barrier()
        if self.local_rank == 0:
            for folder in self._copies:
                shutil.rmtree(folder, ignore_errors=True)
            _remove_if_empty(os.path.join(self.cache_dir, "universal"))
        self._copies = []

    def close(self) -> None:
        """The run is over: a remote run's staging folder (logs, steps) goes from this node."""
        if not self.local and self.local_rank == 0:
            shutil.rmtree(self.staging_root, ignore_errors=True)
            _remove_if_empty(self.cache_dir)

    def load(self, engine, local_folder: str, deepspeed_folder: str) -> tuple[dict[str, Any], str]:
        """Restore DeepSpeed state (from `deepspeed_folder`) and this rank's RNG; returns the trainer
        state and the path of the EMA weights (each rank reads its own share) in `local_folder`."""
        parent, tag = os.path.split(deepspeed_folder.rstrip("/"))
        path, _ = engine.load_checkpoint(parent, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise CheckpointError(f"checkpoint '{local_folder}': DeepSpeed found nothing to load")
        with open(os.path.join(local_folder, TRAINER_STATE)) as f:
            state = json.load(f)
        rng_file = os.path.join(local_folder, f"rng-rank{self.rank:05d}.pt")
        if os.path.exists(rng_file) and state["world_size"] == self.world_size:
            _set_rng_state(torch.load(rng_file, weights_only=False))
        return state, os.path.join(local_folder, "ema.safetensors")


def _newest_file(folder: str) -> str | None:
    """The file written last under `folder` (the one a failed write was on), if any."""
    files = [os.path.join(d, n) for d, _, names in os.walk(folder) for n in names]
    return max(files, key=os.path.getmtime) if files else None


def _remove_if_empty(folder: str) -> None:
    with contextlib.suppress(OSError):
        os.rmdir(folder)


def read_trainer_state(folder_url: str) -> dict[str, Any]:
    return storage.read_json(storage.join(folder_url, TRAINER_STATE))


def read_latest(run_url: str) -> str | None:
    """The newest committed checkpoint of a run (what sampling and export use), or None."""
    found = committed_steps(run_url)
    return found[0] if found else None


def load_ema_model(folder: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The network of a checkpoint with its EMA weights, without DeepSpeed (for sampling/export)."""
    with _local_copy(folder) as local:
        with open(os.path.join(local, STAGE_INFO)) as f:
            info = json.load(f)
        model = rebuild(info)
        model.load_state_dict(load_file(os.path.join(local, "ema.safetensors")))
    return model.eval().requires_grad_(False), info


@contextlib.contextmanager
def _local_copy(folder_url: str):
    """An OS path of a checkpoint folder: itself when local, else a copy removed afterwards."""
    if storage.is_local(folder_url):
        yield storage.local_path(folder_url)
        return
    with tempfile.TemporaryDirectory(prefix="unclip-checkpoint-") as tmp:
        yield storage.download_dir(folder_url, tmp)


def read_stage_info(folder: str) -> dict[str, Any]:
    """What a checkpoint's stage.json says: its networks' classes and configs, extras, diffusion."""
    return storage.read_json(storage.join(folder, STAGE_INFO))


def load_ema_checkpoint(folder_or_run: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(stage.json, EMA weights) of a step folder, or of a run's newest checkpoint (--init-from)."""
    folder = (
        folder_or_run if STEP_DIR.fullmatch(os.path.basename(folder_or_run.rstrip("/"))) else read_latest(folder_or_run)
    )
    if folder is None:
        raise CheckpointError(f"--init-from '{folder_or_run}': no committed checkpoint there")
    problems = verify(folder)
    if problems:
        raise CheckpointError("--init-from: " + "; ".join(problems))
    with _local_copy(folder) as local:
        with open(os.path.join(local, STAGE_INFO)) as f:
            info = json.load(f)
        return info, load_file(os.path.join(local, "ema.safetensors"))
