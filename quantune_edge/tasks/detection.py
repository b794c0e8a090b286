"""Object detection judged by COCO mAP (pycocotools' COCOeval, never a mAP of our own).

Labels come in the YOLO dataset layout (``images/`` + ``labels/NAME.txt``: ``class cx cy w h``,
normalised) or as COCO json (``annotations.json`` beside the images or their folder, or ``labels_file``).
The model's head is read by a decoder (:mod:`decoders`); then, for every decoder alike, boxes are
thresholded, class-wise NMS'd, capped, and mapped back through each image's preprocessing geometry
to original pixels, where COCOeval compares them with the labels."""
from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from quantune_edge.common.preprocessing import Samples
from quantune_edge.errors import InputError
from quantune_edge.tasks.base import SetMetric, register
from quantune_edge.tasks.decoders import Decoded, checked_decode, make_decoder

# At most this many candidates, best first, go into NMS per image (YOLOv5's own evaluation: max_nms).
MAX_CANDIDATES = 30000


@dataclass(frozen=True)
class GroundTruth:
    """One image's labelled boxes in original pixels (x1 y1 x2 y2), and where the image went in the
    model input (``preprocessing.load_image_with_geometry``), set when the sample is loaded."""

    boxes: np.ndarray
    classes: np.ndarray
    width: int
    height: int
    crowd: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    file: str = ""
    geometry: np.ndarray | None = None

    def placed(self, geometry: np.ndarray) -> GroundTruth:
        return replace(self, geometry=geometry)


