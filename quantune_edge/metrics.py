"""Pure numerical comparisons between a reference tensor and an approximation of it.

Everything here takes numpy arrays and returns numbers or dicts of numbers: no files, no models.
"""
from __future__ import annotations

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


def top1_accuracy(outputs: np.ndarray, labels: np.ndarray, label_offset: int = 0) -> float | None:
    """Share of labelled samples (label >= 0) whose top-1 output index is ``label + label_offset``."""
    labels = np.asarray(labels)
    known = labels >= 0
    if not np.any(known):
        return None
    return float(np.mean(top1(outputs)[known] == labels[known] + label_offset))


def align_layout(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Bring a channels-last 4-D TFLite output back to the reference's channels-first layout."""
    if candidate.shape == reference.shape:
        return candidate
    if candidate.ndim == 4 and candidate.transpose(0, 3, 1, 2).shape == reference.shape:
        return candidate.transpose(0, 3, 1, 2)
    if candidate.size == reference.size:
        return candidate.reshape(reference.shape)
    raise ValueError(f"output shapes differ: {reference.shape} vs {candidate.shape}")


def compare_outputs(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """How closely ``candidate`` reproduces ``reference`` over a batch of model outputs."""
    cand = align_layout(reference, candidate)
    diff = np.abs(np.asarray(reference, np.float64) - cand)
    cos = cosine_per_sample(reference, cand)
    return {
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "cosine_min": float(cos.min()),
        "cosine_mean": float(cos.mean()),
        "top1_agreement": float(np.mean(top1(reference) == top1(cand))),
        "sqnr_db": sqnr_db(reference, cand),
        "samples": int(len(reference)),
    }
