"""One training rank: `python -m launch.rank --stage S --config RESOLVED.yaml`.

Every launcher starts this once per rank: torchrun and the deepspeed launcher as a module, SLURM
through a torchrun agent per node, Ray Train as its worker function (`run_rank`). `unclip train`
and `unclip launch` resolve and validate the configuration first and hand every rank the same file.
This is where the configuration meets the engine: the engine (training/engine.py) gets only its
train settings, a stage built from its own section, the store and the run folder.

Exit status: 0 when done or when preempted after saving; 2 for a run that must not go on
(non-finite streak, unusable checkpoint, bad input); 3 when a collective timed out or lost its peer
(another rank's process or node is gone: launch/rank_failures.py names the cause).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

from data_pipeline.store import Store, open_store
from launch import config as config_mod
from launch.config import Config
from launch.environment import apply_in_rank
from launch.rank_failures import KEPT, LOST_PEER, RANK_ERRORS, host, lost_peer
from models.base import storage
from models.base.configlib import read_yaml, to_yaml
from models.base.errors import StorageUnavailable, UserError
from models.base.ports import free_port
from models.base.process import exit_now
from training.checkpoint import CheckpointError
from training.engine import train
from training.failures import NonFiniteStreak, Preempted
from training.stage import Preview, Stage
from training.stages import get_stage


def stage_for(cfg: Config, name: str, store: Store) -> Stage:
    """Stage `name` from its own config section, previewing as `unclip sample` draws (its guidance
    scale, its steps, the configured VAE); refuses a store it cannot train on."""
    s = cfg.sample
    preview = {
        "ldm": Preview(guidance=s.guidance, vae=cfg.encoders.vae),
        "decoder": Preview(guidance=s.decoder_guidance, vae=cfg.encoders.vae),
        "prior": Preview(guidance=s.prior_guidance),
        "upsampler": Preview(steps=s.upsampler_steps),
    }
    if name not in preview:
        raise ValueError(f"unknown stage {name!r} (expected one of {', '.join(sorted(preview))})")
    return get_stage(name)(getattr(cfg, name), store, preview[name])


def run_rank(
    cfg: Config,
    stage_name: str,
    resume_from: str | None = None,
    init_from: str | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train `stage_name` as one rank of the process group the launcher set up (or alone: a
    process started without a launcher is a world of one)."""
    apply_in_rank(cfg.launch.env)
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    cfg = config_mod.for_stage(cfg, stage_name)
    store = open_store(cfg.store_url)
    stage = stage_for(cfg, stage_name, store)
    return train(cfg.train, stage, store, cfg.run_url(stage_name), to_yaml(cfg), resume_from, init_from, log=log)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m launch.rank")
    parser.add_argument("--stage", required=True)
    parser.add_argument("--config", required=True, help="resolved configuration (YAML)")
    parser.add_argument("--resume-from", help="a step_NNNNNNN folder (or a run folder: its newest checkpoint)")
    parser.add_argument("--init-from", help="start a new run from these EMA weights (fine-tuning)")
    return parser


def skip_unused_imports() -> None:
    """Imports a rank never uses, each a second or more of every rank's start (and of every
    restart of one; measured with -X importtime in a CPU rank that spends 8 of its 9 s importing):
    diffusers imports transformers' model code (1.7 s) whenever that package is installed, and
    scipy.stats (1.3 s) for a sigma schedule (beta sigmas) no stage uses; told neither is there,
    it skips both.
    Only in a process that is a rank and nothing else: one that goes on to export pipelines needs
    diffusers to know transformers is there."""
    import diffusers.utils.import_utils as available  # lazy: before any diffusers model is imported, here only

    available._transformers_available = False
    available._scipy_available = False


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    skip_unused_imports()
    # DeepSpeed's ZeRO calls a collective torch has renamed; the notice repeats every step.
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
    cfg = config_mod.for_stage(config_mod.from_dict(read_yaml(args.config)), args.stage)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    try:
        run_rank(cfg, args.stage, args.resume_from, args.init_from, log=log)
    except Preempted as done:
        log(str(done))
        return 0
    except UserError as err:  # bad input met by the ranks, e.g. a store part that fails its sha256
        return report(args.stage, str(err), 2, cli_code=2)
    except (NonFiniteStreak, CheckpointError, StorageUnavailable) as err:
        return report(args.stage, str(err), 2, cli_code=1)
    except RuntimeError as err:
        text = str(err)
        peer = lost_peer(text)
        if peer:
            rank = os.environ.get("RANK", "0")
            return report(
                args.stage,
                f"rank {rank} on {host()} lost its peer ({peer}): another rank's process or its node is gone; {KEPT}",
                3,
                cli_code=1,
                kind=LOST_PEER,
                peer=peer,
            )
        if "timed out" in text.lower() or "timeout" in text.lower():
            return report(
                args.stage,
                f"a collective timed out after train.collective_timeout_s={cfg.train.collective_timeout_s}s "
                f"(a rank stopped answering): {text.splitlines()[0]}",
                3,
                cli_code=1,
            )
        raise
    return 0


def report(stage: str, message: str, status: int, cli_code: int, **facts: str) -> int:
    """Say why this rank stops: to `unclip train` (which says it once, in one line, with `cli_code`)
    when it started us, else on stderr. Returns the rank's exit status."""
    folder = os.environ.get(RANK_ERRORS)
    if folder and os.path.isdir(folder):
        rank = int(os.environ.get("RANK", "0"))
        with open(os.path.join(folder, f"rank-{rank:05d}.json"), "w") as f:
            line = {"message": f"train {stage}: {message}", "exit_code": cli_code, "rank": rank, "host": host()}
            f.write(storage.strict_json({**line, **facts}))
    else:
        print(f"train {stage}: error: {message}", file=sys.stderr, flush=True)
    return status


if __name__ == "__main__":
    exit_now(main())
