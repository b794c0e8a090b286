"""Figures people would rather look at than read (matplotlib, headless)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .sensitivity import nan_low
from .tracing import onnx_label


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


def plot_pareto(report, path: str | Path) -> None:
    """Accuracy vs host latency (as a ratio to full int8) for k = 0 … n float layers, with float32, full
    int8 and the choice marked; beside it the same sweep timed on the --latency-source device in ms,
    when tune had one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points, ref, c = report.pareto or [], report.reference, report.chosen
    device = ref.get("device_pareto")
    # On the host each model was timed paired with full int8, at its own moment; their ratios, not their
    # ms, are comparable (a busy host shifts the ms of one pair, not its ratio).
    panels = [([p["latency_ratio"] for p in points], ref["float32_latency_ms"] / ref["int8_latency_ms"], 1.0, c["latency_ratio"],
               f"host latency ÷ full int8 (p50, each model paired with int8, {ref['threads']} threads)")]
    if device:
        panels.append(([p["device_latency_ms"] for p in points], device["float32_ms"], device["int8_ms"], device["chosen_ms"],
                       f"latency on {device['target']}, ms (p50, timed side by side)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.5), squeeze=False)
    acc = [100 * p["accuracy"] for p in points]
    for ax, (lat, float_x, int8_x, chosen_x, xlabel) in zip(axes[0], panels):  # x: ms or ratio, per panel
        ax.plot(lat, acc, "o-", color="0.5", label="k most sensitive layers float")
        for p, x, y in zip(points, lat, acc):
            ax.annotate(str(p["float_layers"]), (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.axvline(int8_x, color="tab:blue", ls=":", lw=1)
        ax.axvline(float_x, color="tab:green", ls=":", lw=1)
        ax.scatter([float_x], [100 * ref["float32_accuracy"]], marker="s", color="tab:green", zorder=3, label="float32")
        if ref.get("int8"):
            ax.scatter([int8_x], [100 * ref["int8"]["accuracy"]], marker="D", color="tab:blue", zorder=3, label="full int8")
        ax.scatter([chosen_x], [100 * c["accuracy"]], marker="*", s=180, color="tab:red", zorder=4,
                   label=f"chosen: {len(c['float_layers'])} float layers")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"accuracy, % ({ref['accuracy_is']}, {ref['eval_samples']} images)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
