import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def test_committed_notebook_has_no_outputs():
    code = [c for c in nbformat.read(NOTEBOOK, as_version=4).cells if c.cell_type == "code"]
    assert [(c.outputs, c.execution_count) for c in code] == [([], None)] * len(code)


@pytest.mark.slow  # a real Jupyter kernel runs the report, two tiny epochs, the evaluation and the ONNX
# export (torch.export tracing alone takes ~30 s of CPU)
def test_quickstart_runs_top_to_bottom(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGLAB_QUICKSTART_FAST", "1")  # the 20-image, 64 px export and 2 debug epochs
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the kernel's temporary working folder, removed with tmp_path
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        notebook, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    summary = next(o["data"]["application/json"] for o in outputs if "application/json" in o.get("data", {}))

    run_dir = Path(summary["run_dir"])
    assert run_dir.relative_to(tmp_path).parts[1] == "outputs"  # <temporary folder>/outputs/<date>/<time>
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert (metrics["epochs_run"], summary["checkpoint"], summary["best_epoch"]) == (
        2,
        metrics["checkpoint"],
        metrics["best_epoch"],
    )
    assert summary["best_val_loss_in_curves"] == metrics["best_val"]["val/loss"]
    assert (summary["test_mIoU"], summary["trivial_mIoU"]) == (
        metrics["test"]["test/mIoU"],
        metrics["diagnosis"]["trivial"]["mIoU"],
    )
    printed = "".join(o.get("text", "") for o in outputs if o["output_type"] == "stream")
    interval = metrics["uncertainty"]["test"]["mIoU"]
    assert (
        f"test mIoU {metrics['test']['test/mIoU']:.4f} [{interval['low']:.4f}, {interval['high']:.4f}] over "
        f"{metrics['uncertainty']['test']['images']} images; predicting {metrics['diagnosis']['trivial']['class']} "
        f"everywhere {metrics['diagnosis']['trivial']['mIoU']:.4f}"
    ) in printed
    assert summary["report_files"] == 20
    # Back into labelling: the calibrated run, the 4 new photos ranked with the top 2 as a COCO batch, the run's
    # 2 val and 2 test images reviewed.
    assert summary["temperature"] == metrics["calibration"]["temperature"] > 0
    assert summary["ranked"] == 4 and summary["reviewed"] == 4
    batch = Path(summary["batch"])
    coco = json.loads((batch / "_annotations.coco.json").read_text())
    assert len(coco["images"]) == 2 and sorted(p.name for p in batch.glob("*.png")) == sorted(
        i["file_name"] for i in coco["images"]
    )

    evaluation = json.loads((Path(summary["evaluation_dir"]) / "metrics.json").read_text())
    assert (evaluation["checkpoint"], evaluation["mIoU"]) == (metrics["checkpoint"], summary["evaluation_mIoU"])
    # num_overlays=2, worst_k=1: both first panels and the worst one, shown inline.
    assert [name.split("_")[0] for name in summary["overlays_shown"]] == ["000", "001", "worst01"]
    # Inline pictures: the report's sheet, the curves, the confusion matrix, 3 panels, the new image, the rank's
    # and the review's sheets.
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 9

    assert summary["new_image_shape"] == [96, 96]
    sidecar = json.loads(Path(summary["onnx"]).with_suffix(".json").read_text())
    assert sidecar["parity"]["passed"] and summary["onnx_agreement"] >= sidecar["parity"]["min_agreement"]
