"""Entry point of one training rank: `python -m training.main --stage S --config RESOLVED.yaml`.

Launchers (torchrun, deepspeed, srun, Ray) start this once per rank; `unclip train` resolves
and validates the configuration first and hands every rank the same file.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from launch import config as config_mod
from launch.configlib import read_yaml, to_yaml
from training.engine import train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.main")
    parser.add_argument("--stage", required=True)
    parser.add_argument("--config", required=True, help="resolved configuration (YAML)")
    args = parser.parse_args(argv)
    # DeepSpeed's ZeRO calls a collective torch has renamed; the notice repeats every step.
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
    cfg = config_mod.from_dict(read_yaml(args.config))
    train(cfg, args.stage, to_yaml(cfg), log=lambda msg: print(msg, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
