"""The trainable stages, by the name `unclip train <stage>` takes."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from data_pipeline.store import Store
    from training.stage import Preview, Stage

    # What every stage class is called with: its config section, the store, how it previews (each
    # subclass names its own columns to Stage.__init__, so the base's signature is not this one).
    StageClass = Callable[[Any, Store, Preview | None], Stage]

STAGE_NAMES = ("prior", "decoder", "upsampler", "ldm")


def get_stage(name: str) -> StageClass:
    # lazy: the CLI and the config read STAGE_NAMES without importing torch and diffusers
    from training.stages.decoder import DecoderStage
    from training.stages.ldm import LdmStage
    from training.stages.prior import PriorStage
    from training.stages.upsampler import UpsamplerStage

    stages: dict[str, StageClass] = {s.name: s for s in (PriorStage, DecoderStage, UpsamplerStage, LdmStage)}
    if name not in stages:
        raise ValueError(f"unknown stage {name!r} (expected one of {', '.join(sorted(stages))})")
    return stages[name]
