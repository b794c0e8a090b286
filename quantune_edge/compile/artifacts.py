"""A compile output folder as an object: its report, model paths and how to feed it samples.

Later stages (analyze, tune, deploy) start from a compile folder; this is the one place that knows
its layout and turns user data into inputs with the preprocessing the compile used.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from quantune_edge.common.inputs import InputSpec
from quantune_edge.common.metrics import to_shape
from quantune_edge.common.outputs import OutputKind
from quantune_edge.common.preprocessing import Preprocessing, Samples, load_samples
from quantune_edge.common.records import CompileReport
from quantune_edge.compile import tracing
from quantune_edge.errors import InputError
from quantune_edge.model import tflite_graph
from quantune_edge.model.layers import LayerMatch, match_layers, unit_notes
from quantune_edge.model.runtime import TfliteRunner, per_sample, stacked_shape
from quantune_edge.model.splice import splice
from quantune_edge.tasks import Task, task_from_record
from quantune_edge.tasks.base import reference_labels

# The compile folder's layout: every file name the stages write into it, and only here.
REPORT = "compile.json"
FLOAT_MODEL = "model_float32.tflite"
INT8_MODEL = "model_int8.tflite"
CALIBRATED_MODEL = "model_calibrated.tflite"  # activation ranges recorded, nothing quantized: names the layers
SAVED_MODEL = "saved_model"
PREPARED_ONNX = "model_prepared.onnx"
ANALYSIS_JSON, ANALYSIS_CSV, ANALYSIS_PNG = "analysis.json", "analysis.csv", "analysis.png"
MIXED_MODEL, TUNE_JSON, PARETO_PNG = "model_mixed.tflite", "tune.json", "pareto.png"
BEST_FOUND = "best-found"  # infix of the files a tune that missed its budget writes beside the accepted ones
HOST_LATENCY_JSON = "host_latency.json"  # this host's float32 / int8 latencies, measured once and reused
COMPILE_FOLDER = OutputKind("compile output folder", REPORT)  # what compile --force may replace


def device_costs_file(target_name: str) -> str:
    """The per-layer costs measured on one target (``device_costs_<target>.json``), reused while the models stay the same."""
    return f"device_costs_{target_name}.json"


@dataclass
class CompiledModel:
    folder: Path
    report: CompileReport
    specs: list[InputSpec]  # the model's inputs, in its order

    @classmethod
    def open(cls, folder: str | Path) -> CompiledModel:
        folder = Path(folder)
        path = folder / REPORT
        if not path.is_file():
            raise InputError(f"{folder} is not a compile output folder (no {REPORT}); run 'quantune-edge compile' first")
        try:
            report = CompileReport.load(path)
        except (ValueError, TypeError, KeyError) as exc:
            raise InputError(f"{path}: unreadable compile report ({exc})") from None
        for name in (FLOAT_MODEL, INT8_MODEL, CALIBRATED_MODEL):
            if not (folder / name).is_file():
                raise InputError(f"{folder / name} is missing; re-run 'quantune-edge compile'")
        specs = [InputSpec.from_dict(d) for d in report.model.get("inputs") or [report.model["input"]]]
        return cls(folder, report, specs)

    @property
    def output_shapes(self) -> dict[str, tuple[int, ...]]:
        """The ONNX model's outputs in its order: name -> the shape ONNX Runtime gives for one
        sample ({} for a compile made before outputs were recorded)."""
        return {name: tuple(v["shape"]) for name, v in self.report.verification.get("outputs", {}).items() if "shape" in v}

    def outputs(self, model: Path, inputs: np.ndarray, threads: int = 2) -> dict[str, np.ndarray]:
        """Every output of a model of this compile on ``inputs``, as ONNX Runtime returns them: under
        the ONNX names, in their order and layout, so code written against ONNX Runtime reads them."""
        return self.as_onnx(TfliteRunner(model, threads).run_all(inputs), model)

    def as_onnx(self, values: list[np.ndarray], model: Path | str = "the model") -> dict[str, np.ndarray]:
        """``TfliteRunner.run_all``'s values under the ONNX names, in the ONNX layout."""
        shapes = self.output_shapes
        if len(values) != len(shapes):
            raise InputError(f"{model} has {len(values)} outputs; the ONNX model of {self.folder} has {len(shapes)}")
        return {name: to_shape(v, stacked_shape(len(v), shape)) for (name, shape), v in zip(shapes.items(), values)}

    def per_sample(self, stacked: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        """:meth:`as_onnx`'s dict as one dict per sample, each output shaped as one ONNX Runtime run returns it."""
        return per_sample(list(stacked), list(stacked.values()), list(self.output_shapes.values()))

    def sample_outputs(self, model: Path, inputs: np.ndarray, threads: int = 2) -> list[dict[str, np.ndarray]]:
        """:meth:`outputs`, one dict per sample, each output shaped as one ONNX Runtime run returns it."""
        return self.per_sample(self.outputs(model, inputs, threads))

    def judged_outputs(self, values: list[np.ndarray]) -> Any:
        """What the task's metric reads, from ``TfliteRunner.run_all``'s values: every output per sample
        (``Task.reads_all_outputs``) or the first output."""
        return self.per_sample(self.as_onnx(values)) if self.task.reads_all_outputs else values[0]

    def task_scores(self, model: Path, samples: Samples, threads: int = 2) -> dict[str, float] | None:
        """The task's figures (top-1/top-5, or COCO mAP50-95/mAP50) of a model of this compile on
        samples loaded by :meth:`load_samples`, against their labels or what stands in for them
        (``tasks.base.reference_labels``); None when there is nothing to judge against."""
        inputs = self.tflite_inputs(samples)
        labels, _ = reference_labels(self.task, samples, lambda: self.judged_outputs(TfliteRunner(self.float_model, threads).run_all(inputs)))
        if labels is None:
            return None
        return self.task.scores(self.judged_outputs(TfliteRunner(model, threads).run_all(inputs)), labels)

    @property
    def float_model(self) -> Path:
        return self.folder / FLOAT_MODEL

    @property
    def int8_model(self) -> Path:
        return self.folder / INT8_MODEL

    @property
    def calibrated_model(self) -> Path:
        return self.folder / CALIBRATED_MODEL

    # Parsed once per object: tune's re-ranking rounds match every mixed model against the same two.
    @cached_property
    def float_graph(self) -> tflite_graph.TfliteGraph:
        return tflite_graph.read(self.float_model)

    @cached_property
    def int8_graph(self) -> tflite_graph.TfliteGraph:
        return tflite_graph.read(self.int8_model)

    @cached_property
    def calibrated_graph(self) -> tflite_graph.TfliteGraph:
        return tflite_graph.read(self.calibrated_model)

    @cached_property
    def layer_match(self) -> LayerMatch:
        """The layers of this compile: float and int8 ops matched by name (calibrated names break ties)."""
        return match_layers(self.float_graph, self.int8_graph, self.calibrated_graph)

    def mixed(self, float_layers: list[str]) -> bytes:
        """The full-int8 model with the layers named (calibrated-model tensor names, as analyze and tune
        name them) computed in float: spliced from this compile's float32 and int8 models
        (``model.splice``), so every int8 op keeps the full-int8 model's scales and no int8 round trip
        joins two float layers."""
        by_name = {layer.name: layer for layer in self.layer_match.layers}
        unknown = [name for name in float_layers if name not in by_name]
        if unknown:
            raise InputError(f"{unknown[0]!r} is not a layer of {self.folder}; run 'quantune-edge layers {self.folder}'")
        chosen = [by_name[name] for name in float_layers]
        return splice(self._model_bytes[0], self._model_bytes[1], {layer.int8_op: layer.float_op for layer in chosen})

    @cached_property
    def _model_bytes(self) -> tuple[bytes, bytes]:
        """The float32 and int8 models' bytes, read once (tune splices one mixed model per evaluation)."""
        return self.float_model.read_bytes(), self.int8_model.read_bytes()

    @property
    def per_channel(self) -> bool:
        return "per-channel" in self.report.quantization["weights"]

    @property
    def int8_io(self) -> bool:
        return self.report.quantization.get("model_io") == "int8"

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing.from_dict(self.report.preprocessing)

    @property
    def task(self) -> Task:
        """What judges this model, as compile.json names it (a compile made before tasks: a classifier)."""
        return task_from_record(self.report.task, int(self.report.accuracy.get("label_offset", 0)))

    def load_samples(
        self, source: str | Path, num: int | None, seed: int = 0, preprocessing: Preprocessing | None = None,
        on_item: Callable[[], None] | None = None, what: str = "calibration",
    ) -> Samples:
        prep = (preprocessing or self.preprocessing).sized_for(self.specs)
        return load_samples(source, prep, self.specs, num, seed, on_item=on_item, what=what, labels=self.task.read_labels)

    @staticmethod
    def tflite_inputs(samples: Samples) -> np.ndarray:
        """The TFLite models take channels-last input (the compiler checks this)."""
        return samples.data

    @cached_property
    def trace(self) -> dict:
        """compile.json's TFLite-op -> ONNX-node trace. A compile made before tracing existed is
        traced now, from its ONNX model and calibration images, and compile.json keeps the result."""
        if self.report.trace is not None:
            return self.report.trace
        from quantune_edge.common.records import sha256_file, write_json
        from quantune_edge.model.onnx_model import load as load_onnx

        model = Path(self.report.model["path"])
        if not model.is_file() or sha256_file(model) != self.report.model["sha256"]:
            raise InputError(f"{self.folder} was compiled before ONNX tracing and its model {model} is gone or changed; re-run 'quantune-edge compile'")
        samples = self.load_samples(self.report.calibration["source"], tracing.TRACE_SAMPLES, self.report.calibration.get("seed", 0))
        self.report.trace = tracing.trace_or_error(load_onnx(model), self.specs, self.float_model, self.int8_model,
                                                    self.tflite_inputs(samples))
        write_json(self.folder / REPORT, self.report.to_dict())
        return self.report.trace

    def onnx_sources(self) -> dict[int, dict]:
        """float32 op index -> its trace entry (ONNX nodes and op types); empty if tracing failed."""
        return {entry["op"]: entry for entry in self.trace.get("float32", [])}


def layer_table(compile_dir) -> dict:
    """What ``quantune-edge layers`` prints: every layer (the indices analyze and tune use) with its
    TFLite name, ONNX nodes, parameters, MACs and int8 output scale, plus what was not traced."""
    from quantune_edge.common.records import SCHEMA_VERSION

    compiled = CompiledModel.open(compile_dir)
    qg, match = compiled.int8_graph, compiled.layer_match
    sources = compiled.onnx_sources()
    units = unit_notes(match, qg)
    rows = []
    for layer in match.layers:
        q = qg.tensors[layer.int8_output]
        source = sources.get(layer.float_op, {})
        rows.append({"index": layer.index, "op_type": layer.op_type, "fused_activation": layer.fused_activation,
                     "name": layer.name, "short_name": layer.short_name,
                     "onnx_nodes": source.get("onnx_nodes", []), "onnx_ops": source.get("onnx_ops", []),
                     "params": layer.params, "macs": layer.macs,
                     "int8_scale": q.scales[0] if q.scales else None, "int8_zero_point": q.zero_points[0] if q.zero_points else None,
                     "unit": units.get(layer.index)})
    trace = compiled.trace
    return {"kind": "quantune-edge/layers", "schema_version": SCHEMA_VERSION, "compile_dir": str(compiled.folder.resolve()),
            "onnx_model": compiled.report.model["path"], "layers": rows, "untraced": trace.get("untraced"),
            "onnx_nodes_without_op": trace.get("onnx_nodes_without_op", []), "error": trace.get("error")}
