from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_only
from torch.utils.data import DataLoader

from seglab.data.dataset import SegmentationDataset, value_lut
from seglab.data.groups import SPLIT_UNITS, Groups, group_samples
from seglab.data.image_cache import ImageCache
from seglab.data.image_checks import check_images
from seglab.data.loaders import check_min_epoch_samples, check_prefetch_factor, default_num_workers, make_loader
from seglab.data.masks import OVERLAP_POLICIES, build_mask_cache
from seglab.data.sources import Sample, Source, discover, make_palette
from seglab.data.splits import (
    SPLITS,
    carve,
    check_not_empty,
    check_ratios,
    fold_items,
    leak_counts,
    resolve_shared,
    split_items,
    write_splits,
)
from seglab.data.transfer import resolve_root
from seglab.data.transforms import GEOMETRIES, base_scale_size, build_transforms
from seglab.errors import SeglabError

log = logging.getLogger(__name__)


def check_folds(folds: int | None, fold: int | None) -> tuple[int | None, int | None]:
    """cv.folds / cv.fold (conf/train.yaml): both null, or K >= 2 folds and the held-out fold 0..K-1."""
    if folds is None and fold is None:
        return None, None
    if folds is None or int(folds) < 2:
        raise SeglabError(f"cv.folds={folds} must be 2 or more to run cross-validation (e.g. cv.folds=5).")
    if fold is None or not 0 <= int(fold) < int(folds):
        raise SeglabError(
            f"cv.fold={fold} must be one of 0..{int(folds) - 1} with cv.folds={folds} (train.py "
            "runs every fold itself when cv.fold is null)."
        )
    return int(folds), int(fold)


def check_settings(
    overlap: str,
    ignore_index: int,
    geometry: Mapping | None,
    image_size: int,
    batch_size: int,
    base_size: int | None,
) -> dict:
    """The settings checked before the root is resolved (an export unpacked or downloaded); returns the geometry."""
    if overlap not in OVERLAP_POLICIES:
        raise SeglabError(f"data.overlap={overlap!r} is not one of {OVERLAP_POLICIES}.")
    if not 0 <= ignore_index <= 255:
        raise SeglabError(f"data.ignore_index={ignore_index} must be in 0..255 (masks are 8-bit PNGs).")
    geometry = dict(geometry or {"kind": "stretch"})
    if geometry.get("kind") not in GEOMETRIES:
        raise SeglabError(f"augmentation.geometry.kind={geometry.get('kind')!r} is not one of {GEOMETRIES}.")
    sizes = [("data.image_size", image_size), ("batch_size", batch_size)]
    for name, value in [*sizes, *([("data.base_size", base_size)] if geometry["kind"] == "scale_crop" else [])]:
        if value is None or int(value) <= 0:
            raise SeglabError(f"{name}={value} must be a positive integer.")
    return geometry


def square(height: int, width: int, size: int) -> tuple[int, int]:
    return size, size


def cap_long_side(height: int, width: int, size: int) -> tuple[int, int]:
    return (height, width) if max(height, width) <= size else base_scale_size(height, width, size)


