"""data.root=<export>.zip: unpacked once, safely and atomically, then read exactly as the folder it holds."""

import re
import stat
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
from helpers import masks_by_name, zip_folder
from omegaconf import OmegaConf

from seglab.data.datamodule import SegmentationDataModule
from seglab.data.synthetic import generate_dataset
from seglab.data.transfer import DIGEST_CHARS, file_digest, unpack_export
from seglab.errors import SeglabError
from seglab.models.checkpoint import build_datamodule


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    """A 10-image, 32 px export in each RoboFlow format: format -> folder."""
    base = tmp_path_factory.mktemp("exports")
    return {fmt: generate_dataset(base / fmt, num_images=10, size=32, seed=3, fmt=fmt) for fmt in ("coco", "masks")}


def make_datamodule(root, **kwargs) -> SegmentationDataModule:
    dm = SegmentationDataModule(root=str(root), image_size=32, num_workers=0, batch_size=2, **kwargs)
    dm.setup()
    return dm


def relative_splits(dm) -> dict[str, list[str]]:
    return {k: [dm.relative(s.image) for s in v] for k, v in dm.splits.items()}


def cached_exports(exports_dir: Path) -> list[str]:
    """The unpacked exports in the cache (not its lock files or temporary folders)."""
    folder = exports_dir / "exports"
    return (
        sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")) if folder.is_dir() else []
    )


@pytest.mark.parametrize(("fmt", "prefix"), [("coco", ""), ("masks", ""), ("coco", "my-export/")])
def test_a_zipped_export_reads_exactly_as_its_folder(fmt, prefix, exports, tmp_path):
    folder = exports[fmt]
    archive = zip_folder(folder, tmp_path / "export.zip", prefix)
    from_folder = make_datamodule(folder, cache_dir=str(tmp_path / "folder-cache"))
    from_zip = make_datamodule(archive, exports_dir=str(tmp_path / "cache"))

    unpacked = tmp_path / "cache" / "exports" / file_digest(archive)[:DIGEST_CHARS]
    assert from_zip.root == (unpacked / "my-export" if prefix else unpacked)
    assert (
        from_zip.source.layout == from_folder.source.layout == {"coco": "roboflow_coco", "masks": "roboflow_masks"}[fmt]
    )
    assert from_zip.class_names == from_folder.class_names == ["background", "disc", "triangle"]
    assert relative_splits(from_zip) == relative_splits(from_folder)
    assert [len(v) for v in from_zip.splits.values()] == [8, 1, 1]
    zipped, unzipped = masks_by_name(from_zip), masks_by_name(from_folder)
    assert sorted(zipped) == sorted(unzipped) and len(zipped) == 10
    for name, mask in unzipped.items():
        np.testing.assert_array_equal(zipped[name], mask)
    assert sum(int((m > 0).sum()) for m in zipped.values()) > 0  # the masks hold objects, not only background
    # The mask and image caches live beside the unpacked export, as they do for any folder.
    assert from_zip.cache_dir == from_zip.root / ".seglab_cache"
    assert sorted(p.name for p in from_zip.cache_dir.iterdir()) == sorted(
        p.name for p in (tmp_path / "folder-cache").iterdir()
    )  # masks (COCO) and copy fingerprints


def test_a_second_use_does_not_unpack_again_whatever_the_zips_name(exports, tmp_path):
    archive = zip_folder(exports["coco"], tmp_path / "export.zip")
    cache = tmp_path / "cache"
    folder = unpack_export(archive, cache)
    (folder / "marker").write_text("unpacked once")  # unpacking again would replace the folder and lose it
    renamed = archive.rename(tmp_path / "same-export-other-name.zip")
    assert unpack_export(renamed, cache) == folder
    assert (folder / "marker").read_text() == "unpacked once"
    assert cached_exports(cache) == [file_digest(renamed)[:DIGEST_CHARS]]
    # A different export (here: one more file) is another cache entry.
    other = zip_folder(exports["coco"], tmp_path / "other.zip", extra={"README.roboflow.txt": b"v2"})
    assert unpack_export(other, cache) != folder and len(cached_exports(cache)) == 2


def test_a_run_killed_while_unpacking_leaves_no_partial_export(exports, tmp_path):
    archive = zip_folder(exports["masks"], tmp_path / "export.zip")
    cache = tmp_path / "cache"
    digest = file_digest(archive)[:DIGEST_CHARS]
    stale = cache / "exports" / f".{digest}.4242-deadbeef.tmp"  # what a process killed half-way leaves
    (stale / "train").mkdir(parents=True)
    (stale / "train" / "_classes.csv").write_text("Pixel Value, Class\n0, background\n")
    folder = unpack_export(archive, cache)
    assert not stale.exists()
    assert folder == cache / "exports" / digest
    assert sorted(p.name for p in (folder / "train").iterdir()) == sorted(
        p.name for p in (exports["masks"] / "train").iterdir()
    )


