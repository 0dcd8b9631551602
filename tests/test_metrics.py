"""Evaluation metrics on inputs with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.chains import slerp
from models.metrics import frechet_distance, frechet_from_stats, guidance_gain, mean_cosine


def test_frechet_closed_forms():
    mu = np.array([1.0, -2.0, 0.5])
    assert frechet_from_stats(mu, np.eye(3), mu, np.eye(3)) == pytest.approx(0.0, abs=1e-9)
    assert frechet_from_stats(np.zeros(3), np.eye(3), mu, np.eye(3)) == pytest.approx(float((mu**2).sum()))
    # diagonal covariances: sum of (sigma1 - sigma2)^2 over the standard deviations
    s1, s2 = np.diag([1.0, 4.0, 9.0]), np.diag([4.0, 4.0, 1.0])
    assert frechet_from_stats(np.zeros(3), s1, np.zeros(3), s2) == pytest.approx((1 - 2) ** 2 + 0 + (3 - 1) ** 2)


def test_frechet_of_samples():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((20000, 4)), rng.standard_normal((20000, 4))
    assert frechet_distance(a, b) == pytest.approx(0.0, abs=0.01)
    assert frechet_distance(a, b + 3.0) == pytest.approx(36.0, rel=0.01)


def test_mean_cosine():
    a = np.array([[1.0, 0.0], [0.0, 2.0]])
    assert mean_cosine(a, a * 5) == pytest.approx(1.0)
    assert mean_cosine(a, np.array([[0.0, 1.0], [0.0, -1.0]])) == pytest.approx(-0.5)


def test_slerp_follows_the_great_circle():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    assert torch.allclose(slerp(a, b, 0.0), a, atol=1e-6) and torch.allclose(slerp(a, b, 1.0), b, atol=1e-6)
    mid = slerp(a, b, 0.5)
    assert torch.allclose(mid / mid.norm(), torch.tensor([2**-0.5, 2**-0.5]), atol=1e-6)
    assert mid.norm().item() == pytest.approx(1.5)


def test_guidance_beats_unguided_only_when_following_and_clip_score_both_rise():
    def scores(shape, color, background, clip_score, distance):
        return {
            "prompt_following": {"shape": shape, "color": color, "background": background},
            "clip_score": clip_score,
            "frechet_distance_clip": distance,
        }

    off = scores(0.8, 0.9, 1.0, 0.80, 30.0)
    gain = guidance_gain(off, scores(0.9, 0.9, 1.0, 0.85, 33.0))  # the distance may rise
    assert gain["beats_unguided"] and gain["prompt_following_mean"] == pytest.approx([0.9, 2.8 / 3])
    assert gain["clip_score"] == [0.80, 0.85] and gain["frechet_distance_clip"] == [30.0, 33.0]
    assert not guidance_gain(off, scores(0.8, 0.9, 1.0, 0.85, 20.0))["beats_unguided"]  # following only level
    assert not guidance_gain(off, scores(1.0, 1.0, 1.0, 0.79, 20.0))["beats_unguided"]  # CLIP score fell


def test_reference_embeddings_are_training_rows_spread_over_the_store(tmp_path):
    from data_pipeline.store import StoreError
    from launch.evaluate import reference_embeddings
    from tests.support.storefactory import make_store

    store = make_store(str(tmp_path / "store"), rows_per_part=(10,) * 12, holdout=0.2)
    row_id = lambda embeddings: embeddings[:, 0].astype(int)  # noqa: E731 - the factory writes the row number there
    heldout = set(row_id(store.read(["clip_image_emb"], split="heldout")["clip_image_emb"]))
    assert heldout  # the test means something only if some rows are held out

    reference = reference_embeddings(store, 30)
    ids = row_id(reference)
    assert len(ids) == 30 and len(set(ids)) == 30 and not heldout & set(ids)
    # ~8 training rows a part: every third part first (0, 3, 6, 9 hold 29 here), then part 1
    assert set(ids // 10) == {0, 3, 6, 9, 1}
    # asking for more than the store has: every training row
    everything = row_id(store.read(["clip_image_emb"], split="train")["clip_image_emb"])
    assert sorted(row_id(reference_embeddings(store, 1000))) == sorted(everything)

    with pytest.raises(
        StoreError, match="training rows to measure the Fréchet distance against.*eval.reference_rows=0"
    ):
        reference_embeddings(make_store(str(tmp_path / "all-held-out"), rows_per_part=(5,), holdout=1.0), 10)