class SegmentationDataModule(pl.LightningDataModule):
    def __init__(
        self,
        root: str,
        layout: str = "auto",
        annotation_file: str | None = None,
        image_dir: str | None = None,
        classes: Sequence[str] | None = None,
        resplit: bool = False,
        split_ratios: Sequence[float] = (0.8, 0.1, 0.1),
        split_seed: int = 42,
        split_by: str = "photo",
        cv_folds: int | None = None,
        cv_fold: int | None = None,
        groups: Mapping | None = None,
        shared_photos: str = "move",
        overlap: str = "smaller_on_top",
        ignore_index: int = 255,
        image_size: int = 513,
        base_size: int | None = 1024,
        geometry: Mapping | None = None,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        augmentations: Sequence = (),
        batch_size: int = 8,
        num_workers: int | None = None,
        cache_dir: str | None = None,
        splits_file: str | None = None,
        image_cache: bool = True,
        prefetch_factor: int | None = None,
        min_epoch_samples: int = 0,
        exports_dir: str | None = None,
        roboflow: str | None = None,
        roboflow_format: str = "coco-segmentation",
    ):
        super().__init__()
        self.geometry = check_settings(overlap, ignore_index, geometry, image_size, batch_size, base_size)
        # A .zip is unpacked once, a RoboFlow version downloaded once (seglab.data.transfer); from here on the root
        # is the export folder.
        self.root = resolve_root(root, exports_dir, roboflow, roboflow_format)
        self.layout, self.annotation_file, self.image_dir = layout, annotation_file, image_dir
        self.classes = list(classes) if classes else None
        self.resplit = resplit
        self.split_ratios = check_ratios(split_ratios)
        self.split_seed = split_seed
        if split_by not in SPLIT_UNITS:
            raise SeglabError(f"data.split_by={split_by!r} is not one of {SPLIT_UNITS}.")
        self.split_by = split_by
        self.cv_folds, self.cv_fold = check_folds(cv_folds, cv_fold)
        self.group_settings = dict(groups or {})
        self.shared_photos = shared_photos
        self.overlap = overlap
        self.ignore_index = ignore_index
        self.image_size = int(image_size)
        # The long side of the scale images are trained and predicted at; None: stretched (original recipe).
        self.base_size = int(base_size) if self.geometry["kind"] == "scale_crop" else None
        self.mean, self.std = list(mean), list(std)
        self.augmentations = list(augmentations)
        self.batch_size = int(batch_size)
        self.num_workers = default_num_workers() if num_workers is None else int(num_workers)
        self.cache_dir = Path(cache_dir) if cache_dir else self.root / ".seglab_cache"
        self.image_cache = bool(image_cache)
        self.prefetch_factor = check_prefetch_factor(prefetch_factor)
        self.min_epoch_samples = check_min_epoch_samples(min_epoch_samples)
        self.splits_file = Path(splits_file) if splits_file else None
        self.source: Source | None = None
        self.groups: Groups | None = None
        # Groups of the export's own splits found in several of them: group -> split -> files (as exported).
        self.shared_in_export: dict[str, dict[str, list[str]]] = {}
        self.splits: dict[str, list[Sample]] = {}
        self.datasets: dict[str, SegmentationDataset] = {}

    # Everything downstream (model head, loss, metrics, overlays, checkpoint) reads these.
    @property
    def class_names(self) -> list[str]:
        return self._source().class_names

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def palette(self) -> list[tuple[int, int, int]]:
        return make_palette(self.num_classes)

    def _source(self) -> Source:
        """The export's samples and classes; missing and unreadable images named first, in one line, before any
        mask is drawn or fingerprint taken."""
        if self.source is None:
            source = discover(
                self.root, self.layout, self.annotation_file, self.image_dir, self.classes, self.cache_dir
            )
            check_images(source)
            self.source = source
        return self.source

    def relative(self, path: Path) -> str:
        return str(path.relative_to(self.root)) if path.is_relative_to(self.root) else str(path)

    def _groups(self) -> Groups:
        """Which samples are copies of one photo and which look alike (seglab.data.groups); fingerprints cached in
        cache_dir."""
        if self.groups is None:
            source = self._source()
            samples = [s for split in source.samples.values() for s in split]
            self.groups = group_samples(
                samples, self.cache_dir / "groups", root=self.root, workers=self.num_workers, **self.group_settings
            )
        return self.groups

    def group_of(self, sample: Sample) -> str:
        return self._groups().of[sample.image]

    def unit_of(self, sample: Sample) -> str:
        """What the splits seglab makes keep on one side (data.split_by): the photo, or its scene."""
        return self._groups().unit(self.split_by)[sample.image]

    def scene_of(self, sample: Sample) -> str:
        return self._groups().scene_of[sample.image]

    def unseen(self, split: str) -> list[bool]:
        """Per image of `split`: no copy and no look-alike of it in train (seglab.data.groups)."""
        seen = self._groups().seen_in([s.image for s in self.splits["train"]])
        return [self.group_of(s) not in seen for s in self.splits[split]]

    def near_counts(self, splits: dict[str, list[Sample]] | None = None) -> dict[str, int]:
        """Images of a later split with a copy or a look-alike in an earlier one (leak_counts counts copies)."""
        splits = self.splits if splits is None else splits
        groups = self._groups()
        seen = {s: groups.seen_in([x.image for x in splits.get(s, [])]) for s in SPLITS[:2]}
        return {
            f"{later}_near_{earlier}": sum(self.group_of(x) in seen[earlier] for x in splits.get(later, []))
            for earlier, later in (("train", "val"), ("train", "test"), ("val", "test"))
        }

    def neighbours(self, unit) -> dict[str, set[str]] | None:
        """Look-alike links between scenes where the splits keep scenes together (data.split_by=scene)."""
        return self._groups().neighbours("scene") if unit == self.unit_of and self.split_by == "scene" else None

    def fold_splits(self, unit) -> dict[str, list[Sample]]:
        """Cross-validation: every image pooled, cv_folds folds by unit, fold cv_fold held out as test; val split
        off the rest by unit, at the share data.split_ratios gives val beside train."""
        source, key = self._source(), (lambda s: str(s.image))
        pooled = [s for split in source.samples.values() for s in split]
        near = self.neighbours(unit)
        folds = fold_items(pooled, self.cv_folds, self.split_seed, key=key, group_of=unit, neighbours=near)
        rest = [s for i, fold in enumerate(folds) if i != self.cv_fold for s in fold]
        train_share, val_share, _ = self.split_ratios
        n_val = max(1, round(len(rest) * val_share / max(train_share + val_share, 1e-9)))
        val, train = carve(rest, n_val, self.split_seed, key=key, group_of=unit, neighbours=near)
        return {"train": train, "val": val, "test": folds[self.cv_fold]}

    def make_splits(self, group_of=None) -> tuple[dict[str, list[Sample]], dict[str, dict[str, list[str]]]]:
        """The train/val/test samples and the export's photos found in several of its own splits. Every split
        seglab makes is by group (group_of: the copy groups; the report passes one group per file to show what
        a split by file would have leaked): the copies of one photo never end up on two sides."""
        source, key = self._source(), (lambda s: str(s.image))
        own, quiet = source.samples, group_of is not None
        unit = group_of or self.unit_of
        group_of = group_of or self.group_of
        if self.cv_folds:
            return self.fold_splits(unit), {}
        if "all" in own or self.resplit:
            pooled = [s for split in own.values() for s in split]
            return split_items(
                pooled, self.split_ratios, self.split_seed, key=key, group_of=unit, neighbours=self.neighbours(unit)
            ), {}
        splits = {s: list(own.get(s, [])) for s in SPLITS}
        if self.split_by == "scene" and own.get("val") and own.get("test") and not quiet:
            log.warning(
                "data.split_by=scene shapes the splits seglab makes; %s has its own train/valid/test, used "
                "as they are. data.resplit=true splits it again by scene.",
                source.root,
            )
        # The export's own splits: copies of one photo are moved (data.shared_photos); look-alikes stay where the
        # user put them, reported (near_counts, the dataset report) and left out of the unseen score.
        splits, shared = resolve_shared(
            splits, group_of, self.shared_photos, str(source.root), name=lambda s: self.relative(s.image)
        )
        for missing in ("val", "test"):
            if not splits[missing]:
                total = sum(len(v) for v in own.values())
                n = max(1, round(total * self.split_ratios[1 if missing == "val" else 2]))
                splits[missing], splits["train"] = carve(
                    splits["train"], n, self.split_seed, key=key, group_of=unit, neighbours=self.neighbours(unit)
                )
                if not quiet:
                    log.warning(
                        "%s has no %s folder: using %d image(s) (%d %s(s)) split off the training "
                        "data (seed %d) as the %s split.",
                        source.root,
                        missing,
                        len(splits[missing]),
                        len({unit(s) for s in splits[missing]}),
                        self.split_by,
                        self.split_seed,
                        missing,
                    )
        return splits, shared

    def leak_counts(self) -> dict[str, int]:
        """Images of the splits in use that share a photo with an earlier split (0 unless shared_photos=warn),
        and how many photos the export's own splits shared."""
        return {**leak_counts(self.splits, self.group_of), "photos_shared_by_export_splits": len(self.shared_in_export)}

    def transform(self, train: bool):
        return build_transforms(
            self.image_size,
            self.mean,
            self.std,
            self.augmentations,
            train=train,
            base_size=self.base_size,
            geometry=self.geometry,
            ignore_index=self.ignore_index,
        )

    def prescale(self, train: bool):
        """(height, width) of an image -> the size it is resized to (once, then cached) before the transform.
        A module-level function, not a lambda, so that spawned DataLoader workers can unpickle it."""
        if self.base_size is None:  # stretch: the transform's own Resize then has nothing left to do
            return partial(square, size=self.image_size)
        # scale_crop: only what no scale of the transform uses is dropped: the long side is capped at the
        # largest one it rescales to (base_size x the largest training scale; base_size for evaluation).
        largest = max(round(self.base_size * r) for r in self.geometry["scales"]) if train else self.base_size
        return partial(cap_long_side, size=largest)

    def prepare_data(self) -> None:
        # Lightning runs this in one process per machine before any process runs setup, so under DDP the masks
        # are rasterised once. setup still builds whatever is missing, for callers outside a Trainer.
        source = self._source()
        if source.coco_files:
            build_mask_cache(source, self.cache_dir, self.overlap, self.ignore_index, self.num_workers)
        self._groups()  # fingerprints for copy detection, cached once for every process

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return  # idempotent: Lightning calls setup for fit and again for test
        source = self._source()
        self.splits, self.shared_in_export = self.make_splits()
        moved = (
            f" ({len(self.shared_in_export)} photo(s) found in several of the export's own splits were moved "
            "into the first of them; data.shared_photos=warn keeps them where they are)"
            if self.shared_in_export and self.shared_photos == "move"
            else ""
        )
        check_not_empty(self.splits, str(self.root) + moved)
        if self.splits_file is not None and rank_zero_only.rank == 0:  # every DDP process makes the same splits
            copies = {
                g: [self.relative(p) for p in paths] for g, paths in self._groups().members().items() if len(paths) > 1
            }
            write_splits(
                self.splits,
                self.splits_file,
                name=lambda s: self.relative(s.image),
                split_by=self.split_by,
                cv={"folds": self.cv_folds, "fold": self.cv_fold},
                groups=copies,
                scenes=self._groups().scenes(),
                shared_in_export=self.shared_in_export,
                unseen={
                    s: [self.relative(x.image) for x, u in zip(self.splits[s], self.unseen(s), strict=True) if u]
                    for s in ("val", "test")
                },
            )
        if source.coco_files:
            masks = build_mask_cache(source, self.cache_dir, self.overlap, self.ignore_index, self.num_workers)
            items = {k: [(s.image, masks[s.image]) for s in v] for k, v in self.splits.items()}
        else:
            items = {k: [(s.image, s.mask) for s in v] for k, v in self.splits.items()}
        lut = value_lut(source.mask_values)
        cache = ImageCache(self.cache_dir / "images") if self.image_cache else None
        self.datasets = {
            split: SegmentationDataset(
                items[split],
                self.transform(train=split == "train"),
                lut,
                prescale=self.prescale(train=split == "train"),
                image_cache=cache,
            )
            for split in ("train", "val", "test")
        }
        log.info(
            "Data: %s layout, classes %s, %s",
            source.layout,
            source.class_names,
            ", ".join(f"{k}={len(v)}" for k, v in self.datasets.items()),
        )

    def loader(self, split: str, train: bool = False) -> DataLoader:
        return make_loader(
            self.datasets[split],
            self.batch_size,
            train,
            min_epoch_samples=self.min_epoch_samples if train else 0,
            pad_value=None if train or self.base_size is None else self.ignore_index,
            num_workers=self.num_workers,
            prefetch_factor=self.prefetch_factor,
        )

    def train_dataloader(self) -> DataLoader:
        return self.loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self.loader("val")

    def test_dataloader(self) -> DataLoader:
        return self.loader("test")
