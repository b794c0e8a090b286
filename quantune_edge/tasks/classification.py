"""Image classification judged by top-1: the rules every stage used to spell out for itself."""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from quantune_edge.common.metrics import top1, top1_accuracy, top1_correct
from quantune_edge.common.preprocessing import Samples
from quantune_edge.errors import InputError
from quantune_edge.model.runtime import softmax_input
from quantune_edge.model.tflite_graph import TfliteGraph
from quantune_edge.tasks.base import register


def read_class_labels(folder: Path) -> dict[str, int]:
    """``labels.csv`` beside the images: ``file,class_index`` (extra columns ignored)."""
    path = folder / "labels.csv"
    if not path.is_file():
        return {}
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or not {"file", "class_index"} <= set(reader.fieldnames):
            raise InputError(f"{path} must have columns 'file,class_index'")
        try:
            return {row["file"]: int(row["class_index"]) for row in reader}
        except (TypeError, ValueError) as exc:
            raise InputError(f"{path}: class_index must be an integer ({exc})") from None


@register("classify")
@dataclass(frozen=True)
class Classification:
    """``label_offset``: output index = class index + offset (1 for 1001-class models with a background class)."""

    label_offset: int = 0
    name: ClassVar[str] = "classify"
    metric_name: ClassVar[str] = "top-1"
    agreement_key: ClassVar[str | None] = "top1_agreement"
    reads_all_outputs: ClassVar[bool] = False
    needs_labels: ClassVar[bool] = True
    judged_against_float32: ClassVar[bool] = False
    points_per_unit: ClassVar[float] = 100.0
    device_reducer: ClassVar[str] = "argmax"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "label_offset": self.label_offset}

    def read_labels(self, folder: Path) -> dict[str, int]:
        return read_class_labels(folder)

    def correct(self, outputs: np.ndarray, labels: np.ndarray) -> np.ndarray:
        return top1_correct(outputs, labels, self.label_offset)

    def agreement(self, outputs: np.ndarray, reference: np.ndarray) -> np.ndarray:
        return top1(outputs) == top1(reference)

    def metric(self, outputs: np.ndarray, labels: np.ndarray) -> float | None:
        return top1_accuracy(outputs, labels, self.label_offset)

    def scores(self, outputs: np.ndarray, labels: np.ndarray) -> dict[str, float] | None:
        """Top-1 and top-5 accuracy."""
        top1 = self.metric(outputs, labels)
        if top1 is None:
            return None
        known = labels >= 0
        flat = np.asarray(outputs).reshape(len(outputs), -1)[known]
        best5 = np.argsort(-flat, axis=1, kind="stable")[:, :5]
        top5 = float(np.mean(np.any(best5 == (labels[known] + self.label_offset)[:, None], axis=1)))
        return {"top-1": top1, "top-5": top5}

    def reduce(self, outputs: np.ndarray) -> np.ndarray:
        return top1(outputs)

    def reduced_correct(self, reduced: np.ndarray, labels: np.ndarray) -> np.ndarray:
        known = labels >= 0
        return np.asarray(reduced)[known] == labels[known] + self.label_offset

    def attributed_tensors(self, graph: TfliteGraph) -> list[int]:
        """The logits: what a final SOFTMAX reads, else the model output."""
        t = softmax_input(graph)
        return [graph.outputs[0] if t is None else t]

    def labels_from_float32(self, outputs: Any, samples: Samples) -> None:
        """None: unlabelled, a classifier is judged image by image by agreement with float32 instead."""
        return None
