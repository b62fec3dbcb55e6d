import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from seglab.data import groups as groups_module
from seglab.data.datamodule import SegmentationDataModule
from seglab.data.groups import group_samples, name_key, normalised
from seglab.data.sources import Sample, discover
from seglab.data.synthetic import generate_dataset
from seglab.data.synthetic.copies import CopySettings, make_copy
from seglab.data.synthetic.dense import render_dense


def sample(path: Path, original_name: str | None = None) -> Sample:
    return Sample(path, original_name=original_name)


def test_name_key_reads_extra_name_else_the_roboflow_file_name():
    assert normalised("IMG 1.JPG") == normalised("IMG-1_JPG") == "img_1_jpg"
    assert name_key(sample(Path("t/IMG-1_JPG.rf.0a1b2c.jpg"))) == "img_1_jpg"
    # extra.name wins over the file name, whatever the file is called
    assert name_key(sample(Path("t/renamed.jpg"), original_name="IMG 1.JPG")) == "img_1_jpg"
    assert name_key(sample(Path("t/plain_photo.jpg"))) is None


@pytest.fixture(scope="module")
def look_alikes(tmp_path_factory) -> dict[str, Path]:
    """A photo-like image (dense mode), copies of it that only a hash or only local features can tell, an
    identical file, another photo, and flat images: PNGs with plain names (no RoboFlow name to go by)."""
    folder = tmp_path_factory.mktemp("look_alikes")
    photo = render_dense(np.random.default_rng([3, 0]), 384)
    other = render_dense(np.random.default_rng([3, 1]), 384)
    h, w = photo.pixels.shape[:2]
    # Cropped by 15 %, rotated by 10 degrees and sheared by 6: every pixel moves.
    angle, shear, zoom = np.deg2rad(10), np.tan(np.deg2rad(6)), 1 / 0.85
    m = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) @ [[1, shear], [0, 1]] * zoom
    centre = np.array([w / 2, h / 2])
    geometric = CopySettings(np.hstack([m, (centre - m @ centre)[:, None]]), (h, w), 1.0, 1.0, 0.0, 0.0, False)
    images = {
        "photo.png": photo.pixels,
        "mirrored_darker.png": np.clip(photo.pixels[:, ::-1] * 0.8, 0, 255).astype(np.uint8),
        "quarter_turn_gray.png": np.repeat(np.rot90(photo.pixels).mean(axis=2, keepdims=True), 3, 2).astype(np.uint8),
        "cropped_rotated.png": make_copy(photo, np.random.default_rng(0), geometric).pixels,
        "other.png": other.pixels,
        "flat_grey.png": np.full((64, 64, 3), 90, np.uint8),
        "flat_light.png": np.full((64, 64, 3), 200, np.uint8),
    }
    paths = {}
    for name, pixels in images.items():
        Image.fromarray(pixels).save(folder / name)
        paths[name] = folder / name
    shutil.copyfile(folder / "photo.png", folder / "identical.png")
    paths["identical.png"] = folder / "identical.png"
    return paths


def groups_by_name(result, paths) -> dict[str, str]:
    return {name: result.of[path] for name, path in paths.items()}


def test_hash_groups_flips_turns_and_exposure_features_group_crops_and_rotations(look_alikes, tmp_path):
    samples = [sample(p) for p in look_alikes.values()]
    by_hash = groups_by_name(group_samples(samples, tmp_path / "c1", features=False), look_alikes)
    assert by_hash["identical.png"] == by_hash["photo.png"]  # identical bytes
    assert by_hash["mirrored_darker.png"] == by_hash["quarter_turn_gray.png"] == by_hash["photo.png"]
    assert by_hash["cropped_rotated.png"] != by_hash["photo.png"]  # every pixel moved: no hash can tell
    assert by_hash["other.png"] != by_hash["photo.png"]
    # Uniform images all hash alike: they are not grouped by look, only by identical bytes.
    assert by_hash["flat_grey.png"] != by_hash["flat_light.png"]

    result = group_samples(samples, tmp_path / "c2", features=True)
    both = groups_by_name(result, look_alikes)
    assert both["cropped_rotated.png"] == both["photo.png"] != both["other.png"]
    assert len(set(both.values())) == 4  # the photo's 5 files, the other photo, two flat images
    assert result.links["features"] >= 1 and result.links["content"] == 1


