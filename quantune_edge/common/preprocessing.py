"""Calibration/evaluation samples: image folders or .npy arrays, preprocessed the model's way.

Samples are held channels-last (N, H, W, C) float32, the layout of the TFLite models onnx2tf emits;
:meth:`Samples.for_layout` gives the ONNX model's own layout when it differs.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from quantune_edge.errors import InputError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}

# (mean, std, channel order) in 0-255 pixel units; x = (pixel - mean) / std, per model channel.
PRESETS: dict[str, tuple[tuple[float, ...], tuple[float, ...], str]] = {
    "torch": ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375), "rgb"),
    "tf": ((127.5, 127.5, 127.5), (127.5, 127.5, 127.5), "rgb"),
    "raw": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "rgb"),
    "caffe": ((104.0, 117.0, 123.0), (1.0, 1.0, 1.0), "bgr"),
}
DEFAULT_PRESET = "torch"


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes a model input: resize the shorter side, center-crop, normalise.

    ``mean``/``std`` are in 0-255 units and in the order of the channels fed to the model (after
    ``channel_order`` is applied), so Caffe-style BGR means read as (B, G, R).
    """

    input_size: int | None = None
    resize: int | None = None
    mean: tuple[float, ...] = PRESETS[DEFAULT_PRESET][0]
    std: tuple[float, ...] = PRESETS[DEFAULT_PRESET][1]
    channel_order: Literal["rgb", "bgr"] = "rgb"
    preset: str | None = DEFAULT_PRESET

    def with_input_size(self, size: int) -> Preprocessing:
        """Fill in the crop size (the model's) and the default resize round(S / 0.875)."""
        crop = self.input_size or size
        return Preprocessing(crop, self.resize or round(crop / 0.875), self.mean, self.std, self.channel_order, self.preset)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Preprocessing:
        return cls(
            input_size=data.get("input_size"),
            resize=data.get("resize"),
            mean=tuple(float(v) for v in data["mean"]),
            std=tuple(float(v) for v in data["std"]),
            channel_order=data.get("channel_order", "rgb"),
            preset=data.get("preset"),
        )


def _triple(text: str | Sequence[float], what: str) -> tuple[float, ...]:
    if isinstance(text, str):
        try:
            values = tuple(float(v) for v in text.split(","))
        except ValueError:
            raise InputError(f"--{what} takes numbers like 123.7,116.3,103.5, got {text!r}") from None
    else:
        values = tuple(float(v) for v in text)
    if len(values) == 1:
        values = values * 3
    if len(values) != 3:
        raise InputError(f"--{what} takes one or three values, got {len(values)}")
    return values


def make_preprocessing(
    preset: str | None = None,
    mean: str | Sequence[float] | None = None,
    std: str | Sequence[float] | None = None,
    input_size: int | None = None,
    resize: int | None = None,
    channel_order: str | None = None,
) -> Preprocessing:
    """Build a :class:`Preprocessing` from CLI-style options; explicit values override the preset."""
    name = preset or DEFAULT_PRESET
    if name not in PRESETS:
        raise InputError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    p_mean, p_std, p_order = PRESETS[name]
    std_t = _triple(std, "std") if std is not None else p_std
    if any(s == 0 for s in std_t):
        raise InputError("--std must not contain zero")
    order = (channel_order or p_order).lower()
    if order not in ("rgb", "bgr"):
        raise InputError(f"--channel-order must be rgb or bgr, got {channel_order!r}")
    for value, flag in ((input_size, "input-size"), (resize, "resize")):
        if value is not None and value <= 0:
            raise InputError(f"--{flag} must be positive, got {value}")
    if input_size and resize and resize < input_size:
        raise InputError(f"--resize ({resize}) must be at least --input-size ({input_size})")
    custom = mean is not None or std is not None or channel_order is not None
    return Preprocessing(
        input_size=input_size,
        resize=resize,
        mean=_triple(mean, "mean") if mean is not None else p_mean,
        std=std_t,
        channel_order=order,  # type: ignore[arg-type]
        preset=None if custom and preset is None else name,
    )


