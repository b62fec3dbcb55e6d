import json
import shutil

import numpy as np
import pytest
import torch
from helpers import masks_by_name
from pytorch_lightning.trainer.connectors.data_connector import _get_distributed_sampler
from pytorch_lightning.trainer.states import RunningStage
from torch.utils.data import RandomSampler, SequentialSampler

import seglab.data.datamodule as datamodule_module
from seglab.data import masks
from seglab.data.datamodule import SegmentationDataModule
from seglab.data.synthetic import ANNOTATION_FILE
from seglab.errors import SeglabError


def make_datamodule(root, tmp_path, **kwargs):
    kwargs = {"image_size": 32, "num_workers": 0, "batch_size": 2, "cache_dir": str(tmp_path / "cache"), **kwargs}
    return SegmentationDataModule(root=str(root), **kwargs)


def set_up(dm):
    dm.setup()
    return dm


def names(samples):
    return [s.image.name for s in samples]


def folder_names(root, folder):
    return sorted(p.name for p in (root / folder).glob("*.jpg"))


def test_setup_is_idempotent(demo_root, tmp_path, monkeypatch):
    calls = []
    real = datamodule_module.split_items
    monkeypatch.setattr(datamodule_module, "split_items", lambda *a, **k: calls.append(1) or real(*a, **k))
    dm = make_datamodule(demo_root, tmp_path, resplit=True)
    dm.setup("fit")
    splits, datasets = dm.splits, dm.datasets
    dm.setup("test")
    assert len(calls) == 1
    assert dm.splits is splits and dm.datasets is datasets
    assert {k: len(v) for k, v in dm.splits.items()} == {"train": 16, "val": 2, "test": 2}


def test_exposes_classes_palette_and_ignore_index(demo_root, tmp_path):
    dm = make_datamodule(demo_root, tmp_path, ignore_index=250)
    assert dm.class_names == ["background", "disc", "triangle"]
    assert dm.num_classes == 3
    assert dm.palette[0] == (0, 0, 0)
    assert len(dm.palette) == 3 and len(set(dm.palette)) == 3
    assert dm.ignore_index == 250


def test_roboflow_coco_keeps_the_exports_own_splits(demo_root, tmp_path):
    dm = make_datamodule(demo_root, tmp_path)
    dm.setup()
    assert dm.source.layout == "roboflow_coco"
    assert sorted(names(dm.splits["train"])) == folder_names(demo_root, "train")
    assert sorted(names(dm.splits["val"])) == folder_names(demo_root, "valid")
    assert sorted(names(dm.splits["test"])) == folder_names(demo_root, "test")


def test_loaders_batch_shapes_shuffle_and_drop_last(demo_root, tmp_path):
    dm = make_datamodule(demo_root, tmp_path, batch_size=3)
    dm.setup()
    train, val = dm.train_dataloader(), dm.val_dataloader()
    assert train.drop_last is True and isinstance(train.sampler, RandomSampler)
    assert val.drop_last is False and isinstance(val.sampler, SequentialSampler)
    assert len(train) == 5  # 16 train images // 3, the ragged last batch dropped
    assert len(val) == 1  # 2 val images, kept
    images, targets = next(iter(train))
    assert images.shape == (3, 3, 32, 32) and images.dtype == torch.float32
    assert targets.shape == (3, 32, 32) and targets.dtype == torch.uint8
    assert set(torch.unique(targets).tolist()) <= {0, 1, 2}


def test_a_train_split_smaller_than_a_batch_is_one_batch(demo_root, tmp_path, caplog):
    dm = make_datamodule(demo_root, tmp_path, batch_size=17)
    dm.setup()
    with caplog.at_level("WARNING"):
        loader = dm.train_dataloader()
    assert "16 image(s), fewer than batch_size=17: training on batches of 16" in caplog.text
    assert loader.batch_size == 16 and len(loader) == 1
    dm.datasets["train"].items = dm.datasets["train"].items[:1]
    with pytest.raises(SeglabError, match=r"train split has 1 image\(s\); training needs 2 or more"):
        dm.train_dataloader()


def test_a_small_train_split_is_passed_over_again_to_fill_min_epoch_samples(demo_root, tmp_path):
    dm = make_datamodule(demo_root, tmp_path, batch_size=8, min_epoch_samples=40)
    dm.setup()
    loader = dm.train_dataloader()
    assert loader.batch_size == 8 and len(loader) == 5  # 40 samples // 8, not 16 // 8 = 2 batches
    torch.manual_seed(0)
    drawn = list(loader.sampler)
    # two whole permutations of the 16 images, then 8 of a third: every image 2 or 3 times, none 4 times
    assert len(drawn) == 40
    assert sorted(drawn[:16]) == sorted(drawn[16:32]) == list(range(16))
    assert len(set(drawn[32:])) == 8
    # Under DDP Lightning splits what the sampler draws between the processes: 20 of the 40 each, not 8 of one pass
    # (its own code, as the trainer calls it for a training loader on 2 processes)
    shared = _get_distributed_sampler(
        loader, shuffle=True, overfit_batches=0, mode=RunningStage.TRAINING, num_replicas=2, rank=0
    )
    assert len(shared) == 20 and set(shared) <= set(range(16))
    # fewer images than a batch: the batch is full (crops of the same images), not the split's size
    dm.datasets["train"].items = dm.datasets["train"].items[:3]
    small = dm.train_dataloader()
    assert small.batch_size == 8 and len(small) == 5
    # a split as large as the floor is one plain pass, shuffled
    dm = make_datamodule(demo_root, tmp_path, batch_size=8, min_epoch_samples=16)
    dm.setup()
    assert len(dm.train_dataloader()) == 2 and len(dm.val_dataloader().sampler) == 2
    for wrong in (-1, 2.5, True, None):
        with pytest.raises(SeglabError, match=r"data.min_epoch_samples=.* must be a whole number >= 0"):
            make_datamodule(demo_root, tmp_path, min_epoch_samples=wrong)


