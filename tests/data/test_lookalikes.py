"""Copies vs look-alikes: consecutive video frames are different photos that share most of their pixels. They never
empty a split, are reported, and form bounded scenes that a split by scene keeps together."""

import numpy as np
import pytest
from helpers import ready_datamodule
from PIL import Image

from seglab.data.datamodule import SegmentationDataModule
from seglab.data.groups import bounded_scenes, group_samples
from seglab.data.report import build_report
from seglab.data.report_text import format_report
from seglab.data.sources import Sample
from seglab.data.splits import fold_items
from seglab.data.synthetic import generate_dataset
from seglab.data.synthetic.dense import render_dense
from seglab.errors import SeglabError


@pytest.fixture(scope="module")
def video_root(tmp_path_factory):
    """Shaped like the real export that lost its splits: 300 frames of 3 scenes, RoboFlow's random split (240
    train frames written 3 times each, 30 valid, 30 test), RoboFlow names with extra.name."""
    return generate_dataset(
        tmp_path_factory.mktemp("video"), num_images=300, size=96, seed=0, mode="video", copies=3, extra_name=True
    )


def datamodule(root, tmp_path, **kwargs):
    return ready_datamodule(root, tmp_path / "cache", **kwargs)


def test_a_video_export_keeps_its_val_and_test_splits(video_root, tmp_path):
    own = {
        s: len(list((video_root / d).glob("*.jpg")))
        for s, d in (("train", "train"), ("val", "valid"), ("test", "test"))
    }
    assert own == {"train": 720, "val": 30, "test": 30}
    dm = datamodule(video_root, tmp_path)
    # Consecutive frames hash within a few bits of each other; they chained whole scenes into one "photo" and the
    # default moved 29 of 30 val and 26 of 30 test frames into train. They are look-alikes: nothing moves.
    assert {s: len(v) for s, v in dm.splits.items()} == own
    assert dm.groups.links["hash"] == 0 and dm.groups.links["name"] == 480  # copies: RoboFlow's names only
    assert dm.groups.links["look-alike"] > 300
    assert len(set(dm.groups.of.values())) == 300  # one group per frame
    near = dm.near_counts()
    assert near["val_near_train"] >= 27 and near["test_near_train"] >= 27  # neighbours of training frames
    assert dm.leak_counts()["test_with_copy_in_train"] == 0
    report = build_report(dm)
    assert report["lookalikes"]["used"] == near and report["lookalikes"]["export_splits"] == near
    assert report["splits"]["test"]["unseen"] == sum(dm.unseen("test")) <= 3
    text = format_report(report)
    assert f"| seglab's splits (used) | {near['val_near_train']} | {near['test_near_train']} |" in text
    example = report["lookalikes"]["examples"][0]
    assert f"- {example['split']} {example['image']} looks like train {example['train']}" in text


def test_scenes_never_chain_through_a_video(video_root, tmp_path):
    dm = datamodule(video_root, tmp_path)
    groups = dm.groups
    scenes = groups.scenes()
    # Bounded: every photo of a scene is a look-alike of its centre (the scene's name), so a scene spans a few
    # frames of the 100 in a video scene, never the stretch a chain of neighbours would reach.
    for centre, members in scenes.items():
        assert all(m == centre or m in groups.lookalikes[centre] for m in members)
    frames = [sorted(int(m.split("frame")[1][:4]) for m in members) for members in scenes.values()]
    assert max(f[-1] - f[0] for f in frames) <= 12
    assert all(m.split("_frame")[0] == c.split("_frame")[0] for c, ms in scenes.items() for m in ms)


def test_bounded_scenes_take_each_photo_to_the_nearest_centre():
    # a-b-c-d-e: each within 4 bits of the next and 8 of the one after; a and d are not look-alikes (12 bits).
    near = {}
    for x, y, bits in (
        ("a", "b", 4),
        ("b", "c", 4),
        ("c", "d", 4),
        ("d", "e", 4),
        ("a", "c", 8),
        ("b", "d", 8),
        ("c", "e", 8),
    ):
        near.setdefault(x, {})[y] = bits
        near.setdefault(y, {})[x] = bits
    assert bounded_scenes(list("edcba"), near) == {"a": "a", "b": "a", "c": "a", "d": "d", "e": "d"}
    # Unbounded (connected components), all five would be one scene.


