import json
import shutil

import numpy as np
import pytest
from helpers import annotation, masks_by_name, rectangle, write_coco
from PIL import Image

from seglab.data.datamodule import SegmentationDataModule
from seglab.data.masks import rasterize_annotations
from seglab.data.sources import discover, make_palette, read_classes_csv
from seglab.data.synthetic import ANNOTATION_FILE, CATEGORIES, SPLIT_NAMES
from seglab.errors import SeglabError

# RoboFlow's parent category (id 0, the project) is the supercategory of the real classes.
PET_CATEGORIES = [
    {"id": 0, "name": "proj", "supercategory": "none"},
    {"id": 1, "name": "cat", "supercategory": "proj"},
    {"id": 2, "name": "dog", "supercategory": "proj"},
]
CAT = annotation(0, 1, 1, [rectangle(0, 0, 3, 2)])  # rows 0-1, cols 0-2
DOG = annotation(1, 1, 2, [rectangle(4, 3, 8, 6)])  # rows 3-5, cols 4-7
PET_IMAGE = {"id": 1, "file_name": "pets.jpg", "height": 6, "width": 8}


@pytest.fixture
def pets_coco(tmp_path):
    return write_coco(tmp_path / "annotations.json", [PET_IMAGE], [CAT, DOG], PET_CATEGORIES)


def pets_mask(source, path):
    anns = source.coco_files[path].annotations[1]
    mask, _ = rasterize_annotations(anns, 6, 8, source.category_index[path], "smaller_on_top", 255)
    return mask


def test_roboflow_parent_category_is_not_a_class(pets_coco):
    source = discover(pets_coco.parent)
    assert source.layout == "coco"
    assert source.class_names == ["background", "cat", "dog"]
    assert source.category_index[pets_coco] == {0: 0, 1: 1, 2: 2}
    expected = np.zeros((6, 8), np.uint8)
    expected[0:2, 0:3] = 1
    expected[3:6, 4:8] = 2
    np.testing.assert_array_equal(pets_mask(source, pets_coco), expected)


def test_selected_classes_are_renumbered_and_others_become_background(pets_coco):
    source = discover(pets_coco.parent, classes=["dog"])
    assert source.class_names == ["background", "dog"]
    assert source.category_index[pets_coco] == {0: 0, 1: 0, 2: 1}
    expected = np.zeros((6, 8), np.uint8)
    expected[3:6, 4:8] = 1
    np.testing.assert_array_equal(pets_mask(source, pets_coco), expected)


def test_selecting_a_missing_class_names_it(pets_coco):
    with pytest.raises(SeglabError, match=r"\['horse'\]"):
        discover(pets_coco.parent, classes=["horse"])


def test_split_files_with_different_category_ids_are_merged_by_name(tmp_path):
    swapped = [PET_CATEGORIES[0], {**PET_CATEGORIES[2], "id": 1}, {**PET_CATEGORIES[1], "id": 2}]
    train = write_coco(tmp_path / "train" / ANNOTATION_FILE, [PET_IMAGE], [CAT, DOG], PET_CATEGORIES)
    valid = write_coco(tmp_path / "valid" / ANNOTATION_FILE, [PET_IMAGE], [CAT, DOG], swapped)
    source = discover(tmp_path)
    assert source.layout == "roboflow_coco"
    assert source.class_names == ["background", "cat", "dog"]
    assert source.category_index[train] == {0: 0, 1: 1, 2: 2}
    assert source.category_index[valid] == {0: 0, 1: 2, 2: 1}  # valid's id 1 is "dog"


def test_palette_never_gives_a_class_the_background_colour():
    palette = make_palette(45)  # more classes than fixed colours: they repeat
    assert palette[0] == (0, 0, 0)
    assert len(palette) == 45 and (0, 0, 0) not in palette[1:]
    assert palette[1:20] == palette[20:39]  # 19 class colours, then the cycle restarts


# --- RoboFlow semantic-mask exports -------------------------------------------------------------

CLASSES_CSV = "Pixel Value, Class\n0, background\n1, disc\n2, triangle\n"


