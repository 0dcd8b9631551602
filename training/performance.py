"""What a training run may do to a stage's network for speed or memory, without changing what it
computes or what its checkpoints hold: activation checkpointing, torch.compile, channels-last
inputs. The engine applies them before DeepSpeed wraps the network.

Every choice works on the networks' own modules in place: the state dict keeps its names (no
`_orig_mod.` from torch.compile's wrapper), so a checkpoint written with any of these settings
loads into a run with any other, and into diffusers.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from training.config import TrainConfig


def networks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The diffusers networks inside a stage's model (the model itself, or e.g. the decoder's unet
    and text_proj), outermost first."""
    from diffusers import ModelMixin  # lazy: as every network build  # pyright: ignore[reportPrivateImportUsage]

    found, inside = [], set()
    for module in model.modules():
        if isinstance(module, ModelMixin) and id(module) not in inside:
            found.append(module)
            inside.update(id(m) for m in module.modules())
    return found


def blocks(network: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a network, which checkpointing and compiling treat one at a time: a
    UNet's down, mid and up blocks; a transformer's (the prior's) transformer blocks."""
    found = [
        *getattr(network, "down_blocks", []),
        *([network.mid_block] if getattr(network, "mid_block", None) is not None else []),
        *getattr(network, "up_blocks", []),
        *getattr(network, "transformer_blocks", []),
    ]
    return found


def checkpoint_activations(model: torch.nn.Module, which: str = "blocks") -> int:
    """Recompute activations block by block in the backward pass. The UNets use diffusers' own
    gradient checkpointing (inside each block, around its resnets and attentions); the prior's
    PriorTransformer has none, so each of its transformer blocks is wrapped in the same
    torch.utils.checkpoint call (non-reentrant, which ZeRO-3's parameter hooks tolerate).

    which="selective" leaves a UNet's deepest level (its last down block, the mid block, the first
    up block) as it is: each level costs about the same compute (a quarter of the pixels, twice the
    channels), but the deepest holds the fewest activations, so recomputing it buys the least
    memory for its time. Returns the number of blocks it applies to."""
    count = 0
    for network in networks(model):
        # Any: the blocks are the attributes of diffusers' UNets and PriorTransformer, which
        # torch's Module type does not declare
        net: Any = network
        if getattr(net, "_supports_gradient_checkpointing", False):
            chosen = blocks(net)
            if which == "selective" and getattr(net, "down_blocks", None):
                deepest = {id(net.down_blocks[-1]), id(net.mid_block), id(net.up_blocks[0])}
                chosen = [b for b in chosen if id(b) not in deepest]
            for block in chosen:
                _diffusers_checkpointing(block)
            count += len(chosen)
        elif getattr(net, "transformer_blocks", None) is not None:
            for block in net.transformer_blocks:
                _checkpoint_forward(block)
                count += 1
    return count


def _diffusers_checkpointing(block: torch.nn.Module) -> None:
    """diffusers' gradient checkpointing for one block: what ModelMixin.enable_gradient_checkpointing
    sets on every module of a network (its flag and checkpoint function), on this block's only."""
    for module in block.modules():
        if hasattr(module, "gradient_checkpointing"):
            flags: Any = module  # plain attributes, which Module.__setattr__'s type does not allow
            flags._gradient_checkpointing_func = _diffusers_checkpoint
            flags.gradient_checkpointing = True


def _diffusers_checkpoint(function: Any, *args: Any) -> Any:
    return checkpoint(function, *args, use_reentrant=False)  # what diffusers' default passes


def _checkpoint_forward(block: torch.nn.Module) -> None:
    forward = block.forward

    def recomputed(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    block.forward = recomputed  # an instance attribute: the module's parameters and names are untouched


def compile_networks(model: torch.nn.Module, how: str, cache: str | None) -> int:
    """torch.compile in place (nn.Module.compile): each block (torchtitan's choice: a UNet's blocks
    differ, a transformer's repeat, and each compiles once), or each network whole. Returns how
    many modules were compiled."""
    if cache:
        os.makedirs(cache, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # read when inductor first compiles, after this
        os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(cache, "triton"))
    targets = [b for n in networks(model) for b in blocks(n)] if how == "blocks" else networks(model)
    for module in targets:
        module.compile()
    return len(targets)


def _to_channels_last(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    def convert(v: Any) -> Any:
        return v.contiguous(memory_format=torch.channels_last) if isinstance(v, torch.Tensor) and v.dim() == 4 else v

    return tuple(convert(a) for a in args), {k: convert(v) for k, v in kwargs.items()}


def channels_last_inputs(model: torch.nn.Module) -> int:
    """The UNets take their 4-D inputs channels-last, so every convolution runs in that layout (on
    GPUs the faster one for cuDNN's kernels). Their weights stay as DeepSpeed lays them out: under
    ZeRO they live in flat contiguous buffers, and a convolution follows its input's layout."""
    count = 0
    for network in networks(model):
        if any(isinstance(m, torch.nn.Conv2d) for m in network.modules()):
            network.register_forward_pre_hook(_to_channels_last, with_kwargs=True)
            count += 1
    return count


def prepare(model: torch.nn.Module, t: TrainConfig) -> list[str]:
    """Apply the run's choices to `model`; returns what was done, for the log."""
    done = []
    if t.activation_checkpointing != "off":
        done.append(f"activation checkpointing of {checkpoint_activations(model, t.activation_checkpointing)} blocks")
    if t.channels_last:
        done.append(f"channels-last inputs to {channels_last_inputs(model)} networks")
    if t.compile != "off":
        done.append(
            f"torch.compile of {compile_networks(model, t.compile, t.compile_cache)} "
            f"{'blocks' if t.compile == 'blocks' else 'networks'}"
        )
    return done