def test_missing_test_folder_is_carved_from_train(demo_root, tmp_path):
    root = tmp_path / "export"
    shutil.copytree(demo_root, root, ignore=shutil.ignore_patterns("test"))
    dm = make_datamodule(root, tmp_path)
    dm.setup()
    train, val, test = (names(dm.splits[s]) for s in ("train", "val", "test"))
    # total = 16 train + 2 valid = 18; round(18 * 0.1) = 2 test images, taken out of train.
    assert (len(train), len(val), len(test)) == (14, 2, 2)
    assert sorted(val) == folder_names(root, "valid")
    assert sorted(train + test) == folder_names(root, "train")
    assert not set(train) & set(test)
    assert [len(d) for d in dm.datasets.values()] == [14, 2, 2]


def test_missing_val_and_test_folders_are_carved_from_train(demo_root, tmp_path):
    root = tmp_path / "export"
    shutil.copytree(demo_root / "train", root / "train")
    dm = make_datamodule(root, tmp_path)
    dm.setup()
    train, val, test = (set(names(dm.splits[s])) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (12, 2, 2)  # round(16 * 0.1) = 2 each
    assert train | val | test == set(folder_names(root, "train"))
    assert not train & val and not train & test and not val & test


def test_splits_file_lists_paths_relative_to_root(demo_root, tmp_path):
    splits_file = tmp_path / "run" / "splits.json"
    dm = make_datamodule(demo_root, tmp_path, resplit=True, splits_file=str(splits_file))
    dm.setup()
    written = json.loads(splits_file.read_text())
    assert list(written) == ["train", "val", "test", "split_by", "cv", "groups", "scenes", "shared_in_export", "unseen"]
    splits = {k: written[k] for k in ("train", "val", "test")}
    assert splits == {k: [f"{s.image.parent.name}/{s.image.name}" for s in v] for k, v in dm.splits.items()}
    assert sum(len(v) for v in splits.values()) == 20
    assert all(name.split("/")[0] in ("train", "valid", "test") for v in splits.values() for name in v)
    assert written["groups"] == {} and written["shared_in_export"] == {}  # 20 distinct photos
    assert written["scenes"] == {} and written["split_by"] == "photo" and written["cv"] == {"folds": None, "fold": None}
    assert written["unseen"] == {s: splits[s] for s in ("val", "test")}  # no look-alikes: every image unseen


@pytest.fixture
def rasterize_calls(monkeypatch):
    calls = []
    real = masks.rasterize_annotations

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(masks, "rasterize_annotations", spy)
    return calls


def test_mask_cache_is_reused_and_rebuilt_when_annotations_change(demo_root, tmp_path, rasterize_calls):
    root = tmp_path / "export"
    shutil.copytree(demo_root, root)

    def load_masks():
        dm = SegmentationDataModule(root=str(root), image_size=32, num_workers=0, batch_size=2)
        dm.setup()  # default cache_dir: <root>/.seglab_cache
        return masks_by_name(dm)

    before = load_masks()
    assert len(rasterize_calls) == 20
    rasterize_calls.clear()
    assert {k: v.tolist() for k, v in load_masks().items()} == {k: v.tolist() for k, v in before.items()}
    assert rasterize_calls == []

    # Relabel the only object of one test image from triangle (2) to disc (1).
    path = root / "test" / ANNOTATION_FILE
    coco = json.loads(path.read_text())
    ann = coco["annotations"][0]
    assert ann["category_id"] == 2
    assert [a["image_id"] for a in coco["annotations"]].count(ann["image_id"]) == 1
    ann["category_id"] = 1
    path.write_text(json.dumps(coco))
    name = next(im["file_name"] for im in coco["images"] if im["id"] == ann["image_id"])

    after = load_masks()
    assert len(rasterize_calls) == 2  # only the edited file's two images
    assert (before[name] == 2).sum() > 0
    np.testing.assert_array_equal(after[name], np.where(before[name] == 2, 1, before[name]))
    assert all(np.array_equal(after[k], before[k]) for k in before if k != name)


def test_mask_cache_is_keyed_by_overlap_policy(demo_root, tmp_path, rasterize_calls):
    smaller_on_top = masks_by_name(set_up(make_datamodule(demo_root, tmp_path)))
    rasterize_calls.clear()
    ignore = masks_by_name(set_up(make_datamodule(demo_root, tmp_path, overlap="ignore")))
    assert len(rasterize_calls) == 20
    # Train image 1 is a fixed case with two overlapping objects.
    overlapping = next(k for k in ignore if k.startswith("img_0001_"))
    assert (ignore[overlapping] == 255).sum() > 0
    assert (smaller_on_top[overlapping] == 255).sum() == 0
    keep = ignore[overlapping] != 255
    np.testing.assert_array_equal(ignore[overlapping][keep], smaller_on_top[overlapping][keep])