def test_different_roboflow_names_are_never_copies_however_alike(tmp_path):
    photo = render_dense(np.random.default_rng([5, 0]), 256).pixels
    darker = np.clip(photo * 0.9, 0, 255).astype(np.uint8)  # within the copy hash distance of the photo
    for name, pixels in (
        ("frame1_jpg.rf.aa.jpg", photo),
        ("frame2_jpg.rf.bb.jpg", darker),
        ("frame1.jpg", photo[:, ::-1]),
        ("frame2.jpg", darker[:, ::-1]),
    ):
        Image.fromarray(pixels).save(tmp_path / name)
    named = [Sample(tmp_path / n) for n in ("frame1_jpg.rf.aa.jpg", "frame2_jpg.rf.bb.jpg")]
    result = group_samples(named, tmp_path / "c1", features=False)
    assert result.of[named[0].image] != result.of[named[1].image]  # two uploads: two photos ...
    assert result.lookalikes[result.of[named[0].image]] == {result.of[named[1].image]}  # ... that look alike
    assert result.scene_of[named[0].image] == result.scene_of[named[1].image]
    # Without RoboFlow names only the look can tell: the same pair is one photo (a copy by hash).
    plain = [Sample(tmp_path / n) for n in ("frame1.jpg", "frame2.jpg")]
    result = group_samples(plain, tmp_path / "c2", features=False)
    assert result.of[plain[0].image] == result.of[plain[1].image] and result.links["hash"] == 1


def test_moving_copies_never_silently_halves_a_split(demo_root, tmp_path):
    # RoboFlow's own split shares 3 training photos with valid/ (2 photos of its own) and test/: moving their
    # copies into train would leave valid and test with 2 of 5 images.
    root = generate_dataset(tmp_path / "shared", num_images=20, size=64, seed=0, shared=3)
    with pytest.raises(SeglabError) as info:
        datamodule(root, tmp_path)
    message = str(info.value)
    assert "data.shared_photos=move would leave the val split" in message and "with 2 of its 5 images" in message
    assert "data.shared_photos=warn" in message and "data.resplit=true" in message and "\n" not in message
    kept = datamodule(root, tmp_path, shared_photos="warn")
    assert len(kept.splits["val"]) == 5 and kept.leak_counts()["val_with_copy_in_train"] == 3
    moved = datamodule(generate_dataset(tmp_path / "one", num_images=20, size=64, seed=0, shared=1), tmp_path)
    assert [len(moved.splits[s]) for s in ("val", "test")] == [2, 2]  # 1 of 3 moved: allowed, and logged


def test_a_split_by_scene_holds_out_unseen_frames(video_root, tmp_path):
    by_photo = datamodule(video_root, tmp_path, resplit=True)
    by_scene = datamodule(video_root, tmp_path, resplit=True, split_by="scene")
    # By photo, every pooled test frame has a neighbour in train; by scene, the test split is stretches of video.
    assert sum(by_photo.unseen("test")) <= 0.1 * len(by_photo.splits["test"])
    assert sum(by_scene.unseen("test")) >= 0.8 * len(by_scene.splits["test"])
    scene_of = by_scene.groups.scene_of
    for a, b in (("train", "test"), ("train", "val"), ("val", "test")):
        assert not {scene_of[s.image] for s in by_scene.splits[a]} & {scene_of[s.image] for s in by_scene.splits[b]}
    assert 0.7 <= len(by_scene.splits["train"]) / 780 <= 0.9


def test_folds_partition_the_export_by_group(video_root, tmp_path):
    folds = [datamodule(video_root, tmp_path, cv_folds=5, cv_fold=i, split_by="scene") for i in range(5)]
    tests = [{s.image for s in dm.splits["test"]} for dm in folds]
    assert sum(map(len, tests)) == 780 and len(set().union(*tests)) == 780  # every image held out once
    assert all(abs(len(t) - 156) <= 12 for t in tests)
    for dm in folds:
        train = {dm.groups.scene_of[s.image] for s in dm.splits["train"]}
        assert not train & {dm.groups.scene_of[s.image] for s in dm.splits["test"]}
        assert not train & {dm.groups.scene_of[s.image] for s in dm.splits["val"]}
    with pytest.raises(SeglabError, match=r"cv.fold=5 must be one of 0..4"):
        SegmentationDataModule(root=str(video_root), cv_folds=5, cv_fold=5)


def test_fold_items_are_even_and_keep_groups_whole():
    items = [f"{g}-{i}" for g in "abcdefghij" for i in range(1 + "abcdefghij".index(g) % 3)]
    folds = fold_items(items, 3, seed=0, group_of=lambda x: x[0])
    assert sorted(x for f in folds for x in f) == sorted(items)
    assert all(len({x[0] for x in f} & {x[0] for x in g}) == 0 for f in folds for g in folds if f is not g)
    assert max(map(len, folds)) - min(map(len, folds)) <= 3  # within the largest group
    assert fold_items(list(reversed(items)), 3, seed=0, group_of=lambda x: x[0]) == folds  # seeded, order-blind
