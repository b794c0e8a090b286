"""Calibration/evaluation samples: image folders preprocessed the model's way, or arrays.

Samples are held as the TFLite models onnx2tf emits take them: images channels-last (N, H, W, C)
float32, other inputs in their ONNX layout, several inputs as one structured array
(:mod:`quantune_edge.common.inputs`); :meth:`Samples.onnx_feeds` gives ONNX Runtime's feeds.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np

from quantune_edge.common.inputs import InputSpec, is_loader, load_arrays, onnx_feed, pack
from quantune_edge.errors import InputError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}

# (mean, std, channel order) in 0-255 pixel units; x = (pixel - mean) / std, per model channel.
PRESETS: dict[str, tuple[tuple[float, ...], tuple[float, ...], str]] = {
    "torch": ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375), "rgb"),
    "tf": ((127.5, 127.5, 127.5), (127.5, 127.5, 127.5), "rgb"),
    "raw": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "rgb"),
    "caffe": ((104.0, 117.0, 123.0), (1.0, 1.0, 1.0), "bgr"),
    "yolo": ((0.0, 0.0, 0.0), (255.0, 255.0, 255.0), "rgb"),
}
RESIZE_MODES = ("crop", "letterbox", "stretch")
PLACEMENTS = ("center", "top-left")
DEFAULT_PRESET = "torch"


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes a model input: resize, fit to the input size, normalise.

    ``resize_mode``: ``crop`` resizes the shorter side to ``resize`` and center-crops (classifiers);
    ``letterbox`` scales the whole image into the input keeping its aspect and pads with
    ``pad_value`` (YOLO), placed at the ``placement``; ``stretch`` resizes to the input, aspect lost.
    ``mean``/``std`` are in 0-255 units and in the order of the channels fed to the model (after
    ``channel_order`` is applied), so Caffe-style BGR means read as (B, G, R).
    """

    input_size: int | None = None  # the model input's height (its side when square)
    resize: int | None = None
    mean: tuple[float, ...] = PRESETS[DEFAULT_PRESET][0]
    std: tuple[float, ...] = PRESETS[DEFAULT_PRESET][1]
    channel_order: Literal["rgb", "bgr"] = "rgb"
    preset: str | None = DEFAULT_PRESET
    resize_mode: Literal["crop", "letterbox", "stretch"] = "crop"
    pad_value: float = 114.0
    placement: Literal["center", "top-left"] = "center"
    inputs: tuple[tuple[str, Preprocessing], ...] = ()  # per named image input, where it differs (--input-prep)
    input_width: int | None = None  # the model input's width, when not square (--input-size HxW)

    @property
    def input_hw(self) -> tuple[int, int] | None:
        """(height, width) asked for or filled in, None before :meth:`with_input_size`."""
        return None if self.input_size is None else (self.input_size, self.input_width or self.input_size)

    def for_input(self, name: str) -> Preprocessing:
        """How the image input ``name`` is preprocessed: its own options, else these."""
        own = dict(self.inputs).get(name)
        return own if own is not None else replace(self, inputs=())

    def sized_for(self, specs: list[InputSpec]) -> Preprocessing:
        """Filled in for a model's inputs: the first image input's size (unchanged without one)."""
        images = [s for s in specs if s.is_image]
        return self.with_input_size(*images[0].hwc[:2]) if images else self

    def with_input_size(self, height: int, width: int | None = None) -> Preprocessing:
        """Fill in the input size (the model's, unless given) and the default resize of the shorter
        side, round(min(H, W) / 0.875)."""
        h, w = self.input_hw or (height, width or height)
        return replace(self, input_size=h, input_width=None if w == h else w, resize=self.resize or round(min(h, w) / 0.875))

    def to_dict(self) -> dict:
        data = asdict(replace(self, inputs=()))
        del data["inputs"]
        if self.inputs:
            data["inputs"] = {name: prep.to_dict() for name, prep in self.inputs}
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Preprocessing:
        return cls(
            inputs=tuple((name, cls.from_dict(own)) for name, own in (data.get("inputs") or {}).items()),
            input_size=data.get("input_size"),
            input_width=data.get("input_width"),
            resize=data.get("resize"),
            mean=tuple(float(v) for v in data["mean"]),
            std=tuple(float(v) for v in data["std"]),
            channel_order=data.get("channel_order", "rgb"),
            preset=data.get("preset"),
            resize_mode=data.get("resize_mode", "crop"),
            pad_value=float(data.get("pad_value", 114.0)),
            placement=data.get("placement", "center"),
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
    input_size: int | str | None = None,
    resize: int | None = None,
    channel_order: str | None = None,
    resize_mode: str | None = None,
    pad_value: float | None = None,
    placement: str | None = None,
    per_input: Sequence[str] = (),
) -> Preprocessing:
    """Build a :class:`Preprocessing` from CLI-style options; explicit values override the preset.
    ``per_input`` holds ``NAME:KEY=VALUE`` texts (``--input-prep``): an image input's own options,
    on top of the others."""
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
    hw = parse_input_size(input_size)
    if resize is not None and resize <= 0:
        raise InputError(f"--resize must be positive, got {resize}")
    if hw and resize and resize < min(hw):
        raise InputError(f"--resize ({resize}) must be at least the shorter side of --input-size ({min(hw)})")
    if (resize_mode or "crop") not in RESIZE_MODES:
        raise InputError(f"--resize-mode must be one of {', '.join(RESIZE_MODES)}, got {resize_mode!r}")
    if (placement or "center") not in PLACEMENTS:
        raise InputError(f"--placement must be one of {', '.join(PLACEMENTS)}, got {placement!r}")
    if pad_value is not None and not 0 <= pad_value <= 255:
        raise InputError(f"--pad-value is a 0-255 pixel value, got {pad_value}")
    custom = mean is not None or std is not None or channel_order is not None
    given = {"preset": preset, "mean": mean, "std": std, "input_size": input_size, "resize": resize, "channel_order": channel_order,
             "resize_mode": resize_mode, "pad_value": pad_value, "placement": placement}
    inputs = tuple((name, make_preprocessing(**{**given, **own})) for name, own in _per_input_options(per_input).items())
    return Preprocessing(
        inputs=inputs,
        input_size=hw[0] if hw else None,
        input_width=hw[1] if hw and hw[1] != hw[0] else None,
        resize=resize,
        mean=_triple(mean, "mean") if mean is not None else p_mean,
        std=std_t,
        channel_order=order,  # type: ignore[arg-type]
        preset=None if custom and preset is None else name,
        resize_mode=resize_mode or "crop",  # type: ignore[arg-type]
        pad_value=114.0 if pad_value is None else float(pad_value),
        placement=placement or "center",  # type: ignore[arg-type]
    )


