"""The frozen encoders: open_clip (image + text) and a diffusers AutoencoderKL.

They load by name or path exactly as public weights do (`ViT-L-14` + `openai`, `local-dir:PATH`,
a diffusers folder or hub id). The embedded default's small random encoders are written by
`write_tiny_encoders` in those same formats and then loaded through the same functions, so a
user with real weights changes only configuration.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from safetensors.torch import save_file

from models.base import storage
from models.config import ClipConfig, EncodersConfig, TinyEncodersConfig, VaeConfig
from models.normalization import norm_groups

LOCAL_DIR = "local-dir:"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# The store's columns holding FrozenClip.encode_text's outputs, and the names encode_text gives them.
TEXT_COLUMNS = {"clip_text_emb": "emb", "clip_text_tokens": "tokens", "text_mask": "mask"}


def _tensor(value: Any) -> torch.Tensor:
    # a copy of a numpy array: the store's arrays are read-only views of arrow buffers
    return value if torch.is_tensor(value) else torch.from_numpy(np.array(value))


def text_conditioning(rows: dict[str, Any], columns: Iterable[str] = tuple(TEXT_COLUMNS)) -> dict[str, torch.Tensor]:
    """Store rows' text columns (numpy arrays or tensors) as encode_text returns them: emb and
    tokens as float32 (the store keeps float16), mask as bool; on the rows' device."""
    text = {TEXT_COLUMNS[column]: _tensor(rows[column]) for column in columns}
    return {name: value if name == "mask" else value.float() for name, value in text.items()}


@dataclass(frozen=True)
class ClipPreprocess:
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def _local_dir(cfg: ClipConfig) -> Path | None:
    return Path(cfg.model[len(LOCAL_DIR) :]) if cfg.model.startswith(LOCAL_DIR) else None


