"""export(cfg): a checkpoint -> an ONNX model (fp32, fp16 or int8) or an OpenVINO IR (fp32 or int8) plus its
sidecar JSON, checked against PyTorch before it counts. export.py calls it; seglab.models.inference.load_predictor reads
what it writes.

Every export is first traced to an fp32 ONNX graph, whose logits must match PyTorch's (a wrong export is caught
here, whatever the precision). The graph is kept in a cache (trace_cache): a checkpoint's next export (another
precision) skips torch.export's trace, most of an export's time. fp16 converts that graph's weights and arithmetic
to half precision; int8 quantises it statically with ONNX Runtime, calibrated on training images. format=openvino
converts that graph to OpenVINO IR, and int8 quantises the IR with NNCF on the same calibration inputs. Then the model
that will be written predicts the validation split through the Predictor, and its masks are compared with the
ground truth and with the fp32 PyTorch model's masks. Only when both checks pass are the model and its sidecar
moved into place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from omegaconf import DictConfig, OmegaConf

from seglab.atomic import replacing
from seglab.conversions import (
    NNCF_PRESETS,
    PredictorCalibration,
    convert_fp16,
    convert_openvino,
    quantize_int8,
    quantize_openvino,
)
from seglab.data.datamodule import SegmentationDataModule
from seglab.data.transfer import default_exports_dir
from seglab.errors import SeglabError, first_line
from seglab.export_checks import check_masks, check_parity, parity_image
from seglab.models.checkpoint import build_datamodule
from seglab.models.inference import OnnxModel, OpenVinoModel, Predictor, load_predictor, model_files
from seglab.models.module import SegmentationModule
from seglab.models.registry import ARCHITECTURES

log = logging.getLogger(__name__)

PRECISIONS = {"onnx": ("fp32", "fp16", "int8"), "openvino": ("fp32", "int8")}  # per format
SUFFIXES = {"onnx": ".onnx", "openvino": ".xml"}
RUNTIMES = {"onnx": OnnxModel, "openvino": OpenVinoModel}
CALIBRATE_METHODS = ("MinMax", "Entropy", "Percentile")  # onnxruntime.quantization.CalibrationMethod
# torch.export specialises a dimension whose example size is 1 (or equal to another one) to a constant:
# the example batch of 2 and a non-square example image keep batch, height and width dynamic.
EXAMPLE_BATCH = 2
# The trace cache: graphs are named by what decides them (checkpoint, opset, torch, TRACE_FORMAT: bump it when
# export_onnx changes what it writes). The newest KEEP_TRACES are kept: a ResNet-50 graph is ~160 MB.
TRACE_FORMAT = 1
KEEP_TRACES = 4


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def export_onnx(module: SegmentationModule, path: Path, opset: int) -> None:
    """The network's main-head logits (N, C, H, W) for a normalised float32 batch (N, 3, H, W); N, H and W
    dynamic. SegmentationModule.forward already returns only net(x)["out"], so the aux head is pruned."""
    size = int(module.meta["image_size"])
    example = torch.randn(EXAMPLE_BATCH, 3, size, size + size // 2)
    dims = {0: torch.export.Dim("batch"), 2: torch.export.Dim("height"), 3: torch.export.Dim("width")}
    # onnx_ir logs every pass of its graph clean-up at INFO.
    logging.getLogger("onnx_ir").setLevel(logging.WARNING)
    try:
        # The torch.export-based exporter (dynamo=True), torch's default since 2.9: the TorchScript exporter
        # (dynamo=False) is deprecated. One file (external_data=False): the model and its weights travel
        # together, and even ResNet-101 stays far below protobuf's 2 GB limit.
        torch.onnx.export(
            module,
            (example,),
            str(path),
            dynamo=True,
            opset_version=opset,
            input_names=["image"],
            output_names=["logits"],
            dynamic_shapes=(dims,),
            external_data=False,
            verbose=False,
        )
    except Exception as e:  # noqa: BLE001 - any exporter failure: say which model and keep nothing half-written
        path.unlink(missing_ok=True)
        raise SeglabError(
            f"ONNX export of {module.meta.get('config', {}).get('model', {}).get('arch')} failed: {first_line(e)}"
        ) from None


def cached_trace(path: Path, cached: Path, trace) -> bool:
    """`trace(path)` writes a graph to path, unless `cached` holds one: then path gets a copy of it. A new graph
    is copied into the cache (the oldest beyond KEEP_TRACES removed); an unreadable cached one is traced again.
    True when the graph came from the cache. The cache is a convenience: a failure to write it is only logged."""
    if cached.is_file():
        try:
            with replacing(path) as tmp:
                shutil.copyfile(cached, tmp)
                onnx.load(str(tmp), load_external_data=False)  # a truncated or foreign file: trace again
            os.utime(cached)  # recently used: kept longest
            return True
        except Exception as e:  # noqa: BLE001 - whatever is wrong with the cached copy, the trace replaces it
            log.warning("the cached graph %s is unreadable (%s): tracing again", cached, first_line(e))
            cached.unlink(missing_ok=True)
    trace(path)
    try:
        with replacing(cached) as tmp:
            shutil.copyfile(path, tmp)
        for old in sorted(cached.parent.glob("*.onnx"), key=lambda p: p.stat().st_mtime, reverse=True)[KEEP_TRACES:]:
            old.unlink(missing_ok=True)
    except OSError as e:
        log.warning("could not keep the traced graph in %s: %s", cached.parent, first_line(e))
    return False


def trace_cache_path(digest: str, opset: int) -> Path:
    """Where the fp32 graph of the checkpoint with this sha256 is cached: ~/.cache/seglab/onnx ($XDG_CACHE_HOME)."""
    name = f"{digest[:16]}-opset{opset}-torch{torch.__version__}-v{TRACE_FORMAT}.onnx"
    return default_exports_dir() / "onnx" / name.replace("+", "_")


def resolve_output(cfg: DictConfig) -> Path:
    """output=, or model.onnx / model.xml in the run folder; never an existing export's file."""
    suffix = SUFFIXES[cfg.format]
    output = Path(cfg.output) if cfg.output else Path(cfg.paths.output_dir) / f"model{suffix}"
    if output.suffix != suffix:
        raise SeglabError(
            f"output={str(output)!r} must be a file name ending in {suffix} for format={cfg.format} "
            "(its sidecar JSON is written beside it with the same name)."
        )
    taken = [p for p in (*model_files(output), output.with_suffix(".json")) if p.exists()]
    if taken:
        raise SeglabError(
            f"{taken[0]} already exists; an export is never overwritten. Choose another "
            f"output=<file>{suffix} or move the old export away."
        )
    return output


