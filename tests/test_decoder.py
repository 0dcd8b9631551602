"""The unCLIP decoder's pixel folding: what the UNet sees, and what a saved decoder remembers."""

from __future__ import annotations

import pytest
import torch

from models import decoder
from models.assembly import describe, rebuild
from models.config import DecoderConfig


def small(patch: int, **kw) -> decoder.UnclipDecoder:
    torch.manual_seed(0)
    return decoder.build_decoder(DecoderConfig(block_channels=[16, 32], patch=patch, **kw), embed_dim=8, text_width=8, image_size=32)


def test_folded_unet_runs_at_image_over_patch_and_returns_full_images():
    model = small(patch=4)
    assert model.unet.config.sample_size == 8 and model.unet.config.in_channels == 48
    assert model.patch == 4 and model.image_size == 32
    cond = decoder.conditioning(torch.randn(2, 8), torch.randn(2, 8), torch.randn(2, 5, 8))
    out = decoder.predict(model, torch.randn(2, 3, 32, 32), torch.tensor([10, 500]), cond)
    assert out.shape == (2, 3, 32, 32)


def test_folding_keeps_each_pixel_in_its_own_channel_slot():
    """pixel_unshuffle then pixel_shuffle is the identity: an identity UNet gives back its input."""
    model = small(patch=2)

    class Identity(torch.nn.Module):
        config = model.unet.config

        def forward(self, x, t, **_):
            return type("Out", (), {"sample": x})()

    model.unet = Identity()
    x = torch.randn(1, 3, 32, 32)
    cond = decoder.conditioning(torch.randn(1, 8), torch.randn(1, 8), torch.randn(1, 5, 8))
    assert torch.equal(model(x, torch.tensor([3]), cond["image_emb"], cond["text_emb"], cond["tokens"], cond["image_dropped"]), x)


def test_attention_sits_at_the_levels_no_wider_than_attention_side():
    assert small(patch=1, attention_side=8).unet.config.down_block_types == ("DownBlock2D", "CrossAttnDownBlock2D")
    assert small(patch=2, attention_side=16).unet.config.down_block_types == ("CrossAttnDownBlock2D",) * 2


def test_a_saved_decoder_rebuilds_with_its_patch():
    model = small(patch=4)
    again = rebuild(describe("decoder", model, {}))
    assert again.patch == 4 and again.image_size == 32


def test_a_patch_that_does_not_divide_the_image_is_refused_by_name():
    with pytest.raises(ValueError, match="decoder.patch"):
        small(patch=3)
