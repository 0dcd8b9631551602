"""`unclip export --out DIR`: every trained stage's EMA weights as diffusers folders.

DIR/ldm/                the ldm chain as a diffusers pipeline, prompt to picture: unet/, vae/ (the
                        store's), text_encoder/ and tokenizer/ (the store's CLIP in transformers'
                        classes), scheduler/. A `StableDiffusionPipeline` when conditioned as SD is
                        (ldm.text_embedding_token false, ldm.null_text empty_caption); else a custom
                        one (models/ldm_pipeline.py, shipped as ldm_pipeline.py)
DIR/unclip/             the unCLIP chain (prior, decoder + text_proj, up to two upsamplers in
                        sample.upsampler_runs' order) as one pipeline with the text encoder: diffusers'
                        `UnCLIPPipeline` where the chain is conditioned and sampled as Karlo is
                        (`unclip_pipeline_misfits` says what that takes), else a custom one with each
                        network's scheduler and, for a latent decoder, the VAE
                        (models/unclip_pipeline.py); unclip_stages.json says how each is conditioned
DIR/<stage>/<module>/   a stage outside a whole chain: save_pretrained of each network (prior:
                        PriorTransformer with the store's CLIP mean/std inside; decoder:
                        UNet2DConditionModel + UnCLIPTextProjModel; upsampler-<run>: UNet2DModel),
                        scheduler/ (`sample.sampler`: DDIM or DDPM) and unclip_stage.json
DIR/vae/, DIR/clip/     the frozen encoders, copied when they are local folders
DIR/README.md           a model card: each stage's training config, how to load it, the store's identity

`DiffusionPipeline.from_pretrained(DIR/ldm or DIR/unclip, trust_remote_code=True)(prompt, generator=...)`
(no remote code for the standard pipelines) draws what `unclip sample` draws at the same seed, steps and
guidance; each network alone, driven by its scheduler, gives the same outputs too (tests/test_pipeline.py
checks both).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import TYPE_CHECKING, Any, cast

import torch
import yaml

from data_pipeline.store import Store, open_store
from launch.config import Config
from launch.trained import check_identity, recorded_diffusion
from models import hf_text, ldm_pipeline, unclip_pipeline
from models.assembly import modules_of
from models.base import storage
from models.base.configlib import read_yaml
from models.config import DiffusionConfig
from models.decoder import UnclipDecoder
from models.diffusion import Diffusion
from models.encoders import LOCAL_DIR, FrozenClip, vae_identity
from models.ldm_pipeline import UnclipLdmPipeline
from models.unclip_pipeline import UnclipChainPipeline
from training.checkpoint import load_ema_model, read_latest

if TYPE_CHECKING:
    from diffusers.models.modeling_utils import ModelMixin
    from diffusers.models.transformers.prior_transformer import PriorTransformer
    from diffusers.models.unets.unet_2d import UNet2DModel
    from diffusers.schedulers.scheduling_unclip import UnCLIPScheduler
    from transformers import CLIPTextModel, CLIPTextModelWithProjection


@dataclasses.dataclass(frozen=True)
class LoadedStage:
    """One trained stage as export loads it: its newest checkpoint's EMA network and diffusion."""

    stage: str  # prior, decoder, upsampler or ldm
    run: str
    name: str  # its folder in the export: the stage, or upsampler-<run>
    checkpoint: str  # the step folder it was loaded from
    model: torch.nn.Module
    info: dict[str, Any]  # the checkpoint's stage.json
    diffusion_cfg: DiffusionConfig  # the diffusion it was trained with
    diffusion: Diffusion  # that diffusion, sampled with sample.sampler

    @property
    def extras(self) -> dict[str, Any]:
        return self.info["extras"]


