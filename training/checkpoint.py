"""Checkpoints of a run: ROOT/runs/<stage>/<run>/step_NNNNNNN/ and a `latest` pointer.

A step folder holds the DeepSpeed state (model, optimizer, scheduler; DeepSpeed's own layout),
`ema.safetensors`, `stage.json` (how to rebuild the network without DeepSpeed), the trainer
state (step, loader position), one RNG file per rank and the resolved `config.yaml`.

Every rank writes into `.tmp-step_NNNNNNN/`; after a barrier rank 0 adds `_COMMITTED`, renames
the folder into place and only then rewrites `latest`. A reader that follows `latest` therefore
never sees a checkpoint some rank had not finished.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from data_pipeline import storage

LATEST = "latest"


def step_tag(step: int) -> str:
    return f"step_{step:07d}"


def read_latest(run_url: str) -> str | None:
    """The step folder `latest` names, or None for a run with no checkpoint yet."""
    pointer = storage.join(run_url, LATEST)
    if not storage.exists(pointer):
        return None
    tag = storage.read_text(pointer).strip()
    folder = storage.join(run_url, tag)
    if not storage.is_committed(folder):
        raise FileNotFoundError(f"checkpoint '{folder}' named by '{pointer}' is missing or incomplete")
    return folder


def _rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


@dataclass
class Checkpointer:
    run_url: str
    keep_last: int
    rank: int
    world_size: int

    def __post_init__(self) -> None:
        if not storage.is_local(self.run_url):
            raise ValueError(
                f"run folder '{self.run_url}': training checkpoints are written to a local or shared "
                "filesystem path for now (DeepSpeed writes OS paths); set root to one"
            )
        self.run_dir = storage.local_path(self.run_url)

    def _barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def save(
        self,
        engine,
        step: int,
        ema_state: dict[str, torch.Tensor],
        stage_info: dict[str, Any],
        trainer_state: dict[str, Any],
        config_yaml: str,
    ) -> str:
        tag = step_tag(step)
        tmp_tag = storage.TMP_PREFIX + tag
        tmp_dir = os.path.join(self.run_dir, tmp_tag)
        if self.rank == 0:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        self._barrier()
        engine.save_checkpoint(self.run_dir, tag=tmp_tag, save_latest=False)
        torch.save(_rng_state(), os.path.join(tmp_dir, f"rng-rank{self.rank:05d}.pt"))
        self._barrier()
        if self.rank == 0:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in ema_state.items()}, os.path.join(tmp_dir, "ema.safetensors"))
            with open(os.path.join(tmp_dir, "stage.json"), "w") as f:
                json.dump(stage_info, f, indent=2, default=str)
            with open(os.path.join(tmp_dir, "trainer_state.json"), "w") as f:
                json.dump({**trainer_state, "step": step, "world_size": self.world_size}, f, indent=2)
            with open(os.path.join(tmp_dir, "config.yaml"), "w") as f:
                f.write(config_yaml)
            with open(os.path.join(tmp_dir, storage.COMMIT_MARKER), "w") as f:
                f.write("ok\n")
            final = os.path.join(self.run_dir, tag)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp_dir, final)
            storage.write_text(storage.join(self.run_url, LATEST), tag + "\n")
            self._prune()
        self._barrier()
        return os.path.join(self.run_dir, tag)

    def _prune(self) -> None:
        steps = sorted(n for n in os.listdir(self.run_dir) if n.startswith("step_"))
        for old in steps[: -self.keep_last]:
            shutil.rmtree(os.path.join(self.run_dir, old), ignore_errors=True)

    def load(self, engine, folder: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """Restore DeepSpeed state and this rank's RNG; returns (trainer state, EMA weights)."""
        from safetensors.torch import load_file

        parent, tag = os.path.split(storage.local_path(folder))
        path, _ = engine.load_checkpoint(parent, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise FileNotFoundError(f"checkpoint '{folder}': DeepSpeed found nothing to load")
        with open(os.path.join(folder, "trainer_state.json")) as f:
            state = json.load(f)
        rng_file = os.path.join(folder, f"rng-rank{self.rank:05d}.pt")
        if os.path.exists(rng_file) and state["world_size"] == self.world_size:
            _set_rng_state(torch.load(rng_file, weights_only=False))
        return state, load_file(os.path.join(folder, "ema.safetensors"))


def load_ema_model(folder: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The network of a checkpoint with its EMA weights, without DeepSpeed (for sampling/export)."""
    import diffusers
    from safetensors.torch import load_file

    import tempfile

    local = storage.download_dir(folder, tempfile.mkdtemp(prefix="unclip-checkpoint-"))
    with open(os.path.join(local, "stage.json")) as f:
        info = json.load(f)
    model = getattr(diffusers, info["class"]).from_config(info["config"])
    model.load_state_dict(load_file(os.path.join(local, "ema.safetensors")))
    return model.eval().requires_grad_(False), info
