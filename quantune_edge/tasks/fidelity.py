"""Any model, no labels: judged by how closely its outputs follow the float32 model's, per output
(SQNR and cosine over the samples), the worst output deciding. The reference takes the labels'
place: compile compares with ONNX Runtime, analyze and tune with the float32 TFLite model. tune's
budget is ``--min-sqnr DB``."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from quantune_edge.common.metrics import cosine_per_sample, sqnr_db
from quantune_edge.common.preprocessing import Samples
from quantune_edge.errors import InputError
from quantune_edge.tasks.base import SetMetric, register


@register("fidelity")
@dataclass(frozen=True)
class Fidelity(SetMetric):
    name: ClassVar[str] = "fidelity"
    metric_name: ClassVar[str] = "output SQNR dB"
    needs_labels: ClassVar[bool] = False
    judged_against_float32: ClassVar[bool] = True
    points_per_unit: ClassVar[float] = 1.0

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name}

    def read_labels(self, folder: Path) -> dict[str, int]:
        return {}

    def scores(self, outputs: list[dict[str, np.ndarray]], reference: np.ndarray) -> dict[str, float] | None:
        """Per output, over all samples: SQNR (dB) and the lowest per-sample cosine; the worst of each."""
        if len(reference) != len(outputs) or any(r is None for r in reference):
            raise InputError("the fidelity task needs the float32 model's outputs for every sample")
        figures: dict[str, float] = {}
        for name in outputs[0]:
            got = np.stack([np.asarray(o[name], np.float64).ravel() for o in outputs])
            want = np.stack([np.asarray(r[name], np.float64).ravel() for r in reference])
            figures[f"SQNR dB {name}"] = sqnr_db(want, got)
            figures[f"cosine min {name}"] = float(cosine_per_sample(want, got).min())
        names = list(outputs[0])
        return {self.metric_name: min(figures[f"SQNR dB {n}"] for n in names),
                "output cosine min": min(figures[f"cosine min {n}"] for n in names), **figures}

    def metric(self, outputs: list[dict[str, np.ndarray]], reference: np.ndarray) -> float | None:
        result = self.scores(outputs, reference)
        return None if result is None else result[self.metric_name]

    def labels_from_float32(self, outputs: list[dict[str, np.ndarray]], samples: Samples) -> np.ndarray:
        return as_labels(outputs)


def as_labels(per_sample: list[dict[str, np.ndarray]]) -> np.ndarray:
    """Reference outputs in a label array's place (one object per sample)."""
    out = np.empty(len(per_sample), object)
    out[:] = per_sample
    return out
