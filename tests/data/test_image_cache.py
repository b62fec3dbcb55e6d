"""The decoded, resized image cache (data.image_cache) and SegmentationDataset.load_prescaled."""

import os
import pickle
import shutil

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader

from seglab.data.datamodule import SegmentationDataModule
from seglab.data.dataset import SegmentationDataset
from seglab.data.image_cache import ImageCache
from seglab.data.loaders import default_num_workers, default_prefetch_factor


class Raw:
    """A transform that returns what it is given: the tests look at load_prescaled's arrays."""

    def __call__(self, image, mask):
        return {"image": image, "mask": mask}


def write_pair(folder, name, image: np.ndarray, mask: np.ndarray):
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(folder / f"{name}.png")
    Image.fromarray(mask).save(folder / f"{name}_mask.png")
    return folder / f"{name}.png", folder / f"{name}_mask.png"


def hand_made(tmp_path, target_hw, cache=True):
    """A 4x4 image whose 2x2 blocks average to round numbers, and a mask with one class per block."""
    image = np.zeros((4, 4, 3), np.uint8)
    image[..., 0] = [[0, 10, 20, 30], [10, 20, 30, 40], [100, 102, 200, 200], [104, 106, 200, 200]]
    image[..., 1] = 50
    mask = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 1, 1], [2, 2, 1, 1]], np.uint8)
    items = [write_pair(tmp_path / "data", "a", image, mask)]
    return SegmentationDataset(
        items, Raw(), prescale=lambda h, w: target_hw, image_cache=ImageCache(tmp_path / "cache") if cache else None
    )


def test_shrinking_averages_areas_and_masks_take_the_nearest_class(tmp_path):
    image, mask = hand_made(tmp_path, (2, 2)).load_prescaled(0)
    # Each output pixel is the mean of its 2x2 block (cv2.INTER_AREA): (0+10+10+20)/4 = 10, ...
    assert image[..., 0].tolist() == [[10, 30], [103, 200]]
    assert (image[..., 1] == 50).all()
    assert mask.tolist() == [[0, 1], [2, 1]]


def test_enlarging_is_bilinear(tmp_path):
    image, mask = hand_made(tmp_path, (8, 8)).load_prescaled(0)
    assert image.shape == (8, 8, 3) and mask.shape == (8, 8)
    # Bilinear at 2x: output pixels 1 and 2 lie at source x=0.25 and 0.75 -> 2.5 and 7.5 (cv2's fixed-point
    # rounding goes either way); nearest neighbour (or INTER_AREA, which enlarges like it) would give 0 and 10.
    assert image[0, 0, 0] == 0 and image[0, 1, 0] in (2, 3) and image[0, 2, 0] in (7, 8)
    assert mask[:2, :2].tolist() == [[0, 0], [0, 0]] and mask[-1, -1] == 1


def test_cached_and_uncached_loads_are_identical(demo_root, tmp_path):
    datasets = {}
    for name, cache in (("plain", False), ("cached", True)):
        dm = SegmentationDataModule(
            root=str(demo_root),
            image_size=40,
            num_workers=0,
            batch_size=2,
            cache_dir=str(tmp_path / name),
            image_cache=cache,
        )
        dm.setup()
        datasets[name] = dm.datasets["train"]
    plain, cached = datasets["plain"], datasets["cached"]
    assert plain.image_cache is None and cached.image_cache is not None
    for i in range(len(plain)):
        expected = plain.load_prescaled(i)
        for _ in range(2):  # the first load fills the cache, the second reads it
            got = cached.load_prescaled(i)
            assert got[0].dtype == np.uint8 and got[0].shape == (40, 40, 3)
            np.testing.assert_array_equal(got[0], expected[0])
            np.testing.assert_array_equal(got[1], expected[1])
    entries = sorted((tmp_path / "cached" / "images").iterdir())
    assert len(entries) == 2 * len(cached) and all(p.suffix == ".npy" for p in entries)  # image + mask
    # load() stays at the original resolution (evaluation reads it).
    assert cached.load(0)[0].shape == (64, 64, 3)


def test_cache_invalidates_when_an_image_changes(demo_root, tmp_path):
    root = tmp_path / "export"
    shutil.copytree(demo_root, root)
    dm = SegmentationDataModule(
        root=str(root), image_size=32, num_workers=0, batch_size=2, cache_dir=str(tmp_path / "cache")
    )
    dm.setup()
    dataset = dm.datasets["train"]
    before = dataset.load_prescaled(3)[0]
    path = dataset.items[3][0]
    stat = os.stat(path)

    # Other pixels, same size and format; the modification time is put back: the key must see the content.
    Image.fromarray(np.full((64, 64, 3), (10, 200, 30), np.uint8)).save(path, format="JPEG", quality=100)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    after = dataset.load_prescaled(3)[0]
    assert not np.array_equal(after, before)
    assert np.abs(after.astype(int) - (10, 200, 30)).max() <= 2  # JPEG's rounding of a flat colour
    images = list((tmp_path / "cache" / "images").glob("*-image-*.npy"))
    assert len(images) == 2  # the old entry is kept, a new one added


