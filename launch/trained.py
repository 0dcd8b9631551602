"""Load what was trained: every stage's newest checkpoint (EMA weights), with the diffusion it was
trained with, and the frozen encoders the store was embedded with (identity checked)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from data_pipeline.store import Store, StoreError
from launch.config import Config
from models import chains, prior
from models.base import configlib, storage
from models.base.configlib import read_yaml
from models.chains import Net
from models.config import DiffusionConfig
from models.diffusion import Diffusion
from models.encoders import FrozenClip, FrozenVae, identity_mismatch
from training.checkpoint import load_ema_model, read_latest


def check_identity(section: str, recorded: dict[str, Any], loaded: dict[str, Any]) -> None:
    differs = identity_mismatch(recorded, loaded)
    if differs:
        field_name, old, new = differs
        raise StoreError(
            f"encoders.{section}.{field_name} is {new!r}, but the store was embedded with {old!r}; "
            "use the encoders the store was built with"
        )


def recorded_diffusion(folder: str, info: dict[str, Any]) -> DiffusionConfig:
    """The diffusion a checkpoint was trained with, from its stage.json (older checkpoints: from
    their config.yaml, read as plain YAML). Never through today's whole config schema: a setting
    renamed or added since must not make last month's checkpoint unloadable. Keys this version
    does not know are left out, keys added since take the stage's defaults."""
    stage = info["stage"]
    recorded = info.get("diffusion")
    if recorded is None:
        recorded = (read_yaml(storage.join(folder, "config.yaml")).get(stage) or {}).get("diffusion") or {}
    known = {f.name for f in dataclasses.fields(DiffusionConfig)}
    defaults = dataclasses.asdict(getattr(Config(), stage).diffusion)
    return configlib.build(
        DiffusionConfig,
        {k: v for k, v in recorded.items() if k in known},
        prefix=f"{stage}.diffusion",
        defaults=defaults,
    )


def load_net(cfg: Config, stage: str, run: str, device: torch.device | str = "cpu") -> tuple[Net, str]:
    folder = read_latest(cfg.run_url(stage, run))
    if folder is None:
        raise FileNotFoundError(f"no checkpoint for stage {stage} under {cfg.run_url(stage, run)} (train it first)")
    model, info = load_ema_model(folder)
    model.to(device)
    diffusion = Diffusion(recorded_diffusion(folder, info), cfg.sample.sampler)  # the schedule it was trained with
    misfit = diffusion.unclip_sampler_misfit() if cfg.sample.sampler == "unclip" else None
    if misfit:
        raise ValueError(
            f"config key 'sample.sampler' is 'unclip' (diffusers' UnCLIPScheduler), which cannot sample stage {stage} "
            f"(run {run}): {misfit}"
        )
    return Net(model, diffusion, info["extras"]), folder


