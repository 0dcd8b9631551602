"""The trainable stages, by the name `unclip train <stage>` takes."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from training.stage import Stage

STAGE_NAMES = ("prior", "ldm")


def get_stage(name: str) -> type[Stage]:
    from training.stages.ldm import LdmStage
    from training.stages.prior import PriorStage

    stages = {s.name: s for s in (PriorStage, LdmStage)}
    if name not in stages:
        raise ValueError(f"unknown stage {name!r} (expected one of {', '.join(sorted(stages))})")
    return stages[name]
