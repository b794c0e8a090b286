"""The analysis figure: local metrics and sensitivity scores per layer (matplotlib, headless)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from quantune_edge.analyze.sensitivity import nan_low
from quantune_edge.compile.tracing import onnx_label


def _finite(values) -> np.ndarray:
    arr = np.array([np.nan if v is None or (isinstance(v, str)) else float(v) for v in values], np.float64)
    arr[~np.isfinite(arr) | (np.abs(arr) >= 1e299)] = np.nan  # scores park undefined layers at +-1e300
    return arr


def plot_analysis(report, path: str | Path) -> None:
    """One panel per local metric (layers in graph order on x), then the sensitivity scores; with an
    oracle, its per-layer gain on its own panel and the rank-correlation table in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = report.layers
    x = np.arange(len(layers))
    panels = [
        ("weight SQNR (dB)", "weight_sqnr_db", "tab:blue", False),
        ("activation SQNR (dB)", "act_sqnr_db", "tab:green", False),
        ("SQNR delta (dB): error the layer adds", "sqnr_delta_db", "tab:red", False),
        ("own error on its int8 input (LSB)", "local_rmse_lsb", "tab:orange", False),
        ("output share: int8 logit\nerror float removes", "output_share", "tab:olive", False),
        ("activation NMSE (log)", "act_nmse", "tab:purple", True),
        ("weight MSE (log)", "weight_mse", "tab:brown", True),
    ]
    oracle = report.oracle or {}
    n_panels = len(panels) + 1 + (1 if oracle else 0)
    fig, axes = plt.subplots(n_panels, 1, figsize=(max(10, 0.18 * len(layers) + 4), 2.1 * n_panels), sharex=True)
    for ax, (title, key, color, log) in zip(axes, panels):
        y = _finite([layer.get(key) for layer in layers])
        if log:
            y = np.where(y > 0, y, np.nan)
            if np.any(y > 0):
                ax.set_yscale("log")
        if np.all(np.isnan(y)):
            ax.text(0.5, 0.5, "not measured for any layer", transform=ax.transAxes, ha="center", va="center", fontsize=8, color="grey")
        ax.bar(x, np.nan_to_num(y, nan=0.0), color=color, width=0.8)
        ax.set_ylabel(title, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    ax = axes[len(panels)]
    score = _finite(report.scores[report.metric])
    order = report.sensitivity_order
    ax.bar(x, np.nan_to_num(score, nan=0.0), color="0.6", width=0.8)
    top = order[: min(5, len(order))]
    ax.bar(top, np.nan_to_num(score[top], nan=0.0), color="tab:red", width=0.8, label="top 5 (keep float first)")
    ax.set_ylabel(f"score: {report.metric}", fontsize=8)
    ax.legend(fontsize=7, loc="upper right")
    if oracle:
        ax = axes[-1]
        gain = np.full(len(layers), np.nan)
        for row in oracle["layers"]:
            gain[row["index"]] = row["output_sqnr_gain_db"]
        ax.bar(x, np.nan_to_num(gain, nan=0.0), color="black", width=0.8)
        ax.set_ylabel("oracle: output SQNR gain\nif only this layer float (dB)", fontsize=8)
        rho = ", ".join(f"{k} {v:+.2f}" for k, v in sorted(oracle["spearman"].items(), key=lambda kv: -nan_low(kv[1])))
        rep = oracle.get("repeatability") or {}
        halves = rep.get("spearman_between_halves", math.nan)
        again = f"\noracle vs itself on two halves of the samples: ρ {halves:+.2f}" if math.isfinite(halves) else ""
        fig.suptitle(f"Spearman ρ vs one-layer-float oracle: {rho}{again}", fontsize=9)
    labels = [onnx_label(layer) or layer["short_name"] for layer in layers]
    step = max(1, math.ceil(len(layers) / 60))
    axes[-1].set_xticks(x[::step])
    axes[-1].set_xticklabels([f"{i}:{labels[i][-28:]}" for i in x[::step]], rotation=90, fontsize=6)
    axes[0].set_title(f"local metrics per layer ({len(layers)} fused TFLite ops, graph order; {report.samples['count']} samples)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
