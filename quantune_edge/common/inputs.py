"""A model's inputs, and samples that are not images: ``.npy``, ``.npz`` and Python loaders.

One sample batch is one numpy array for a model with one input, and a structured array with one
field per input name for a model with several, so every caller slices, counts and stacks samples
the same way whatever the model takes (``data[i:i + 1]``, ``len(data)``) and only the code that
feeds a runtime looks inside (:func:`fields`). Values are kept as the TFLite model takes them:
image inputs channels-last, every other input in its ONNX layout (the converter is told to keep it).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from quantune_edge.errors import InputError

IMAGE_LAYOUTS = ("NCHW", "NHWC")
PLAIN = "plain"  # an input that is not an image: fed in the ONNX model's own layout
LOADER_SEPARATOR = ".py:"


@dataclass(frozen=True)
class InputSpec:
    """One model input: name, layout ("NCHW"/"NHWC" for images, "plain" otherwise), fixed shape
    (batch 1, in the ONNX layout) and dtype."""

    name: str
    layout: str
    shape: tuple[int, ...]
    dtype: str = "float32"

    @property
    def is_image(self) -> bool:
        return self.layout in IMAGE_LAYOUTS

    @property
    def hwc(self) -> tuple[int, int, int]:
        """An image input's (height, width, channels)."""
        if not self.is_image:
            raise ValueError(f"input {self.name!r} is not an image")
        _, a, b, c = self.shape
        return (b, c, a) if self.layout == "NCHW" else (a, b, c)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """One sample as the TFLite model takes it, without the batch axis."""
        return self.hwc if self.is_image else tuple(self.shape[1:])

    def to_onnx(self, batch: np.ndarray) -> np.ndarray:
        """A batch in the TFLite layout as ONNX Runtime takes it."""
        batch = batch.transpose(0, 3, 1, 2) if self.layout == "NCHW" else batch
        return np.ascontiguousarray(batch, dtype=self.dtype)

    def from_onnx(self, batch: np.ndarray) -> np.ndarray:
        """A batch in the ONNX layout as the TFLite model takes it."""
        return batch.transpose(0, 2, 3, 1) if self.layout == "NCHW" else batch

    def to_dict(self) -> dict:
        return {"name": self.name, "layout": self.layout, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, data: dict) -> InputSpec:
        return cls(data["name"], data["layout"], tuple(int(d) for d in data["shape"]), data.get("dtype", "float32"))


def pack(specs: list[InputSpec], arrays: dict[str, np.ndarray]) -> np.ndarray:
    """Per-input arrays (first axis = samples, TFLite layout) as one sample batch (see the module)."""
    if len(specs) == 1:
        return np.ascontiguousarray(arrays[specs[0].name], dtype=specs[0].dtype)
    count = len(arrays[specs[0].name])
    packed = np.empty(count, np.dtype([(s.name, s.dtype, s.sample_shape) for s in specs]))
    for spec in specs:
        packed[spec.name] = arrays[spec.name]
    return packed


