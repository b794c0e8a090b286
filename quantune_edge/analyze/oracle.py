"""The expensive ground truth the two-run analysis is validated against.

For each layer alone: quantize the calibrated model with only that layer kept float (TF selective
quantization, same calibration ranges), run it on the samples, and measure how much the model
output improves over full int8 (the logits when the model ends in SOFTMAX; see ``TfliteRunner``). That is n+1 model builds and n+1 full runs, the cost QuantuneV2's
local metrics avoid; the Spearman correlation between each local metric and this oracle says how
well the cheap ranking stands in for it (the paper's Fig. 3 experiment).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from quantune_edge.analyze import sensitivity
from quantune_edge.common.console import captured_native_output
from quantune_edge.common.metrics import sqnr_db
from quantune_edge.common.outputs import temp_folder
from quantune_edge.compile.artifacts import CompiledModel
from quantune_edge.model.runtime import TfliteRunner
from quantune_edge.tasks.base import compare


@dataclass
class OracleLayer:
    index: int
    name: str
    output_sqnr_db: float
    output_sqnr_gain_db: float
    top1_agreement: float
    top1_accuracy: float | None


def build_and_run(compiled: CompiledModel, float_nodes: list[str], inputs: np.ndarray, threads: int, workdir: Path, quiet: bool = True) -> np.ndarray:
    """Quantize with ``float_nodes`` kept float and return the model's logits on ``inputs``."""
    path = workdir / "candidate.tflite"
    with captured_native_output(quiet):
        path.write_bytes(compiled.mixed(float_nodes))
        runner = TfliteRunner(path, threads, logits=True)
    return runner.run(inputs)


def run_oracle(
    compiled: CompiledModel,
    layers: list[dict],
    inputs: np.ndarray,
    labels: np.ndarray,
    threads: int = 2,
    on_layer: Callable[[], None] | None = None,
    quiet: bool = True,
) -> dict:
    """One model per layer kept float (plus the all-int8 baseline); returns the oracle section."""
    start = time.perf_counter()
    results: list[OracleLayer] = []
    halves: list[tuple[float, float]] = []  # each layer's gain on the first and on the second half of the samples
    with captured_native_output(quiet):
        reference = TfliteRunner(compiled.float_model, threads, logits=True)
    float_out = reference.run(inputs)
    with temp_folder("oracle") as tmp:
        work = Path(tmp)
        base_out = build_and_run(compiled, [], inputs, threads, work, quiet)
        base = compare(compiled.task, float_out, base_out)
        h = len(inputs) // 2
        base_halves = _half_sqnr(float_out, base_out, h)
        for layer in layers:
            out = build_and_run(compiled, [layer["name"]], inputs, threads, work, quiet)
            cmp = compare(compiled.task, float_out, out)
            halves.append(tuple(a - b for a, b in zip(_half_sqnr(float_out, out, h), base_halves)))
            results.append(OracleLayer(
                index=layer["index"], name=layer["name"], output_sqnr_db=cmp["sqnr_db"],
                output_sqnr_gain_db=cmp["sqnr_db"] - base["sqnr_db"], top1_agreement=cmp["top1_agreement"],
                top1_accuracy=compiled.task.metric(out, labels),
            ))
            if on_layer:
                on_layer()
    return {
        "baseline_int8": {"output_sqnr_db": base["sqnr_db"], "top1_agreement": base["top1_agreement"],
                          "top1_accuracy": compiled.task.metric(base_out, labels)},
        "layers": [asdict(r) for r in results],
        "compared": "logits (the input of the final SOFTMAX)" if reference.logits_tensor is not None else "model output",
        "repeatability": repeatability(halves, h),
        "builds": len(results) + 1,
        "invocations": (len(results) + 2) * len(inputs),  # n one-layer-float models, int8, float reference
        "wall_time_s": round(time.perf_counter() - start, 3),
    }


def _half_sqnr(reference: np.ndarray, approx: np.ndarray, h: int) -> tuple[float, float]:
    return sqnr_db(reference[:h], approx[:h]), sqnr_db(reference[h:], approx[h:])


