"""The Pareto figure of a tune: accuracy vs latency for k = 0 … n float layers (matplotlib, headless)."""
from __future__ import annotations

from pathlib import Path


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
