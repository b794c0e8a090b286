"""Any model judged by the user's own metric, like NNCF's validation function:
``FILE.py:function(outputs_list, labels_list) -> float``, higher is better. ``outputs_list`` holds one
dict per sample with every output as ONNX Runtime returns it; ``labels_list`` the class index from a
``labels.csv`` beside the images, or None. tune's ``--max-drop`` is then in the metric's own units."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from quantune_edge.common.plugins import load_callable
from quantune_edge.errors import InputError
from quantune_edge.tasks.base import SetMetric, register
from quantune_edge.tasks.classification import read_class_labels


@register("custom")
@dataclass(frozen=True)
class CustomMetric(SetMetric):
    metric_file: str = ""  # FILE.py:function
    name: ClassVar[str] = "custom"
    metric_name: ClassVar[str] = "custom metric"
    needs_labels: ClassVar[bool] = False
    judged_against_float32: ClassVar[bool] = False
    points_per_unit: ClassVar[float] = 1.0

    def __post_init__(self) -> None:
        if not self.metric_file:
            raise InputError("--task custom needs --metric FILE.py:function")
        load_callable(self.metric_file, "metric")  # a missing or broken module is said now, before any work

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "metric_file": self.metric_file}

    def read_labels(self, folder: Path) -> dict[str, int]:
        return read_class_labels(folder)

    def metric_value(self, outputs: list[dict[str, np.ndarray]], labels: np.ndarray) -> float:
        function = load_callable(self.metric_file, "metric")
        given = [None if isinstance(v, (int, np.integer)) and v < 0 else (int(v) if isinstance(v, (int, np.integer)) else v) for v in labels]
        try:
            value = function(outputs, given)
        except Exception as exc:  # the user's metric failed: one line
            raise InputError(f"the metric {self.metric_file} failed: {type(exc).__name__}: {exc}") from None
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise InputError(f"the metric {self.metric_file} must return a number, got {type(value).__name__}") from None
        if not math.isfinite(value):
            raise InputError(f"the metric {self.metric_file} returned {value}")
        return value

    def metric(self, outputs: list[dict[str, np.ndarray]], labels: np.ndarray) -> float | None:
        return self.metric_value(outputs, labels)

    def scores(self, outputs: list[dict[str, np.ndarray]], labels: np.ndarray) -> dict[str, float] | None:
        return {self.metric_name: self.metric_value(outputs, labels)}
