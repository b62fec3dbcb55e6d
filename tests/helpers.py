"""Small builders for test data. Importable from any test because tests/conftest.py puts tests/ on
sys.path (pytest's default rootdir-conftest import mode)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
"""The project's Hydra config directory, for tests that compose configs themselves."""


def write_coco(path: Path, images: list[dict], annotations: list[dict], categories: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def rectangle(x0: float, y0: float, x1: float, y1: float) -> list[float]:
    """Polygon of an axis-aligned rectangle; pycocotools fills columns [x0, x1) and rows [y0, y1)."""
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def annotation(ann_id: int, image_id: int, category_id: int, segmentation, iscrowd: int = 0) -> dict:
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "segmentation": segmentation,
        "iscrowd": iscrowd,
    }


def masks_by_name(datamodule) -> dict[str, np.ndarray]:
    """Image file name -> class-index mask at original resolution, over all splits."""
    out = {}
    for dataset in datamodule.datasets.values():
        for i, (image, _) in enumerate(dataset.items):
            out[image.name] = dataset.load(i)[1]
    return out


def zip_folder(folder: Path, archive: Path, prefix: str = "", extra: dict[str, bytes] | None = None) -> Path:
    """`folder`'s files into `archive` as RoboFlow zips an export (paths from the export's top), under `prefix`."""
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            zf.write(path, prefix + path.relative_to(folder).as_posix())
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return archive


def ready_datamodule(root: Path, cache_dir: Path, **kwargs):
    """A SegmentationDataModule on `root` set up for fit (64 px, no workers, batch 2), caches under cache_dir."""
    from seglab.data.datamodule import SegmentationDataModule

    dm = SegmentationDataModule(
        root=str(root), image_size=64, num_workers=0, batch_size=2, cache_dir=str(cache_dir), **kwargs
    )
    dm.setup("fit")
    return dm


def served_mask(client, image_path: Path) -> np.ndarray:
    """The mask the web API answers for an image file (format=mask), checked to be a 200."""
    import io

    from PIL import Image

    response = client.post(
        "/v1/segment",
        params={"format": "mask"},
        files={"image": (image_path.name, image_path.read_bytes(), "image/jpeg")},
    )
    assert response.status_code == 200, response.text
    return np.asarray(Image.open(io.BytesIO(response.content)))
