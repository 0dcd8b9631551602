"""The `unclip` command: every subcommand reads a YAML config plus key=value overrides,
validates all of it, says what it will do, then does it.

Each command's modules are imported when that command runs, not here: `unclip --help` and a
configuration error answer at once instead of after loading torch, Ray and DeepSpeed."""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from models.base.process import exit_now

if TYPE_CHECKING:
    from launch.config import Config

Log = Callable[[str], None]

COMMANDS = {
    "ingest": "download a URL list into ROOT/raw/ (Ray + img2dataset)",
    "encoders": "`encoders init`: small random encoders; `encoders fit`: train them on ROOT/raw/ "
    "(the embedded default)",
    "embed": "frozen CLIP/VAE over ROOT/raw/ into the embedding store ROOT/store/ (Ray tasks and encoder actors)",
    "manifest": "`manifest [URL]`: rebuild a store's parts index and manifest from its committed parts; "
    "converts older stores",
    "train": "`train STAGE`: train one stage (prior, decoder, upsampler, ldm) with DeepSpeed from the store",
    "sample": "prompts -> images by the ldm and unCLIP chains; variations; interpolations",
    "eval": "score the trained stages on the store's held-out rows (eval.json + grid)",
    "export": "`export --out DIR`: every trained stage as diffusers folders, with a model card",
    "inspect": "`inspect [URL]`: summarise an embedding store (default: ROOT/store)",
    "demo": "the whole pipeline on the embedded default data set",
    "launch": "`launch train STAGE --backend B`, `launch ingest|embed --address URL`, `launch status|stop JOB`: "
    "across nodes",
}