def write_mask_split(folder, samples: dict[str, tuple[np.ndarray, np.ndarray]], csv=CLASSES_CSV):
    """samples: image file name -> (RGB image, mask); masks go to <stem>_mask.png as RoboFlow writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "_classes.csv").write_text(csv)
    for name, (image, mask) in samples.items():
        Image.fromarray(image).save(folder / name)
        stem = name.rsplit(".", 1)[0]
        Image.fromarray(mask).save(folder / f"{stem}_mask.png")


def flat_mask(value: int) -> np.ndarray:
    return np.full((4, 6), value, np.uint8)


def image_of(value: int) -> np.ndarray:
    return np.full((4, 6, 3), value, np.uint8)


def test_read_classes_csv_skips_header_and_strips_names(tmp_path):
    (tmp_path / "_classes.csv").write_text(CLASSES_CSV)
    assert read_classes_csv(tmp_path / "_classes.csv") == {0: "background", 1: "disc", 2: "triangle"}


def test_masks_pair_with_images_by_stem_not_sorted_order(tmp_path):
    # Images sort a.png < a_b.png, masks sort a_b_mask.png < a_mask.png: pairing by position would swap.
    write_mask_split(
        tmp_path / "train", {"a.png": (image_of(10), flat_mask(1)), "a_b.png": (image_of(20), flat_mask(2))}
    )
    write_mask_split(tmp_path / "valid", {"v.png": (image_of(30), flat_mask(0))})
    write_mask_split(tmp_path / "test", {"t.png": (image_of(40), flat_mask(1))})
    source = discover(tmp_path)
    assert source.layout == "roboflow_masks"
    assert [(s.image.name, s.mask.name) for s in source.samples["train"]] == [
        ("a.png", "a_mask.png"),
        ("a_b.png", "a_b_mask.png"),
    ]
    dm = SegmentationDataModule(root=str(tmp_path), image_size=4, num_workers=0, batch_size=1)
    dm.setup()
    masks = masks_by_name(dm)
    assert {name: np.unique(m).tolist() for name, m in masks.items()} == {
        "a.png": [1],
        "a_b.png": [2],
        "v.png": [0],
        "t.png": [1],
    }


def test_mask_values_follow_selected_classes(tmp_path):
    mask = np.array([[0, 1, 2], [2, 1, 0]], np.uint8)
    for folder in ("train", "valid", "test"):
        write_mask_split(tmp_path / folder, {"x.png": (np.zeros((2, 3, 3), np.uint8), mask)})
    # One photo (identical files) in all three splits: kept there, as the test is about the masks' values.
    dm = SegmentationDataModule(
        root=str(tmp_path), classes=["triangle"], image_size=4, num_workers=0, batch_size=1, shared_photos="warn"
    )
    dm.setup()
    assert dm.class_names == ["background", "triangle"]
    np.testing.assert_array_equal(dm.datasets["train"].load(0)[1], [[0, 0, 1], [1, 0, 0]])


def test_mask_value_missing_from_classes_csv_names_the_mask(tmp_path):
    bad = flat_mask(1)
    bad[2, 3] = 7
    write_mask_split(tmp_path / "train", {"bad.png": (image_of(0), bad)})
    write_mask_split(tmp_path / "valid", {"v.png": (image_of(1), flat_mask(0))})
    write_mask_split(tmp_path / "test", {"t.png": (image_of(2), flat_mask(0))})
    dm = SegmentationDataModule(root=str(tmp_path), image_size=4, num_workers=0, batch_size=1)
    dm.setup()
    with pytest.raises(SeglabError, match=r"bad_mask\.png has pixel values \[7\]"):
        dm.datasets["train"].load(0)


def test_image_without_mask_is_listed(tmp_path):
    write_mask_split(tmp_path / "train", {"ok.png": (image_of(0), flat_mask(1))})
    Image.fromarray(image_of(0)).save(tmp_path / "train" / "orphan.png")
    with pytest.raises(SeglabError, match=r"1 image\(s\) .* no mask .*orphan\.png"):
        discover(tmp_path)


# --- one dataset in all three layouts -----------------------------------------------------------


def write_flat_coco(demo_root, out):
    """All splits of the RoboFlow COCO export merged into one annotations.json beside all images."""
    out.mkdir()
    images, annotations = [], []
    for split in SPLIT_NAMES:
        data = json.loads((demo_root / split / ANNOTATION_FILE).read_text())
        new_ids = {}
        for im in data["images"]:
            new_ids[im["id"]] = len(images)
            images.append({**im, "id": len(images)})
            shutil.copy(demo_root / split / im["file_name"], out / im["file_name"])
        for ann in data["annotations"]:
            annotations.append({**ann, "id": len(annotations), "image_id": new_ids[ann["image_id"]]})
    write_coco(out / "annotations.json", images, annotations, CATEGORIES)


def write_mask_export(coco_dm, out):
    for split, folder in (("train", "train"), ("val", "valid"), ("test", "test")):
        dataset, target = coco_dm.datasets[split], out / folder
        target.mkdir(parents=True)
        (target / "_classes.csv").write_text(CLASSES_CSV)
        for i, (image, _) in enumerate(dataset.items):
            shutil.copy(image, target / image.name)
            Image.fromarray(dataset.load(i)[1]).save(target / f"{image.stem}_mask.png")


def test_coco_roboflow_coco_and_mask_exports_load_identical_masks(demo_root, tmp_path):
    def datamodule(root, cache):
        dm = SegmentationDataModule(
            root=str(root), image_size=64, num_workers=0, batch_size=2, cache_dir=str(tmp_path / cache)
        )
        dm.setup()
        return dm

    roboflow_coco = datamodule(demo_root, "cache-rf")
    write_flat_coco(demo_root, tmp_path / "flat")
    write_mask_export(roboflow_coco, tmp_path / "masks")
    flat, masks = datamodule(tmp_path / "flat", "cache-flat"), datamodule(tmp_path / "masks", "unused")

    layouts = [dm.source.layout for dm in (roboflow_coco, flat, masks)]
    assert layouts == ["roboflow_coco", "coco", "roboflow_masks"]
    reference = masks_by_name(roboflow_coco)
    assert len(reference) == 20
    # The comparison covers both classes and the overlapping fixed cases, not just empty masks.
    assert set(np.unique(np.stack(list(reference.values()))).tolist()) == {0, 1, 2}
    for dm in (flat, masks):
        assert dm.class_names == ["background", "disc", "triangle"]
        loaded = masks_by_name(dm)
        assert sorted(loaded) == sorted(reference)
        for name, mask in reference.items():
            np.testing.assert_array_equal(loaded[name], mask, err_msg=f"{dm.source.layout}: {name}")