def rank_agreement(pairs: list[tuple[float, float]]) -> float:
    """Spearman ρ between two measurements of the same layers' gains, over the layers where both are
    finite; nan with fewer than 3 such layers."""
    finite = [(a, b) for a, b in pairs if math.isfinite(a) and math.isfinite(b)]
    return sensitivity.spearman([a for a, _ in finite], [b for _, b in finite]) if len(finite) >= 3 else math.nan


def repeatability(halves: list[tuple[float, float]], samples_per_half: int) -> dict:
    """How well the oracle agrees with itself: Spearman ρ between its rankings on two halves of the
    samples, and what that allows any ranking to reach against it.

    Most single-layer gains are a few hundredths of a dB, so below the head of the list the oracle's
    order changes with the images. By the Spearman-Brown formula the full-sample ranking's reliability
    is 2ρ/(1+ρ), and a noise-free ranking can expect a correlation of about its square root with it:
    a metric's ρ near that ceiling is as good as the oracle can tell.
    """
    rho = rank_agreement(halves) if samples_per_half >= 2 else math.nan
    reliability = 2 * rho / (1 + rho) if math.isfinite(rho) and rho > -1 else math.nan
    return {"samples_per_half": samples_per_half, "spearman_between_halves": rho, "reliability": reliability,
            "rho_ceiling": math.sqrt(reliability) if math.isfinite(reliability) and reliability > 0 else math.nan}


def _aligned(metrics: list[sensitivity.LayerMetrics], oracle_layers: list[dict]) -> tuple[list[sensitivity.LayerMetrics], np.ndarray]:
    gain_by_index = {row["index"]: row["output_sqnr_gain_db"] for row in oracle_layers}
    subset = [m for m in metrics if m.index in gain_by_index and math.isfinite(gain_by_index[m.index])]
    return subset, np.array([gain_by_index[m.index] for m in subset], np.float64)


def correlations(metrics: list[sensitivity.LayerMetrics], oracle_layers: list[dict]) -> dict[str, float]:
    """Spearman ρ between each metric's score and the oracle's output-SQNR gain, over the layers."""
    subset, gains = _aligned(metrics, oracle_layers)
    return {name: sensitivity.spearman(sensitivity.score(subset, name), gains) for name in sensitivity.SCORES}


def top_k_capture(metrics: list[sensitivity.LayerMetrics], oracle_layers: list[dict], ks: tuple[int, ...] = (1, 3, 5)) -> dict[str, dict[str, float]]:
    """Per metric: oracle gain of its top-k layers / gain of the oracle's own top k.

    ρ weighs every layer alike, but most layers' single-layer gains are within ±0.1 dB and their
    order is set by error interactions no local metric sees; tuning only uses the head of the
    list, so this says how much of the reachable gain the head actually holds (1.0 = as good as
    the oracle's own choice; negative = the chosen layers make the output worse).
    """
    subset, gains = _aligned(metrics, oracle_layers)
    best = np.sort(gains)[::-1]
    out: dict[str, dict[str, float]] = {}
    for name in sensitivity.SCORES:
        order = np.argsort(-sensitivity.score(subset, name), kind="stable")
        out[name] = {f"top{k}": float(gains[order[:k]].sum() / best[:k].sum()) if best[:k].sum() > 0 else float("nan")
                     for k in ks if k <= len(gains)}
    return out


def oracle_section(compiled: CompiledModel, metrics: list[sensitivity.LayerMetrics], inputs: np.ndarray, labels: np.ndarray,
                   threads: int, analysis_seconds: float, on_layer: Callable[[], None] | None = None, quiet: bool = True) -> dict:
    """analysis.json's ``oracle``: the one-layer-float oracle run, how each score's ranking correlates
    with it, how much of its top k each score captures, and what it cost next to the two-run analysis."""
    section = run_oracle(compiled, [m.to_dict() for m in metrics], inputs, labels, threads, on_layer, quiet=quiet)
    section["spearman"] = correlations(metrics, section["layers"])
    section["top_k_capture"] = top_k_capture(metrics, section["layers"])
    section["time_ratio_oracle_over_analysis"] = round(section["wall_time_s"] / max(analysis_seconds, 1e-9), 1)
    return section
