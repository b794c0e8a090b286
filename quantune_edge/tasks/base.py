"""The Task interface and its registry (a name in compile.json -> the class that judges the model)."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from quantune_edge.common.metrics import align_layout, compare_outputs
from quantune_edge.common.preprocessing import Samples
from quantune_edge.errors import InputError
from quantune_edge.model.tflite_graph import TfliteGraph


@runtime_checkable
class Task(Protocol):
    """How outputs are judged. ``labels`` hold one entry per sample, negative where a sample has none."""

    name: ClassVar[str]  # the registry key, stored in compile.json
    metric_name: ClassVar[str]  # what the metric is called in tables ("top-1")
    agreement_key: ClassVar[str | None]  # the key of the share of samples decided as the reference does ("top1_agreement")
    reads_all_outputs: ClassVar[bool]  # metric/scores take per-sample dicts of every output (ONNX names) instead of the first output
    needs_labels: ClassVar[bool]  # whether the metric needs labelled samples (a user's metric may not)
    judged_against_float32: ClassVar[bool]  # the labels are the reference model's outputs (fidelity), not read from files
    points_per_unit: ClassVar[float]  # a metric difference in the points tune's --max-drop counts (100 for a rate, 1 for a custom metric)
    device_reducer: ClassVar[str]  # the named numpy reducer the device agent's eval applies per sample ("argmax")

    def to_dict(self) -> dict[str, Any]:
        """The task as compile.json stores it: ``{"name": ..., **options}``."""
        ...

    def read_labels(self, folder: Path) -> dict[str, int]:
        """The labels of an image folder, by file name ({} when the folder has none)."""
        ...

    def correct(self, outputs: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Per labelled sample, in order: is the model right."""
        ...

    def agreement(self, outputs: np.ndarray, reference: np.ndarray) -> np.ndarray:
        """Per sample: does the model decide as the reference model does (the judge without labels)."""
        ...

    def metric(self, outputs: np.ndarray, labels: np.ndarray) -> float | None:
        """The task's metric over the labelled samples; None without any."""
        ...

    def scores(self, outputs: Any, labels: np.ndarray) -> dict[str, float] | None:
        """Every figure the task reports over the labelled samples (``metric_name``'s among them); None without labels."""
        ...

    def reduce(self, outputs: np.ndarray) -> np.ndarray:
        """``device_reducer`` applied on the host, to compare the device's answers with the host's."""
        ...

    def reduced_correct(self, reduced: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Per labelled sample: is the device's reduced answer right."""
        ...

    def attributed_tensors(self, graph: TfliteGraph) -> list[int]:
        """The float model's tensors whose int8 error the analysis attributes to layers."""
        ...

    def labels_from_float32(self, outputs: Any, samples: Samples) -> np.ndarray | None:
        """Labels made of the float32 model's outputs on ``samples`` (as :meth:`scores` reads them),
        to judge other models against where the samples have none; None: this task cannot."""
        ...


class SetMetric:
    """What a task judged over the whole set (mAP, a user's metric, output SQNR) shares: no
    per-image verdict, every output attributed, every output returned whole by the device
    agent (the host computes the metric). Reads every output."""

    name: ClassVar[str]
    agreement_key: ClassVar[str | None] = None
    device_reducer: ClassVar[str] = "none"
    reads_all_outputs: ClassVar[bool] = True

    def correct(self, outputs: np.ndarray, labels: np.ndarray) -> np.ndarray:
        raise InputError(f"the {self.name} task judges the whole set, not image by image")

    def agreement(self, outputs: np.ndarray, reference: np.ndarray) -> np.ndarray:
        raise InputError(f"the {self.name} task has no image-by-image agreement with float32: give it labelled images")

    def reduce(self, outputs: np.ndarray) -> np.ndarray:
        return np.asarray(outputs)

    def reduced_correct(self, reduced: np.ndarray, labels: np.ndarray) -> np.ndarray:
        raise InputError(f"on-device evaluation for the {self.name} task is not available yet")

    def attributed_tensors(self, graph: TfliteGraph) -> list[int]:
        return list(graph.outputs)

    def labels_from_float32(self, outputs: Any, samples: Samples) -> np.ndarray | None:
        return None


_REGISTRY: dict[str, Callable[..., Task]] = {}


def register(name: str) -> Callable[[type], type]:
    """Class decorator: make a task findable by ``name`` (as compile.json and --task spell it)."""
    def add(cls: type) -> type:
        _REGISTRY[name] = cls
        return cls
    return add


def registered_tasks() -> list[str]:
    return sorted(_REGISTRY)


def make_task(name: str, **options: Any) -> Task:
    if name not in _REGISTRY:
        raise InputError(f"unknown task {name!r} (known: {', '.join(registered_tasks())})")
    try:
        return _REGISTRY[name](**options)
    except TypeError as exc:
        raise InputError(f"task {name!r}: {exc}") from None


def task_from_record(record: dict | None, label_offset: int = 0) -> Task:
    """The task compile.json names; a compile made before tasks existed was a classifier."""
    if not record:
        return make_task("classify", label_offset=label_offset)
    options = {k: v for k, v in record.items() if k != "name"}
    return make_task(record["name"], **options)


def compare(task: Task, reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """``metrics.compare_outputs`` plus the share of samples on which ``candidate`` decides as
    ``reference`` does, by the task's rule (under ``task.agreement_key``)."""
    out = compare_outputs(reference, candidate)
    if task.agreement_key is not None:
        out[task.agreement_key] = float(np.mean(task.agreement(align_layout(reference, candidate), reference)))
    return out


def metric_points(value: float | str, metric: str) -> float:
    """A task's figure in the units people quote it in: top-1 and mAP as 0-100 points, dB and a
    custom metric as they are. ``value`` may come from JSON, where infinity is the string "inf"."""
    value = float(value)
    return 100 * value if metric.startswith(("top", "mAP")) else value


def format_metric(value: float | str | None, metric: str) -> str:
    """A task's figure as people read it: top-1 as a percentage, mAP in points, dB, a custom metric as is."""
    if value is None:
        return "-"
    value = float(value)  # from JSON, infinity is the string "inf"
    if metric.startswith("top"):
        return f"{metric_points(value, metric):.1f} %"
    if metric.endswith("dB"):
        return f"{value:.1f} dB"
    return f"{metric_points(value, metric):.1f}" if metric.startswith("mAP") else f"{value:.4g}"


# What a model is judged against: labels; the float32 model's outputs, as the task always is
# (fidelity); or the float32 model's outputs standing in for labels the samples do not have.
JUDGED_AGAINST_LABELS, JUDGED_AGAINST_FLOAT32, FLOAT32_FOR_LABELS = "labels", "float32", "float32 (no labels)"


def reference_labels(task: Task, samples: Samples, float32_outputs: Callable[[], Any]) -> tuple[np.ndarray | None, str]:
    """What models are judged against on ``samples``, and what that is: the samples' own labels, or
    labels made of the float32 model's outputs (``float32_outputs()``, computed only when needed) for
    a task always judged so (fidelity) or one that can stand in for missing labels (a detector's
    float32 detections). (None, "labels") when there is nothing to judge against."""
    if task.judged_against_float32 or (task.needs_labels and not samples.has_labels):
        made = task.labels_from_float32(float32_outputs(), samples)
        if made is not None:
            return made, JUDGED_AGAINST_FLOAT32 if task.judged_against_float32 else FLOAT32_FOR_LABELS
    if samples.has_labels or not task.needs_labels:
        return samples.labels, JUDGED_AGAINST_LABELS
    return None, JUDGED_AGAINST_LABELS