def parse_input_size(value: int | str | None) -> tuple[int, int] | None:
    """``--input-size``: S (square) or HxW, as (height, width)."""
    if value is None:
        return None
    parts = str(value).lower().split("x")
    try:
        sizes = [int(v) for v in parts]
    except ValueError:
        sizes = []
    if len(sizes) not in (1, 2) or any(v <= 0 for v in sizes):
        raise InputError(f"--input-size takes a positive S or HxW (e.g. 224 or 480x640), got {value!r}")
    return (sizes[0], sizes[-1])


_PER_INPUT_KEYS = {"preset": str, "mean": str, "std": str, "input-size": str, "resize": int, "channel-order": str, "resize-mode": str,
                   "pad-value": float, "placement": str}


def _per_input_options(texts: Sequence[str]) -> dict[str, dict]:
    """``NAME:KEY=VALUE`` texts as {name: {option: value}}."""
    options: dict[str, dict] = {}
    for text in texts:
        name, sep, rest = text.partition(":")
        key, eq, value = rest.partition("=")
        if not (sep and eq and name and value) or key not in _PER_INPUT_KEYS:
            raise InputError(f"--input-prep takes NAME:KEY=VALUE with KEY one of {', '.join(_PER_INPUT_KEYS)}, got {text!r}")
        try:
            options.setdefault(name, {})[key.replace("-", "_")] = _PER_INPUT_KEYS[key](value)
        except ValueError:
            raise InputError(f"--input-prep {text!r}: {key} takes a {_PER_INPUT_KEYS[key].__name__}") from None
    return options


