"""`unclip demo --workdir DIR`: the whole pipeline on the embedded default data set.

generate captioned shapes -> serve them on 127.0.0.1 -> ingest (Ray + img2dataset) -> write the
small random encoders -> embed (Ray tasks + encoder actors) -> train ldm, prior, decoder and upsampler (DeepSpeed,
torchrun) -> sample both chains -> eval on held-out rows -> DIR/report.json. Every step is the
real component at small size.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from typing import Any

from data_pipeline import embed, encoder_fit, ingest, synthetic
from data_pipeline.ray_runtime import ray_session
from data_pipeline.sources import open_source
from launch import evaluate, sample
from launch.config import Config
from launch.train import train_local
from models.base import storage
from models.base.configlib import replace, to_dict, to_yaml
from models.encoders import write_tiny_encoders


def fit_encoders(cfg: Config, log=print) -> dict[str, Any]:
    """`unclip encoders fit`: the small encoders trained on what `unclip embed` will read."""
    e = cfg.embed
    report = encoder_fit.fit(
        cfg.encoders, open_source(e.input, cfg.raw_url, e.input_format, e.image_col, e.caption_col), log
    )
    storage.write_json(storage.join(cfg.root, "encoders", "fit_report.json"), report)
    return report


# What the embedded default trains each stage with, unless the user gives `train.stages` (which
# then replaces all of this, as a mapping replaces its default). The ldm at a constant learning rate: retrained on
# two demo stores (same seed,
# same data order, only the schedule changed) it read 93/87/97% and 100/100/100%
# shape/colour/background at guidance 3, against 93/73/83% and 95/97/97% with the cosine decay.
DEMO_STAGE_TRAIN = {
    "ldm": {"batch_size": 16, "steps": 1600, "optim": {"lr": 2e-3, "schedule": "constant"}},
    "decoder": {"batch_size": 16, "steps": 1600, "optim": {"lr": 2e-3}},
    "upsampler": {"batch_size": 8, "steps": 800},
}


def with_demo_training(cfg: Config) -> Config:
    return cfg if cfg.train.stages else replace(cfg, **{"train.stages": DEMO_STAGE_TRAIN})


def demo_overrides(workdir: str) -> list[str]:
    """Defaults that place everything under `workdir` (the user's own overrides come after)."""
    workdir = os.path.abspath(workdir)
    return [
        f"root={os.path.join(workdir, 'data')}",
        f"ingest.url_list={os.path.join(workdir, 'urls.parquet')}",
        # the embedded data set is served on 127.0.0.1: the one non-public address its ingest may reach
        "ingest.allow_networks=[127.0.0.1]",
    ]


@contextlib.contextmanager
def _phase(report: dict[str, Any], name: str, log) -> Iterator[dict[str, Any]]:
    log(f"== {name} ==")
    entry: dict[str, Any] = {}
    started = time.time()
    yield entry
    entry["wall_s"] = round(time.time() - started, 2)
    report["phases"][name] = entry
    log(f"== {name}: done in {entry['wall_s']:.1f}s ==")


def run(cfg: Config, workdir: str, log=print) -> dict[str, Any]:
    workdir = os.path.abspath(workdir)
    site = os.path.join(workdir, "site")
    # The served URLs carry a fresh port each time, and keys derive from URLs: start clean.
    for stale in (site, cfg.root, os.path.join(workdir, "report.json")):
        if storage.exists(stale):
            log(f"demo: removing {stale} from an earlier run")
            storage.remove(stale)
    report: dict[str, Any] = {"workdir": workdir, "root": cfg.root, "phases": {}}
    started = time.time()
    config_yaml = to_yaml(cfg)
    storage.makedirs(workdir)
    storage.write_text(os.path.join(workdir, "config.yaml"), config_yaml)

    with _phase(report, "generate", log) as entry:
        records = synthetic.generate(site, cfg.synthetic)
        entry.update(
            images=sum(r["broken"] is None for r in records), broken=sum(r["broken"] is not None for r in records)
        )

    with ray_session(cfg.ray):
        with synthetic.serve_directory(site) as base_url:
            synthetic.write_url_list(records, base_url, cfg.ingest.url_list)
            with _phase(report, "ingest", log) as entry:
                summary = ingest.run(cfg.ingest, cfg.ray, cfg.raw_url, config_yaml, log=log)
                entry.update({k: summary[k] for k in ("input_rows", "attempted", "kept", "failed", "failed_by_reason")})
                entry["raw"] = cfg.raw_url

        with _phase(report, "encoders", log) as entry:
            entry.update(fit_encoders(cfg, log) if cfg.demo.fit_encoders else write_tiny_encoders(cfg.encoders))

        with _phase(report, "embed", log) as entry:
            manifest = embed.run(cfg.encoders, cfg.embed, cfg.ray, cfg.raw_url, cfg.store_url, to_dict(cfg), log=log)
            entry.update(rows=manifest["totals"]["rows"], columns=list(manifest["columns"]), store=cfg.store_url)

    for stage in cfg.demo.stages:
        with _phase(report, f"train_{stage}", log) as entry:
            result = train_local(with_demo_training(cfg), stage, log=log)
            entry.update({k: result[k] for k in ("steps", "first_loss", "last_loss", "checkpoint")})

    with _phase(report, "sample", log) as entry:
        chains_ = [c for c in ("ldm", "unclip") if set(sample.CHAIN_STAGES[c]) <= set(cfg.demo.stages)]
        result = sample.run(replace(cfg, **{"sample.chains": chains_}), log=log)
        for chain in chains_:
            entry[f"{chain}_images"] = result[chain]["images"]
            entry[f"{chain}_grid"] = result[chain]["grid"]

    with _phase(report, "eval", log) as entry:
        entry.update(evaluate.run(cfg, log=log))

    report["total_wall_s"] = round(time.time() - started, 2)
    storage.write_json(os.path.join(workdir, "report.json"), report)
    log(f"demo: finished in {report['total_wall_s']:.0f}s; report {os.path.join(workdir, 'report.json')}")
    for key in ("ldm_grid", "unclip_grid"):
        if key in report["phases"]["sample"]:
            log(f"demo: {key.replace('_', ' ')} {report['phases']['sample'][key]}")
    return report
