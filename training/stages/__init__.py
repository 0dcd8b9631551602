"""The trainable stages, by the name `unclip train <stage>` takes."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from training.stage import Stage

STAGE_NAMES = ("prior", "decoder", "upsampler", "ldm")


def get_stage(name: str) -> type[Stage]:
    # lazy: the CLI and the config read STAGE_NAMES without importing torch and diffusers
    from training.stages.decoder import DecoderStage
    from training.stages.ldm import LdmStage
    from training.stages.prior import PriorStage
    from training.stages.upsampler import UpsamplerStage

    stages = {s.name: s for s in (PriorStage, DecoderStage, UpsamplerStage, LdmStage)}
    if name not in stages:
        raise ValueError(f"unknown stage {name!r} (expected one of {', '.join(sorted(stages))})")
    return stages[name]
