"""`unclip encoders fit` at small size, and every quality figure's computation on known inputs."""

from __future__ import annotations

import functools
import itertools

import numpy as np
import pytest
import torch

from data_pipeline import encoder_fit, synthetic
from data_pipeline.config import SyntheticConfig
from data_pipeline.sources import open_source
from data_pipeline.synthetic_quality import canonical_caption
from models import encoders
from models.config import ClipConfig, EncoderFitConfig, EncodersConfig, TinyEncodersConfig, VaeConfig
from models.metrics import psnr, top1


def test_psnr_of_known_images():
    a = np.zeros((2, 3, 8, 8))
    assert psnr(a, a) == float("inf")
    assert psnr(a, a + 0.1) == pytest.approx(20.0)
    assert psnr(a, a + 0.01) == pytest.approx(40.0)


def test_top1_of_known_embeddings():
    images = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    candidates = np.array([[[2.0, 0.1], [0.0, 1.0]], [[1.0, 0.0], [0.0, 3.0]], [[1.0, 0.0], [0.9, 1.0]]])
    assert top1(images, candidates, np.array([0, 1, 0])) == pytest.approx(2 / 3)  # the third picks its candidate 1


def test_every_caption_template_is_read_back_and_neighbours_differ_in_one_attribute():
    rng = __import__("random").Random(0)
    for _ in range(50):
        truth = synthetic.sample_attributes(rng)
        for template in synthetic.CAPTION_TEMPLATES:
            text = template.format(shape=truth.shape, color=truth.color, background=truth.background)
            assert synthetic.attributes_from_caption(text) == (truth.shape, truth.color, truth.background)
        near = synthetic.one_attribute_away(truth.shape, truth.color, truth.background)
        assert len(near) == len(set(near)) == 2 + 4 + 4
        assert all(
            sum(x != y for x, y in zip(n, (truth.shape, truth.color, truth.background), strict=True)) == 1 for n in near
        )
        assert all(color != background for _, color, background in near)
    assert synthetic.attributes_from_caption("a broken entry (missing)") is None
    assert canonical_caption("circle", "red", "blue") == "a red circle on a blue background"


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fit")
    records = [
        r for r in synthetic.generate(str(folder / "site"), SyntheticConfig(count=48, image_size=64, broken=False))
    ]
    synthetic.write_shards(records, str(folder / "site"), str(folder / "shards"), 16)
    cfg = EncodersConfig(
        clip=ClipConfig(model=f"local-dir:{folder}/clip"),
        vae=VaeConfig(path=str(folder / "vae")),
        tiny=TinyEncodersConfig(vae_channels=[16, 32]),
        fit=EncoderFitConfig(
            clip_steps=40, vae_steps=25, clip_batch_size=16, vae_batch_size=8, vae_resolution=32, holdout_fraction=0.25
        ),
    )
    source = open_source(str(folder / "shards"), "", "auto", None, None)
    pairs = encoder_fit.load_pairs(source, 64)
    train, held = encoder_fit.split(pairs, cfg.fit.holdout_fraction)
    encoders.write_tiny_encoders(cfg)
    clip, clip_report = encoder_fit.fit_clip(cfg, train, log=lambda _: None)
    vae, vae_report = encoder_fit.fit_vae(cfg, train, log=lambda _: None)
    return cfg, pairs, train, held, clip, clip_report, vae, vae_report


def test_pairs_and_split_come_from_the_source(fitted):
    _, pairs, train, held, *_ = fitted
    assert pairs[0].shape == (48, 64, 64, 3) and len(pairs[1]) == 48
    assert len(train[1]) + len(held[1]) == 48 and held[1] and train[1]
    assert not set(map(bytes, map(np.ndarray.tobytes, held[0]))) & set(map(bytes, map(np.ndarray.tobytes, train[0])))
    # a pure function of content: the same split again
    again = encoder_fit.split(pairs, 0.25)
    assert again[1][1] == held[1]


def test_both_losses_fall(fitted):
    *_, clip_report, _, vae_report = fitted
    assert clip_report["last_loss"] < 0.8 * clip_report["first_loss"], clip_report
    assert vae_report["last_loss"] < 0.8 * vae_report["first_loss"], vae_report


