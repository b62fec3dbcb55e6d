"""format=openvino: OpenVINO IR (fp32, and int8 by NNCF) exported from the tiny trained checkpoint, loaded by the
Predictor, predict.py, the web API and the deploy bench as an .onnx is."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import served_mask
from hydra import compose, initialize_config_dir
from PIL import Image

from seglab.data.masks import load_image
from seglab.errors import SeglabError
from seglab.export import export
from seglab.models.checkpoint import build_datamodule, load_checkpoint
from seglab.models.inference import OpenVinoModel, load_predictor

ROOT = Path(__file__).resolve().parents[1]


def compose_export(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("export", overrides=list(overrides))


@pytest.fixture(scope="module")
def exports(trained_run, tmp_path_factory) -> dict:
    """The checkpoint as ONNX fp32 and as OpenVINO fp32 and int8, each with its default checks."""
    folder = tmp_path_factory.mktemp("openvino")
    ckpt = trained_run["checkpoint"]
    made = {"onnx": export(compose_export(f"ckpt_path={ckpt}", f"output={folder / 'model.onnx'}"))}
    for precision in ("fp32", "int8"):
        made[precision] = export(
            compose_export(
                f"ckpt_path={ckpt}", "format=openvino", f"precision={precision}", f"output={folder / precision}.xml"
            )
        )
    return {name: Path(result["output"]) for name, result in made.items()}


def test_openvino_fp32_export_gives_pytorchs_logits_and_masks(exports, trained_run, demo_root):
    xml = exports["fp32"]
    assert sorted(p.name for p in xml.parent.glob("fp32.*")) == ["fp32.bin", "fp32.json", "fp32.xml"]
    sidecar = json.loads(xml.with_suffix(".json").read_text())
    assert (sidecar["format"], sidecar["precision"], sidecar["architecture"]) == (
        "openvino",
        "fp32",
        "deeplabv3_mobilenet_v3_large",
    )
    assert sidecar["size_bytes"] == xml.stat().st_size + xml.with_suffix(".bin").stat().st_size
    assert sidecar["conversion"]["weights"] == "fp32"
    # float32 weights: the .bin is as large as the ONNX graph's initialisers (save_model's default halves them).
    assert xml.with_suffix(".bin").stat().st_size > 0.95 * exports["onnx"].stat().st_size
    masks = sidecar["parity"]["masks"]
    assert (masks["split"], masks["images"], masks["passed"]) == ("val", 2, True) and masks["agreement"] >= 0.999

    from_xml, from_ckpt = load_predictor(xml, device="cpu"), load_predictor(trained_run["checkpoint"], device="cpu")
    assert isinstance(from_xml.model, OpenVinoModel) and from_xml.model.runtime == "OpenVINO"
    assert from_xml.class_names == from_ckpt.class_names == ["background", "disc", "triangle"]
    for path in sorted((demo_root / "test").glob("*.jpg")):
        image = load_image(path)
        expected = from_ckpt.logits(image)
        first, again = from_xml.logits(image), from_xml.logits(image)  # any-shape model, then the fixed-shape one
        torch.testing.assert_close(first, expected, rtol=0, atol=1e-4)
        torch.testing.assert_close(again, first, rtol=0, atol=1e-5)
        np.testing.assert_array_equal(from_xml.predict(image), from_ckpt.predict(image))
    assert list(from_xml.model.static) == [(1, 3, 64, 64)]  # the demo images' one input shape, compiled for it


def val_split(ckpt: str):
    datamodule = build_datamodule(load_checkpoint(ckpt), ckpt)
    datamodule.setup("test")
    return datamodule.datasets["val"]


def test_openvino_int8_export_carries_its_mask_check(exports, trained_run):
    from torchmetrics.functional.classification import multiclass_jaccard_index

    xml = exports["int8"]
    sidecar = json.loads(xml.with_suffix(".json").read_text())
    assert (sidecar["format"], sidecar["precision"]) == ("openvino", "int8")
    conversion = sidecar["conversion"]
    assert conversion["method"].startswith("nncf.quantize") and conversion["preset"] == "performance"
    # The ONNX int8 export's calibration set: the whole 16-image train split (< 32), one input per image.
    assert (conversion["calibration_split"], conversion["calibration_images"], conversion["calibration_inputs"]) == (
        "train",
        16,
        16,
    )
    # Quantised: FakeQuantize nodes on the activations, int8 weights in a .bin under a third of the fp32 one's.
    assert len(re.findall(r'type="FakeQuantize"', xml.read_text())) >= 20
    assert xml.with_suffix(".bin").stat().st_size < exports["fp32"].with_suffix(".bin").stat().st_size / 3

    ckpt = trained_run["checkpoint"]
    reference, predictor = load_predictor(ckpt, device="cpu"), load_predictor(xml, device="cpu")
    val = val_split(ckpt)
    images, targets = zip(*(val.load(i) for i in range(len(val))), strict=True)
    expected = np.stack([reference.predict(image) for image in images])
    got = np.stack([predictor.predict(image) for image in images])
    masks = sidecar["parity"]["masks"]
    assert (masks["split"], masks["images"], masks["passed"]) == ("val", 2, True)
    # The sidecar's numbers, recomputed: agreement as the share of equal pixels, mIoU with torchmetrics.
    assert masks["agreement"] == pytest.approx(float((got == expected).mean()), abs=1e-12)
    assert masks["agreement"] >= 0.99
    target = torch.from_numpy(np.stack(targets).astype(np.int64))
    miou = {
        name: float(
            multiclass_jaccard_index(torch.from_numpy(m.astype(np.int64)), target, 3, average="macro", ignore_index=255)
        )
        for name, m in (("export", got), ("pytorch", expected))
    }
    assert masks["mIoU_export"] == pytest.approx(miou["export"], abs=1e-6)
    assert masks["mIoU_drop"] == pytest.approx(miou["pytorch"] - miou["export"], abs=1e-6)


def test_an_openvino_int8_export_beyond_tolerance_fails_with_its_numbers_and_writes_nothing(trained_run, tmp_path):
    cfg = compose_export(
        f"ckpt_path={trained_run['checkpoint']}",
        "format=openvino",
        "precision=int8",
        f"output={tmp_path / 'model.xml'}",
        "parity.masks.min_agreement=1.01",
    )  # > every pixel
    with pytest.raises(
        SeglabError,
        match=r"The openvino int8 export's masks are too far from the fp32 PyTorch "
        r"model's on the val split \(2 images\): mIoU \d\.\d{4} vs \d\.\d{4} "
        r"\(drop -?\d\.\d{4}, allowed 0\.01\), \d+\.\d\d% of pixels agree "
        r"\(required 101\.00%\)\. The export was removed\. Try the other "
        r"quantization\.nncf\.preset",
    ):
        export(cfg)
    assert list(tmp_path.iterdir()) == []  # neither the .xml, the .bin, the sidecar nor the work folder


def test_a_broken_openvino_export_says_what_to_fix(exports, tmp_path):
    xml = exports["fp32"]
    again = r": export it again with python export\.py ckpt_path=<checkpoint> format=openvino\.$"

    def copy(name: str, xml_bytes: bytes | None, bin_bytes: bytes | None, sidecar: bool = True) -> Path:
        target = tmp_path / f"{name}.xml"
        target.write_bytes(xml_bytes)
        if bin_bytes is not None:
            target.with_suffix(".bin").write_bytes(bin_bytes)
        if sidecar:
            target.with_suffix(".json").write_text(xml.with_suffix(".json").read_text())
        return target

    def error(model: Path) -> str:
        with pytest.raises(SeglabError) as caught:
            load_predictor(model, device="cpu")
        assert "\n" not in str(caught.value)  # one line, as the command line prints it
        return str(caught.value)

    graph, weights = xml.read_bytes(), xml.with_suffix(".bin").read_bytes()
    assert re.search(
        r"nosidecar\.json is missing: an exported model needs its sidecar JSON",
        error(copy("nosidecar", graph, weights, sidecar=False)),
    )
    assert re.match(
        r"\S*lone\.bin is missing: an OpenVINO model is its \.xml \(the graph\) and its \.bin \(the "
        r"weights\) side by side\. Copy the \.bin with the \.xml, or export it again",
        error(copy("lone", graph, None)),
    )
    assert re.match(
        r"\S*truncated\.xml is not an OpenVINO model OpenVINO can load \(Incorrect weights in bin "
        r"file!\)" + again,
        error(copy("truncated", graph, weights[: len(weights) // 2])),
    )
    cut = graph[: len(graph) // 2].rsplit(b">", 1)[0] + b">"  # ends after a whole tag, as a partial copy might
    assert re.match(
        r"\S*cut\.xml is not an OpenVINO model OpenVINO can load \(no element found: line \d+, column "
        r"\d+\)" + again,
        error(copy("cut", cut, weights)),
    )
    assert re.match(
        r"\S*renamed\.xml is not an OpenVINO model OpenVINO can load \(.+\)" + again,
        error(copy("renamed", exports["onnx"].read_bytes(), weights)),
    )  # an .onnx renamed .xml


def test_predict_py_and_the_web_api_take_an_openvino_export(exports, trained_run, demo_root, tmp_path):
    from fastapi.testclient import TestClient

    from seglab.predict import predict
    from seglab.serve.app import create_app

    outputs = {}
    for name, model in (("ckpt", trained_run["checkpoint"]), ("xml", exports["fp32"])):
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose(
                "predict",
                overrides=[
                    "device=cpu",
                    f"ckpt_path={model}",
                    f"input={demo_root / 'test'}",
                    f"output={tmp_path / name}",
                ],
            )
        assert predict(cfg)["images"] == 2
        outputs[name] = sorted((tmp_path / name).glob("*_mask.png"))
    assert [p.name for p in outputs["xml"]] == [p.name for p in outputs["ckpt"]]
    for xml_mask, ckpt_mask in zip(outputs["xml"], outputs["ckpt"], strict=True):
        np.testing.assert_array_equal(np.asarray(Image.open(xml_mask)), np.asarray(Image.open(ckpt_mask)))

    for precision in ("fp32", "int8"):
        with TestClient(create_app(load_predictor(exports[precision], device="cpu"))) as client:
            info = client.get("/v1/model").json()
            assert (info["format"], info["precision"], info["runtime"]) == ("openvino", precision, "OpenVINO")
            image_path = sorted((demo_root / "test").glob("*.jpg"))[0]
            mask = served_mask(client, image_path)
            expected = np.asarray(Image.open(outputs["ckpt"][0]))
            assert (mask == expected).mean() >= (1.0 if precision == "fp32" else 0.99)
    with TestClient(create_app(load_predictor(exports["onnx"], device="cpu"))) as client:
        assert client.get("/v1/model").json()["runtime"] == "ONNX Runtime"


def test_the_deploy_bench_compares_onnx_runtime_and_openvino_and_says_which_to_use(exports, demo_root, capsys):
    from seglab.bench.deploy import main

    models = [exports["onnx"], exports["fp32"], exports["int8"]]
    rows = main(["exports", *map(str, models), "--data", str(demo_root), "--split", "val", "--repeats", "1"])["exports"]
    assert [(r["runtime"], r["precision"]) for r in rows] == [
        ("ONNX Runtime", "fp32"),
        ("OpenVINO", "fp32"),
        ("OpenVINO", "int8"),
    ]
    sidecars = [json.loads(m.with_suffix(".json").read_text())["parity"]["masks"] for m in models]
    for row, masks, model in zip(rows, sidecars, models, strict=True):
        assert row["images"] == masks["images"] == 2
        assert row["mIoU"] == pytest.approx(masks["mIoU_export"], abs=1e-12)  # the export's own mask check
        assert (
            row["size_mb"]
            == sum(p.stat().st_size for p in model.parent.glob(f"{model.stem}.*") if p.suffix != ".json") / 2**20
        )
        assert 0 < row["latency_p50_ms"] <= row["latency_p95_ms"]
        assert row["passes_checks"] == (row["mIoU_drop"] <= 0.01 and row["agreement_with_first"] >= 0.99)
    assert rows[1]["agreement_with_first"] >= 0.999
    best = max((r for r in rows if r["passes_checks"]), key=lambda r: r["images_per_s"])
    out = capsys.readouterr().out
    assert f"use {best['model']} ({best['runtime']} {best['precision']}): the fastest that passes" in out
    assert f"{best['speedup']:.2f}x the first export; target >= 2.0x: " in out


def test_evaluate_py_scores_an_openvino_export_as_its_checkpoint(exports, trained_run, tmp_path):
    from seglab.evaluate import evaluate

    def run(model, *overrides: str) -> dict:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose(
                "evaluate",
                overrides=[
                    f"ckpt_path={model}",
                    "device=cpu",
                    "num_overlays=0",
                    "worst_k=0",
                    f"paths.output_dir={tmp_path / Path(model).name}",
                    f"data.cache_dir={tmp_path / 'cache'}",
                    *overrides,
                ],
            )
        return evaluate(cfg)

    ckpt, xml = run(trained_run["checkpoint"]), run(exports["fp32"])
    assert (xml["split"], xml["images"], xml["pixels"]) == (ckpt["split"], ckpt["images"], ckpt["pixels"])
    assert xml["mIoU"] == ckpt["mIoU"] and xml["per_class"] == ckpt["per_class"]  # the same masks, pixel for pixel
    with pytest.raises(
        SeglabError,
        match=r"resolution=model needs the checkpoint's module; an export \(.*fp32\.xml\) "
        r"is evaluated at resolution=original\.",
    ):
        run(exports["fp32"], "resolution=model")


def test_models_released_in_any_order_leave_the_process_able_to_take_signals(exports):
    # OpenVINO's CPU plugin swaps in its own signal stack per Core and puts back the previous one when released: with
    # a Core per model, releasing them out of order left a freed stack, and the next signal (here a child process's
    # exit, handled as torch's DataLoader handles its workers') crashed the process. Run apart: a crash is a result.
    script = f"""
import faulthandler, gc, signal, subprocess
from seglab.models.inference import OpenVinoModel
faulthandler.enable()
signal.signal(signal.SIGCHLD, lambda *args: None)
models = [OpenVinoModel({str(exports["int8"])!r}) for _ in range(2)]
del models[0]
gc.collect()
del models[0]
gc.collect()
for _ in range(3):
    subprocess.run(["true"], check=True)
print("survived")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert (done.returncode, done.stdout.strip()) == (0, "survived"), done.stderr[-2000:]
