"""The ldm's text context: CLIP's per-token states, then its pooled embedding as one more token."""

from __future__ import annotations

import pytest
import torch

from models import chains, ldm
from models.config import DiffusionConfig, EncodersConfig, LdmConfig, VaeConfig
from models.diffusion import Diffusion


def test_the_pooled_embedding_is_the_last_token_of_the_context():
    text = {"tokens": torch.randn(2, 5, 8), "emb": torch.randn(2, 8)}
    context = ldm.context(text, True)
    assert context.shape == (2, 6, 8)
    assert torch.equal(context[:, :5], text["tokens"]) and torch.equal(context[:, 5], text["emb"])
    assert torch.equal(ldm.context(text, False), text["tokens"])


def test_an_ldm_attends_to_the_embedding_only_when_its_checkpoint_trained_with_it(tmp_path):
    """stage.json's text_embedding_token decides; an ldm saved before the option existed saw tokens only."""
    from models.encoders import FrozenVae, write_tiny_encoders

    enc = EncodersConfig(vae=VaeConfig(path=str(tmp_path / "vae")))
    enc.clip.model = f"local-dir:{tmp_path}/clip"
    write_tiny_encoders(enc)
    vae = FrozenVae(enc.vae)
    torch.manual_seed(0)
    unet = ldm.build_unet(LdmConfig(block_channels=[16, 32]), vae.latent_channels, 8, text_width=8)
    lengths: list[int] = []
    unet.register_forward_pre_hook(
        lambda _m, _args, kwargs: lengths.append(kwargs["encoder_hidden_states"].shape[1]), with_kwargs=True
    )
    text = {"tokens": torch.randn(2, 5, 8), "emb": torch.randn(2, 8)}
    for extras, length in (({"latent_scale": 1.0, "text_embedding_token": True}, 6), ({"latent_scale": 1.0}, 5)):
        lengths.clear()
        net = chains.Net(unet, Diffusion(DiffusionConfig(prediction="v")), extras, vae)
        pictures = chains.latent_diffusion(net, text, 2, 2.0, torch.Generator().manual_seed(0))
        assert set(lengths) == {length} and pictures.shape == (2, 3, 8 * vae.downsample, 8 * vae.downsample)


def test_an_embedding_of_another_size_than_the_tokens_is_refused_by_name(tmp_path):
    from data_pipeline.store import StoreError
    from launch import config
    from tests.support.storefactory import make_store
    from training.stages.ldm import LdmStage

    store = make_store(str(tmp_path / "store"), columns=("clip_text_emb", "clip_text_tokens", "vae_latent"))
    store.manifest["columns"]["clip_text_emb"]["shape"] = [12]
    with pytest.raises(
        StoreError,
        match=r"'columns.clip_text_emb.shape' has size 12, .* tokens of width 16 .* ldm.text_embedding_token=false",
    ):
        LdmStage(config.load(None, []).ldm, store)
    assert LdmStage(config.load(None, ["ldm.text_embedding_token=false"]).ldm, store).columns == (
        "vae_latent",
        "clip_text_tokens",
    )
