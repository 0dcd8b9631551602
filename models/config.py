"""Settings of the frozen encoders, the diffusion process and each stage's network."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from models.base.configlib import option


@dataclass
class ClipConfig:
    model: str = option(
        "local-dir:{root}/encoders/clip",
        doc="open_clip model name (ViT-L-14) or 'local-dir:PATH' (open_clip_config.json + weights)",
    )
    pretrained: str | None = option(None, doc="with a model name: a tag ('openai') or a weights file")
    # What public models were conditioned on: Stable Diffusion 2.x's UNet on OpenCLIP ViT-H-14's
    # penultimate layer through the final layer norm, its tokenizer padding with zeros; OpenAI
    # CLIP's tokenizer (Stable Diffusion 1.x, Karlo) pads with the end-of-text token.
    text_layer: Literal["last", "penultimate"] = option(
        "last",
        doc="the text layer that becomes clip_text_tokens: the last, or the penultimate through the final layer norm "
        "(SD 2.x)",
    )
    text_padding: Literal["zeros", "eos"] = option(
        "zeros",
        doc="what fills the tokens after a caption's end-of-text token: zeros (open_clip, SD 2.x) or end-of-text "
        "(OpenAI CLIP, SD 1.x, Karlo)",
    )


@dataclass
class VaeConfig:
    path: str = option("{root}/encoders/vae", doc="diffusers AutoencoderKL folder or hub repo id")
    subfolder: str | None = None


@dataclass
class TinyEncodersConfig:
    """Sizes of the embedded default's small encoders (`unclip encoders init` writes them random,
    `unclip encoders fit` trains them)."""

    embed_dim: int = option(64, ge=8)
    image_size: int = option(64, ge=16)
    vision_tower: Literal["resnet", "vit"] = option(
        "resnet", doc="open_clip's ModifiedResNet learns shapes from a few hundred pictures; a ViT needs far more"
    )
    resnet_width: int = option(16, ge=8)
    patch_size: int = option(8, ge=1)
    vision_width: int = option(64, ge=8)
    vision_layers: int = option(2, ge=1)
    text_layers: int = option(2, ge=1)
    heads: int = option(4, ge=1)
    context_length: int = option(32, ge=8)
    vae_channels: list[int] = option(factory=lambda: [16, 32, 32], doc="3 levels: latents at 1/4 of the side")
    latent_channels: int = option(4, ge=1)
    seed: int = 0


@dataclass
class EncoderFitConfig:
    """`unclip encoders fit`: train the small encoders on ROOT/raw/ (contrastive CLIP, KL VAE)."""

    clip_steps: int = option(600, ge=0)
    clip_lr: float = option(2e-3, gt=0)
    # 800, not 600: how soon the fit leaves its early plateau depends on the data order; over two
    # orders 600 steps gave 27.3 and 23.7 dB held-out, 800 gave 29.8 and 27.5 dB.
    vae_steps: int = option(800, ge=0)
    vae_lr: float = option(2e-3, gt=0)
    kl_weight: float = option(1e-6, ge=0, doc="KL term of the VAE loss, as in Stable Diffusion's autoencoder")
    vae_resolution: int = option(64, ge=8, doc="side of the images the VAE is fitted on")
    clip_batch_size: int = option(
        64, ge=2, doc="pairs per contrastive step (the other pairs of a batch are its negatives)"
    )
    hard_negatives: bool = option(True, doc="batch each caption with others a word or two away (small data sets)")
    vae_batch_size: int = option(16, ge=1, doc="16 rather than 32: more steps in the same time")
    holdout_fraction: float = option(0.1, gt=0, lt=1, doc="pairs kept out of fitting, to report held-out metrics")
    seed: int = 0


@dataclass
class EncodersConfig:
    clip: ClipConfig = option(factory=ClipConfig)
    vae: VaeConfig = option(factory=VaeConfig)
    tiny: TinyEncodersConfig = option(factory=TinyEncodersConfig)
    fit: EncoderFitConfig = option(factory=EncoderFitConfig)


@dataclass
class DiffusionConfig:
    schedule: Literal["linear", "scaled_linear", "cosine"] = "cosine"
    timesteps: int = option(1000, ge=2)
    prediction: Literal["eps", "x0", "v"] = "eps"
    loss_weighting: Literal["uniform", "min_snr"] = "uniform"
    snr_gamma: float = option(5.0, gt=0)
    snr_shift: float = option(
        1.0,
        gt=0,
        doc="divide the schedule's signal-to-noise ratio by shift**2 at every step (Hoogeboom et al. 2023, SD3): "
        "more training and sampling at the noise levels where a picture's layout forms",
    )
    clip_sample: float | None = option(
        None,
        gt=0,
        doc="while sampling, clip each step's predicted x_0 to [-clip_sample, clip_sample] (null: never); "
        "Karlo clips its pictures to 1 and its prior's normalised embeddings to 5",
    )


def _check_block_channels(key: str, channels: list[int]) -> None:
    """A UNet's block_channels (ldm, decoder): one level per entry, at least one, each a multiple of 8."""
    if not channels or any(c < 8 or c % 8 for c in channels):
        raise ValueError(f"config key '{key}': expected multiples of 8, at least one, got {channels}")


