"""Gaussian diffusion shared by every stage: forward process, training targets, loss, sampling.

Betas come from diffusers' schedulers (the same tables diffusers pipelines sample with), so a
stage trained here and exported runs unchanged in diffusers. What diffusers leaves to training
scripts lives here: q(x_t | x_0), the eps / x0 / v targets, min-SNR-gamma weighting, and
classifier-free guidance around the scheduler's step.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property

import torch

from models.config import DiffusionConfig

BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
PREDICTION_TYPES = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}

# model_fn(x_t, t, conditional: bool) -> prediction
ModelFn = Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor]


def row_mask(n: int, probability: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """True for each row with `probability` (condition dropout); drawn on the CPU like all training
    randomness, so a run draws the same numbers on any device."""
    return (torch.rand(n, generator=generator) < probability).to(device)


def device_of(model: torch.nn.Module) -> torch.device:
    """Where `model`'s weights are: sampling runs there (load_trained puts them on `sample.device`),
    whatever device the conditioning came from."""
    return next(model.parameters()).device


def _expand(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.reshape(-1, *([1] * (like.dim() - 1))).to(like)


def shifted_betas(alphas_cumprod: torch.Tensor, shift: float) -> list[float]:
    """Betas whose cumulative product has SNR(t) / shift**2 at every t."""
    snr = alphas_cumprod / (1 - alphas_cumprod) / shift**2
    shifted = snr / (1 + snr)
    previous = torch.cat([torch.ones(1, dtype=shifted.dtype), shifted[:-1]])
    return (1 - shifted / previous).clamp(max=0.999).tolist()  # the cap diffusers' cosine table has


SAMPLERS = ("ddim", "ddpm", "unclip")


class Diffusion:
    def __init__(self, cfg: DiffusionConfig, sampler: str = "ddim"):
        """`sampler` ("ddim", "ddpm" or "unclip"): the reverse process `sample` and `make_scheduler`
        use unless told. "unclip" is diffusers' UnCLIPScheduler, which UnCLIPPipeline (Karlo) samples
        every network with: ancestral steps between unevenly spaced timesteps, each network's learned
        variance where it has one."""
        self.cfg = cfg
        self.sampler = sampler

    # The tables are built on first use, so that a stage checks its store (`unclip train` before
    # any rank starts) without importing diffusers.
    @cached_property
    def scheduler_config(self) -> dict:
        cfg = self.cfg
        config = {
            "num_train_timesteps": cfg.timesteps,
            "beta_schedule": BETA_SCHEDULES[cfg.schedule],
            "prediction_type": PREDICTION_TYPES[cfg.prediction],
            "clip_sample": cfg.clip_sample is not None,
            **({"clip_sample_range": cfg.clip_sample} if cfg.clip_sample is not None else {}),
            "timestep_spacing": "trailing",  # sampling starts at the last trained step (pure noise), Lin et al. 2024
            **({"beta_start": 0.00085, "beta_end": 0.012} if cfg.schedule == "scaled_linear" else {}),
        }
        if cfg.snr_shift != 1.0:
            # As explicit betas, so every diffusers scheduler built from (and exported with) this
            # config runs the shifted schedule.
            from diffusers import DDPMScheduler  # lazy: see above  # pyright: ignore[reportPrivateImportUsage]

            config["trained_betas"] = shifted_betas(DDPMScheduler(**config).alphas_cumprod.double(), cfg.snr_shift)
        return config

    @cached_property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.make_scheduler("ddpm").alphas_cumprod.double()

    def _abar(self, t: torch.Tensor) -> torch.Tensor:
        """alphas_cumprod at `t`, looked up where `t` is: indexing a host table with device
        timesteps would copy them back, and the training step would wait for the device."""
        tables = self.__dict__.setdefault("_tables", {})
        if t.device not in tables:
            tables[t.device] = self.alphas_cumprod.to(
                t.device, torch.float64 if t.device.type in ("cpu", "cuda") else torch.float32
            )
        return tables[t.device][t]

    def make_scheduler(self, sampler: str | None = None, learned_variance: bool = False):
        """`learned_variance`: the network also predicts its variance (Karlo's decoder), which only
        the unclip sampler uses."""
        from diffusers import DDIMScheduler, DDPMScheduler, UnCLIPScheduler  # lazy: see scheduler_config  # pyright: ignore[reportPrivateImportUsage]

        sampler = sampler or self.sampler
        if sampler == "ddim":
            return DDIMScheduler(**self.scheduler_config, set_alpha_to_one=True)  # the last step lands on x_0
        if sampler == "ddpm":
            return DDPMScheduler(**self.scheduler_config)
        if sampler == "unclip":
            self.check_unclip_sampler()
            cfg = self.cfg
            prediction = PREDICTION_TYPES[cfg.prediction]
            assert prediction in ("epsilon", "sample")  # check_unclip_sampler refused v
            return UnCLIPScheduler(
                num_train_timesteps=cfg.timesteps,
                variance_type="learned_range" if learned_variance else "fixed_small_log",
                clip_sample=cfg.clip_sample is not None,
                clip_sample_range=cfg.clip_sample or 1.0,
                prediction_type=prediction,
            )
        raise ValueError(f"unknown sampler {sampler!r} (expected one of {', '.join(SAMPLERS)})")

    def unclip_sampler_misfit(self) -> str | None:
        """Why the unclip sampler (UnCLIPScheduler) cannot sample this diffusion, or None."""
        cfg = self.cfg
        if cfg.schedule != "cosine" or cfg.snr_shift != 1.0:
            return (
                f"it takes the cosine schedule, unshifted; this stage trained on {cfg.schedule} "
                f"with snr_shift {cfg.snr_shift}"
            )
        if cfg.prediction == "v":
            return "it takes eps or x0 predictions; this stage predicts v"
        return None

    def check_unclip_sampler(self) -> None:
        misfit = self.unclip_sampler_misfit()
        if misfit:
            raise ValueError(f"config key 'sample.sampler' is 'unclip' (diffusers' UnCLIPScheduler): {misfit}")

    def sample_timesteps(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(0, self.cfg.timesteps, (n,), generator=generator)

    def draw(self, x0: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Timesteps and noise for a training batch, drawn on the CPU, placed beside x0."""
        t = self.sample_timesteps(len(x0), generator)
        noise = torch.randn(x0.shape, generator=generator)
        return t.to(x0.device), noise.to(x0.device)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
        abar = _expand(self._abar(t), x0)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.cfg.prediction == "eps":
            return noise
        if self.cfg.prediction == "x0":
            return x0
        abar = _expand(self._abar(t), x0)
        return abar.sqrt() * noise - (1 - abar).sqrt() * x0  # v

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        abar = self._abar(t)
        return (abar / (1 - abar)).float()

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """Per-sample weight; min-SNR-gamma (Hang et al. 2023) expressed for each target."""
        if self.cfg.loss_weighting == "uniform":
            return torch.ones(len(t), device=t.device)
        snr = self.snr(t)
        clipped = torch.minimum(snr, torch.full_like(snr, self.cfg.snr_gamma))
        return {"eps": clipped / snr, "x0": clipped, "v": clipped / (snr + 1)}[self.cfg.prediction]

    def loss(self, prediction: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        target = self.target(x0, noise, t)
        per_sample = (prediction.float() - target.float()).pow(2).flatten(1).mean(1)
        return (per_sample * self.loss_weight(t).to(per_sample)).mean()

    @torch.no_grad()
    def sample(
        self,
        model_fn: ModelFn,
        shape: tuple[int, ...],
        steps: int,
        guidance: float,
        generator: torch.Generator,
        sampler: str | None = None,
        device: torch.device | str = "cpu",
        learned_variance: bool = False,
    ) -> torch.Tensor:
        """Draw x_0 by the scheduler's reverse process with classifier-free guidance.

        guidance w: pred = uncond + w (cond - uncond); w = 1 is the conditional model alone and
        w = 0 the unconditional one. `learned_variance`: model_fn returns the prediction and then,
        on axis 1, the variance (Nichol & Dhariwal's interpolation, as Karlo's decoder predicts it):
        the conditional model's is kept, as diffusers' UnCLIPPipeline does, and only the unclip
        sampler reads it.
        """
        sampler = sampler or self.sampler
        if sampler == "unclip" and steps < 2:
            raise ValueError(
                "config key 'sample.sampler' is 'unclip': UnCLIPScheduler needs at least 2 steps (sample.steps)"
            )
        scheduler = self.make_scheduler(sampler, learned_variance)
        scheduler.set_timesteps(steps)
        timesteps = scheduler.timesteps
        x = torch.randn(shape, generator=generator).to(device) * scheduler.init_noise_sigma
        channels = shape[1]
        for i, t in enumerate(timesteps):
            tt = torch.full((shape[0],), int(t), dtype=torch.long, device=device)
            pred = model_fn(x, tt, True)
            variance = None
            if learned_variance:
                pred, variance = pred[:, :channels], pred[:, channels:]
            if guidance != 1.0:
                uncond = model_fn(x, tt, False)[:, :channels]
                pred = uncond + guidance * (pred - uncond)
            step = {}
            if sampler == "unclip":
                # UnCLIPScheduler is told the next timestep (None at the last), as UnCLIPPipeline tells it
                step["prev_timestep"] = timesteps[i + 1] if i + 1 < len(timesteps) else None
                if variance is not None:
                    pred = torch.cat([pred, variance], 1)
            # the tuple's first item is prev_sample in each scheduler; diffusers types `timestep` int, takes tensors
            x = scheduler.step(pred, t, x, generator=generator, return_dict=False, **step)[0]  # pyright: ignore[reportArgumentType]
        return x
