"""The shared diffusion math against closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from models.config import DiffusionConfig
from models.diffusion import Diffusion


def test_linear_schedule_is_the_product_of_alphas():
    d = Diffusion(DiffusionConfig(schedule="linear", timesteps=1000))
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    assert torch.allclose(d.alphas_cumprod, torch.cumprod(1 - betas, 0), rtol=1e-5)


def test_cosine_schedule_follows_nichol_dhariwal():
    d = Diffusion(DiffusionConfig(schedule="cosine", timesteps=1000))
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 100, 500, 900):
        assert d.alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-3)


def test_snr_shift_divides_every_steps_snr_and_survives_a_saved_scheduler(tmp_path):
    from diffusers import DDIMScheduler

    base, shifted = Diffusion(DiffusionConfig()), Diffusion(DiffusionConfig(snr_shift=4.0))
    ts = torch.tensor([0, 100, 500, 900, 998])
    assert torch.allclose(shifted.snr(ts), base.snr(ts) / 16, rtol=1e-3)
    # what an exported pipeline samples with: the scheduler saved from the config, loaded back
    shifted.make_scheduler("ddim").save_pretrained(tmp_path)
    loaded = DDIMScheduler.from_pretrained(tmp_path)
    assert torch.allclose(loaded.alphas_cumprod.double(), shifted.alphas_cumprod, rtol=1e-6)
    assert not torch.allclose(loaded.alphas_cumprod.double(), base.alphas_cumprod, rtol=1e-2)


def test_q_sample_has_the_marginal_statistics():
    d = Diffusion(DiffusionConfig(schedule="linear"))
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((200_000, 1), 2.0)
    t = torch.full((len(x0),), 300)
    xt = d.q_sample(x0, t, torch.randn(x0.shape, generator=g))
    abar = d.alphas_cumprod[300].item()
    assert xt.mean().item() == pytest.approx(2.0 * math.sqrt(abar), abs=0.01)
    assert xt.var().item() == pytest.approx(1 - abar, rel=0.02)


def test_targets_convert_into_each_other():
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(8, 3, generator=g), torch.randn(8, 3, generator=g)
    t = torch.randint(0, 1000, (8,), generator=g)
    d = {p: Diffusion(DiffusionConfig(prediction=p)) for p in ("eps", "x0", "v")}
    xt = d["v"].q_sample(x0, t, eps)
    v = d["v"].target(x0, eps, t)
    a = d["v"].alphas_cumprod[t].float()[:, None]
    assert torch.allclose(a.sqrt() * xt - (1 - a).sqrt() * v, x0, atol=1e-5)  # v -> x0
    assert torch.allclose((1 - a).sqrt() * xt + a.sqrt() * v, eps, atol=1e-5)  # v -> eps
    assert torch.equal(d["eps"].target(x0, eps, t), eps)
    assert torch.equal(d["x0"].target(x0, eps, t), x0)


def test_min_snr_weights():
    t = torch.tensor([10, 500, 990])
    for prediction, expected in (
        ("eps", lambda s: torch.clamp(s, max=5.0) / s),
        ("x0", lambda s: torch.clamp(s, max=5.0)),
        ("v", lambda s: torch.clamp(s, max=5.0) / (s + 1)),
    ):
        d = Diffusion(DiffusionConfig(prediction=prediction, loss_weighting="min_snr", snr_gamma=5.0))
        assert torch.allclose(d.loss_weight(t), expected(d.snr(t)))
    assert torch.equal(Diffusion(DiffusionConfig()).loss_weight(t), torch.ones(3))


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "unclip"])
def test_sampling_a_perfect_model_returns_the_data_point(sampler):
    """If the data is one point, the exact x0-predictor always says so; sampling must land on it."""
    target = torch.tensor([[0.5, -1.0, 2.0]])
    d = Diffusion(DiffusionConfig(prediction="x0"))
    out = d.sample(
        lambda x, t, c: target.expand_as(x),
        (4, 3),
        steps=20,
        guidance=1.0,
        generator=torch.Generator().manual_seed(0),
        sampler=sampler,
    )
    # UnCLIPScheduler's last step weighs x0 by betas[0] / (1 - alphas_cumprod[0]), 0.99945 in float32
    assert torch.allclose(out, target.expand(4, 3), atol=2e-3 if sampler == "unclip" else 1e-4)


def test_classifier_free_guidance_extrapolates_from_unconditional():
    cond, uncond = torch.tensor([[1.0, 1.0]]), torch.tensor([[0.0, 2.0]])
    d = Diffusion(DiffusionConfig(prediction="x0"))
    fn = lambda x, t, c: (cond if c else uncond).expand_as(x)  # noqa: E731
    for w in (0.0, 1.0, 3.0):
        out = d.sample(fn, (2, 2), steps=10, guidance=w, generator=torch.Generator().manual_seed(0))
        assert torch.allclose(out, (uncond + w * (cond - uncond)).expand(2, 2), atol=1e-4)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "unclip"])
def test_sampling_starts_at_the_last_trained_step(sampler):
    """Trailing spacing: the first step is t = T-1 (pure noise under cosine), not the leading grid's
    T - T/steps, where a model trained with leaked signal would meet none (Lin et al. 2024)."""
    scheduler = Diffusion(DiffusionConfig()).make_scheduler(sampler)
    scheduler.set_timesteps(25)
    assert int(scheduler.timesteps[0]) == 999 and int(scheduler.timesteps[-1]) >= 0
    assert len(scheduler.timesteps) == 25


def test_the_sampler_given_at_construction_is_the_default():
    """A Diffusion built with sampler="ddpm" samples (and makes schedulers) as DDPM unless told
    otherwise: how `sample.sampler` reaches every stage without threading it through the chains."""
    model_fn = lambda x, t, c: 0.5 * x  # noqa: E731 - an eps-predictor that leaves room for the sampler to matter
    draw = lambda d, **kw: d.sample(model_fn, (2, 3), 5, 1.0, torch.Generator().manual_seed(0), **kw)  # noqa: E731
    ddpm, ddim = Diffusion(DiffusionConfig(), "ddpm"), Diffusion(DiffusionConfig())
    assert torch.equal(draw(ddpm), draw(ddim, sampler="ddpm"))
    assert torch.equal(draw(ddpm, sampler="ddim"), draw(ddim))
    assert not torch.allclose(draw(ddpm), draw(ddim))
    assert (
        type(ddpm.make_scheduler()).__name__ == "DDPMScheduler"
        and type(ddim.make_scheduler()).__name__ == "DDIMScheduler"
    )


def test_the_unclip_sampler_is_refused_where_unclipscheduler_cannot_follow():
    """UnCLIPScheduler knows the cosine schedule only, and eps or x0 targets."""
    for cfg, expected in (
        (DiffusionConfig(prediction="v"), "it takes eps or x0 predictions; this stage predicts v"),
        (
            DiffusionConfig(schedule="scaled_linear"),
            "it takes the cosine schedule, unshifted; this stage trained on scaled_linear",
        ),
        (DiffusionConfig(snr_shift=4.0), "with snr_shift 4.0"),
    ):
        with pytest.raises(ValueError, match=expected):
            Diffusion(cfg, "unclip").make_scheduler()
    with pytest.raises(ValueError, match="needs at least 2 steps"):
        Diffusion(DiffusionConfig(), "unclip").sample(
            lambda x, t, c: x, (1, 2), 1, 1.0, torch.Generator().manual_seed(0)
        )


def test_a_learned_variance_is_read_by_the_unclip_sampler_alone_and_from_the_conditional_model():
    """model_fn gives [prediction, variance] on axis 1 (Karlo's decoder): UnCLIPScheduler's
    learned range reads the variance, the conditional model's, as UnCLIPPipeline does; guidance
    mixes the predictions only; DDIM ignores the variance."""

    def fn(cond_variance, uncond_variance):
        def model_fn(x, t, conditional):
            return torch.cat(
                [
                    0.5 * x if conditional else 0.25 * x,
                    torch.full_like(x, cond_variance if conditional else uncond_variance),
                ],
                1,
            )

        return model_fn

    def draw(sampler, model_fn, guidance=2.0):
        return Diffusion(DiffusionConfig(), sampler).sample(
            model_fn, (2, 3), 5, guidance, torch.Generator().manual_seed(0), learned_variance=True
        )

    assert not torch.allclose(draw("unclip", fn(-1.0, 0.0)), draw("unclip", fn(1.0, 0.0)))
    assert torch.equal(draw("unclip", fn(-1.0, 0.0)), draw("unclip", fn(-1.0, 1.0)))
    assert torch.equal(draw("ddim", fn(-1.0, 0.0)), draw("ddim", fn(1.0, 0.0)))
    scheduler = Diffusion(DiffusionConfig(clip_sample=5.0), "unclip").make_scheduler(learned_variance=True)
    assert (scheduler.config.variance_type, scheduler.config.clip_sample, scheduler.config.clip_sample_range) == (
        "learned_range",
        True,
        5.0,
    )
