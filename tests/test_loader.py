"""The data order: a pure function of (seed, epoch, position), rank-local row groups, exact
across resume and across world sizes."""

from __future__ import annotations

import os

import numpy as np
import pytest

from models.base import storage
from tests.support import storefactory
from training.data import StoreLoader, deal

PARTS = (20, 17, 13, 30, 9, 25, 11, 19)  # one row group each: 144 rows


def make_store(root, parts, columns=("clip_image_emb", "clip_text_emb", "image_64"), **kw):
    return storefactory.make_store(root, parts, columns=columns, **kw)


def ids(batch) -> list[int]:
    return batch["clip_image_emb"][:, 0].int().tolist()


def loaders(store, world, batch=4, seed=7, state=None):
    out = [StoreLoader(store, ["clip_image_emb"], batch, seed=seed, rank=r, world_size=world) for r in range(world)]
    for loader in out:
        if state:
            loader.load_state_dict(state)
    return out


def take(group, steps):
    return [i for _ in range(steps) for loader in group for i in ids(next(loader))]


def test_manifest_and_reading(tmp_path):
    from data_pipeline import store

    s = make_store(str(tmp_path), PARTS)
    m = s.manifest
    assert m["totals"]["rows"] == 144 and s.index.rows.tolist() == list(PARTS) and m["totals"]["parts"] == len(PARTS)
    index = store.read_index(s.url, m, ["part", "file", "sha256"])
    assert index["part"].to_pylist() == list(range(len(PARTS)))
    for file, digest in zip(index["file"].to_pylist(), index["sha256"].to_pylist(), strict=True):
        assert storage.sha256_file(storage.join(s.url, file)) == digest
    data = s.read(["key", "clip_image_emb"])
    assert data["clip_image_emb"].shape == (144, 16) and data["clip_image_emb"].dtype == np.float16
    assert m["clip_image_emb_mean"][0] == pytest.approx(71.5, rel=1e-3)
    with pytest.raises(store.StoreError, match="manifest field 'columns' lacks 'image_1024'"):
        s.require(["image_1024"])
    with pytest.raises(
        store.StoreError, match=r"manifest field 'columns.clip_image_emb.shape' is \[16\], expected \[768\]"
    ):
        s.require(["clip_image_emb"], {"columns.clip_image_emb.shape": [768]})


def test_one_epoch_visits_each_row_once_and_the_next_reshuffles(tmp_path):
    s = make_store(str(tmp_path), PARTS)
    (a,) = loaders(s, 1, batch=8)
    epoch0 = take([a], a.steps_in_epoch)
    assert a.steps_in_epoch == 18 and sorted(epoch0) == list(range(144))
    epoch1 = take([a], a.steps_in_epoch)
    assert a.epoch == 1 and sorted(epoch1) == list(range(144)) and epoch1 != epoch0
    (b,) = loaders(s, 1, batch=8)
    assert take([b], 18) == epoch0  # a pure function of (seed, epoch, position)
    (c,) = loaders(s, 1, batch=8, seed=8)
    assert take([c], 18) != epoch0


def test_ranks_read_disjoint_row_groups(tmp_path):
    s = make_store(str(tmp_path), PARTS)
    r0, r1 = loaders(s, 2)
    groups0 = {g for g, _ in r0.stream(0).tolist()}
    groups1 = {g for g, _ in r1.stream(1).tolist()}
    assert groups0.isdisjoint(groups1) and groups0 | groups1 == set(range(len(PARTS)))
    assert all(np.array_equal(r0.stream(r), r1.stream(r)) for r in (0, 1))  # every rank knows every stream
    seen0 = set(take([r0], 5))
    seen1 = set(take([r1], 5))
    assert seen0.isdisjoint(seen1)


def test_deal_balances_rows():
    owner = deal(np.array([(0, 0), (1, 0), (2, 0), (3, 5)]), np.array([10, 4, 4, 10]), 2)
    assert owner.tolist() == [0, 1, 1, 1]  # 10 rows | 4 + 4 + 5


