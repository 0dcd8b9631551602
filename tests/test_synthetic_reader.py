"""The reader that scores prompt following must itself read generated images right."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image, ImageFilter

from data_pipeline import synthetic
from data_pipeline.synthetic_reader import read


def accuracy(side: int, blur: float = 0.0, noise: float = 0.0, count: int = 150) -> dict[str, float]:
    rng, noise_rng = random.Random(side), np.random.default_rng(side)
    hits = {"shape": 0, "color": 0, "background": 0}
    position_error = []
    for _ in range(count):
        truth = synthetic.sample_attributes(rng)
        image = synthetic.draw(truth, 256).resize((side, side), Image.BICUBIC)
        if blur:
            image = image.filter(ImageFilter.GaussianBlur(blur))
        if noise:
            noisy = np.asarray(image, np.float32) + noise_rng.normal(0, noise, (side, side, 3))
            image = Image.fromarray(noisy.clip(0, 255).astype(np.uint8))
        reading = read(image)
        for key, hit in reading.matches(truth).items():
            hits[key] += hit
        position_error.append(
            max(abs(reading.cx - truth.cx), abs(reading.cy - truth.cy), abs(reading.size - truth.size))
        )
    return {**{k: v / count for k, v in hits.items()}, "position_error": float(np.mean(position_error))}


@pytest.mark.parametrize("side", [256, 64])
def test_reads_every_attribute_of_generated_images(side):
    result = accuracy(side)
    assert result["shape"] == result["color"] == result["background"] == 1.0, result
    assert result["position_error"] < 0.02, result


def test_reads_blurred_noisy_small_images_as_a_sampler_makes_them():
    result = accuracy(64, blur=1.0, noise=12.0)
    assert min(result["shape"], result["color"], result["background"]) >= 0.97, result


def test_each_kind_is_told_apart():
    for kind in synthetic.SHAPES:
        for color, background in (("red", "blue"), ("white", "black"), ("yellow", "green")):
            truth = synthetic.ShapeAttributes(kind, color, background, cx=0.5, cy=0.45, size=0.28)
            assert read(synthetic.draw(truth, 64)).matches(truth) == {"shape": True, "color": True, "background": True}


def test_an_empty_or_speckled_picture_shows_no_shape():
    plain = Image.new("RGB", (64, 64), synthetic.COLORS["green"])
    assert read(plain).shape is None and read(plain).background == "green"
    speck = plain.copy()
    speck.putpixel((30, 30), synthetic.COLORS["red"])
    assert read(speck).shape is None


def test_prompt_following_scores_each_attribute_against_its_caption():
    from data_pipeline.synthetic_reader import prompt_following

    red_circle = synthetic.ShapeAttributes("circle", "red", "blue", 0.5, 0.5, 0.3)
    pictures = [synthetic.draw(red_circle, 64)] * 4
    captions = [
        "a red circle on a blue background",  # all three right
        "a red square on a blue background",  # shape wrong
        "a green circle on a blue background",  # colour wrong
        "a red circle on a white background",
    ]  # background wrong
    scores, readings = prompt_following(pictures, captions)
    assert scores == {"shape": 0.75, "color": 0.75, "background": 0.75}
    assert [r.shape for r in readings] == ["circle"] * 4
    assert prompt_following(pictures, captions[:3] + ["a photo of a dog"]) is None  # no truth to score against
