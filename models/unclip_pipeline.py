"""The unCLIP chain as a diffusers pipeline: shipped inside `unclip export` (unclip/unclip_pipeline.py)
and loaded with `DiffusionPipeline.from_pretrained(EXPORT/unclip, trust_remote_code=True)`.

prompt -> CLIP text encoder -> prior -> CLIP image embedding -> decoder (+ text_proj) -> pictures
-> each super-resolution UNet in turn. `unclip export` writes diffusers' own UnCLIPPipeline where a
chain is conditioned and sampled as Karlo is; this pipeline draws every other: dropped text may be
all zeros (with a full attention mask for the prior), the decoder may fold p x p pixels into
channels, draw VAE latents or attend to padding, there may be no upsampler or two, each sees its
own enlargement of the picture below, and each network samples with its own scheduler. It draws what `unclip sample`
draws at the same seed, steps and guidance. This file imports nothing of unclip's: it runs where
only torch, diffusers and transformers are installed, so it repeats models/diffusion.py's sampling loop
and the pictures' conversion to PIL (tests/test_pipeline.py checks that it draws the same).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline, ImagePipelineOutput  # pyright: ignore[reportPrivateImportUsage]

# diffusers no longer exports it at its top level: model_index.json names it by this module, which
# diffusers finds imported (here) when it loads the components
from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel


def _denoise(
    scheduler, predict, shape: tuple[int, ...], steps: int, guidance: float, generator, device
) -> torch.Tensor:
    """The reverse process with classifier-free guidance: uncond + w (cond - uncond). An
    UnCLIPScheduler is told the next timestep, and with a learned variance `predict` returns it
    after the prediction (the conditional model's is kept)."""
    unclip = type(scheduler).__name__ == "UnCLIPScheduler"
    learned = unclip and scheduler.config.variance_type == "learned_range"
    scheduler.set_timesteps(steps)
    timesteps, channels = scheduler.timesteps, shape[1]
    x = torch.randn(shape, generator=generator).to(device) * scheduler.init_noise_sigma
    for i, t in enumerate(timesteps):
        tt = torch.full((shape[0],), int(t), dtype=torch.long, device=device)
        pred = predict(x, tt, True)
        pred, variance = (pred[:, :channels], pred[:, channels:]) if learned else (pred[:, :channels], None)
        if guidance != 1.0:
            uncond = predict(x, tt, False)[:, :channels]
            pred = uncond + guidance * (pred - uncond)
        step = {}
        if unclip:
            step["prev_timestep"] = timesteps[i + 1] if i + 1 < len(timesteps) else None
            if variance is not None:
                pred = torch.cat([pred, variance], 1)
        x = scheduler.step(pred, t, x, generator=generator, **step).prev_sample
    return x


def _resize(low: torch.Tensor, size: int, resize: str) -> torch.Tensor:
    """upsampler.resize: bicubic clipped to [-1, 1], or antialiased bicubic unclipped."""
    if resize == "bicubic_antialias":
        return F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    return F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False).clamp(-1, 1)


class UnclipChainPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "text_encoder->prior->text_proj->decoder->vae->super_res_0->super_res_1"
    _optional_components = ["vae", "super_res_0", "super_res_0_scheduler", "super_res_1", "super_res_1_scheduler"]

    def __init__(
        self,
        text_encoder,
        tokenizer,
        prior,
        prior_scheduler,
        decoder,
        text_proj: UnCLIPTextProjModel,
        decoder_scheduler,
        vae=None,
        super_res_0=None,
        super_res_0_scheduler=None,
        super_res_1=None,
        super_res_1_scheduler=None,
        text_layer: str = "last",
        decoder_latent_scale: float | None = None,
        prior_null_text: str = "zeros",
        decoder_null_text: str = "zeros",
        decoder_text_mask: bool = False,
        super_res_resize: list[str] | None = None,
    ):
        """`vae` and `decoder_latent_scale`: a decoder that draws VAE latents, and what they are
        times the VAE's. Each super-resolution UNet enlarges to its sample_size, in turn, from the
        picture below resized as `super_res_resize` says. `*_null_text`: what each network's
        unconditional text is (zeros, or the empty caption's encoding)."""
        super().__init__()
        self.register_modules(
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            prior=prior,
            prior_scheduler=prior_scheduler,
            decoder=decoder,
            text_proj=text_proj,
            decoder_scheduler=decoder_scheduler,
            vae=vae,
            super_res_0=super_res_0,
            super_res_0_scheduler=super_res_0_scheduler,
            super_res_1=super_res_1,
            super_res_1_scheduler=super_res_1_scheduler,
        )
        self.register_to_config(
            text_layer=text_layer,
            decoder_latent_scale=decoder_latent_scale,
            prior_null_text=prior_null_text,
            decoder_null_text=decoder_null_text,
            decoder_text_mask=decoder_text_mask,
            super_res_resize=super_res_resize or ["bicubic_clamped"] * 2,
        )

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """emb [B, D] (pooled, projected), tokens [B, L, W] and mask [B, L] (the caption's tokens up
        to and including its end-of-text token)."""
        ids = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.text_encoder.device)
        out = self.text_encoder(input_ids=ids, output_hidden_states=True)
        if self.config["text_layer"] == "last":
            tokens = out.last_hidden_state
        else:
            tokens = self.text_encoder.text_model.final_layer_norm(out.hidden_states[-2])
        end = (ids == self.tokenizer.eos_token_id).int().argmax(-1, keepdim=True)
        mask = torch.arange(ids.shape[1], device=ids.device)[None] <= end
        return {"emb": out.text_embeds.float(), "tokens": tokens.float(), "mask": mask}

    def _null_text(self, text, kind: str):
        """The unconditional text: zeros attending everywhere, or the empty caption's encoding."""
        n = len(text["emb"])
        if kind == "empty_caption":
            empty = {k: v.to(text[k].device) for k, v in self.encode_prompt([""]).items()}
            return {k: v.expand(n, *v.shape[1:]) for k, v in empty.items()}
        return {"emb": text["emb"] * 0, "tokens": text["tokens"] * 0, "mask": torch.ones_like(text["mask"])}

    def _image_embeddings(self, text, steps, guidance, generator, device):
        prior = self.prior
        n = len(text["emb"])
        null = self._null_text(text, self.config["prior_null_text"])

        def predict(x, t, conditional):
            c = text if conditional else null
            return prior(
                hidden_states=x.to(prior.dtype),
                timestep=t,
                proj_embedding=c["emb"].to(prior.dtype),
                encoder_hidden_states=c["tokens"].to(prior.dtype),
                attention_mask=c["mask"],
            ).predicted_image_embedding.float()

        x0 = _denoise(self.prior_scheduler, predict, (n, prior.clip_mean.shape[-1]), steps, guidance, generator, device)
        return prior.post_process_latents(x0)

    def _decode(self, image_emb, text, steps, guidance, generator, device):
        unet, proj = self.decoder, self.text_proj
        latent = self.vae is not None
        channels = self.vae.config.latent_channels if latent else 3
        patch = math.isqrt(unet.config.in_channels // channels)
        dtype = unet.dtype
        null = self._null_text(text, self.config["decoder_null_text"])

        def predict(x, t, conditional):
            n = len(x)
            emb = image_emb if conditional else proj.learned_classifier_free_guidance_embeddings.float().expand(n, -1)
            c = text if conditional else null
            context, extra = proj(
                image_embeddings=emb.to(dtype),
                prompt_embeds=c["emb"].to(dtype),
                text_encoder_hidden_states=c["tokens"].to(dtype),
                do_classifier_free_guidance=False,
            )
            mask = (
                F.pad(c["mask"], (proj.clip_extra_context_tokens, 0), value=True)
                if self.config["decoder_text_mask"]
                else None
            )
            folded = F.pixel_unshuffle(x.to(dtype), patch)
            out = unet(folded, t, encoder_hidden_states=context, class_labels=extra, encoder_attention_mask=mask).sample
            k = folded.shape[1]  # a learned variance follows the prediction
            return torch.cat([F.pixel_shuffle(out[:, :k], patch), F.pixel_shuffle(out[:, k:], patch)], 1).float()

        size = unet.config.sample_size * patch
        out = _denoise(
            self.decoder_scheduler, predict, (len(image_emb), channels, size, size), steps, guidance, generator, device
        )
        if not latent:
            return out.clamp(-1, 1)
        return (
            self.vae.decode((out / self.config["decoder_latent_scale"]).to(self.vae.dtype)).sample.float().clamp(-1, 1)
        )

    def _upsample(self, unet, scheduler, low, steps, generator, device, resize):
        size = unet.config.sample_size
        low_up = _resize(low, size, resize)

        def predict(x, t, conditional):
            return unet(torch.cat([x, low_up], 1).to(unet.dtype), t).sample[:, :3].float()

        return _denoise(scheduler, predict, (len(low), 3, size, size), steps, 1.0, generator, device).clamp(-1, 1)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        num_inference_steps: int = 25,
        guidance_scale: float = 1.5,
        prior_guidance_scale: float = 1.0,
        upsampler_inference_steps: int = 10,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        """Pictures for `prompt` at the last resolution. guidance_scale: the decoder's;
        prior_guidance_scale: the prior's. output_type: "pil", "np" or "pt" ([B, 3, H, W] in [0, 1])."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        device = self.decoder.device
        text = {k: v.to(device) for k, v in self.encode_prompt(prompts).items()}
        image_emb = self._image_embeddings(text, num_inference_steps, prior_guidance_scale, generator, device)
        images = self._decode(image_emb, text, num_inference_steps, guidance_scale, generator, device)
        for i in range(2):
            unet, scheduler = getattr(self, f"super_res_{i}", None), getattr(self, f"super_res_{i}_scheduler", None)
            if unet is not None:
                images = self._upsample(
                    unet,
                    scheduler,
                    images,
                    upsampler_inference_steps,
                    generator,
                    device,
                    self.config["super_res_resize"][i],
                )
        images = (images + 1) / 2
        if output_type == "pt":
            result = images.cpu()
        else:
            result = images.permute(0, 2, 3, 1).cpu().numpy()
            if output_type == "pil":
                result = self.numpy_to_pil(result)
        # diffusers annotates `images` as PIL or numpy, yet its own pipelines hand back tensors for "pt"
        return ImagePipelineOutput(images=result) if return_dict else (result,)  # pyright: ignore[reportArgumentType]
