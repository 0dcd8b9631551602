"""The first real path end to end, on a smaller configuration than the demo:
generate -> serve -> ingest -> encoders -> embed -> train ldm + prior (2 ranks, DeepSpeed) -> sample,
then resume a training run from `latest` and check it continues exactly."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from data_pipeline import storage
from launch import config, demo
from launch.train import train_local

pytestmark = pytest.mark.slow

SMALL = [
    "synthetic.count=48",
    "ingest.shard_size=20",
    "embed.batch_size=16",
    "train.steps=8",
    "train.batch_size=8",
    "train.log_every=2",
    "train.checkpoint_every=4",
    "train.optim.warmup_steps=2",
    "ldm.block_channels=[32, 64]",
    "prior.layers=2",
    "sample.steps=4",
    "sample.prompts=[a red circle on a blue background, a green square on a white background]",
]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, local_ray):
    workdir = tmp_path_factory.mktemp("demo")
    cfg = config.load(None, demo.demo_overrides(str(workdir)) + SMALL)
    report = demo.run(cfg, str(workdir), log=print)
    return cfg, workdir, report


def test_report_describes_every_phase(pipeline):
    cfg, workdir, report = pipeline
    assert json.loads((workdir / "report.json").read_text()) == report
    phases = report["phases"]
    assert list(phases) == ["generate", "ingest", "encoders", "embed", "train_ldm", "train_prior", "sample"]
    assert all(p["wall_s"] > 0 for p in phases.values())
    assert phases["ingest"]["kept"] == 48 and phases["ingest"]["failed"] == 3
    assert phases["ingest"]["failed_by_reason"] == {"decode_error": 2, "http_4xx": 1}
    assert phases["embed"]["rows"] == 48
    for stage in ("ldm", "prior"):
        entry = phases[f"train_{stage}"]
        assert entry["steps"] == 8 and entry["checkpoint"].endswith("step_0000008")
        assert entry["first_loss"] > 0 and entry["last_loss"] > 0
    assert phases["train_ldm"]["last_loss"] < phases["train_ldm"]["first_loss"]
    images = phases["sample"]["ldm_images"] + phases["sample"]["prior_images"]
    assert len(images) == 2 * 4 + 2
    for path in images + [phases["sample"]["ldm_grid"]]:
        with Image.open(path) as im:
            assert im.size[0] >= 64 and im.mode == "RGB"


def test_store_manifest_follows_the_contract(pipeline):
    cfg, _, _ = pipeline
    manifest = storage.read_json(storage.join(cfg.store_url, "manifest.json"))
    clip, vae = manifest["encoders"]["clip"], manifest["encoders"]["vae"]
    assert clip["weights_sha256"] == storage.sha256_file(os.path.join(cfg.root, "encoders", "clip", "open_clip_model.safetensors"))
    assert vae["weights_sha256"] == storage.sha256_file(os.path.join(cfg.root, "encoders", "vae", "diffusion_pytorch_model.safetensors"))
    assert vae["scaling_factor"] > 0
    assert manifest["columns"]["clip_text_tokens"] == {"dtype": "float16", "shape": [32, 64]}
    assert manifest["columns"]["vae_latent"] == {"dtype": "float16", "shape": [4, 16, 16], "image_side": 64}
    assert len(manifest["clip_image_emb_mean"]) == len(manifest["clip_image_emb_std"]) == 64
    assert sum(s["rows"] for s in manifest["shards"]) == manifest["totals"]["rows"] == 48
    for shard in manifest["shards"]:
        assert storage.sha256_file(storage.join(cfg.store_url, shard["file"])) == shard["sha256"]
    assert manifest["config"]["train"]["steps"] == 8  # the config that produced it


def test_resolved_config_is_saved_beside_every_output(pipeline):
    cfg, workdir, _ = pipeline
    saved = [
        storage.join(cfg.raw_url, "_config.yaml"),
        storage.join(cfg.run_url("ldm"), "config.yaml"),
        storage.join(cfg.run_url("prior"), "step_0000008", "config.yaml"),
        storage.join(cfg.sample.out, "config.yaml"),
        str(workdir / "config.yaml"),
    ]
    from launch.configlib import read_yaml

    for path in saved:
        assert config.from_dict(read_yaml(path)) == cfg, path


def test_training_resumes_from_latest_exactly(pipeline):
    """A run stopped at step 4 and started again ends where the uninterrupted run ended."""
    cfg, _, _ = pipeline
    straight = cfg.run_url("ldm")
    resumed = cfg.run_url("ldm", "resumed")
    os.makedirs(resumed)
    shutil.copytree(os.path.join(straight, "step_0000004"), os.path.join(resumed, "step_0000004"))
    storage.write_text(os.path.join(resumed, "latest"), "step_0000004\n")
    resumed_cfg = config.load(None, [f"root={cfg.root}", "train.run=resumed", *SMALL])
    summary = train_local(resumed_cfg, "ldm", log=print)
    assert summary["resumed_from_step"] == 4 and summary["checkpoint"].endswith("step_0000008")
    assert storage.read_text(os.path.join(resumed, "latest")).strip() == "step_0000008"
    for name in ("ema.safetensors",):
        a = load_file(os.path.join(straight, "step_0000008", name))
        b = load_file(os.path.join(resumed, "step_0000008", name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a = torch.load(os.path.join(straight, "step_0000008", "mp_rank_00_model_states.pt"), weights_only=False)["module"]
    b = torch.load(os.path.join(resumed, "step_0000008", "mp_rank_00_model_states.pt"), weights_only=False)["module"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # keep_last=3 by default: step 4 and 8 are both still there; the loss history continued
    state = json.loads(open(os.path.join(resumed, "step_0000008", "trainer_state.json")).read())
    assert [h["step"] for h in state["history"]] == [2, 4, 6, 8]
