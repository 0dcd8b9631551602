"""The unCLIP decoder's pixel folding and its latent variant: what the UNet sees, what a saved
decoder remembers, and how a latent decoder's samples become pictures."""

from __future__ import annotations

import math

import pytest
import torch

from models import decoder
from models.assembly import describe, rebuild
from models.config import DecoderConfig


def small(patch: int, **kw) -> decoder.UnclipDecoder:
    torch.manual_seed(0)
    return decoder.build_decoder(
        DecoderConfig(space="pixel", block_channels=[16, 32], patch=patch, **kw),
        embed_dim=8,
        text_width=8,
        image_size=32,
    )


def small_latent(channels: int) -> decoder.UnclipDecoder:
    torch.manual_seed(0)
    return decoder.build_decoder(
        DecoderConfig(space="latent", block_channels=[16, 32]),
        embed_dim=8,
        text_width=8,
        image_size=16,
        latent_channels=channels,
    )


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
    assert torch.equal(
        model(x, torch.tensor([3]), cond["image_emb"], cond["text_emb"], cond["tokens"], cond["image_dropped"]), x
    )


def test_the_text_mask_hides_the_captions_padding_from_the_cross_attention():
    """decoder.text_mask: tokens after the mask change nothing; without it they do. The image's
    context tokens before the caption always attend."""
    model = small(patch=2, attention_side=16)
    x, t = torch.randn(1, 3, 32, 32), torch.tensor([300])
    tokens = torch.randn(1, 5, 8)
    padded = tokens.clone()
    padded[:, 3:] = torch.randn(1, 2, 8)
    mask = torch.tensor([[True, True, True, False, False]])

    def draw(toks, m=None):
        image_emb = torch.randn(1, 8, generator=torch.Generator().manual_seed(0))
        return decoder.predict(model, x, t, decoder.conditioning(image_emb, torch.ones(1, 8), toks, m))

    torch.testing.assert_close(draw(tokens, mask), draw(padded, mask))
    assert not torch.allclose(draw(tokens), draw(padded))
    assert not torch.allclose(draw(tokens, mask), draw(tokens))


def test_dropped_text_becomes_zeros_or_the_empty_caption():
    cond = decoder.conditioning(
        torch.ones(2, 8), torch.ones(2, 8), torch.ones(2, 5, 8), torch.tensor([[True] * 2 + [False] * 3] * 2)
    )
    empty = {
        "emb": torch.full((1, 8), 2.0),
        "tokens": torch.full((1, 5, 8), 3.0),
        "mask": torch.tensor([[True, True, False, False, False]]),
    }
    text_dropped = torch.tensor([True, False])
    zeros = decoder.drop(cond, torch.zeros(2, dtype=torch.bool), text_dropped)
    assert (
        zeros["text_emb"][0].eq(0).all() and zeros["tokens"][0].eq(0).all() and zeros["mask"][0].all()
    )  # attends everywhere
    assert zeros["text_emb"][1].eq(1).all() and zeros["mask"][1].sum() == 2
    caption = decoder.drop(cond, torch.zeros(2, dtype=torch.bool), text_dropped, empty)
    assert (
        caption["text_emb"][0].eq(2).all()
        and caption["tokens"][0].eq(3).all()
        and caption["mask"][0].tolist() == empty["mask"][0].tolist()
    )
    assert caption["text_emb"][1].eq(1).all() and caption["tokens"][1].eq(1).all()


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


def test_a_latent_decoder_draws_latents_unfolded_even_with_three_channels():
    """patch is a pixel-space setting; three latent channels must not read as pixels folded by 1."""
    for channels in (3, 4, 12):
        model = small_latent(channels)
        assert model.latent and model.patch == 1 and model.channels == channels and model.image_size == 16
        cond = decoder.conditioning(torch.randn(2, 8), torch.randn(2, 8), torch.randn(2, 5, 8))
        assert decoder.predict(model, torch.randn(2, channels, 16, 16), torch.tensor([10, 500]), cond).shape == (
            2,
            channels,
            16,
            16,
        )
        again = rebuild(describe("decoder", model, {"latent_channels": channels, "latent_scale": 0.5}))
        assert again.latent and again.patch == 1 and again.channels == channels
    assert not rebuild(describe("decoder", small(patch=2), {})).latent