def _stage_runs(cfg: Config) -> list[tuple[str, str, str, str]]:
    """(stage, run, export folder name, newest checkpoint) of every trained stage the sample settings
    point at."""
    wanted = [(s, cfg.sample.run, s) for s in ("prior", "decoder", "ldm")]
    wanted += [("upsampler", r, f"upsampler-{r}") for r in cfg.sample.upsampler_runs]
    found = []
    for stage, run_name, name in wanted:
        checkpoint = read_latest(cfg.run_url(stage, run_name))
        if checkpoint:
            found.append((stage, run_name, name, checkpoint))
    return found


def _load(cfg: Config, stage: str, run_name: str, name: str, checkpoint: str) -> LoadedStage:
    model, info = load_ema_model(checkpoint)
    diffusion_cfg = recorded_diffusion(checkpoint, info)
    return LoadedStage(
        stage=stage,
        run=run_name,
        name=name,
        checkpoint=checkpoint,
        model=model,
        info=info,
        diffusion_cfg=diffusion_cfg,
        diffusion=Diffusion(diffusion_cfg, cfg.sample.sampler),
    )


def _decoder(loaded: LoadedStage) -> UnclipDecoder:
    """The decoder stage's network: models.assembly.rebuild assembles every decoder as an UnclipDecoder."""
    return cast(UnclipDecoder, loaded.model)


def run(cfg: Config, out: str, log=print) -> dict[str, Any]:
    store = open_store(cfg.store_url)
    runs = _stage_runs(cfg)
    if not runs:
        raise FileNotFoundError(f"export: no trained stage under {cfg.root}/runs (run {cfg.sample.run})")
    exported: dict[str, Any] = {}
    card_sections = []
    loaded = [_load(cfg, *found) for found in runs]
    # the unCLIP chain, when it is whole, is one pipeline folder holding its networks
    chain = [item for item in loaded if item.stage in ("prior", "decoder", "upsampler")]
    whole = {item.stage for item in chain} >= {"prior", "decoder"} and sum(
        item.stage == "upsampler" for item in chain
    ) <= MAX_SUPER_RES
    misfits = unclip_pipeline_misfits(cfg, chain) if whole else []
    chain_pipeline = "UnCLIPPipeline" if whole and not misfits else UnclipChainPipeline.__name__
    with storage.atomic_dir(out) as staging:
        for item in loaded:
            pipeline, where = None, item.name
            if item.stage == "ldm":
                folder = os.path.join(staging, item.name)
                pipeline = _ldm_pipeline(cfg, store, item.model, item.diffusion, item.extras, folder)
            elif whole:
                pipeline, where = chain_pipeline, UNCLIP_FOLDER
            else:
                for module_name, module in modules_of(item.model).items():
                    # each is a diffusers model (models.assembly.module_class)
                    cast("ModelMixin", module).save_pretrained(os.path.join(staging, item.name, module_name))
                learned_variance = getattr(item.model, "learned_variance", False)
                item.diffusion.make_scheduler(learned_variance=learned_variance).save_pretrained(
                    os.path.join(staging, item.name, "scheduler")
                )
            description = {
                "stage": item.stage,
                "run": item.run,
                "checkpoint": item.checkpoint,
                "modules": list(item.info["modules"]),
                "extras": item.extras,
                "diffusion": dataclasses.asdict(item.diffusion_cfg),
                "null_condition": NULL_CONDITION[item.stage],
                "pipeline": pipeline,
                "folder": where,
            }
            if where == item.name:
                with open(os.path.join(staging, item.name, "unclip_stage.json"), "w") as f:
                    f.write(storage.strict_json(description, indent=2, default=str))
            exported[item.name] = description
            card_sections.append(_card_section(item.name, item.stage, item.checkpoint, pipeline, where, misfits))
        if whole:
            build = _unclip_pipeline if misfits else _standard_unclip_pipeline
            build(cfg, store, chain, os.path.join(staging, UNCLIP_FOLDER))
            with open(os.path.join(staging, UNCLIP_FOLDER, "unclip_stages.json"), "w") as f:
                f.write(
                    storage.strict_json(
                        {
                            **{item.name: exported[item.name] for item in chain},
                            "not_an_UnCLIPPipeline_because": misfits,
                        },
                        indent=2,
                        default=str,
                    )
                )
        _copy_encoders(cfg, staging, exported)
        with open(os.path.join(staging, "README.md"), "w") as f:
            f.write(model_card(store.manifest, card_sections))
    log(f"export: {', '.join(exported)} -> {out}")
    return exported


