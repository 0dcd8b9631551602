"""What a stage gives the engine: its store columns, its network, its loss.

The engine (training/engine.py) owns everything else: DeepSpeed, data order, checkpoints, EMA,
logging. A stage is a small subclass in training/stages/.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from data_pipeline.store import Store, StoreError
from models.assembly import describe
from models.config import VaeConfig
from models.encoders import FrozenVae, identity_mismatch, text_conditioning, vae_identity
from models.public import COMPONENTS, PublicWeights, expect_class, load_public, mismatch

# (the weights' config field, its value, what the store or the stage's settings give, that value)
Check = tuple[str, Any, str, Any]


@dataclass(frozen=True)
class Preview:
    """How a stage draws its previews: as `unclip sample` would, so that a preview shows what
    sampling will give. `vae` decodes latents (used only when it is the store's own VAE)."""

    guidance: float = 1.0
    steps: int = 25
    vae: VaeConfig | None = None


class Stage:
    """One trainable stage, built from its own config section (`section`: the `prior`, `decoder`,
    `upsampler` or `ldm` settings) and the store it trains on."""

    name: ClassVar[str]
    columns: ClassVar[tuple[str, ...]]

    def __init__(self, section: Any, store: Store, preview: Preview = Preview()) -> None:
        self.section, self.store, self.preview_settings = section, store, preview
        store.require(self.columns)
        self.check_store()

    def check_store(self) -> None:
        """Refuse a store this stage cannot train on (raise StoreError naming the field)."""

    def build_model(self) -> torch.nn.Module:
        raise NotImplementedError

    def hold_fixed(self, model: torch.nn.Module) -> torch.nn.Module:
        """What training keeps fixed in this stage's network, however it was built (from the
        stage's settings, from public weights, or from a checkpoint's stage.json)."""
        return model

    # -- public weights (models/public.py) --------------------------------------------------------
    def public_checks(self, configs: dict[str, dict[str, Any]]) -> list[Check]:
        """What the public weights' configs must agree on with the store."""
        raise NotImplementedError

    def from_public_modules(self, modules: dict[str, torch.nn.Module]) -> torch.nn.Module:
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

    def loss(self, model: Any, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def extras(self) -> dict[str, Any]:
        """What sampling needs besides the network (saved in stage.json)."""
        return {}

    def preview(self, model: torch.nn.Module, count: int = 4) -> list[tuple[str, Any]]:
        """(name, PIL image) previews of `model` (the EMA weights) on the store's first captions."""
        return []

    def preview_rows(self, columns: list[str], count: int) -> dict[str, Any]:
        data = self.store.read(columns, self.store.files[:1])
        return {k: v[:count] for k, v in data.items()}

    def store_vae(self, device: torch.device):
        """The frozen VAE the store's latents were made with, on `device` (the previewed network's;
        a run previews on one device), for previews; None when the configured VAE is not the
        store's (its pictures would be nonsense) or cannot be loaded."""
        if not hasattr(self, "_vae"):
            vae = self.preview_settings.vae
            try:
                differs = vae is None or identity_mismatch(self.store.manifest["encoders"]["vae"], vae_identity(vae))
            except (OSError, ValueError):
                differs = ("unloadable",)
            self._vae = None if differs else FrozenVae(vae, str(device))
        return self._vae

    def describe(self, model: torch.nn.Module) -> dict[str, Any]:
        """What `stage.json` records: enough for sample and export to rebuild and drive the network
        without the run's config (whose schema may have changed since)."""
        return describe(self.name, model, self.extras(), dataclasses.asdict(self.section.diffusion), self.columns)

    # Called by the loader's thread on each batch of numpy columns (e.g. to decode images), with
    # randomness that is a function of the batch's place in the run; None: batches pass as read.
    prepare: Any = None


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
