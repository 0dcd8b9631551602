"""The store's open_clip text encoder and tokenizer in transformers' classes, for exported pipelines.

diffusers pipelines encode prompts with a transformers `CLIPTextModel(WithProjection)` and a
`CLIPTokenizer`. The weights are converted by diffusers' own open_clip conversion (the one that
made Stable Diffusion 2.x's text encoder). The tokenizer files are open_clip's byte-pair
vocabulary under the names transformers gives the special tokens. Both give what `FrozenClip`
gives: tests/test_encoders.py checks the ids and the states.
"""

from __future__ import annotations

import os
import tempfile
from typing import TYPE_CHECKING

import torch

from models.base import storage

if TYPE_CHECKING:
    from transformers import CLIPTextModelWithProjection

OPEN_CLIP_SPECIAL = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
# what fills a caption's tokens after its end-of-text token (encoders.clip.text_padding): token 0
# is "!", as Stable Diffusion 2.x's tokenizer pads. As there, a "!" in a prompt then reads as that
# pad token (transformers splits special tokens out first), where open_clip reads "!</w>".
PAD_TOKEN = {"zeros": "!", "eos": "<|endoftext|>"}


def text_encoder(clip) -> CLIPTextModelWithProjection:
    """`clip` (a FrozenClip) as a transformers CLIPTextModelWithProjection with every layer: its
    `text_embeds` are our pooled embedding, its last hidden state our `last` tokens, and its final
    layer norm over `hidden_states[-2]` our `penultimate` tokens."""
    from diffusers.loaders.single_file_utils import (
        convert_open_clip_checkpoint,
    )  # lazy: diffusers' loaders load transformers; only export needs them
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    model = clip.model
    blocks = model.transformer.resblocks
    config = CLIPTextConfig(
        vocab_size=model.vocab_size,
        hidden_size=clip.text_width,
        intermediate_size=blocks[0].mlp.c_fc.out_features,
        num_attention_heads=blocks[0].attn.num_heads,
        num_hidden_layers=len(blocks),
        max_position_embeddings=clip.context_length,
        hidden_act="gelu",
        projection_dim=clip.embed_dim,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=0,
    )
    converted = CLIPTextModelWithProjection(config).eval()
    checkpoint = {f"cond_stage_model.model.{k}": v.float() for k, v in model.state_dict().items()}
    weights = convert_open_clip_checkpoint(converted, checkpoint)
    # SD 2.x never uses the projection, so the conversion leaves it out; open_clip applies it as x @ P
    weights["text_projection.weight"] = model.text_projection.detach().float().T.contiguous()
    missing, unexpected = converted.load_state_dict(weights, strict=False)
    if [k for k in missing if "position_ids" not in k] or unexpected:
        raise ValueError(f"open_clip -> transformers text encoder: missing {missing}, unexpected {unexpected}")
    return converted.requires_grad_(False)


def stable_diffusion_text_encoder(clip) -> torch.nn.Module:
    """`clip` as Stable Diffusion's CLIPTextModel, whose last hidden state is what its UNet attends
    to: for the penultimate layer, the model has one layer fewer (as SD 2.x's has)."""
    from transformers import CLIPTextModel  # lazy: transformers (a second) only where a pipeline is exported

    full = text_encoder(clip)
    layers = full.config.num_hidden_layers - (clip.cfg.text_layer == "penultimate")
    config = full.config.to_dict()
    config.update(num_hidden_layers=layers, architectures=["CLIPTextModel"])
    model = CLIPTextModel(type(full.config)(**config)).eval()
    names = set(model.state_dict())  # transformers 5 names CLIPTextModel's weights without `text_model.`
    weights = {
        k.removeprefix("text_model."): v
        for k, v in full.state_dict().items()
        if not k.startswith(f"text_model.encoder.layers.{layers}.") and k.removeprefix("text_model.") in names
    }
    model.load_state_dict(weights)
    return model.requires_grad_(False)


def tokenizer(clip):
    """open_clip's tokenizer for `clip` as a transformers CLIPTokenizer (its padding as the
    store's `encoders.clip.text_padding`), to be saved with the pipeline."""
    from open_clip.tokenizer import SimpleTokenizer  # lazy: open_clip (a second) only where a tokenizer is made
    from transformers import CLIPTokenizer

    bpe = SimpleTokenizer()
    vocab = {OPEN_CLIP_SPECIAL.get(token, token): index for token, index in bpe.encoder.items()}
    merges = [" ".join(pair) for pair, _ in sorted(bpe.bpe_ranks.items(), key=lambda item: item[1])]
    with tempfile.TemporaryDirectory(prefix="unclip-tokenizer-") as folder:
        with open(os.path.join(folder, "vocab.json"), "w") as f:
            f.write(storage.strict_json(vocab))
        with open(os.path.join(folder, "merges.txt"), "w") as f:
            f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
        return CLIPTokenizer(
            os.path.join(folder, "vocab.json"),
            os.path.join(folder, "merges.txt"),
            pad_token=PAD_TOKEN[clip.cfg.text_padding],
            model_max_length=clip.context_length,
        )