def _clip_model_config(cfg: ClipConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model config, preprocess config) of the configured CLIP, read from configs (no weights)."""
    import open_clip  # lazy: open_clip (a second); trainers only need text_conditioning

    folder = _local_dir(cfg)
    if folder is not None:
        config_file = folder / "open_clip_config.json"
        if not config_file.is_file():
            raise FileNotFoundError(
                f"config key 'encoders.clip.model': {config_file} not found (run `unclip encoders init` "
                "for the embedded default, or point it at an open_clip folder)"
            )
        saved = json.loads(config_file.read_text())
        return saved["model_cfg"], saved.get("preprocess_cfg", {})
    model_cfg = open_clip.get_model_config(cfg.model)
    if model_cfg is None:
        raise ValueError(f"config key 'encoders.clip.model': open_clip has no model {cfg.model!r}")
    pre = (open_clip.get_pretrained_cfg(cfg.model, cfg.pretrained) or {}) if cfg.pretrained else {}
    return model_cfg, pre


def _per_channel(values: Sequence[float], what: str) -> tuple[float, float, float]:
    if len(values) != 3:
        raise ValueError(f"CLIP preprocess {what}: expected one value per RGB channel, got {list(values)}")
    red, green, blue = values
    return red, green, blue


def clip_preprocess(cfg: ClipConfig) -> ClipPreprocess:
    """Input size and normalisation of the configured CLIP."""
    from open_clip.constants import (
        OPENAI_DATASET_MEAN,
        OPENAI_DATASET_STD,
    )  # lazy: open_clip (a second); trainers only need text_conditioning

    model_cfg, pre = _clip_model_config(cfg)
    size = model_cfg["vision_cfg"]["image_size"]
    return ClipPreprocess(
        image_size=size if isinstance(size, int) else size[0],
        mean=_per_channel(pre.get("mean") or OPENAI_DATASET_MEAN, "mean"),
        std=_per_channel(pre.get("std") or OPENAI_DATASET_STD, "std"),
    )


def clip_identity(cfg: ClipConfig) -> dict[str, Any]:
    """What the store records about the CLIP it was embedded with, without loading weights."""
    from open_clip.model import CLIPTextCfg  # lazy: open_clip (a second); trainers only need text_conditioning

    model_cfg, _ = _clip_model_config(cfg)
    text = model_cfg.get("text_cfg", {})
    if "hf_model_name" in text:  # an HF text tower: its width lives in the HF config
        return FrozenClip(cfg).identity()
    weights = clip_weights_file(cfg)
    return {
        "library": "open_clip",
        "model": cfg.model,
        "pretrained": cfg.pretrained,
        "weights_file": weights,
        "weights_sha256": storage.sha256_file(weights) if weights else None,
        "embed_dim": int(model_cfg["embed_dim"]),
        "text_width": int(text.get("width", CLIPTextCfg.width)),
        "context_length": int(text.get("context_length", CLIPTextCfg.context_length)),
        "image_size": clip_preprocess(cfg).image_size,
        "text_layer": cfg.text_layer,
        "text_padding": cfg.text_padding,
    }


def vae_identity(cfg: VaeConfig) -> dict[str, Any]:
    """What the store records about the VAE, from its config and weights file (no model built)."""
    from diffusers import (
        AutoencoderKL,  # pyright: ignore[reportPrivateImportUsage]
    )  # lazy: diffusers' models (3-4 s) only where a network is built; `unclip train` checks the store without it

    # diffusers annotates a pair; without return_unused_kwargs or return_commit_hash it returns the config alone
    config = cast(dict[str, Any], AutoencoderKL.load_config(cfg.path, subfolder=cfg.subfolder))
    weights = _vae_weights_file(cfg)
    return {
        "library": "diffusers",
        "class": "AutoencoderKL",
        "path": cfg.path,
        "subfolder": cfg.subfolder,
        "weights_sha256": storage.sha256_file(weights) if weights else None,
        "scaling_factor": float(config.get("scaling_factor", 0.18215)),
        "latent_channels": int(config.get("latent_channels", 4)),
        "downsample": 2 ** (len(config.get("block_out_channels", [64])) - 1),
    }


def clip_weights_file(cfg: ClipConfig) -> str | None:
    import open_clip  # lazy: open_clip (a second); trainers only need text_conditioning

    folder = _local_dir(cfg)
    if folder is not None:
        from open_clip.factory import (
            _find_checkpoint_in_dir,
        )  # lazy: open_clip (a second); trainers only need text_conditioning

        return _find_checkpoint_in_dir(folder)
    if cfg.pretrained and os.path.isfile(cfg.pretrained):
        return cfg.pretrained
    if cfg.pretrained:
        tag_cfg = open_clip.get_pretrained_cfg(cfg.model, cfg.pretrained)
        return open_clip.download_pretrained(tag_cfg) if tag_cfg else None
    return None


def _vae_weights_file(cfg: VaeConfig) -> str | None:
    folder = Path(cfg.path) / (cfg.subfolder or "")
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
        if (folder / name).is_file():
            return str(folder / name)
    return None


class FrozenClip:
    """open_clip in eval mode with no grad: pooled image/text embeddings and per-token states."""

    def __init__(self, cfg: ClipConfig, device: str = "cpu", precision: str = "fp32"):
        import open_clip  # lazy: open_clip (a second); trainers only need text_conditioning

        self.cfg = cfg
        self.device = torch.device(device)
        self.dtype = DTYPES[precision]
        pretrained = None if cfg.model.startswith(LOCAL_DIR) else cfg.pretrained
        model = open_clip.create_model(cfg.model, pretrained=pretrained, device=self.device)
        if not isinstance(model, (open_clip.CLIP, open_clip.CustomTextCLIP, open_clip.CoCa)):
            raise TypeError(f"config key 'encoders.clip.model': {cfg.model} built a {type(model).__name__}, not a CLIP")
        self.model = model.eval().requires_grad_(False).to(self.dtype)
        self.tokenizer = open_clip.get_tokenizer(cfg.model)
        text_tower = getattr(model, "text", model)
        ln_final = text_tower.ln_final
        if not isinstance(ln_final, torch.nn.LayerNorm):
            raise TypeError(
                f"config key 'encoders.clip.model': {cfg.model}'s text tower ends in a {type(ln_final).__name__}, "
                "not a layer norm"
            )
        self._ln_final = ln_final
        blocks = getattr(getattr(text_tower, "transformer", None), "resblocks", None)
        # what clip_text_tokens are read from: the final layer norm's output, or the penultimate
        # block's, which then goes through that same layer norm
        self._token_source: torch.nn.Module
        if cfg.text_layer == "last":
            self._token_source = self._ln_final
        elif blocks is not None and len(blocks) >= 2:
            self._token_source = blocks[-2]
        else:
            raise ValueError(
                f"config key 'encoders.clip.text_layer': {cfg.model} has no penultimate text layer of its own "
                "(a Hugging Face text tower?)"
            )
        self._batch_first = getattr(text_tower.transformer, "batch_first", True) if blocks is not None else True
        if self.tokenizer.context_length is None:
            raise ValueError(f"config key 'encoders.clip.model': {cfg.model}'s tokenizer has no context length")
        self.context_length = int(self.tokenizer.context_length)
        self.text_width = int(self._ln_final.normalized_shape[0])
        projection = self.model.text_projection
        if isinstance(projection, torch.Tensor):  # open_clip applies it as x @ P
            self.embed_dim = int(projection.shape[-1])
        elif isinstance(projection, torch.nn.Linear):
            self.embed_dim = int(projection.out_features)
        else:
            raise TypeError(
                f"config key 'encoders.clip.model': {cfg.model}'s text projection is a {type(projection).__name__}, "
                "expected a tensor or a Linear layer"
            )
        pre = clip_preprocess(cfg)
        shape = (1, 3, 1, 1)
        self._mean = torch.tensor(pre.mean, device=self.device).view(shape)
        self._std = torch.tensor(pre.std, device=self.device).view(shape)
        self.image_size = pre.image_size

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] floats in [0, 1] at the model's input size -> [B, D] embeddings."""
        x = ((images.to(self.device) - self._mean) / self._std).to(self.dtype)
        return self.model.encode_image(x).float()

    def tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids [B, L] padded as `text_padding` says, and the mask [B, L] of each caption's
        tokens up to and including its end-of-text token (the largest id, where CLIP pools)."""
        tokens = self.tokenizer(captions).to(self.device)
        end = tokens.argmax(-1, keepdim=True)
        after = torch.arange(tokens.shape[1], device=self.device)[None] > end
        if self.cfg.text_padding == "eos":
            tokens = torch.where(after, tokens.gather(1, end), tokens)
        return tokens, ~after

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """Pooled embedding [B, D] (always from the last layer), per-token hidden states [B, L, W]
        from `text_layer`, and the mask [B, L]."""
        tokens, mask = self.tokenize(captions)
        captured: list[torch.Tensor] = []

        def keep(_module: torch.nn.Module, _args: tuple[Any, ...], out: torch.Tensor) -> None:
            captured.append(out)

        handle = self._token_source.register_forward_hook(keep)
        try:
            emb = self.model.encode_text(tokens).float()
        finally:
            handle.remove()
        states = captured[-1]
        if self._token_source is not self._ln_final:
            states = self._ln_final(states if self._batch_first else states.permute(1, 0, 2))
        return {"emb": emb, "tokens": states.float(), "mask": mask}

    def identity(self) -> dict[str, Any]:
        weights = clip_weights_file(self.cfg)
        return {
            "library": "open_clip",
            "model": self.cfg.model,
            "pretrained": self.cfg.pretrained,
            "weights_file": weights,
            "weights_sha256": storage.sha256_file(weights) if weights else None,
            "embed_dim": self.embed_dim,  # from the loaded model: the truth clip_identity must match
            "text_width": self.text_width,
            "context_length": self.context_length,
            "image_size": self.image_size,
            "text_layer": self.cfg.text_layer,
            "text_padding": self.cfg.text_padding,
        }


class FrozenVae:
    """diffusers AutoencoderKL in eval mode: latents are the posterior mean, unscaled."""

    def __init__(self, cfg: VaeConfig, device: str = "cpu", precision: str = "fp32"):
        from diffusers import (
            AutoencoderKL,  # pyright: ignore[reportPrivateImportUsage]
        )  # lazy: diffusers' models (3-4 s) only where a network is built; `unclip train` checks the store without it

        self.cfg = cfg
        self.device = torch.device(device)
        self.dtype = DTYPES[precision]
        vae = AutoencoderKL.from_pretrained(cfg.path, subfolder=cfg.subfolder, torch_dtype=self.dtype)
        # diffusers wraps `to` in functools.wraps(Module.to), which pyright reads as unbound
        self.vae = vae.eval().requires_grad_(False).to(self.device)  # pyright: ignore[reportArgumentType]
        self.scaling_factor = float(vae.config["scaling_factor"])
        self.latent_channels = int(vae.config["latent_channels"])
        self.downsample = 2 ** (len(vae.config["block_out_channels"]) - 1)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] -> [B, C, H/f, W/f] posterior means (deterministic)."""
        # the tuple (return_dict=False) holds the posterior alone
        posterior = self.vae.encode(images.to(self.device, self.dtype), return_dict=False)[0]
        return posterior.mean.float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Unscaled latents -> images in [-1, 1]."""
        # diffusers types `z` FloatTensor (any float dtype works) and the tuple (return_dict=False) as
        # FloatTensor too; that tuple holds the images alone
        images = self.vae.decode(latents.to(self.device, self.dtype), return_dict=False)[0]  # pyright: ignore[reportArgumentType]
        return images.float().clamp(-1, 1)

    def identity(self) -> dict[str, Any]:
        return vae_identity(self.cfg)


def tiny_clip_config(t: TinyEncodersConfig) -> dict[str, Any]:
    vision = (
        {"image_size": t.image_size, "layers": [1, 1, 1, 1], "width": t.resnet_width}  # open_clip's ModifiedResNet
        if t.vision_tower == "resnet"
        else {
            "image_size": t.image_size,
            "layers": t.vision_layers,
            "width": t.vision_width,
            "patch_size": t.patch_size,
        }
    )
    return {
        "embed_dim": t.embed_dim,
        "vision_cfg": vision,
        # text width == embed_dim keeps the per-token states in the embedding's space, as in ViT-L-14
        "text_cfg": {
            "context_length": t.context_length,
            "vocab_size": 49408,
            "width": t.embed_dim,
            "heads": t.heads,
            "layers": t.text_layers,
        },
    }


def tiny_vae_config(t: TinyEncodersConfig) -> dict[str, Any]:
    n = len(t.vae_channels)
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": list(t.vae_channels),
        "layers_per_block": 1,
        "latent_channels": t.latent_channels,
        "norm_num_groups": norm_groups(t.vae_channels),
        "sample_size": t.image_size,
    }


def write_tiny_encoders(cfg: EncodersConfig) -> dict[str, str]:
    """Write small random encoders where `cfg` expects to load them; returns their locations."""
    import open_clip  # lazy: open_clip (a second); trainers only need text_conditioning
    from diffusers import AutoencoderKL  # pyright: ignore[reportPrivateImportUsage]
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    folder = _local_dir(cfg.clip)
    if folder is None:
        raise ValueError(
            "config key 'encoders.clip.model': expected 'local-dir:PATH' to write tiny encoders into, "
            f"got {cfg.clip.model!r}"
        )
    torch.manual_seed(cfg.tiny.seed)
    model_cfg = tiny_clip_config(cfg.tiny)
    clip = open_clip.CLIP(**model_cfg)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(clip.state_dict(), str(folder / "open_clip_model.safetensors"))
    preprocess = {
        "mean": list(OPENAI_DATASET_MEAN),
        "std": list(OPENAI_DATASET_STD),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }
    (folder / "open_clip_config.json").write_text(
        storage.strict_json({"model_cfg": model_cfg, "preprocess_cfg": preprocess}, indent=2)
    )

    vae = AutoencoderKL(**tiny_vae_config(cfg.tiny))
    vae.save_pretrained(cfg.vae.path if not cfg.vae.subfolder else os.path.join(cfg.vae.path, cfg.vae.subfolder))
    return {"clip": str(folder), "vae": cfg.vae.path}


LOCATION_FIELDS = ("model", "path", "subfolder", "weights_file", "pretrained")
# What a store embedded before a field was recorded was made with (the only behaviour there was).
RECORDED_BEFORE = {"text_layer": "last", "text_padding": "zeros"}


def identity_mismatch(recorded: dict[str, Any], current: dict[str, Any]) -> tuple[str, Any, Any] | None:
    """The first field in which two encoder identities differ, or None when they are the same encoder.

    With a weights hash on both sides the hash decides, so weights moved to another path are the
    same encoder; without one (weights not in a local file), name and location must match."""
    if recorded.get("library") == "open_clip":
        recorded = {**RECORDED_BEFORE, **recorded}
    hashed = bool(recorded.get("weights_sha256") and current.get("weights_sha256"))
    for field in sorted(set(recorded) | set(current)):
        if field == "weights_file" or (hashed and field in LOCATION_FIELDS):
            continue
        if recorded.get(field) != current.get(field):
            return field, recorded.get(field), current.get(field)
    return None