@dataclass
class Trained:
    cfg: Config
    store: Store
    nets: dict[str, Net] = field(default_factory=dict)
    upsamplers: list[Net] = field(default_factory=list)
    checkpoints: dict[str, str] = field(default_factory=dict)
    clip: FrozenClip = field(init=False)  # set by load_trained, which every caller goes through
    _empty: dict[str, torch.Tensor] | None = None  # the text conditioning of "", once encoded

    def encode_text(self, captions: list[str]):
        return self.clip.encode_text(captions)

    def empty_caption(self, *stages: str) -> dict[str, torch.Tensor] | None:
        """The text conditioning of "" where one of `stages` was trained with null_text=empty_caption
        (sampling's unconditional input then), else None."""
        if any(self.nets[s].extras.get("null_text") == "empty_caption" for s in stages if s in self.nets):
            if self._empty is None:  # one encoding for every batch and chain
                self._empty = self.encode_text([""])
            return self._empty
        return None

    def no_caption(self, n: int) -> dict[str, torch.Tensor]:
        """`n` rows of the decoder's "no caption" (variations, interpolation): what its training
        dropped captions to, zeros attending everywhere or the empty caption."""
        empty = self.empty_caption("decoder")
        if empty is not None:
            return {k: v.expand(n, *v.shape[1:]) for k, v in empty.items()}
        clip = self.clip
        return {
            "emb": torch.zeros(n, clip.embed_dim),
            "tokens": torch.zeros(n, clip.context_length, clip.text_width),
            "mask": torch.ones(n, clip.context_length, dtype=torch.bool),
        }

    def generate(
        self,
        chain: str,
        text: dict[str, torch.Tensor],
        steps: int,
        scales: tuple[float, float],
        seed: int,
        batch_size: int,
        upsampler_steps: int | None = None,
    ) -> torch.Tensor:
        """Images in [-1, 1] from text conditioning (emb, tokens, mask) by the ldm or the unCLIP
        chain (at its last resolution). `scales` is (ldm's or decoder's guidance, prior's guidance),
        as `SampleConfig.scales` gives them."""
        if chain == "ldm":
            ldm, empty = self.nets["ldm"], self.empty_caption("ldm")
            return in_batches(
                text, seed, batch_size, lambda part, g: chains.latent_diffusion(ldm, part, steps, scales[0], g, empty)
            )
        return self.unclip(text, steps, scales, seed, batch_size, upsampler_steps)[1][-1]

    def unclip(
        self,
        text: dict[str, torch.Tensor],
        steps: int,
        scales: tuple[float, float],
        seed: int,
        batch_size: int,
        upsampler_steps: int | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The unCLIP chain: (the prior's CLIP image embeddings, the pictures at every resolution)."""
        guidance, prior_guidance = scales
        empty = self.empty_caption("prior", "decoder")
        return in_batches(
            text,
            seed,
            batch_size,
            lambda part, g: chains.unclip(
                self.nets["prior"],
                self.nets["decoder"],
                self.upsamplers,
                part,
                steps,
                guidance,
                prior_guidance,
                g,
                upsampler_steps,
                empty,
            ),
        )

    def image_embeddings(
        self, text: dict[str, torch.Tensor], steps: int, prior_guidance: float, seed: int, batch_size: int
    ) -> torch.Tensor:
        """The prior's CLIP image embeddings for text conditioning: what the unCLIP chain decodes
        (the same noise as `unclip` at the same seed and batch size)."""
        pri, empty = self.nets["prior"], chains.null_text(self.nets["prior"], self.empty_caption("prior"))
        return in_batches(
            text,
            seed,
            batch_size,
            lambda part, g: prior.sample(pri.model, pri.diffusion, part, steps, prior_guidance, g, empty),
        )


Drawn = TypeVar("Drawn")


def in_batches(
    rows: dict[str, torch.Tensor],
    seed: int,
    batch_size: int,
    draw: Callable[[dict[str, torch.Tensor], torch.Generator], Drawn],
) -> Drawn:
    """`draw(part, generator)` over batches of `rows`, joined along the batch axis (a tensor, or
    tuples and lists of them, as the chains return). Batch i draws its noise from seed + i, so a
    row's picture depends on the seed, the batch size and its position, not on what else was asked
    for; and a batch, not the whole request, is what must fit in memory."""
    n = len(next(iter(rows.values())))
    parts = [
        _cpu(draw({k: v[start : start + batch_size] for k, v in rows.items()}, torch.Generator().manual_seed(seed + i)))
        for i, start in enumerate(range(0, n, batch_size))
    ]
    return _join(parts)


def _cpu(drawn: Any) -> Any:
    """Off the accelerator as each batch finishes: only one batch's pictures are ever on it."""
    return drawn.cpu() if isinstance(drawn, torch.Tensor) else type(drawn)(_cpu(x) for x in drawn)


def _join(parts: list) -> Any:
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts)
    return type(parts[0])(_join(list(same)) for same in zip(*parts, strict=True))


def sampling_device(choice: str) -> torch.device:
    """`sample.device`: auto is the GPU when torch sees one; cuda without one is refused."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("config key 'sample.device' is 'cuda', but torch sees no GPU (use auto or cpu)")
    return torch.device("cuda" if choice != "cpu" and torch.cuda.is_available() else "cpu")


def load_trained(cfg: Config, store: Store, stages: list[str]) -> Trained:
    """The named stages (ldm, prior, decoder, upsampler) of runs `sample.run` / `sample.upsampler_runs`."""
    device = sampling_device(cfg.sample.device)
    trained = Trained(cfg, store)
    trained.clip = FrozenClip(cfg.encoders.clip, str(device))
    check_identity("clip", store.manifest["encoders"]["clip"], trained.clip.identity())
    for stage in stages:
        if stage == "upsampler":
            for run in cfg.sample.upsampler_runs:
                net, folder = load_net(cfg, "upsampler", run, device)
                # Its UNet runs small channel counts at the full output side, where the CPU's convolutions
                # are 1.5x faster on channels-last tensors (the unCLIP chain 1.43x end to end, the same
                # pictures to 3e-5). Only here: training keeps DeepSpeed's flat contiguous parameters.
                net.model.to(memory_format=torch.channels_last)
                trained.upsamplers.append(net)
                trained.checkpoints[f"upsampler/{run}"] = folder
            continue
        trained.nets[stage], trained.checkpoints[stage] = load_net(cfg, stage, cfg.sample.run, device)
    drawing_latents = [
        net for stage, net in trained.nets.items() if stage == "ldm" or (stage == "decoder" and net.model.latent)
    ]
    if drawing_latents:
        vae = FrozenVae(cfg.encoders.vae, str(device))
        check_identity("vae", store.manifest["encoders"]["vae"], vae.identity())
        for net in drawing_latents:
            net.vae = vae
    return trained


def available_stages(cfg: Config) -> list[str]:
    found = [s for s in ("prior", "decoder", "ldm") if read_latest(cfg.run_url(s, cfg.sample.run))]
    if cfg.sample.upsampler_runs and all(read_latest(cfg.run_url("upsampler", r)) for r in cfg.sample.upsampler_runs):
        found.append("upsampler")
    return found