def labelled_data(cfg: DictConfig, module: SegmentationModule, ckpt: Path):
    """The checkpoint's own data and splits (as its run made them), at data_root= if given; None when the folder
    is not there."""
    root = cfg.data_root or module.meta.get("config", {}).get("data", {}).get("root")
    if not root or not Path(root).is_dir():
        return None
    datamodule = build_datamodule(module, str(ckpt), {"root": str(root)})
    datamodule.setup("test")
    return datamodule


def validate(cfg: DictConfig) -> None:
    if OmegaConf.is_missing(cfg, "ckpt_path"):
        raise SeglabError(
            "ckpt_path is required: python export.py ckpt_path=<run folder>/checkpoints/<name>.ckpt "
            "[format=onnx|openvino] [output=<file>.onnx|.xml] [precision=fp32|fp16|int8]"
        )
    if cfg.format not in PRECISIONS:
        raise SeglabError(f"format={cfg.format!r} is not supported; choose one of {list(PRECISIONS)}.")
    if cfg.precision not in PRECISIONS[cfg.format]:
        raise SeglabError(
            f"precision={cfg.precision!r} is not supported for format={cfg.format}; choose one of "
            f"{list(PRECISIONS[cfg.format])}."
        )
    if cfg.opset < 17:
        # Opset 17 added LayerNormalization (SegFormer's norm as one op); bilinear Resize with half_pixel
        # coordinates (PyTorch's align_corners=False) is older.
        raise SeglabError(f"opset={cfg.opset} is too old: use 17 or later (default 18).")
    if cfg.precision == "int8":
        if cfg.quantization.calibration_images < 1:
            raise SeglabError(
                f"quantization.calibration_images={cfg.quantization.calibration_images} must be at least 1."
            )
        if cfg.quantization.calibrate_method not in CALIBRATE_METHODS:
            raise SeglabError(
                f"quantization.calibrate_method={cfg.quantization.calibrate_method!r} is not one of "
                f"{list(CALIBRATE_METHODS)}."
            )
        if cfg.quantization.nncf.preset not in NNCF_PRESETS:
            raise SeglabError(
                f"quantization.nncf.preset={cfg.quantization.nncf.preset!r} is not one of {list(NNCF_PRESETS)}."
            )


def convert(cfg: DictConfig, fp32_path: Path, reference: Predictor, data) -> tuple[Path, dict | None]:
    """The model the export will write, made from the checked fp32 graph in its folder: (its path, how it was
    made; None for the fp32 ONNX graph itself)."""
    work, precision = fp32_path.parent, cfg.precision
    if precision == "int8":
        train = data.datasets["train"]
        count = min(cfg.quantization.calibration_images, len(train))
        reader = PredictorCalibration(reference, (train.load(i)[0] for i in range(count)), "image", count)
        log.info("calibrating int8 on %d training images", count)
        if cfg.format == "openvino":
            model_path = work / "int8.xml"
            conversion = quantize_openvino(fp32_path, model_path, reader, cfg.quantization.nncf)
        else:
            model_path = work / "int8.onnx"
            conversion = quantize_int8(fp32_path, model_path, reader, cfg.quantization)
        return model_path, {
            **conversion,
            "calibration_split": "train",
            "calibration_images": count,
            "calibration_inputs": reader.fed,
        }
    if cfg.format == "openvino":
        return work / "fp32.xml", convert_openvino(fp32_path, work / "fp32.xml")
    if precision == "fp16":
        return work / "fp16.onnx", convert_fp16(fp32_path, work / "fp16.onnx")
    return fp32_path, None


