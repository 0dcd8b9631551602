"""Our networks' sampling written against diffusers alone: what an exported stage must match."""

from __future__ import annotations

import torch


def plain_decoder(unet, proj, image_emb, text_emb, tokens, patch: int):
    """The unCLIP decoder as export's NULL_CONDITION describes it, from its diffusers modules alone."""

    def predict(x, t, conditional):
        emb = image_emb if conditional else proj.learned_classifier_free_guidance_embeddings.expand_as(image_emb)
        keep = 1.0 if conditional else 0.0
        context, extra = proj(
            image_embeddings=emb,
            prompt_embeds=text_emb * keep,
            text_encoder_hidden_states=tokens * keep,
            do_classifier_free_guidance=False,
        )
        out = unet(
            torch.nn.functional.pixel_unshuffle(x, patch), t, encoder_hidden_states=context, class_labels=extra
        ).sample
        return torch.nn.functional.pixel_shuffle(out, patch)

    return predict


def plain_loop(scheduler_dir, shape, predict, guidance, seed, steps):
    """A denoising loop written against diffusers alone: its scheduler and a model callable."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_pretrained(scheduler_dir)
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        tt = torch.full((shape[0],), int(t), dtype=torch.long)
        out = predict(x, tt, True)
        if guidance != 1.0:
            uncond = predict(x, tt, False)
            out = uncond + guidance * (out - uncond)
        x = scheduler.step(out, t, x, generator=generator).prev_sample
    return x