def symlink_entry(name: str, target: str) -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name)
    info.create_system = 3  # Unix, as `zip -y` stores a link: the mode in the high bits, the target as data
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info, target.encode()


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ("../evil.txt", "would be written outside the folder"),
        ("train/../../evil.txt", "would be written outside the folder"),
        ("/tmp/evil.txt", "would be written outside the folder"),
        ("C:/evil.txt", "would be written outside the folder"),
        ("..\\evil.txt", "would be written outside the folder"),
        ("train/link.jpg", "is a symbolic link"),
    ],
)
def test_entries_that_leave_the_folder_or_link_out_are_refused(entry, problem, exports, tmp_path):
    archive = zip_folder(exports["coco"], tmp_path / "export.zip")
    with zipfile.ZipFile(archive, "a") as zf:
        if problem == "is a symbolic link":
            zf.writestr(*symlink_entry(entry, "/etc/passwd"))
        else:
            zf.writestr(entry, b"owned")
    cache = tmp_path / "deep" / "cache"
    with pytest.raises(SeglabError, match=re.escape(f"{archive}: entry {entry!r} {problem}")):
        unpack_export(archive, cache)
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "deep" / "evil.txt").exists()
    assert cached_exports(cache) == []
    assert not any(p.name.endswith(".tmp") for p in (cache / "exports").iterdir())


def test_a_zip_bomb_is_refused_before_anything_is_written(tmp_path):
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("train/_annotations.coco.json", b"\0" * 20_000_000)  # 20 MB of zeros deflate to ~20 kB
    with pytest.raises(SeglabError, match=r"bomb\.zip would unpack to 20,000,000 bytes, more than 100 times"):
        unpack_export(archive, tmp_path / "cache")
    assert cached_exports(tmp_path / "cache") == []


def test_a_corrupt_or_truncated_zip_is_one_clear_error(exports, tmp_path):
    garbage = tmp_path / "garbage.zip"
    garbage.write_bytes(b"this is not a zip file, just text")
    with pytest.raises(
        SeglabError,
        match=r"garbage\.zip is not a zip archive that can be read \(File is not a zip "
        r"file\)\. Download the export from RoboFlow again",
    ):
        SegmentationDataModule(root=str(garbage), exports_dir=str(tmp_path / "cache"))

    whole = zip_folder(exports["coco"], tmp_path / "whole.zip").read_bytes()
    truncated = tmp_path / "truncated.zip"
    truncated.write_bytes(whole[: len(whole) // 2])  # a download cut off half-way: no central directory
    with pytest.raises(SeglabError, match=r"truncated\.zip is not a zip archive that can be read"):
        unpack_export(truncated, tmp_path / "cache")
    assert cached_exports(tmp_path / "cache") == []


def test_a_damaged_entry_found_while_unpacking_leaves_nothing_behind(exports, tmp_path):
    archive = tmp_path / "damaged.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:  # stored: the bytes appear as they are
        zf.writestr("train/_annotations.coco.json", (exports["coco"] / "train" / "_annotations.coco.json").read_bytes())
        zf.writestr("train/zz_last.txt", b"A" * 1000)
    data = bytearray(archive.read_bytes())
    at = data.index(b"A" * 1000)
    data[at + 500] = ord("B")  # the last entry no longer matches its CRC-32: found only after the first is written
    archive.write_bytes(bytes(data))
    with pytest.raises(
        SeglabError,
        match=r"damaged\.zip is not a zip archive that can be read \(Bad CRC-32 for "
        r"file 'train/zz_last\.txt'\)",
    ):
        unpack_export(archive, tmp_path / "cache")
    assert list((tmp_path / "cache" / "exports").iterdir()) == [
        tmp_path / "cache" / "exports" / f"{file_digest(archive)[:DIGEST_CHARS]}.lock"
    ]


def test_a_zip_without_an_export_names_what_it_holds(tmp_path):
    archive = tmp_path / "photos.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("holiday/beach.jpg", b"...")
        zf.writestr("notes.txt", b"...")
    with pytest.raises(
        SeglabError,
        match=r"photos\.zip holds no RoboFlow export: expected train/ valid/ test/ "
        r"folders .* it holds holiday/, notes\.txt\. Export the dataset",
    ):
        unpack_export(archive, tmp_path / "cache")
    assert cached_exports(tmp_path / "cache") == []


def test_evaluate_reads_a_zip_named_in_the_checkpoints_config(exports, compose_train, tmp_path):
    archive = zip_folder(exports["coco"], tmp_path / "export.zip")
    cfg = compose_train(f"data.root={archive}", f"data.exports_dir={tmp_path / 'cache'}", "data.cache_dir=null")
    data = OmegaConf.to_container(cfg.data, resolve=True)
    # What build_datamodule reads from a checkpoint: its meta (the run's resolved config) and the class names.
    checkpoint = types.SimpleNamespace(
        meta={"config": {"data": data}, "image_size": 32, "base_size": 64, "mean": data["mean"], "std": data["std"]},
        class_names=["background", "disc", "triangle"],
        ignore_index=255,
    )
    evaluate_cfg = OmegaConf.create(
        {"data": {"root": None, "exports_dir": None}, "paths": {"output_dir": str(tmp_path)}}
    )
    dm = build_datamodule(checkpoint, "run/checkpoints/best.ckpt", dict(evaluate_cfg.data))
    dm.setup("test")
    assert dm.root == tmp_path / "cache" / "exports" / file_digest(archive)[:DIGEST_CHARS]
    test_images = sorted(p.name for p in (exports["coco"] / "test").glob("*.jpg"))
    assert sorted(s.image.name for s in dm.splits["test"]) == test_images
