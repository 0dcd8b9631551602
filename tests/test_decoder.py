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


def test_upsamplers_take_their_own_step_count_in_the_unclip_chain():
    from models import chains, upsampler
    from models.config import DiffusionConfig, UpsamplerConfig
    from models.diffusion import Diffusion

    dec = small(patch=4)
    up_cfg = UpsamplerConfig(low=32, high=64, block_channels=[8, 16])
    up = chains.Net(upsampler.build_upsampler(up_cfg), Diffusion(up_cfg.diffusion), {"low": 32, "high": 64})
    calls = {"decoder": 0, "upsampler": 0}
    dec.unet.register_forward_hook(lambda *_: calls.__setitem__("decoder", calls["decoder"] + 1))
    up.model.register_forward_hook(lambda *_: calls.__setitem__("upsampler", calls["upsampler"] + 1))
    text = {"emb": torch.randn(2, 8), "tokens": torch.randn(2, 5, 8)}
    dec_net = chains.Net(dec, Diffusion(DiffusionConfig(prediction="x0")), {})
    for upsampler_steps, expected in ((2, 2), (None, 3)):  # None: the chain's own steps
        calls.update(decoder=0, upsampler=0)
        levels = chains.decode_embeddings(dec_net, [up], torch.randn(2, 8), text, 3, 1.0, torch.Generator().manual_seed(0),
                                          upsampler_steps)  # fmt: skip
        assert [lvl.shape[-1] for lvl in levels] == [32, 64]
        assert calls == {"decoder": 3, "upsampler": expected}