def test_resume_continues_exactly(tmp_path):
    s = make_store(str(tmp_path), PARTS)
    expected = take(loaders(s, 2), 20)  # crosses into the second epoch
    first = loaders(s, 2)
    got = take(first, 7)
    got += take(loaders(s, 2, state=first[0].state_dict()), 13)
    assert got == expected


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2), (2, 3)])
def test_resume_on_another_world_size_neither_repeats_nor_skips(tmp_path, before, after):
    s = make_store(str(tmp_path), PARTS)
    first = loaders(s, before)
    seen = take(first, 6)
    resumed = loaders(s, after, state=first[0].state_dict())
    rest = take(resumed, resumed[0].steps_in_epoch)
    assert resumed[0].epoch == 0
    everything = seen + rest
    assert len(everything) == len(set(everything))  # nothing repeated
    # nothing skipped but the tail that cannot fill a batch on every rank at the end of the epoch
    left = [
        sum(resumed[0].sizes[g] - st for g, st in resumed[0].stream(r).tolist()) - resumed[0].steps_in_epoch * 4
        for r in range(after)
    ]
    assert len(everything) + sum(left) == 144
    assert max(left) < 4 + max(PARTS)
    assert next(resumed[0]) is not None and resumed[0].epoch == 1


def test_refuses_a_store_smaller_than_a_global_batch(tmp_path):
    s = make_store(str(tmp_path), (5,))
    with pytest.raises(ValueError, match="has 5 rows, fewer than one global batch"):
        StoreLoader(s, ["clip_image_emb"], 4, seed=0, world_size=2)


def test_state_is_refused_for_another_store(tmp_path):
    a = make_store(str(tmp_path / "a"), PARTS)
    b = make_store(str(tmp_path / "b"), PARTS[:3])
    state = loaders(a, 1)[0].state_dict()
    with pytest.raises(ValueError, match="loader state is for 144 rows"):
        loaders(b, 1, state=state)


def test_held_out_rows_never_reach_training(tmp_path):
    s = make_store(str(tmp_path), PARTS, holdout=0.2)
    heldout = set(s.read(["clip_image_emb"], split="heldout")["clip_image_emb"][:, 0].astype(int).tolist())
    train = set(s.read(["clip_image_emb"], split="train")["clip_image_emb"][:, 0].astype(int).tolist())
    assert 10 < len(heldout) < 50 and heldout.isdisjoint(train) and len(heldout | train) == 144
    (loader,) = loaders(s, 1, batch=4)
    seen = take([loader], loader.steps_in_epoch)
    assert set(seen) <= train and len(seen) >= len(train) - 4
    # the train log's count: the training rows, and the held-out ones apart (not the store's 144 as if all trained)
    assert loader.rows_line() == f"{len(train)} training rows, {len(heldout)} held-out rows"
    again = make_store(str(tmp_path / "again"), PARTS, holdout=0.2)  # the split is a function of position
    assert set(again.read(["clip_image_emb"], split="heldout")["clip_image_emb"][:, 0].astype(int).tolist()) == heldout


def test_read_with_a_limit_opens_only_the_parts_it_needs(tmp_path):
    s = make_store(str(tmp_path), PARTS, holdout=0.2)
    row_ids = lambda rows: rows["clip_image_emb"][:, 0].astype(int).tolist()  # noqa: E731
    heldout = row_ids(s.read(["clip_image_emb"], split="heldout"))
    first_part = len(row_ids(s.read(["clip_image_emb"], files=s.files[:1], split="heldout")))
    assert 0 < first_part < len(heldout)
    os.remove(s.files[-1])  # a read that opened every part would fail now
    assert row_ids(s.read(["clip_image_emb"], split="heldout", limit=first_part + 1)) == heldout[: first_part + 1]
    assert row_ids(s.read(["clip_image_emb"], split="heldout", limit=first_part)) == heldout[:first_part]
    with pytest.raises(FileNotFoundError):
        s.read(["clip_image_emb"], split="heldout")


def test_transform_runs_per_batch_with_reproducible_randomness(tmp_path):
    s = make_store(str(tmp_path), PARTS)

    def transform(batch, rng):
        return {**batch, "noise": rng.standard_normal(len(batch["clip_image_emb"])).astype(np.float32)}

    def noises(state=None, steps=6):
        loader = StoreLoader(
            s,
            ["clip_image_emb", "image_64"],
            4,
            seed=1,
            transform=lambda b, r: transform({"clip_image_emb": b["clip_image_emb"]}, r),
        )
        if state:
            loader.load_state_dict(state)
        out = [next(loader)["noise"].tolist() for _ in range(steps)]
        return out, loader.state_dict()

    straight, _ = noises(steps=6)
    first, state = noises(steps=2)
    assert first + noises(state, steps=4)[0] == straight


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="page-locked memory needs a GPU")
def test_batches_for_a_gpu_come_page_locked_in_the_same_order(tmp_path):
    s = make_store(str(tmp_path), PARTS)
    pinned = StoreLoader(s, ["clip_image_emb"], 4, seed=3, pin_memory=True)
    plain = StoreLoader(s, ["clip_image_emb"], 4, seed=3)
    for _ in range(5):
        batch = next(pinned)
        assert batch["clip_image_emb"].is_pinned()
        assert ids(batch) == ids(next(plain))
    pinned.close(), plain.close()