# What dropped text becomes in training, and the unconditional input of guidance in sampling: all
# zeros (our default), or the empty caption's states, as Stable Diffusion and Karlo were trained
# (their pipelines encode "" for it); the store keeps the empty caption's embedding for training.
NullText = Literal["zeros", "empty_caption"]


@dataclass
class PriorConfig:
    layers: int = option(4, ge=1)
    heads: int = option(4, ge=1)
    head_dim: int = option(32, ge=4)
    text_drop: float = option(0.1, ge=0, le=1)
    null_text: NullText = option(
        "zeros", doc="what dropped text becomes: all zeros (with a full mask), or the empty caption's states"
    )
    diffusion: DiffusionConfig = option(factory=lambda: DiffusionConfig(prediction="x0"))


@dataclass
class LdmConfig:
    # Narrow, to afford steps: on the embedded default shape kind grows with steps, not width. At 32
    # pictures a step, [64, 128] read 53/73/90% shape kind after 800/1200/1600 steps (one seed);
    # [32, 64] costs half as much a step and read 55/70/88% (two seeds each) at the same steps.
    block_channels: list[int] = option(factory=lambda: [32, 64])
    layers_per_block: int = option(1, ge=1)
    heads: int = option(4, ge=1)
    text_drop: float = option(0.1, ge=0, le=1)
    pooled_text: bool = option(
        True,
        doc="also add the attention-pooled text to the timestep embedding (as Imagen): every block sees the prompt",
    )
    # From the per-token states alone the ldm often swapped the shape's and the background's colours
    # ("red circle, yellow background" drawn yellow on red): a colour word's own state does not say
    # which of the two it names. CLIP's pooled embedding was trained to match the whole picture. On
    # one store, same seed and data order, colour / background at guidance 3 went from 83/90% and
    # 90/93% (two sampling seeds) to 100/100% both, with it appended.
    text_embedding_token: bool = option(
        True, doc="append clip_text_emb to the text tokens the UNet attends to (its size must equal the tokens' width)"
    )
    latent_scale: Literal["store", "vae"] = option(
        "store", doc="'store': 1/std of the store's latents (how SD derived 0.18215); 'vae': the VAE config's factor"
    )
    null_text: NullText = option(
        "zeros",
        doc="what dropped text becomes: all zeros, or the empty caption's states (as Stable Diffusion was trained; "
        "then the export is a StableDiffusionPipeline)",
    )
    # v prediction with min-SNR weighting: on the embedded default it follows prompts after a third
    # of the steps eps prediction needs (benchmarks/quality.py); cosine reaches pure noise at the end.
    diffusion: DiffusionConfig = option(factory=lambda: DiffusionConfig(prediction="v", loss_weighting="min_snr"))

    def validate(self) -> None:
        _check_block_channels("ldm.block_channels", self.block_channels)