def load_image(path: Path, prep: Preprocessing, channels: int = 3) -> np.ndarray:
    """Decode one image to (S, S, C) float32 (see :func:`load_image_with_geometry`)."""
    return load_image_with_geometry(path, prep, channels)[0]


def load_image_with_geometry(path: Path, prep: Preprocessing, channels: int = 3,
                             size_hw: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Decode one image to (H, W, C) float32 the ``prep`` way, and its geometry: [original width,
    original height, scale x, scale y, offset x, offset y], so that a point of the original image
    lands at ``xy * scale + offset`` in the model input (a detector's boxes are mapped back with it).
    ``size_hw`` is the model input's (H, W); without it, ``prep.input_hw``."""
    from PIL import Image

    if prep.input_size is None or prep.resize is None:
        raise ValueError("preprocessing needs input_size and resize; call with_input_size first")
    out_h, out_w = size_hw or prep.input_hw  # type: ignore[misc]
    with Image.open(path) as img:
        img = img.convert("L" if channels == 1 else "RGB")
        w, h = img.size
        if prep.resize_mode == "crop":
            scale = prep.resize / min(w, h)
            rw, rh = max(out_w, round(w * scale)), max(out_h, round(h * scale))
            img = img.resize((rw, rh), Image.BILINEAR)
            left, top = (rw - out_w) // 2, (rh - out_h) // 2
            img = img.crop((left, top, left + out_w, top + out_h))
            geometry = (w, h, rw / w, rh / h, -left, -top)
        elif prep.resize_mode == "stretch":
            img = img.resize((out_w, out_h), Image.BILINEAR)
            geometry = (w, h, out_w / w, out_h / h, 0, 0)
        else:  # letterbox, as YOLOv5's: r = min(H/h, W/w), resized to (round(w r), round(h r)), padded
            r = min(out_h / h, out_w / w)
            rw, rh = round(w * r), round(h * r)
            resized = img.resize((rw, rh), Image.BILINEAR)
            left, top = ((out_w - rw) // 2, (out_h - rh) // 2) if prep.placement == "center" else (0, 0)
            pad = round(prep.pad_value)
            img = Image.new(img.mode, (out_w, out_h), pad if img.mode == "L" else (pad, pad, pad))
            img.paste(resized, (left, top))
            geometry = (w, h, rw / w, rh / h, left, top)
        pixels = np.asarray(img, dtype=np.float32)
    return _normalised(pixels, prep, channels), np.asarray(geometry, np.float64)


def _normalised(pixels: np.ndarray, prep: Preprocessing, channels: int) -> np.ndarray:
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
    geometry: np.ndarray | None = None  # (N, 6) per image, see load_image_with_geometry; None for arrays

    def __len__(self) -> int:
        return int(self.data.shape[0])

    @property
    def labelled(self) -> int:
        """How many samples have a label."""
        return labelled_count(self.labels)

    @property
    def has_labels(self) -> bool:
        return self.labelled > 0

    def onnx_feeds(self, specs: list[InputSpec]) -> list[dict[str, np.ndarray]]:
        """Every sample as ONNX Runtime's input feed (batch of 1, the ONNX layout)."""
        return [onnx_feed(specs, self.data[i:i + 1]) for i in range(len(self))]


def labelled_count(labels: np.ndarray) -> int:
    """Labelled entries of a label array: class indices >= 0, or objects (a detector's boxes) not None."""
    if labels.dtype == object:
        return sum(v is not None for v in labels)
    return int(np.sum(labels >= 0))


def select(count: int, num: int | None, seed: int = 0) -> np.ndarray:
    """A deterministic subset of ``num`` of ``count`` items: seeded shuffle, first ``num``."""
    order = np.random.default_rng(seed).permutation(count)
    return order if num is None or num >= count else order[:num]


def load_samples(
    source: str | Path,
    prep: Preprocessing,
    specs: list[InputSpec],
    num: int | None = None,
    seed: int = 0,
    on_item: Callable[[], None] | None = None,
    what: str = "calibration",
    labels: Callable[[Path], dict[str, int]] | None = None,
) -> Samples:
    """Load ``num`` samples for a model with inputs ``specs``: from an image folder (one image
    input, preprocessed the ``prep`` way), or from arrays in the model's layout (``.npy``, ``.npz``,
    ``FILE.py:function``; see :func:`inputs.load_arrays`). ``labels`` reads an image folder's labels
    (file name -> label), as the task defines them (``Task.read_labels``); without it the samples
    are unlabelled."""
    path = Path(source)
    if is_loader(source) or path.is_file():
        return _from_arrays(source, prep, specs, num, seed, what, on_item)
    if not path.exists():
        raise InputError(f"{what} data not found: {path}")
    images = [s for s in specs if s.is_image]
    if len(specs) != 1 or not images:
        names = ", ".join(f"{s.name} {list(s.shape)}" for s in specs)
        raise InputError(f"{path} is an image folder, but the model takes {names}; give a .npz with one array per input "
                         "name or a loader FILE.py:function")
    spec = images[0]
    h, w, c = spec.hwc
    files = _images(path)
    if not files and (path / "images").is_dir():  # the YOLO dataset layout: images/ beside labels/
        files = _images(path / "images")
    if not files:
        raise InputError(f"no images (JPEG/PNG) found in {what} folder {path}")
    labels_by_file = labels(path) if labels else {}
    prep = prep.for_input(spec.name).with_input_size(h, w)
    if prep.input_hw != (h, w):
        raise InputError(f"--input-size {'x'.join(map(str, prep.input_hw or ()))} does not match the model input {h}x{w}")
    chosen = [files[i] for i in select(len(files), num, seed)]
    data, found, names, skipped, geometry = [], [], [], [], []
    for file in chosen:
        try:
            pixels, where = load_image_with_geometry(file, prep, c, (h, w))
            data.append(pixels)
            geometry.append(where)
            label = labels_by_file.get(file.name, -1)
            found.append(label.placed(where) if hasattr(label, "placed") else label)  # a detector's boxes need the geometry
            names.append(file.name)
        except (OSError, ValueError) as exc:
            skipped.append(f"{file.name}: {exc}")
        if on_item:
            on_item()
    if not data:
        raise InputError(f"none of the {len(chosen)} {what} images in {path} could be read (first: {skipped[0]})")
    return Samples(np.stack(data).astype(np.float32), _label_array(found), names, str(path), skipped, np.stack(geometry))


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _label_array(found: list) -> np.ndarray:
    """Class indices as int64 (-1: none); any other label (a detector's boxes) as objects (None: none)."""
    if all(isinstance(v, (int, np.integer)) or isinstance(v, np.ndarray) and v.ndim == 0 and v.dtype.kind in "iu" for v in found):
        return np.asarray(found, np.int64)
    out = np.empty(len(found), object)
    for i, v in enumerate(found):  # one by one: equal-shaped array labels must not become one 2-D array
        out[i] = None if v is None or isinstance(v, (int, np.integer)) and v < 0 else v
    return out


def _from_arrays(source: str | Path, prep: Preprocessing, specs: list[InputSpec], num: int | None, seed: int, what: str,
                 on_item: Callable[[], None] | None) -> Samples:
    """Samples from arrays; an image input given as image file paths is loaded and preprocessed here,
    the input's own way (``Preprocessing.for_input``), and the first such input's geometry kept."""
    arrays, labels, names = load_arrays(source, specs, what)
    idx = np.sort(select(len(names), num, seed))
    values, geometry = {}, None
    for spec in specs:
        chosen = arrays[spec.name][idx]
        if chosen.dtype.kind in "US":
            h, w, c = spec.hwc
            own = prep.for_input(spec.name).with_input_size(h, w)
            loaded = [load_image_with_geometry(Path(str(f)), own, c, (h, w)) for f in chosen]
            values[spec.name] = np.stack([pixels for pixels, _ in loaded])
            geometry = np.stack([where for _, where in loaded]) if geometry is None else geometry
        else:
            values[spec.name] = spec.from_onnx(chosen)
    if on_item:
        for _ in idx:
            on_item()
    found = [labels[i] for i in idx] if labels is not None else [-1] * len(idx)
    shown = str(source) if is_loader(source) else str(Path(source))
    return Samples(pack(specs, values), _label_array(found), [names[i] for i in idx], shown, geometry=geometry)
