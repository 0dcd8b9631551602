"""`unclip export --out DIR`: every trained stage's EMA weights as diffusers folders.

DIR/ldm/                the ldm chain as a diffusers pipeline: unet/, vae/ (the store's), text_encoder/
                        and tokenizer/ (the store's CLIP in transformers' classes), scheduler/, and
                        ldm_pipeline.py: `DiffusionPipeline.from_pretrained(DIR/ldm, trust_remote_code=True)`
                        draws what `unclip sample` draws (a custom pipeline: models/ldm_pipeline.py)
DIR/<stage>/<module>/   the other stages: save_pretrained of each network (prior: PriorTransformer with
                        the store's CLIP mean/std inside; decoder: UNet2DConditionModel +
                        UnCLIPTextProjModel; upsampler-<run>: UNet2DModel)
DIR/<stage>/scheduler/  the scheduler it samples with (`sample.sampler`: DDIM or DDPM)
DIR/<stage>/unclip_stage.json  how to condition it (what stage.json says, and the diffusion settings)
DIR/vae/, DIR/clip/     the frozen encoders, copied when they are local folders
DIR/README.md           a model card: each stage's training config and the store's identity

Plain diffusers loads each folder with `from_pretrained`; driven by its scheduler it gives the same
outputs as `unclip sample` on the same seed (tests/test_pipeline.py checks every stage and the
ldm's pipeline).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any

import yaml

from data_pipeline.base import storage
from data_pipeline.base.configlib import read_yaml
from data_pipeline.store import Store, open_store
from launch.config import Config
from launch.trained import check_identity, recorded_diffusion
from models import hf_text, ldm_pipeline
from models.assembly import modules_of
from models.diffusion import Diffusion
from models.encoders import LOCAL_DIR, FrozenClip, vae_identity
from models.ldm_pipeline import UnclipLdmPipeline
from training.checkpoint import load_ema_model, read_latest


def _stage_runs(cfg: Config) -> list[tuple[str, str, str]]:
    """(stage, run, export folder name) of every trained stage the sample settings point at."""
    found = [(s, cfg.sample.run, s) for s in ("prior", "decoder", "ldm") if read_latest(cfg.run_url(s, cfg.sample.run))]
    found += [("upsampler", r, f"upsampler-{r}") for r in cfg.sample.upsampler_runs if read_latest(cfg.run_url("upsampler", r))]
    return found


def run(cfg: Config, out: str, log=print) -> dict[str, Any]:
    store = open_store(cfg.store_url)
    runs = _stage_runs(cfg)
    if not runs:
        raise FileNotFoundError(f"export: no trained stage under {cfg.root}/runs (run {cfg.sample.run})")
    exported: dict[str, Any] = {}
    card_sections = []
    with storage.atomic_dir(out) as staging:
        for stage, run_name, name in runs:
            folder = read_latest(cfg.run_url(stage, run_name))
            model, info = load_ema_model(folder)
            diffusion_cfg = recorded_diffusion(folder, info)
            diffusion = Diffusion(diffusion_cfg, cfg.sample.sampler)
            if stage == "ldm":
                _ldm_pipeline(cfg, store, model, diffusion, info["extras"], os.path.join(staging, name))
            else:
                for module_name, module in modules_of(model).items():
                    module.save_pretrained(os.path.join(staging, name, module_name))
                diffusion.make_scheduler().save_pretrained(os.path.join(staging, name, "scheduler"))
            description = {"stage": stage, "run": run_name, "checkpoint": folder, "modules": list(info["modules"]),
                           "extras": info["extras"], "diffusion": dataclasses.asdict(diffusion_cfg),
                           "null_condition": NULL_CONDITION[stage]}  # fmt: skip
            with open(os.path.join(staging, name, "unclip_stage.json"), "w") as f:
                json.dump(description, f, indent=2, default=str)
            exported[name] = description
            card_sections.append(_card_section(name, stage, folder))
        _copy_encoders(cfg, staging, exported)
        with open(os.path.join(staging, "README.md"), "w") as f:
            f.write(model_card(store.manifest, card_sections))
    log(f"export: {', '.join(exported)} -> {out}")
    return exported


def _ldm_pipeline(cfg: Config, store: Store, unet, diffusion: Diffusion, extras: dict[str, Any], folder: str) -> None:
    """The ldm chain as a diffusers pipeline folder: the UNet, the store's VAE, its CLIP text
    encoder and tokenizer in transformers' classes, the scheduler, and the pipeline's code
    (models/ldm_pipeline.py), which `trust_remote_code=True` loads."""
    from diffusers import AutoencoderKL  # lazy: diffusers' models load only for the stages exported

    clip = FrozenClip(cfg.encoders.clip)
    check_identity("clip", store.manifest["encoders"]["clip"], clip.identity())
    check_identity("vae", store.manifest["encoders"]["vae"], vae_identity(cfg.encoders.vae))
    pipe = UnclipLdmPipeline(
        unet=unet, vae=AutoencoderKL.from_pretrained(cfg.encoders.vae.path, subfolder=cfg.encoders.vae.subfolder),
        text_encoder=hf_text.text_encoder(clip), tokenizer=hf_text.tokenizer(clip), scheduler=diffusion.make_scheduler(),
        text_layer=cfg.encoders.clip.text_layer, text_embedding_token=extras.get("text_embedding_token", False),
        latent_scale=extras["latent_scale"],
    )  # fmt: skip
    pipe.save_pretrained(folder)
    module = os.path.splitext(os.path.basename(ldm_pipeline.__file__))[0]
    shutil.copy(ldm_pipeline.__file__, os.path.join(folder, f"{module}.py"))
    index = os.path.join(folder, "model_index.json")
    with open(index) as f:
        described = json.load(f)
    described["_class_name"] = [module, UnclipLdmPipeline.__name__]  # diffusers loads the class from the file beside it
    with open(index, "w") as f:
        json.dump(described, f, indent=2)


def _card_section(name: str, stage: str, folder: str) -> str:
    """The stage's part of the model card: the settings it was trained with, as its config.yaml
    recorded them (plain YAML: the card describes the run, whatever today's schema)."""
    trained_with = read_yaml(storage.join(folder, "config.yaml"))
    settings = yaml.safe_dump({stage: trained_with.get(stage), "train": trained_with.get("train")}, sort_keys=False)
    return f"## {name}\n\nFrom `{folder}`.\n\n```yaml\n{settings}```\n"


NULL_CONDITION = {
    "prior": "text dropped: zero text embedding and tokens, full attention mask",
    "decoder": "image embedding dropped: text_proj.learned_classifier_free_guidance_embeddings; text dropped: zero text embedding and tokens; "
               "the unet sees pixel_unshuffle(image, p) and its output goes through pixel_shuffle(., p), p = sqrt(unet.in_channels / 3); "
               "with extras.latent_channels it draws VAE latents instead (p = 1): pictures are vae.decode(latents / extras.latent_scale)",
    "upsampler": "not conditioned on text; input is [noisy high-res, bicubic-upsampled low-res] on the channel axis",
    "ldm": "encoder_hidden_states: clip_text_tokens, then clip_text_emb as one more token when extras.text_embedding_token; "
           "text dropped: all zeros",
}


def _copy_encoders(cfg: Config, staging: str, exported: dict[str, Any]) -> None:
    vae = cfg.encoders.vae.path
    if storage.is_local(vae) and os.path.isdir(vae):
        shutil.copytree(os.path.join(vae, cfg.encoders.vae.subfolder or ""), os.path.join(staging, "vae"))
        exported["vae"] = {"copied_from": vae}
    clip = cfg.encoders.clip.model
    if clip.startswith(LOCAL_DIR) and os.path.isdir(clip[len(LOCAL_DIR) :]):
        shutil.copytree(clip[len(LOCAL_DIR) :], os.path.join(staging, "clip"))
        exported["clip"] = {"copied_from": clip, "load_with": "open_clip.create_model('local-dir:<export>/clip')"}


def model_card(manifest: dict[str, Any], sections: list[str]) -> str:
    encoders = manifest["encoders"]
    identity = {
        "store_created": manifest["created"],
        "rows": manifest["totals"]["rows"],
        "clip": {k: encoders["clip"].get(k) for k in ("model", "pretrained", "weights_sha256", "embed_dim")},
        "vae": {k: (encoders.get("vae") or {}).get(k) for k in ("path", "weights_sha256", "scaling_factor")},
        "parts": manifest["totals"]["parts"],
        "parts_index": manifest["index"]["folder"],
    }
    return (
        "# unclip export\n\nText-to-image stages trained with unclip (unCLIP prior, decoder and upsamplers; latent "
        "diffusion), as diffusers folders. `ldm/` is a whole text-to-image pipeline, a custom one because its "
        "conditioning is unclip's (the pooled text embedding as one more token, an all-zero unconditional input): "
        "`DiffusionPipeline.from_pretrained('ldm', trust_remote_code=True)(prompt)`. Load each other stage's "
        "networks with `from_pretrained` and drive them with the `scheduler` folder beside them; "
        "`unclip_stage.json` says how each is conditioned.\n\n## Data\n\n```json\n"
        + json.dumps(identity, indent=2)
        + "\n```\n\n"
        + "\n".join(sections)
    )