def test_saved_weights_load_back_through_the_public_path_with_identical_outputs(fitted):
    cfg, pairs, *_ = fitted
    clip, vae = fitted[4], fitted[6]
    frozen = encoders.FrozenClip(cfg.clip)
    pictures = torch.rand(3, 3, 64, 64)
    normalized = (pictures - frozen._mean) / frozen._std
    with torch.no_grad():
        assert torch.equal(frozen.encode_images(pictures), clip.encode_image(normalized))
        tokens = frozen.tokenizer(["a red circle on a blue background"])
        assert torch.equal(frozen.encode_text(["a red circle on a blue background"])["emb"], clip.encode_text(tokens))
    frozen_vae = encoders.FrozenVae(cfg.vae)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(frozen_vae.encode(x), vae.encode(x).latent_dist.mean)
    assert encoders.vae_identity(cfg.vae)["downsample"] == 2


def captions_like_the_web(count: int, seed: int = 0) -> list[str]:
    """Short and long captions over a skewed vocabulary, with what makes hard negatives: exact
    repeats, copies a word or a few away, and a share in the embedded default's grammar."""
    rng = __import__("random").Random(seed)
    vocabulary = [f"w{i}" for i in range(3000)]
    weights = list(itertools.accumulate(1 / (rank + 3) for rank in range(len(vocabulary))))
    captions: list[str] = []
    for i in range(count):
        kind = rng.random()
        if kind < 0.1 and captions:
            captions.append(rng.choice(captions))
        elif kind < 0.3 and captions:
            words = rng.choice(captions).split()
            for _ in range(rng.randint(1, 3)):
                at = rng.randrange(len(words) + 1)
                if rng.random() < 0.5 and at < len(words):
                    words[at] = rng.choices(vocabulary, cum_weights=weights)[0]
                elif rng.random() < 0.5 or len(words) < 2:
                    words.insert(at, rng.choices(vocabulary, cum_weights=weights)[0])
                else:
                    del words[min(at, len(words) - 1)]
            captions.append(" ".join(words))
        elif kind < 0.45:
            truth = synthetic.sample_attributes(rng)
            template = synthetic.CAPTION_TEMPLATES[i % len(synthetic.CAPTION_TEMPLATES)]
            captions.append(template.format(shape=truth.shape, color=truth.color, background=truth.background))
        else:
            captions.append(" ".join(rng.choices(vocabulary, cum_weights=weights, k=rng.randint(1, 20))))
    return captions


@functools.cache
def every_distance() -> tuple[list[str], np.ndarray]:
    """A small set's word edits between every pair: what the mining means, found the slow way."""
    captions = captions_like_the_web(240, seed=1)
    words = [c.lower().replace(",", " ").split() for c in captions]
    distance = np.zeros((len(words), len(words)), int)
    for i, j in itertools.combinations(range(len(words)), 2):
        distance[i, j] = distance[j, i] = encoder_fit._word_edits(words[i], words[j])
    return captions, distance


@pytest.mark.parametrize("max_edits", [1, 2, 3])
def test_mining_finds_what_comparing_every_pair_finds(max_edits):
    captions, distance = every_distance()
    truth = [np.flatnonzero((row > 0) & (row <= max_edits)).tolist() for row in distance]
    assert sum(map(len, truth)) > 150 and max(map(len, truth)) > 8  # neighbours to find, and more than 8 for some
    unbounded = encoder_fit.caption_neighbours(captions, max_edits, per_caption=10**9, crowd=10**9)
    assert unbounded == truth
    mined = encoder_fit.caption_neighbours(captions, max_edits, per_caption=8)
    assert all(set(m) <= set(t) and len(m) == min(len(t), 8) for m, t in zip(mined, truth, strict=True))
    assert mined == encoder_fit.caption_neighbours(captions, max_edits, per_caption=8)  # seeded
    assert encoder_fit.caption_neighbours([]) == [] and encoder_fit.caption_neighbours(["a", "b", "a"]) == [
        [1],
        [0, 2],
        [1],
    ]


def test_mining_compares_no_more_per_caption_at_eight_times_the_captions(monkeypatch):
    """Comparisons, counted (not timed): comparing every pair makes 8x as many per caption at 8x
    the captions, n log n 1.3x; this set reads about 1.5x (its copies of copies grow denser), and
    anything growing as n^1.33 or faster fails."""
    calls = [0]
    compare = encoder_fit._word_edits

    def counted(a, b):
        calls[0] += 1
        return compare(a, b)

    monkeypatch.setattr(encoder_fit, "_word_edits", counted)
    per_caption = {}
    for count in (1000, 8000):
        calls[0] = 0
        neighbours = encoder_fit.caption_neighbours(captions_like_the_web(count))
        assert sum(1 for n in neighbours if n) > count // 4
        per_caption[count] = calls[0] / count
    assert per_caption[8000] < 2 * per_caption[1000], per_caption
