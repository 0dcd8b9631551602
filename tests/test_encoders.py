"""The frozen encoders load like public weights do, and their identities are what the store records."""

from __future__ import annotations

import json

import pytest
import torch

from models import encoders
from models.config import ClipConfig, EncodersConfig, VaeConfig


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("encoders")
    cfg = EncodersConfig(clip=ClipConfig(model=f"local-dir:{folder}/clip"), vae=VaeConfig(path=str(folder / "vae")))
    encoders.write_tiny_encoders(cfg)
    return folder, cfg


def test_local_dir_and_name_plus_weights_file_load_the_same_model(tiny, tmp_path):
    import open_clip

    folder, cfg = tiny
    saved = json.loads((folder / "clip" / "open_clip_config.json").read_text())
    (tmp_path / "unclip-test-tiny.json").write_text(json.dumps(saved["model_cfg"]))
    open_clip.add_model_config(str(tmp_path / "unclip-test-tiny.json"))  # a named config, as ViT-L-14 is
    by_dir = encoders.FrozenClip(cfg.clip)
    by_name = encoders.FrozenClip(
        ClipConfig(model="unclip-test-tiny", pretrained=str(folder / "clip" / "open_clip_model.safetensors"))
    )
    images = torch.rand(3, 3, 64, 64)
    assert torch.equal(by_dir.encode_images(images), by_name.encode_images(images))
    a, b = by_dir.encode_text(["a red circle", "x"]), by_name.encode_text(["a red circle", "x"])
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert encoders.identity_mismatch(by_dir.identity(), by_name.identity()) is None  # same weights: same encoder
    assert encoders.clip_identity(by_name.cfg) == by_name.identity()


def test_text_outputs(tiny):
    _, cfg = tiny
    clip = encoders.FrozenClip(cfg.clip)
    out = clip.encode_text(["a red circle on a blue background", "hi"])
    assert out["tokens"].shape == (2, 32, 64) and out["emb"].shape == (2, 64)
    # start token + words + end token; the rest is padding and masked out
    assert out["mask"].sum(1).tolist() == [9, 3]
    assert torch.equal(out["emb"], clip.model.encode_text(clip.tokenizer(["a red circle on a blue background", "hi"])))


def test_text_conditioning_reads_stored_text_back_as_encode_text_gave_it(tiny):
    _, cfg = tiny
    out = encoders.FrozenClip(cfg.clip).encode_text(["a red circle on a blue background", "hi"])
    stored = {
        column: out[name].numpy().astype(bool if name == "mask" else "float16")
        for column, name in encoders.TEXT_COLUMNS.items()
    }
    text = encoders.text_conditioning(stored)
    assert (
        set(text) == {"emb", "tokens", "mask"}
        and text["mask"].dtype == torch.bool
        and torch.equal(text["mask"], out["mask"])
    )
    for name in ("emb", "tokens"):
        assert text[name].dtype == torch.float32 and torch.allclose(text[name], out[name], atol=1e-2, rtol=1e-3)
    assert set(encoders.text_conditioning(stored, ["clip_text_tokens"])) == {"tokens"}  # only the columns asked for


def test_identities_without_loading_match_the_loaded_models(tiny):
    _, cfg = tiny
    assert encoders.clip_identity(cfg.clip) == encoders.FrozenClip(cfg.clip).identity()
    vae = encoders.FrozenVae(cfg.vae)
    identity = encoders.vae_identity(cfg.vae)
    assert identity == vae.identity()
    assert (identity["latent_channels"], identity["downsample"], identity["scaling_factor"]) == (
        vae.latent_channels,
        vae.downsample,
        vae.scaling_factor,
    )
    latents = vae.encode(torch.rand(2, 3, 64, 64) * 2 - 1)
    assert latents.shape == (2, 4, 16, 16) and vae.decode(latents).shape == (2, 3, 64, 64)


def test_identity_mismatch_names_the_field():
    a = {"model": "local-dir:/x", "weights_sha256": "aa", "embed_dim": 64}
    assert encoders.identity_mismatch(a, {**a, "model": "local-dir:/moved"}) is None
    assert encoders.identity_mismatch(a, {**a, "weights_sha256": "bb"}) == ("weights_sha256", "aa", "bb")
    assert encoders.identity_mismatch(a, {**a, "embed_dim": 768}) == ("embed_dim", 64, 768)
    unhashed = {"model": "ViT-L-14", "pretrained": "openai", "weights_sha256": None}
    assert encoders.identity_mismatch(unhashed, {**unhashed, "pretrained": "laion2b"}) == (
        "pretrained",
        "openai",
        "laion2b",
    )


def test_write_tiny_encoders_needs_a_local_dir():
    with pytest.raises(ValueError, match="expected 'local-dir:PATH'"):
        encoders.write_tiny_encoders(EncodersConfig(clip=ClipConfig(model="ViT-B-32")))