@register("detect")
@dataclass(frozen=True)
class Detection(SetMetric):
    """``decoder``: a built-in head layout (yolov5, yolov8) or ``FILE.py:function``."""

    decoder: str = "yolov5"
    classes: int = 80
    score_threshold: float = 0.001
    nms_iou: float = 0.6
    max_detections: int = 300
    labels_file: str | None = None
    reference_score: float = 0.25  # without labels: the float32 model's detections at least this confident are the reference
    name: ClassVar[str] = "detect"
    metric_name: ClassVar[str] = "mAP50-95"
    needs_labels: ClassVar[bool] = True
    judged_against_float32: ClassVar[bool] = False
    points_per_unit: ClassVar[float] = 100.0

    def __post_init__(self) -> None:
        if (self.classes < 1 or not 0 <= self.score_threshold < 1 or not 0 < self.nms_iou <= 1 or self.max_detections < 1
                or not 0 < self.reference_score < 1):
            raise InputError("detect needs classes >= 1, 0 <= score threshold < 1, 0 < --nms-iou <= 1 and max detections >= 1")
        make_decoder(self.decoder, self.score_threshold)  # a missing or broken plug-in is said now, not after a compile

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "decoder": self.decoder, "classes": self.classes, "score_threshold": self.score_threshold,
                "nms_iou": self.nms_iou, "max_detections": self.max_detections, "labels_file": self.labels_file,
                "reference_score": self.reference_score}

    # ------------------------------------------------------------------ labels

    def read_labels(self, folder: Path) -> dict[str, GroundTruth]:
        images = folder / "images" if (folder / "images").is_dir() else folder
        places = [Path(self.labels_file)] if self.labels_file else [images / "annotations.json", images.parent / "annotations.json"]
        if self.labels_file and not places[0].is_file():
            raise InputError(f"--labels {places[0]} does not exist")
        for path in places:
            if path.is_file():
                return self._coco_json(path, images)
        for labels in (images.parent / "labels", images / "labels"):
            if labels.is_dir():
                return self._yolo_txt(labels, images)
        return {}

    def _check(self, classes: np.ndarray, where: str) -> None:
        if classes.size and (classes.min() < 0 or classes.max() >= self.classes):
            raise InputError(f"{where}: class id {int(classes.max() if classes.max() >= self.classes else classes.min())} "
                             f"is out of range for a {self.classes}-class detector")

    def _coco_json(self, path: Path, images: Path) -> dict[str, GroundTruth]:
        try:
            data = json.loads(path.read_text())
            entries = {im["id"]: im for im in data["images"]}
            annotations = data.get("annotations", [])
            category_ids = sorted(c["id"] for c in data.get("categories", []))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InputError(f"{path}: not a COCO annotations file ({exc})") from None
        # Categories numbered 0..K-1 are the model's classes; others (COCO's 1..90) map in sorted order.
        index = {c: c for c in category_ids} if category_ids == list(range(len(category_ids))) else {c: i for i, c in enumerate(category_ids)}
        boxes: dict[int, list] = {i: [] for i in entries}
        for a in annotations:
            if a.get("image_id") not in boxes:
                raise InputError(f"{path}: an annotation names image id {a.get('image_id')!r}, which is not in its images")
            if a.get("category_id") not in index:
                raise InputError(f"{path}: class id {a.get('category_id')!r} is out of range (not among its categories)")
            x, y, w, h = (float(v) for v in a["bbox"])
            boxes[a["image_id"]].append((x, y, x + w, y + h, index[a["category_id"]], bool(a.get("iscrowd", 0))))
        missing = [im["file_name"] for im in entries.values() if not (images / im["file_name"]).is_file()]
        if missing:
            raise InputError(f"{path} labels {len(missing)} image(s) not in {images} (first: {missing[0]})")
        out = {}
        for image_id, im in entries.items():
            rows = np.asarray(boxes[image_id], np.float64).reshape(-1, 6)
            classes = rows[:, 4].astype(np.int64)
            self._check(classes, str(path))
            out[im["file_name"]] = GroundTruth(rows[:, :4], classes, int(im["width"]), int(im["height"]), rows[:, 5].astype(bool),
                                               im["file_name"])
        return out

    def _yolo_txt(self, labels: Path, images: Path) -> dict[str, GroundTruth]:
        from PIL import Image

        by_stem = {p.stem: p for p in images.iterdir() if p.is_file()}
        out = {}
        for txt in sorted(labels.glob("*.txt")):
            image = by_stem.get(txt.stem)
            if image is None:
                raise InputError(f"{txt} labels an image that does not exist in {images}")
            try:
                rows = np.loadtxt(txt, ndmin=2) if txt.stat().st_size else np.zeros((0, 5))
            except ValueError as exc:
                raise InputError(f"{txt}: not 'class cx cy w h' rows ({exc})") from None
            if rows.shape[1] != 5:
                raise InputError(f"{txt}: rows must be 'class cx cy w h', found {rows.shape[1]} columns")
            classes = rows[:, 0].astype(np.int64)
            self._check(classes, str(txt))
            with Image.open(image) as img:
                w, h = img.size
            cx, cy, bw, bh = rows[:, 1] * w, rows[:, 2] * h, rows[:, 3] * w, rows[:, 4] * h
            boxes = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], axis=1)
            out[image.name] = GroundTruth(boxes, classes, w, h, np.zeros(len(classes), bool), image.name)
        return out

    # ------------------------------------------------------------------ detections and mAP

    def detections(self, outputs: list[dict[str, np.ndarray]], geometry: np.ndarray | None, names: list[str] | None = None) -> list[Decoded]:
        """Per sample: decoded, thresholded, class-wise NMS'd, capped boxes; in original-image
        pixels when ``geometry`` is given, else in model-input pixels."""
        decoder = make_decoder(self.decoder, self.score_threshold)
        found = []
        for i, sample in enumerate(outputs):
            boxes, scores, classes = checked_decode(decoder, sample, names[i] if names else f"sample {i}")
            if classes.size and (classes.min() < 0 or classes.max() >= self.classes):
                raise InputError(f"the decoder returned class id {int(classes.max())} for a {self.classes}-class detector")
            keep = np.flatnonzero(scores > self.score_threshold)
            keep = keep[np.argsort(-scores[keep], kind="stable")[:MAX_CANDIDATES]]
            boxes, scores, classes = boxes[keep], scores[keep], classes[keep]
            keep = class_wise_nms(boxes, scores, classes, self.nms_iou, self.max_detections)
            boxes, scores, classes = boxes[keep], scores[keep], classes[keep]
            if geometry is not None:
                boxes = to_original(boxes, geometry[i])
            found.append((boxes, scores, classes))
        return found

    def scores(self, outputs: list[dict[str, np.ndarray]], labels: np.ndarray) -> dict[str, float] | None:
        """COCO mAP50-95 and mAP50 over the labelled samples (fractions, as top-1 is); None without labels."""
        chosen = [i for i, label in enumerate(labels) if label is not None]
        if not chosen:
            return None
        truths = [labels[i] for i in chosen]
        if any(t.geometry is None for t in truths):
            raise InputError("detection labels need each image's preprocessing geometry (load the samples from an image folder)")
        geometry = np.stack([t.geometry for t in truths])
        found = self.detections([outputs[i] for i in chosen], geometry, [t.file for t in truths])
        result = coco_map(found, truths, self.classes)
        return {"mAP50-95": result["mAP50-95"], "mAP50": result["mAP50"]}

    def metric(self, outputs: list[dict[str, np.ndarray]], labels: np.ndarray) -> float | None:
        result = self.scores(outputs, labels)
        return None if result is None else result["mAP50-95"]

    def labels_from_float32(self, outputs: list[dict[str, np.ndarray]], samples: Samples) -> np.ndarray | None:
        """Unlabelled images: the float32 model's own detections with a score of at least
        ``reference_score`` (a deployment's confidence threshold) are the boxes other models are
        scored against, so the mAP says how much of float32's output a model keeps."""
        if samples.geometry is None:
            return None
        found = self.detections(outputs, samples.geometry, samples.names)
        labels = np.empty(len(found), object)
        for i, (boxes, scores, classes) in enumerate(found):
            keep = scores >= self.reference_score
            width, height = (int(v) for v in samples.geometry[i][:2])
            labels[i] = GroundTruth(boxes[keep], classes[keep], width, height, np.zeros(int(keep.sum()), bool), samples.names[i],
                                    samples.geometry[i])
        return labels


