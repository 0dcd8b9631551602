"""What a stage gives the engine: its store columns, its network, its loss, its previews.

The engine (training/engine.py) owns everything else: DeepSpeed, data order, checkpoints, EMA,
logging. A stage is a small subclass of `Stage` in training/stages/; how to add one:
training/stages/README.md.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice
from typing import Any, ClassVar

import numpy as np
import torch

from data_pipeline.store import Store, StoreError
from models.assembly import describe
from models.config import VaeConfig
from models.diffusion import Diffusion
from models.encoders import FrozenVae, identity_mismatch, text_conditioning, vae_identity
from models.public import COMPONENTS, PublicWeights, expect_class, load_public, mismatch

# (the weights' config field, its value, what the store or the stage's settings give, that value)
Check = tuple[str, Any, str, Any]

# numpy columns of one batch, and randomness that is a function of the batch's place in the run
Prepare = Callable[[dict[str, np.ndarray], np.random.Generator], dict[str, np.ndarray]]


@dataclass(frozen=True)
class Preview:
    """How a stage draws its previews: as `unclip sample` would, so that a preview shows what
    sampling will give. `vae` decodes latents (used only when it is the store's own VAE)."""

    guidance: float = 1.0
    steps: int = 25
    vae: VaeConfig | None = None


class Stage(abc.ABC):
    """One trainable stage, built from its own config section and the store it trains on.

    Who calls what: launch/rank.py builds the stage on every rank (and `unclip train` once before
    any rank starts, so that an unsuitable store is refused early). The engine then gets the
    network from `build_model`, or rebuilds it from a checkpoint or public weights and passes it
    through `hold_fixed`; records it with `describe`; reads `columns` with the loader, which calls
    `prepare` on each batch in its own thread; calls `loss` at every micro-step and `preview` on
    rank 0 at preview steps.

    A subclass's `__init__` passes its columns to `Stage.__init__`, which refuses a store the stage
    cannot train on (`store.require(columns)`, then `check_store`), and then sets up what its loss
    and previews use. Everything a stage holds is declared, with its type, on its class.
    """

    name: ClassVar[str]
    """`unclip train <name>`: also the config section the stage reads and what stage.json records."""
    section: Any
    """The stage's config section (`prior`, `decoder`, `upsampler` or `ldm`); subclasses narrow it."""
    store: Store
    preview_settings: Preview
    columns: tuple[str, ...]
    """The store columns the loader reads for this stage, in the order stage.json records them."""
    diffusion: Diffusion
    """The stage's noise schedule, prediction target and loss weighting (`section.diffusion`)."""
    prepare: Prepare | None = None
    """Called by the loader's thread on each batch of numpy columns (e.g. to decode images), with
    randomness that is a function of the batch's place in the run; returns the batch the loss gets
    (as tensors). None: batches pass as read. A subclass that needs it defines it as a method."""

    def __init__(self, section: Any, store: Store, preview: Preview | None, columns: tuple[str, ...]) -> None:
        """Keep the settings, refuse an unsuitable store (raises StoreError naming the manifest
        field), and build the diffusion. A subclass calls this first, then sets up its own state."""
        self.section, self.store, self.columns = section, store, columns
        self.preview_settings = Preview() if preview is None else preview
        store.require(columns)
        self.check_store()
        self.diffusion = Diffusion(section.diffusion)
        self._vae: FrozenVae | None = None
        self._vae_chosen = False

    def check_store(self) -> None:  # noqa: B027 (a hook: by default nothing beyond the columns is refused)
        """Refuse a store this stage cannot train on: raise StoreError naming the manifest field that
        differs and what the stage needs instead. May assume `section`, `store` and `columns` are set
        and that the store has every column; sets nothing (set-up belongs in `__init__`). The default
        refuses nothing beyond the missing columns."""

    @abc.abstractmethod
    def build_model(self) -> torch.nn.Module:
        """A fresh network from the stage's settings, sized by the store's manifest (its shapes and
        statistics). Called once per rank after `torch.manual_seed`, so every rank builds the same
        initial weights; the engine then passes it through `hold_fixed`."""

    def hold_fixed(self, model: torch.nn.Module) -> torch.nn.Module:
        """`model` with what training keeps fixed in this stage's network (e.g. the prior's CLIP
        statistics) made untrainable, however it was built (from the stage's settings, from public
        weights, or from a checkpoint's stage.json). Returns the same network; default: unchanged."""
        return model

    # -- public weights (models/public.py) --------------------------------------------------------
    @abc.abstractmethod
    def public_checks(self, configs: dict[str, dict[str, Any]]) -> list[Check]:
        """What the public weights' configs must agree on with the store and the stage's settings.

        `configs` maps each component of COMPONENTS[name] (e.g. "model", "unet", "text_proj") to its
        config.json as read. Returns one Check per field, (field, its value in the weights, what it
        must match, that value); `check_public` refuses the weights if any pair differs, naming it.
        Reads configs only: no weights are loaded yet, and a key may be missing (use .get)."""

    def from_public_modules(self, modules: dict[str, torch.nn.Module]) -> torch.nn.Module:
        """The stage's network assembled from the loaded public components (keyed as in `configs`
        of `public_checks`, which they passed). Default: the one component named "model"."""
        return modules["model"]

    def check_public(self, weights: PublicWeights) -> None:
        """Refuse weights this stage cannot start from on this store, from their configs alone:
        `unclip train` calls it before any rank starts."""
        for name, component in COMPONENTS[self.name].items():
            expect_class(weights, name, component)
        mismatch(weights, self.public_checks(weights.configs))

    def model_from_public(self, weights: PublicWeights) -> torch.nn.Module:
        """The network built from the public weights' own configs, holding their weights."""
        self.check_public(weights)
        return self.hold_fixed(self.from_public_modules(load_public(weights)))

    # -- training ----------------------------------------------------------------------------------
    @abc.abstractmethod
    def loss(self, model: Any, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        """The scalar loss of one micro-batch, to be back-propagated.

        `model`: the network, called as a module (the DeepSpeed engine in training, the plain
        network in benchmarks). `batch`: the stage's columns (or what `prepare` made of them) as
        tensors on the model's device, one row per sample. `generator`: a CPU generator seeded
        from (seed, rank, step, micro-step): every random draw (timesteps, noise, dropout) comes
        from it, so a resumed run repeats the same draws. Must not read the device from the host
        (no .item(), bool(), .cpu(): tests/support/count_syncs.py counts them); may return a non-finite
        loss, which the engine skips."""

    def extras(self) -> dict[str, Any]:
        """What sampling needs besides the network and the diffusion settings (saved in stage.json,
        so JSON values only). Default: nothing."""
        return {}

    def preview(self, model: torch.nn.Module, count: int = 4) -> list[tuple[str, Any]]:
        """(name, PIL image) previews of `model` (the EMA weights, rebuilt on the device where the
        average lives, in eval mode) on the store's first `count` rows, drawn with
        `preview_settings`. Called on rank 0 only, while the other ranks wait: keep it to a few
        sampling steps' worth. An empty list: nothing to show (e.g. no VAE to decode with)."""
        return []

    # -- helpers for subclasses --------------------------------------------------------------------
    def preview_rows(self, columns: list[str], count: int) -> dict[str, Any]:
        """The first `count` rows of `columns` of the store's first part, as numpy arrays."""
        data = self.store.read(columns, list(islice(self.store.files, 1)))
        return {k: v[:count] for k, v in data.items()}

    def store_vae(self, device: torch.device) -> FrozenVae | None:
        """The frozen VAE the store's latents were made with, on `device` (the previewed network's;
        a run previews on one device), for previews; None when the configured VAE is not the
        store's (its pictures would be nonsense) or cannot be loaded. Chosen once."""
        if not self._vae_chosen:
            vae = self.preview_settings.vae
            self._vae = FrozenVae(vae, str(device)) if vae is not None and self._is_store_vae(vae) else None
            self._vae_chosen = True
        return self._vae

    def _is_store_vae(self, vae: VaeConfig) -> bool:
        try:
            return not identity_mismatch(self.store.manifest["encoders"]["vae"], vae_identity(vae))
        except (OSError, ValueError):  # unloadable
            return False

    def describe(self, model: torch.nn.Module) -> dict[str, Any]:
        """What `stage.json` records: enough for sample and export to rebuild and drive the network
        without the run's config (whose schema may have changed since)."""
        return describe(self.name, model, self.extras(), dataclasses.asdict(self.section.diffusion), self.columns)


def empty_caption(store: Store) -> dict[str, torch.Tensor]:
    """The store's embedding of "" (what dropped text becomes with null_text=empty_caption) as text
    conditioning of one row: emb [1, D], tokens [1, L, W], mask [1, L]."""
    return text_conditioning({k: torch.from_numpy(v)[None] for k, v in store.null_caption().items()})


def latent_scale(store: Store, choice: str, key: str) -> float:
    """What multiplies the store's VAE latents to unit scale: 1/std of the store's latents ('store',
    how Stable Diffusion derived 0.18215) or the VAE config's scaling factor ('vae')."""
    if choice == "vae":
        return float(store.manifest["encoders"]["vae"]["scaling_factor"])
    if "vae_latent_std" not in store.manifest:
        raise StoreError(
            f"store '{store.url}': manifest lacks 'vae_latent_std', which {key}=store needs (rerun `unclip embed`)"
        )
    return 1.0 / float(store.manifest["vae_latent_std"])
