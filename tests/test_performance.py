"""What training/performance.py does to a stage's networks, in one process: which blocks
recompute their activations, that compiling leaves the weights' names alone, and that the UNets
see channels-last inputs. tests/test_training_options.py trains with each and compares the losses."""

from __future__ import annotations

import torch

from models import ldm, prior
from models.config import LdmConfig, PriorConfig
from training import performance


def unet():
    torch.manual_seed(0)
    return ldm.build_unet(LdmConfig(block_channels=[16, 32, 32]), 4, 8, text_width=8)


def checkpointed(network) -> list[bool]:
    return [
        any(getattr(m, "gradient_checkpointing", False) for m in block.modules())
        for block in performance.blocks(network)
    ]


def test_selective_checkpointing_leaves_the_deepest_level_and_blocks_take_every_block():
    every, selective = unet(), unet()
    assert performance.checkpoint_activations(every, "blocks") == 7 and all(checkpointed(every))
    # down 0 1 2, mid, up 0 1 2: the deepest level is down 2, the mid block and up 0
    assert performance.checkpoint_activations(selective, "selective") == 4
    assert checkpointed(selective) == [True, True, False, False, False, True, True]


def test_checkpointed_blocks_give_the_same_loss_and_gradients():
    x, t, text = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.randn(2, 5, 8)
    plain, recomputed = unet(), unet()
    performance.checkpoint_activations(recomputed, "blocks")
    for model in (plain, recomputed):
        model(x, t, encoder_hidden_states=text).sample.square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), recomputed.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_the_prior_recomputes_each_transformer_block():
    model = prior.build_prior(
        PriorConfig(layers=2, heads=2, head_dim=4), embed_dim=8, context_length=5, mean=[0.0] * 8, std=[1.0] * 8
    )
    assert performance.checkpoint_activations(model, "blocks") == 2
    assert all("recomputed" in block.forward.__name__ for block in model.transformer_blocks)


def test_compiling_keeps_every_weight_name():
    model = unet()
    names = list(model.state_dict())
    assert performance.compile_networks(model, "blocks", None) == 7
    assert list(model.state_dict()) == names and not any("_orig_mod" in n for n in names)
    assert performance.compile_networks(unet(), "whole", None) == 1


def test_channels_last_inputs_reach_the_convolutions():
    model = unet()
    seen = []
    model.conv_in.register_forward_pre_hook(
        lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    performance.channels_last_inputs(model)
    model(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), encoder_hidden_states=torch.randn(2, 5, 8))
    assert seen == [True]