def to_original(boxes: np.ndarray, geometry: np.ndarray) -> np.ndarray:
    """Model-input boxes back to the original image (``xy = (model_xy - offset) / scale``), clipped to it."""
    width, height, sx, sy, ox, oy = geometry
    out = (boxes - np.array([ox, oy, ox, oy])) / np.array([sx, sy, sx, sy])
    return np.clip(out, 0, np.array([width, height, width, height]))


def class_wise_nms(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou: float, limit: int | None = None) -> np.ndarray:
    """Indices kept by greedy NMS within each class, best score first (boxes of different classes
    never suppress each other: they are shifted apart by class, as torchvision's batched_nms does).
    Greedy NMS keeps boxes in score order, so the first ``limit`` kept are the best ``limit`` of all:
    it stops there (at a 0.001 threshold NanoDet-m has tens of thousands of candidates)."""
    if len(scores) == 0:
        return np.zeros(0, np.int64)
    shifted = boxes.astype(np.float64) + (classes[:, None] * (float(boxes.max()) + 1.0))
    order = np.argsort(-scores, kind="stable")
    x1, y1, x2, y2 = shifted.T
    area = np.maximum(x2 - x1, 0) * np.maximum(y2 - y1, 0)
    keep = []
    while order.size and (limit is None or len(keep) < limit):
        best, rest = order[0], order[1:]
        keep.append(best)
        w = np.maximum(np.minimum(x2[best], x2[rest]) - np.maximum(x1[best], x1[rest]), 0)
        h = np.maximum(np.minimum(y2[best], y2[rest]) - np.maximum(y1[best], y1[rest]), 0)
        inter = w * h
        overlap = inter / np.maximum(area[best] + area[rest] - inter, 1e-12)
        order = rest[overlap <= iou]
    return np.asarray(keep, np.int64)


def coco_map(found: list[Decoded], truths: list[GroundTruth], classes: int) -> dict[str, float]:
    """COCOeval (bbox) of detections against labels, image by image in the same order."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, annotations, results = [], [], []
    for image_id, (truth, (boxes, scores, cls)) in enumerate(zip(truths, found), start=1):
        images.append({"id": image_id, "width": truth.width, "height": truth.height})
        for box, c, crowd in zip(truth.boxes, truth.classes, truth.crowd if truth.crowd.size else np.zeros(len(truth.classes), bool)):
            w, h = float(box[2] - box[0]), float(box[3] - box[1])
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(c), "iscrowd": int(crowd),
                                "bbox": [float(box[0]), float(box[1]), w, h], "area": w * h})
        for box, score, c in zip(boxes, scores, cls):
            results.append({"image_id": image_id, "category_id": int(c), "score": float(score),
                            "bbox": [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])]})
    if not results or not annotations:
        return {"mAP50-95": 0.0, "mAP50": 0.0, "detections": len(results), "labelled_boxes": len(annotations)}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and summary
        truth_api = COCO()
        truth_api.dataset = {"images": images, "annotations": annotations, "categories": [{"id": i} for i in range(classes)]}
        truth_api.createIndex()
        evaluation = COCOeval(truth_api, truth_api.loadRes(results), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return {"mAP50-95": max(float(evaluation.stats[0]), 0.0), "mAP50": max(float(evaluation.stats[1]), 0.0),
            "detections": len(results), "labelled_boxes": len(annotations)}
