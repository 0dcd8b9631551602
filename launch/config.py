"""The one configuration of an unclip experiment: every command reads the sections it needs.

`{root}` in any string setting is replaced by `root`, so one YAML file (or the defaults, which
are the embedded default data set at demo size) describes where everything lives.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Sequence

from data_pipeline.config import EmbedConfig, IngestConfig, RayConfig, SyntheticConfig
from launch import configlib
from launch.configlib import option
from models.config import EncodersConfig, LdmConfig, PriorConfig
from training.config import TrainConfig


@dataclass
class SampleConfig:
    prompts: list[str] = field(
        default_factory=lambda: [
            "a red circle on a blue background",
            "a yellow square on a black background",
            "a green triangle on a white background",
            "a blue circle on a yellow background",
        ]
    )
    images_per_prompt: int = option(4, ge=1)
    steps: int = option(50, ge=1)
    guidance: float = option(3.0, ge=0, doc="classifier-free guidance scale; 1 turns it off")
    sampler: str = option("ddim")
    seed: int = 0
    run: str = option("main", doc="which run of each stage to sample from")
    out: str = option("{root}/samples")

    def validate(self) -> None:
        if self.sampler not in ("ddim", "ddpm"):
            raise ValueError(f"config key 'sample.sampler': expected one of 'ddim', 'ddpm', got {self.sampler!r}")
        if not self.prompts:
            raise ValueError("config key 'sample.prompts': expected at least one prompt")


@dataclass
class Config:
    root: str = option("./unclip-data", doc="where raw/, store/ and runs/ live: a path or any fsspec URL")
    ray: RayConfig = option(factory=RayConfig)
    synthetic: SyntheticConfig = option(factory=SyntheticConfig)
    ingest: IngestConfig = option(factory=IngestConfig)
    encoders: EncodersConfig = option(factory=EncodersConfig)
    embed: EmbedConfig = option(factory=EmbedConfig)
    train: TrainConfig = option(factory=TrainConfig)
    prior: PriorConfig = option(factory=PriorConfig)
    ldm: LdmConfig = option(factory=LdmConfig)
    sample: SampleConfig = option(factory=SampleConfig)

    @property
    def raw_url(self) -> str:
        return _join(self.root, "raw")

    @property
    def store_url(self) -> str:
        return _join(self.root, "store")

    def run_url(self, stage: str, run: str | None = None) -> str:
        return _join(self.root, "runs", stage, run or self.train.run)


def _join(root: str, *parts: str) -> str:
    from data_pipeline import storage

    return storage.join(root, *parts)


def _substitute_root(node: Any, root: str) -> Any:
    if isinstance(node, str):
        return node.replace("{root}", root)
    if isinstance(node, list):
        return [_substitute_root(v, root) for v in node]
    if isinstance(node, dict):
        return {k: _substitute_root(v, root) for k, v in node.items()}
    if dataclasses.is_dataclass(node):
        for f in dataclasses.fields(node):
            setattr(node, f.name, _substitute_root(getattr(node, f.name), root))
    return node


def load(path: str | None = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults <- YAML <- overrides, validated, with `{root}` resolved and `root` normalised."""
    from data_pipeline import storage

    cfg = configlib.load(Config, path, overrides)
    cfg.root = storage.normalize(cfg.root)
    for f in dataclasses.fields(cfg):
        if f.name != "root":
            _substitute_root(getattr(cfg, f.name), cfg.root)
    return cfg


def from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a saved (already resolved) configuration."""
    return configlib.build(Config, data)
