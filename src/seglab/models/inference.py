"""The one path from an RGB image to logits or a class mask, for evaluate, predict, the bench and the web app.

Pre-processing is the validation transform of the data node stored with the model (long side at base_size,
or stretched to image_size x image_size for the original recipe, then normalised). The network then sees
either the whole image or image_size x image_size tiles that overlap, their logits averaged where they meet
(MMSegmentation's slide inference): tiles are the size the network was trained on, so a 2048 px photo is
not shrunk to fit one. Optional horizontal-flip test-time augmentation averages the logits of the image and
of its mirror. Logits are resized back to the image's own size before the argmax, or the softmax for class
probabilities and the confidence image (the top class's probability per pixel).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from xml.etree import ElementTree

import cv2
import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F

from seglab.data.transforms import base_scale_size, build_transforms
from seglab.errors import SeglabError, first_line
from seglab.models.checkpoint import load_checkpoint
from seglab.models.sliding import InferencePolicy
from seglab.runtime import inference_autocast, resolve_device

Model = Callable[[torch.Tensor], torch.Tensor]  # normalised (N, 3, h, w) -> logits (N, C, h, w)
CPU = torch.device("cpu")


def resize_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Logits (N, C, h, w) -> float32 (N, C, H, W), bilinear with half-pixel centres (align_corners=False). Resize
    the logits, then take the argmax (as MMSegmentation does): smoother class borders than resizing the
    model-resolution argmax with nearest neighbour. On the CPU OpenCV computes the same interpolation one class
    plane at a time, ~10x faster than F.interpolate (to a 2048 px photo: 0.02 s vs 0.18 s) and within float32
    rounding of the exact (float64) values, where F.interpolate's float32 weights are off by up to ~3e-6 of them."""
    height, width = int(size[0]), int(size[1])
    if logits.device.type != "cpu":
        return F.interpolate(logits.float(), size=(height, width), mode="bilinear", align_corners=False)
    planes = logits.detach().float().contiguous().numpy()
    out = np.empty((*planes.shape[:2], height, width), np.float32)
    for n, c in np.ndindex(*planes.shape[:2]):
        out[n, c] = cv2.resize(planes[n, c], (width, height), interpolation=cv2.INTER_LINEAR)
    return torch.from_numpy(out)


class TorchModel:
    """A SegmentationModule as a Model: on its device, with the autocast it was trained and tested with."""

    runtime = "PyTorch"

    def __init__(self, module, device: torch.device):
        self.module, self.device = module.to(device).eval(), device

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), inference_autocast(self.module, self.device):
            return self.module(x.to(self.device)).float()


def module_meta(module) -> dict:
    """What a Predictor reads from a checkpoint's module: its stored metadata, classes, palette, ignore index."""
    return {
        **module.meta,
        "class_names": module.class_names,
        "palette": module.palette,
        "ignore_index": module.ignore_index,
    }


