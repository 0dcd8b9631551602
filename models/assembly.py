"""A stage's networks as `stage.json` describes them, rebuilt without DeepSpeed.

A stage trains one diffusers model, or (the decoder) a small wrapper around several; either way
each network is a diffusers `ModelMixin`, so it saves with `save_pretrained` and loads with
`from_pretrained` on its own.
"""

from __future__ import annotations

from typing import Any, cast

import torch

from models.decoder import UnclipDecoder, text_proj_class


def module_class(name: str):
    import diffusers  # lazy: diffusers costs 1.5 s before any model; `unclip train` checks the store without it

    if name == "UnCLIPTextProjModel":
        return text_proj_class()
    return getattr(diffusers, name)


def modules_of(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    from diffusers import (
        ModelMixin,  # pyright: ignore[reportPrivateImportUsage]
    )  # lazy: diffusers' models (3-4 s) only where a network is built; `unclip train` checks the store without it

    return {"model": model} if isinstance(model, ModelMixin) else dict(model.named_children())


def _config_of(module: torch.nn.Module) -> dict[str, Any]:
    from diffusers import ConfigMixin  # pyright: ignore[reportPrivateImportUsage]  # lazy: as in modules_of

    if not isinstance(module, ConfigMixin):
        raise TypeError(
            f"{type(module).__name__} is not a diffusers model: stage.json records each network's diffusers config"
        )
    return dict(module.config)


def describe(
    stage: str,
    model: torch.nn.Module,
    extras: dict[str, Any],
    diffusion: dict[str, Any] | None = None,
    columns: tuple[str, ...] = (),
) -> dict[str, Any]:
    """What `stage.json` says of a checkpoint, all that sampling and export need: each network's
    class and diffusers config, the diffusion it was trained with, the store columns it is
    conditioned on and the stage's extras (latent scale, resolutions, ...)."""
    return {
        "stage": stage,
        "modules": {
            name: {"class": type(m).__name__, "config": _config_of(m)} for name, m in modules_of(model).items()
        },
        "extras": extras,
        "diffusion": diffusion,
        "columns": list(columns),
    }


def rebuild(info: dict[str, Any]) -> torch.nn.Module:
    # from_config returns a (model, unused kwargs) pair only when asked to (return_unused_kwargs)
    modules = {
        name: cast(torch.nn.Module, module_class(d["class"]).from_config(d["config"]))
        for name, d in info["modules"].items()
    }
    if list(modules) == ["model"]:
        return modules["model"]
    if info["stage"] == "decoder":
        return UnclipDecoder(**modules, latent_channels=info["extras"].get("latent_channels"))
    raise ValueError(f"stage {info['stage']!r}: don't know how to assemble modules {sorted(modules)}")
