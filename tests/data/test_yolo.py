"""RoboFlow's YOLO segmentation export as a third layout: read, split, reported and trained like the others."""

import shutil

import numpy as np
import pytest
from helpers import masks_by_name, ready_datamodule

from seglab.data.report import build_report
from seglab.data.sources import discover
from seglab.data.synthetic import generate_dataset
from seglab.errors import SeglabError


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """The same 20 generated photos as a COCO Segmentation and as a YOLOv8 Segmentation export."""
    root = tmp_path_factory.mktemp("yolo")
    return {
        fmt: generate_dataset(root / fmt, num_images=20, size=64, seed=0, fmt=fmt, copies=2) for fmt in ("coco", "yolo")
    }


def datamodule(root, tmp_path, **kwargs):
    return ready_datamodule(root, tmp_path / "cache", **kwargs)


def test_a_yolo_export_gives_the_masks_of_the_same_coco_export(exports, tmp_path):
    coco, yolo = datamodule(exports["coco"], tmp_path / "c"), datamodule(exports["yolo"], tmp_path / "y")
    assert yolo.source.layout == "roboflow_yolo" and yolo.class_names == coco.class_names == [
        "background",
        "disc",
        "triangle",
    ]
    assert {s: sorted(x.image.name for x in v) for s, v in yolo.splits.items()} == {
        s: sorted(x.image.name for x in v) for s, v in coco.splits.items()
    }
    expected, got = masks_by_name(coco), masks_by_name(yolo)
    assert sorted(got) == sorted(expected)
    assert all(np.array_equal(got[name], expected[name]) for name in expected)  # pixel for pixel
    assert sum(int(m.any()) for m in got.values()) >= 20  # objects, not empty masks
    # RoboFlow's copies are found by their names, as in the other layouts.
    assert yolo.groups.links["name"] == coco.groups.links["name"] == 16


def test_the_dataset_report_reads_a_yolo_export(exports, tmp_path):
    report = build_report(datamodule(exports["yolo"], tmp_path))
    assert report["layout"] == "roboflow_yolo" and report["files"] == 36 and report["photos"] == 20
    # Overlapping annotations are named by the image files themselves, under images/.
    assert all("/images/" in name for name in report["annotations"]["overlapping"])


def test_labels_are_read_again_only_when_they_change(exports, tmp_path):
    root = tmp_path / "export"
    shutil.copytree(exports["yolo"], root)
    for image in (root / "train" / "images").glob("*.jpg"):  # a zip made on a Mac: metadata, not images
        (image.parent / f"._{image.name}").write_bytes(b"\x00\x05\x16\x07 Mac OS X")
    first = discover(root, cache_dir=tmp_path / "cache")
    assert len(first.samples["train"]) == 32
    converted = sorted((tmp_path / "cache" / "yolo").glob("*.json"))
    assert (
        len(converted) == 3
        and discover(root, cache_dir=tmp_path / "cache").coco_files.keys() == first.coco_files.keys()
    )
    label = sorted((root / "train" / "labels").glob("*.txt"))[3]
    label.write_text("1 0.1 0.1 0.5 0.1 0.5 0.5\n")  # one triangle instead
    again = discover(root, cache_dir=tmp_path / "cache")
    assert len(sorted((tmp_path / "cache" / "yolo").glob("*.json"))) == 4
    coco = next(c for c in again.coco_files.values() if c.path.name.startswith("train-"))
    image_id = next(i for i, im in coco.images.items() if im["file_name"] == label.stem + ".jpg")
    assert [a["segmentation"] for a in coco.annotations[image_id]] == [[[6.4, 6.4, 32.0, 6.4, 32.0, 32.0]]]
    assert coco.annotations[image_id][0]["category_id"] == 2  # class 1 of data.yaml: triangle


@pytest.mark.parametrize(
    "line,message",
    [
        ("0 0.5 0.5 0.2 0.2", "is a detection label (a class and a box), not a polygon"),
        ("0 0.1 0.1 0.5 0.1 0.5", "has 5 coordinates; a polygon needs 3 or more x y pairs"),
        ("7 0.1 0.1 0.5 0.1 0.5 0.5", "has class 7, but data.yaml names 2 classes"),
        ("disc 0.1 0.1 0.5 0.1 0.5 0.5", "is not 'class x1 y1 x2 y2 ...' (numbers)"),
    ],
)
def test_a_broken_label_file_is_named_with_its_line(exports, tmp_path, line, message):
    root = tmp_path / "export"
    shutil.copytree(exports["yolo"], root)
    label = sorted((root / "valid" / "labels").glob("*.txt"))[0]
    label.write_text("1 0.2 0.2 0.6 0.2 0.6 0.6\n" + line + "\n")
    with pytest.raises(SeglabError) as info:
        discover(root, cache_dir=tmp_path / "cache")
    assert f"{label}, line 2" in str(info.value) and message in str(info.value)


def test_a_yolo_export_without_class_names_says_what_is_missing(exports, tmp_path):
    root = tmp_path / "export"
    shutil.copytree(exports["yolo"], root)
    (root / "data.yaml").unlink()
    with pytest.raises(SeglabError, match="has YOLO folders .* but no data.yaml or data.yml with the class names"):
        discover(root, cache_dir=tmp_path / "cache")
    (root / "data.yaml").write_text("train: ../train/images\nnc: 2\n")
    with pytest.raises(SeglabError, match="has no class names"):
        discover(root, cache_dir=tmp_path / "cache")
    (root / "data.yaml").write_text("names:\n  0: disc\n  1: triangle\n")  # the mapping form is read too
    assert discover(root, cache_dir=tmp_path / "cache").class_names == ["background", "disc", "triangle"]