def refuse_fixed_size(module: SegmentationModule) -> None:
    """An architecture whose exported graph would only run at the traced size is refused before any tracing."""
    model_cfg = module.meta.get("config", {}).get("model", {})
    arch = model_cfg.get("arch")
    why = ARCHITECTURES[arch].fixed_size_export if arch in ARCHITECTURES else None
    if why:
        raise SeglabError(
            f"{arch} cannot be exported: {why}. Serve or predict with the checkpoint itself (serve.py "
            "ckpt_path=<.ckpt>), or train an architecture that exports (model=unet, model=fpn, model=segformer)."
        )


@dataclass
class ExportSource:
    """The checkpoint being exported and what its export is checked against."""

    ckpt: Path
    digest: str  # the checkpoint's sha256: the sidecar's source_sha256 and the trace cache's key
    reference: Predictor  # the checkpoint's own Predictor on the CPU, where the export traces it too
    data: SegmentationDataModule | None  # its labelled data; None when that folder is not there

    @property
    def module(self) -> SegmentationModule:
        return self.reference.model.module


def open_checkpoint(cfg: DictConfig, output: Path) -> ExportSource:
    """The checkpoint's reference Predictor and labelled data, refused before any tracing where its architecture
    would export at a fixed size only or a reduced precision has no data to calibrate and check on; the output's
    folder made."""
    ckpt = Path(cfg.ckpt_path)
    reference = load_predictor(ckpt, device="cpu")
    module = reference.model.module
    refuse_fixed_size(module)
    data = labelled_data(cfg, module, ckpt)
    if data is None and cfg.precision != "fp32":
        root = cfg.data_root or module.meta.get("config", {}).get("data", {}).get("root")
        raise SeglabError(
            f"precision={cfg.precision} needs the checkpoint's labelled data (calibration and the mask "
            f"check), but {root} is not there. Give its folder with data_root=<export folder>."
        )
    output.parent.mkdir(parents=True, exist_ok=True)
    digest = sha256(ckpt)
    log.info("exporting %s -> %s (%s, opset %d, %s)", ckpt, output, cfg.format, cfg.opset, cfg.precision)
    return ExportSource(ckpt, digest, reference, data)


def trace_fp32(cfg: DictConfig, source: ExportSource, path: Path) -> bool:
    """The checkpoint's fp32 ONNX graph at path, from the trace cache if it holds it (trace_cache=true); True when
    it came from there."""
    if not cfg.trace_cache:
        export_onnx(source.module, path, cfg.opset)
        return False
    return cached_trace(
        path, trace_cache_path(source.digest, cfg.opset), lambda graph: export_onnx(source.module, graph, cfg.opset)
    )


def check_candidate_masks(cfg: DictConfig, source: ExportSource, candidate: Predictor) -> dict:
    """The mask check of the model the export writes on the labelled split (seglab.export_checks.check_masks)."""
    masks_cfg = cfg.parity.masks
    return check_masks(
        source.reference,
        candidate,
        source.data.datasets[masks_cfg.split],
        masks_cfg.split,
        f"{cfg.format} {cfg.precision}",
        masks_cfg.max_miou_drop,
        masks_cfg.min_agreement,
    )


@dataclass
class CheckedModel:
    """The model the export writes, in the work folder, and how it came to be."""

    path: Path
    conversion: dict | None  # how it was made from the fp32 graph; None for the fp32 ONNX graph itself
    from_cache: bool  # the fp32 graph came from the trace cache
    parity: dict  # the checks it passed: logits against PyTorch's, and its masks (or why they were not checked)


def build_checked_model(cfg: DictConfig, source: ExportSource, work: Path) -> CheckedModel:
    """The fp32 graph traced and its logits checked against PyTorch's, then the model to write made from it and its
    masks checked; a failed check raises."""
    fp32_path = work / "fp32.onnx"
    from_cache = trace_fp32(cfg, source, fp32_path)
    image, image_name = parity_image(cfg, source.module)
    traced = source.reference.with_model(OnnxModel(fp32_path))
    parity = check_parity(
        source.reference, traced, image, image_name, cfg.parity.rtol, cfg.parity.min_agreement, cfg.parity.seed
    )
    model_path, conversion = convert(cfg, fp32_path, source.reference, source.data)
    if source.data is None:
        parity["masks"] = {"skipped": "the checkpoint's data is not there (data_root=<folder> gives it)"}
        log.warning("mask check skipped: no labelled data (give data_root=<folder>)")
    else:
        candidate = traced if model_path == fp32_path else source.reference.with_model(RUNTIMES[cfg.format](model_path))
        parity["masks"] = check_candidate_masks(cfg, source, candidate)
    return CheckedModel(model_path, conversion, from_cache, parity)