UNCLIP_FOLDER = "unclip"
MAX_SUPER_RES = 2  # the chain pipeline's super-resolution slots (64 -> 256 -> 1024)


def _ship_code(folder: str, module, pipe) -> None:
    """Put a custom pipeline's source beside its components and name it in model_index.json, so
    that DiffusionPipeline.from_pretrained(folder, trust_remote_code=True) loads the class from it."""
    name = os.path.splitext(os.path.basename(module.__file__))[0]
    shutil.copy(module.__file__, os.path.join(folder, f"{name}.py"))
    _name_components_by_module(folder, pipe, class_name=[name, type(pipe).__name__])


def _name_components_by_module(folder: str, pipe, class_name: list[str] | None = None) -> None:
    """A component diffusers no longer exports at its top level (UnCLIPTextProjModel) is named in
    model_index.json by its module: diffusers' own save_pretrained names it by the top level, which
    from_pretrained (0.42) then cannot load, even into an UnCLIPPipeline."""
    import diffusers  # lazy: as the pipelines above

    index = os.path.join(folder, "model_index.json")
    with open(index) as f:
        described = json.load(f)
    if class_name:
        described["_class_name"] = class_name
    for component, value in described.items():
        if isinstance(value, list) and value[:1] == ["diffusers"] and not hasattr(diffusers, value[1]):
            described[component] = [type(getattr(pipe, component)).__module__, value[1]]
    with open(index, "w") as f:
        f.write(storage.strict_json(described, indent=2))


# The decoder blocks to which UnCLIPPipeline's `attention_mask` is the text's mask: diffusers'
# CrossAttn* blocks would apply it to their self-attention (they take the text's as encoder_attention_mask).
_TEXT_MASKED_BLOCKS = (
    "SimpleCrossAttnDownBlock2D",
    "SimpleCrossAttnUpBlock2D",
    "UNetMidBlock2DSimpleCrossAttn",
    "ResnetDownsampleBlock2D",
    "ResnetUpsampleBlock2D",
    "DownBlock2D",
    "UpBlock2D",
)


def unclip_pipeline_misfits(cfg: Config, chain: list[LoadedStage]) -> list[str]:
    """What keeps the whole unCLIP chain from being diffusers' UnCLIPPipeline, which draws as Karlo
    does: the UnCLIPScheduler for every network, the empty caption as unconditional text, the
    decoder's text mask, one upsampler (run as its first and last UNet) over an antialiased bicubic
    enlargement, on the last text layer. [] when it is one."""
    by_stage = {item.stage: item for item in chain if item.stage != "upsampler"}
    upsamplers = [item for item in chain if item.stage == "upsampler"]
    prior_extras, dec, dec_extras = by_stage["prior"].extras, _decoder(by_stage["decoder"]), by_stage["decoder"].extras
    unet = dec.unet.config
    found = []
    if cfg.sample.sampler != "unclip":
        found.append(f"sample.sampler is {cfg.sample.sampler!r}, not 'unclip' (UnCLIPScheduler)")
    if cfg.encoders.clip.text_layer != "last":
        found.append(f"encoders.clip.text_layer is {cfg.encoders.clip.text_layer!r}: UnCLIPPipeline reads the last")
    for stage, extras in (("prior", prior_extras), ("decoder", dec_extras)):
        if extras.get("null_text", "zeros") != "empty_caption":
            found.append(
                f"{stage}.null_text is {extras.get('null_text', 'zeros')!r}: "
                "UnCLIPPipeline's unconditional text is the empty caption"
            )
    if not dec_extras.get("text_mask"):
        found.append("decoder.text_mask is off: UnCLIPPipeline masks the caption's padding")
    if dec.latent or dec.patch != 1:
        found.append(
            "the decoder draws VAE latents"
            if dec.latent
            else f"the decoder folds {dec.patch} x {dec.patch} pixels into channels"
        )
    blocks = [*unet.down_block_types, *unet.up_block_types, unet.mid_block_type]
    if any(b not in _TEXT_MASKED_BLOCKS for b in blocks if b):
        found.append(
            f"the decoder's blocks {sorted(set(b for b in blocks if b and b not in _TEXT_MASKED_BLOCKS))} would take "
            "UnCLIPPipeline's text mask for their self-attention (Karlo's are SimpleCrossAttn blocks)"
        )
    if len(upsamplers) != 1:
        found.append(f"{len(upsamplers)} upsamplers: UnCLIPPipeline runs exactly one")
    elif upsamplers[0].extras.get("resize", "bicubic_clamped") != "bicubic_antialias":
        found.append("upsampler.resize is not bicubic_antialias, the enlargement UnCLIPPipeline gives its upsampler")
    return found


