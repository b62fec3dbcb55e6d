"""Pre-annotations: predictions written as RoboFlow's COCO Segmentation and Semantic Segmentation Masks exports, read
back by seglab's own loaders as a dataset."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import masks_by_name, ready_datamodule
from hydra import compose, initialize_config_dir
from PIL import Image
from pycocotools import mask as mask_utils

from seglab.data.synthetic import generate_dataset
from seglab.errors import SeglabError
from seglab.preannotate import class_polygons, coco_annotations, write_coco, write_image
from seglab.predict import predict

ROOT = Path(__file__).resolve().parents[1]


def drawn(annotations: list[dict], height: int, width: int) -> np.ndarray:
    """The annotations rasterised by pycocotools, as seglab's COCO reader does (smaller regions on top)."""
    out = np.zeros((height, width), np.uint8)
    for a in sorted(annotations, key=lambda a: -a["area"]):
        out[mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(a["segmentation"], height, width))) > 0] = a[
            "category_id"
        ]
    return out


def test_polygons_trace_the_outer_side_of_the_boundary_pixels():
    mask = np.zeros((9, 10), np.uint8)
    mask[2:5, 3:7] = 1  # a rectangle
    mask[6:9, 0:3] = 2  # an L one pixel thick
    mask[6, 1:3] = 0
    mask[0, 9] = 2  # one pixel
    assert class_polygons(mask, 1) == [[3.0, 2.0, 3.0, 5.0, 7.0, 5.0, 7.0, 2.0]]  # the pixels' outer edges
    assert class_polygons(mask, 2)[1] == [9.0, 0.0, 10.0, 0.0, 10.0, 1.0, 9.0, 1.0]
    assert np.array_equal(drawn(coco_annotations(mask, 0, 0), 9, 10), mask)
    thick = np.zeros((9, 10), np.uint8)
    thick[4:9, 0:5] = 1  # an L two pixels thick: its inner corner is cut by a diagonal
    thick[4:6, 2:5] = 0
    back = drawn(coco_annotations(thick, 0, 0), 9, 10)
    assert np.argwhere(back != thick).tolist() == [[5, 2]]


def test_a_region_around_another_keeps_it_and_a_hole_of_background_is_filled():
    mask = np.zeros((12, 12), np.uint8)
    mask[1:11, 1:11] = 1
    mask[4:7, 4:7] = 2  # another class inside: drawn on top, kept
    mask[8, 8] = 0  # background inside: a polygon has no holes
    back = drawn(coco_annotations(mask, 0, 0), 12, 12)
    assert back[8, 8] == 1 and (back != mask).sum() == 1


@pytest.mark.parametrize(("mode", "size", "least"), [("shapes", 256, 0.998), ("dense", 512, 0.995)])
def test_label_masks_of_each_kind_come_back_from_polygons(tmp_path, mode, size, least):
    """The demo's shapes and the dense kind's touching cells (10 photos each), their label masks written as
    pre-annotations and read back by seglab's COCO reader: the share of pixels that come back (a polygon per
    region; concave corners and holes of background are where they differ)."""
    source = generate_dataset(tmp_path / "labels", num_images=10, size=size, seed=1, mode=mode, fmt="masks")
    truth = masks_by_name(ready_datamodule(source, tmp_path / "cache-truth"))
    for split in ("train", "valid", "test"):
        (tmp_path / "coco" / split).mkdir(parents=True)
        entries = [
            write_image("coco", image, tmp_path / "coco" / split, image.stem, truth[image.name], "_mask.png")
            for image in sorted((source / split).glob("*.jpg"))
        ]
        write_coco(tmp_path / "coco" / split, ["background", "a", "b"], entries, "labels")
    back = masks_by_name(ready_datamodule(tmp_path / "coco", tmp_path / "cache-back"))
    assert sorted(back) == sorted(truth) and len(back) == 10
    assert sum(int((t > 0).sum()) for t in truth.values()) > 0.05 * sum(t.size for t in truth.values())
    agree = sum(int((back[n] == truth[n]).sum()) for n in truth) / sum(t.size for t in truth.values())
    assert least <= agree < 1.0


def compose_predict(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("predict", overrides=["device=cpu", "num_workers=0", *overrides])


@pytest.fixture(scope="module")
def unlabelled(tmp_path_factory) -> Path:
    """256 px demo photos in train/ and valid/ (as a user's folders of RoboFlow splits), no labels."""
    data = generate_dataset(tmp_path_factory.mktemp("photos"), num_images=12, size=256, seed=3)
    folder = tmp_path_factory.mktemp("unlabelled")
    for split in ("train", "valid"):
        (folder / split).mkdir()
        for image in (data / split).glob("*.jpg"):
            shutil.copyfile(image, folder / split / image.name)
    return folder


@pytest.mark.parametrize("fmt", ["coco", "masks"])
def test_predictions_read_back_as_a_dataset_equal_the_masks(trained_run, unlabelled, tmp_path, fmt):
    ckpt = next((trained_run["run_dir"] / "checkpoints").glob("best-*.ckpt"))
    predict(compose_predict(f"ckpt_path={ckpt}", f"input={unlabelled}", f"output={tmp_path / 'seglab'}"))
    result = predict(
        compose_predict(
            f"ckpt_path={ckpt}", f"input={unlabelled}", f"output={tmp_path / fmt}", f"format={fmt}", "project=shapes"
        )
    )
    assert result["images"] == 11
    files = {p.relative_to(tmp_path / fmt).as_posix() for p in (tmp_path / fmt).rglob("*") if p.is_file()}
    images = {p.relative_to(unlabelled).as_posix() for p in unlabelled.rglob("*.jpg")}
    per_folder = {"coco": ["_annotations.coco.json"], "masks": ["_classes.csv"]}[fmt]
    stems = {"coco": [], "masks": [f"{Path(i).parent}/{Path(i).stem}_mask.png" for i in images]}[fmt]
    assert files == images | {f"{s}/{f}" for s in ("train", "valid") for f in per_folder} | set(stems)
    if fmt == "coco":
        coco = json.loads((tmp_path / fmt / "train" / "_annotations.coco.json").read_text())
        assert coco["categories"] == [
            {"id": 0, "name": "shapes", "supercategory": "none"},
            {"id": 1, "name": "disc", "supercategory": "shapes"},
            {"id": 2, "name": "triangle", "supercategory": "shapes"},
        ]
    else:
        assert (
            tmp_path / fmt / "train" / "_classes.csv"
        ).read_text() == "Pixel Value, Class\n0, background\n1, disc\n2, triangle\n"

    dm = ready_datamodule(tmp_path / fmt, tmp_path / "cache")
    assert dm.class_names == ["background", "disc", "triangle"]
    back = masks_by_name(dm)
    predicted = {
        name: np.array(Image.open(tmp_path / "seglab" / split / f"{Path(name).stem}_mask.png"))
        for split in ("train", "valid")
        for name in back
        if (unlabelled / split / name).is_file()
    }
    assert sorted(back) == sorted(predicted) and len(back) == 11
    agree = sum(int((back[n] == predicted[n]).sum()) for n in back) / sum(m.size for m in predicted.values())
    assert agree == 1.0 if fmt == "masks" else agree >= 0.995


def test_an_unknown_format_is_named(trained_run, tmp_path):
    ckpt = next((trained_run["run_dir"] / "checkpoints").glob("best-*.ckpt"))
    with pytest.raises(SeglabError, match="format='yolo' must be one of seglab, coco, masks"):
        predict(compose_predict(f"ckpt_path={ckpt}", f"input={tmp_path}", "format=yolo"))
