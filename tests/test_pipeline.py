"""The whole system end to end, on a smaller configuration than the demo:
generate -> serve -> ingest -> encoders -> embed -> train ldm, prior, decoder, upsampler (DeepSpeed,
one rank through torchrun) -> sample both chains -> eval; then resume, variations and interpolation, export to
diffusers checked output for output against plain diffusers, and refusals."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from data_pipeline.store import StoreError, open_store
from launch import config, demo, export, sample
from launch.train import train_local
from models.base import storage
from models.base.configlib import ConfigError, read_yaml, replace, to_yaml
from tests.support.plain_diffusers import plain_decoder, plain_loop

pytestmark = pytest.mark.slow

SMALL = [
    "synthetic.count=48",
    "ingest.shard_size=20",
    "embed.batch_size=16",
    "embed.holdout_fraction=0.2",
    "train.steps=8",
    "train.nproc=1",  # ranks are the engine tests' subject; one trains the four stages end to end sooner
    "train.batch_size=8",
    "train.log_every=2",
    "train.checkpoint_every=4",
    "train.optim.warmup_steps=2",
    "train.progress_bar=never",
    "train.stages={decoder: {batch_size: 4}, upsampler: {batch_size: 4}}",
    "ldm.block_channels=[32, 64]",
    "prior.layers=2",
    "decoder.block_channels=[16, 32]",
    "upsampler.block_channels=[16, 16]",
    "upsampler.crop=32",
    "sample.steps=4",
    "sample.upsampler_steps=2",  # the 64 -> 256 upsampler is most of sample's and eval's time
    "sample.images_per_prompt=2",
    "sample.batch_size=3",  # 4 images per chain: two batches, the second of one
    "sample.prompts=[a red circle on a blue background, a green square on a white background]",
    "eval.samples=4",
    "eval.images_per_prompt=2",
    "encoders.fit.clip_steps=10",
    "encoders.fit.vae_steps=4",
    "encoders.fit.vae_batch_size=8",
]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, local_ray):
    workdir = tmp_path_factory.mktemp("demo")
    cfg = config.load(None, demo.demo_overrides(str(workdir)) + SMALL)
    report = demo.run(cfg, str(workdir), log=print)
    return cfg, workdir, report


def test_report_describes_every_phase(pipeline):
    cfg, workdir, report = pipeline
    assert json.loads((workdir / "report.json").read_text()) == report
    phases = report["phases"]
    assert list(phases) == [
        "generate",
        "ingest",
        "encoders",
        "embed",
        "train_ldm",
        "train_prior",
        "train_decoder",
        "train_upsampler",
        "sample",
        "eval",
    ]
    assert all(p["wall_s"] > 0 for p in phases.values())
    assert phases["ingest"]["kept"] == 48 and phases["ingest"]["failed"] == 3
    assert phases["ingest"]["failed_by_reason"] == {"decode_error": 2, "http_4xx": 1}
    fitted = phases["encoders"]  # fitted on the ingested pairs, scored on held-out ones
    assert (
        fitted["clip"]["steps"] == 10
        and fitted["vae"]["steps"] == 4
        and fitted["pairs"] + fitted["heldout_pairs"] == 48
    )
    assert 0 <= fitted["clip"]["heldout_retrieval"]["top1"] <= 1 and fitted["vae"]["heldout_psnr_db"] > 0
    assert json.loads((Path(cfg.root) / "encoders" / "fit_report.json").read_text()) == {
        k: v for k, v in fitted.items() if k != "wall_s"
    }
    assert phases["embed"]["rows"] == 48 and {"image_64", "image_256", "vae_latent"} <= set(phases["embed"]["columns"])
    for stage in ("ldm", "prior", "decoder", "upsampler"):
        entry = phases[f"train_{stage}"]
        assert entry["steps"] == 8 and entry["checkpoint"].endswith("step_0000008")
        assert 0 < entry["last_loss"] < 10 and 0 < entry["first_loss"] < 10
    assert phases["train_ldm"]["last_loss"] < phases["train_ldm"]["first_loss"]
    for chain, side in (("ldm", 64), ("unclip", 256)):
        assert len(phases["sample"][f"{chain}_images"]) == 4
        for path in phases["sample"][f"{chain}_images"]:
            with Image.open(path) as im:
                assert im.size == (side, side) and im.mode == "RGB"
        assert os.path.exists(phases["sample"][f"{chain}_grid"])
    ev = phases["eval"]
    assert ev["heldout_rows"] == 4 and os.path.exists(ev["grid"]) and ev["grid_columns"] == ["real", "ldm", "unclip"]
    for value in (
        ev["prior"]["cosine_predicted_vs_true"],
        ev["prior"]["cosine_text_embedding_baseline"],
        ev["ldm"]["clip_score"],
        ev["unclip"]["clip_score"],
        ev["ldm"]["frechet_distance_clip"],
        ev["real_images_frechet_distance_clip"],
    ):
        assert value == value and abs(value) < 1e6  # finite
    # the distance is measured against training rows (the default eval.reference_rows exceeds the store)
    assert ev["frechet_reference"]["split"] == "train" and ev["frechet_reference"]["rows"] > ev["heldout_rows"]
    assert json.loads(open(os.path.join(cfg.eval.out, "eval.json")).read())["unclip"]["resolution"] == 256
    for chain in ("ldm", "unclip"):  # held-out captions are the generator's: the reader scores both guidances
        for scores in (ev[chain], ev[chain]["guidance_1"]):
            assert scores["images"] == 8  # two of each of the 4 held-out prompts
            assert set(scores["prompt_following"]) == {"shape", "color", "background"}
            assert all(0 <= v <= 1 for v in scores["prompt_following"].values())
    with Image.open(ev["reading_grid"]) as im:
        assert im.size[1] == 4 * (128 + 14)  # one row per held-out prompt


def test_store_manifest_follows_the_contract(pipeline):
    cfg, _, _ = pipeline
    manifest = storage.read_json(storage.join(cfg.store_url, "manifest.json"))
    clip, vae = manifest["encoders"]["clip"], manifest["encoders"]["vae"]
    assert (clip["text_layer"], clip["text_padding"]) == ("last", "zeros")
    assert clip["weights_sha256"] == storage.sha256_file(
        os.path.join(cfg.root, "encoders", "clip", "open_clip_model.safetensors")
    )
    assert vae["weights_sha256"] == storage.sha256_file(
        os.path.join(cfg.root, "encoders", "vae", "diffusion_pytorch_model.safetensors")
    )
    assert manifest["columns"]["vae_latent"] == {"dtype": "float16", "shape": [4, 16, 16], "image_side": 64}
    assert manifest["holdout"]["fraction"] == 0.2
    assert sum(open_store(cfg.store_url).index.rows) == manifest["totals"]["rows"] == 48


def test_resolved_config_is_saved_beside_every_output(pipeline):
    cfg, workdir, _ = pipeline
    for path in (
        storage.join(cfg.raw_url, "_config.yaml"),
        storage.join(cfg.sample.out, "config.yaml"),
        storage.join(cfg.eval.out, "config.yaml"),
        str(workdir / "config.yaml"),
    ):
        assert config.from_dict(read_yaml(path)) == cfg, path
    # a run records the settings it trained with: its own train.stages entry applied, none left
    prior_cfg = config.from_dict(read_yaml(storage.join(cfg.run_url("prior"), "step_0000008", "config.yaml")))
    assert prior_cfg == config.for_stage(cfg, "prior") and prior_cfg.train == replace(cfg.train, stages={})
    decoder_cfg = config.from_dict(read_yaml(storage.join(cfg.run_url("decoder"), "config.yaml")))
    assert (decoder_cfg.train.batch_size, decoder_cfg.train.steps, decoder_cfg.train.stages) == (4, 8, {})


def test_training_resumes_from_latest_exactly(pipeline):
    """A run stopped at step 4 and started again ends where the uninterrupted run ended."""
    cfg, _, _ = pipeline
    straight, resumed = cfg.run_url("ldm"), cfg.run_url("ldm", "resumed")
    os.makedirs(resumed)
    shutil.copytree(os.path.join(straight, "step_0000004"), os.path.join(resumed, "step_0000004"))
    summary = train_local(replace(cfg, **{"train.run": "resumed"}), "ldm", log=print)
    assert summary["resumed_from_step"] == 4 and summary["checkpoint"].endswith("step_0000008")
    a = load_file(os.path.join(straight, "step_0000008", "ema.safetensors"))
    b = load_file(os.path.join(resumed, "step_0000008", "ema.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_variations_and_interpolation(pipeline):
    cfg, workdir, _ = pipeline
    source = str(workdir / "site" / "images" / "000000.png")
    out = storage.join(cfg.root, "samples-extra")
    result = sample.run(
        replace(
            cfg,
            **{
                "sample.chains": [],
                "sample.variations": [source],
                "sample.out": out,
                "sample.interpolate": ["a red circle on a blue background", "a green square on a white background"],
                "sample.interpolation_steps": 3,
            },
        ),
        log=print,
    )
    with Image.open(result["variations"]["grid"]) as im:
        assert im.size == (256 * 3, 256)  # the source, then two variations
    with Image.open(result["interpolation"]["grid"]) as im:
        assert im.size == (256 * 3, 256)
    assert result["interpolation"]["weights"] == [0.0, 0.5, 1.0]


def test_sampling_with_other_encoders_is_refused(pipeline, tmp_path):
    from models.encoders import write_tiny_encoders

    cfg, _, _ = pipeline
    other = replace(
        cfg,
        **{
            "encoders.clip.model": f"local-dir:{tmp_path}/clip",
            "encoders.vae.path": str(tmp_path / "vae"),
            "encoders.tiny.seed": 1,
        },
    )
    write_tiny_encoders(other.encoders)
    with pytest.raises(
        StoreError, match=r"encoders.clip.weights_sha256 is '[0-9a-f]{64}', but the store was embedded with"
    ):
        sample.run(other, log=print)


def test_a_fine_tuned_public_stable_diffusion_unet_exports_as_a_stable_diffusion_pipeline(pipeline, tmp_path):
    """A public-layout StableDiffusionPipeline (tiny, its UNet fitting this store) fine-tuned with
    --init-from, conditioned as Stable Diffusion is (the text states alone; dropped captions are
    the empty caption's, which the store records), exported again: a StableDiffusionPipeline,
    loaded without remote code, that draws what `unclip sample` draws."""
    from diffusers import DiffusionPipeline

    from launch.trained import load_trained
    from tests.support import public_layouts

    cfg, _, _ = pipeline
    store = open_store(cfg.store_url)
    empty = store.null_caption()
    assert (
        set(empty) == {"clip_text_emb", "clip_text_tokens", "text_mask"} and empty["text_mask"].sum() == 2
    )  # start, end
    channels, side, _ = store.shape("vae_latent")
    sd = public_layouts.stable_diffusion(
        str(tmp_path / "sd"), cross_attention_dim=store.shape("clip_text_tokens")[1], latent=(channels, side)
    )
    tuned = replace(
        cfg,
        **{
            "ldm.null_text": "empty_caption",
            "ldm.text_embedding_token": False,
            "train.steps": 2,
            "train.run": "sd",
            "sample.run": "sd",
        },
    )
    train_local(tuned, "ldm", init_from=sd, log=print)
    out = str(tmp_path / "export")
    exported = export.run(tuned, out, log=print)
    assert set(exported) >= {"ldm"} and exported["ldm"]["pipeline"] == "StableDiffusionPipeline"
    pipe = DiffusionPipeline.from_pretrained(os.path.join(out, "ldm"))
    assert type(pipe).__name__ == "StableDiffusionPipeline" and not os.path.exists(
        os.path.join(out, "ldm", "ldm_pipeline.py")
    )
    prompts, steps, w, seed = ["a red circle on a blue background", "a green square on a white background"], 4, 3.0, 7
    trained = load_trained(tuned, store, ["ldm"])
    drawn = pipe(
        prompts,
        num_inference_steps=steps,
        guidance_scale=w,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    ).images
    sampled = trained.generate("ldm", trained.encode_text(prompts), steps, (w, 1.0), seed, batch_size=len(prompts))
    assert torch.allclose(drawn, (sampled + 1) / 2, atol=1e-4), (drawn - (sampled + 1) / 2).abs().max()


KARLO_SAMPLING = {
    # sampled as UnCLIPPipeline samples Karlo: its scheduler, the empty caption as unconditional
    # text, the decoder's text mask, the upsampler's antialiased enlargement
    "sample.sampler": "unclip",
    "prior.null_text": "empty_caption",
    "decoder.null_text": "empty_caption",
    "decoder.text_mask": True,
    "decoder.space": "pixel",
    "upsampler.resize": "bicubic_antialias",
    # Karlo's schedules and clipping (configs/karlo-finetune.yaml), with x0 targets where Karlo's
    # decoder and upsampler predict eps: at UnCLIPScheduler's first step (t = 999) an eps
    # prediction's x_0 is divided by sqrt(abar) = 4.9e-5, so float noise of 1e-7 between two
    # implementations' convolutions (batched otherwise here) reaches 2e-3 in the pixels its clip
    # does not saturate. With x0 targets the two draw the same within 1e-4.
    "prior.diffusion": {"schedule": "cosine", "prediction": "x0", "clip_sample": 5.0},
    "decoder.diffusion": {"schedule": "cosine", "prediction": "x0", "clip_sample": 1.0},
    "upsampler.diffusion": {"schedule": "cosine", "prediction": "x0", "clip_sample": 1.0},
}


def test_a_fine_tuned_karlo_chain_exports_as_an_unclip_pipeline(pipeline, tmp_path):
    """A public-layout UnCLIPPipeline (tiny, as Karlo's, fitting this store): its prior, decoder
    (+ text_proj, with its learned variance) and super-resolution UNet fine-tuned with --init-from
    and sampled as Karlo is, exported again: diffusers' own UnCLIPPipeline, loaded without remote
    code, that draws what `unclip sample` draws."""
    from diffusers import DiffusionPipeline

    from launch.trained import load_trained
    from tests.support import public_layouts

    cfg, _, _ = pipeline
    store = open_store(cfg.store_url)
    karlo = public_layouts.karlo(
        str(tmp_path / "karlo"), dim=store.shape("clip_image_emb")[0], tokens=store.shape("clip_text_tokens")[0]
    )
    tuned = replace(
        cfg,
        **{
            **KARLO_SAMPLING,
            "train.steps": 2,
            "train.run": "karlo",
            "sample.run": "karlo",
            "sample.upsampler_runs": ["karlo"],
        },
    )
    settings = tmp_path / "karlo.yaml"
    settings.write_text(to_yaml(tuned))
    # the three stages at once, one rank each: their start-up is most of their time
    running = [
        subprocess.Popen(
            [sys.executable, "-m", "launch.cli", "train", stage, "--config", str(settings), "--init-from", karlo],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for stage in ("prior", "decoder", "upsampler")
    ]
    for proc in running:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    out = str(tmp_path / "export")
    exported = export.run(tuned, out, log=print)
    assert exported["prior"]["pipeline"] == exported["upsampler-karlo"]["pipeline"] == "UnCLIPPipeline", json.load(
        open(os.path.join(out, "unclip", "unclip_stages.json"))
    )["not_an_UnCLIPPipeline_because"]
    pipe = DiffusionPipeline.from_pretrained(os.path.join(out, "unclip"))
    assert type(pipe).__name__ == "UnCLIPPipeline" and not os.path.exists(
        os.path.join(out, "unclip", "unclip_pipeline.py")
    )
    assert pipe.decoder_scheduler.config.variance_type == "learned_range"  # Karlo's decoder's, kept through fine-tuning
    # one prompt and two super-resolution steps (UnCLIPScheduler's fewest): each is a 256 px UNet pass
    prompts, steps, sr_steps, seed = ["a red circle on a blue background"], 4, 2, 7
    w_decoder, w_prior = 3.0, 2.0
    drawn = pipe(
        prompts,
        prior_num_inference_steps=steps,
        decoder_num_inference_steps=steps,
        super_res_num_inference_steps=sr_steps,
        prior_guidance_scale=w_prior,
        decoder_guidance_scale=w_decoder,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    ).images
    trained = load_trained(tuned, store, ["prior", "decoder", "upsampler"])
    sampled = trained.generate(
        "unclip",
        trained.encode_text(prompts),
        steps,
        (w_decoder, w_prior),
        seed,
        batch_size=len(prompts),
        upsampler_steps=sr_steps,
    )
    ours = ((sampled + 1) / 2).permute(0, 2, 3, 1).numpy()
    # The same arithmetic in another order (diffusers' pipeline vs our sampler: four UNets, eight
    # steps): the CPU's kernels decide the last bits; 1.3e-4 at most was seen on one machine. A wrong
    # scheduler, guidance or noise differs by 1e-2 or more, everywhere.
    diff = np.abs(drawn - ours)
    assert drawn.shape == (1, 256, 256, 3) and diff.max() < 1e-3 and diff.mean() < 1e-5, (diff.max(), diff.mean())
    assert "standard `UnCLIPPipeline`" in open(os.path.join(out, "README.md")).read()


def test_export_loads_in_plain_diffusers_and_gives_our_outputs(pipeline, tmp_path):
    from diffusers import AutoencoderKL, DiffusionPipeline, PriorTransformer, UNet2DConditionModel, UNet2DModel

    from launch.trained import load_trained
    from models import chains, decoder, ldm, prior, upsampler
    from models.decoder import text_proj_class

    cfg, _, _ = pipeline
    out = str(tmp_path / "export")
    exported = export.run(cfg, out, log=print)
    assert {"prior", "decoder", "ldm", "upsampler-main", "vae", "clip"} <= set(exported)
    card = open(os.path.join(out, "README.md")).read()
    assert "weights_sha256" in card and "## decoder" in card and "block_channels" in card

    trained = load_trained(cfg, open_store(cfg.store_url), ["prior", "decoder", "upsampler", "ldm"])
    prompts = ["a red circle on a blue background", "a green square on a white background"]
    text = trained.encode_text(prompts)
    steps, w, seed = 4, 3.0, 7

    # ldm
    unet = UNet2DConditionModel.from_pretrained(os.path.join(out, "ldm", "unet"))
    assert exported["ldm"]["extras"][
        "text_embedding_token"
    ]  # the default: as NULL_CONDITION says, emb after the tokens
    hidden = torch.cat([text["tokens"], text["emb"][:, None]], 1)
    ldm_net = trained.nets["ldm"]
    ours = ldm.sample(
        ldm_net.model, ldm_net.diffusion, ldm.context(text, True), steps, w, torch.Generator().manual_seed(seed)
    )
    theirs = plain_loop(
        os.path.join(out, "ldm", "scheduler"),
        ours.shape,
        lambda x, t, c: unet(x, t, encoder_hidden_states=hidden if c else torch.zeros_like(hidden)).sample,
        w,
        seed,
        steps,
    )
    assert torch.allclose(ours, theirs, atol=1e-5)
    # the chain reads text_embedding_token from the checkpoint's stage.json and samples the same
    images = chains.latent_diffusion(ldm_net, text, steps, w, torch.Generator().manual_seed(seed))
    assert torch.allclose(images, chains.latent_pictures(ldm_net, ours), atol=1e-5)
    # the whole chain as the exported pipeline, from the prompts through its own text encoder,
    # draws what `unclip sample` draws (Trained.generate, one batch: its noise from `seed`)
    pipe = DiffusionPipeline.from_pretrained(os.path.join(out, "ldm"), trust_remote_code=True)
    assert type(pipe).__name__ == "UnclipLdmPipeline"
    drawn = pipe(
        prompts,
        num_inference_steps=steps,
        guidance_scale=w,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    ).images
    sampled = trained.generate("ldm", text, steps, (w, 1.0), seed, batch_size=len(prompts))
    assert torch.allclose(drawn, (sampled + 1) / 2, atol=1e-4), (drawn - (sampled + 1) / 2).abs().max()

    # prior
    pri = PriorTransformer.from_pretrained(os.path.join(out, "unclip", "prior"))
    ours = trained.image_embeddings(text, steps, w, seed, batch_size=2)  # one batch: its noise from `seed`
    # batch i draws from seed + i: the second prompt alone at seed + 1 gets the same embedding
    second = trained.image_embeddings({k: v[1:] for k, v in text.items()}, steps, w, seed + 1, batch_size=1)
    assert torch.allclose(trained.image_embeddings(text, steps, w, seed, batch_size=1)[1:], second)
    null = prior.drop_text(text, torch.ones(2, dtype=torch.bool))
    theirs = plain_loop(
        os.path.join(out, "unclip", "prior_scheduler"),
        (2, pri.config.embedding_dim),
        lambda x, t, c: (
            pri(
                x,
                t,
                proj_embedding=(text if c else null)["emb"],
                encoder_hidden_states=(text if c else null)["tokens"],
                attention_mask=(text if c else null)["mask"],
            ).predicted_image_embedding
        ),
        w,
        seed,
        steps,
    )
    assert torch.allclose(ours, pri.post_process_latents(theirs), atol=1e-5)

    # decoder (the embedded default's draws VAE latents: pictures come from the exported VAE)
    unet = UNet2DConditionModel.from_pretrained(os.path.join(out, "unclip", "decoder"))
    proj = text_proj_class().from_pretrained(os.path.join(out, "unclip", "text_proj"))
    extras = exported["decoder"]["extras"]
    assert extras["latent_channels"] == unet.config.in_channels  # the embedded default's decoder space
    image_emb = ours.detach()
    cond = decoder.conditioning(image_emb, text["emb"], text["tokens"])
    dec = trained.nets["decoder"]
    mine_latents = decoder.sample(dec.model, dec.diffusion, cond, steps, w, torch.Generator().manual_seed(seed))

    decoder_fn = plain_decoder(unet, proj, image_emb, text["emb"], text["tokens"], patch=1)
    theirs_latents = plain_loop(
        os.path.join(out, "unclip", "decoder_scheduler"), mine_latents.shape, decoder_fn, w, seed, steps
    )
    assert torch.allclose(mine_latents, theirs_latents, atol=1e-5)
    mine = chains.decoder_images(dec, cond, steps, w, torch.Generator().manual_seed(seed))
    vae = AutoencoderKL.from_pretrained(os.path.join(out, "vae"))
    theirs = vae.decode(theirs_latents / extras["latent_scale"]).sample.clamp(-1, 1)
    assert mine.shape == (2, 3, 64, 64) and torch.allclose(mine, theirs, atol=1e-5)

    # upsampler
    # channels-last, as load_trained samples it: one forward in the other memory format already
    # differs by about 1.3e-5 (the convolutions sum in another order), which is not the export's doing
    sr = UNet2DModel.from_pretrained(os.path.join(out, "unclip", "super_res_0")).to(memory_format=torch.channels_last)
    factor = exported["upsampler-main"]["extras"]["high"] // exported["upsampler-main"]["extras"]["low"]
    net = trained.upsamplers[0]
    mine_sr = upsampler.sample(net.model, net.diffusion, mine, factor, steps, torch.Generator().manual_seed(seed))
    low_up = torch.nn.functional.interpolate(mine, scale_factor=factor, mode="bicubic", align_corners=False).clamp(
        -1, 1
    )
    theirs_sr = plain_loop(
        os.path.join(out, "unclip", "super_res_0_scheduler"),
        mine_sr.shape,
        lambda x, t, c: sr(torch.cat([x, low_up], 1), t).sample,
        1.0,
        seed,
        steps,
    ).clamp(-1, 1)
    assert torch.allclose(mine_sr, theirs_sr, atol=1e-5)

    # the whole unCLIP chain as the exported pipeline, from the prompts: what `unclip sample` draws
    # (Trained.generate, one batch); the upsampler in its default memory format, hence 1e-4
    pipe = DiffusionPipeline.from_pretrained(os.path.join(out, "unclip"), trust_remote_code=True)
    assert (
        type(pipe).__name__ == "UnclipChainPipeline"
        and exported["prior"]["folder"] == exported["upsampler-main"]["folder"] == "unclip"
    )
    misfits = json.load(open(os.path.join(out, "unclip", "unclip_stages.json")))["not_an_UnCLIPPipeline_because"]
    assert (
        "sample.sampler is 'ddim', not 'unclip' (UnCLIPScheduler)" in misfits
        and "the decoder draws VAE latents" in misfits
    )
    drawn = pipe(
        prompts,
        num_inference_steps=steps,
        guidance_scale=w,
        prior_guidance_scale=w,
        upsampler_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    ).images
    sampled = trained.generate("unclip", text, steps, (w, w), seed, batch_size=len(prompts), upsampler_steps=steps)
    assert drawn.shape == (2, 3, 256, 256) and torch.allclose(drawn, (sampled + 1) / 2, atol=1e-4), (
        (drawn - (sampled + 1) / 2).abs().max()
    )
    card = open(os.path.join(out, "README.md")).read()
    assert "trust_remote_code=True" in card and "StableDiffusionPipeline" in card


def test_checkpoints_outlive_the_config_schema(pipeline, tmp_path):
    """Sample and export read what they need from the checkpoint's stage.json, never by re-validating
    the old run's whole config.yaml: checkpoints whose config holds a key that no longer exists and
    lacks one added since (and an ldm whose stage.json predates the diffusion record, read from that
    config.yaml as plain YAML) sample the same pictures and export the same diffusion settings."""
    import yaml

    from training.checkpoint import read_latest

    cfg, _, _ = pipeline
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(cfg.store_url, root / "store")
    shutil.copytree(storage.join(cfg.root, "runs"), root / "runs", ignore=shutil.ignore_patterns("resumed"))
    old = replace(cfg, root=str(root), **{"sample.out": str(tmp_path / "samples")})
    for stage in ("prior", "decoder", "upsampler", "ldm"):
        folder = read_latest(old.run_url(stage))
        recorded = yaml.safe_load(open(os.path.join(folder, "config.yaml")))
        recorded[stage]["retired_setting"] = 1  # a key this version no longer has
        recorded["train"]["old_knob"] = True
        recorded[stage]["diffusion"]["retired_too"] = "x"
        del recorded[stage]["diffusion"]["snr_shift"]  # a key added since
        with open(os.path.join(folder, "config.yaml"), "w") as f:
            yaml.safe_dump(recorded, f)
        with pytest.raises(ConfigError, match="unknown key"):
            config.from_dict(recorded)  # today's schema refuses it: what the loaders must not depend on
    ldm_folder = read_latest(old.run_url("ldm"))
    info = json.load(open(os.path.join(ldm_folder, "stage.json")))
    assert info["diffusion"] == dataclasses.asdict(cfg.ldm.diffusion) and info["columns"][0] == "vae_latent"
    del info["diffusion"]  # as a checkpoint written before stage.json recorded it
    with open(os.path.join(ldm_folder, "stage.json"), "w") as f:
        json.dump(info, f)

    result = sample.run(replace(old, **{"sample.chains": ["ldm", "unclip"]}), log=print)
    for chain in ("ldm", "unclip"):
        for path in result[chain]["images"]:
            with (
                Image.open(path) as ours,
                Image.open(os.path.join(cfg.sample.out, chain, os.path.basename(path))) as before,
            ):
                assert np.array_equal(np.asarray(ours), np.asarray(before)), path
    exported = export.run(old, str(tmp_path / "export"), log=print)
    for name, stage in (("ldm", "ldm"), ("prior", "prior"), ("decoder", "decoder"), ("upsampler-main", "upsampler")):
        assert exported[name]["diffusion"] == dataclasses.asdict(getattr(cfg, stage).diffusion), name
    assert "retired_setting" in open(tmp_path / "export" / "README.md").read()  # the card shows what the run recorded


def test_eval_refuses_a_store_with_too_few_held_out_rows(pipeline, tmp_path):
    from launch import evaluate
    from tests.support.storefactory import make_store

    cfg, _, _ = pipeline
    make_store(str(tmp_path / "store"), rows_per_part=(6,), holdout=0.01)  # a fraction, but no row falls in it
    os.symlink(storage.join(cfg.root, "runs"), tmp_path / "runs")  # the trained stages are there
    with pytest.raises(StoreError, match=r"store '.*store': 0 held-out rows; eval needs at least 2"):
        evaluate.run(replace(cfg, root=str(tmp_path)), log=print)


def test_sample_sampler_reaches_every_stage_and_the_export(pipeline, tmp_path):
    from launch.trained import load_trained

    cfg, _, _ = pipeline
    ddpm = replace(cfg, **{"sample.sampler": "ddpm"})
    trained = load_trained(ddpm, open_store(cfg.store_url), ["prior", "decoder", "upsampler", "ldm"])
    assert {net.diffusion.sampler for net in [*trained.nets.values(), *trained.upsamplers]} == {"ddpm"}
    out = tmp_path / "export"
    export.run(ddpm, str(out), log=print)
    for folder in (
        "unclip/prior_scheduler",
        "unclip/decoder_scheduler",
        "ldm/scheduler",
        "unclip/super_res_0_scheduler",
    ):
        assert json.loads((out / folder / "scheduler_config.json").read_text())["_class_name"] == "DDPMScheduler"


def test_in_batches_draws_batch_i_from_seed_plus_i_and_joins_nested_outputs():
    from launch.trained import in_batches

    rows = {"x": torch.arange(5.0)[:, None]}

    def draw(part, generator):  # shaped like chains.unclip's (embeddings, [pictures per resolution])
        return part["x"] + torch.randn(len(part["x"]), 1, generator=generator), [part["x"] * 2, part["x"] * 4]

    noisy, (double, quadruple) = in_batches(rows, 7, 2, draw)
    assert noisy.shape == (5, 1) and torch.equal(double, rows["x"] * 2) and torch.equal(quadruple, rows["x"] * 4)
    assert torch.equal(noisy[4:], 4 + torch.randn(1, 1, generator=torch.Generator().manual_seed(9)))  # row 4: batch 2
    # a row's draw does not depend on what else was asked for
    assert torch.equal(in_batches({"x": rows["x"][:2]}, 7, 2, draw)[0], noisy[:2])
    assert not torch.equal(in_batches(rows, 7, 5, draw)[0][2:4], noisy[2:4])  # but on the batch size


def test_sample_device_auto_takes_the_gpu_only_when_there_is_one():
    from launch.trained import sampling_device

    gpu = torch.cuda.is_available()
    assert sampling_device("auto").type == ("cuda" if gpu else "cpu") and sampling_device("cpu").type == "cpu"
    if not gpu:
        with pytest.raises(RuntimeError, match="'sample.device' is 'cuda', but torch sees no GPU"):
            sampling_device("cuda")