def _standard_unclip_pipeline(cfg: Config, store: Store, chain: list[LoadedStage], folder: str) -> None:
    """The chain as diffusers' UnCLIPPipeline (`unclip_pipeline_misfits` found nothing against it):
    its one upsampler is both super_res_first and super_res_last, as one network ran every step."""
    # lazy: diffusers' pipelines load only for an export
    from diffusers import UnCLIPPipeline  # pyright: ignore[reportPrivateImportUsage]  # diffusers exports it lazily

    by_stage = {item.stage: item for item in chain}
    dec = _decoder(by_stage["decoder"])
    upsampler = cast("UNet2DModel", by_stage["upsampler"].model)  # as models/upsampler.py builds it
    clip = store_clip(cfg, store)
    pipe = UnCLIPPipeline(
        prior=cast("PriorTransformer", by_stage["prior"].model),  # as models/prior.py builds it
        decoder=dec.unet,
        text_proj=dec.text_proj,
        text_encoder=cast("CLIPTextModelWithProjection", hf_text.text_encoder(clip)),
        tokenizer=hf_text.tokenizer(clip),
        super_res_first=upsampler,
        super_res_last=upsampler,
        prior_scheduler=_unclip_scheduler(by_stage["prior"]),
        decoder_scheduler=_unclip_scheduler(by_stage["decoder"], learned_variance=dec.learned_variance),
        super_res_scheduler=_unclip_scheduler(by_stage["upsampler"]),
    )
    pipe.save_pretrained(folder)
    _name_components_by_module(folder, pipe)


def _unclip_scheduler(item: LoadedStage, learned_variance: bool = False) -> UnCLIPScheduler:
    """A stage's scheduler in a chain exported as an UnCLIPPipeline: an UnCLIPScheduler, as
    `unclip_pipeline_misfits` found sample.sampler to be unclip."""
    return cast("UnCLIPScheduler", item.diffusion.make_scheduler(learned_variance=learned_variance))


