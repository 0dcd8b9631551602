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
    by_name = encoders.FrozenClip(ClipConfig(model="unclip-test-tiny", pretrained=str(folder / "clip" / "open_clip_model.safetensors")))
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
    stored = {column: out[name].numpy().astype(bool if name == "mask" else "float16") for column, name in encoders.TEXT_COLUMNS.items()}
    text = encoders.text_conditioning(stored)
    assert set(text) == {"emb", "tokens", "mask"} and text["mask"].dtype == torch.bool and torch.equal(text["mask"], out["mask"])
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
        vae.latent_channels, vae.downsample, vae.scaling_factor,
    )  # fmt: skip
    latents = vae.encode(torch.rand(2, 3, 64, 64) * 2 - 1)
    assert latents.shape == (2, 4, 16, 16) and vae.decode(latents).shape == (2, 3, 64, 64)


def test_identity_mismatch_names_the_field():
    a = {"model": "local-dir:/x", "weights_sha256": "aa", "embed_dim": 64}
    assert encoders.identity_mismatch(a, {**a, "model": "local-dir:/moved"}) is None
    assert encoders.identity_mismatch(a, {**a, "weights_sha256": "bb"}) == ("weights_sha256", "aa", "bb")
    assert encoders.identity_mismatch(a, {**a, "embed_dim": 768}) == ("embed_dim", 64, 768)
    unhashed = {"model": "ViT-L-14", "pretrained": "openai", "weights_sha256": None}
    assert encoders.identity_mismatch(unhashed, {**unhashed, "pretrained": "laion2b"}) == ("pretrained", "openai", "laion2b")


def test_write_tiny_encoders_needs_a_local_dir():
    with pytest.raises(ValueError, match="expected 'local-dir:PATH'"):
        encoders.write_tiny_encoders(EncodersConfig(clip=ClipConfig(model="ViT-B-32")))
