"""From the traced fp32 ONNX graph to the model an export writes: ONNX Runtime's int8 (static, QDQ) and fp16
conversions, OpenVINO's IR in fp32 and NNCF's int8. Both int8 recipes calibrate on the same inputs: training images
pre-processed as the Predictor does (PredictorCalibration). export.py checks whatever these write, mask by mask.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import torch
from omegaconf import DictConfig

from seglab.errors import SeglabError
from seglab.models.inference import Predictor


class InputRecorder:
    """A Model that keeps the batches a Predictor hands it and answers zero logits: what the network would see."""

    def __init__(self, num_classes: int):
        self.num_classes, self.inputs = num_classes, []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.detach().float().cpu().numpy())
        return torch.zeros(x.shape[0], self.num_classes, *x.shape[2:])


class PredictorCalibration:
    """ONNX Runtime's calibration data reader (CalibrationDataReader's get_next) over images: the inputs the
    Predictor gives its network for them, so the same scaling, normalisation and, for large images, the same
    tiles as at prediction time. One input (1, 3, h, w) at a time: the histogram calibrators (Entropy, Percentile)
    stack every batch's outputs, so batches of 8 and 1 tiles would not fit together. Images are read as needed.

    Given `count` (the number of images), it also serves quantize_static's strided calibration (CalibStridedMinMax,
    which despite its name drives every calibrator): collect_data then runs once per range of images (set_range),
    and only that range's activations are held at once. Without it ONNX Runtime's histogram calibrators hold every
    input's activations until the end: 32 demo images in 128 px ResNet-50 tiles took 24 GB here."""

    def __init__(self, reference: Predictor, images: Iterator[np.ndarray], input_name: str, count: int | None = None):
        self.recorder = InputRecorder(len(reference.class_names))
        self.predictor = reference.with_model(self.recorder)
        self.images, self.input_name, self.fed, self.shapes = images, input_name, 0, set()
        self.count, self.left_in_range = count, None  # None: no range, every image

    def __len__(self) -> int:
        return self.count

    def set_range(self, start_index: int, end_index: int) -> None:
        self.left_in_range = end_index - start_index

    def get_next(self) -> dict | None:
        while not self.recorder.inputs:
            image = None if self.left_in_range == 0 else next(self.images, None)
            if image is None:
                return None
            if self.left_in_range is not None:
                self.left_in_range -= 1
            self.predictor.logits(image)
        batch = self.recorder.inputs.pop(0)
        self.recorder.inputs[:0] = list(batch[1:, None])  # the rest of this call's batch comes next
        self.fed += 1
        self.shapes.add(batch.shape[1:])
        return {self.input_name: batch[:1]}


def quantize_int8(fp32_path: Path, output: Path, reader: PredictorCalibration, settings: DictConfig) -> dict:
    """Static int8 quantisation with ONNX Runtime's own recipe for CNNs on CPUs (quantize_static's guidance):
    quant_pre_process first (graph optimisation and ONNX shape inference: a tensor of unknown shape cannot be
    quantised), then QuantizeLinear/DequantizeLinear pairs (QDQ, which ONNX Runtime fuses into integer kernels)
    with uint8 activations and int8 weights, full 8-bit range (reduce_range only helps CPUs without VNNI).
    Which ops and how activation ranges are calibrated: conf/export.yaml's quantization node."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quant_pre_process, quantize_static

    prepared = output.with_name("prepared.onnx")
    quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
    op_types = list(settings.op_types) if settings.op_types else None
    try:
        quantize_static(
            str(prepared),
            str(output),
            reader,
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            reduce_range=False,
            per_channel=bool(settings.per_channel),
            op_types_to_quantize=op_types,
            calibrate_method=CalibrationMethod[settings.calibrate_method],
            extra_options={"CalibStridedMinMax": 1} if reader.count else {},
        )  # one image per pass
    except ValueError:
        if len(reader.shapes) < 2:
            raise
        # The histogram calibrators stack every input's activations into one array.
        shapes = ", ".join("x".join(map(str, shape)) for shape in sorted(reader.shapes)[:3])
        raise SeglabError(
            f"quantization.calibrate_method={settings.calibrate_method} needs calibration inputs of "
            f"one shape, but the training images give several ({shapes}, ...: images of different "
            "aspect ratios predicted whole). Use quantization.calibrate_method=MinMax."
        ) from None
    prepared.unlink()
    return {
        "method": "onnxruntime.quantization.quantize_static",
        "format": "QDQ",
        "activations": "uint8",
        "weights": "int8",
        "per_channel": bool(settings.per_channel),
        "reduce_range": False,
        "op_types": op_types or "all ONNX Runtime quantises",
        "calibrate_method": settings.calibrate_method,
    }


def convert_fp16(fp32_path: Path, output: Path) -> dict:
    """Weights and arithmetic in float16, inputs and outputs kept float32 (keep_io_types, the documented way for
    mixed-precision deployment: callers feed and read float32 as before). ONNX Runtime's own copy of
    onnxconverter-common's converter, so no extra package; ops it knows to lose accuracy in fp16 stay fp32."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    onnx.save(convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True), str(output))
    return {"method": "onnxruntime.transformers.float16.convert_float_to_float16", "keep_io_types": True}


NNCF_PRESETS = ("performance", "mixed")  # nncf.QuantizationPreset: symmetric or asymmetric activations


def convert_openvino(fp32_path: Path, output: Path) -> dict:
    """The fp32 ONNX graph as OpenVINO IR (output.xml + output.bin beside it), weights kept in float32
    (save_model would store them in float16 by default)."""
    import openvino as ov

    ov.save_model(ov.convert_model(str(fp32_path)), str(output), compress_to_fp16=False)
    return {
        "method": "openvino.convert_model of the fp32 ONNX graph",
        "weights": "fp32",
        "openvino_version": ov.get_version(),
    }


def quantize_openvino(fp32_path: Path, output: Path, reader: PredictorCalibration, settings: DictConfig) -> dict:
    """NNCF's post-training quantisation of the fp32 graph converted to OpenVINO: activation ranges from the
    calibration inputs (every one of them: subset_size is their number), weights int8 per output channel, fast bias
    correction (each quantised layer's mean output shift corrected from the same inputs). Which activations are
    asymmetric: quantization.nncf.preset; which layers stay fp32: NNCF's own patterns for the model's ops."""
    import nncf
    import openvino as ov

    inputs = list(iter(reader.get_next, None))  # NNCF walks the data set more than once: held in memory
    quantized = nncf.quantize(
        ov.convert_model(str(fp32_path)),
        nncf.Dataset(inputs),
        preset=nncf.QuantizationPreset(settings.preset),
        subset_size=len(inputs),
        fast_bias_correction=bool(settings.fast_bias_correction),
    )
    ov.save_model(quantized, str(output), compress_to_fp16=False)
    return {
        "method": "nncf.quantize (post-training, OpenVINO backend)",
        "preset": settings.preset,
        "fast_bias_correction": bool(settings.fast_bias_correction),
        "activations": "int8",
        "weights": "int8 per channel",
        "nncf_version": nncf.__version__,
        "openvino_version": ov.get_version(),
    }