def _unclip_pipeline(cfg: Config, store: Store, chain: list[LoadedStage], folder: str) -> None:
    """prior -> decoder -> upsamplers (in sample.upsampler_runs' order) as one custom pipeline
    (models/unclip_pipeline.py) with the store's CLIP text encoder and, for a latent decoder, its VAE."""
    # lazy: diffusers' models load only for an export
    from diffusers import AutoencoderKL  # pyright: ignore[reportPrivateImportUsage]  # diffusers exports it lazily

    by_stage = {item.stage: item for item in chain if item.stage != "upsampler"}
    upsamplers = [item for item in chain if item.stage == "upsampler"]
    prior_model, prior_diffusion = by_stage["prior"].model, by_stage["prior"].diffusion
    dec, dec_extras, dec_diffusion = (
        _decoder(by_stage["decoder"]),
        by_stage["decoder"].extras,
        by_stage["decoder"].diffusion,
    )
    clip = store_clip(cfg, store)
    vae = None
    if dec.latent:
        check_identity("vae", store.manifest["encoders"]["vae"], vae_identity(cfg.encoders.vae))
        vae = AutoencoderKL.from_pretrained(cfg.encoders.vae.path, subfolder=cfg.encoders.vae.subfolder)
    super_res = {}
    for i, item in enumerate(upsamplers):
        super_res[f"super_res_{i}"], super_res[f"super_res_{i}_scheduler"] = item.model, item.diffusion.make_scheduler()
    pipe = UnclipChainPipeline(
        text_encoder=hf_text.text_encoder(clip),
        tokenizer=hf_text.tokenizer(clip),
        prior=prior_model,
        prior_scheduler=prior_diffusion.make_scheduler(),
        decoder=dec.unet,
        text_proj=dec.text_proj,
        decoder_scheduler=dec_diffusion.make_scheduler(learned_variance=dec.learned_variance),
        vae=vae,
        **super_res,
        text_layer=cfg.encoders.clip.text_layer,
        decoder_latent_scale=dec_extras.get("latent_scale") if dec.latent else None,
        prior_null_text=by_stage["prior"].extras.get("null_text", "zeros"),
        decoder_null_text=dec_extras.get("null_text", "zeros"),
        decoder_text_mask=bool(dec_extras.get("text_mask")),
        super_res_resize=[item.extras.get("resize", "bicubic_clamped") for item in upsamplers]
        + ["bicubic_clamped"] * (MAX_SUPER_RES - len(upsamplers)),
    )
    pipe.save_pretrained(folder)
    _ship_code(folder, unclip_pipeline, pipe)


def _ldm_pipeline(cfg: Config, store: Store, unet, diffusion: Diffusion, extras: dict[str, Any], folder: str) -> str:
    """The ldm chain as a diffusers pipeline folder: the UNet, the store's VAE, its CLIP text
    encoder and tokenizer in transformers' classes, and the scheduler. Conditioned as Stable
    Diffusion is (the text states alone, the empty caption's as unconditional) it is a
    `StableDiffusionPipeline`; else our own (models/ldm_pipeline.py, shipped beside it, which
    `trust_remote_code=True` loads). Returns the pipeline's class name."""
    # lazy: diffusers' pipelines load only for an export (the ignore: diffusers exports them lazily)
    from diffusers import AutoencoderKL, StableDiffusionPipeline  # pyright: ignore[reportPrivateImportUsage]

    clip = store_clip(cfg, store)
    check_identity("vae", store.manifest["encoders"]["vae"], vae_identity(cfg.encoders.vae))
    vae = AutoencoderKL.from_pretrained(cfg.encoders.vae.path, subfolder=cfg.encoders.vae.subfolder)
    common = {"unet": unet, "vae": vae, "tokenizer": hf_text.tokenizer(clip), "scheduler": diffusion.make_scheduler()}
    if extras.get("null_text") == "empty_caption" and not extras.get("text_embedding_token", False):
        vae.register_to_config(scaling_factor=extras["latent_scale"])  # what the pipeline divides latents by
        pipe = StableDiffusionPipeline(
            **common,
            text_encoder=cast("CLIPTextModel", hf_text.stable_diffusion_text_encoder(clip)),
            # diffusers' documented way to leave the safety checker out, though its types say otherwise
            safety_checker=None,  # pyright: ignore[reportArgumentType]
            feature_extractor=None,  # pyright: ignore[reportArgumentType]
            requires_safety_checker=False,
        )
        pipe.save_pretrained(folder)
        return type(pipe).__name__
    pipe = UnclipLdmPipeline(
        **common,
        text_encoder=hf_text.text_encoder(clip),
        text_layer=cfg.encoders.clip.text_layer,
        text_embedding_token=extras.get("text_embedding_token", False),
        null_text=extras.get("null_text", "zeros"),
        latent_scale=extras["latent_scale"],
    )
    pipe.save_pretrained(folder)
    _ship_code(folder, ldm_pipeline, pipe)
    return UnclipLdmPipeline.__name__


