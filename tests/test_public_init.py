"""`unclip train <stage> --init-from` public weights: the ldm from a StableDiffusionPipeline
folder's unet; the prior, decoder (+ text_proj) and upsampler from an UnCLIPPipeline folder's;
each built from the weights' own config, checked against the store before any rank starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from launch import config
from launch.train import check_before_launch
from models.base.errors import UserError
from tests.support import public_layouts
from tests.support.storefactory import make_store

# one rank: ranks are the engine tests' subject; a tiny learning rate, so that after one step the
# trained weights and their average are still the loaded ones (to the optimizer's first step)
SETTINGS = [
    "train.nproc=1",
    "train.batch_size=4",
    "train.log_every=1",
    "train.progress_bar=never",
    "train.optim.lr=1e-9",
    "train.optim.warmup_steps=0",
    "decoder.space=pixel",
]


@pytest.fixture(scope="module")
def public(tmp_path_factory):
    base = tmp_path_factory.mktemp("public")
    make_store(str(base / "root" / "store"), (40, 30, 50, 24))
    return {
        "root": str(base / "root"),
        "sd": public_layouts.stable_diffusion(str(base / "sd")),
        "karlo": public_layouts.karlo(str(base / "karlo")),
    }


def train(root: str, stage: str, init_from: str, *overrides: str, wait: bool = True):
    command = [
        sys.executable,
        "-m",
        "launch.cli",
        "train",
        stage,
        f"root={root}",
        *SETTINGS,
        *overrides,
        "--init-from",
        init_from,
    ]
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    return finish(proc) if wait else proc


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def checkpoint(root: str, stage: str, run: str = "main") -> str:
    folder = os.path.join(root, "runs", stage, run)
    return os.path.join(folder, open(os.path.join(folder, "latest")).read().strip())


def public_weights(folder: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))


def assert_started_from(step_folder: str, modules: dict[str, str]) -> None:
    """Each network of the checkpoint has its public folder's config and (after one step at a
    tiny learning rate) its weights, in the EMA too."""
    info = json.load(open(os.path.join(step_folder, "stage.json")))
    ema = load_file(os.path.join(step_folder, "ema.safetensors"))
    for name, folder in modules.items():
        theirs = json.load(open(os.path.join(folder, "config.json")))
        recorded = info["modules"][name]
        assert recorded["class"] == theirs["_class_name"]
        assert {k: v for k, v in recorded["config"].items() if k in theirs and not k.startswith("_")} == {
            k: json.loads(json.dumps(v)) for k, v in theirs.items() if not k.startswith("_") and k in recorded["config"]
        }
        prefix = "" if name == "model" else f"{name}."
        for key, value in public_weights(folder).items():
            torch.testing.assert_close(ema[prefix + key], value, atol=1e-6, rtol=0, msg=f"{name}.{key}")


@pytest.mark.slow
def test_every_stage_starts_from_its_public_layout_and_resumes_as_it(public):
    root, sd, karlo = public["root"], public["sd"], public["karlo"]
    # the four stages at once, one rank each: their start-up (imports) is most of their time
    sources = {"ldm": sd, "prior": karlo, "decoder": karlo, "upsampler": os.path.join(karlo, "super_res_last")}
    running = {
        stage: train(root, stage, source, "train.steps=1", "train.checkpoint_every=1", wait=False)
        for stage, source in sources.items()
    }
    for result in (finish(proc) for proc in running.values()):
        assert result.returncode == 0, result.stderr[-3000:]
        assert "built from their own configs; optimizer and data order start fresh" in result.stdout
    assert_started_from(checkpoint(root, "ldm"), {"model": os.path.join(sd, "unet")})
    assert_started_from(checkpoint(root, "prior"), {"model": os.path.join(karlo, "prior")})
    assert_started_from(
        checkpoint(root, "decoder"),
        {"unet": os.path.join(karlo, "decoder"), "text_proj": os.path.join(karlo, "text_proj")},
    )
    assert_started_from(checkpoint(root, "upsampler"), {"model": os.path.join(karlo, "super_res_last")})
    # The same command again, for more steps: it resumes the run, with the public architecture
    # (its stage.json's), not the stage's settings; and a new run starts from that run's EMA.
    first = checkpoint(root, "ldm")
    resuming = train(root, "ldm", sd, "train.steps=2", "train.checkpoint_every=1", wait=False)
    tuned = finish(train(root, "ldm", first, "train.steps=1", "train.run=again", wait=False))
    resumed = finish(resuming)
    assert resumed.returncode == 0 and "resuming from" in resumed.stdout and "at step 1" in resumed.stdout, (
        resumed.stderr[-3000:]
    )
    assert tuned.returncode == 0 and "(EMA); optimizer and data order start fresh" in tuned.stdout, tuned.stderr[-3000:]
    info = json.load(open(os.path.join(checkpoint(root, "ldm", "again"), "stage.json")))
    assert info["modules"]["model"]["config"]["attention_head_dim"] == 2  # the public UNet's, not ldm.heads


def test_weights_that_do_not_fit_the_store_are_refused_before_any_rank_starts(public, tmp_path):
    root, karlo = public["root"], public["karlo"]
    wide = public_layouts.stable_diffusion(str(tmp_path / "wide"), cross_attention_dim=24)
    result = train(root, "ldm", wide, "train.run=wide")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert "unet/config.json cross_attention_dim is 24, but the width of the store's clip_text_tokens" in lines[
        0
    ] and lines[0].endswith("is 16")
    assert not os.path.exists(os.path.join(root, "runs", "ldm", "wide"))  # no rank started

    cfg = config.load(None, [f"root={root}"])
    refusals = {
        ("ldm", karlo): "the pipeline has no 'unet' component",
        ("prior", public["sd"]): "the pipeline has no 'prior' component",
        ("ldm", os.path.join(karlo, "prior")): "'unet' is a PriorTransformer, expected a UNet2DConditionModel",
        ("decoder", karlo): "decoder/config.json in_channels is 3, but decoder.space=latent on the store's vae_latent",
        (
            "upsampler",
            os.path.join(karlo, "decoder"),
        ): "'super_res_first' is a UNet2DConditionModel, expected a UNet2DModel",
        ("upsampler", str(tmp_path)): "neither a checkpoint of ours nor a diffusers folder",
        # a repo id goes to the hub for its configs: offline here (HF_HUB_OFFLINE), one line naming what it wanted
        (
            "ldm",
            "stabilityai/stable-diffusion-2-base",
        ): "'stabilityai/stable-diffusion-2-base': cannot read unet/config.json from the hub",
    }
    with pytest.raises(UserError, match="manifest lacks 'null_caption'"):  # a store embedded before it was recorded
        check_before_launch(config.load(None, [f"root={root}", "ldm.null_text=empty_caption"]), "ldm")
    for (stage, source), message in refusals.items():
        with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
            check_before_launch(cfg, stage, source)
