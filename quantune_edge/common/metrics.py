"""Pure numerical comparisons between a reference tensor and an approximation of it.

Everything here takes numpy arrays and returns numbers or dicts of numbers: no files, no models.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np


def sqnr_db(reference: np.ndarray, approx: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB; +inf when the approximation is exact."""
    ref = np.asarray(reference, np.float64)
    noise = float(np.sum((ref - np.asarray(approx, np.float64)) ** 2))
    signal = float(np.sum(ref**2))
    if noise == 0.0:
        return float("inf")
    if signal == 0.0:
        return float("-inf")
    return 10.0 * float(np.log10(signal / noise))


def cosine_per_sample(reference: np.ndarray, approx: np.ndarray) -> np.ndarray:
    a = np.asarray(reference, np.float64).reshape(len(reference), -1)
    b = np.asarray(approx, np.float64).reshape(len(approx), -1)
    denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    dot = np.sum(a * b, axis=1)
    return np.where(denom > 0, dot / np.where(denom > 0, denom, 1.0), np.where(np.all(a == b, axis=1), 1.0, 0.0))


def top1(outputs: np.ndarray) -> np.ndarray:
    return np.asarray(outputs).reshape(len(outputs), -1).argmax(axis=1)


def top1_correct(outputs: np.ndarray, labels: np.ndarray, label_offset: int = 0) -> np.ndarray:
    """Per labelled sample (label >= 0), in order: is its top-1 output index ``label + label_offset``."""
    labels = np.asarray(labels)
    known = labels >= 0
    return top1(outputs)[known] == labels[known] + label_offset


def top1_accuracy(outputs: np.ndarray, labels: np.ndarray, label_offset: int = 0) -> float | None:
    """Share of labelled samples (label >= 0) whose top-1 output index is ``label + label_offset``."""
    correct = top1_correct(outputs, labels, label_offset)
    return float(np.mean(correct)) if correct.size else None


def paired_top1(a_correct: np.ndarray, b_correct: np.ndarray) -> dict[str, Any]:
    """Two models' top-1 on the same images, compared image by image (exact McNemar test).

    Only the images exactly one model gets right say which is better; on 650 images two mixed models
    typically differ on a few dozen, so a lead of a few images can be chance. ``p_value`` is the
    exact two-sided probability of a split at least this uneven if both were equally good;
    ``difference_ci95`` bounds a's top-1 minus b's (a share, normal approximation of the paired
    differences) on new images like these.
    """
    a, b = np.asarray(a_correct, bool), np.asarray(b_correct, bool)
    if a.shape != b.shape:
        raise ValueError(f"paired_top1 needs the same images: {a.shape} vs {b.shape}")
    wins, losses = int(np.sum(a & ~b)), int(np.sum(~a & b))
    n, low = wins + losses, min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(low + 1)) / 2**n if n else 1.0
    size = max(a.size, 1)
    diff = (wins - losses) / size
    half = 1.96 * math.sqrt(max(n / size - diff * diff, 0.0) / size)
    return {"wins": wins, "losses": losses, "net": wins - losses, "p_value": min(1.0, 2 * tail),
            "difference": diff, "difference_ci95": [diff - half, diff + half]}


def align_layout(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Bring a channels-last 4-D TFLite output back to the reference's channels-first layout."""
    return to_shape(candidate, reference.shape)


def to_shape(candidate: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A TFLite output as the ONNX model shapes it: onnx2tf computes 4-D tensors channels-last, so a
    (N, H, W, C) output whose ONNX shape is (N, C, H, W) is transposed back (when the two differ)."""
    shape = tuple(shape)
    if candidate.shape == shape:
        return candidate
    if candidate.ndim == 4 and candidate.transpose(0, 3, 1, 2).shape == shape:
        return candidate.transpose(0, 3, 1, 2)
    if candidate.size == math.prod(shape):
        return candidate.reshape(shape)
    raise ValueError(f"output shapes differ: {shape} vs {candidate.shape}")


def compare_outputs(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """How closely ``candidate`` reproduces ``reference`` over a batch of model outputs, whatever they
    mean; ``tasks.base.compare`` adds the task's own agreement."""
    cand = align_layout(reference, candidate)
    diff = np.abs(np.asarray(reference, np.float64) - cand)
    cos = cosine_per_sample(reference, cand)
    return {
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "cosine_min": float(cos.min()),
        "cosine_mean": float(cos.mean()),
        "sqnr_db": sqnr_db(reference, cand),
        "samples": int(len(reference)),
    }


class ErrorStats:
    """Streaming float-vs-approximation statistics of one tensor over many samples.

    Only sums are kept, so a whole model's intermediate tensors can be compared sample by sample
    without holding them in memory.
    """

    __slots__ = ("count", "signal", "noise", "total", "max_abs")

    def __init__(self) -> None:
        self.count = 0
        self.signal = 0.0  # sum of ref^2
        self.noise = 0.0  # sum of (ref - approx)^2
        self.total = 0.0  # sum of ref
        self.max_abs = 0.0

    def add(self, reference: np.ndarray, approx: np.ndarray) -> bool:
        """Accumulate one sample; returns False (and adds nothing) if either holds NaN or Inf.

        float32 BLAS dot products keep this cheap enough to run on every tensor of every sample;
        a non-finite sum is re-checked in float64 so only real NaN/Inf values are refused.
        """
        ref = np.asarray(reference, np.float32).ravel()
        with np.errstate(over="ignore"):  # an overflow here sends the sample to the float64 path below
            err = ref - np.asarray(approx, np.float32).ravel()
        signal, noise = float(np.dot(ref, ref)), float(np.dot(err, err))
        if math.isfinite(signal) and math.isfinite(noise):
            total = float(ref.sum())  # float32 pairwise summation: ample for a variance, and |sum|² ≤ n·signal is finite
        else:  # huge finite values overflow float32 sums: float64 decides
            ref64 = np.asarray(reference, np.float64).ravel()
            err = ref64 - np.asarray(approx, np.float64).ravel()
            if not (np.all(np.isfinite(ref64)) and np.all(np.isfinite(err))):
                return False
            signal, noise, total = float(ref64 @ ref64), float(err @ err), float(ref64.sum())
        self.count += ref.size
        self.signal += signal
        self.noise += noise
        self.total += total
        if err.size:
            self.max_abs = max(self.max_abs, float(np.abs(err, out=err).max()))
        return True

    @property
    def mse(self) -> float:
        return self.noise / self.count if self.count else float("nan")

    @property
    def variance(self) -> float:
        if not self.count:
            return float("nan")
        mean = self.total / self.count
        return max(self.signal / self.count - mean * mean, 0.0)

    @property
    def nmse(self) -> float:
        """MSE relative to the tensor's variance: scale-free, comparable across layers."""
        var = self.variance
        if var == 0.0:
            return 0.0 if self.noise == 0.0 else float("inf")
        return self.mse / var

    @property
    def sqnr_db(self) -> float:
        return pooled_sqnr_db([self])


def pooled_sqnr_db(stats: list[ErrorStats]) -> float:
    """SQNR of several tensors taken together (e.g. the inputs of an Add or Concat)."""
    signal = sum(s.signal for s in stats)
    noise = sum(s.noise for s in stats)
    if noise == 0.0:
        return float("inf")
    if signal == 0.0:
        return float("-inf")
    return 10.0 * float(np.log10(signal / noise))