def test_features_run_only_where_names_cannot_tell(look_alikes, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(groups_module, "cached_feature_links", lambda shas, *a: calls.append(shas) or [])
    named = [sample(p, original_name=p.name) for p in look_alikes.values()]
    group_samples(named, tmp_path / "c", features="auto")
    assert calls == []
    group_samples([*named[:-1], sample(look_alikes["other.png"])], tmp_path / "c", features="auto")
    assert len(calls) == 1


def test_groups_do_not_depend_on_sample_order_and_fingerprints_are_cached(look_alikes, tmp_path, monkeypatch):
    samples = [sample(p) for p in look_alikes.values()]
    first = group_samples(samples, tmp_path / "c", features=True)
    computed = []
    real = groups_module.fingerprint
    monkeypatch.setattr(groups_module, "fingerprint", lambda *a: computed.append(a[0]) or real(*a))
    reordered = samples[::-1]
    random.Random(1).shuffle(reordered)
    again = group_samples(reordered, tmp_path / "c", features=True)
    assert again.of == first.of and computed == []  # nothing fingerprinted again
    (look_alikes["other.png"]).touch()  # a changed file is fingerprinted again, the others are not
    group_samples(samples, tmp_path / "c", features=True)
    assert computed == [look_alikes["other.png"]]


def test_roboflow_copies_group_by_name_in_both_formats(tmp_path):
    for fmt in ("coco", "masks"):
        root = generate_dataset(tmp_path / fmt, num_images=12, size=48, seed=2, copies=3, fmt=fmt)
        source = discover(root)
        samples = [s for v in source.samples.values() for s in v]
        result = group_samples(samples, tmp_path / f"cache-{fmt}", root=root, hash_distance=None, features=False)
        truth = {s.image: s.image.name.split("_jpg.rf.")[0] for s in samples}
        assert len(set(result.of.values())) == len(set(truth.values())) == 12
        for a in samples:
            for b in samples:
                assert (result.of[a.image] == result.of[b.image]) == (truth[a.image] == truth[b.image])
        assert result.links["name"] == len(samples) - 12


@pytest.mark.parametrize("fmt", ["coco", "masks"])
def test_no_split_seglab_makes_puts_a_photo_on_two_sides(fmt, tmp_path):
    # 30 photos x 3 files in train/, 4 in valid/, no test/: the test split is carved off train.
    root = generate_dataset(
        tmp_path / "export", num_images=34, size=48, seed=1, copies=3, fmt=fmt, splits=(30 / 34, 4 / 34, 0.0)
    )
    assert not (root / "test").exists()
    for resplit in (False, True):
        splits_file = tmp_path / f"splits-{resplit}.json"
        dm = SegmentationDataModule(
            root=str(root),
            image_size=32,
            num_workers=0,
            batch_size=2,
            resplit=resplit,
            cache_dir=str(tmp_path / "cache"),
            splits_file=str(splits_file),
        )
        dm.setup()
        photos = {s: {p.image.name.split("_jpg.rf.")[0] for p in dm.splits[s]} for s in ("train", "val", "test")}
        assert not photos["train"] & photos["val"] and not photos["train"] & photos["test"]
        assert not photos["val"] & photos["test"]
        assert dm.leak_counts() == {
            "val_with_copy_in_train": 0,
            "test_with_copy_in_train": 0,
            "test_with_copy_in_val": 0,
            "photos_shared_by_export_splits": 0,
        }
        sizes = [len(dm.splits[s]) for s in ("train", "val", "test")]
        if resplit:  # 94 files, 75/9/10 by photo: as close as whole photos (3 or 1 files) allow
            assert sum(sizes) == 94 and abs(sizes[0] - 75) <= 1 and abs(sizes[1] - 9) <= 1
        else:  # test: round(94 * 0.1) = 9 files = 3 photos
            assert sizes == [81, 4, 9]
        written = json.loads(splits_file.read_text())
        assert len(written["groups"]) == 30 and all(len(v) == 3 for v in written["groups"].values())
        # Split by file, as seglab did before it grouped: copies of training photos land in the test split.
        by_file = dm.make_splits(group_of=lambda s: str(s.image))[0]
        by_file_photos = {p.image.name.split("_jpg.rf.")[0] for p in by_file["test"]}
        assert len(by_file_photos & {p.image.name.split("_jpg.rf.")[0] for p in by_file["train"]}) >= 3


def test_a_photo_in_several_export_splits_is_moved_reported_or_refused(tmp_path):
    root = generate_dataset(tmp_path / "export", num_images=10, size=48, seed=3, copies=2, shared=1)
    shared = {
        folder: sorted(p.relative_to(root).as_posix() for p in root.glob(f"{folder}/img_0000_jpg.rf.*.jpg"))
        for folder in ("train", "valid", "test")
    }
    assert [len(v) for v in shared.values()] == [2, 1, 1]

    def datamodule(policy):
        return SegmentationDataModule(
            root=str(root),
            image_size=32,
            num_workers=0,
            batch_size=2,
            shared_photos=policy,
            cache_dir=str(tmp_path / "cache"),
        )

    moved = datamodule("move")
    moved.setup()
    assert sorted(moved.relative(s.image) for s in moved.splits["train"] if "img_0000_" in s.name) == sorted(
        sum(shared.values(), [])
    )
    assert not any("img_0000_" in s.name for s in moved.splits["val"] + moved.splits["test"])
    assert {k: sorted(v) for k, v in moved.shared_in_export["img_0000_jpg"].items()} == {
        "train": shared["train"],
        "val": shared["valid"],
        "test": shared["test"],
    }
    assert list(moved.shared_in_export) == ["img_0000_jpg"]
    assert moved.leak_counts()["photos_shared_by_export_splits"] == 1

    kept = datamodule("warn")
    kept.setup()
    assert kept.leak_counts() == {
        "val_with_copy_in_train": 1,
        "test_with_copy_in_train": 1,
        "test_with_copy_in_val": 1,
        "photos_shared_by_export_splits": 1,
    }
    with pytest.raises(
        Exception,
        match=r"1 photo\(s\) of .* have copies in more than one .* img_0000_jpg: "
        r"train 2, val 1, test 1.*data.shared_photos=move",
    ):
        datamodule("error").setup()
