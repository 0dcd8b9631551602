"""Public diffusers weights as a stage's starting point (`unclip train <stage> --init-from`).

Each stage matches one network of a public family, saved in diffusers' own layouts:

    ldm        StableDiffusionPipeline (SD 2.x)  unet
    prior      UnCLIPPipeline (Karlo)            prior
    decoder    UnCLIPPipeline                    decoder + text_proj
    upsampler  UnCLIPPipeline                    super_res_first (super_res_last: give its folder)

`--init-from` takes the pipeline folder, one component's folder (the decoder's, with `text_proj`
beside it), or a hub repo id. The network is built from the weights' own config, so a stage's
architecture settings do not apply; what must agree with the store (widths, channels, sizes) is
checked from the configs alone, before any rank starts and before any weight is read.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any

import torch

from models.base.errors import UserError

PIPELINE_INDEX = "model_index.json"
COMPONENTS = {
    "ldm": {"model": "unet"},  # our module name -> the pipeline's component
    "prior": {"model": "prior"},
    "decoder": {"unet": "decoder", "text_proj": "text_proj"},
    "upsampler": {"model": "super_res_first"},
}
CLASSES = {
    "unet": "UNet2DConditionModel",
    "prior": "PriorTransformer",
    "decoder": "UNet2DConditionModel",
    "text_proj": "UnCLIPTextProjModel",
    "super_res_first": "UNet2DModel",
    "super_res_last": "UNet2DModel",
}
REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")


class PublicWeightsError(UserError):
    """Weights in a public layout that this stage cannot start from (one line naming what and why)."""


@dataclass(frozen=True)
class PublicWeights:
    """Where each of a stage's networks is (a local folder or a hub repo id, and its subfolder)
    and each one's config, as its config.json says."""

    source: str
    places: dict[str, tuple[str, str | None]]
    configs: dict[str, dict[str, Any]]

    def describe(self) -> str:
        return ", ".join(f"{name} ({config['_class_name']})" for name, config in self.configs.items())


def is_ours(folder: str) -> bool:
    """A run folder or checkpoint of our own (they are read by training/checkpoint.py)."""
    return any(os.path.exists(os.path.join(folder, name)) for name in ("stage.json", "latest", "ema.safetensors"))


def find_public(source: str, stage: str) -> PublicWeights | None:
    """The public weights `source` names for `stage`, or None when it is one of our own
    checkpoints (or an fsspec URL: public weights come from a folder or the hub)."""
    wanted = COMPONENTS[stage]
    if os.path.isdir(source):
        if is_ours(source):
            return None
        places: dict[str, tuple[str, str | None]]
        if os.path.exists(os.path.join(source, PIPELINE_INDEX)):
            places = {ours: (source, component) for ours, component in wanted.items()}
        elif os.path.exists(os.path.join(source, "config.json")):
            places = _component_places(source, stage, wanted)
        else:
            raise PublicWeightsError(
                f"--init-from '{source}': neither a checkpoint of ours nor a diffusers folder "
                f"(no {PIPELINE_INDEX} or config.json there)"
            )
        return PublicWeights(source, places, {ours: _read_config(place) for ours, place in places.items()})
    if "://" in source or not REPO_ID.fullmatch(source):
        return None
    places = {ours: (source, component) for ours, component in wanted.items()}
    return PublicWeights(source, places, {ours: _hub_config(source, component) for ours, component in places.items()})


def _component_places(folder: str, stage: str, wanted: dict[str, str]) -> dict[str, tuple[str, str | None]]:
    if len(wanted) == 1:
        return {next(iter(wanted)): (folder, None)}
    # the decoder is two networks: its UNet's folder, with the pipeline's text_proj beside it
    parent = os.path.dirname(os.path.abspath(folder))
    if not os.path.exists(os.path.join(parent, "text_proj", "config.json")):
        raise PublicWeightsError(
            f"--init-from '{folder}': the {stage} needs its UNet and UnCLIPTextProjModel; "
            "give the UnCLIPPipeline folder, or a UNet folder with 'text_proj' beside it"
        )
    return {"unet": (folder, None), "text_proj": (parent, "text_proj")}


def _read_config(place: tuple[str, str | None]) -> dict[str, Any]:
    folder, subfolder = place
    path = os.path.join(folder, subfolder or "", "config.json")
    if not os.path.exists(path):
        raise PublicWeightsError(
            f"--init-from '{folder}': the pipeline has no '{subfolder}' component ({path} is missing)"
        )
    with open(path) as f:
        return json.load(f)


def _hub_config(repo: str, place: tuple[str, str | None]) -> dict[str, Any]:
    from huggingface_hub import hf_hub_download  # lazy: only a repo id needs the hub client

    try:
        path = hf_hub_download(repo, "config.json", subfolder=place[1])
    except Exception as err:  # offline, unknown repo, no such component: one line, whatever the cause
        raise PublicWeightsError(
            f"--init-from '{repo}': cannot read {place[1]}/config.json from the hub ({type(err).__name__})"
        ) from None
    with open(path) as f:
        return json.load(f)


def expect_class(weights: PublicWeights, name: str, component: str) -> None:
    found = weights.configs[name].get("_class_name")
    if found != CLASSES[component]:
        raise PublicWeightsError(
            f"--init-from '{weights.source}': '{component}' is a {found}, expected a {CLASSES[component]}"
        )


def load_public(weights: PublicWeights) -> dict[str, torch.nn.Module]:
    """Each network, built from its own config with its weights (float32, for training)."""
    from models.assembly import module_class  # lazy: diffusers' models load only in the ranks

    return {
        name: module_class(weights.configs[name]["_class_name"]).from_pretrained(
            folder, subfolder=subfolder, torch_dtype=torch.float32
        )
        for name, (folder, subfolder) in weights.places.items()
    }


def mismatch(weights: PublicWeights, checks: list[tuple[str, Any, str, Any]]) -> None:
    """Refuse the first (weights' field, its value, what the store or config gives, that value)
    that differ, naming both."""
    for field, value, other, expected in checks:
        if value != expected:
            raise PublicWeightsError(
                f"--init-from '{weights.source}': the weights' {field} is {value!r}, but {other} is {expected!r}"
            )