def sidecar_for(cfg: DictConfig, source: ExportSource, model: CheckedModel) -> dict:
    """The sidecar JSON's content: what load_predictor needs to run the model, and where it came from and which
    checks it passed."""
    reference = source.reference
    return {
        **{k: v for k, v in reference.meta.items() if k != "source"},
        "palette": [list(c) for c in reference.palette],
        "format": cfg.format,
        "precision": cfg.precision,
        "opset": cfg.opset,  # of the ONNX graph an OpenVINO IR is converted from
        "input": {"name": "image", "layout": "NCHW float32, normalised with mean/std; N, H, W dynamic"},
        "output": {"name": "logits", "layout": "NCHW float32 at the input's H, W (main head only)"},
        **({"conversion": model.conversion} if model.conversion else {}),
        "size_bytes": sum(f.stat().st_size for f in model_files(model.path)),
        "source_checkpoint": str(source.ckpt.resolve()),
        "source_sha256": source.digest,
        "trace": "cache" if model.from_cache else "traced",
        "torch_version": torch.__version__,
        "parity": model.parity,
    }


def move_into_place(work: Path, model_path: Path, sidecar: dict, output: Path) -> None:
    """The sidecar written in the work folder, then the checked model's files and the sidecar renamed to the
    output's names."""
    sidecar_tmp = work / "sidecar.json"
    sidecar_tmp.write_text(json.dumps(sidecar, indent=2) + "\n")
    for source, target in zip(model_files(model_path)[::-1], model_files(output)[::-1], strict=True):
        os.replace(source, target)  # an IR's .bin before its .xml: a visible .xml always has its weights
    os.replace(sidecar_tmp, output.with_suffix(".json"))


def export(cfg: DictConfig) -> dict:
    """The checkpoint's model in the chosen format and precision, and its sidecar JSON, written only when its
    logits and masks have passed the checks against PyTorch; the summary printed."""
    validate(cfg)
    output = resolve_output(cfg)
    source = open_checkpoint(cfg, output)
    # Everything is written in a hidden folder beside the output and moved into place only when every check has
    # passed: a failed or interrupted export leaves nothing behind.
    with tempfile.TemporaryDirectory(prefix=f".{output.stem}-export-", dir=output.parent) as work:
        model = build_checked_model(cfg, source, Path(work))
        sidecar = sidecar_for(cfg, source, model)
        move_into_place(Path(work), model.path, sidecar, output)
    report(output, cfg.format, cfg.precision, sidecar, model.from_cache)
    return {
        "output": str(output),
        "sidecar": str(output.with_suffix(".json")),
        "format": cfg.format,
        "precision": cfg.precision,
        "parity": model.parity,
    }


def report(output: Path, fmt: str, precision: str, sidecar: dict, from_cache: bool) -> None:
    parity = sidecar["parity"]
    worst = max(c["max_abs_diff"] for c in parity["checks"])
    agree = min(c["class_agreement"] for c in parity["checks"])
    masks = parity["masks"]
    masks_line = (
        f"  masks ({fmt} {precision}) on the {masks['split']} split ({masks['images']} images): mIoU "
        f"{masks['mIoU_export']:.4f} (fp32 PyTorch {masks['mIoU_pytorch']:.4f}, drop "
        f"{masks['mIoU_drop']:.4f}), {100 * masks['agreement']:.2f}% of pixels agree with PyTorch\n"
        if "skipped" not in masks
        else f"  masks: not checked ({masks['skipped']})\n"
    )
    files = " + ".join(f.name for f in model_files(output)[1:] + [output.with_suffix(".json")])
    print(
        f"\nseglab export: {output} (+ {files}), {fmt} {precision}, "
        f"{sidecar['size_bytes'] / 2**20:.1f} MiB" + (", fp32 graph from the trace cache" if from_cache else "") + "\n"
        f"  parity PyTorch vs ONNX Runtime on {len(parity['checks'])} inputs: max |logit diff| {worst:.2e}, "
        f"classes agree on {100 * agree:.3f}% of pixels"
        + (" (the fp32 ONNX graph)" if precision != "fp32" or fmt != "onnx" else "")
        + "\n"
        + masks_line
        + f"  use it: python predict.py ckpt_path={output} input=...   |   make serve CKPT={output}",
        flush=True,
    )