def test_space_and_latent_channels_must_agree():
    with pytest.raises(ValueError, match="decoder.space"):
        decoder.build_decoder(DecoderConfig(space="latent", block_channels=[16, 32]), 8, 8, 16)
    with pytest.raises(ValueError, match="decoder.space"):
        decoder.build_decoder(DecoderConfig(space="pixel", block_channels=[16, 32]), 8, 8, 16, latent_channels=4)


def test_a_latent_decoder_samples_through_its_vae(tmp_path):
    """decoder_images decodes the latents with the VAE at extras.latent_scale; without a VAE it says so."""
    from models import chains
    from models.config import DiffusionConfig, EncodersConfig, VaeConfig
    from models.diffusion import Diffusion
    from models.encoders import FrozenVae, write_tiny_encoders

    enc = EncodersConfig(vae=VaeConfig(path=str(tmp_path / "vae")))
    enc.clip.model = f"local-dir:{tmp_path}/clip"
    write_tiny_encoders(enc)
    vae = FrozenVae(enc.vae)
    model = small_latent(vae.latent_channels)
    cond = decoder.conditioning(torch.randn(2, 8), torch.randn(2, 8), torch.randn(2, 5, 8))
    net = chains.Net(
        model,
        Diffusion(DiffusionConfig(prediction="v")),
        {"latent_channels": vae.latent_channels, "latent_scale": 0.5},
        vae,
    )
    pictures = chains.decoder_images(net, cond, 2, 1.0, torch.Generator().manual_seed(0))
    latents = decoder.sample(model, net.diffusion, cond, 2, 1.0, torch.Generator().manual_seed(0))
    assert pictures.shape == (2, 3, 16 * vae.downsample, 16 * vae.downsample)
    assert torch.allclose(pictures, vae.decode(latents / 0.5))
    with pytest.raises(ValueError, match="decoder.space: latent"):
        chains.decoder_images(chains.Net(model, net.diffusion, net.extras), cond, 2, 1.0, torch.Generator())


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
        levels = chains.decode_embeddings(
            dec_net, [up], torch.randn(2, 8), text, 3, 1.0, torch.Generator().manual_seed(0), upsampler_steps
        )
        assert [lvl.shape[-1] for lvl in levels] == [32, 64]
        assert calls == {"decoder": 3, "upsampler": expected}


def test_the_unclip_chain_guides_its_prior_and_its_decoder_by_their_own_scales():
    from models import chains, prior
    from models.config import DiffusionConfig, PriorConfig
    from models.diffusion import Diffusion

    torch.manual_seed(0)
    pri = prior.build_prior(
        PriorConfig(layers=1, heads=2, head_dim=4), embed_dim=8, context_length=5, mean=[0.0] * 8, std=[1.0] * 8
    )
    dec = small(patch=4)
    calls = {"prior": 0, "decoder": 0}
    pri.register_forward_hook(lambda *_: calls.__setitem__("prior", calls["prior"] + 1))
    dec.unet.register_forward_hook(lambda *_: calls.__setitem__("decoder", calls["decoder"] + 1))
    pri_net = chains.Net(pri, Diffusion(DiffusionConfig(prediction="x0")), {})
    dec_net = chains.Net(dec, Diffusion(DiffusionConfig(prediction="x0")), {})
    text = {"emb": torch.randn(2, 8), "tokens": torch.randn(2, 5, 8), "mask": torch.ones(2, 5, dtype=torch.bool)}
    for guidance, prior_guidance in ((1.0, 2.0), (2.0, 1.0)):  # a guided stage runs its unconditional pass too
        calls.update(prior=0, decoder=0)
        embeddings, _ = chains.unclip(
            pri_net, dec_net, [], text, 3, guidance, prior_guidance, torch.Generator().manual_seed(0)
        )
        assert calls == {"prior": 3 * (2 if prior_guidance != 1 else 1), "decoder": 3 * (2 if guidance != 1 else 1)}
    unguided = prior.sample(pri, pri_net.diffusion, text, 3, 1.0, torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        embeddings, unguided
    )  # the last call's prior ran at its own scale 1, not the decoder's 2