def test_row_groups_are_laid_out_from_the_index_without_opening_a_part(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    from data_pipeline import store
    from training import data

    s = make_store(str(tmp_path), (2500, 700), columns=("clip_image_emb",), holdout=0.1)
    footers = [pq.ParquetFile(f).metadata for f in s.files]
    assert [[m.row_group(g).num_rows for g in range(m.num_row_groups)] for m in footers] == [[1024, 1024, 452], [700]]
    heldout = [store.heldout_mask(p, n, 0.1) for p, n in ((0, 2500), (1, 700))]

    def no_opening(*args, **kwargs):
        raise AssertionError("a part was opened")

    monkeypatch.setattr(data.pq, "ParquetFile", no_opening)
    fresh = store.open_store(s.url)
    lay = data.layout(fresh)
    assert (
        lay.part.tolist() == [0, 0, 0, 1]
        and lay.group.tolist() == [0, 1, 2, 0]
        and lay.first_row.tolist() == [0, 1024, 2048, 0]
    )
    assert lay.sizes.tolist() == [
        int((~heldout[0][0:1024]).sum()),
        int((~heldout[0][1024:2048]).sum()),
        int((~heldout[0][2048:]).sum()),
        int((~heldout[1]).sum()),
    ]
    assert sum(lay.sizes) < 3200  # held-out rows left out


def test_the_saved_position_does_not_grow_with_the_store(tmp_path):
    import json

    sizes = []
    for name, parts in (("small", PARTS), ("large", PARTS * 16)):
        first = loaders(make_store(str(tmp_path / name), parts), 2)
        take(first, 3)
        state = first[0].state_dict()
        assert "fragments" not in state  # a fresh epoch's order is (seed, epoch): nothing to list
        sizes.append(len(json.dumps(state)))
    assert sizes[0] == sizes[1] - 1  # the same fields (the row count has one digit more)

    s = make_store(str(tmp_path / "resume"), PARTS)
    two = loaders(s, 2)
    take(two, 3)
    (one,) = loaders(s, 1, state=two[0].state_dict())  # re-dealt: the remainders are the position now
    assert "fragments" in one.state_dict() and len(one.state_dict()["fragments"]) <= len(PARTS)
    expected = take(loaders(s, 1, state=one.state_dict()), 4)
    assert take([one], 4) == expected
    # a position saved as an explicit list (what every state held before) resumes the same way
    fresh = loaders(s, 2)
    take(fresh, 2)
    listed = {**fresh[0].state_dict(), "fragments": fresh[0].fragments.tolist()}
    assert take(loaders(s, 2, state=listed), 3) == take(fresh, 3)


def test_inspect_reads_the_manifest_and_index_not_every_part(tmp_path):
    from data_pipeline import store

    s = make_store(str(tmp_path), PARTS)
    for file in s.files[1:]:
        os.remove(file)  # describing the store must not need them
    text = store.describe(store.open_store(s.url), 2)
    assert "144 in 8 parts (0 empty)" in text and "kept=144" in text
    assert float(next(line for line in text.splitlines() if line.startswith("clip_image_emb")).split()[-1]) > 16


def test_a_store_that_cannot_give_every_rank_a_batch_is_refused(tmp_path):
    from data_pipeline.store import StoreError

    s = make_store(str(tmp_path), (6, 6, 7))  # 19 rows: enough in all for 2 x 8, not per rank
    with pytest.raises(
        StoreError, match=r"3 row groups \(19 rows\) dealt to 2 ranks leave a rank fewer than train.batch_size=8"
    ):
        StoreLoader(s, ["clip_image_emb"], 8, seed=0, world_size=2)


def test_closing_mid_epoch_ends_the_reader_even_when_it_has_read_everything(tmp_path):
    """A run that stops before the epoch ends leaves the prefetch queue full behind a reader that
    has made its last batch: close must end that thread, not wait out a join timeout."""
    s = make_store(str(tmp_path), PARTS)
    loader = StoreLoader(s, ["clip_image_emb"], 16, seed=7, prefetch=8)  # 9 batches an epoch, 8 held ahead
    next(loader)
    _, _, thread = loader._reader
    while loader._reader[0].qsize() < 8:  # the reader made every batch of the epoch
        thread.join(timeout=0.01)
    loader.close()
    assert not thread.is_alive()
