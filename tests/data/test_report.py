import base64
import io
import json
import re

import numpy as np
import pytest
from helpers import annotation, rectangle, write_coco
from PIL import Image

from seglab.data.datamodule import SegmentationDataModule
from seglab.data.report import annotation_checks, build_report, main
from seglab.data.report_text import format_report
from seglab.data.sheet import sheet_picks
from seglab.data.sources import discover
from seglab.data.synthetic import generate_dataset
from seglab.metrics import interval_text


def test_annotation_checks_name_degenerate_outside_and_overlapping_annotations(tmp_path):
    images = [
        {"id": 1, "file_name": "a.png", "width": 10, "height": 10},
        {"id": 2, "file_name": "b.png", "width": 10, "height": 10},
    ]
    anns = [
        annotation(11, 1, 1, [rectangle(0, 0, 4, 4)]),
        annotation(12, 1, 1, [rectangle(3, 3, 6, 6)]),  # overlaps 11 in pixel (3, 3)
        annotation(13, 1, 1, [[1.0, 1.0, 2.0, 2.0]]),  # two points: nothing to draw
        annotation(14, 1, 1, [rectangle(8, 0, 13, 2)]),  # reaches 3 px past the right edge
        annotation(21, 2, 1, [rectangle(0, 0, 2, 2)]),
        annotation(22, 2, 1, [rectangle(5, 5, 7, 7)]),  # touches nothing
    ]
    write_coco(
        tmp_path / "data" / "_annotations.coco.json",
        images,
        anns,
        [{"id": 1, "name": "thing", "supercategory": "none"}],
    )
    for name in ("a.png", "b.png"):
        Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(tmp_path / "data" / name)
    source = discover(tmp_path / "data")
    found = annotation_checks(source, tmp_path / "cache")
    a = str(tmp_path / "data" / "a.png")
    assert found == {"degenerate": {a: ["13"]}, "outside": {a: ["14"]}, "overlapping": {a: ["11+12"]}}
    assert annotation_checks(source, tmp_path / "cache") == found  # read back from the cache


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """10 train photos x 2 files + 2 valid + 2 test photos; photo 0 also has a copy in valid/ and test/."""
    root = tmp_path_factory.mktemp("report") / "export"
    return generate_dataset(root, num_images=14, size=48, seed=6, copies=2, shared=1, splits=(10 / 14, 2 / 14, 2 / 14))


def test_report_counts_files_photos_leaks_and_class_pixels(export, tmp_path):
    dm = SegmentationDataModule(
        root=str(export), image_size=32, num_workers=0, batch_size=2, cache_dir=str(tmp_path / "cache")
    )
    report = build_report(dm)
    split = report["splits"]
    # The shared photo's 4 files are moved into train: train 22 files of 11 photos... 10 photos x 2 + 2 moved.
    assert {s: (split[s]["files"], split[s]["photos"], split[s]["copies"]) for s in split} == {
        "train": (22, 10, 12),
        "val": (2, 2, 0),
        "test": (2, 2, 0),
    }
    assert report["files"] == 26 and report["photos"] == 14
    assert report["leaks"]["used"] == {
        "val_with_copy_in_train": 0,
        "test_with_copy_in_train": 0,
        "test_with_copy_in_val": 0,
        "photos_shared_by_export_splits": 1,
    }
    assert report["leaks"]["export_splits"] == {
        "val_with_copy_in_train": 1,
        "test_with_copy_in_train": 1,
        "test_with_copy_in_val": 1,
    }
    assert report["leaks"]["by_file"] == {}  # the export's own folders: seglab split nothing
    for name in ("train", "val", "test"):
        masks = [dm.datasets[name].load_mask(i) for i in range(len(dm.datasets[name]))]
        pixels = np.bincount(np.concatenate([m.ravel() for m in masks]), minlength=3)[:3]
        shares = dict(zip(dm.class_names, pixels / pixels.sum(), strict=True))
        assert split[name]["pixel_share"] == pytest.approx(shares)
        assert split[name]["images_with"] == {
            c: sum(int((m == i).any()) for m in masks) for i, c in enumerate(dm.class_names) if i
        }
        assert split[name]["without_objects"] == [
            dm.relative(s.image) for s, m in zip(dm.splits[name], masks, strict=True) if not m.any()
        ]
        # The trivial model's mIoU (the majority class everywhere) from the same pixels, with its interval.
        trivial = split[name]["trivial"]
        present = int((pixels > 0).sum())
        assert trivial["class"] == dm.class_names[int(pixels.argmax())]
        assert trivial["mIoU"]["value"] == pytest.approx(pixels.max() / pixels.sum() / present)
        assert trivial["mIoU"]["low"] <= trivial["mIoU"]["value"] <= trivial["mIoU"]["high"]
    text = format_report(report)
    assert (
        f"Predicting {split['test']['trivial']['class']} everywhere scores test mIoU "
        f"{interval_text(split['test']['trivial']['mIoU'])}" in text
    )
    assert "| seglab's splits (used) | 0 | 0 | 0 |" in text
    assert "| the export's own folders, as exported | 1 | 1 | 1 |" in text
    assert re.search(r"- img_0000_jpg: train: .*; val: valid/img_0000_jpg\.rf\.[0-9a-f]+\.jpg; test: ", text)
    empty = split["train"]["without_objects"]
    assert len(empty) >= 1 and f"- train: {len(empty)} image(s) without any object, e.g. {empty[0]}" in text
    # The sheet shows the rarest class first: its first image has the most triangle pixels of all.
    counts = report["_counts"]
    rarest = 2 if sum(c[2] for s in counts for c in counts[s]) < sum(c[1] for s in counts for c in counts[s]) else 1
    first_split, first_index = sheet_picks(report, dm, 12)[0]
    assert counts[first_split][first_index][rarest] == max(c[rarest] for s in counts for c in counts[s])


def test_report_command_writes_text_json_sheet_and_a_self_contained_page(export, tmp_path, capsys):
    out = tmp_path / "report"
    result = main(
        [
            f"data.root={export}",
            f"data.cache_dir={tmp_path / 'cache'}",
            f"out={out}",
            "data.num_workers=0",
            "data.shared_photos=warn",
        ]
    )
    printed = capsys.readouterr().out
    assert "| seglab's splits (used) | 1 | 1 | 1 |" in printed  # warn: left where the export put them
    assert (out / "report.md").read_text() in printed
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(result))
    page = (out / "report.html").read_text()
    assert "<table>" in page and 'src="http' not in page and "<script" not in page
    pictures = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert 1 <= len(pictures) <= 12
    first = Image.open(io.BytesIO(base64.b64decode(pictures[0])))
    assert first.size == (2 * 320, 320)  # image | mask over it, 48 px photos shown at 320
    sheet = Image.open(out / "sheet.png")
    assert sheet.width == 2 * 2 * 320 + 30 and sheet.height > 320


def test_report_command_names_a_bad_setting(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([f"data.root={tmp_path / 'missing'}", f"out={tmp_path / 'out'}"])
    assert exit_info.value.code == 1
    assert "seglab: error: data.root=" in capsys.readouterr().err
