"""Entry point of one training rank: `python -m training.main --stage S --config RESOLVED.yaml`.

Launchers (torchrun, deepspeed, srun, Ray) start this once per rank; `unclip train` resolves and
validates the configuration first and hands every rank the same file.

Exit status: 0 when done or when preempted after saving; 2 for a run that must not go on
(non-finite streak, unusable checkpoint); 3 when a collective timed out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

from data_pipeline.errors import UserError
from data_pipeline.storage import StorageUnavailable
from launch import config as config_mod
from launch.configlib import read_yaml, to_yaml
from launch.environment import apply_in_rank


RANK_ERRORS = "UNCLIP_RANK_ERRORS"  # a folder where a failing rank leaves its one line for `unclip train`


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.main")
    parser.add_argument("--stage", required=True)
    parser.add_argument("--config", required=True, help="resolved configuration (YAML)")
    parser.add_argument("--resume-from", help="a step_NNNNNNN folder (or a run folder: its newest checkpoint)")
    parser.add_argument("--init-from", help="start a new run from these EMA weights (fine-tuning)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # DeepSpeed's ZeRO calls a collective torch has renamed; the notice repeats every step.
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)

    from training.checkpoint import CheckpointError
    from training.engine import train
    from training.failures import NonFiniteStreak, Preempted

    cfg = config_mod.from_dict(read_yaml(args.config))
    apply_in_rank(cfg.launch.env)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    try:
        train(cfg, args.stage, to_yaml(cfg), resume_from=args.resume_from, init_from=args.init_from, log=log)
    except Preempted as done:
        log(str(done))
        return 0
    except UserError as err:  # bad input met by the ranks, e.g. a store part that fails its sha256
        return report(args.stage, str(err), 2, cli_code=2)
    except (NonFiniteStreak, CheckpointError, StorageUnavailable) as err:
        return report(args.stage, str(err), 2, cli_code=1)
    except RuntimeError as err:
        text = str(err)
        if "timed out" in text.lower() or "timeout" in text.lower():
            return report(args.stage, f"a collective timed out after train.collective_timeout_s={cfg.train.collective_timeout_s}s "
                                      f"(a rank stopped answering): {text.splitlines()[0]}", 3, cli_code=1)  # fmt: skip
        raise
    return 0


def report(stage: str, message: str, status: int, cli_code: int) -> int:
    """Say why this rank stops: to `unclip train` (which says it once, in one line, with `cli_code`)
    when it started us, else on stderr. Returns the rank's exit status."""
    folder = os.environ.get(RANK_ERRORS)
    if folder and os.path.isdir(folder):
        rank = int(os.environ.get("RANK", "0"))
        with open(os.path.join(folder, f"rank-{rank:05d}.json"), "w") as f:
            json.dump({"message": f"train {stage}: {message}", "exit_code": cli_code}, f)
    else:
        print(f"train {stage}: error: {message}", file=sys.stderr, flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