@dataclass
class DecoderConfig:
    """The unCLIP decoder: a UNet conditioned on the CLIP image embedding (in its timestep embedding
    and as extra context tokens) and on the text tokens, as in unCLIP, drawing 64 px pictures."""

    # The latent decoder draws the store's VAE latents, which the frozen VAE turns into pictures at
    # its resolution (Kandinsky 2.2's decoder is unCLIP's done so): the VAE renders the outlines the
    # UNet lays out. On the embedded default the 64 px pixel decoder drew every shape as a round
    # blob: from true embeddings, 40% shape kind (only the circles) after the demo's 600 steps of
    # 32; at 600 steps of 16, patch 1, twice the width, v or EDM-style targets were no better
    # (33-47%). The unCLIP chain's shape kind went from 38/44% (guidance 1/3) to 50/56%.
    space: Literal["pixel", "latent"] = option(
        "latent",
        doc="pixel: DALL-E 2's decoder on image_64; latent: on vae_latent, pictures by the store's VAE",
    )
    # [32, 64] as the ldm's: the same latents, where steps buy more than width.
    block_channels: list[int] = option(
        factory=lambda: [32, 64], doc="one level per entry, the first at the input's side"
    )
    layers_per_block: int = option(1, ge=1)
    # Pixel space only. 4x4 pixels folded into channels, the UNet at 16 px: it composes the right
    # colours on the right background in half the steps of a 64 px UNet of [16, 32, 64, 64]
    # (100%/100% against 81%/88% from true embeddings), at two thirds of the step time.
    patch: int = option(
        4, ge=1, doc="pixel space: fold each patch x patch pixels into channels (the UNet runs at 64/patch px)"
    )
    attention_side: int = option(
        16, ge=1, doc="cross-attention at the UNet levels this many px wide or less (and the last)"
    )
    heads: int = option(4, ge=1)
    context_tokens: int = option(4, ge=1, doc="extra context tokens projected from the image embedding")
    image_drop: float = option(0.1, ge=0, le=1)
    text_drop: float = option(0.5, ge=0, le=1)
    null_text: NullText = option("zeros", doc="what dropped text becomes: all zeros, or the empty caption's states")
    text_mask: bool = option(
        False,
        doc="mask the caption's padding out of the UNet's cross-attention (text_mask column), as Karlo's decoder does",
    )
    latent_scale: Literal["store", "vae"] = option("store", doc="latent space: as ldm.latent_scale")
    # The ldm's recipe, for the same latents. A pixel decoder wants x0 prediction, weighted
    # uniformly, with snr_shift 4: the folded UNet has no exact per-pixel path from its input to its
    # output, so eps or v targets left visible noise in every sample, and the shift gave one coherent
    # shape per picture (colour 100% vs 88% unshifted).
    diffusion: DiffusionConfig = option(factory=lambda: DiffusionConfig(prediction="v", loss_weighting="min_snr"))

    def validate(self) -> None:
        _check_block_channels("decoder.block_channels", self.block_channels)


@dataclass
class UpsamplerConfig:
    """low -> high super-resolution on the store's image_<low> and image_<high> columns."""

    low: int = option(64, ge=8)
    high: int = option(256, ge=16)
    block_channels: list[int] = option(factory=lambda: [16, 32])
    layers_per_block: int = option(1, ge=1)
    crop: int = option(32, ge=0, doc="train on random high-res crops of this side (0: whole images)")
    blur_sigma: list[float] = option(factory=lambda: [0.4, 0.6], doc="Gaussian blur of the conditioning, sigma range")
    noise_aug: float = option(0.1, ge=0, le=1, doc="Gaussian noise added to the conditioning, up to this std")
    # How the low resolution is enlarged to the UNet's side, in training and sampling alike.
    # diffusers' UnCLIPPipeline (Karlo) enlarges with antialiased bicubic and does not clip.
    resize: Literal["bicubic_clamped", "bicubic_antialias"] = option(
        "bicubic_clamped",
        doc="bicubic_clamped: bicubic, clipped to [-1, 1]; bicubic_antialias: antialiased bicubic, unclipped (Karlo's)",
    )
    # v prediction (as Imagen's super-resolution models): at high noise the target is the picture
    # itself, which the conditioning nearly gives; eps prediction sampled to noise after short training.
    diffusion: DiffusionConfig = option(factory=lambda: DiffusionConfig(prediction="v"))

    def validate(self) -> None:
        if self.high <= self.low or self.high % self.low:
            raise ValueError(
                f"config key 'upsampler.high': expected a multiple of upsampler.low={self.low}, got {self.high}"
            )
        if self.crop and (self.crop > self.high or self.crop % (self.high // self.low)):
            raise ValueError(
                f"config key 'upsampler.crop': expected 0 or a side <= {self.high} divisible by "
                f"{self.high // self.low}, got {self.crop}"
            )
        if len(self.blur_sigma) != 2 or not 0 <= self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(
                f"config key 'upsampler.blur_sigma': expected [low, high] with 0 <= low <= high, got {self.blur_sigma}"
            )
        n = len(self.block_channels)
        if self.crop and self.crop % (2 ** (n - 1)):
            raise ValueError(f"config key 'upsampler.crop': must be divisible by 2**{n - 1} for {n} UNet blocks")