class Preprocess:
    """An RGB uint8 image (H, W, 3) -> the normalised (3, h, w) input at the scale it is predicted at. Holds no
    model, so it pickles: predict.py runs it in DataLoader worker processes."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        return self.transform(image=image)["image"]


class Predictor:
    """Built once from a model and its metadata (classes, palette, normalisation, sizes)."""

    def __init__(
        self,
        model: Model,
        meta: dict,
        mode: str = "auto",
        flip: bool = False,
        overlap: float = 1 / 3,
        tile_batch: int = 8,
    ):
        self.model, self.meta = model, dict(meta)
        self.class_names = list(meta["class_names"])
        self.palette = [tuple(c) for c in meta["palette"]]
        self.ignore_index = int(meta["ignore_index"])
        self.image_size = int(meta["image_size"])
        self.base_size = meta.get("base_size")  # None: the original recipe's stretch to image_size x image_size
        # Temperature scaling fitted on the validation split (seglab.calibration); 1: the plain softmax (older
        # checkpoints and exports of them). Masks never depend on it.
        self.temperature = float(meta.get("temperature") or 1.0)
        self.policy = InferencePolicy(self.image_size, mode, bool(flip), float(overlap), int(tile_batch))
        geometry = {"kind": "scale_crop" if self.base_size else "stretch"}
        self.transform = build_transforms(
            self.image_size, meta["mean"], meta["std"], base_size=self.base_size, geometry=geometry
        )
        self.preprocess = Preprocess(self.transform)

    def with_model(self, model: Model) -> Predictor:
        """A Predictor of another model (an export of this one, a recorder of its inputs) with this one's metadata
        and inference policy, so both see the same tiles and flips."""
        return Predictor(
            model, self.meta, mode=self.mode, flip=self.flip, overlap=self.overlap, tile_batch=self.tile_batch
        )

    @property
    def mode(self) -> str:
        return self.policy.mode

    @property
    def flip(self) -> bool:
        return self.policy.flip

    @property
    def overlap(self) -> float:
        return self.policy.overlap

    @property
    def tile_batch(self) -> int:
        return self.policy.tiles_per_pass

    def settings(self) -> dict:
        """How predictions were made; stored with evaluation results."""
        return {
            "mode": self.mode,
            "flip": self.flip,
            "tile": self.image_size,
            "overlap": self.overlap,
            "base_size": self.base_size,
        }

    def resolve_mode(self, height: int, width: int) -> str:
        """auto: tiles when the scaled image does not fit one training-size tile, else the whole image."""
        return self.policy.resolve(height, width)

    def scaled_size(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) an image of this size is predicted at (what self.transform resizes it to)."""
        if self.base_size is None:
            return self.image_size, self.image_size
        return base_scale_size(height, width, self.base_size)

    def mode_for(self, image: np.ndarray) -> str:
        return self.resolve_mode(*self.scaled_size(*image.shape[:2]))

    def scaled_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (1, C, h, w) of a transformed image (1, 3, h, w), at that resolution."""
        return self.policy.logits(self.model, x)

    def batch_logits(self, inputs: list[torch.Tensor], sizes: list[tuple[int, int]] | None) -> list[torch.Tensor]:
        """Logits (C, H, W), float32 on the CPU, of pre-processed images (self.preprocess) at their original sizes
        (H, W). Inputs of one shape go through the network together (in slide mode their tiles do, in passes of
        about tile_batch crops); each image's logits are resized back on their own, so an image's result is the
        same whichever batch it came in. sizes=None: at the scale they were predicted at, for the caller to
        resize (resize_logits(logits[None], size)[0] gives the same), e.g. in another process."""
        out: list[torch.Tensor | None] = [None] * len(inputs)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, x in enumerate(inputs):
            by_shape.setdefault(tuple(x.shape), []).append(i)
        for indices in by_shape.values():
            logits = self.scaled_logits(torch.stack([inputs[i] for i in indices]))
            for k, i in enumerate(indices):
                out[i] = (logits[k].float() if sizes is None else resize_logits(logits[k : k + 1], sizes[i])[0]).cpu()
        return out

    def logits_batch(self, images: list[np.ndarray]) -> list[torch.Tensor]:
        """logits() of several RGB uint8 images, those of one size batched together."""
        return self.batch_logits([self.preprocess(image) for image in images], [image.shape[:2] for image in images])

    def logits(self, image: np.ndarray) -> torch.Tensor:
        """Logits (C, H, W), float32 on the CPU, of an RGB uint8 image (H, W, 3), at the image's size."""
        return self.logits_batch([image])[0]

    def predict(self, image: np.ndarray) -> np.ndarray:
        """Class-index mask (H, W) uint8 of an RGB uint8 image (H, W, 3)."""
        return class_mask(self.logits(image))

    def predict_batch(
        self, images: list[np.ndarray], probabilities: bool | list[bool] = False
    ) -> list[tuple[np.ndarray, torch.Tensor | None]]:
        """(mask, class probabilities or None) per image, as predict() and predict_with_probabilities() give them,
        from one batched pass (logits_batch). `probabilities`: for all images, or one flag per image."""
        wanted = probabilities if isinstance(probabilities, list) else [probabilities] * len(images)
        return [
            (class_mask(logits), self.probabilities(logits) if want else None)
            for logits, want in zip(self.logits_batch(images), wanted, strict=True)
        ]

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Class probabilities (C, H, W) of logits (C, H, W), with the model's temperature."""
        return calibrated_softmax(logits, self.temperature)

    def predict_with_probabilities(self, image: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
        """predict()'s mask and the class probabilities (C, H, W) float32: the softmax of the same logits, one
        forward pass. The mask is the logits' argmax, not the probabilities': near-equal logits can round to
        equal probabilities, and the mask must never differ from predict()'s. The probabilities are calibrated
        on the validation split when the checkpoint holds a temperature (train.py fits one), else the network's
        plain softmax, which is over-confident."""
        logits = self.logits(image)
        return class_mask(logits), self.probabilities(logits)


def calibrated_softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Class probabilities (C, H, W) of logits (C, H, W): the softmax of logits / temperature (seglab.calibration;
    1: the plain softmax). Predictor.probabilities, and predict.py's writer processes, which get the number only."""
    return (logits / temperature).softmax(dim=0)


def unsure_pixels(probabilities: torch.Tensor, min_confidence: float) -> np.ndarray:
    """Pixels (H, W) bool whose top class probability is below min_confidence: predict.py writes them with the
    ignore value in masks and hatched in overlays, the server counts them."""
    return (probabilities.max(dim=0).values < min_confidence).numpy()


def class_mask(logits: torch.Tensor) -> np.ndarray:
    """The argmax over classes of logits (C, H, W) on the CPU, uint8 (H, W); of equal maxima the first class, as
    torch.argmax. One comparison pass per class: torch's argmax over the leading dimension is ~20x slower here
    (3 classes at 2048 px: 0.66 s vs 0.03 s)."""
    best = logits[0].detach().float().clone()
    mask = torch.zeros(best.shape, dtype=torch.uint8)
    for c in range(1, logits.shape[0]):
        mask.masked_fill_(logits[c] > best, c)
        torch.maximum(best, logits[c], out=best)
    return mask.numpy()


def sample_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A seeded textured RGB uint8 image (two colours in stripes at an angle, a gradient, pixel noise), for when
    no real image is at hand: export's fallback parity image, the load test's default request. Deploy code reads
    no data generator; a real photo gives the numbers that matter."""
    rng = np.random.default_rng(seed)
    colour_a, colour_b = rng.uniform(30, 225, (2, 3))
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) / max(height, width, 1)
    angle = rng.uniform(0, np.pi)
    u = xx * np.cos(angle) + yy * np.sin(angle)
    stripes = np.floor(u / rng.uniform(0.05, 0.2)) % 2
    weight = (0.6 * stripes + 0.4 * (u - u.min()) / max(float(np.ptp(u)), 1e-6))[..., None]
    image = colour_a * (1 - weight) + colour_b * weight + rng.normal(0, 12, (height, width, 3))
    return np.clip(image, 0, 255).round().astype(np.uint8)


def confidence_image(probabilities: torch.Tensor) -> np.ndarray:
    """The top class's probability per pixel as 8-bit grey (H, W): 0-255 stands for 0-1, round(255 x p)."""
    return (probabilities.max(dim=0).values * 255).round().to(torch.uint8).numpy()


TENSORRT_CACHE = Path.home() / ".cache" / "seglab" / "tensorrt"


def execution_providers(device: torch.device, available: list[str]) -> list:
    """ONNX Runtime's execution providers for a device, best first; each runs the nodes the ones before it cannot.
    On CUDA: TensorRT, then CUDA, when onnxruntime has them (onnxruntime-gpu); the CPU always last. TensorRT builds
    an engine per input shape the first time it sees one (minutes); engines are cached in TENSORRT_CACHE. An int8
    export's QuantizeLinear/DequantizeLinear pairs are TensorRT's explicit quantization: no calibration table."""
    providers: list = ["CPUExecutionProvider"]
    if device.type == "cuda":
        index = device.index or 0
        if "CUDAExecutionProvider" in available:
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": index}))
        if "TensorrtExecutionProvider" in available:
            providers.insert(
                0,
                (
                    "TensorrtExecutionProvider",
                    {
                        "device_id": index,
                        "trt_engine_cache_enable": True,
                        "trt_engine_cache_path": str(TENSORRT_CACHE),
                        "trt_timing_cache_enable": True,
                        "trt_timing_cache_path": str(TENSORRT_CACHE),
                    },
                ),
            )
    return providers


class OnnxModel:
    """An exported model (export.py, fp32, fp16 or int8; inputs and outputs float32 in all three) as a Model, run
    by ONNX Runtime: on the GPU when the device is CUDA and onnxruntime has a GPU provider (execution_providers),
    else on the CPU."""

    runtime = "ONNX Runtime"

    def __init__(self, path: str | Path, device: torch.device = CPU):
        providers = execution_providers(device, ort.get_available_providers())
        options = ort.SessionOptions()
        # As many threads as PyTorch uses, and none spinning while idle: spinning threads take the cores the
        # pre-processing, the web server and the rest of the machine need (3x slower under load here).
        options.intra_op_num_threads = torch.get_num_threads()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as e:  # noqa: BLE001 - ONNX Runtime's own exceptions: not a model it can run
            raise SeglabError(
                f"{path} is not an ONNX model ONNX Runtime can load "
                f"({first_line(e)}). "
                "Export it again with python export.py ckpt_path=<checkpoint>."
            ) from None
        self.input = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.session.run(None, {self.input: x.detach().float().cpu().numpy()})[0]
        return torch.from_numpy(logits)


@functools.cache
def openvino_core():
    """One OpenVINO Core per process, never released. Each Core's CPU plugin installs its own signal stack when it
    starts and puts back the one it found when it is released: Cores released out of order (one per model, freed by
    the garbage collector) left a freed stack installed, and the next signal handled on it (a child process's exit)
    crashed the process."""
    import openvino as ov

    return ov.Core()


class OpenVinoModel:
    """An OpenVINO IR export (export.py format=openvino: model.xml, its weights in model.bin; fp32 or int8 inside,
    float32 in and out) as a Model, compiled for the CPU whatever the device, with as many threads as PyTorch uses.
    What is not int8 is computed in float32: on CPUs with bfloat16 units OpenVINO's default would be bfloat16, which
    the export's mask check did not see (the check runs this class)."""

    runtime = "OpenVINO"
    MAX_STATIC = 8

    def __init__(self, path: str | Path, device: torch.device = CPU):
        path = Path(path)
        again = "export it again with python export.py ckpt_path=<checkpoint> format=openvino."
        if not path.with_suffix(".bin").is_file():
            raise SeglabError(
                f"{path.with_suffix('.bin')} is missing: an OpenVINO model is its .xml (the graph) and "
                f"its .bin (the weights) side by side. Copy the .bin with the .xml, or {again}"
            )
        try:
            # Read as XML first: OpenVINO would offer a file that is not IR to each of its other front ends
            # (TensorFlow's logs its own parse errors), then name none of the reasons.
            if ElementTree.parse(path).getroot().tag != "net":
                raise ValueError("its root element is not <net>")
            self.core = openvino_core()
            self.model = self.core.read_model(str(path))
            self.config = {
                "INFERENCE_NUM_THREADS": torch.get_num_threads(),
                "INFERENCE_PRECISION_HINT": "f32",
                "PERFORMANCE_HINT": "LATENCY",
            }
            self.compiled = self.core.compile_model(self.model, "CPU", self.config)
        except Exception as e:  # noqa: BLE001 - XML's, OpenVINO's RuntimeError (and others): not an IR it can run
            # OpenVINO's message starts with where it was raised; the reason is its last line.
            reason = [line for line in str(e).splitlines() if line.strip()][-1:] or [type(e).__name__]
            raise SeglabError(
                f"{path} is not an OpenVINO model OpenVINO can load ({reason[0].strip()}): {again}"
            ) from None
        self.request = self.compiled.create_infer_request()
        self.seen: dict[tuple[int, ...], int] = {}
        self.static: dict[tuple[int, ...], object] = {}

    def request_for(self, shape: tuple[int, ...]):
        """The model compiled for this input shape from its second time on (the Predictor's tiles, a server's usual
        photo size), up to MAX_STATIC shapes; else the one compiled for any shape. OpenVINO's CPU plugin picks
        faster kernels for a fixed shape (docs/deployment.md); compiling one takes a fraction of a second."""
        if shape in self.static:
            return self.static[shape]
        self.seen[shape] = self.seen.get(shape, 0) + 1
        if self.seen[shape] < 2 or len(self.static) >= self.MAX_STATIC:
            return self.request
        fixed = self.model.clone()
        fixed.reshape({0: list(shape)})
        self.static[shape] = self.core.compile_model(fixed, "CPU", self.config).create_infer_request()
        return self.static[shape]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().float().cpu().numpy()
        request = self.request_for(tuple(x.shape))
        request.infer({0: x})
        return torch.from_numpy(request.get_output_tensor(0).data.copy())  # the request reuses its buffer


EXPORT_MODELS = {".onnx": OnnxModel, ".xml": OpenVinoModel}  # an export's suffix -> the runtime that runs it


def model_files(path: Path) -> list[Path]:
    """The files of an export (an OpenVINO .xml has its weights in the .bin beside it), without the sidecar."""
    return [path, path.with_suffix(".bin")] if path.suffix == ".xml" else [path]


def read_sidecar(path: Path) -> dict:
    """The metadata export.py wrote beside an .onnx or .xml model (same name, .json)."""
    sidecar = path.with_suffix(".json")
    if not path.is_file():
        raise SeglabError(
            f"Exported model {path} does not exist. Export one with python export.py "
            f"ckpt_path=<checkpoint> output=<file>{path.suffix}."
        )
    try:
        meta = json.loads(sidecar.read_text())
    except FileNotFoundError:
        raise SeglabError(
            f"{sidecar} is missing: an exported model needs its sidecar JSON (classes, palette, "
            "normalisation, sizes) beside it. Copy it with the "
            f"{path.suffix}, or export again."
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SeglabError(f"{sidecar} is not valid JSON ({e}). Export the model again.") from None
    missing = [
        k
        for k in ("class_names", "palette", "ignore_index", "mean", "std", "image_size")
        if not isinstance(meta, dict) or k not in meta
    ]
    if missing:
        raise SeglabError(
            f"{sidecar} lacks {', '.join(missing)}: it is not a seglab export's sidecar. "
            "Export the model again with export.py."
        )
    return meta


def load_predictor(
    path: str | Path, device: str = "auto", mode: str = "auto", flip: bool = False, overlap: float = 1 / 3
) -> Predictor:
    """A Predictor over a seglab checkpoint (.ckpt) or an export of one (.onnx, or OpenVINO's .xml + .bin, with its
    sidecar .json)."""
    path = Path(path)
    torch_device = resolve_device(device)
    if path.suffix in EXPORT_MODELS:
        meta = {**read_sidecar(path), "source": str(path)}
        return Predictor(EXPORT_MODELS[path.suffix](path, torch_device), meta, mode=mode, flip=flip, overlap=overlap)
    module = load_checkpoint(path, map_location=torch_device)
    meta = {
        **module_meta(module),
        "architecture": module.meta["config"]["model"]["arch"],
        "format": "pytorch",
        "source": str(path),
    }
    return Predictor(TorchModel(module, torch_device), meta, mode=mode, flip=flip, overlap=overlap)
