"""Per-layer local metrics and the sensitivity scores built from them (pure: numbers in, ranks out).

Every score is "higher = more sensitive" (keeping that layer float should help most). The scores:

- ``act_sqnr``: minus the SQNR (dB) of the layer's int8 output against its float output: the total
  error present at that point, inherited plus added.
- ``sqnr_delta``: input SQNR minus output SQNR (dB): the error the layer itself adds.
- ``weight_sqnr``: minus the SQNR of the dequantized int8 weights; layers without weights rank last.
- ``act_nmse`` / ``act_mse`` / ``weight_mse``: mean squared errors (``act_nmse`` relative to the
  float output's variance, so it is scale-free).
- ``local_rmse``: the layer's own error on its own int8 input (its float op run on the int8 model's
  dequantized input vs the int8 op's output), RMS in units of the output's quantization step. This
  is the quantity TF's QuantizationDebugger ranks by (RMSE/scale), obtained here from the same two
  runs with a numpy kernel instead of a separate debug model; ops without a kernel rank last.
- ``output_share`` (default): the share of the int8 model's logit error energy that keeping the
  layer float would remove, to first order. The removable error is ``local_rmse``'s error with the
  float model input for layers that read it, minus the rounding to the output's int8 grid where an
  int8 op reads the output (a float layer's output is re-quantized there, so an int8 ADD, whose
  error is all rounding, removes nothing); it is projected onto the logit error through the layers
  after it by one backward pass per sample linearised around the int8 run (:mod:`backprop`). Where
  ``local_rmse`` asks how large a layer's error is, this asks how much of it the output would get
  back, which is what the one-layer-float oracle measures.
- ``quantune``: QuantuneV2's reference score: weight SQNR, activation SQNR, weight MSE and
  activation MSE, each rank-normalised to [0, 1] and combined with a ratio (default 1:1:1:1).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass
class LayerMetrics:
    index: int
    name: str
    short_name: str
    op_type: str
    params: int
    macs: int
    fused_activation: str | None
    act_sqnr_db: float
    act_mse: float
    act_nmse: float
    act_max_abs_err: float
    act_scale: float | None
    act_zero_point: int | None
    input_sqnr_db: float
    sqnr_delta_db: float
    weight_sqnr_db: float | None = None
    weight_mse: float | None = None
    local_sqnr_db: float | None = None
    local_rmse_lsb: float | None = None
    output_share: float | None = None
    onnx_nodes: list[str] = field(default_factory=list)  # the ONNX nodes this fused op came from
    onnx_ops: list[str] = field(default_factory=list)
    unit: str | None = None  # what keeping it float takes with it (a requantized tail, a scale-tied chain)

    def to_dict(self) -> dict:
        return asdict(self)


# SQNR of an ideal full-scale 8-bit uniform quantizer (6.02·8 + 1.76 dB): the best an int8 input can be.
IDEAL_INT8_SQNR_DB = 49.92


def sqnr_delta(input_sqnr: float, output_sqnr: float) -> float:
    """Error the layer adds, in dB: input SQNR minus output SQNR.

    An exact input (inf SQNR, e.g. (p − 127)/128 pixels, which int8 represents exactly) counts as the
    ideal int8 SQNR, so the first layer gets a finite delta comparable with the others. An exact
    output adds nothing (0).
    """
    if math.isinf(output_sqnr) and output_sqnr > 0:
        return 0.0
    if math.isinf(input_sqnr) and input_sqnr > 0:
        input_sqnr = max(IDEAL_INT8_SQNR_DB, output_sqnr)
    return input_sqnr - output_sqnr


def _finite(values: Sequence[float | None], missing: float) -> np.ndarray:
    """None -> ``missing``; +-inf clipped to the finite range so ranks stay meaningful."""
    arr = np.array([missing if v is None else v for v in values], np.float64)
    arr[np.isnan(arr)] = missing
    return np.clip(arr, -1e300, 1e300)


def rank_normalise(values: np.ndarray) -> np.ndarray:
    """Average ranks scaled to [0, 1] (1 = largest)."""
    from scipy.stats import rankdata

    if len(values) <= 1:
        return np.ones(len(values))
    return (rankdata(values) - 1) / (len(values) - 1)


def _neg(key: str) -> Callable[[list[LayerMetrics]], np.ndarray]:
    return lambda ms: -_finite([getattr(m, key) for m in ms], missing=math.inf)


def _pos(key: str) -> Callable[[list[LayerMetrics]], np.ndarray]:
    return lambda ms: _finite([getattr(m, key) for m in ms], missing=-math.inf)


def quantune_score(metrics: list[LayerMetrics], ratio: Sequence[float] = (1.0, 1.0, 1.0, 1.0)) -> np.ndarray:
    """Weight SQNR : activation SQNR : weight MSE : activation MSE, rank-normalised, weighted sum."""
    parts = [SCORES[k](metrics) for k in ("weight_sqnr", "act_sqnr", "weight_mse", "act_mse")]
    total = np.sum([w * rank_normalise(p) for w, p in zip(ratio, parts)], axis=0)
    return np.asarray(total / max(sum(ratio), 1e-12), np.float64)


SCORES: dict[str, Callable[[list[LayerMetrics]], np.ndarray]] = {
    "act_sqnr": _neg("act_sqnr_db"),
    "sqnr_delta": _pos("sqnr_delta_db"),
    "weight_sqnr": _neg("weight_sqnr_db"),
    "act_nmse": _pos("act_nmse"),
    "act_mse": _pos("act_mse"),
    "weight_mse": _pos("weight_mse"),
    "local_rmse": _pos("local_rmse_lsb"),
    "output_share": _pos("output_share"),
}
SCORES["quantune"] = quantune_score
DEFAULT_METRIC = "output_share"


def score(metrics: list[LayerMetrics], metric: str = DEFAULT_METRIC) -> np.ndarray:
    if metric not in SCORES:
        raise KeyError(metric)
    return np.asarray(SCORES[metric](metrics), np.float64)


def ranking(metrics: list[LayerMetrics], metric: str = DEFAULT_METRIC) -> list[int]:
    """Layer indices, most sensitive first (ties keep graph order)."""
    return order_by_score([m.index for m in metrics], score(metrics, metric))


def order_by_score(indices: Sequence[int], scores: Sequence[float] | np.ndarray) -> list[int]:
    """``indices`` sorted by score, highest first; ties keep the given (graph) order."""
    return [indices[i] for i in sorted(range(len(indices)), key=lambda i: (-scores[i], i))]


def nan_low(value: float | None) -> float:
    """Sort key that puts None/NaN (e.g. an undefined ρ) below every number."""
    return -1e9 if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties); nan when either side is constant."""
    from scipy.stats import rankdata

    ra, rb = rankdata(np.asarray(a, np.float64)), rankdata(np.asarray(b, np.float64))
    if np.std(ra) == 0 or np.std(rb) == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])
