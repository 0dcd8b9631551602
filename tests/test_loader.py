"""The data order: a pure function of (seed, epoch, position), exact across resume and world sizes."""

from __future__ import annotations

import numpy as np
import pytest

from data_pipeline import store
from training.data import StoreLoader

SPECS = {"clip_image_emb": {"dtype": "float16", "shape": [4]}, "text_mask": {"dtype": "bool", "shape": [3]}}


def make_store(root: str, rows_per_part=(20, 17, 13)) -> store.Store:
    """A small store written through the store contract (parts, sidecars, manifest)."""
    parts, index = {}, 0
    for shard_id, n in enumerate(rows_per_part):
        ids = np.arange(index, index + n)
        index += n
        rows = {
            "key": [f"k{i:04d}" for i in ids], "caption": [f"c{i}" for i in ids], "url": [f"u{i}" for i in ids],
            "width": [8] * n, "height": [8] * n, "clip_score": np.zeros(n, np.float32),
            "clip_image_emb": np.repeat(ids[:, None], 4, 1).astype(np.float16),
            "text_mask": np.ones((n, 3), bool),
        }  # fmt: skip
        parts[shard_id] = store.write_part(root, shard_id, store.to_arrow(rows, SPECS))
    identity = {"clip": {"embed_dim": 4}, "vae": None}
    store.build_manifest(root, parts, identity, SPECS, {"kept": index}, {"note": "test"})
    return store.open_store(root)


def sample_ids(batch) -> list[int]:
    return batch["clip_image_emb"][:, 0].int().tolist()


def test_manifest_and_reading(tmp_path):
    s = make_store(str(tmp_path))
    m = s.manifest
    assert m["totals"]["rows"] == 50
    assert [p["rows"] for p in m["shards"]] == [20, 17, 13]
    assert all(len(p["sha256"]) == 64 for p in m["shards"])
    assert m["clip_image_emb_mean"] == pytest.approx([24.5] * 4)
    assert m["clip_image_emb_std"] == pytest.approx([np.arange(50).std()] * 4, rel=1e-6)
    data = s.read(["key", "clip_image_emb"])
    assert data["clip_image_emb"].shape == (50, 4) and data["clip_image_emb"].dtype == np.float16
    with pytest.raises(store.StoreError, match="manifest field 'columns' lacks 'vae_latent'"):
        s.require(["vae_latent"])
    with pytest.raises(store.StoreError, match=r"manifest field 'columns.clip_image_emb.shape' is \[4\], expected \[768\]"):
        s.require(["clip_image_emb"], {"columns.clip_image_emb.shape": [768]})


def test_order_is_deterministic_and_reshuffled_per_epoch(tmp_path):
    s = make_store(str(tmp_path))
    a = StoreLoader(s, ["clip_image_emb"], 10, seed=3)
    b = StoreLoader(s, ["clip_image_emb"], 10, seed=3)
    first = [sample_ids(next(a)) for _ in range(10)]
    assert first == [sample_ids(next(b)) for _ in range(10)]
    epoch0 = sum(first[:5], [])
    assert sorted(epoch0) == list(range(50))  # 5 batches of 10 = one epoch, each sample once
    assert sum(first[5:], []) != epoch0
    other_seed = StoreLoader(s, ["clip_image_emb"], 10, seed=4)
    assert sum([sample_ids(next(other_seed)) for _ in range(5)], []) != epoch0


def test_resume_continues_exactly(tmp_path):
    s = make_store(str(tmp_path))
    straight = StoreLoader(s, ["clip_image_emb"], 8, seed=0)
    expected = [sample_ids(next(straight)) for _ in range(12)]
    first = StoreLoader(s, ["clip_image_emb"], 8, seed=0)
    got = [sample_ids(next(first)) for _ in range(5)]
    resumed = StoreLoader(s, ["clip_image_emb"], 8, seed=0)
    resumed.load_state_dict(first.state_dict())
    got += [sample_ids(next(resumed)) for _ in range(7)]
    assert got == expected


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_resume_on_another_world_size_neither_repeats_nor_skips(tmp_path, before, after):
    s = make_store(str(tmp_path))
    batch = 4  # per rank; global batch is batch * world size

    def take(world, state, steps):
        loaders = [StoreLoader(s, ["clip_image_emb"], batch, seed=7, rank=r, world_size=world) for r in range(world)]
        for loader in loaders:
            if state:
                loader.load_state_dict(state)
        seen = [i for _ in range(steps) for loader in loaders for i in sample_ids(next(loader))]
        return seen, loaders[0].state_dict()

    seen, state = take(before, None, 4)
    rest = (48 - len(seen)) // (batch * after)
    more, state = take(after, state, rest)
    # one epoch of 50 rows, 48 of them reachable with these global batches: each exactly once
    assert len(seen + more) == len(set(seen + more)) == 48
    assert state["epoch"] == 0


def test_refuses_a_store_smaller_than_a_global_batch(tmp_path):
    s = make_store(str(tmp_path), rows_per_part=(5,))
    with pytest.raises(ValueError, match="has 5 rows, fewer than one global batch"):
        StoreLoader(s, ["clip_image_emb"], 4, seed=0, world_size=2)