def test_two_workers_fill_one_cache(demo_root, tmp_path):
    dm = SegmentationDataModule(
        root=str(demo_root), image_size=48, num_workers=0, batch_size=2, cache_dir=str(tmp_path / "cache")
    )
    dm.setup()
    dataset = dm.datasets["train"]
    dataset.transform = Raw()
    reference = SegmentationDataset(dataset.items, Raw(), prescale=dataset.prescale)
    # Both workers load every image, so each entry is written by two processes at once or one after the other.
    doubled = [i for i in range(len(dataset)) for _ in range(2)]
    loader = DataLoader(dataset, batch_size=None, sampler=doubled, num_workers=2)
    for index, (image, mask) in zip(doubled, loader, strict=True):
        expected_image, expected_mask = reference.load_prescaled(index)
        np.testing.assert_array_equal(image.numpy(), expected_image)
        np.testing.assert_array_equal(mask.numpy(), expected_mask)
    folder = tmp_path / "cache" / "images"
    assert len(list(folder.glob("*.npy"))) == 2 * len(dataset)  # an image and a mask entry each
    assert not list(folder.glob("*.tmp"))  # every write finished with its rename
    for index in range(len(dataset)):  # and what they left is right
        np.testing.assert_array_equal(dataset.load_prescaled(index)[0], reference.load_prescaled(index)[0])


def test_a_damaged_entry_is_built_again(tmp_path):
    dataset = hand_made(tmp_path, (2, 2))
    first = dataset.load_prescaled(0)[0]
    (entry,) = (tmp_path / "cache").glob("*-image-*.npy")
    entry.write_bytes(b"not an array")
    np.testing.assert_array_equal(dataset.load_prescaled(0)[0], first)


def test_datamodule_prescale_and_loader_settings(demo_root, tmp_path):
    dm = SegmentationDataModule(root=str(demo_root), image_size=40, batch_size=2, cache_dir=str(tmp_path))
    assert dm.num_workers == default_num_workers() == len(os.sched_getaffinity(0))  # no cap any more
    prescale = dm.prescale(train=True)
    assert prescale(300, 200) == (40, 40) == dm.prescale(train=False)(7, 9)
    assert pickle.loads(pickle.dumps(prescale))(1, 2) == (40, 40)  # spawned workers can receive it
    assert [default_prefetch_factor(n) for n in (1, 2, 3, 4, 16)] == [4, 2, 2, 2, 2]
    dm.num_workers = 1
    dm.setup()
    loader = dm.train_dataloader()
    assert (loader.prefetch_factor, loader.persistent_workers) == (4, True)
    assert dm.datasets["val"].prescale(64, 64) == (40, 40)
    dm.num_workers = 0
    assert dm.val_dataloader().prefetch_factor is None


@pytest.mark.parametrize("bad", [0, -2])
def test_prefetch_factor_must_be_positive(bad, demo_root, tmp_path):
    from seglab.errors import SeglabError

    with pytest.raises(SeglabError, match=r"data.prefetch_factor"):
        SegmentationDataModule(root=str(demo_root), prefetch_factor=bad, cache_dir=str(tmp_path))


def test_cached_masks_follow_the_mask_file_and_the_class_mapping(tmp_path):
    dataset = hand_made(tmp_path, (2, 2))
    assert dataset.load_prescaled(0)[1].tolist() == [[0, 1], [2, 1]]
    mask_path = dataset.items[0][1]
    Image.fromarray(np.full((4, 4), 2, np.uint8)).save(mask_path)  # the annotator repainted everything
    assert dataset.load_prescaled(0)[1].tolist() == [[2, 2], [2, 2]]

    # A PNG-mask export whose _classes.csv maps value 2 to class 1: same file, another cached mask.
    lut = np.full(65536, -1, np.int32)
    lut[[0, 1, 2]] = [0, 2, 1]
    remapped = SegmentationDataset(
        dataset.items, Raw(), lut=lut, prescale=dataset.prescale, image_cache=dataset.image_cache
    )
    assert remapped.load_prescaled(0)[1].tolist() == [[1, 1], [1, 1]]
    assert dataset.load_prescaled(0)[1].tolist() == [[2, 2], [2, 2]]


def test_scale_crop_prescale_only_drops_what_no_scale_uses(demo_root, tmp_path):
    geometry = {"kind": "scale_crop", "scales": [0.5, 1.0, 2.0]}
    dm = SegmentationDataModule(
        root=str(demo_root), image_size=40, base_size=100, geometry=geometry, cache_dir=str(tmp_path)
    )
    train, evaluation = dm.prescale(train=True), dm.prescale(train=False)
    # Training rescales the long side to at most 100 x 2.0 = 200; evaluation to base_size 100.
    assert train(300, 150) == (200, 100) and train(150, 90) == (150, 90)
    assert evaluation(300, 150) == (100, 50) and evaluation(80, 60) == (80, 60)
    assert pickle.loads(pickle.dumps(train))(400, 100) == (200, 50)
