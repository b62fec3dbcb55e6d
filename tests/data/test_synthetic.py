import csv
import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from seglab.data.synthetic import (
    ANNOTATION_FILE,
    DEFAULT_OBJECT_SCALE,
    SPLIT_NAMES,
    generate_dataset,
    hard_layout,
    mask_to_uncompressed_rle,
    polygon_area,
    split_sizes,
)
from seglab.data.synthetic import main as synthetic_main
from seglab.data.synthetic.copies import clip_polygon

NUM_IMAGES, SIZE = 20, 64


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("synthetic"), num_images=NUM_IMAGES, size=SIZE, seed=0)


def load_coco(root: Path, split: str) -> dict:
    return json.loads((root / split / ANNOTATION_FILE).read_text())


def decode_segmentation(segmentation, height: int, width: int) -> np.ndarray:
    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation["counts"], list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    return mask_utils.decode(rle)


def annotations_by_image(coco: dict) -> dict[int, list[dict]]:
    grouped = {image["id"]: [] for image in coco["images"]}
    for annotation in coco["annotations"]:
        grouped[annotation["image_id"]].append(annotation)
    return grouped


def read_image(root: Path, split: str, image: dict) -> np.ndarray:
    return np.asarray(Image.open(root / split / image["file_name"]), dtype=np.float64)


def test_split_sizes():
    assert split_sizes(120, (0.8, 0.1, 0.1)) == (96, 12, 12)
    assert split_sizes(NUM_IMAGES, (0.8, 0.1, 0.1)) == (16, 2, 2)


def test_layout_matches_roboflow_export(dataset):
    name_pattern = re.compile(r"img_\d{4}_jpg\.rf\.[0-9a-f]{8}\.jpg")
    counts = {}
    for split in SPLIT_NAMES:
        coco = load_coco(dataset, split)
        counts[split] = len(coco["images"])
        assert sorted(p.name for p in (dataset / split).glob("*.jpg")) == sorted(i["file_name"] for i in coco["images"])
        for image in coco["images"]:
            assert name_pattern.fullmatch(image["file_name"])
            with Image.open(dataset / split / image["file_name"]) as pil_image:
                assert (pil_image.format, pil_image.mode, pil_image.size) == ("JPEG", "RGB", (SIZE, SIZE))
        image_ids = {image["id"] for image in coco["images"]}
        for annotation in coco["annotations"]:
            assert annotation["image_id"] in image_ids
            assert annotation["iscrowd"] == 0
    assert counts == {"train": 16, "valid": 2, "test": 2}


def test_categories_include_unused_parent(dataset):
    used = set()
    for split in SPLIT_NAMES:
        coco = load_coco(dataset, split)
        assert coco["categories"] == [
            {"id": 0, "name": "shapes", "supercategory": "none"},
            {"id": 1, "name": "disc", "supercategory": "shapes"},
            {"id": 2, "name": "triangle", "supercategory": "shapes"},
        ]
        used |= {annotation["category_id"] for annotation in coco["annotations"]}
    assert used == {1, 2}


