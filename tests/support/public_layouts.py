"""Tiny public pipelines, built by diffusers and transformers in exactly the layouts of the public
weights (Stable Diffusion 2.x's `StableDiffusionPipeline`, Karlo's `UnCLIPPipeline`) and saved
with `save_pretrained`, as diffusers' own tests build theirs. Their sizes fit the stores of
tests/support/storefactory.py: a user with the real weights changes only paths."""

from __future__ import annotations

import json
import os
import tempfile

import torch

from tests.support.storefactory import DIM, LATENT, TOKENS


def tiny_tokenizer():
    """A CLIPTokenizer over a few byte-level tokens (every other character is unknown)."""
    from transformers import CLIPTokenizer

    folder = tempfile.mkdtemp(prefix="unclip-test-tokenizer-")
    vocab = {
        "<|startoftext|>": 0,
        "<|endoftext|>": 1,
        "!": 2,
        **{f"{c}</w>": 3 + i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz")},
    }
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    return CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"), pad_token="!")


def tiny_text_config(width: int = DIM, projection: int = DIM):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=TOKENS,
        vocab_size=64,
        projection_dim=projection,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )


def stable_diffusion(
    folder: str, cross_attention_dim: int = DIM, latent: tuple[int, int] = LATENT[:2], seed: int = 0
) -> str:
    """A StableDiffusionPipeline whose UNet works on a store's latents (`latent`: channels, side;
    by default tests/support/storefactory's) and text tokens (width `cross_attention_dim`), with a VAE that
    maps pictures 4 times wider to them."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    channels, side = latent
    unet = UNet2DConditionModel(
        sample_size=side,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=2,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=channels,
        block_out_channels=(32, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        sample_size=side * 4,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(tiny_text_config(cross_attention_dim)),
        tokenizer=tiny_tokenizer(),
        unet=unet,
        scheduler=DDIMScheduler(
            beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False, steps_offset=1
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return folder


def karlo(folder: str, seed: int = 0, dim: int = DIM, tokens: int = TOKENS) -> str:
    """An UnCLIPPipeline as Karlo's: prior, 64 px decoder with its text_proj and a learned variance,
    two 64 -> 256 super-resolution UNets (first and last step; RGB out, as Karlo's are), on CLIP
    embeddings and text tokens of width `dim` (`tokens` of them; by default tests/support/storefactory's)."""
    from diffusers import PriorTransformer, UnCLIPPipeline, UnCLIPScheduler, UNet2DConditionModel, UNet2DModel
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    prior = PriorTransformer(
        num_attention_heads=2, attention_head_dim=8, num_layers=1, embedding_dim=dim, num_embeddings=tokens
    )
    with torch.no_grad():  # the statistics of the CLIP it was trained on, as Karlo's prior carries them
        prior.clip_mean.normal_(0, 1)
        prior.clip_std.uniform_(0.5, 2)
    decoder = UNet2DConditionModel(
        sample_size=64,
        in_channels=3,
        out_channels=6,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        cross_attention_dim=32,
        attention_head_dim=4,
        resnet_time_scale_shift="scale_shift",
        class_embed_type="identity",
    )
    text_proj = UnCLIPTextProjModel(clip_embeddings_dim=dim, time_embed_dim=128, cross_attention_dim=32)

    def super_res():
        return UNet2DModel(
            sample_size=256,
            in_channels=6,
            out_channels=3,
            layers_per_block=1,
            block_out_channels=(32, 64),
            down_block_types=("ResnetDownsampleBlock2D", "ResnetDownsampleBlock2D"),
            up_block_types=("ResnetUpsampleBlock2D", "ResnetUpsampleBlock2D"),
            resnet_time_scale_shift="scale_shift",
        )

    pipe = UnCLIPPipeline(
        prior=prior,
        decoder=decoder,
        text_proj=text_proj,
        text_encoder=CLIPTextModelWithProjection(tiny_text_config(dim, dim)),
        tokenizer=tiny_tokenizer(),
        super_res_first=super_res(),
        super_res_last=super_res(),
        prior_scheduler=UnCLIPScheduler(
            variance_type="fixed_small_log", prediction_type="sample", clip_sample_range=5.0
        ),
        decoder_scheduler=UnCLIPScheduler(variance_type="learned_range"),
        super_res_scheduler=UnCLIPScheduler(variance_type="fixed_small_log"),
    )
    pipe.save_pretrained(folder)
    return folder
