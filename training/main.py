"""Entry point of one training rank: `python -m training.main --stage S --config RESOLVED.yaml`.

Launchers (torchrun, deepspeed, srun, Ray) start this once per rank; `unclip train` resolves and
validates the configuration first and hands every rank the same file.

Exit status: 0 when done or when preempted after saving; 2 for a run that must not go on
(non-finite streak, unusable checkpoint); 3 when a collective timed out.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from launch import config as config_mod
from launch.configlib import read_yaml, to_yaml
from launch.environment import apply_in_rank


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
    except (NonFiniteStreak, CheckpointError) as err:
        print(f"train {args.stage}: error: {err}", file=sys.stderr, flush=True)
        return 2
    except RuntimeError as err:
        text = str(err)
        if "timed out" in text.lower() or "timeout" in text.lower():
            print(f"train {args.stage}: error: a collective timed out after train.collective_timeout_s="
                  f"{cfg.train.collective_timeout_s}s (a rank stopped answering): {text.splitlines()[0]}", file=sys.stderr, flush=True)  # fmt: skip
            return 3
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