def test_same_seed_gives_identical_bytes(tmp_path):
    first = generate_dataset(tmp_path / "a", num_images=NUM_IMAGES, size=SIZE, seed=3)
    second = generate_dataset(tmp_path / "b", num_images=NUM_IMAGES, size=SIZE, seed=3)
    other_seed = generate_dataset(tmp_path / "c", num_images=NUM_IMAGES, size=SIZE, seed=4)

    def read_all(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    first_files = read_all(first)
    assert len(first_files) == NUM_IMAGES + len(SPLIT_NAMES)
    assert first_files == read_all(second)
    other_files = read_all(other_seed)
    for split in SPLIT_NAMES:
        assert other_files[f"{split}/{ANNOTATION_FILE}"] != first_files[f"{split}/{ANNOTATION_FILE}"]


def test_train_has_empty_image_and_both_rle_kinds(dataset):
    coco = load_coco(dataset, "train")
    assert any(not annotations for annotations in annotations_by_image(coco).values())

    segmentations = [annotation["segmentation"] for annotation in coco["annotations"]]
    compressed = [s for s in segmentations if isinstance(s, dict) and isinstance(s["counts"], str)]
    uncompressed = [s for s in segmentations if isinstance(s, dict) and isinstance(s["counts"], list)]
    assert compressed and uncompressed
    for segmentation in compressed + uncompressed:
        assert segmentation["size"] == [SIZE, SIZE]
        assert decode_segmentation(segmentation, SIZE, SIZE).sum() > 0


def test_uncompressed_rle_round_trips_through_pycocotools():
    rng = np.random.default_rng(0)
    mask = (rng.random((7, 5)) > 0.5).astype(np.uint8)
    for first_pixel in (0, 1):  # counts must start with a (possibly empty) background run
        mask[0, 0] = first_pixel
        rle = mask_to_uncompressed_rle(mask)
        assert (rle["counts"][0] == 0) == bool(first_pixel)
        assert sum(rle["counts"]) == mask.size
        decoded = mask_utils.decode(mask_utils.frPyObjects(rle, *mask.shape))
        np.testing.assert_array_equal(decoded, mask)


def test_area_and_bbox_match_decoded_masks(dataset):
    coco = load_coco(dataset, "train")
    polygon_ratios = []
    for annotation in coco["annotations"]:
        mask = decode_segmentation(annotation["segmentation"], SIZE, SIZE)
        assert annotation["area"] == mask.sum()
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        assert annotation["bbox"] == [cols[0], rows[0], cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1]
        if isinstance(annotation["segmentation"], list):
            polygon = np.array(annotation["segmentation"][0]).reshape(-1, 2)
            polygon_ratios.append((polygon_area(polygon), mask.sum() / polygon_area(polygon)))
    # Rasterising a ~270 px shape misses or adds a few edge pixels; the largest shape is most exact.
    assert all(0.9 < ratio < 1.1 for _, ratio in polygon_ratios)
    assert abs(max(polygon_ratios)[1] - 1.0) < 0.03


def test_object_colour_differs_from_surrounding_background(dataset):
    coco = load_coco(dataset, "train")
    kernel = np.ones((3, 3), np.uint8)
    distances = []
    for image in coco["images"]:
        annotations = annotations_by_image(coco)[image["id"]]
        if len(annotations) != 1:
            continue
        pixels = read_image(dataset, "train", image)
        mask = decode_segmentation(annotations[0]["segmentation"], SIZE, SIZE)
        inside = cv2.erode(mask, kernel).astype(bool)
        ring = (cv2.dilate(mask, kernel, iterations=4) - cv2.dilate(mask, kernel)).astype(bool)
        distances.append(np.linalg.norm(pixels[inside].mean(axis=0) - pixels[ring].mean(axis=0)))
    assert len(distances) >= 3
    assert min(distances) > 40


def test_later_object_is_drawn_on_top(dataset):
    coco = load_coco(dataset, "train")
    overlapping_images = 0
    for image in coco["images"]:
        annotations = annotations_by_image(coco)[image["id"]]
        masks = [decode_segmentation(a["segmentation"], SIZE, SIZE).astype(bool) for a in annotations]
        if len(masks) != 2 or not (masks[0] & masks[1]).any():
            continue
        overlapping_images += 1
        pixels = read_image(dataset, "train", image)
        under, over = masks
        both = under & over
        under_colour = pixels[under & ~over].mean(axis=0)
        over_colour = pixels[over & ~under].mean(axis=0)
        overlap_colour = pixels[both].mean(axis=0)
        assert np.linalg.norm(overlap_colour - over_colour) < np.linalg.norm(overlap_colour - under_colour)
        # Annotations keep the full shape: the hidden part still belongs to the lower object.
        assert annotations[0]["area"] == under.sum() > (under & ~over).sum()
    assert overlapping_images >= 2


def test_object_scale_sets_object_size(tmp_path):
    def mean_area_fraction(object_scale: float) -> float:
        root = generate_dataset(tmp_path / str(object_scale), NUM_IMAGES, SIZE, seed=0, object_scale=object_scale)
        areas = [a["area"] for split in SPLIT_NAMES for a in load_coco(root, split)["annotations"]]
        return float(np.mean(areas)) / SIZE**2

    default_fraction = mean_area_fraction(DEFAULT_OBJECT_SCALE)
    small_fraction = mean_area_fraction(0.01)
    assert default_fraction == pytest.approx(DEFAULT_OBJECT_SCALE, rel=0.2)
    assert small_fraction == pytest.approx(0.01, rel=0.2)


def test_too_few_images_for_the_fixed_train_cases(tmp_path):
    # 3 images -> 2 train images, but train needs the empty image and two overlap images.
    with pytest.raises(ValueError, match="fixed train cases"):
        generate_dataset(tmp_path, num_images=3, size=SIZE)


@pytest.fixture(scope="module")
def hard_dataset(tmp_path_factory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("hard"), num_images=30, size=320, seed=3, mode="hard")


def test_hard_mode_varies_image_size_and_keeps_annotations_inside(hard_dataset):
    shapes = set()
    for split in ("train", "valid", "test"):
        coco = load_coco(hard_dataset, split)
        for image in coco["images"]:
            pixels = read_image(hard_dataset, split, image)
            assert pixels.shape[:2] == (image["height"], image["width"])  # the JSON says the real size
            assert 0.75 * 320 - 1 <= max(pixels.shape[:2]) <= 320
            shapes.add(pixels.shape[:2])
        for ann in coco["annotations"]:
            image = next(i for i in coco["images"] if i["id"] == ann["image_id"])
            mask = decode_segmentation(ann["segmentation"], image["height"], image["width"])
            assert mask.sum() == pytest.approx(ann["area"], rel=0.05)
    assert len(shapes) >= 10  # sizes and aspect ratios vary, portrait and landscape
    assert any(h > w for h, w in shapes) and any(w > h for h, w in shapes)


def test_hard_mode_objects_are_small_and_triangles_rare(hard_dataset):
    area = {1: 0.0, 2: 0.0}
    with_class = {1: 0, 2: 0}
    total = 0
    for split in ("train", "valid", "test"):
        coco = load_coco(hard_dataset, split)
        total += sum(i["width"] * i["height"] for i in coco["images"])
        for ann in coco["annotations"]:
            area[ann["category_id"]] += ann["area"]
        for anns in annotations_by_image(coco).values():
            for category_id in {a["category_id"] for a in anns}:
                with_class[category_id] += 1
    assert 0 < with_class[2] < with_class[1] / 2  # the triangle is the rare class ...
    area = {k: v / total for k, v in area.items()}
    assert 0 < area[2] < area[1] / 3 and area[1] < 0.03  # ... and the smaller; objects cover a few % at most


def test_hard_layout_draws_clutter_first_and_never_annotates_it():
    for i in range(20):
        ids, (height, width) = hard_layout(np.random.default_rng([0, i]), 1000, None)
        clutter = [c for c in ids if c < 0]
        assert 2 <= len(clutter) and ids[: len(clutter)] == tuple(clutter)  # below every object
        assert set(ids) - set(clutter) <= {1, 2}
        assert 750 <= max(height, width) <= 1000


def test_refresh_keeps_an_up_to_date_dataset_and_replaces_a_stale_one(tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["--out", str(out), "--num-images", "10", "--size", "48", "--refresh"]
    synthetic_main(args)
    fresh = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    stamp = json.loads((out / ".seglab_synthetic.json").read_text())
    assert stamp["num_images"] == 10 and len(stamp["generator_sha256"]) == 64
    synthetic_main(args)
    assert "is up to date" in capsys.readouterr().out
    # Without its fingerprint (a dataset from before fingerprints) but with the same bytes: kept, stamped.
    (out / ".seglab_synthetic.json").unlink()
    synthetic_main(args)
    assert "is up to date" in capsys.readouterr().out and (out / ".seglab_synthetic.json").is_file()
    assert not list(tmp_path.glob("demo.stale-*"))

    # An older generator wrote different pixels (and no fingerprint, or another one): the dataset is
    # rewritten, the old one kept aside.
    first = sorted(out.glob("train/*.jpg"))[0]
    (out / ".seglab_synthetic.json").unlink()
    first.write_bytes(first.read_bytes()[:-10])
    synthetic_main(args)
    assert "was not what this generator writes" in capsys.readouterr().out
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == fresh
    (stale,) = tmp_path.glob("demo.stale-*")
    assert (stale / first.relative_to(out)).read_bytes() == fresh[first.relative_to(out)][:-10]


@pytest.fixture(scope="module")
def dense_copies(tmp_path_factory) -> Path:
    """Dense mode, 3 files per training photo, extra.name recorded, one photo shared with valid/ and test/."""
    return generate_dataset(
        tmp_path_factory.mktemp("dense"),
        num_images=10,
        size=256,
        seed=5,
        mode="dense",
        copies=3,
        extra_name=True,
        shared=1,
    )


def test_copies_are_named_as_roboflow_names_them(dense_copies):
    train = load_coco(dense_copies, "train")
    names = [i["file_name"] for i in train["images"]]
    assert len(names) == 8 * 3 and len(set(names)) == 24
    for image in train["images"]:
        stem, hash_ = re.fullmatch(r"(img_\d{4})_jpg\.rf\.([0-9a-f]{8})\.jpg", image["file_name"]).groups()
        assert image["extra"] == {"name": f"{stem}.jpg"}
    photos = {i["file_name"].split("_jpg.rf.")[0] for i in train["images"]}
    assert len(photos) == 8
    # RoboFlow augments the training split only; the shared photo adds one copy of img_0000 to each other split.
    for split in ("valid", "test"):
        stems = [i["extra"]["name"] for i in load_coco(dense_copies, split)["images"]]
        assert len(stems) == 2 and stems.count("img_0000.jpg") == 1


def test_copies_differ_and_their_annotations_follow_the_pixels(dense_copies):
    train = load_coco(dense_copies, "train")
    by_image = annotations_by_image(train)
    pixels_of = {}
    for image in train["images"]:
        pixels = read_image(dense_copies, "train", image).mean(axis=2)
        objects = np.zeros(pixels.shape, np.uint8)
        for ann in by_image[image["id"]]:
            objects |= decode_segmentation(ann["segmentation"], image["height"], image["width"])
        assert objects.any()
        # Objects are bright (value >= 0.45 before texture and copy photometry), the field dark: away from the
        # edges (blur, JPEG) every annotated pixel is brighter than every unannotated one, on every copy.
        inside = cv2.erode(objects, np.ones((5, 5), np.uint8)).astype(bool)
        outside = cv2.erode(1 - objects, np.ones((5, 5), np.uint8)).astype(bool)
        assert np.median(pixels[inside]) > 2 * np.percentile(pixels[outside], 99) + 10
        pixels_of[image["file_name"]] = pixels
    first = sorted(n for n in pixels_of if n.startswith("img_0001_"))
    shapes_ = {pixels_of[n].shape for n in first}
    assert len(first) == 3 and (len(shapes_) > 1 or not np.array_equal(pixels_of[first[0]], pixels_of[first[1]]))


def test_dense_mode_looks_like_the_microscope_export(dense_copies):
    area, pixels = {1: 0.0, 2: 0.0}, 0
    for split in ("train", "valid", "test"):
        coco = load_coco(dense_copies, split)
        pixels += sum(i["width"] * i["height"] for i in coco["images"])
        for ann in coco["annotations"]:
            area[ann["category_id"]] += ann["area"]
        for image in coco["images"]:
            assert 0.9 * 256 <= max(image["width"], image["height"]) <= 256
    share = {k: v / pixels for k, v in area.items()}
    assert 0.002 < share[1] < 0.04 and 0.08 < share[2] < 0.3  # a rare and a large class on a dark field


def test_clip_polygon_keeps_the_part_inside_the_frame():
    square = np.array([[-2.0, -2.0], [4.0, -2.0], [4.0, 4.0], [-2.0, 4.0]])
    clipped = clip_polygon(square, 3.0, 10.0)
    assert polygon_area(clipped) == pytest.approx(3.0 * 4.0)
    assert clipped[:, 0].min() == 0 and clipped[:, 0].max() == 3 and clipped[:, 1].min() == 0
    assert len(clip_polygon(square + 20, 3.0, 10.0)) == 0


def test_mask_format_matches_the_coco_export_and_a_split_without_photos_gets_no_folder(tmp_path):
    from seglab.data.masks import build_mask_cache, read_mask
    from seglab.data.sources import discover

    settings = {"num_images": 12, "size": 64, "seed": 4, "splits": (0.75, 0.25, 0.0), "copies": 2}
    coco_root = generate_dataset(tmp_path / "coco", **settings)
    mask_root = generate_dataset(tmp_path / "masks", fmt="masks", **settings)
    assert not (coco_root / "test").exists() and not (mask_root / "test").exists()
    coco_source, mask_source = discover(coco_root), discover(mask_root)
    assert mask_source.layout == "roboflow_masks" and mask_source.class_names == coco_source.class_names
    rasterised = build_mask_cache(coco_source, tmp_path / "cache", "last_on_top", 255)
    for split in ("train", "val"):
        coco_samples = {s.name: s for s in coco_source.samples[split]}
        mask_samples = {s.name: s for s in mask_source.samples[split]}
        assert coco_samples.keys() == mask_samples.keys() and len(coco_samples) > 2
        for name, sample in coco_samples.items():
            np.testing.assert_array_equal(read_mask(rasterised[sample.image]), read_mask(mask_samples[name].mask))


def test_wrong_labels_change_only_the_listed_photos_labels(tmp_path):
    clean = generate_dataset(tmp_path / "clean", num_images=40, size=64, seed=4)
    noisy = generate_dataset(tmp_path / "noisy", num_images=40, size=64, seed=4, wrong_labels=0.25)
    with (noisy / "wrong_labels.csv").open() as fh:
        listed = {row["file"]: row["wrong"] for row in csv.DictReader(fh)}
    assert len(listed) == 8  # round(0.25 x 32 training photos)
    assert {w.split()[0] for w in listed.values()} <= {"swap", "erase", "add"}
    for split in ("train", "valid", "test"):
        before, after = load_coco(clean, split), load_coco(noisy, split)
        assert [i["file_name"] for i in before["images"]] == [i["file_name"] for i in after["images"]]
        for image in before["images"]:
            name = image["file_name"]
            assert (clean / split / name).read_bytes() == (noisy / split / name).read_bytes()  # the same pixels
            old = [(a["category_id"], a["area"]) for a in before["annotations"] if a["image_id"] == image["id"]]
            new = [(a["category_id"], a["area"]) for a in after["annotations"] if a["image_id"] == image["id"]]
            assert (old != new) == (name in listed), name