def load_image(path: Path, prep: Preprocessing, channels: int = 3) -> np.ndarray:
    """Decode one image to (S, S, C) float32: shorter side to ``resize`` (bilinear), center crop."""
    from PIL import Image

    if prep.input_size is None or prep.resize is None:
        raise ValueError("preprocessing needs input_size and resize; call with_input_size first")
    with Image.open(path) as img:
        img = img.convert("L" if channels == 1 else "RGB")
        w, h = img.size
        scale = prep.resize / min(w, h)
        img = img.resize((max(prep.input_size, round(w * scale)), max(prep.input_size, round(h * scale))), Image.BILINEAR)
        w, h = img.size
        left, top = (w - prep.input_size) // 2, (h - prep.input_size) // 2
        img = img.crop((left, top, left + prep.input_size, top + prep.input_size))
        pixels = np.asarray(img, dtype=np.float32)
    if channels == 1:
        return ((pixels - float(np.mean(prep.mean))) / float(np.mean(prep.std)))[..., None]
    if prep.channel_order == "bgr":
        pixels = pixels[..., ::-1]
    return (pixels - np.asarray(prep.mean, np.float32)) / np.asarray(prep.std, np.float32)


@dataclass
class Samples:
    """Preprocessed samples, channels-last, with labels (-1 = unknown) and where they came from."""

    data: np.ndarray
    labels: np.ndarray
    names: list[str]
    source: str
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.data.shape[0])

    @property
    def has_labels(self) -> bool:
        return bool(np.any(self.labels >= 0))

    def for_layout(self, layout: str) -> np.ndarray:
        return self.data.transpose(0, 3, 1, 2) if layout == "NCHW" else self.data


def select(count: int, num: int | None, seed: int = 0) -> np.ndarray:
    """A deterministic subset of ``num`` of ``count`` items: seeded shuffle, first ``num``."""
    order = np.random.default_rng(seed).permutation(count)
    return order if num is None or num >= count else order[:num]


def load_samples(
    source: str | Path,
    prep: Preprocessing,
    shape_nhwc: tuple[int, int, int],
    layout: str,
    num: int | None = None,
    seed: int = 0,
    on_item: Callable[[], None] | None = None,
    what: str = "calibration",
    labels: Callable[[Path], dict[str, int]] | None = None,
) -> Samples:
    """Load ``num`` samples from an image folder or a preprocessed ``.npy`` (model's layout).
    ``labels`` reads an image folder's labels (file name -> label), as the task defines them
    (``Task.read_labels``); without it the samples are unlabelled."""
    path = Path(source)
    if not path.exists():
        raise InputError(f"{what} data not found: {path}")
    h, w, c = shape_nhwc
    if path.is_file():
        return _load_npy(path, shape_nhwc, layout, num, seed, what)
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise InputError(f"no images (JPEG/PNG) found in {what} folder {path}")
    labels_by_file = labels(path) if labels else {}
    prep = prep.with_input_size(h)
    if prep.input_size != h or h != w:
        raise InputError(f"--input-size {prep.input_size} does not match the model input {h}x{w}")
    chosen = [files[i] for i in select(len(files), num, seed)]
    data, labels, names, skipped = [], [], [], []
    for file in chosen:
        try:
            data.append(load_image(file, prep, c))
            labels.append(labels_by_file.get(file.name, -1))
            names.append(file.name)
        except (OSError, ValueError) as exc:
            skipped.append(f"{file.name}: {exc}")
        if on_item:
            on_item()
    if not data:
        raise InputError(f"none of the {len(chosen)} {what} images in {path} could be read (first: {skipped[0]})")
    return Samples(np.stack(data).astype(np.float32), np.asarray(labels, np.int64), names, str(path), skipped)


def _load_npy(path: Path, shape_nhwc: tuple[int, int, int], layout: str, num: int | None, seed: int, what: str) -> Samples:
    if path.suffix != ".npy":
        raise InputError(f"{what} data must be an image folder or a .npy file, got {path}")
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read {path} as .npy: {exc}") from None
    h, w, c = shape_nhwc
    expected = (c, h, w) if layout == "NCHW" else (h, w, c)
    if array.ndim != 4 or tuple(array.shape[1:]) != expected:
        want = "(N, " + ", ".join(map(str, expected)) + ")"
        raise InputError(f"{path} has shape {tuple(array.shape)}; the model ({layout}) needs {want}")
    if array.shape[0] == 0:
        raise InputError(f"{path} holds no samples")
    if not np.all(np.isfinite(array)):
        raise InputError(f"{path} contains NaN or Inf values")
    idx = np.sort(select(array.shape[0], num, seed))
    data = array[idx].astype(np.float32)
    if layout == "NCHW":
        data = data.transpose(0, 2, 3, 1)
    return Samples(np.ascontiguousarray(data), np.full(len(idx), -1, np.int64), [f"{path.name}[{i}]" for i in idx], str(path))
