"""The one configuration of an unclip experiment: every command reads the sections it needs.

`{root}` in any string setting is replaced by `root`, so one YAML file (or the defaults, which
are the embedded default data set at demo size) describes where everything lives.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from data_pipeline.config import EmbedConfig, IngestConfig, RayConfig, StorageConfig, SyntheticConfig
from models.base import configlib, storage
from models.base.configlib import option
from models.config import DecoderConfig, EncodersConfig, LdmConfig, PriorConfig, UpsamplerConfig
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
    chains: list[Literal["ldm", "unclip"]] = option(factory=lambda: ["ldm", "unclip"])
    images_per_prompt: int = option(4, ge=1)
    batch_size: int = option(16, ge=1, doc="images sampled at once; batch i draws its noise from seed + i")
    steps: int = option(25, ge=1)
    upsampler_steps: int = option(
        10, ge=1, doc="sampling steps of each upsampler: it starts from the low-resolution picture, so it needs fewer"
    )
    # One scale per guided model, as unCLIP and Kandinsky sample. On the embedded default (two trained
    # runs, two seeds of 32 held-out prompts each), against no guidance at all: the ldm was best at 3;
    # guiding the prior (2, 3) moved its embeddings away from the true image's (cosine 0.971 -> 0.968 /
    # 0.960) and made the chain's samples worse (lower CLIP score, larger Fréchet distance). The
    # decoder, on two later runs x two seeds: mean prompt following 95.6 / 98.4 / 97.0% at 1 / 1.5 / 2
    # (shape kind fell at 2), CLIP score 0.818 / 0.858 / 0.863, Fréchet distance 27.5 / 23.7 / 23.0.
    guidance: float = option(
        3.0, ge=0, doc="the ldm's classifier-free guidance scale; 1 turns it off, 0 is unconditional"
    )
    decoder_guidance: float = option(
        1.5, ge=0, doc="the unCLIP decoder's guidance scale (also for variations and interpolation)"
    )
    prior_guidance: float = option(1.0, ge=0, doc="the unCLIP prior's guidance scale")
    sampler: Literal["ddim", "ddpm", "unclip"] = option(
        "ddim",
        doc="every stage's reverse process: DDIM, DDPM, or unclip (diffusers' UnCLIPScheduler, as UnCLIPPipeline "
        "samples Karlo; "
        "cosine schedule, eps or x0 prediction)",
    )
    device: Literal["auto", "cpu", "cuda"] = option(
        "auto", doc="where sample and eval run the networks; auto: the GPU when torch sees one"
    )
    seed: int = 0
    run: str = option("main", doc="which run of prior, decoder and ldm to sample from")
    upsampler_runs: list[str] = option(
        factory=lambda: ["main"], doc="upsampler runs applied in order (e.g. 64->256, 256->1024)"
    )
    variations: list[str] = option(factory=list, doc="images (paths or URLs) to make variations of, with the decoder")
    interpolate: list[str] = option(factory=list, doc="two prompts: images along the slerp of their image embeddings")
    interpolation_steps: int = option(5, ge=2)
    out: str = option("{root}/samples")

    def scales(self, chain: str) -> tuple[float, float]:
        """(image model's guidance, prior's guidance) that `chain` samples at: the ldm has no prior."""
        if chain == "ldm":
            return self.guidance, 1.0
        if chain == "unclip":
            return self.decoder_guidance, self.prior_guidance
        raise ValueError(f"sample chain {chain!r}: expected ldm or unclip")

    def validate(self) -> None:
        if not self.prompts:
            raise ValueError("config key 'sample.prompts': expected at least one prompt")
        if self.sampler == "unclip" and min(self.steps, self.upsampler_steps) < 2:
            raise ValueError(
                "config key 'sample.sampler' is 'unclip', whose timesteps need sample.steps and "
                f"sample.upsampler_steps >= 2; got {self.steps} and {self.upsampler_steps}"
            )
        if self.interpolate and len(self.interpolate) != 2:
            raise ValueError(f"config key 'sample.interpolate': expected two prompts, got {len(self.interpolate)}")


@dataclass
class DemoConfig:
    fit_encoders: bool = option(
        True, doc="fit the small encoders on the ingested data (false: random ones, plumbing only)"
    )
    stages: list[Literal["ldm", "prior", "decoder", "upsampler"]] = option(
        factory=lambda: ["ldm", "prior", "decoder", "upsampler"]
    )


@dataclass
class EvalConfig:
    # 32, not 16: on the embedded default (about 30 held-out rows) shape kind read from 16 prompts
    # moved by 10-20 points between two seeds of the same checkpoint; one prompt is 6% of 16.
    samples: int = option(32, ge=2, doc="held-out rows to generate from (all of them when fewer)")
    batch_size: int = option(16, ge=1)
    # 2, not 1: with one image per prompt, whether guidance beat no guidance on the embedded default
    # turned on a single prompt's sample (the same checkpoint won on one sampling seed, lost on another).
    images_per_prompt: int = option(
        2, ge=1, doc="images generated per held-out prompt, each from its own noise; all are scored"
    )
    unguided_baseline: bool = option(True, doc="also generate with guidance 1 (off) and score it: what guidance adds")
    # The held-out rows alone (about 30 on the embedded default) are too few to fit a covariance in
    # CLIP's dimensions: there, sets of real training images scored 35-51 against them and generated
    # ones 23-36; against the 482 training rows real sets read 8-14, generated 61-67.
    reference_rows: int = option(
        10000,
        ge=0,
        doc="training rows whose CLIP image embeddings the Fréchet distance is measured against (0: the held-out rows)",
    )
    out: str = option("{root}/eval")


@dataclass
class SlurmConfig:
    partition: str | None = None
    account: str | None = None
    time: str = option("24:00:00", doc="wall-clock limit; the job is sent SIGTERM signal_grace_s before it")
    cpus_per_task: int = option(16, ge=1, doc="CPUs of each node's task (loader threads, checkpoint hashing)")
    signal_grace_s: int = option(180, ge=10, doc="SIGTERM this long before the limit: time to save a checkpoint")
    requeue: bool = option(True, doc="a preempted or timed-out job goes back in the queue and resumes from latest")
    template: str | None = option(None, doc="sbatch template (default: infra/slurm/train.sbatch)")
    python: str | None = option(None, doc="the nodes' Python with unclip installed (default: the submitting one)")
    submit: bool = option(False, doc="run sbatch; otherwise print the script")


@dataclass
class RayTrainConfig:
    max_failures: int = option(3, ge=0, doc="worker-group restarts after a worker dies; each resumes from latest")
    cpus_per_worker: float = option(1.0, gt=0)
    storage_path: str | None = option(None, doc="Ray Train's own run state (default: the run folder's ray/)")


@dataclass
class LaunchConfig:
    """How `unclip launch` starts a job across nodes (see infra/README.md)."""

    backend: Literal["torchrun", "deepspeed", "slurm", "ray"] = "torchrun"
    nodes: int = option(1, ge=1)
    gpus_per_node: int = option(8, ge=1, doc="training processes per node, one per GPU")
    master_addr: str = option("127.0.0.1", doc="node 0's address: the rendezvous (torchrun) or master (deepspeed)")
    master_port: int = option(29500, ge=1, le=65535)
    rdzv_id: str | None = option(None, doc="torchrun rendezvous id shared by the nodes (default: <stage>-<run>)")
    rendezvous_timeout_s: int = option(900, ge=10, doc="how long nodes wait for each other to join")
    max_restarts: int = option(0, ge=0, doc="torchrun: restarts of the whole worker group after a rank fails")
    hosts: list[str] = option(factory=list, doc="deepspeed: node host names, node 0 first (or give hostfile)")
    hostfile: str | None = option(None, doc="deepspeed: an existing hostfile ('host slots=N' lines)")
    env: dict[str, str] = option(factory=dict, doc="extra environment for every rank, e.g. NCCL_SOCKET_IFNAME: eth0")
    address: str | None = option(None, doc="Ray Jobs API of a cluster, http://HEAD:8265 (data jobs)")
    working_dir: str | None = option(None, doc="data jobs: a local folder shipped as the job's working directory")
    pip: list[str] = option(factory=list, doc="data jobs: extra pip packages installed for the job")
    slurm: SlurmConfig = option(factory=SlurmConfig)
    ray: RayTrainConfig = option(factory=RayTrainConfig)

    def validate(self) -> None:
        if self.backend == "deepspeed" and self.hosts and len(self.hosts) != self.nodes:
            raise ValueError(f"config key 'launch.hosts': {len(self.hosts)} hosts for launch.nodes={self.nodes}")
        if self.backend == "deepspeed" and self.nodes > 1 and not (self.hosts or self.hostfile):
            raise ValueError(
                "config key 'launch.hosts': the deepspeed backend needs the nodes' host names (or launch.hostfile)"
            )


@dataclass
class Config:
    root: str = option("./unclip-data", doc="where raw/, store/ and runs/ live: a path or any fsspec URL")
    ray: RayConfig = option(factory=RayConfig)
    storage: StorageConfig = option(factory=StorageConfig)
    synthetic: SyntheticConfig = option(factory=SyntheticConfig)
    ingest: IngestConfig = option(factory=IngestConfig)
    encoders: EncodersConfig = option(factory=EncodersConfig)
    embed: EmbedConfig = option(factory=EmbedConfig)
    train: TrainConfig = option(factory=TrainConfig)
    prior: PriorConfig = option(factory=PriorConfig)
    decoder: DecoderConfig = option(factory=DecoderConfig)
    upsampler: UpsamplerConfig = option(factory=UpsamplerConfig)
    ldm: LdmConfig = option(factory=LdmConfig)
    sample: SampleConfig = option(factory=SampleConfig)
    eval: EvalConfig = option(factory=EvalConfig)
    demo: DemoConfig = option(factory=DemoConfig)
    launch: LaunchConfig = option(factory=LaunchConfig)

    @property
    def raw_url(self) -> str:
        return _join(self.root, "raw")

    @property
    def store_url(self) -> str:
        return _join(self.root, "store")

    def run_url(self, stage: str, run: str | None = None) -> str:
        return _join(self.root, "runs", stage, run or self.train.run)


def _join(root: str, *parts: str) -> str:
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
    cfg = configlib.load(Config, path, overrides)
    cfg.root = storage.normalize(cfg.root)
    for f in dataclasses.fields(cfg):
        if f.name != "root":
            _substitute_root(getattr(cfg, f.name), cfg.root)
    return _with_storage_settings(cfg)


def from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a saved (already resolved) configuration."""
    return _with_storage_settings(configlib.build(Config, data))


def for_stage(cfg: Config, stage: str) -> Config:
    """`cfg` as stage `stage` trains with it: `train.stages.<stage>` applied to the train section
    (what the run records in its config.yaml)."""
    return dataclasses.replace(cfg, train=cfg.train.for_stage(stage))


def _with_storage_settings(cfg: Config) -> Config:
    """`storage.*` takes effect when a configuration is read: here, and in every process started
    from here (ranks, a local Ray's workers; submitted jobs get them forwarded)."""
    storage.configure_object_store(cfg.storage.attempts, cfg.storage.connect_timeout_s, cfg.storage.read_timeout_s)
    return cfg