def test_text_layer_and_padding_follow_the_public_conventions(tiny):
    """penultimate: the second-to-last block's output through the final layer norm (SD 2.x's
    conditioning), here computed by hand from open_clip's own modules; eos padding (OpenAI's
    tokenizer): the same pooled embedding and the same states up to the end-of-text token, and
    the end-of-text id after it. Both are part of the encoder's identity."""
    import dataclasses

    _, cfg = tiny
    captions = ["a red circle on a blue background", "x"]
    last = encoders.FrozenClip(cfg.clip)
    penultimate = encoders.FrozenClip(dataclasses.replace(cfg.clip, text_layer="penultimate"))
    eos = encoders.FrozenClip(dataclasses.replace(cfg.clip, text_padding="eos"))
    a, p, e = (m.encode_text(captions) for m in (last, penultimate, eos))

    model = last.model
    tokens, mask = last.tokenize(captions)
    with torch.no_grad():
        x = model.token_embedding(tokens) + model.positional_embedding
        for block in model.transformer.resblocks[:-1]:
            x = block(x, attn_mask=model.attn_mask)
        assert torch.allclose(p["tokens"], model.ln_final(x), atol=1e-6)
        x = model.transformer.resblocks[-1](x, attn_mask=model.attn_mask)
        assert torch.allclose(a["tokens"], model.ln_final(x), atol=1e-6)
    assert not torch.allclose(p["tokens"], a["tokens"])
    assert torch.equal(p["emb"], a["emb"]) and torch.equal(
        p["mask"], a["mask"]
    )  # pooled from the last layer either way

    ids, _ = eos.tokenize(captions)
    end = mask.sum(1) - 1
    assert all(bool((ids[i, end[i] :] == ids.max()).all()) for i in range(len(captions)))
    assert torch.equal(tokens[mask], ids[mask]) and int(tokens[~mask].max()) == 0  # open_clip pads with zeros
    assert torch.allclose(e["emb"], a["emb"], atol=1e-6) and torch.equal(e["mask"], a["mask"])
    assert torch.allclose(
        e["tokens"][mask], a["tokens"][mask], atol=1e-6
    )  # causal: padding never reaches earlier states
    assert not torch.allclose(e["tokens"][~mask], a["tokens"][~mask])

    assert (
        penultimate.identity()["text_layer"] == encoders.clip_identity(penultimate.cfg)["text_layer"] == "penultimate"
    )
    before = {
        k: v for k, v in last.identity().items() if k not in encoders.RECORDED_BEFORE
    }  # a store from before the options
    assert encoders.identity_mismatch(before, last.identity()) is None
    assert encoders.identity_mismatch(before, penultimate.identity()) == ("text_layer", "last", "penultimate")
    assert encoders.identity_mismatch(before, eos.identity()) == ("text_padding", "zeros", "eos")


def test_training_refuses_a_store_embedded_with_other_text_conditioning(tmp_path):
    from data_pipeline.store import StoreError
    from launch import config
    from launch.train import check_before_launch
    from tests.support.storefactory import make_store

    make_store(str(tmp_path / "store"))  # recorded before the options: the last layer, zero padding
    check_before_launch(config.load(None, [f"root={tmp_path}"]), "prior")
    with pytest.raises(
        StoreError,
        match=r"manifest field 'encoders.clip.text_layer' is 'last', but encoders.clip.text_layer is 'penultimate'",
    ):
        check_before_launch(config.load(None, [f"root={tmp_path}", "encoders.clip.text_layer=penultimate"]), "prior")


@pytest.mark.parametrize("text_layer, text_padding", [("last", "eos"), ("penultimate", "zeros")])
def test_tokens_equal_a_transformers_text_encoder_converted_from_the_same_weights(tiny, text_layer, text_padding):
    """What an exported pipeline encodes prompts with: open_clip's weights converted by diffusers'
    SD 2.x conversion into a transformers CLIPTextModelWithProjection, and open_clip's vocabulary
    as a CLIPTokenizer (models/hf_text.py). The tokenizer gives our ids, padding included; the last
    hidden state (last) or the final layer norm over the penultimate one (penultimate, as SD 2.x's
    text encoder of one layer fewer gives it) equals our clip_text_tokens, and text_embeds our
    pooled embedding. SD 2.x's own CLIPTextModel, one layer fewer, gives the same tokens."""
    import dataclasses

    from models import hf_text

    _, cfg = tiny
    ours = encoders.FrozenClip(dataclasses.replace(cfg.clip, text_layer=text_layer, text_padding=text_padding))
    converted = hf_text.text_encoder(ours)
    tokenizer = hf_text.tokenizer(ours)

    # no "!": with zero padding the tokenizer's pad token is "!" (id 0), which transformers splits
    # out of a prompt as SD 2.x's own tokenizer does, where open_clip reads "!</w>" (models/hf_text.py)
    captions = ["a red circle on a blue background", "A Green  triangle, Tiny.", "x", ""]
    tokens, _ = ours.tokenize(captions)
    ids = tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    assert torch.equal(ids, tokens)
    text = ours.encode_text(captions)
    with torch.no_grad():
        out = converted(input_ids=ids, output_hidden_states=True)
        states = (
            out.last_hidden_state
            if text_layer == "last"
            else converted.text_model.final_layer_norm(out.hidden_states[-2])
        )
    assert torch.allclose(text["tokens"], states, atol=1e-5), (text["tokens"] - states).abs().max()
    assert torch.allclose(text["emb"], out.text_embeds, atol=1e-5), (text["emb"] - out.text_embeds).abs().max()

    sd = hf_text.stable_diffusion_text_encoder(ours)  # SD 2.x's layout for penultimate: one layer fewer
    assert sd.config.num_hidden_layers == converted.config.num_hidden_layers - (text_layer == "penultimate")
    with torch.no_grad():
        assert torch.allclose(sd(input_ids=ids).last_hidden_state, text["tokens"], atol=1e-5)
