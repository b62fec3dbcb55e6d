import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from helpers import served_mask
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from seglab.conversions import PredictorCalibration, quantize_int8
from seglab.data.masks import load_image
from seglab.errors import SeglabError
from seglab.export import KEEP_TRACES, cached_trace, export, trace_cache_path
from seglab.export_checks import check_parity, parity_image
from seglab.models.checkpoint import build_datamodule, load_checkpoint
from seglab.models.inference import OnnxModel, Predictor, load_predictor

ROOT = Path(__file__).resolve().parents[1]
OP_TYPES = ["Conv", "Add", "Relu", "Concat"]  # conf/export.yaml quantization.op_types


def compose_export(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("export", overrides=list(overrides))


def first_test_image(demo_root: Path) -> np.ndarray:
    return load_image(sorted((demo_root / "test").glob("*.jpg"))[0])


@pytest.fixture(scope="module")
def mobilenet_export(trained_run, tmp_path_factory) -> dict:
    output = tmp_path_factory.mktemp("export") / "model.onnx"
    result = export(compose_export(f"ckpt_path={trained_run['checkpoint']}", f"output={output}"))
    return {**result, "checkpoint": trained_run["checkpoint"]}


def test_export_writes_a_dynamic_onnx_model_and_its_sidecar(mobilenet_export, demo_root):
    output, ckpt = Path(mobilenet_export["output"]), Path(mobilenet_export["checkpoint"])
    sidecar = json.loads(output.with_suffix(".json").read_text())
    module = load_checkpoint(ckpt)
    assert sidecar["class_names"] == module.class_names == ["background", "disc", "triangle"]
    assert sidecar["palette"] == [list(c) for c in module.palette]
    assert (sidecar["image_size"], sidecar["mean"], sidecar["std"]) == (64, module.meta["mean"], module.meta["std"])
    assert sidecar["ignore_index"] == 255
    assert sidecar["architecture"] == "deeplabv3_mobilenet_v3_large"
    assert sidecar["source_checkpoint"] == str(ckpt.resolve())
    assert sidecar["source_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert sidecar["opset"] == 18 and sidecar["format"] == "onnx" and sidecar["precision"] == "fp32"
    assert sidecar["size_bytes"] == output.stat().st_size
    parity = sidecar["parity"]
    masks = parity["masks"]  # fp32 too: the export's masks on the val split against the truth and PyTorch
    assert (masks["split"], masks["images"], masks["pixels"], masks["passed"]) == ("val", 2, 2 * 64 * 64, True)
    assert masks["agreement"] >= 0.999 and abs(masks["mIoU_drop"]) <= 0.01
    assert parity["passed"] and [c["input"].split(" ")[:2] for c in parity["checks"]] == [
        ["random", "1x3x64x64"],
        ["random", "2x3x49x99"],
        ["image", str(sorted(demo_root.rglob("*.jpg"))[0])],
    ]
    assert all(
        c["max_abs_diff"] <= 1e-3 * max(1, c["max_abs_logit"]) and c["class_agreement"] >= 0.999
        for c in parity["checks"]
    )

    model = onnx.load(str(output))
    assert [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == [
        "batch",
        3,
        "height",
        "width",
    ]
    assert [o.name for o in model.graph.output] == ["logits"]  # the main head only, no aux output
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 18
    # Sizes it was never traced at: batch 3, 37 x 53.
    x = torch.randn(3, 3, 37, 53)
    logits = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"]).run(None, {"image": x.numpy()})[0]
    with torch.no_grad():
        reference = module(x).numpy()
    assert logits.shape == (3, 3, 37, 53)
    np.testing.assert_allclose(logits, reference, rtol=0, atol=1e-4)


def test_onnx_predictor_gives_the_checkpoints_masks(mobilenet_export, demo_root):
    from_onnx = load_predictor(mobilenet_export["output"], device="cpu")
    from_ckpt = load_predictor(mobilenet_export["checkpoint"], device="cpu")
    assert from_onnx.class_names == from_ckpt.class_names
    for path in sorted((demo_root / "test").glob("*.jpg")):
        image = load_image(path)
        torch.testing.assert_close(from_onnx.logits(image), from_ckpt.logits(image), rtol=0, atol=1e-4)
        np.testing.assert_array_equal(from_onnx.predict(image), from_ckpt.predict(image))


def test_parity_check_fails_when_onnx_and_pytorch_differ(mobilenet_export, demo_root):
    reference = load_predictor(mobilenet_export["checkpoint"], device="cpu")
    candidate = Predictor(OnnxModel(mobilenet_export["output"]), reference.meta)
    image = first_test_image(demo_root)
    assert check_parity(reference, candidate, image, "test image", 1e-3, 0.999, seed=0)["passed"]
    # The PyTorch side drifts from the export: +0.5 on the disc logit everywhere.
    with torch.no_grad():
        reference.model.module.net.classifier[-1].bias[1] += 0.5
    with pytest.raises(SeglabError, match=r"does not reproduce PyTorch on random 1x3x64x64: max \|logit diff\| 0\.5"):
        check_parity(reference, candidate, image, "test image", 1e-3, 0.999, seed=0)


def test_parity_image_without_the_training_data(trained_run, demo_root, tmp_path):
    module = load_checkpoint(trained_run["checkpoint"])
    cfg = compose_export("ckpt_path=x.ckpt", "output=x.onnx")
    image, name = parity_image(cfg, module)
    assert name == str(sorted(demo_root.rglob("*.jpg"))[0]) and image.shape == (64, 64, 3)
    module.meta["config"]["data"]["root"] = str(tmp_path / "moved")
    image, name = parity_image(cfg, module)
    assert name == "synthetic" and image.shape == (96, 128, 3) and image.dtype == np.uint8 and image.std() > 1
    cfg.image = str(sorted(demo_root.rglob("*.jpg"))[-1])
    assert parity_image(cfg, module)[1] == cfg.image


def test_export_never_overwrites(mobilenet_export):
    output = Path(mobilenet_export["output"])
    before = output.read_bytes()
    with pytest.raises(SeglabError, match=r"model\.onnx already exists; an export is never overwritten"):
        export(compose_export(f"ckpt_path={mobilenet_export['checkpoint']}", f"output={output}"))
    assert output.read_bytes() == before


def test_a_checkpoints_next_export_takes_its_graph_from_the_trace_cache(mobilenet_export, tmp_path, capsys):
    first = Path(mobilenet_export["output"])
    digest = json.loads(first.with_suffix(".json").read_text())["source_sha256"]
    cached = trace_cache_path(digest, 18)
    assert cached.read_bytes() == first.read_bytes()  # an fp32 export is the traced graph itself
    again = export(compose_export(f"ckpt_path={mobilenet_export['checkpoint']}", f"output={tmp_path / 'again.onnx'}"))
    sidecar = json.loads(Path(again["sidecar"]).read_text())
    assert sidecar["trace"] == "cache" and sidecar["parity"]["passed"] and len(sidecar["parity"]["checks"]) == 3
    assert Path(again["output"]).read_bytes() == first.read_bytes()
    assert "fp32, 42.4 MiB, fp32 graph from the trace cache\n" in capsys.readouterr().out


def tiny_graph(path: Path, name: str) -> None:
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"], name=name)],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    onnx.save(onnx.helper.make_model(graph), str(path))


def test_the_trace_cache_traces_once_retraces_a_broken_entry_and_keeps_the_newest(tmp_path):
    traced = []

    def trace(path):
        traced.append(path.name)
        tiny_graph(path, f"trace{len(traced)}")

    cache = tmp_path / "cache"
    assert cached_trace(tmp_path / "a.onnx", cache / "k0.onnx", trace) is False and traced == ["a.onnx"]
    assert cached_trace(tmp_path / "b.onnx", cache / "k0.onnx", trace) is True and traced == ["a.onnx"]
    assert (tmp_path / "b.onnx").read_bytes() == (tmp_path / "a.onnx").read_bytes() == (cache / "k0.onnx").read_bytes()
    (cache / "k0.onnx").write_bytes(b"half a grap")  # an interrupted copy, a foreign file
    assert cached_trace(tmp_path / "c.onnx", cache / "k0.onnx", trace) is False and traced[-1] == "c.onnx"
    assert onnx.load(str(cache / "k0.onnx")).graph.node[0].name == "trace2"
    for k in range(1, KEEP_TRACES + 1):
        cached_trace(tmp_path / f"k{k}.onnx", cache / f"k{k}.onnx", trace)
        os.utime(cache / f"k{k}.onnx", (k, k))  # k0 stays the newest (now), k1 the oldest
    assert sorted(p.name for p in cache.iterdir()) == ["k0.onnx", *(f"k{k}.onnx" for k in range(2, KEEP_TRACES + 1))]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("format=tensorrt", r"format='tensorrt' is not supported; choose one of \['onnx', 'openvino'\]"),
        (
            "precision=int4",
            r"precision='int4' is not supported for format=onnx; choose one of \['fp32', 'fp16', 'int8'\]",
        ),
        (
            "format=openvino precision=fp16",
            r"precision='fp16' is not supported for format=openvino; choose one of \['fp32', 'int8'\]",
        ),
        (
            "precision=int8 quantization.calibrate_method=Median",
            r"quantization.calibrate_method='Median' is not one of \['MinMax', 'Entropy', 'Percentile'\]",
        ),
        (
            "format=openvino precision=int8 quantization.nncf.preset=accurate",
            r"quantization.nncf.preset='accurate' is not one of \['performance', 'mixed'\]",
        ),
        ("opset=13", r"opset=13 is too old: use 17 or later"),
        ("output=model.pt", r"output='model.pt' must be a file name ending in \.onnx for format=onnx"),
        ("format=openvino", r"output='.*model\.onnx' must be a file name ending in \.xml for format=openvino"),
    ],
)
def test_export_rejects_bad_settings(trained_run, tmp_path, override, message):
    overrides = [f"ckpt_path={trained_run['checkpoint']}", f"output={tmp_path / 'model.onnx'}", *override.split()]
    with pytest.raises(SeglabError, match=message):
        export(compose_export(*overrides))
    assert list(tmp_path.iterdir()) == []


def test_export_needs_a_checkpoint(tmp_path):
    with pytest.raises(SeglabError, match=r"Checkpoint .*missing\.ckpt does not exist"):
        export(compose_export(f"ckpt_path={tmp_path / 'missing.ckpt'}", f"output={tmp_path / 'model.onnx'}"))


# One network per family (MobileNetV3 in the tests above): ResNet-101 and MiT-B2 are ResNet-50 and MiT-B0 with more
# and wider blocks of the same operators, so their exports take the same path (85 s of the suite for no new op).
@pytest.mark.slow
@pytest.mark.heavy  # ONNX export and ONNX Runtime parity of full-size networks (~30 s and ~60 s of tracing)
@pytest.mark.parametrize("model", ["deeplabv3_resnet50", "segformer"])
def test_export_parity_for_every_architecture(compose_train, tmp_path, demo_root, model):
    from seglab.train import train

    # Two training steps give BatchNorm statistics and weights that are not the initial ones.
    ckpt = train(compose_train(f"model={model}"))["checkpoint"]
    result = export(compose_export(f"ckpt_path={ckpt}", f"output={tmp_path / 'model.onnx'}"))
    assert result["parity"]["passed"] and len(result["parity"]["checks"]) == 3
    from_onnx = load_predictor(result["output"], device="cpu")
    from_ckpt = load_predictor(ckpt, device="cpu")
    image = first_test_image(demo_root)
    np.testing.assert_array_equal(from_onnx.predict(image), from_ckpt.predict(image))


@pytest.mark.slow  # four tiny trainings, exports and servers
@pytest.mark.parametrize(
    ("model", "encoder"),
    [
        ("unet", "tu-resnet18"),
        ("fpn", "tu-efficientnet_b0"),
        ("upernet", "tu-convnext_atto"),
        ("deeplabv3plus", "tu-resnet18"),
    ],
)
def test_smp_decoders_over_timm_encoders_train_export_and_serve(compose_train, tmp_path, demo_root, model, encoder):
    """UNet, FPN, UPerNet and DeepLabV3+ (conf/model, with small encoders of the same timm families as their
    configs' ResNet-50, EfficientNet-B0 and ConvNeXt-Tiny) go the whole way as the other networks do: trained,
    exported with parity, and served, the served mask equal to the checkpoint's. UPerNet's graph would run at its
    traced size only: its export is refused with the reason, and the server takes its checkpoint."""
    from fastapi.testclient import TestClient

    from seglab.serve.app import create_app
    from seglab.train import train

    ckpt = train(compose_train(f"model={model}", f"model.encoder={encoder}"))["checkpoint"]
    served = ckpt
    if model == "upernet":
        with pytest.raises(
            SeglabError, match=r"^upernet cannot be exported: its pyramid pooling .* ONNX Runtime fails"
        ):
            export(compose_export(f"ckpt_path={ckpt}", f"output={tmp_path / 'model.onnx'}"))
        assert not list(tmp_path.glob("*.onnx")) and not list(tmp_path.glob(".model-export-*"))
    else:
        result = export(compose_export(f"ckpt_path={ckpt}", f"output={tmp_path / 'model.onnx'}"))
        assert result["parity"]["passed"] and len(result["parity"]["checks"]) == 3
        served = result["output"]
    image_path = sorted((demo_root / "test").glob("*.jpg"))[0]
    expected = load_predictor(ckpt, device="cpu").predict(load_image(image_path))
    with TestClient(create_app(load_predictor(served, device="cpu"))) as client:
        np.testing.assert_array_equal(served_mask(client, image_path), expected)


@pytest.mark.slow  # ONNX export and ONNX Runtime parity of full-size networks
def test_export_script(trained_run, tmp_path):
    output = tmp_path / "exported" / "model.onnx"
    cmd = [
        sys.executable,
        "export.py",
        f"ckpt_path={trained_run['checkpoint']}",
        f"output={output}",
        f"hydra.run.dir={tmp_path / 'hydra'}",
    ]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert f"seglab export: {output} (+ model.json)" in done.stdout
    assert "parity PyTorch vs ONNX Runtime on 3 inputs: max |logit diff|" in done.stdout
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 1
    assert again.stderr.strip() == (
        f"seglab: error: {output} already exists; an export is never overwritten. "
        "Choose another output=<file>.onnx or move the old export away."
    )


def test_predict_py_and_the_web_api_take_the_export(mobilenet_export, demo_root, tmp_path):
    from fastapi.testclient import TestClient
    from PIL import Image

    from seglab.predict import predict
    from seglab.serve.app import create_app

    outputs = {}
    for name, model in (("ckpt", mobilenet_export["checkpoint"]), ("onnx", mobilenet_export["output"])):
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
    assert [p.name for p in outputs["onnx"]] == [p.name for p in outputs["ckpt"]]
    for onnx_mask, ckpt_mask in zip(outputs["onnx"], outputs["ckpt"], strict=True):
        np.testing.assert_array_equal(np.asarray(Image.open(onnx_mask)), np.asarray(Image.open(ckpt_mask)))

    with TestClient(create_app(load_predictor(mobilenet_export["output"], device="cpu"))) as client:
        assert client.get("/v1/model").json()["format"] == "onnx"
        image_path = sorted((demo_root / "test").glob("*.jpg"))[0]
        np.testing.assert_array_equal(served_mask(client, image_path), np.asarray(Image.open(outputs["ckpt"][0])))


def test_loading_a_broken_export_says_what_to_fix(mobilenet_export, tmp_path):
    lone = tmp_path / "lone.onnx"
    lone.write_bytes(Path(mobilenet_export["output"]).read_bytes())
    with pytest.raises(SeglabError, match=r"lone\.json is missing: an exported model needs its sidecar JSON"):
        load_predictor(lone, device="cpu")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    garbage.with_suffix(".json").write_text(Path(mobilenet_export["sidecar"]).read_text())
    with pytest.raises(SeglabError, match=r"garbage\.onnx is not an ONNX model ONNX Runtime can load"):
        load_predictor(garbage, device="cpu")


@pytest.fixture(scope="module")
def reduced_exports(trained_run, tmp_path_factory) -> dict:
    """int8 and fp16 exports of the tiny trained model, with their default checks and settings."""
    folder = tmp_path_factory.mktemp("reduced")
    return {
        precision: export(
            compose_export(
                f"ckpt_path={trained_run['checkpoint']}", f"output={folder / precision}.onnx", f"precision={precision}"
            )
        )
        for precision in ("int8", "fp16")
    }


def val_split(ckpt: str):
    datamodule = build_datamodule(load_checkpoint(ckpt), ckpt)
    datamodule.setup("test")
    return datamodule.datasets["val"]


def test_int8_and_fp16_exports_load_and_carry_their_mask_check(reduced_exports, trained_run, mobilenet_export):
    from torchmetrics.functional.classification import multiclass_jaccard_index

    ckpt = trained_run["checkpoint"]
    reference = load_predictor(ckpt, device="cpu")
    val = val_split(ckpt)
    images, targets = zip(*(val.load(i) for i in range(len(val))), strict=True)
    expected = np.stack([reference.predict(image) for image in images])
    fp32_size = Path(mobilenet_export["output"]).stat().st_size
    for precision, result in reduced_exports.items():
        output = Path(result["output"])
        sidecar = json.loads(output.with_suffix(".json").read_text())
        assert sidecar["precision"] == result["precision"] == precision and sidecar["format"] == "onnx"
        assert sidecar["size_bytes"] == output.stat().st_size
        masks = sidecar["parity"]["masks"]
        assert (masks["split"], masks["images"], masks["passed"]) == ("val", 2, True)
        assert (masks["max_mIoU_drop"], masks["min_agreement"]) == (0.01, 0.99)
        # The fp32 graph is checked at the logit level as before: a wrong export is caught before conversion.
        assert len(sidecar["parity"]["checks"]) == 3 and sidecar["parity"]["passed"]

        predictor = load_predictor(output, device="cpu")
        assert predictor.meta["precision"] == precision and predictor.class_names == reference.class_names
        got = np.stack([predictor.predict(image) for image in images])
        # The sidecar's numbers, recomputed: agreement as the share of equal pixels, mIoU with torchmetrics.
        assert masks["agreement"] == pytest.approx(float((got == expected).mean()), abs=1e-12)
        target = torch.from_numpy(np.stack(targets).astype(np.int64))
        miou = {
            name: float(
                multiclass_jaccard_index(
                    torch.from_numpy(m.astype(np.int64)), target, 3, average="macro", ignore_index=255
                )
            )
            for name, m in (("export", got), ("pytorch", expected))
        }
        assert masks["mIoU_export"] == pytest.approx(miou["export"], abs=1e-6)
        assert masks["mIoU_pytorch"] == pytest.approx(miou["pytorch"], abs=1e-6)
        assert masks["mIoU_drop"] == pytest.approx(miou["pytorch"] - miou["export"], abs=1e-6)

        model = onnx.load(str(output))
        # float32 in and out whatever is inside: callers feed and read what an fp32 export takes.
        assert [i.type.tensor_type.elem_type for i in (*model.graph.input, *model.graph.output)] == [
            onnx.TensorProto.FLOAT
        ] * 2
        weights = {onnx.helper.tensor_dtype_to_np_dtype(t.data_type) for t in model.graph.initializer if t.dims}
        ops = {n.op_type for n in model.graph.node}
        if precision == "int8":
            assert {"QuantizeLinear", "DequantizeLinear"} <= ops and np.dtype(np.int8) in weights
            assert sidecar["conversion"]["format"] == "QDQ" and sidecar["conversion"]["per_channel"] is True
            conversion = sidecar["conversion"]
            assert (conversion["op_types"], conversion["calibrate_method"]) == (OP_TYPES, "Entropy")
            assert sidecar["conversion"]["calibration_images"] == 16  # the whole (16-image) train split: < 32
            assert output.stat().st_size < fp32_size / 3
        else:
            assert np.dtype(np.float16) in weights and sidecar["conversion"]["keep_io_types"] is True
            assert output.stat().st_size < fp32_size * 0.6


def test_calibration_feeds_the_network_what_the_predictor_feeds_it(trained_run, demo_root):
    reference = load_predictor(trained_run["checkpoint"], device="cpu")
    # At base_size 128 the 64 px demo images are predicted over 64 px tiles, 3 x 3 of them in two passes.
    meta = {**reference.meta, "base_size": 128}
    seen = []

    def network(x):
        seen.append(x.numpy().copy())
        return reference.model(x)

    images = [first_test_image(demo_root), load_image(sorted((demo_root / "test").glob("*.jpg"))[1])]
    for image in images:
        Predictor(network, meta).logits(image)
    reader = PredictorCalibration(Predictor(reference.model, meta), iter(images), "image")
    fed = list(iter(reader.get_next, None))
    assert [batch.shape for batch in seen] == [(8, 3, 64, 64), (1, 3, 64, 64)] * 2
    # One tile at a time, in the order the Predictor ran them.
    assert reader.fed == len(fed) == 18 and {batch["image"].shape for batch in fed} == {(1, 3, 64, 64)}
    np.testing.assert_array_equal(np.concatenate([batch["image"] for batch in fed]), np.concatenate(seen))

    # Strided calibration (quantize_static's CalibStridedMinMax=1, which export uses): one image's tiles per range.
    ranged = PredictorCalibration(Predictor(reference.model, meta), iter(images), "image", count=2)
    assert len(ranged) == 2
    passes = []
    for start in range(2):
        ranged.set_range(start_index=start, end_index=start + 1)
        passes.append(list(iter(ranged.get_next, None)))
    assert [len(one) for one in passes] == [9, 9] and ranged.get_next() is None
    np.testing.assert_array_equal(np.concatenate([b["image"] for one in passes for b in one]), np.concatenate(seen))


def test_a_tolerance_that_cannot_be_met_fails_with_the_numbers_and_writes_nothing(trained_run, tmp_path):
    cfg = compose_export(
        f"ckpt_path={trained_run['checkpoint']}",
        f"output={tmp_path / 'model.onnx'}",
        "precision=fp16",
        "parity.masks.max_miou_drop=-1",
    )  # the export must beat PyTorch by 1
    with pytest.raises(
        SeglabError,
        match=r"The onnx fp16 export's masks are too far from the fp32 PyTorch model's on "
        r"the val split \(2 images\): mIoU \d\.\d{4} vs \d\.\d{4} \(drop "
        r"-?\d\.\d{4}, allowed -1\), \d+\.\d\d% of pixels agree \(required "
        r"99\.00%\)\. The export was removed\.",
    ):
        export(cfg)
    assert list(tmp_path.iterdir()) == []  # neither the model, its sidecar nor the work folder


def test_reduced_precision_needs_the_labelled_data(trained_run, tmp_path):
    cfg = compose_export(
        f"ckpt_path={trained_run['checkpoint']}",
        f"output={tmp_path / 'model.onnx'}",
        "precision=int8",
        f"data_root={tmp_path / 'moved'}",
    )
    with pytest.raises(
        SeglabError,
        match=r"precision=int8 needs the checkpoint's labelled data .* but .*moved is "
        r"not there\. Give its folder with data_root=",
    ):
        export(cfg)
    assert list(tmp_path.iterdir()) == []


def test_histogram_calibration_over_inputs_of_several_shapes_says_what_to_use(mobilenet_export, trained_run, tmp_path):
    reference = load_predictor(trained_run["checkpoint"], device="cpu")
    rng = np.random.default_rng(0)
    # Predicted whole at the model's scale: 64x64 and 40x64 inputs, which Entropy's histograms cannot stack.
    images = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((64, 64, 3), (40, 64, 3))]
    reader = PredictorCalibration(reference, iter(images), "image")
    settings = OmegaConf.create({"per_channel": True, "op_types": ["Conv"], "calibrate_method": "Entropy"})
    with pytest.raises(
        SeglabError,
        match=r"quantization.calibrate_method=Entropy needs calibration inputs of one "
        r"shape, but the training images give several \(3x40x64, 3x64x64, "
        r"\.\.\.: .*Use quantization.calibrate_method=MinMax\.",
    ):
        quantize_int8(Path(mobilenet_export["output"]), tmp_path / "int8.onnx", reader, settings)


def test_deploy_bench_scores_an_export_as_its_own_mask_check_did(mobilenet_export, demo_root):
    from seglab.bench.deploy import bench_exports

    model = Path(mobilenet_export["output"])
    rows = bench_exports([model, model], demo_root, "val", repeats=1)
    masks = json.loads(model.with_suffix(".json").read_text())["parity"]["masks"]
    assert [r["images"] for r in rows] == [masks["images"]] * 2
    assert rows[0]["mIoU"] == pytest.approx(masks["mIoU_export"], abs=1e-12)  # same split, model and confusion
    assert rows[1]["agreement_with_first"] == 1.0 and rows[1]["mIoU_drop"] == 0.0
    assert rows[0]["size_mb"] == model.stat().st_size / 2**20 and rows[0]["images_per_s"] > 0