def store_clip(cfg: Config, store: Store) -> FrozenClip:
    """The CLIP an exported pipeline's text encoder is converted from: the configured one, refused
    unless it is the one the store was embedded with."""
    clip = FrozenClip(cfg.encoders.clip)
    check_identity("clip", store.manifest["encoders"]["clip"], clip.identity())
    return clip


def _card_section(name: str, stage: str, folder: str, pipeline: str | None, where: str, misfits: list[str]) -> str:
    """The stage's part of the model card: how to load it, and the settings it was trained with, as
    its config.yaml recorded them (plain YAML: the card describes the run, whatever today's schema)."""
    trained_with = read_yaml(storage.join(folder, "config.yaml"))
    settings = yaml.safe_dump({stage: trained_with.get(stage), "train": trained_with.get("train")}, sort_keys=False)
    load = {
        "StableDiffusionPipeline": "A standard `StableDiffusionPipeline`: "
        f"`StableDiffusionPipeline.from_pretrained('{where}')`.",
        UnclipLdmPipeline.__name__: f"A custom pipeline (its conditioning is unclip's): "
        f"`DiffusionPipeline.from_pretrained('{where}', trust_remote_code=True)`.",
        "UnCLIPPipeline": "Part of the unCLIP chain as a standard `UnCLIPPipeline`: "
        f"`UnCLIPPipeline.from_pretrained('{where}')`.",
        UnclipChainPipeline.__name__: f"Part of the unCLIP chain's custom pipeline, not an `UnCLIPPipeline` because "
        f"{'; '.join(misfits)}: `DiffusionPipeline.from_pretrained('{where}', trust_remote_code=True)`.",
        None: "Diffusers networks with the scheduler they sample with: see `unclip_stage.json`.",
    }[pipeline]
    return f"## {name}\n\n{load} From `{folder}`.\n\n```yaml\n{settings}```\n"


NULL_CONDITION = {
    "prior": "text dropped: zero text embedding and tokens, full attention mask (extras.null_text zeros), "
    "or the empty caption's (empty_caption)",
    "decoder": "image embedding dropped: text_proj.learned_classifier_free_guidance_embeddings; "
    "text dropped: zero text embedding and tokens (extras.null_text zeros) or the empty caption's (empty_caption); "
    "with extras.text_mask the unet's encoder_attention_mask is [context tokens: true, then the caption's mask]; "
    "the unet sees pixel_unshuffle(image, p) and its output goes through pixel_shuffle(., p), "
    "p = sqrt(unet.in_channels / 3); with extras.latent_channels it draws VAE latents instead (p = 1): "
    "pictures are vae.decode(latents / extras.latent_scale)",
    "upsampler": "not conditioned on text; input is [noisy high-res, low-res enlarged as extras.resize says] "
    "on the channel axis",
    "ldm": "encoder_hidden_states: clip_text_tokens, then clip_text_emb as one more token when "
    "extras.text_embedding_token; text dropped: all zeros",
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
        "diffusion), as diffusers folders. `ldm/` is a whole text-to-image pipeline: a `StableDiffusionPipeline` "
        "when it is conditioned as Stable Diffusion is, else a custom one (loaded with `trust_remote_code=True`); "
        "each section below says which. Load each other stage's networks with `from_pretrained` and drive "
        "them with the `scheduler` folder beside them; `unclip_stage.json` says how each is conditioned."
        "\n\n## Data\n\n```json\n" + storage.strict_json(identity, indent=2) + "\n```\n\n" + "\n".join(sections)
    )