def test_a_pixel_decoder_samples_the_same_in_plain_diffusers_by_the_exported_layout(tmp_path):
    """What export writes for a pixel decoder (its modules, its scheduler, the folding NULL_CONDITION
    states) gives our samples in a loop written against diffusers alone."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    from models.config import DiffusionConfig
    from models.diffusion import Diffusion
    from tests.support.plain_diffusers import plain_decoder, plain_loop

    model, diffusion = small(patch=4), Diffusion(DiffusionConfig(prediction="x0", snr_shift=4.0))
    model.unet.save_pretrained(tmp_path / "unet")
    DDIMScheduler(**diffusion.scheduler_config, set_alpha_to_one=True).save_pretrained(tmp_path / "scheduler")
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    image_emb, text_emb, tokens = torch.randn(2, 8), torch.randn(2, 8), torch.randn(2, 5, 8)
    mine = decoder.sample(
        model, diffusion, decoder.conditioning(image_emb, text_emb, tokens), 3, 2.0, torch.Generator().manual_seed(3)
    )

    decoder_fn = plain_decoder(
        unet, model.text_proj, image_emb, text_emb, tokens, patch=math.isqrt(unet.config.in_channels // 3)
    )
    with torch.no_grad():
        theirs = plain_loop(str(tmp_path / "scheduler"), mine.shape, decoder_fn, 2.0, 3, 3).clamp(-1, 1)
    assert torch.allclose(mine, theirs, atol=1e-5)


@pytest.mark.parametrize(
    "device", ["meta", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]
)
@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "unclip"])
def test_every_stage_samples_where_its_network_is(sampler, device):
    """Conditioning made on the CPU, networks elsewhere (as `sample.device: cuda` places them): every
    sampler moves what it is given to its network. Without a GPU "meta" stands in for it (a CPU
    tensor meeting meta weights raises, as on cuda); on a GPU the samples must match the CPU's."""
    from models import chains, ldm, prior, upsampler
    from models.config import DiffusionConfig, LdmConfig, PriorConfig, UpsamplerConfig
    from models.diffusion import Diffusion

    if device == "meta":
        with pytest.raises(RuntimeError):  # the premise
            torch.nn.Linear(2, 2).to(device)(torch.ones(1, 2))
    torch.manual_seed(0)
    pri = prior.build_prior(
        PriorConfig(layers=1, heads=2, head_dim=4), embed_dim=8, context_length=5, mean=[0.0] * 8, std=[1.0] * 8
    )
    dec, up = small(patch=4), upsampler.build_upsampler(UpsamplerConfig(low=32, high=64, block_channels=[8, 16]))
    unet = ldm.build_unet(LdmConfig(block_channels=[16, 32]), 4, 8, text_width=8)
    diffusion = Diffusion(DiffusionConfig(prediction="x0"), sampler)
    text = {"emb": torch.randn(2, 8), "tokens": torch.randn(2, 5, 8), "mask": torch.ones(2, 5, dtype=torch.bool)}

    def draw(where: str):
        nets = [chains.Net(m.to(where), diffusion, {}) for m in (pri, dec)]
        embeddings, levels = chains.unclip(
            *nets,
            [chains.Net(up.to(where), diffusion, {"low": 32, "high": 64})],
            text,
            2,
            2.0,
            2.0,
            torch.Generator().manual_seed(0),
        )
        return [
            embeddings,
            *levels,
            ldm.sample(unet.to(where), diffusion, ldm.context(text, True), 2, 2.0, torch.Generator().manual_seed(0)),
        ]

    elsewhere = draw(device)
    assert [(x.device.type, tuple(x.shape)) for x in elsewhere] == [
        (device, s) for s in ((2, 8), (2, 3, 32, 32), (2, 3, 64, 64), (2, 4, 8, 8))
    ]
    if device == "cuda":
        for theirs, ours in zip(elsewhere, draw("cpu"), strict=True):
            torch.testing.assert_close(theirs.cpu(), ours, atol=1e-3, rtol=1e-3)
