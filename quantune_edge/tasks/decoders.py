"""Detector heads -> candidate boxes. Two built-in layouts cover most exported detectors; any other
head plugs in as ``FILE.py:function``. A decoder only reads the head: thresholding, class-wise NMS and
mapping boxes back to the original image are done once, by the detect task, for every decoder."""
from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np

from quantune_edge.common.plugins import load_callable
from quantune_edge.errors import InputError

# boxes (N, 4) as x1 y1 x2 y2 in model-input pixels, scores (N,), class ids (N,)
Decoded = tuple[np.ndarray, np.ndarray, np.ndarray]
Decoder = Callable[[dict[str, np.ndarray]], Decoded]

_BUILT_IN: dict[str, Callable[..., Decoded]] = {}


def _register(name: str) -> Callable[[Callable[..., Decoded]], Callable[..., Decoded]]:
    def add(function: Callable[..., Decoded]) -> Callable[..., Decoded]:
        _BUILT_IN[name] = function
        return function
    return add


def built_in_decoders() -> list[str]:
    return sorted(_BUILT_IN)


def _xywh_to_xyxy(box: np.ndarray) -> np.ndarray:
    half = box[:, 2:4] / 2
    return np.concatenate([box[:, :2] - half, box[:, :2] + half], axis=1)


def _single(outputs: dict[str, np.ndarray], layout: str) -> np.ndarray:
    if len(outputs) != 1:
        raise InputError(f"the {layout} decoder reads one output; this model has {len(outputs)} ({', '.join(outputs)}): "
                         "give --decoder FILE.py:function")
    return np.asarray(next(iter(outputs.values())), np.float32)


@_register("yolov5")
def yolov5(outputs: dict[str, np.ndarray], score_threshold: float = 0.001) -> Decoded:
    """[1, N, 5 + classes]: cx cy w h, objectness, class probabilities (YOLOv5/v7 exports, decode
    inside). Every (box, class) pair whose objectness x class probability passes is a candidate, as
    YOLOv5's own mAP evaluation counts them (multi-label)."""
    head = _single(outputs, "yolov5")
    if head.ndim not in (2, 3) or head.shape[-1] < 6:
        raise InputError(f"the yolov5 decoder needs an output [1, N, 5 + classes], got {list(head.shape)}")
    rows = head.reshape(-1, head.shape[-1])
    rows = rows[rows[:, 4] > score_threshold]
    scores = rows[:, 5:] * rows[:, 4:5]
    i, cls = np.nonzero(scores > score_threshold)
    return _xywh_to_xyxy(rows[i, :4]), scores[i, cls], cls


@_register("yolov8")
def yolov8(outputs: dict[str, np.ndarray], score_threshold: float = 0.001) -> Decoded:
    """[1, 4 + classes, N]: cx cy w h, class scores (YOLOv8/11 exports, no objectness)."""
    head = _single(outputs, "yolov8")
    if head.ndim not in (2, 3) or head.shape[-2] < 5:
        raise InputError(f"the yolov8 decoder needs an output [1, 4 + classes, N], got {list(head.shape)}")
    rows = head.reshape(head.shape[-2], head.shape[-1]).T
    scores = rows[:, 4:]
    i, cls = np.nonzero(scores > score_threshold)
    return _xywh_to_xyxy(rows[i, :4]), scores[i, cls], cls


def make_decoder(spec: str | Decoder, score_threshold: float) -> Decoder:
    """A built-in decoder by name, a plug-in ``FILE.py:function``, or a callable (the Python API)."""
    if callable(spec):
        return spec
    if spec in _BUILT_IN:
        return functools.partial(_BUILT_IN[spec], score_threshold=score_threshold)
    if ":" not in spec:
        raise InputError(f"unknown decoder {spec!r} (built in: {', '.join(built_in_decoders())}; or FILE.py:function)")
    return load_callable(spec, "decoder")


def checked_decode(decoder: Decoder, outputs: dict[str, np.ndarray], sample: str) -> Decoded:
    """Run a decoder on one sample's outputs; whatever it does wrong is one clear InputError."""
    try:
        result = decoder(outputs)
    except InputError:
        raise
    except Exception as exc:  # the user's decoder failed: name it and the sample, no traceback
        raise InputError(f"the decoder failed on {sample}: {type(exc).__name__}: {exc}") from None
    if not isinstance(result, tuple) or len(result) != 3:
        raise InputError(f"the decoder must return (boxes [N, 4], scores [N], class_ids [N]); got {type(result).__name__} on {sample}")
    boxes, scores, classes = (np.asarray(v) for v in result)
    n = len(scores) if scores.ndim == 1 else -1
    if boxes.shape != (n, 4) or scores.shape != (n,) or classes.shape != (n,):
        raise InputError(f"the decoder returned boxes {list(boxes.shape)}, scores {list(scores.shape)}, class_ids "
                         f"{list(classes.shape)} on {sample}; it must return [N, 4], [N], [N]")
    return boxes.astype(np.float32), scores.astype(np.float32), classes.astype(np.int64)
