"""Training previews: every stage draws its preview from the averaged weights, where the average lives."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_pipeline.store import open_store
from launch import config
from launch.rank import stage_for
from models.encoders import vae_identity, write_tiny_encoders
from tests.support.storefactory import make_store
from training.ema import EMA
from training.engine import ema_model

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]
PREVIEWS = {  # stage -> (preview name, grid size of 4 rows)
    "prior": ("prior_true_vs_nearest", (2 * 64, 4 * 64)),
    "decoder": ("decoder_true_vs_sampled", (2 * 64, 4 * 64)),  # cells the size of the true image_64
    "ldm": ("ldm", (4 * 32, 32)),  # the store's 8x8 latents are 32 px pictures
    "upsampler": ("upsampler_bicubic_sampled_true", (3 * 256, 4 * 256)),
}


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    """A store whose latents were made (as far as its manifest says) by the tiny VAE written beside it."""
    cfg = config.load(None, [f"root={tmp_path_factory.mktemp('previews')}"])
    write_tiny_encoders(cfg.encoders)
    make_store(cfg.store_url, (6, 5), vae=vae_identity(cfg.encoders.vae))
    return cfg


def averaged(cfg, name: str, device: str):
    """The stage and its network as the engine previews it: rebuilt from an EMA kept on `device`."""
    stage = stage_for(cfg, name, open_store(cfg.store_url))
    torch.manual_seed(0)
    model = stage.build_model()
    ema = EMA(model, 0.9, device=device)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    ema.update(model)
    return stage, ema_model(stage.describe(model), ema.state_dict(), ema.device), ema


@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter")
def test_the_previewed_network_holds_the_average_where_it_lives(cfg):
    """Without a GPU, "meta" stands in for the average's device: the network must be built there."""
    stage, model, ema = averaged(cfg, "ldm", "cpu")
    average = ema.state_dict()
    assert all(torch.equal(p, average[n]) for n, p in model.named_parameters())
    assert not any(
        torch.equal(p, q)
        for p, q in zip(model.parameters(), stage.build_model().parameters(), strict=True)
        if p.numel() > 1
    )
    elsewhere = ema_model(stage.describe(model), ema.state_dict(), torch.device("meta"))
    assert {p.device.type for p in elsewhere.parameters()} == {"meta"}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(PREVIEWS))
def test_every_stage_previews_on_the_averages_device(cfg, name, device):
    stage, model, _ = averaged(cfg, name, device)
    [(title, picture)] = stage.preview(model)
    assert (title, picture.size) == PREVIEWS[name]
    if device != "cpu":  # the same preview as the CPU draws
        _, on_cpu, _ = averaged(cfg, name, "cpu")
        [(_, theirs)] = stage_for(cfg, name, open_store(cfg.store_url)).preview(on_cpu)
        difference = np.abs(np.asarray(picture, np.float32) - np.asarray(theirs, np.float32))
        assert difference.mean() < 2.0, (
            f"{name}: mean pixel difference {difference.mean():.2f} between {device} and cpu"
        )
