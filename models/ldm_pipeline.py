"""The ldm chain as a diffusers pipeline: shipped inside `unclip export` (ldm/ldm_pipeline.py) and
loaded with `DiffusionPipeline.from_pretrained(EXPORT/ldm, trust_remote_code=True)`.

It is a custom pipeline because the ldm's conditioning is ours, not Stable Diffusion's: the UNet
attends to the text tokens followed by CLIP's pooled text embedding as one more token
(`text_embedding_token`), and the unconditional input may be all zeros (`null_text`). An ldm
conditioned as Stable Diffusion is (neither) is exported as a `StableDiffusionPipeline` instead.
Everything else is a standard text-to-image loop, and it draws what `unclip sample` draws at the
same seed, steps and guidance. This file imports nothing of unclip's: it runs where only
torch, diffusers and transformers are installed, so it repeats models/diffusion.py's sampling loop
and the pictures' conversion to PIL (tests/test_pipeline.py checks that it draws the same).
"""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput  # pyright: ignore[reportPrivateImportUsage]


class UnclipLdmPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "text_encoder->unet->vae"

    def __init__(
        self,
        unet,
        vae,
        text_encoder,
        tokenizer,
        scheduler,
        text_layer: str = "last",
        text_embedding_token: bool = True,
        null_text: str = "zeros",
        latent_scale: float = 0.18215,
    ):
        """`text_layer`: the text states the UNet was trained on (`last`, or `penultimate` through
        the final layer norm); `null_text`: its unconditional input (`zeros`, or `empty_caption`:
        the empty prompt's); `latent_scale`: what the UNet's latents are, times the VAE's."""
        super().__init__()
        self.register_modules(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)
        self.register_to_config(
            text_layer=text_layer,
            text_embedding_token=text_embedding_token,
            null_text=null_text,
            latent_scale=latent_scale,
        )

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        """The sequence the UNet attends to: [B, L (+ 1), W]."""
        ids = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.text_encoder.device)
        out = self.text_encoder(input_ids=ids, output_hidden_states=True)
        if self.config["text_layer"] == "last":
            states = out.last_hidden_state
        else:
            states = self.text_encoder.text_model.final_layer_norm(out.hidden_states[-2])
        if self.config["text_embedding_token"]:
            states = torch.cat([states, out.text_embeds[:, None]], 1)
        return states.float()

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        num_inference_steps: int = 25,
        guidance_scale: float = 3.0,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        """Pictures for `prompt`. guidance w: uncond + w (cond - uncond); 1 is the conditional
        model alone. output_type: "pil", "np" or "pt" ([B, 3, H, W] in [0, 1])."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        device, dtype = self.unet.device, self.unet.dtype
        context = self.encode_prompt(prompts).to(device)
        null = (
            torch.zeros_like(context)
            if self.config["null_text"] == "zeros"
            else self.encode_prompt([""]).to(device).expand_as(context)
        )
        self.scheduler.set_timesteps(num_inference_steps)
        c, size = self.unet.config.in_channels, self.unet.config.sample_size
        x = torch.randn((len(prompts), c, size, size), generator=generator).to(device) * self.scheduler.init_noise_sigma

        def predict(x_t: torch.Tensor, t: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
            return self.unet(x_t.to(dtype), t, encoder_hidden_states=hidden.to(dtype)).sample.float()

        # diffusers decorates progress_bar with torch.compiler.disable, unannotated: pyright loses its signature
        for t in self.progress_bar(self.scheduler.timesteps):  # pyright: ignore[reportCallIssue, reportGeneralTypeIssues]
            tt = torch.full((len(prompts),), int(t), dtype=torch.long, device=device)
            pred = predict(x, tt, context)
            if guidance_scale != 1.0:
                uncond = predict(x, tt, null)
                pred = uncond + guidance_scale * (pred - uncond)
            x = self.scheduler.step(pred, t, x, generator=generator).prev_sample
        vae = self.vae
        images = vae.decode((x / self.config["latent_scale"]).to(device, vae.dtype)).sample.float().clamp(-1, 1)
        images = (images + 1) / 2
        if output_type == "pt":
            result = images.cpu()
        else:
            result = images.permute(0, 2, 3, 1).cpu().numpy()
            if output_type == "pil":
                result = self.numpy_to_pil(result)
        return ImagePipelineOutput(images=result) if return_dict else (result,)