def fields(batch: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
    """A sample batch's array per input name (``names``: the model's inputs, in order)."""
    if batch.dtype.names is None:
        return {names[0]: batch}
    return {name: np.ascontiguousarray(batch[name]) for name in batch.dtype.names}


def onnx_feed(specs: list[InputSpec], batch: np.ndarray) -> dict[str, np.ndarray]:
    """A sample batch as ONNX Runtime's input feed."""
    values = fields(batch, [s.name for s in specs])
    return {s.name: s.to_onnx(values[s.name]) for s in specs}


def is_loader(source: str | Path) -> bool:
    """``FILE.py:function``: samples from the user's Python loader."""
    return LOADER_SEPARATOR in str(source)


def loader_file(source: str | Path) -> Path:
    """The Python file of a loader ``FILE.py:function``."""
    return Path(str(source).rpartition(":")[0])


def load_arrays(source: Path | str, specs: list[InputSpec], what: str) -> tuple[dict[str, np.ndarray], list | None, list[str]]:
    """Per-input arrays (ONNX layout, first axis = samples), the labels if the source has any, and
    sample names, from a ``.npy`` (one input), a ``.npz`` (one array per input name, optional
    ``labels``) or a loader ``FILE.py:function`` yielding per sample a dict of arrays, or a
    (dict, label) pair. An image input may be given as image file paths instead (a string array,
    or a path per sample): the caller preprocesses them."""
    if is_loader(source):
        return _from_loader(str(source), specs, what)
    path = Path(source)
    if path.suffix == ".npz":
        return _from_npz(path, specs, what)
    if path.suffix != ".npy":
        raise InputError(f"{what} data must be an image folder, a .npy, a .npz or FILE.py:function, got {path}")
    if len(specs) != 1:
        names = ", ".join(s.name for s in specs)
        raise InputError(f"the model has {len(specs)} inputs ({names}); give a .npz with one array per input, not {path.name}")
    array = _read(path, lambda: np.load(path, allow_pickle=False))
    return {specs[0].name: _checked(array, specs[0], path.name)}, None, [f"{path.name}[{i}]" for i in range(len(array))]


def _read(path: Path, read: Callable):
    try:
        return read()
    except (OSError, ValueError, EOFError) as exc:
        raise InputError(f"cannot read {path}: {exc}") from None


def _from_npz(path: Path, specs: list[InputSpec], what: str):
    with _read(path, lambda: np.load(path, allow_pickle=False)) as archive:
        stored = set(archive.files)
        missing = [s.name for s in specs if s.name not in stored]
        if missing:
            raise InputError(f"{path} has no array for input {missing[0]!r} (it holds: {', '.join(sorted(stored)) or 'nothing'})")
        arrays = {s.name: _checked(_read(path, lambda s=s: archive[s.name]), s, f"{path.name}[{s.name!r}]") for s in specs}
        labels = list(_read(path, lambda: archive["labels"])) if "labels" in stored and "labels" not in arrays else None
    counts = {len(a) for a in arrays.values()} | ({len(labels)} if labels is not None else set())
    if len(counts) != 1:
        raise InputError(f"{path}: the arrays hold different numbers of samples ({sorted(counts)}); the first axis counts samples")
    return arrays, labels, [f"{path.name}[{i}]" for i in range(len(arrays[specs[0].name]))]


def _from_loader(source: str, specs: list[InputSpec], what: str):
    from quantune_edge.common.plugins import load_callable

    function = load_callable(source, {"calibration": "calib", "evaluation": "eval"}.get(what, what))
    try:
        items = list(_as_iterable(function(), source))
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"{what} loader {source} failed: {type(exc).__name__}: {exc}") from None
    if not items:
        raise InputError(f"{what} loader {source} yielded no samples")
    per_input: dict[str, list[np.ndarray]] = {s.name: [] for s in specs}
    labels = []
    for n, item in enumerate(items):
        sample, label = item if isinstance(item, tuple) and len(item) == 2 else (item, None)
        if not isinstance(sample, dict):
            raise InputError(f"{what} loader {source} yielded a {type(sample).__name__} for sample {n}; yield a dict of arrays per input name")
        for spec in specs:
            if spec.name not in sample:
                raise InputError(f"{what} loader {source}: sample {n} has no array for input {spec.name!r} (it has: {', '.join(map(str, sample))})")
            value = np.asarray(str(sample[spec.name]) if isinstance(sample[spec.name], Path) else sample[spec.name])
            per_input[spec.name].append(value[0] if value.shape == spec.shape else value)
        labels.append(label)
    arrays = {s.name: _checked(np.stack(per_input[s.name]), s, f"{source} input {s.name!r}") for s in specs}
    return arrays, (labels if any(v is not None for v in labels) else None), [f"{loader_file(source).name}[{i}]" for i in range(len(items))]


def _as_iterable(result, source: str) -> Iterable:
    if isinstance(result, dict) or not isinstance(result, Iterable):
        raise InputError(f"loader {source} must return or yield samples (dicts of arrays), got {type(result).__name__}")
    return result


def _checked(array: np.ndarray, spec: InputSpec, what: str) -> np.ndarray:
    """``array`` (samples, ONNX layout) checked against ``spec`` and cast to its dtype."""
    if spec.is_image and array.dtype.kind in "US":  # image files, loaded and preprocessed with the input's options
        if array.ndim != 1 or array.shape[0] == 0:
            raise InputError(f"{what}: image file names for input {spec.name!r} must be one per sample, got shape {tuple(array.shape)}")
        missing = [str(f) for f in array if not Path(str(f)).is_file()]
        if missing:
            raise InputError(f"{what}: image {missing[0]} for input {spec.name!r} does not exist")
        return array
    expected = tuple(spec.shape[1:])
    if array.ndim != len(spec.shape) or tuple(array.shape[1:]) != expected:
        want = "(N, " + ", ".join(map(str, expected)) + ")"
        raise InputError(f"{what} has shape {tuple(array.shape)}; the model input {spec.name!r} ({spec.layout}) needs {want}")
    if array.shape[0] == 0:
        raise InputError(f"{what} holds no samples")
    if array.dtype.kind not in "fiub":
        raise InputError(f"{what} holds {array.dtype} values; the model input {spec.name!r} takes {spec.dtype}")
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        raise InputError(f"{what} contains NaN or Inf values")
    return array.astype(spec.dtype, copy=False)