# `unclip launch` flags, each a shorthand for a config key
LAUNCH_FLAGS = {
    "--backend": ("launch.backend", "torchrun, deepspeed, slurm or ray"),
    "--nodes": ("launch.nodes", "number of nodes"),
    "--gpus-per-node": ("launch.gpus_per_node", "training processes per node"),
    "--master-addr": ("launch.master_addr", "node 0's address (rendezvous)"),
    "--master-port": ("launch.master_port", "node 0's port"),
    "--address": ("launch.address", "Ray Jobs API, http://HEAD:8265 (with --backend ray: the Ray cluster, e.g. auto)"),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unclip", description="Distributed training of text-to-image diffusion.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == "train":
            from training.stages import STAGE_NAMES

            p.add_argument("stage", choices=STAGE_NAMES)
            p.add_argument("--resume-from", help="resume from this step_NNNNNNN folder (default: the run's newest)")
            p.add_argument(
                "--init-from",
                help="start from these weights: our step or run folder (its EMA), or public diffusers weights "
                "(a StableDiffusionPipeline or UnCLIPPipeline folder, one component's folder, or a hub repo id)",
            )
        if name == "encoders":
            p.add_argument("action", choices=["init", "fit"])
        if name in ("inspect", "manifest"):
            p.add_argument("url", nargs="?", help="store URL (default: ROOT/store)")
        if name == "inspect":
            p.add_argument("--rows", type=int, default=3, help="sample rows to show")
        if name == "demo":
            p.add_argument("--workdir", default="demo-run", help="where data, runs and report.json go")
        if name == "export":
            p.add_argument("--out", required=True, help="folder (any fsspec URL) to write")
        if name == "launch":
            p.add_argument("action", choices=["train", "ingest", "embed", "status", "stop"])
            p.add_argument("target", nargs="?", help="train: the stage; status/stop: the job id")
            for flag, (key, help_text) in LAUNCH_FLAGS.items():
                p.add_argument(flag, help=f"{help_text} (= {key})")
            p.add_argument("--dry-run", action="store_true", help="print what would run on each node, start nothing")
            p.add_argument("--submit", action="store_true", help="slurm: run sbatch (= launch.slurm.submit=true)")
            p.add_argument("--wait", action="store_true", help="data jobs: stream the job's log until it ends")
            p.add_argument("--resume-from", help="train: resume from this step_NNNNNNN folder")
            p.add_argument("--init-from", help="train: start from these EMA weights")
        p.add_argument("--config", help="YAML configuration (defaults: the embedded default)")
        p.add_argument("--debug", action="store_true", help="on failure, the traceback rather than one line")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.steps=100 root=s3://bucket/x")
    return parser


def _parse(argv: list[str] | None) -> argparse.Namespace:
    # Overrides may stand before or after options; argparse's subparsers cannot intermix, so
    # whatever it leaves over must be key=value.
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    stray = [r for r in rest if "=" not in r or r.startswith("-")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    args.overrides = list(args.overrides) + rest
    for positional in ("url", "target"):  # `unclip inspect root=...`: an override, not a URL
        if getattr(args, positional, None) and re.match(r"^[A-Za-z_][\w.]*=", getattr(args, positional)):
            args.overrides.insert(0, getattr(args, positional))
            setattr(args, positional, None)
    if args.command == "launch":
        args.overrides += _launch_overrides(args, parser)
    return args


def _launch_overrides(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[str]:
    from training.stages import STAGE_NAMES

    if args.action == "train" and args.target not in STAGE_NAMES:
        parser.error(f"launch train: expected a stage ({', '.join(STAGE_NAMES)}), got {args.target!r}")
    if args.action in ("status", "stop") and not args.target:
        parser.error(f"launch {args.action}: expected a job id")
    overrides = [
        f"{key}={getattr(args, flag[2:].replace('-', '_'))}"
        for flag, (key, _) in LAUNCH_FLAGS.items()
        if getattr(args, flag[2:].replace("-", "_")) is not None
    ]
    if args.action == "train" and args.backend == "ray" and args.address:
        overrides = [o.replace("launch.address=", "ray.address=") for o in overrides]
    return overrides + (["launch.slurm.submit=true"] if args.submit else [])


def _setup_environment() -> None:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def main(argv: list[str] | None = None) -> int:
    """Run one command; any failure is one line on stderr and an exit code (2: bad input or
    configuration, 1: a job that failed), with the traceback only under --debug."""
    _setup_environment()
    args = _parse(argv)
    from launch import config as config_mod
    from models.base.errors import JobFailed, StorageUnavailable, UserError

    log = lambda msg: print(msg, flush=True)  # noqa: E731
    try:
        overrides = list(args.overrides)
        if args.command == "demo":
            from launch.demo import demo_overrides

            overrides = demo_overrides(args.workdir) + overrides
        cfg = config_mod.load(args.config, overrides)
        return _dispatch(args, cfg, log)
    except (UserError, FileNotFoundError, JobFailed, StorageUnavailable) as err:
        if args.debug:
            raise
        print(f"unclip {args.command}: error: {err}", file=sys.stderr)
        return getattr(err, "exit_code", 2)
    except KeyboardInterrupt:
        print(f"unclip {args.command}: interrupted; what was committed is kept, run it again to go on", file=sys.stderr)
        return 130
    except Exception as err:  # not one of ours: still one line, the traceback on request
        if args.debug:
            raise
        first = (str(err).strip().splitlines() or [""])[0]
        print(
            f"unclip {args.command}: error: {type(err).__name__}: {first} (rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


def _dispatch(args: argparse.Namespace, cfg: Config, log: Log) -> int:
    if args.command in _IN_PROCESS:
        from launch.environment import use_machine

        use_machine()  # the in-process work (fitting, sampling) on every usable core; ranks and actors set their own
    return _HANDLERS[args.command](args, cfg, log)


def _ingest(args: argparse.Namespace, cfg: Config, log: Log) -> int:
    from data_pipeline import ingest
    from models.base.configlib import to_yaml

    log(f"ingest: {cfg.ingest.url_list} -> {cfg.raw_url} (Ray: {cfg.ray.address or 'local'})")
    summary = ingest.run(cfg.ingest, cfg.ray, cfg.raw_url, to_yaml(cfg), log=log)
    log(
        f"ingest: kept {summary['kept']} of {summary['input_rows']}; failed by reason {summary['failed_by_reason']}; "
        f"refused by reason {summary['refused_by_reason']}"
    )
    return 0


def _encoders(args: argparse.Namespace, cfg: Config, log: Log) -> int:
    if args.action == "init":
        from models.encoders import write_tiny_encoders

        log(f"encoders init: {write_tiny_encoders(cfg.encoders)}")
    else:
        from launch.demo import fit_encoders

        fit_encoders(cfg, log)
    return 0


def _embed(args: argparse.Namespace, cfg: Config, log: Log) -> int:
    from data_pipeline import embed
    from models.base.configlib import to_dict

    log(f"embed: {cfg.raw_url} -> {cfg.store_url} with {cfg.encoders.clip.model} / {cfg.encoders.vae.path}")
    embed.run(cfg.encoders, cfg.embed, cfg.ray, cfg.raw_url, cfg.store_url, to_dict(cfg), log=log)
    return 0


def _manifest(args: argparse.Namespace, cfg: Config, log: Log) -> int:
    from data_pipeline import store_writer

    store_writer.rebuild(args.url or cfg.store_url, cfg.ray, log=log)
    return 0


def _train(args: argparse.Namespace, cfg: Config, log: Log) -> int:
    from launch.train import train_local

    _say_trained(args.stage, train_local(cfg, args.stage, args.resume_from, args.init_from, log=log), log)
    return 0


def _sample(args: argparse.Namespace, cfg: Config, log: Log) -> int:
    from launch import sample

    sample.run(cfg, log=log)
    return 0


def _eval(args: argparse.Namespace, cfg: Config, log: Log) -> int:
    from launch import evaluate

    evaluate.run(cfg, log=log)
    return 0


def _export(args: argparse.Namespace, cfg: Config, log: Log) -> int:
    from launch import export

    export.run(cfg, args.out, log=log)
    return 0


def _inspect(args: argparse.Namespace, cfg: Config, log: Log) -> int:
    from data_pipeline.store import describe, open_store

    print(describe(open_store(args.url or cfg.store_url), args.rows))
    return 0


def _demo(args: argparse.Namespace, cfg: Config, log: Log) -> int:
    from launch import demo

    demo.run(cfg, args.workdir, log=log)
    return 0


def _say_trained(stage: str, summary: dict | None, log: Log) -> None:
    if not summary or summary.get("preempted") or "last_loss" not in summary:
        return
    if summary["first_loss"] is None:  # resumed at its last step: nothing left to train
        log(f"train {stage}: already at step {summary['steps']}; {summary['checkpoint']}")
    else:
        log(f"train {stage}: loss {summary['first_loss']:.4f} -> {summary['last_loss']:.4f}; {summary['checkpoint']}")


def _launch(args: argparse.Namespace, cfg: Config, log: Log) -> int:
    from launch import jobs

    if args.action == "train":
        from launch.multinode import launch_train

        _say_trained(
            args.target, launch_train(cfg, args.target, args.resume_from, args.init_from, args.dry_run, log), log
        )
        return 0
    if args.action in ("ingest", "embed"):
        result = jobs.submit(cfg, args.action, args.wait, args.dry_run, log)
        return 0 if result.get("status", "SUCCEEDED") == "SUCCEEDED" else 1
    if args.action == "status":
        return 0 if jobs.status(cfg, args.target, log) in ("SUCCEEDED", "RUNNING", "PENDING") else 1
    jobs.stop(cfg, args.target, log)
    return 0


# Each command's handler, which imports the command's modules when it runs (see the module's docstring)
_HANDLERS: dict[str, Callable[[argparse.Namespace, Config, Log], int]] = {
    "ingest": _ingest,
    "encoders": _encoders,
    "embed": _embed,
    "manifest": _manifest,
    "train": _train,
    "sample": _sample,
    "eval": _eval,
    "export": _export,
    "inspect": _inspect,
    "demo": _demo,
    "launch": _launch,
}
# The commands that compute in this process, on every usable core (see _dispatch)
_IN_PROCESS = frozenset({"encoders", "sample", "eval", "export", "demo"})


def run() -> None:
    """The `unclip` command: `main`, then exit without tearing the interpreter down."""
    exit_now(main())


if __name__ == "__main__":
    run()
